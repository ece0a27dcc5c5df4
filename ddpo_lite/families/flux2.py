"""FLUX.2-klein (4B): a flow-matching transformer on packed, patchified latents, prompted by a
Qwen3 language model's hidden states, with true classifier-free guidance (undistilled "base"
checkpoints) or none (the step-distilled ones).

As `Flux2KleinPipeline.__call__` builds them (diffusers 0.42.1):
- prompt_embeds (B, L, 3 * hidden): the chat-templated prompt through Qwen3 on L =
  `model.max_sequence_length` tokens (the pipeline's default 512; the chat template's own take
  about a dozen of them), hidden states of layers 9, 18 and 27 stacked per token
  (`encode_prompt`); the negative is the same of ""
  (the pipeline's only negative; `prompts.negative_prompt` replaces it here, as the pipeline's
  `negative_prompt_embeds` would);
- latents: the VAE's (B, C, h, w) patchified 2x2 into (B, 4C, h/2, w/2), normalised by the VAE's
  batch-norm statistics, then packed as tokens (B, h/2 * w/2, 4C); the trajectory keeps them
  packed, `unpack` gives what the pipeline returns for output_type="latent";
- txt_ids (L, 4) = (0, 0, 0, l), img_ids (h/2 * w/2, 4) = (0, row, column, 0), rebuilt here;
- timestep = sigma (the scheduler's timestep / 1000), guidance None (klein has no guidance
  embedding); CFG uncond + g * (cond - uncond) where the model is not distilled and g > 1;
- the sigma grid: custom sigmas linspace(1, 1/N, N) with mu = compute_empirical_mu(image
  tokens, N) (`flow_schedule`), not FLUX.1's calculate_shift;
- decoding: unpack, x * sqrt(bn.running_var + eps) + bn.running_mean, unpatchify, VAE.

`Qwen3ForCausalLM` as the pipeline calls it also computes its LM head's logits for every token
(B x L x 151,936 floats: ~20 GiB for the prompt encoder's batches of 64) and the pipeline reads
only hidden states, so `encode` runs with the head stood down (`without_lm_head`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from ddpo_lite.families import Cond, guided, sequence_length


class _NoLogits(torch.nn.Module):
    """In the LM head's place while prompts are encoded: no logits, (..., 0)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


@contextlib.contextmanager
def without_lm_head(text_encoder: torch.nn.Module) -> Iterator[None]:
    """The language model's head replaced by `_NoLogits` inside the block (the hidden states
    are unchanged: the head runs after the last layer), restored after."""
    head = getattr(text_encoder, "lm_head", None)
    if head is None:
        yield
        return
    text_encoder.lm_head = _NoLogits()
    try:
        yield
    finally:
        text_encoder.lm_head = head


def _ids(*axes: torch.Tensor) -> torch.Tensor:
    return torch.cartesian_prod(*axes)


class _Flux2:
    name = "flux2"
    pipeline_class = Flux2KleinPipeline
    pipeline_class_names = ("Flux2KleinPipeline",)
    required_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    vae_fp32_in_fp16 = False
    denoiser_name = "transformer"
    sampler = "flow"
    has_negative_prompt = True
    default_sequence_length = 512  # Flux2KleinPipeline.encode_prompt's max_sequence_length
    text_tokens = "Qwen3"

    def sequence_length_range(self, pipe) -> tuple[int, int, str]:
        """(fewest, most) Qwen3 tokens, and why: its position limit; with 0 no text token is
        left (the pipeline's reshape fails)."""
        most = pipe.text_encoder.config.max_position_embeddings
        return 1, most, f"Qwen3's {most} positions; with 0 no text token would be left"

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [pipe.text_encoder]

    def native_resolution(self, pipe) -> int:
        """The VAE's sample size (1024 for FLUX.2, the pipeline's default height)."""
        return int(pipe.vae.config.sample_size)

    def resolution_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patchify

    def latent_shape(self, pipe, batch: int, resolution: int) -> tuple[int, ...]:
        """The PACKED shape (B, tokens, 4C) of square `resolution` images."""
        side = resolution // self.resolution_multiple(pipe)
        return (batch, side * side, pipe.transformer.config.in_channels)

    def flow_schedule(self, pipe, scheduler, num_steps: int, resolution: int) -> dict:
        """`scheduler.set_timesteps` kwargs of `Flux2KleinPipeline.__call__`."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        tokens = self.latent_shape(pipe, 1, resolution)[1]
        mu = compute_empirical_mu(image_seq_len=tokens, num_steps=num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def check_settings(self, pipe, config) -> str | None:
        """What this model cannot do with `config` (one line), or None: a step-distilled klein
        ignores guidance (its pipeline warns and samples without)."""
        guidance_scale = config.sample.guidance_scale
        if guidance_scale > 1 and pipe.config.get("is_distilled", False):
            return (
                f"sample.guidance_scale = {guidance_scale} but this FLUX.2-klein model is "
                "step-distilled and samples without guidance; set sample.guidance_scale = 1"
            )
        return None

    def encode(
        self,
        pipe,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str,
        resolution: int,
        max_sequence_length: int = -1,
    ) -> tuple[Cond, Cond]:
        """The pipeline's own `encode_prompt` for the prompts and for the negative prompt, on
        `max_sequence_length` tokens (-1: the model's default 512), the LM head stood down (its
        logits are never read)."""
        length = sequence_length(pipe, max_sequence_length)
        with without_lm_head(pipe.text_encoder):
            embeds, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=length)
            negative, _ = pipe.encode_prompt(
                [negative_prompt], device=device, max_sequence_length=length
            )
        return Cond({"prompt_embeds": embeds}), Cond({"prompt_embeds": negative})

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The transformer's velocity (B, tokens, 4C) with CFG, float32; `timesteps` are the
        scheduler's (sigma * 1000)."""
        device = latents.device
        side = math.isqrt(latents.shape[1])
        zero, length = torch.arange(1, device=device), cond["prompt_embeds"].shape[1]
        rows = torch.arange(side, device=device)  # built where used: no copy per step
        img_ids = _ids(zero, rows, rows, zero)
        txt_ids = _ids(zero, zero, zero, torch.arange(length, device=device))

        def call(x, t, both: Cond) -> torch.Tensor:
            return denoiser(
                hidden_states=x,
                timestep=t / 1000,
                guidance=None,
                encoder_hidden_states=both["prompt_embeds"],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def unpack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Packed, normalised tokens (B, tokens, 4C) -> the VAE's latents (B, C, h, w): what the
        pipeline returns with output_type="latent"."""
        batch, tokens, channels = latents.shape
        side = math.isqrt(tokens)
        x = latents.permute(0, 2, 1).reshape(batch, channels, side, side)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        x = x * std.to(x.device, x.dtype) + mean
        # unpatchify: (B, 4C, h/2, w/2) -> (B, C, h, w)
        x = x.reshape(batch, channels // 4, 2, 2, side, side).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(batch, channels // 4, side * 2, side * 2)

    @torch.no_grad()
    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        vae = pipe.vae
        image = vae.decode(self.unpack(pipe, latents).to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image.float(), output_type="pil")

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate), with
        `max_sequence_length` tokens (-1: 512)."""
        width = 3 * text_encoders[0].config.hidden_size
        length = self.default_sequence_length if max_sequence_length < 0 else max_sequence_length
        embeds = torch.empty(batch, length, width, device=device, dtype=dtype)
        return Cond({"prompt_embeds": embeds})


FLUX2 = _Flux2()

"""FLUX.1 (dev and schnell): a flow-matching MMDiT on PACKED latents, CLIP-L's pooled embedding
and T5-XXL's sequence, FLUX.1-dev's guidance embedding in place of classifier-free guidance.

As `FluxPipeline.__call__` builds them (diffusers 0.42):
- prompt_embeds (B, L, 4096): T5's last hidden state on L = `model.max_sequence_length` tokens
  (the pipeline's default 512; `sequence_length`);
  pooled (B, 768): CLIP-L's pooled output, the transformer's `pooled_projections`;
- latents are packed: the VAE's (B, C, h, w) as 2x2 patches, (B, h/2 * w/2, 4C); the trajectory
  keeps them packed (the sampler's math is elementwise), `decode` unpacks them;
- txt_ids (L, 3) zeros, img_ids (h/2 * w/2, 3) = (0, row, column), rebuilt here from the shapes;
- the transformer is called with timestep = sigma (the scheduler's timestep / 1000) and, where
  `transformer.config.guidance_embeds` (dev; schnell has none), guidance = the guidance scale
  as a (B,) float32 tensor. There is no negative prompt (`has_negative_prompt = False`: the
  policy passes negative=None and the scale, which this family reads as the embedding's input);
- the sigma grid: custom sigmas linspace(1, 1/N, N), shifted by mu = calculate_shift(image
  tokens) (`flow_schedule`);
- decoding: unpack, then latents / scaling_factor + shift_factor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from ddpo_lite.families import Cond, decode_flow_vae, guided, sequence_length


def image_ids(tokens: int, device=None) -> torch.Tensor:
    """(tokens, 3) positions (0, row, column) of a square packed latent, as
    `FluxPipeline._prepare_latent_image_ids` builds them."""
    side = math.isqrt(tokens)
    ids = torch.zeros(side, side, 3, device=device)  # built where used: no copy per step
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return ids.reshape(tokens, 3)


def model_config(model: torch.nn.Module):
    """The diffusers config of `model`, through a DDP (`.module`) or compile (`._orig_mod`) wrap."""
    while not hasattr(model, "config"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


class _Flux:
    name = "flux"
    pipeline_class = FluxPipeline
    pipeline_class_names = ("FluxPipeline",)
    required_components = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    optional_components = ("image_encoder", "feature_extractor")
    vae_fp32_in_fp16 = False
    denoiser_name = "transformer"
    sampler = "flow"
    has_negative_prompt = False
    default_sequence_length = 512  # FluxPipeline.encode_prompt's max_sequence_length
    text_tokens = "T5"

    def sequence_length_range(self, pipe) -> tuple[int, int, str]:
        """(fewest, most) T5 tokens, and why: the pipeline refuses more than 512 when it samples;
        T5's tokens are FLUX.1's only text sequence (CLIP gives a pooled vector), and asked for
        0 its tokenizer truncates nothing (rows of different lengths)."""
        why = (
            "FluxPipeline refuses more than 512; with 0 no text token would be left: FLUX.1's "
            "CLIP gives only a pooled vector"
        )
        return 1, 512, why

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]

    def native_resolution(self, pipe) -> int:
        """The VAE's sample size: 1024 in FLUX.1's config (the pipeline's default height)."""
        return int(pipe.vae.config.sample_size)

    def resolution_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 packing

    def latent_shape(self, pipe, batch: int, resolution: int) -> tuple[int, ...]:
        """The PACKED shape (B, tokens, 4C) of square `resolution` images."""
        side = resolution // self.resolution_multiple(pipe)
        return (batch, side * side, pipe.transformer.config.in_channels)

    def flow_schedule(self, pipe, scheduler, num_steps: int, resolution: int) -> dict:
        """`scheduler.set_timesteps` kwargs of `FluxPipeline.__call__`: sigmas linspace(1, 1/N, N)
        (none where the scheduler uses its own flow sigmas) and mu from the image token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        tokens = self.latent_shape(pipe, 1, resolution)[1]
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if config.get("use_flow_sigmas", False):
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def encode(
        self,
        pipe,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str,
        resolution: int,
        max_sequence_length: int = -1,
    ) -> tuple[Cond, Cond]:
        """The pipeline's own `encode_prompt` (CLIP pooled + T5 on `max_sequence_length` tokens,
        -1: the model's default 512). The negative prompt is encoded the same way for the
        protocol's sake; FLUX.1 samples without it."""
        length = sequence_length(pipe, max_sequence_length)

        def one(texts: list[str]) -> Cond:
            embeds, pooled, _ = pipe.encode_prompt(
                texts, None, device=device, max_sequence_length=length
            )
            return Cond({"prompt_embeds": embeds, "pooled": pooled})

        return one(prompts), one([negative_prompt])

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The transformer's velocity (B, tokens, 4C), float32; `timesteps` are the scheduler's
        (sigma * 1000), the guidance embedding (if any) gets `guidance_scale`."""
        device = latents.device
        img_ids = image_ids(latents.shape[1], device)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device)
        embeds_guidance = bool(model_config(denoiser).guidance_embeds)  # dev: yes; schnell: no

        def call(x, t, both: Cond) -> torch.Tensor:
            guidance = None
            if embeds_guidance:
                guidance = torch.full([x.shape[0]], guidance_scale, device=device)
            return denoiser(
                hidden_states=x,
                timestep=t / 1000,
                guidance=guidance,
                pooled_projections=both["pooled"],
                encoder_hidden_states=both["prompt_embeds"],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def unpack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Packed (B, tokens, 4C) -> the VAE's (B, C, h, w) (`FluxPipeline._unpack_latents`)."""
        batch, tokens, channels = latents.shape
        side = math.isqrt(tokens)
        x = latents.view(batch, side, side, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, channels // 4, side * 2, side * 2)

    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        return decode_flow_vae(pipe, self.unpack(pipe, latents))

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate), with
        `max_sequence_length` T5 tokens (-1: 512)."""
        clip, t5 = (encoder.config for encoder in text_encoders[:2])
        length = self.default_sequence_length if max_sequence_length < 0 else max_sequence_length
        return Cond(
            {
                "prompt_embeds": torch.empty(batch, length, t5.d_model, device=device, dtype=dtype),
                "pooled": torch.empty(batch, clip.hidden_size, device=device, dtype=dtype),
            }
        )


FLUX = _Flux()

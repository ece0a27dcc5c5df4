"""Stable Diffusion 3 / 3.5: an MMDiT transformer predicting the flow velocity, three text
encoders (CLIP-L, CLIP-G, and T5-XXL, which may be left out) and a 16-channel VAE with a shift.

As `StableDiffusion3Pipeline.__call__` builds them:
- prompt_embeds (B, 77 + max_sequence_length, 4096): both CLIPs' penultimate hidden states,
  concatenated and zero-padded to T5's width, then T5's embeddings (zeros without T5); T5's
  tokens are `model.max_sequence_length` (the pipeline's default 256; `sequence_length`);
- pooled (B, 2048): both CLIPs' pooled projections, the transformer's `pooled_projections`;
- the transformer is called with timestep = sigma * 1000, and CFG runs as one batch of 2B
  (unconditional first);
- decoding undoes the VAE's scaling and shift: latents / scaling_factor + shift_factor.
SD3 without T5 (`text_encoder_3=None`, the pipeline's documented option) is the same call with
zeros in T5's place; `memory.drop_t5` loads it that way.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from ddpo_lite.families import Cond, decode_flow_vae, guided, sequence_length


class _SD3:
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    required_components = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    optional_components = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    vae_fp32_in_fp16 = False
    denoiser_name = "transformer"
    repeated_blocks = ("JointTransformerBlock",)  # memory.compile_blocks (diffusers names none)
    sampler = "flow"
    has_negative_prompt = True
    default_sequence_length = 256  # StableDiffusion3Pipeline.encode_prompt's max_sequence_length
    text_tokens = "T5"

    def sequence_length_range(self, pipe) -> tuple[int, int, str]:
        """(fewest, most) T5 tokens, and why: the pipeline refuses more than 512 when it samples;
        0 (the CLIP tokens alone) only without T5, whose tokenizer asked for 0 truncates nothing
        (rows of different lengths)."""
        if pipe.text_encoder_3 is None:
            return 0, 512, "StableDiffusion3Pipeline refuses more than 512"
        why = (
            "StableDiffusion3Pipeline refuses more than 512; asked for 0, T5's tokenizer truncates "
            "nothing: memory.drop_t5 = true encodes the CLIP tokens alone"
        )
        return 1, 512, why

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        return [encoder for encoder in encoders if encoder is not None]

    def native_resolution(self, pipe) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def resolution_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def latent_shape(self, pipe, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // pipe.vae_scale_factor
        return (batch, pipe.transformer.config.in_channels, side, side)

    def encode(
        self,
        pipe,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str,
        resolution: int,
        max_sequence_length: int = -1,
    ) -> tuple[Cond, Cond]:
        """The pipeline's own `encode_prompt` for all three encoders, and the negative's, with
        `max_sequence_length` T5 tokens (-1: the model's default, `sequence_length`: 256, or
        the pipeline's `t5_sequence_length`: `shapes-flow` was trained with none)."""
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
            max_sequence_length=sequence_length(pipe, max_sequence_length),
        )
        cond = Cond({"prompt_embeds": embeds, "pooled": pooled})
        return cond, Cond({"prompt_embeds": negative[:1], "pooled": negative_pooled[:1]})

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The transformer's velocity with classifier-free guidance, in float32."""

        def call(x, t, both: Cond) -> torch.Tensor:
            return denoiser(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=both["prompt_embeds"],
                pooled_projections=both["pooled"],
                return_dict=False,
            )[0]

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        return decode_flow_vae(pipe, latents)

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate), with
        `max_sequence_length` T5 tokens (-1: 256) whether or not T5 is loaded (the pipeline
        pads with zeros)."""
        clip_l, clip_g = (encoder.config for encoder in text_encoders[:2])
        width = 4096 if len(text_encoders) < 3 else text_encoders[2].config.d_model
        t5 = self.default_sequence_length if max_sequence_length < 0 else max_sequence_length
        length = clip_l.max_position_embeddings + t5
        pooled = clip_l.projection_dim + clip_g.projection_dim
        return Cond(
            {
                "prompt_embeds": torch.empty(batch, length, width, device=device, dtype=dtype),
                "pooled": torch.empty(batch, pooled, device=device, dtype=dtype),
            }
        )


SD3 = _SD3()

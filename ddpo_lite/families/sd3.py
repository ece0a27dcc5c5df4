"""Stable Diffusion 3 / 3.5: an MMDiT transformer predicting the flow velocity, three text
encoders (CLIP-L, CLIP-G, and T5-XXL, which may be left out) and a 16-channel VAE with a shift.

As `StableDiffusion3Pipeline.__call__` builds them:
- prompt_embeds (B, 77 + max_sequence_length, 4096): both CLIPs' penultimate hidden states,
  concatenated and zero-padded to T5's width, then T5's embeddings (zeros without T5);
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

from ddpo_lite.families import Cond, decode_flow_vae, guided


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
        self, pipe, prompts: list[str], device: torch.device, negative_prompt: str, resolution: int
    ) -> tuple[Cond, Cond]:
        """The pipeline's own `encode_prompt` for all three encoders, and the negative's. T5's
        length is the pipeline's default 256 unless the pipeline carries `t5_sequence_length`
        (`shapes-flow` sets 0: it was trained with no T5 tokens; models/loading.py)."""
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
            max_sequence_length=getattr(pipe, "t5_sequence_length", 256),
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

    def empty_cond(self, text_encoders, batch: int, device="meta", dtype=None) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate), with
        T5's 256 tokens whether or not T5 is loaded (the pipeline pads with zeros)."""
        clip_l, clip_g = (encoder.config for encoder in text_encoders[:2])
        width = 4096 if len(text_encoders) < 3 else text_encoders[2].config.d_model
        length = clip_l.max_position_embeddings + 256
        pooled = clip_l.projection_dim + clip_g.projection_dim
        return Cond(
            {
                "prompt_embeds": torch.empty(batch, length, width, device=device, dtype=dtype),
                "pooled": torch.empty(batch, pooled, device=device, dtype=dtype),
            }
        )


SD3 = _SD3()

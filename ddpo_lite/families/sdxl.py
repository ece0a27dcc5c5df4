"""Stable Diffusion XL: two CLIP text encoders, a pooled embedding and size/crop time ids.

As `StableDiffusionXLPipeline.__call__` builds them:
- prompt_embeds (B, 77, 768 + 1280): both encoders' penultimate hidden states, concatenated;
- pooled (B, 1280): text_encoder_2's projected pooled output, the UNet's `text_embeds`;
- time_ids (B, 6): original size, crop top-left, target size (here (res, res), (0, 0),
  (res, res)), the UNet's `time_ids`; the negative prompt uses the same ones;
- an empty negative prompt is all zeros where the model's config says
  `force_zeros_for_empty_prompt` (SDXL base does), as the pipeline treats it.
The VAE overflows in fp16 (`force_upcast`): it is kept in float32 when the base is fp16.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from ddpo_lite.families import Cond, decode_with_vae, unet_latent_shape


class _SDXL:
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    required_components = (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    vae_fp32_in_fp16 = True
    denoiser_name = "unet"
    sampler = "ddim"
    has_negative_prompt = True

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.unet

    def latent_shape(self, pipe, batch: int, resolution: int) -> tuple[int, ...]:
        return unet_latent_shape(pipe, batch, resolution)

    def resolution_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def native_resolution(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def encode(
        self,
        pipe,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str,
        resolution: int,
        max_sequence_length: int = -1,  # CLIP's 77 tokens, fixed (model.max_sequence_length -1)
    ) -> tuple[Cond, Cond]:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        )
        time_ids = pipe._get_add_time_ids(
            (resolution, resolution),
            (0, 0),
            (resolution, resolution),
            dtype=embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(device)
        cond = Cond(
            {
                "prompt_embeds": embeds,
                "pooled": pooled,
                "time_ids": time_ids.expand(len(prompts), -1),
            }
        )
        uncond = Cond(
            {"prompt_embeds": negative[:1], "pooled": negative_pooled[:1], "time_ids": time_ids}
        )
        return cond, uncond

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The UNet's noise prediction with classifier-free guidance, in float32; one UNet batch
        of 2B (unconditional first), as the pipeline runs it."""
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
        if negative is None:
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
            return denoiser(
                latents,
                timesteps,
                encoder_hidden_states=cond["prompt_embeds"],
                added_cond_kwargs=added,
            ).sample.float()
        both = Cond.cat([negative.expand(batch), cond])
        noise_pred = denoiser(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=both["prompt_embeds"],
            added_cond_kwargs={"text_embeds": both["pooled"], "time_ids": both["time_ids"]},
        ).sample.float()
        uncond, text = noise_pred.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        return decode_with_vae(pipe, latents)

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate)."""
        first, second = (encoder.config for encoder in text_encoders)
        length = first.max_position_embeddings
        width = first.hidden_size + second.hidden_size
        return Cond(
            {
                "prompt_embeds": torch.empty(batch, length, width, device=device, dtype=dtype),
                "pooled": torch.empty(batch, second.projection_dim, device=device, dtype=dtype),
                "time_ids": torch.empty(batch, 6, device=device, dtype=dtype),
            }
        )


SDXL = _SDXL()

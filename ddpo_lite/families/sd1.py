"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet predicting epsilon or v.

SD 2.x (v-prediction, 768 px, "trailing" or "leading" timestep spacing) is the same pipeline
class and goes through this family unchanged: the DDIM sampler reads the prediction type and
the spacing from the scheduler's config.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ddpo_lite.families import Cond, decode_with_vae, unet_latent_shape


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The UNet's noise prediction with classifier-free guidance, in float32.

    latents: (B, C, H, W); timesteps: (B,) or scalar; prompt_embeds: (B, L, D);
    negative_embeds: (B, L, D) or (1, L, D), or None when guidance is off (guidance_scale <= 1).
    The unconditional and conditional halves run as one UNet batch of 2B, as the pipeline does.
    """
    batch = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
    if negative_embeds is None:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample.float()
    negative_embeds = negative_embeds.expand(batch, -1, -1)
    noise_pred = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
    ).sample.float()
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class _SD1:
    name = "sd1"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = ("StableDiffusionPipeline",)
    required_components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    vae_fp32_in_fp16 = False
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
        return [pipe.text_encoder]

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
        """The pipeline's own `encode_prompt`: (B, 77, D) embeddings and the negative's (1, ...)."""
        embeds, negative = pipe.encode_prompt(
            prompts,
            device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
        )
        return Cond({"prompt_embeds": embeds}), Cond({"prompt_embeds": negative[:1]})

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        negative_embeds = negative["prompt_embeds"] if negative is not None else None
        return predict_noise(
            denoiser, latents, timesteps, cond["prompt_embeds"], negative_embeds, guidance_scale
        )

    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        return decode_with_vae(pipe, latents)

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond:
        """A `Cond` of the shapes `encode` gives (for the meta-device memory estimate)."""
        config = text_encoders[0].config
        shape = (batch, config.max_position_embeddings, config.hidden_size)
        return Cond({"prompt_embeds": torch.empty(shape, device=device, dtype=dtype)})


SD1 = _SD1()

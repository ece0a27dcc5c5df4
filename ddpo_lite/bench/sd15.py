"""Stable Diffusion 1.5 and the aesthetic reward's CLIP ViT-L/14, built from their published
configs with random weights: the real shapes and FLOPs, nothing downloaded.

    pipe = build_sd15_pipeline(resolution=64)          # CPU, random weights, 64x64 images
    pipe = build_sd15_pipeline(device="meta")          # no memory at all: for the estimate
    vision = build_clip_vision(device="meta")          # CLIPVisionModelWithProjection ViT-L/14

The configs are the ones in runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/,
scheduler/) and openai/clip-vit-large-patch14 (vision_config), written out as dicts. SD 1.4
(CompVis/stable-diffusion-v1-4, the paper's model) has the same architecture. The tokenizer is
the tiny model's byte-level BPE (the vocabulary's content does not change shapes or FLOPs; the
text encoder keeps SD's 49408-entry embedding).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

CLIP_VIT_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
}

#: The model names the bench and the estimate accept besides the trainer's own.
SD15_RANDOM = "sd15-random"


def build_sd15_pipeline(
    resolution: int = 512, device: str | torch.device = "cpu", seed: int = 0
) -> StableDiffusionPipeline:
    """SD 1.5 with random weights; `resolution` (pixels, a multiple of 8) sets the UNet's
    sample_size, which the rollout reads. On `device="meta"` no memory is allocated."""
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    from ddpo_lite.models.tiny import build_tiny_tokenizer

    unet_config = {**SD15_UNET, "sample_size": resolution // 8}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_clip_vision(device: str | torch.device = "cpu", seed: int = 0):
    """CLIP ViT-L/14's vision tower with its projection (the aesthetic reward's model)."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION))

"""Stable Diffusion XL and the PickScore / HPS rewards' CLIP ViT-H/14, built from their published
configs with random weights: the real shapes and FLOPs, nothing downloaded.

    pipe = build_sdxl_pipeline(resolution=256)         # CPU, random weights, 256x256 images
    pipe = build_sdxl_pipeline(device="meta")          # no memory at all: for the estimate
    vision = build_clip_vision_h(device="meta")        # CLIPVisionModelWithProjection ViT-H/14

The configs are the ones in stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/,
text_encoder_2/, scheduler/) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (vision_config), written
out as dicts. The base model ships an EulerDiscreteScheduler; its config is written here as the
DDIM one (the same betas, offset and spacing), the sampler DDPO needs. text_encoder is OpenAI's
CLIP ViT-L/14 text tower (as in SD 1.5), text_encoder_2 OpenCLIP ViT-bigG/14's with its
projection. Both tokenizers are the tiny model's byte-level BPE (the vocabulary's content does not
change shapes or FLOPs; the text encoders keep SDXL's 49408-entry embeddings).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

SDXL_UNET = {
    "act_fn": "silu",
    # text_embeds (1280, text_encoder_2's projection) + 6 time ids x 256 = 2816
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,  # overflows in fp16: the pipeline decodes in float32
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_TEXT_ENCODER = {  # openai/clip-vit-large-patch14's text tower
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

SDXL_TEXT_ENCODER_2 = {  # laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's text tower, projected
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

CLIP_VIT_H14_VISION = {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's and HPS v2's base)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
}

#: The model name the bench and the estimate accept for SDXL with random weights.
SDXL_RANDOM = "sdxl-random"


def build_sdxl_pipeline(
    resolution: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> StableDiffusionXLPipeline:
    """SDXL base with random weights; `resolution` (pixels, a multiple of 8) sets the UNet's
    sample_size, which the rollout reads. On `device="meta"` no memory is allocated; `dtype`
    (default: float32) casts every model."""
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    from ddpo_lite.models.tiny import build_tiny_tokenizer

    unet_config = {**SDXL_UNET, "sample_size": resolution // 8}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2))
    if dtype is not None:
        for model in (unet, vae, text_encoder, text_encoder_2):
            model.to(dtype=dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tiny_tokenizer(),
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_clip_vision_h(device: str | torch.device = "meta", seed: int = 0):
    """CLIP ViT-H/14's vision tower with its projection (the PickScore / HPS rewards' model)."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H14_VISION))

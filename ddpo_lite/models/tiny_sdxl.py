"""An offline Stable Diffusion XL pipeline in miniature: `tiny-sdxl`.

The SDXL architecture (two CLIP text encoders, the second with a projection, a UNet with
`addition_embed_type = "text_time"` that takes the pooled embedding and six size/crop time ids)
with random weights, small enough for the whole loop on a CPU in tests. Built from code only, with
the tiny SD model's locally learned tokenizer for both encoders; written once into the cache with
`save_pretrained` so that it loads through the same `from_pretrained` path as a real SDXL folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tiny import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    MODEL_MAX_LENGTH,
    _build_scheduler,
    build_tiny_tokenizer,
    cache_root,
    write_pipeline_once,
)

TINY_SDXL_VERSION = "v1"
HIDDEN_1, HIDDEN_2 = 16, 32  # text_encoder, text_encoder_2: the UNet sees 16 + 32 = 48 channels
TIME_EMBED_DIM = 8  # per time id; 6 of them plus the pooled 32 = 80 added-embedding inputs


def _text_config(tokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline in memory (32x32 images, 4x16x16 latents); the same seed
    gives bit-identical weights, and the global torch RNG is left untouched."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=HIDDEN_2 + 6 * TIME_EMBED_DIM,
            cross_attention_dim=HIDDEN_1 + HIDDEN_2,
            norm_num_groups=8,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
            force_upcast=True,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, HIDDEN_1))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, HIDDEN_2))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    scheduler = _build_scheduler()  # SD's DDIM config; SDXL base ships the same betas
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REQUIRED_FILES = (
    "model_index.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def tiny_sdxl_pipeline_dir(seed: int = 0) -> Path:
    """A folder holding the tiny SDXL pipeline for `seed` in diffusers layout, written once into
    the cache through a temporary folder and an atomic rename (as `tiny_pipeline_dir`)."""
    target = cache_root() / f"tiny-sdxl-{TINY_SDXL_VERSION}-seed{seed}"
    return write_pipeline_once(
        target,
        lambda: build_tiny_sdxl_pipeline(seed),
        _REQUIRED_FILES,
        clip_tokenizers=("tokenizer", "tokenizer_2"),
    )

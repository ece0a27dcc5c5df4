"""An offline Stable Diffusion 3 pipeline in miniature: `tiny-sd3`.

The SD3 architecture (an MMDiT `SD3Transformer2DModel` predicting the flow velocity, two CLIP
text encoders with projections and no T5, as `StableDiffusion3Pipeline` allows, a VAE with a
scaling factor and a shift, `FlowMatchEulerDiscreteScheduler` with SD3's shift 3.0) with random
weights, small enough for the whole loop on a CPU in tests. Built from code only, with the tiny
SD model's locally learned tokenizer; written once into the cache with `save_pretrained` so that
it loads through the same `from_pretrained` path as a real SD3 folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from .tiny import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    build_tiny_tokenizer,
    cache_root,
    write_pipeline_once,
)
from .tiny_sdxl import HIDDEN_1, HIDDEN_2, _text_config

TINY_SD3_VERSION = "v1"
JOINT_ATTENTION_DIM = 64  # T5's width in SD3 (4096); the CLIPs' 16 + 32 are padded to it


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline in memory (32x32 images, 4x16x16 latents, 64 image tokens);
    the same seed gives bit-identical weights, and the global torch RNG is left untouched."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=LATENT_SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=JOINT_ATTENTION_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=HIDDEN_1 + HIDDEN_2,
            pos_embed_max_size=LATENT_SIZE,
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
            scaling_factor=1.5305,  # SD3's
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, HIDDEN_1))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, HIDDEN_2))
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REQUIRED_FILES = (
    "model_index.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def tiny_sd3_pipeline_dir(seed: int = 0) -> Path:
    """A folder holding the tiny SD3 pipeline for `seed` in diffusers layout, written once into
    the cache through a temporary folder and an atomic rename (as `tiny_pipeline_dir`)."""
    target = cache_root() / f"tiny-sd3-{TINY_SD3_VERSION}-seed{seed}"
    return write_pipeline_once(
        target,
        lambda: build_tiny_sd3_pipeline(seed),
        _REQUIRED_FILES,
        clip_tokenizers=("tokenizer", "tokenizer_2"),
    )

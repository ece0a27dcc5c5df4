"""Stable Diffusion 3.5 Medium (and Large), built from its published configs with random weights: the real
shapes and FLOPs, nothing downloaded.

    pipe = build_sd3_pipeline(resolution=512, device="meta")        # for the estimate
    pipe = build_sd3_pipeline(device="meta", t5=False)              # SD3 without T5 (drop_t5)

The configs are the ones in stabilityai/stable-diffusion-3.5-medium (transformer/, vae/,
text_encoder/, text_encoder_2/, text_encoder_3/, scheduler/), written out as dicts: the MMDiT
(24 blocks of width 1536, the first 13 with a second, image-only attention: SD3.5's "MMDiT-X",
and RMS-normalised queries and keys), SD3's 16-channel VAE with its scale and shift, CLIP-L and
OpenCLIP bigG-14 text towers (both with their projections: the pooled 768 + 1280 = 2048), and
T5-XXL's encoder (google/t5-v1_1-xxl, 4.7B parameters, the largest part of the pipeline). The
scheduler is FlowMatchEulerDiscreteScheduler with SD3's shift 3.0. The tokenizers are the tiny
model's byte-level BPE (the estimate never tokenizes; the encoders keep their published
vocabularies).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ddpo_lite.bench.sdxl import SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2

SD35_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,  # 24 heads x 64
    "dual_attention_layers": tuple(range(13)),  # blocks 0..12 add an image-only attention
    "in_channels": 16,
    "joint_attention_dim": 4096,  # T5-XXL's width; the CLIPs' 768 + 1280 are padded to it
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

#: stabilityai/stable-diffusion-3.5-large's transformer: 38 blocks of width 2432 (38 heads x
#: 64), no dual-attention blocks, RMS-normalised queries and keys; 8.1B parameters.
SD35_LARGE_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

SD3_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

#: text_encoder: CLIP ViT-L/14's text tower with its projection (CLIPTextModelWithProjection)
SD3_TEXT_ENCODER = dict(SDXL_TEXT_ENCODER)
#: text_encoder_2: OpenCLIP ViT-bigG/14's, projected (as SDXL's text_encoder_2)
SD3_TEXT_ENCODER_2 = dict(SDXL_TEXT_ENCODER_2)

SD3_T5_XXL = {  # text_encoder_3: google/t5-v1_1-xxl's encoder
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
# The T5 tokens the estimate reads are the run's model.max_sequence_length (-1: the pipeline's
# default 256, families/sd3.py `default_sequence_length`).

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

#: The model names the estimate accepts for SD3.5 Medium / Large with random weights.
SD35_RANDOM = "sd35-random"
SD35_LARGE_RANDOM = "sd35-large-random"


def build_sd3_pipeline(
    resolution: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    t5: bool = True,
    large: bool = False,
) -> StableDiffusion3Pipeline:
    """SD3.5 Medium (`large`: SD3.5 Large; the rest of the pipeline is the same) with random
    weights; `resolution` (pixels, a multiple of 16: the VAE's 8 x
    the patch size 2) sets the transformer's sample_size, which the native resolution reads.
    On `device="meta"` no memory is allocated; `dtype` (default: float32) casts every model;
    `t5=False` builds it without T5 (text_encoder_3=None, the pipeline's documented option)."""
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    from ddpo_lite.models.tiny import build_tiny_tokenizer

    published = SD35_LARGE_TRANSFORMER if large else SD35_MEDIUM_TRANSFORMER
    transformer_config = {**published, "sample_size": resolution // 8}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_config)
        vae = AutoencoderKL(**SD3_VAE)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SD3_TEXT_ENCODER_2))
        text_encoder_3 = T5EncoderModel(T5Config(**SD3_T5_XXL)) if t5 else None
    models = [transformer, vae, text_encoder, text_encoder_2, text_encoder_3]
    for model in models:
        if model is not None:
            model.eval()
            if dtype is not None:
                model.to(dtype=dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=build_tiny_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

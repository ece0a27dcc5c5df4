"""FLUX.1-dev and FLUX.2-klein-4B, built from their published configs with random weights: the
real shapes and FLOPs, nothing downloaded.

    pipe = build_flux_pipeline(resolution=512, device="meta")     # FLUX.1-dev, for the estimate
    pipe = build_flux2_pipeline(resolution=512, device="meta")    # FLUX.2-klein-4B

FLUX.1-dev (black-forest-labs/FLUX.1-dev): `FluxTransformer2DModel` with 19 double-stream and 38
single-stream blocks of width 3072 (24 heads x 128), T5-XXL's 4096-wide sequence as the joint
attention's input, CLIP-L's pooled 768 as `pooled_projections`, the guidance embedding (dev is
guidance-distilled: no CFG, the scale is an input), 64 packed input channels (the 16-channel
VAE's 2x2 patches) and RoPE axes (16, 56, 56); the VAE is SD3's layout with FLUX's scale 0.3611
and shift 0.1159; text_encoder is CLIP ViT-L/14's text tower without projection
(`CLIPTextModel`), text_encoder_2 T5-XXL's encoder (google/t5-v1_1-xxl, as SD3's).

FLUX.2-klein-4B (black-forest-labs/FLUX.2-klein-4B and -base-4B: the same architecture, step-
distilled or not): `Flux2Transformer2DModel` with 5 double- and 20 single-stream blocks of width
3072, 128 packed input channels (the 32-channel `AutoencoderKLFlux2`'s 2x2 patches), no guidance
embedding, joint attention over 3 x 2560 = 7680 (Qwen3-4B's hidden states 9, 18 and 27 stacked),
and Qwen3-4B (`Qwen3ForCausalLM`, 36 layers of 2560, GQA 32/8 heads of 128, tied embeddings) as
the text encoder.

Provenance of the numbers (docs/BENCHMARKS.md repeats it):
- FLUX.1-dev's transformer: the fields the task brief and scripts/check_comfyui_keys.py give
  (the published transformer/config.json's); its parameter count (11.90B) is the checkpoint's
  as it is widely quoted, from memory, and tests/test_bench_flux.py holds the build to it;
- FLUX.1's VAE and scheduler (dynamic shift, base/max shift 0.5/1.15 over 256/4096 tokens):
  from memory of the published configs (the tiny model uses the same scale, shift and schedule);
- FLUX.2-klein-4B's transformer: scripts/check_comfyui_keys.py's dict (diffusers 0.42.1's
  `Flux2Transformer2DModel` defaults are FLUX.2-dev's 8 + 48 blocks of 6144 wide; klein's
  5 + 20 blocks, 128 channels, width 3072 agree with InvokeAI's and mflux's klein-4B presets,
  found with the `search` tool); its VAE: `AutoencoderKLFlux2`'s defaults (32 latent channels,
  2x2 patches), which the pipeline's 128 input channels confirm;
- Qwen3-4B: hidden 2560, intermediate 9728, 36 layers, 32 / 8 heads of 128, vocab 151936, tied
  embeddings: from memory, confirmed by a copy of its config found with the `search` tool.

The tokenizers are the tiny models' (the estimate never tokenizes; the encoders keep their
published vocabularies).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ddpo_lite.bench.sd3 import SD3_T5_XXL, SD3_VAE
from ddpo_lite.bench.sdxl import SDXL_TEXT_ENCODER

FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,  # 16 VAE channels x 2x2 packing
    "num_layers": 19,  # double-stream (MMDiT) blocks
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # width 3072
    "joint_attention_dim": 4096,  # T5-XXL's width
    "pooled_projection_dim": 768,  # CLIP-L's pooled output
    "guidance_embeds": True,  # dev; schnell has none
    "axes_dims_rope": (16, 56, 56),
}

FLUX1_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

#: text_encoder: CLIP ViT-L/14's text tower; FluxPipeline loads it as CLIPTextModel (no
#: projection: the pooled output is the 768-wide pooler output)
FLUX1_CLIP_L = {k: v for k, v in SDXL_TEXT_ENCODER.items() if k != "projection_dim"}
#: text_encoder_2: T5-XXL's encoder, as SD3's
FLUX1_T5_XXL = dict(SD3_T5_XXL)
# The T5 tokens the estimate reads are the run's model.max_sequence_length (-1: FluxPipeline's
# default 512, families/flux.py `default_sequence_length`).

#: FLUX.1's scheduler: dynamic shifting, mu from the image's token count.
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

FLUX2_KLEIN_4B_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 128,  # 32 VAE channels x 2x2 patchify
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # width 3072
    "joint_attention_dim": 7680,  # 3 Qwen3-4B layers x 2560
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-06,
    "guidance_embeds": False,
}

#: AutoencoderKLFlux2's defaults: FLUX.2's 32-channel VAE with 2x2 latent patches.
FLUX2_VAE = {"latent_channels": 32, "sample_size": 1024}

QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
# Qwen3's tokens: the run's model.max_sequence_length (-1: Flux2KleinPipeline's default 512).

#: The model names the estimate accepts for the random-weight FLUX models.
FLUX_DEV_RANDOM = "flux-dev-random"
FLUX2_KLEIN_RANDOM = "flux2-klein-random"


def _check(resolution: int) -> None:
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")


def _finish(models, dtype) -> None:
    for model in models:
        model.eval()
        if dtype is not None:
            model.to(dtype=dtype)


def build_flux_pipeline(
    resolution: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> FluxPipeline:
    """FLUX.1-dev with random weights; `resolution` (pixels, a multiple of 16: the VAE's 8 x the
    2x2 packing) sets the VAE's sample_size, which the family's native resolution reads. On
    `device="meta"` no memory is allocated; `dtype` (default: float32) casts every model."""
    _check(resolution)
    from ddpo_lite.models.tiny import build_tiny_tokenizer
    from ddpo_lite.models.tiny_flux import build_t5_tokenizer

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        vae = AutoencoderKL(**{**FLUX1_VAE, "sample_size": resolution})
        text_encoder = CLIPTextModel(CLIPTextConfig(**FLUX1_CLIP_L))
        text_encoder_2 = T5EncoderModel(T5Config(**FLUX1_T5_XXL))
    _finish([transformer, vae, text_encoder, text_encoder_2], dtype)
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux2_pipeline(
    resolution: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    distilled: bool = False,
) -> Flux2KleinPipeline:
    """FLUX.2-klein-4B with random weights (`distilled`: the step-distilled klein-4B, else the
    undistilled klein-base-4B that LoRA training uses; the same architecture and memory)."""
    _check(resolution)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ddpo_lite.models.tiny_flux import flux_scheduler
    from ddpo_lite.models.tiny_flux2 import build_qwen_tokenizer

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**FLUX2_KLEIN_4B_TRANSFORMER)
        vae = AutoencoderKLFlux2(**{**FLUX2_VAE, "sample_size": resolution})
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    _finish([transformer, vae, text_encoder], dtype)
    pipe = Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_qwen_tokenizer(),
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

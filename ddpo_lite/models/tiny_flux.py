"""An offline FLUX.1 pipeline in miniature: `tiny-flux`.

The FLUX.1-dev architecture (a `FluxTransformer2DModel` with one double- and one single-stream
block and the guidance embedding, a CLIP-L-like text encoder for the pooled embedding, a T5
encoder for the sequence, a VAE with FLUX's scaling and shift, FLUX's dynamic-shift
`FlowMatchEulerDiscreteScheduler`) with random weights, small enough for the loop on a CPU.
Built from code only: the CLIP tokenizer is the tiny SD model's; the T5 one is a real
`T5Tokenizer` (a Unigram model) over the same small English word list and single characters.
`guidance_embeds=False` builds the FLUX.1-schnell variant (no guidance embedding).
Written once into the cache with `save_pretrained`, and loaded through `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from .tiny import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    _word_list,
    build_tiny_tokenizer,
    cache_root,
    write_pipeline_once,
)
from .tiny_sdxl import _text_config

TINY_FLUX_VERSION = "v1"
CLIP_HIDDEN = 32  # CLIP-L's 768: the pooled projection
T5_HIDDEN = 32  # T5-XXL's 4096: the transformer's joint attention dim


def build_t5_tokenizer():
    """A T5 (Unigram) tokenizer whose pieces are the word list ("▁word") and single characters,
    with T5's <pad> 0, </s> 1, <unk> 2 and no extra ids."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'\"!?-:;()▁"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -1.0) for word in _word_list()]
    pieces += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler config: dynamic shifting, mu from the image's token count."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Build the tiny FLUX.1 pipeline in memory (32x32 images, 4x16x16 VAE latents packed into
    64 tokens of 16); the same seed gives bit-identical weights, the global RNG is untouched."""
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, t5_tokenizer = build_tiny_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_HIDDEN,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
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
            scaling_factor=0.3611,  # FLUX.1's
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, CLIP_HIDDEN))
        torch.manual_seed(seed + 1)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=T5_HIDDEN,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1's
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    for module in (transformer, vae, text_encoder, t5):
        module.eval()
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
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


def tiny_flux_pipeline_dir(seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A folder holding the tiny FLUX.1 pipeline (dev-like; schnell-like without the guidance
    embedding) for `seed`, in diffusers layout, written once into the cache."""
    kind = "" if guidance_embeds else "-schnell"
    target = cache_root() / f"tiny-flux{kind}-{TINY_FLUX_VERSION}-seed{seed}"
    return write_pipeline_once(
        target,
        lambda: build_tiny_flux_pipeline(seed, guidance_embeds),
        _REQUIRED_FILES,
        clip_tokenizers=("tokenizer",),
    )

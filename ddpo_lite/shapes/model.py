"""The shapes model's architecture: Stable Diffusion 1.x parts at 32x32, and its tokenizer.

`build_components(seed)` makes untrained parts; `scripts/train_shapes_model.py` trains them and
writes the pipeline folder that ships as `ddpo_lite/models/shapes_model` (`load_pipeline("shapes")`).

- tokenizer: CLIP byte-level BPE whose merges make each word of the grammar one token (the same
  deterministic BPE learner as the tiny model, over this world's words); other text still encodes
  through byte fallback. Captions are padded to 16 tokens (every caption of the grammar is 9).
- text encoder: CLIPTextModel, 2 layers, width 64, 4 heads.
- VAE: AutoencoderKL with 2 blocks (16, 32 channels): 3x32x32 images <-> 4x16x16 latents.
- UNet: UNet2DConditionModel, blocks (32, 64, 64) at 16x16, 8x8 and 4x4 latents; cross-attention
  (dim 64) in the 8x8 blocks and the 4x4 middle only: attention at 16x16 cost 2x the step time
  on one CPU thread for a caption that says nothing about pixel-level detail.
- scheduler: DDIMScheduler configured as Stable Diffusion 1.x ships it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ddpo_lite.models.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    _build_scheduler,
    _bytes_to_unicode,
    _train_bpe,
)

from .world import COLOURS, IMAGE_SIZE, SHAPES

__all__ = [
    "LATENT_CHANNELS",
    "LATENT_SIZE",
    "MAX_TOKENS",
    "TEXT_WIDTH",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "write_slow_tokenizer_files",
]

LATENT_SIZE = IMAGE_SIZE // 2
LATENT_CHANNELS = 4
TEXT_WIDTH = 64
MAX_TOKENS = 16


def _words() -> list[str]:
    return list(dict.fromkeys(["a", "an", "the", "on", "background", *COLOURS, *SHAPES]))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-ordered vocabulary (bytes, bytes + "</w>", merges, specials) and the merge list."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges = list(_train_bpe(tuple(_words())))
    tokens += [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer() -> CLIPTokenizer:
    """The world's tokenizer (built with vocab=dict, merges=list: see `build_tiny_tokenizer`)."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_TOKENS,
    )


def write_slow_tokenizer_files(folder: Path) -> None:
    """``vocab.json``/``merges.txt`` beside ``tokenizer.json``, as real SD 1.x folders have them."""
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler() -> DDIMScheduler:
    return _build_scheduler()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

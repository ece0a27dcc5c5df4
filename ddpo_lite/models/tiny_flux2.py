"""An offline FLUX.2-klein pipeline in miniature: `tiny-flux2`.

The FLUX.2-klein architecture (a `Flux2Transformer2DModel` with one double- and one
single-stream block and no guidance embedding, a Qwen3 causal LM whose hidden states 9, 18 and
27 are the prompt embedding, `AutoencoderKLFlux2` with its latent batch-norm statistics, the
dynamic-shift `FlowMatchEulerDiscreteScheduler`) with random weights. The undistilled ("base")
variant: classifier-free guidance with the empty negative prompt. Built from code only: the
Qwen3 has 27 layers of width 16 (the pipeline reads layer 27), and its tokenizer is a byte-level
`Qwen2Tokenizer` with Qwen's special tokens and a chat template of Qwen3's non-thinking form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

from .tiny import IMAGE_SIZE, LATENT_CHANNELS, _bytes_to_unicode, cache_root, write_pipeline_once
from .tiny_flux import flux_scheduler

TINY_FLUX2_VERSION = "v1"
QWEN_HIDDEN = 16  # Qwen3-4B's 2560; the prompt embedding is 3 layers of it
QWEN_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def build_qwen_tokenizer():
    """A byte-level BPE tokenizer without merges (every byte a token) plus Qwen's specials."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for token in _SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(list(_SPECIAL[1:]), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_flux2_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """Build the tiny FLUX.2-klein pipeline in memory (32x32 images, 4x16x16 VAE latents
    patchified into 64 tokens of 16); the same seed gives bit-identical weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=3 * QWEN_HIDDEN,
            timestep_guidance_channels=16,
            axes_dims_rope=(2, 2, 2, 2),  # sums to attention_head_dim
            guidance_embeds=False,  # klein's
        )
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
        )
        # non-trivial latent statistics, so that decoding is seen to apply them
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
        torch.manual_seed(seed + 1)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=QWEN_HIDDEN,
                intermediate_size=32,
                num_hidden_layers=QWEN_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (transformer, vae, text_encoder):
        module.eval()
    pipe = Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REQUIRED_FILES = (
    "model_index.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def tiny_flux2_pipeline_dir(seed: int = 0) -> Path:
    """A folder holding the tiny FLUX.2-klein pipeline for `seed`, written once into the cache."""
    target = cache_root() / f"tiny-flux2-{TINY_FLUX2_VERSION}-seed{seed}"
    return write_pipeline_once(target, lambda: build_tiny_flux2_pipeline(seed), _REQUIRED_FILES)

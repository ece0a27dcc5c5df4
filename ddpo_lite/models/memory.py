"""The memory levers applied to a pipeline: dtype of frozen weights, attention backend,
gradient checkpointing, VAE slicing, the VAE off the accelerator but while it decodes
(`visiting`), a quantized frozen denoiser. Each is one switch of
`MemoryConfig`.

`memory.quantize_base` 'nf4' / 'int8' is applied at load (`quantization_config`, see
models/loading.py: diffusers' BitsAndBytesConfig on the denoiser alone); 'fp8' here, after the
cast, as diffusers' `enable_layerwise_casting` (float8_e4m3fn storage, each layer upcast to the
autocast dtype for its forward; norms and position embeddings stay as they are). The LoRA added
afterwards stays float32 (peft wraps the quantized or fp8 layers: QLoRA)."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MissingDependencyError(RuntimeError):
    """An optional package a setting needs is not installed; the message says how to get it."""


@contextlib.contextmanager
def visiting(module: torch.nn.Module, device, enabled: bool = True):
    """`module` on `device` for the block and back on the CPU after it, also on an error
    (memory.offload_vae's decode); nothing moves when not `enabled`."""
    if not enabled:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


#: Storage dtype of memory.quantize_base = 'fp8'.
FP8_STORAGE = torch.float8_e4m3fn


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether diffusers loaded `model` through a quantizer (bitsandbytes)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(
        getattr(model, "is_quantized", False)
    )


def frozen_dtype(mixed_precision: str, half_base: bool) -> torch.dtype:
    """dtype the frozen weights are stored in: the autocast dtype when half_base, else float32."""
    return DTYPES[mixed_precision] if half_base else torch.float32


def set_attention(unet: torch.nn.Module, backend: str) -> None:
    """'sdpa': PyTorch scaled_dot_product_attention (memory-efficient kernels where available);
    'xformers': xformers' memory-efficient attention; 'math': plain matmul + softmax."""
    if backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "math":
        unet.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise MissingDependencyError(
                "memory.attention = 'xformers' but xformers is not installed: "
                "pip install 'ddpo-lite[xformers]', or use memory.attention = 'sdpa'"
            )
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend {backend!r}; expected sdpa, xformers or math")


def compile_blocks(denoiser: torch.nn.Module, fallback: tuple[str, ...] = ()) -> None:
    """Regional compilation: diffusers' `compile_repeated_blocks` on the denoiser, with
    `fallback` as the block class names where the model class names none (SD3's MMDiT)."""
    if not getattr(denoiser, "_repeated_blocks", None):
        denoiser._repeated_blocks = list(fallback)
    denoiser.compile_repeated_blocks()


def apply_memory_settings(pipe, memory, device: torch.device) -> torch.dtype:
    """Freeze the pipeline's models, cast and place them, and switch on the configured levers.

    Returns the dtype of the frozen weights. The text encoder is placed by the prompt encoder
    (on the CPU when `memory.offload_text_encoder`).
    """
    from ddpo_lite.families import family_of

    family = family_of(pipe)
    dtype = frozen_dtype(memory.mixed_precision, memory.half_base)
    text_encoders = family.text_encoders(pipe)
    denoiser = family.denoiser(pipe)
    quantized = is_quantized(denoiser)  # bitsandbytes at load: its weights keep their dtypes
    for model in (denoiser, pipe.vae, *text_encoders):
        model.requires_grad_(False)
        if not (model is denoiser and quantized):
            model.to(dtype=dtype)
    if memory.quantize_base == "fp8":
        compute = DTYPES[memory.mixed_precision]
        denoiser.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute)
    if dtype == torch.float16 and family.vae_fp32_in_fp16:
        pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (diffusers' force_upcast)
    denoiser.to(device)
    pipe.vae.to("cpu" if memory.offload_vae else device)  # offloaded: it visits to decode
    if family.sampler == "ddim":  # the UNets' processors; the transformers keep their own (sdpa)
        set_attention(denoiser, memory.attention)
    elif memory.attention == "xformers":
        set_attention(denoiser, memory.attention)
    if memory.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if memory.vae_slicing:
        pipe.vae.enable_slicing()
    pipe.vae.eval()
    for model in text_encoders:
        model.eval()
    return dtype

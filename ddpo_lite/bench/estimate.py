"""Predict a run's peak accelerator memory per phase, on any machine, in seconds.

Method. The run's own models (built from their configs on PyTorch's meta device: no memory, no
arithmetic) go through the run's own code paths (`predict_noise` + `ddim_step_with_logprob` for a
sampling step, the VAE decode, the reward's vision model, `update.chunk_loss` + backward for one
training chunk) under `MemoryCounter`, which counts live tensor bytes as ops allocate and free
them. That gives each step's transient peak. A phase's peak is then what stays resident on the
accelerator in that phase (weights at their stored dtype, LoRA, optimizer state, gradients, the
epoch's stored trajectory) plus the largest transient of the phase, composed as the trainer runs:

- prompt encoding (run start): the text encoder (visiting when offloaded) on the prompt list;
- sampling: max of a denoising step, its VAE decode (with the VAE's weights visiting under
  memory.offload_vae) and the stacking of a batch's states, with the epoch's trajectory buffer
  held (allocated at the first batch, filled batch by batch);
- reward: the reward model and its forward on one sampling batch, with the epoch's trajectory held;
- training: one forward+backward chunk (micro-batch x timestep chunk, x2 for CFG), with LoRA
  gradients, optimizer state, the epoch's trajectory and the optimizer step's gathered samples held.

With `reward.overlap` the trainer scores batch k while it samples batch k+1, so the run's peak
also counts a denoising step or decode plus the reward's forward (and its weights when offloaded)
at the same time (the trainer collects every score before concatenating the trajectories).

Assumptions (stated in every estimate):
- attention under 'sdpa' and 'xformers' counted as the memory-efficient / flash kernel counts it
  (output + float32 logsumexp; no N x N matrix); 'math' runs diffusers' AttnProcessor for real;
- CUDA autocast emulated (`MetaAutocast`): matmul/conv/linear in the autocast dtype, norms and
  softmax in float32; autocast's cast cache for the fp32 LoRA weights is not modelled (a few MB);
- each allocation rounded up to 512 bytes (the caching allocator's block); reserved memory is
  predicted as allocated x (1 + ALLOCATOR_OVERHEAD), and the CUDA context (CUDA_CONTEXT_BYTES,
  outside PyTorch's allocator) is added when checking a card's budget;
- 8-bit AdamW as bitsandbytes keeps it: uint8 moments + a float32 absmax per 256-element block for
  tensors of >= 4096 elements, float32 moments below that; torch AdamW: two float32 moments;
- kernel workspaces (cuBLAS, cuDNN) are not tensors and are not counted;
- a quantized frozen denoiser (memory.quantize_base): bitsandbytes cannot quantize meta
  tensors, so NF4 / int8 Linear weights are counted by formula (held against bitsandbytes' own
  storage in tests/test_bench_sd3.py) with one dequantized layer as a transient; fp8 layerwise
  casting runs on the meta model as it runs on a GPU.

The flow-matching transformers (SD3) go through the same paths with the family's denoiser, the
trainer's flow sampler (`make_sampler`) and the family's conditioning shapes (their text tokens
are `model.max_sequence_length`'s: fewer tokens, a shorter joint sequence); a trajectory
holds only its SDE window's steps (and the final latent), and CFG-free sampling (guidance 1)
calls the transformer on batch 1, not 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ddpo_lite.bench.counting import (
    CUDA_BLOCK,
    MemoryCounter,
    autocast_factory,
    checkpoint_with_autocast,
    module_bytes,
)
from ddpo_lite.config import ONE_STEP_ALGORITHMS, TRAJECTORY_FREE, Config, ConfigError
from ddpo_lite.models.memory import DTYPES

GiB = 2**30
#: Reserved / allocated - 1 assumed for the CUDA caching allocator (block rounding, fragmentation).
ALLOCATOR_OVERHEAD = 0.10
#: The CUDA context and kernels' own memory, outside PyTorch's allocator (assumed).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
#: bitsandbytes keeps 8-bit state only for tensors with at least this many elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
#: The phase where batch k is scored while batch k+1 samples (reward.overlap with a model reward).
OVERLAP_PHASE = "sampling+reward overlap"

ASSUMPTIONS = [
    "counted on the meta device: live tensor bytes of the run's own models and code paths",
    "attention 'sdpa'/'xformers' counted as a flash/memory-efficient kernel "
    "(output + fp32 logsumexp, no N x N matrix); 'math' counted as diffusers runs it",
    "CUDA autocast emulated (matmul/conv in the autocast dtype, norms/softmax in fp32)",
    "allocations rounded to 512 B; reserved = allocated x "
    f"{1 + ALLOCATOR_OVERHEAD:.2f}; CUDA context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB on top",
    "8-bit AdamW: uint8 moments + fp32 absmax per 256 elements for tensors >= 4096 elements, "
    "fp32 moments below",
    "cuBLAS/cuDNN workspaces not counted",
    "memory.quantize_base nf4/int8: Linear weights counted at bitsandbytes' stored size (NF4 "
    "with double quantization ~0.52 B/weight; LLM.int8 1 B + a float32 scale per row), plus one "
    "layer dequantized to the compute dtype as a transient; fp8: diffusers' layerwise casting "
    "run on the meta model (each layer's upcast copy counted)",
]


@dataclass
class PhaseEstimate:
    """One phase's predicted peak (allocated bytes) and what makes it up at that peak."""

    peak_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "parts": dict(self.parts)}


@dataclass
class Estimate:
    """The predicted peaks of a run's phases and of the whole run."""

    phases: dict[str, PhaseEstimate]
    peak_bytes: int
    model: str
    resolution: int
    seconds: float = 0.0
    assumptions: list[str] = field(default_factory=lambda: list(ASSUMPTIONS))
    notes: list[str] = field(default_factory=list)

    @property
    def reserved_bytes(self) -> int:
        return int(self.peak_bytes * (1 + ALLOCATOR_OVERHEAD))

    @property
    def device_bytes(self) -> int:
        """What the card must hold: reserved memory plus the CUDA context."""
        return self.reserved_bytes + CUDA_CONTEXT_BYTES

    def to_dict(self) -> dict:
        return {
            "kind": "estimate",
            "model": self.model,
            "resolution": self.resolution,
            "peak_bytes": self.peak_bytes,
            "reserved_bytes": self.reserved_bytes,
            "device_bytes": self.device_bytes,
            "phases": {name: phase.to_dict() for name, phase in self.phases.items()},
            "seconds": self.seconds,
            "assumptions": list(self.assumptions),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# the models, on the meta device
# ---------------------------------------------------------------------------------------------


@dataclass
class MetaModels:
    """A run's accelerator-side models on the meta device, with the config's levers applied."""

    denoiser: torch.nn.Module
    """The model that carries the LoRA: the UNet (SD 1.x, SDXL) or the transformer (SD3)."""
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    reward: torch.nn.Module | None
    """The reward's vision model (None when the reward runs no model on the accelerator)."""
    scheduler: object
    lora_params: list[torch.nn.Parameter]
    reward_dtype: torch.dtype
    resolution: int
    family: object = None
    """The model family (families/): its guided call and conditioning shapes."""
    reward_text: torch.nn.Module | None = None
    """The reward's text tower, for the CLIP-pair rewards (CLIPScore, PickScore, HPS): weights
    only (its forward on 77 tokens is small)."""
    note: str = ""
    pipe: object = None
    """The meta-device pipeline (the flow sampler reads its scheduler and shift from it)."""
    latent_shape: tuple[int, ...] = ()
    """One sample's latent, (C, h, w)."""
    quantize: str = "none"
    """memory.quantize_base as the models were built: nf4 / int8 are accounted by formula (the
    meta model keeps half-precision Linear weights; bitsandbytes cannot quantize meta tensors),
    fp8 is real (diffusers' layerwise casting on the meta model)."""

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its SD 1.x name."""
        return self.denoiser


#: Rewards that hold no model on the accelerator (ocr: RapidOCR's ONNX on the CPU; the shapes
#: world's: pixel arithmetic).
CPU_REWARDS = (
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "ocr",
    "shapes_colour",
    "shapes_shape",
    "shapes_alignment",
    "shapes_red_share",
)
#: Rewards whose model is a CLIP ViT-H/14 (the others are counted as a ViT-L/14).
VIT_H_REWARDS = ("pickscore", "hps")
#: Rewards that hold a CLIP text tower beside the vision one.
TEXT_TOWER_REWARDS = ("clip_score", "pickscore", "hps")
#: The text towers' published configs (openai/clip-vit-large-patch14, laion CLIP-ViT-H-14).
CLIP_VIT_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_VIT_H_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    projection_dim=1024,
    hidden_act="gelu",
)


def _reward_names(config: Config) -> list[str]:
    if config.reward.url:
        return []
    return list(config.reward.weights) or [config.reward.name]


def is_sdxl(config: Config) -> bool:
    """Whether the config names an SDXL model (by family, or by a name the estimate knows)."""
    name = config.model.name.lower()
    return config.model.family == "sdxl" or "sdxl" in name or "-xl-" in name


def is_sd3(config: Config) -> bool:
    """Whether the config names an SD3 / SD3.5 model (by family, or by a name the estimate
    knows: sd35-random, sd35-large-random, stabilityai/stable-diffusion-3*, tiny-sd3, and the
    shipped shapes-flow)."""
    name = config.model.name.lower()
    return (
        config.model.family == "sd3"
        or name == "shapes-flow"
        or "sd3" in name
        or "sd35" in name
        or "stable-diffusion-3" in name
    )


def is_flux2(config: Config) -> bool:
    """Whether the config names a FLUX.2 model (by family, or by a name the estimate knows:
    flux2-klein-random, black-forest-labs/FLUX.2-*, tiny-flux2)."""
    name = config.model.name.lower()
    return config.model.family == "flux2" or "flux2" in name or "flux.2" in name


def is_flux(config: Config) -> bool:
    """Whether the config names a FLUX.1 model (by family, or by a name the estimate knows:
    flux-dev-random, black-forest-labs/FLUX.1-*, tiny-flux); FLUX.2 is not."""
    name = config.model.name.lower()
    return config.model.family == "flux" or ("flux" in name and not is_flux2(config))


#: The tiny offline models: built for real, then moved to the meta device.
TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2")
#: The small pretrained models shipped in the package: loaded for real too.
SHIPPED_MODELS = ("shapes", "shapes-flow")


def build_meta_models(config: Config, resolution: int | None = None) -> MetaModels:
    """The config's pipeline and reward model on the meta device, levers applied, LoRA on.
    `resolution` (pixels) applies to the published-architecture models (default: the config's
    `sample.resolution`, else 512 for SD 1.x and 1024 for SDXL and SD3.5); the tiny and the
    shipped shapes models have their own (32). `model.max_sequence_length` is checked against
    the model's family as the trainer checks it (one line)."""
    from ddpo_lite.families import family_of, sequence_length_problem
    from ddpo_lite.models.lora import attach_lora
    from ddpo_lite.models.memory import apply_memory_settings

    name = config.model.name
    memory = config.memory
    note = ""
    if name.split(":")[0] in TINY_MODELS or name in SHIPPED_MODELS:
        from ddpo_lite.models import load_pipeline

        pipe = load_pipeline(name, seed=config.model.seed)
        family = family_of(pipe)
        for model in (family.denoiser(pipe), pipe.vae, *family.text_encoders(pipe)):
            model.to("meta")
    elif is_flux2(config):
        from ddpo_lite.bench.flux import FLUX2_KLEIN_RANDOM, build_flux2_pipeline

        resolution = resolution or config.sample.resolution or 1024
        pipe = build_flux2_pipeline(resolution=resolution, device="meta")
        if name != FLUX2_KLEIN_RANDOM:
            note = f"model {name!r} estimated with FLUX.2-klein-4B's published architecture"
    elif is_flux(config):
        from ddpo_lite.bench.flux import FLUX_DEV_RANDOM, build_flux_pipeline

        resolution = resolution or config.sample.resolution or 1024
        pipe = build_flux_pipeline(resolution=resolution, device="meta")
        if name != FLUX_DEV_RANDOM:
            note = f"model {name!r} estimated with FLUX.1-dev's published architecture"
    elif is_sd3(config):
        from ddpo_lite.bench.sd3 import SD35_LARGE_RANDOM, SD35_RANDOM, build_sd3_pipeline

        resolution = resolution or config.sample.resolution or 1024
        large = "large" in name.lower()
        t5 = not memory.drop_t5
        pipe = build_sd3_pipeline(resolution=resolution, device="meta", t5=t5, large=large)
        if name not in (SD35_RANDOM, SD35_LARGE_RANDOM):
            which = "Large" if large else "Medium"
            note = f"model {name!r} estimated with SD3.5 {which}'s published architecture"
    elif is_sdxl(config):
        from ddpo_lite.bench.sdxl import SDXL_RANDOM, build_sdxl_pipeline

        resolution = resolution or config.sample.resolution or 1024
        pipe = build_sdxl_pipeline(resolution=resolution, device="meta")
        if name != SDXL_RANDOM:
            note = f"model {name!r} estimated with SDXL base 1.0's published architecture"
    else:
        from ddpo_lite.bench.sd15 import SD15_RANDOM, build_sd15_pipeline

        resolution = resolution or config.sample.resolution or 512
        pipe = build_sd15_pipeline(resolution=resolution, device="meta")
        if name != SD15_RANDOM:
            note = (
                f"model {name!r} estimated with SD 1.5's published architecture "
                "(SD 1.x: 1.4 and 1.5 share it)"
            )
    family = family_of(pipe)
    if problem := sequence_length_problem(pipe, config.model.max_sequence_length):
        raise ConfigError(problem)
    text_encoders = family.text_encoders(pipe)
    denoiser = family.denoiser(pipe)
    # the levers, exactly as the trainer applies them; xformers is counted as SDPA's
    # memory-efficient kernel (it is one), so the estimate does not need xformers installed
    if memory.attention == "xformers":
        memory = dataclasses.replace(memory, attention="sdpa")
    # an offloaded VAE is accounted by formula (`compose`): on meta it stays where it is
    memory = dataclasses.replace(memory, offload_vae=False)
    meta = torch.device("meta")
    apply_memory_settings(pipe, memory, meta)
    if memory.gradient_checkpointing:  # recompute under the emulated autocast too
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_autocast)
    for encoder in text_encoders:
        encoder.to(meta)
    params = attach_lora(denoiser, config.lora.rank, config.lora.alpha, config.lora.target_modules)

    reward = None
    reward_names = _reward_names(config)
    # the model rewards run fp16 on a GPU (rewards/_models.resolve_dtype)
    reward_dtype = torch.float32 if memory.cpu else torch.float16
    model_rewards = [r for r in reward_names if r not in CPU_REWARDS]
    reward_text = None
    if any(r in TEXT_TOWER_REWARDS for r in model_rewards):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        vit_h = any(r in VIT_H_REWARDS for r in model_rewards)
        with torch.device("meta"):
            reward_text = CLIPTextModelWithProjection(
                CLIPTextConfig(**(CLIP_VIT_H_TEXT if vit_h else CLIP_VIT_L_TEXT))
            )
        reward_text = reward_text.to(reward_dtype).eval()
    if any(r in VIT_H_REWARDS for r in model_rewards):
        from ddpo_lite.bench.sdxl import build_clip_vision_h

        reward = build_clip_vision_h(device="meta").to(reward_dtype).eval()
        vision = "CLIP ViT-H/14 (PickScore's and HPS v2's model)"
        exact = VIT_H_REWARDS
    elif model_rewards:
        from ddpo_lite.bench.sd15 import build_clip_vision

        reward = build_clip_vision(device="meta").to(reward_dtype).eval()
        vision = "CLIP ViT-L/14 (the aesthetic reward's model)"
        exact = ("aesthetic", "clip_score")
    others = [r for r in model_rewards if r not in (exact if model_rewards else ())]
    if others:
        note += f"{'; ' if note else ''}reward(s) {others} estimated as a {vision}"
    resolution = family.native_resolution(pipe)
    return MetaModels(
        denoiser=denoiser,
        vae=pipe.vae,
        text_encoders=text_encoders,
        reward=reward,
        reward_text=reward_text,
        scheduler=pipe.scheduler,
        lora_params=params,
        reward_dtype=reward_dtype,
        resolution=resolution,
        family=family,
        note=note,
        pipe=pipe,
        latent_shape=tuple(family.latent_shape(pipe, 1, resolution)[1:]),
        quantize=memory.quantize_base,
    )


# ---------------------------------------------------------------------------------------------
# accounting by formula: optimizer state, trajectories
# ---------------------------------------------------------------------------------------------


def adam_state_bytes(params: list[torch.nn.Parameter], use_8bit: bool) -> int:
    """AdamW's two moments for `params` (bitsandbytes blockwise 8-bit, or float32)."""
    total = 0
    for p in params:
        n = p.numel()
        if use_8bit and n >= BNB_MIN_8BIT_SIZE:
            blocks = math.ceil(n / BNB_BLOCK)
            total += 2 * n + 2 * 4 * blocks  # state1/state2 uint8 + absmax1/absmax2 float32
        else:
            total += 2 * 4 * n
    return total


def _rounded(nbytes: int) -> int:
    return math.ceil(nbytes / CUDA_BLOCK) * CUDA_BLOCK


def trajectory_bytes(
    num_samples: int,
    num_steps: int,
    latent_shape,
    cond_row_bytes: list[int],
    final: bool = False,
    chain: bool = True,
):
    """Bytes a `Trajectory` of `num_samples` holds (latents and actions stay float32);
    `cond_row_bytes`: one sample's bytes of each conditioning tensor (prompt_embeds, ...);
    `final`: it keeps the final latent beside the chain (an SDE window); `chain` False: its
    chain is held elsewhere (memory.offload_trajectory: in CPU memory)."""
    elements = math.prod(latent_shape)
    return (
        (_rounded(num_samples * elements * 4) if final else 0)
        + (_rounded(num_samples * (num_steps + 1) * elements * 4) if chain else 0)  # x_T .. x_0
        + _rounded(num_samples * num_steps * 8)  # timesteps (long)
        + _rounded(num_samples * num_steps * 4)  # log_probs
        + sum(_rounded(num_samples * row) for row in cond_row_bytes)  # the conditioning
        + _rounded(num_samples * 8)  # prompt_ids
    )


#: bitsandbytes NF4 as diffusers' BitsAndBytesConfig builds it here (bnb_4bit_use_double_quant, as
#: QLoRA): 4-bit codes two to a byte, a uint8 absmax per 64 weights, the absmax's own float32
#: scale per 256 of them, and per layer the 256-entry float32 code book of that nested step, the
#: 16 NF4 levels (float32) and a float32 offset (bitsandbytes 0.50's QuantState, measured).
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


def quantized_layers(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers diffusers' bitsandbytes quantizer replaces (every `nn.Linear` of the
    model: `replace_with_bnb_linear` with no module kept back for SD3 or the UNets), without
    the LoRA's own (added after quantization, kept in float32)."""
    return [
        (name, module)
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(part.startswith("lora_") for part in name.split("."))
    ]


def quantized_weight_bytes(weight: torch.Tensor, kind: str) -> int:
    """Bytes of one Linear weight (out, in) stored by bitsandbytes as `kind`."""
    n = weight.numel()
    if kind == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        nested = math.ceil(blocks / NF4_NESTED_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * nested + 4 * 256 + 4 * 16 + 4
    if kind == "int8":  # LLM.int8: int8 weight + a float32 scale per output row (SCB)
        return n + 4 * weight.shape[0]
    raise ValueError(f"no bitsandbytes storage for {kind!r}")


def denoiser_bytes(models: MetaModels) -> int:
    """The denoiser's resident bytes: its parameters and buffers as stored, with the Linear
    weights at their bitsandbytes size under memory.quantize_base 'nf4' / 'int8' (biases stay
    in the half dtype, as bitsandbytes keeps them); 'fp8' is already in the meta model."""
    total = module_bytes(models.denoiser)
    if models.quantize not in ("nf4", "int8"):
        return total
    for _, layer in quantized_layers(models.denoiser):
        weight = layer.weight
        total += quantized_weight_bytes(weight, models.quantize)
        total -= weight.numel() * weight.element_size()
    return total


def dequantized_layer_bytes(models: MetaModels, config: Config) -> int:
    """A transient the meta model cannot show: bitsandbytes dequantizes one layer's weight to
    the compute dtype for its matmul (forward, and again for the input gradient in backward);
    the largest such layer, 0 without an nf4 / int8 base."""
    if models.quantize not in ("nf4", "int8"):
        return 0
    compute = _autocast_dtype(config) or torch.float32
    size = torch.empty((), dtype=compute).element_size()
    largest = max(
        (layer.weight.numel() for _, layer in quantized_layers(models.denoiser)), default=0
    )
    return _rounded(largest * size)


# ---------------------------------------------------------------------------------------------
# transients, counted on the meta device
# ---------------------------------------------------------------------------------------------


#: Storage dtypes of layerwise casting (memory.quantize_base = 'fp8'); never an activation's.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _counted(fn) -> int:
    """Peak bytes allocated while `fn` runs (what existed before is not counted; nor are fp8
    storages, which only layerwise casting's cast back to the resident weight makes)."""
    with MemoryCounter(round_to=CUDA_BLOCK, ignore_dtypes=FP8_DTYPES) as counter:
        fn()
    return counter.peak


def _autocast_dtype(config: Config) -> torch.dtype | None:
    mixed = config.memory.mixed_precision
    return None if mixed == "no" else DTYPES[mixed]


def text_tokens(models: MetaModels, config: Config) -> int:
    """The text-encoder tokens of the run's prompts: `model.max_sequence_length` resolved on the
    meta pipeline (-1 = the model's default: SD3 256, FLUX.1 and FLUX.2-klein 512; -1 for the
    CLIP-only families)."""
    from ddpo_lite.families import sequence_length

    return sequence_length(models.pipe, config.model.max_sequence_length)


def _cond(models: MetaModels, batch: int, tokens: int = -1):
    """Empty conditioning of the family's shapes on `tokens` text-encoder tokens (`text_tokens`),
    in the text encoders' dtype. An SD3 model without T5 pads its text tokens to the
    transformer's `joint_attention_dim` (the pipeline's zeros in T5's place), which the family's
    `empty_cond` takes as T5-XXL's 4096: the estimate reads the width from the transformer (the
    tiny SD3 model's is 64)."""
    dtype = _embed_dtype(models)
    cond = models.family.empty_cond(models.text_encoders, batch, "meta", dtype, tokens)
    width = getattr(models.denoiser.config, "joint_attention_dim", None)
    embeds = cond.tensors["prompt_embeds"]
    if width is not None and embeds.shape[-1] != width:
        cond.tensors["prompt_embeds"] = embeds.new_empty(*embeds.shape[:-1], width)
    return cond


def _cond_row_bytes(models: MetaModels, tokens: int = -1) -> list[int]:
    return [t[0].numel() * t.element_size() for t in _cond(models, 1, tokens).tensors.values()]


def _embed_dtype(models: MetaModels) -> torch.dtype:
    return next(models.text_encoders[-1].parameters()).dtype


def _latent_shape(models: MetaModels) -> tuple[int, ...]:
    return models.latent_shape


def sampling_step_peak(models: MetaModels, config: Config, batch: int) -> int:
    """One denoising step of `batch` images (CFG doubles the model batch), as `rollout` runs
    it, plus one dequantized layer where the base is bitsandbytes-quantized."""
    policy = _meta_policy(models, config)
    latents = torch.empty(batch, *_latent_shape(models), device="meta")
    tokens = text_tokens(models, config)
    cond = _cond(models, batch, tokens)
    negative = _cond(models, 1, tokens) if policy.guided else None
    t = policy.sampler.timesteps[0]

    @torch.no_grad()
    def step():
        output = policy.predict(latents, t, cond, negative)
        policy.sampler.step(output, t, latents)

    return _counted(step) + dequantized_layer_bytes(models, config)


def decode_peak(models: MetaModels, batch: int) -> int:
    """`decode_latents` of `batch` latents (VAE slicing decodes them one at a time)."""
    latents = torch.empty(batch, *_latent_shape(models), device="meta")
    vae = models.vae
    autocast = autocast_factory(None)  # the decode runs outside autocast, in the VAE's dtype
    unpack = getattr(models.family, "unpack", None)  # FLUX: packed tokens -> the VAE's latents

    @torch.no_grad()
    def decode():
        with autocast():
            x = unpack(models.pipe, latents) if unpack is not None else latents
            scaled = (x / (getattr(vae.config, "scaling_factor", None) or 1.0)).to(vae.dtype)
            image = vae.decode(scaled, return_dict=False)[0]
            image.float()

    return _counted(decode)


def encode_reads(models: MetaModels, tokens: int) -> list[tuple[int, bool]]:
    """(tokens, all hidden states kept) per text encoder, as the family's pipeline reads them:
    a CLIP its 77 (max_position_embeddings) with every hidden state (the penultimate is read),
    T5 `tokens` (model.max_sequence_length resolved: SD3's default 256, FLUX.1's 512) for its
    last; FLUX.1's CLIP-L only its pooled output; FLUX.2-klein's Qwen3 `tokens` (512 by
    default) with every hidden state (layers 9, 18, 27 are stacked), its LM head stood down as
    the family encodes (`without_lm_head`: no logits)."""
    name = getattr(models.family, "name", "")
    if name == "flux":
        return [(77, False), (tokens, False)]
    if name == "flux2":
        return [(tokens, True)]
    return [
        (e.config.max_position_embeddings, True)
        if hasattr(e.config, "max_position_embeddings")
        else (tokens, False)
        for e in models.text_encoders
    ]


def encode_peak(models: MetaModels, batch: int, tokens: int = -1) -> int:
    """The text encoders on `batch` prompts, one after the other, each one's output kept (the
    prompt encoder's preload batches, memory.encode_batch_size), each on the tokens
    `encode_reads` gives; `tokens` -1: the model's default (`text_tokens`)."""
    from ddpo_lite.families import sequence_length

    reads = encode_reads(models, sequence_length(models.pipe, tokens))

    from ddpo_lite.families.flux2 import without_lm_head

    @torch.no_grad()
    def encode():
        with autocast_factory(None)(), contextlib.ExitStack() as stack:
            for e in models.text_encoders:
                stack.enter_context(without_lm_head(e))
            # the CLIPs' penultimate states are read (all hidden states kept); T5's last only
            outputs = [
                e(
                    torch.zeros(batch, length, dtype=torch.long).to("meta"),
                    output_hidden_states=hidden,
                )
                for e, (length, hidden) in zip(models.text_encoders, reads, strict=True)
            ]
            del outputs

    return _counted(encode)


def reward_peak(models: MetaModels, batch: int) -> int:
    """The reward's vision model on `batch` 224x224 images (pixels moved to the accelerator)."""
    if models.reward is None:
        return 0
    size = models.reward.config.image_size
    pixels = torch.empty(batch, 3, size, size)

    @torch.inference_mode()
    def score():
        with autocast_factory(None)():
            embeds = models.reward(pixel_values=pixels.to("meta", models.reward_dtype)).image_embeds
            (embeds / embeds.norm(dim=-1, keepdim=True)).sum(-1)

    return _counted(score)


def _sampler(models: MetaModels, config: Config):
    """The run's sampler (the trainer's `make_sampler`) with a noise level > 0, so that a
    step has its log-probability even where the config samples deterministically."""
    from ddpo_lite.trainer import make_sampler

    sampler = make_sampler(models.pipe, models.family, config, models.resolution, "cpu")
    return dataclasses.replace(sampler, eta=max(sampler.eta, 1e-3))


def _meta_policy(models: MetaModels, config: Config):
    """The run's policy over the meta-device models (no prompt encoder: the estimate feeds
    embeddings of the right shape itself)."""
    from ddpo_lite.policy import Policy

    return Policy(
        family=models.family,
        pipe=models.pipe,
        denoiser=models.denoiser,
        sampler=_sampler(models, config),
        encoder=None,
        guidance_scale=config.sample.guidance_scale,
        autocast=autocast_factory(_autocast_dtype(config)),
        resolution=models.resolution,
    )


def recorded_steps(config: Config, models: MetaModels | None = None) -> int:
    """Steps a trajectory records: the SDE window's, else every stochastic step (all of them;
    CPS's last step has no noise); 0 for the trajectory-free algorithms."""
    sample = config.sample
    if config.train.algorithm in TRAJECTORY_FREE:
        return 0
    if sample.sde_window_size:
        return sample.sde_window_size
    flow = models is not None and models.family.sampler == "flow"
    return sample.num_steps - (1 if flow and sample.flow_sampler == "cps" else 0)


def keeps_final(config: Config) -> bool:
    """Whether the trajectory holds the final latent beside its chain (an SDE window that may
    end before the last step, or CPS's deterministic last step)."""
    sample = config.sample
    if config.train.algorithm in TRAJECTORY_FREE:
        return False
    return bool(sample.sde_window_size) or sample.flow_sampler == "cps"


def train_shape(config: Config) -> tuple[int, int, int]:
    """(samples per backward, timesteps per backward, timesteps trained per sample); the
    timesteps come from the recorded ones (an SDE window's only)."""
    train = config.train
    micro = getattr(train, "micro_batch_size", 0) or train.batch_size
    micro = min(micro, train.batch_size)
    steps = config.sample.sde_window_size or config.sample.num_steps
    k = max(1, int(steps * train.timestep_fraction))
    chunk = train.timestep_chunk if 0 < train.timestep_chunk < k else k
    return micro, chunk, k


def training_chunk_peak(models: MetaModels, config: Config, samples: int, chunk: int) -> int:
    """Forward+backward of one chunk (`samples` x `chunk` timesteps) through `chunk_loss`, the
    update's own loss, with the LoRA gradients already allocated (they persist across chunks)."""
    from ddpo_lite.sampling import Trajectory
    from ddpo_lite.update import UpdateSettings, chunk_loss

    policy = _meta_policy(models, config)
    # the flow sampler looks its sigmas up by step index: those indices stay on the CPU (a meta
    # index has no value); the DDIM sampler's timesteps are arithmetic, on meta as the latents
    index_device = "cpu" if models.family.sampler == "flow" else "meta"
    n = max(recorded_steps(config, models), chunk)
    latent = _latent_shape(models)
    batch = Trajectory(
        chain=torch.empty(samples, n + 1, *latent, device="meta"),
        timesteps=policy.sampler.timesteps[:n].repeat(samples, 1).to(index_device),
        log_probs=torch.empty(samples, n, device="meta"),
        cond=_cond(models, samples, text_tokens(models, config)),
        negative=_cond(models, 1, text_tokens(models, config)) if policy.guided else None,
        prompt_ids=torch.zeros(samples, dtype=torch.long, device="meta"),
        final=torch.empty(samples, *latent, device="meta") if keeps_final(config) else None,
    )
    cols = torch.arange(chunk).repeat(samples, 1).to(index_device)
    weights = torch.empty(samples, device="meta")
    valid = torch.ones(samples, dtype=torch.bool, device="meta")
    settings = UpdateSettings(
        config.train.algorithm,
        config.train.clip_range,
        getattr(config.train, "kl_coef", 0.0),  # > 0 adds a no-grad forward of the base model
    )
    for p in models.lora_params:
        p.grad = torch.empty_like(p)
    models.denoiser.train()

    def forward_backward():
        loss, _ = chunk_loss(
            policy,
            models.denoiser,
            batch,
            cols,
            weights,
            valid,
            settings,
            torch.Generator().manual_seed(0),
        )
        loss.backward()

    try:
        return _counted(forward_backward) + dequantized_layer_bytes(models, config)
    finally:
        models.denoiser.eval()
        for p in models.lora_params:
            p.grad = None


# ---------------------------------------------------------------------------------------------
# the phases
# ---------------------------------------------------------------------------------------------


def estimate(
    config: Config, models: MetaModels | None = None, resolution: int | None = None
) -> Estimate:
    """Predict `config`'s peak accelerator memory per phase (see the module docstring);
    `resolution` in pixels for the published-architecture models (`build_meta_models`)."""
    start = time.perf_counter()
    models = models or build_meta_models(config, resolution)
    transients = Transients(models, config)
    result = compose(config, models, transients)
    result.seconds = time.perf_counter() - start
    return result


class Transients:
    """Each step's transient peak, counted once on the meta device and cached."""

    def __init__(self, models: MetaModels, config: Config):
        self.models, self.config = models, config
        self._cache: dict[tuple, int] = {}
        self.shared: dict[tuple, int] = {}
        """Inference-only transients, shareable between models that differ only in gradient
        checkpointing (which acts only under autograd)."""

    def get(self, key: tuple, fn) -> int:
        cache = self._cache if key[0] == "train" else self.shared
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    @property
    def tokens(self) -> int:
        """The run's text-encoder tokens (part of each key: they set the conditioning's shape)."""
        return text_tokens(self.models, self.config)

    def sampling(self, batch: int) -> int:
        return self.get(
            ("sample", batch, self.tokens),
            lambda: sampling_step_peak(self.models, self.config, batch),
        )

    def decode(self, batch: int) -> int:
        return self.get(("decode", batch), lambda: decode_peak(self.models, batch))

    def encode(self, batch: int) -> int:
        tokens = self.tokens
        return self.get(("encode", batch, tokens), lambda: encode_peak(self.models, batch, tokens))

    def reward(self, batch: int) -> int:
        return self.get(("reward", batch), lambda: reward_peak(self.models, batch))

    def training(self, samples: int, chunk: int) -> int:
        return self.get(
            ("train", samples, chunk, self.tokens),
            lambda: training_chunk_peak(self.models, self.config, samples, chunk),
        )


def compose(config: Config, models: MetaModels, transients: Transients) -> Estimate:
    """Phase peaks from resident bytes (by formula) and transients (counted). `models` must have
    the levers of `config` that change the models (dtype, attention, checkpointing, slicing)."""
    memory, sample, train = config.memory, config.sample, config.train
    denoiser = denoiser_bytes(models)  # base weights (quantized where asked) + LoRA parameters
    vae = module_bytes(models.vae)
    text = sum(module_bytes(encoder) for encoder in models.text_encoders)
    reward = module_bytes(models.reward) + module_bytes(models.reward_text)
    adam = adam_state_bytes(models.lora_params, memory.use_8bit_adam)
    grads = sum(_rounded(p.numel() * 4) for p in models.lora_params)

    weights_name = f"{models.family.denoiser_name}_weights+lora"
    if models.quantize != "none":
        weights_name += f" ({models.quantize} base)"
    resident = {weights_name: denoiser, "adam_state": adam}
    if not memory.offload_vae:  # else it visits for each decode
        resident["vae_weights"] = vae
    if not (memory.offload_text_encoder or memory.encode_on_cpu):
        resident["text_encoder_weights"] = text
    if not memory.offload_reward and reward:
        resident["reward_weights"] = reward
    base = sum(resident.values())

    cond_rows = _cond_row_bytes(models, text_tokens(models, config))
    latent = _latent_shape(models)
    # NFT / AWM keep no chain: the final latents alone (a chain of 0 steps); an SDE window
    # keeps its steps and the final latent
    steps, final = recorded_steps(config, models), keeps_final(config)
    per_batch = trajectory_bytes(sample.batch_size, steps, latent, cond_rows, final)
    on_card = not memory.offload_trajectory  # else the epoch's chains wait in CPU memory
    held = trajectory_bytes(sample.batch_size, steps, latent, cond_rows, final, chain=on_card)
    epoch_traj = held * sample.num_batches_per_epoch

    # run start: the prompt encoder encodes the prompt list in batches of encode_batch_size
    # (on the CPU with encode_on_cpu: then only the embeddings arrive)
    encode_batch = min(memory.encode_batch_size, _num_prompts(config))
    if memory.encode_on_cpu:
        arrived = encode_batch * sum(cond_rows)
        encoding = PhaseEstimate(
            base + arrived, {**resident, "embeddings from the CPU encoders": arrived}
        )
    else:
        visit = text if memory.offload_text_encoder else 0
        encode_t = transients.encode(encode_batch)
        encoding = PhaseEstimate(
            base + visit + encode_t,
            {**resident, "text_encoder_visit": visit, "transient (text encoder forward)": encode_t},
        )

    # sampling: each candidate is (what is held besides `resident`) + a transient
    candidates = {
        # the epoch's chain buffer is allocated at the first batch and filled batch by batch
        "denoising step": {
            "trajectory (epoch buffer + this batch's steps)": epoch_traj + per_batch,
            "transient": transients.sampling(sample.batch_size),
        },
        "VAE decode": {
            "trajectory (epoch buffer + this batch's steps)": epoch_traj + per_batch,
            "vae_weights_visit": vae if memory.offload_vae else 0,
            # the VAE itself decodes one image at a time when slicing is on
            "transient": transients.decode(sample.batch_size),
        },
        "trajectory stack": {
            "trajectory (epoch buffer + this batch's steps, stacked)": epoch_traj + 2 * per_batch
        },
    }
    sampling = _phase(resident, candidates)

    reward_visit = reward if memory.offload_reward else 0
    reward_batch = min(sample.batch_size, 16)  # BatchedReward's default batch_size
    reward_t = transients.reward(reward_batch)
    reward_phase = PhaseEstimate(
        base + epoch_traj + reward_visit + reward_t,
        {
            **resident,
            "trajectory (epoch)": epoch_traj,
            "reward_weights_visit": reward_visit,
            "transient (reward forward)": reward_t,
        },
    )

    micro, chunk, _ = train_shape(config)
    epoch_samples = sample.batch_size * sample.num_batches_per_epoch
    step_samples = min(train.gradient_accumulation * train.batch_size, epoch_samples)
    if train.algorithm in ONE_STEP_ALGORITHMS:  # one optimizer step gathers the whole epoch
        step_samples = epoch_samples
    gathered = trajectory_bytes(step_samples, steps, latent, cond_rows, final, chain=on_card)
    # the micro-batch in turn, gathered from its train batch (or its chain brought over)
    whole = trajectory_bytes(micro, steps, latent, cond_rows, final)
    if micro < min(train.batch_size, epoch_samples):  # a copy of its rows
        in_turn = whole
    else:  # the train batch itself; offloaded, its chain comes over
        in_turn = (
            0
            if on_card
            else whole - trajectory_bytes(micro, steps, latent, cond_rows, final, chain=False)
        )
    train_t = transients.training(micro, chunk)
    training = PhaseEstimate(
        base + epoch_traj + gathered + in_turn + grads + train_t,
        {
            **resident,
            "trajectory (epoch)": epoch_traj,
            "optimizer step's gathered samples": gathered,
            "micro-batch in turn": in_turn,
            "lora_grads": grads,
            f"transient (forward+backward, {micro} sample(s) x {chunk} timestep(s))": train_t,
        },
    )
    phases = {
        "sampling": sampling,
        "reward": reward_phase,
        "training": training,
        "prompt encoding": encoding,
    }
    if config.reward.overlap and models.reward is not None:
        # batch k is scored while batch k+1 is denoised and decoded
        during = {k: v for k, v in candidates.items() if k in ("denoising step", "VAE decode")}
        busy = _phase(resident, during)
        phases[OVERLAP_PHASE] = PhaseEstimate(
            busy.peak_bytes + reward_visit + reward_t,
            {
                **busy.parts,
                "reward_weights_visit": reward_visit,
                "transient (reward forward)": reward_t,
            },
        )
    peak = max(p.peak_bytes for p in phases.values())
    notes = [models.note] if models.note else []
    return Estimate(phases, peak, config.model.name, models.resolution, notes=notes)


def _num_prompts(config: Config) -> int:
    """How many prompts the run encodes (64 when the prompt file cannot be read here)."""
    if not config.prompts.file:
        return len(config.prompts.prompts)
    try:
        with open(config.prompts.file) as f:
            lines = [line.strip() for line in f]
    except OSError:
        return 64
    return max(1, sum(1 for line in lines if line and not line.startswith("#")))


def _phase(resident: dict[str, int], candidates: dict[str, dict[str, int]]) -> PhaseEstimate:
    """The candidate moment with the most bytes held, as a PhaseEstimate naming it."""
    moment, held = max(candidates.items(), key=lambda item: sum(item[1].values()))
    parts = {**resident, **{f"{k} [{moment}]": v for k, v in held.items()}}
    return PhaseEstimate(sum(resident.values()) + sum(held.values()), parts)

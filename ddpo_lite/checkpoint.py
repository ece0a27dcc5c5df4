"""Resumable checkpoints: everything a run needs to continue exactly, in safetensors and JSON.

A checkpoint is a folder `output_dir/checkpoints/epoch_NNNN`, NNNN being the number of epochs
completed (not the number of saves), holding:

- `lora/`: the LoRA as `save_lora` writes it (loads in diffusers as is);
- `adapter.safetensors`: the same weights under peft's own key names, which resume loads;
- `optimizer.safetensors` + the JSON part of the optimizer state in `state.json`;
- `rng.safetensors`: the sampling generator of every process and the global torch RNG;
- `state.json`: epoch, stat-tracker buffers, optimizer scalars, ddpo-lite version.

It is written into a hidden temporary folder, every file fsynced, then renamed into place: a
crash mid-write leaves no `epoch_NNNN` folder, so `latest_checkpoint` never finds a partial one
(the next start removes the hidden leftover: `run_files.clean_leftovers`).
Nothing is unpickled when loading.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from ddpo_lite.models.lora import respect_umask, save_lora

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"epoch_(\d{4,})")


class CheckpointError(ValueError):
    """A checkpoint is missing or cannot be read; the message names the file."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are damaged (unreadable, truncated, altered, non-finite): an older
    checkpoint may still be intact. A checkpoint that does not fit the run (another LoRA rank,
    say) is a plain CheckpointError: an older one would not fit either."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint, the LoRA or another run file could not be written (disk full, quota, a
    read-only folder): the run stops; the checkpoints already written stay intact."""


#: The files whose SHA-256 state.json records and resume verifies.
HASHED = ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Split an optimizer state dict into tensors (for safetensors) and a JSON tree.

    Any nesting is kept: bitsandbytes' AdamW8bit keeps its 8-bit moments, quantization maps and
    absmax tensors in a dict inside each parameter's state (`__bnb_optimizer_quant_state__`).
    Each tensor is stored under its path ("0/exp_avg": parameter 0's state) and replaced in the
    tree by {"__json_tensor__": path}; dicts with non-string keys, tuples and non-finite floats
    are tagged so that they come back as they were (and the JSON stays strict).
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name}
        if isinstance(value, dict):
            items = [(key, encode(item, _join(path, key))) for key, item in value.items()]
            if all(isinstance(key, str) and not key.startswith("__json_") for key, _ in items):
                return dict(items)
            return {_DICT: [[key, item] for key, item in items]}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(item, _join(path, i)) for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, _join(path, i)) for i, item in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT: repr(value)}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise CheckpointError(
            f"cannot checkpoint optimizer state {path!r} of type {type(value).__name__}"
        )

    tree = {key: encode(value, "" if key == "state" else key) for key, value in state.items()}
    return tensors, {"format": 2, "tree": tree}


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    """The optimizer state dict that `_flatten_optimizer` split; also reads the format before
    nesting was kept (tensors "index/key" and a flat "scalars" table)."""
    if rest.get("format") != 2:
        state: dict[int, dict[str, Any]] = {}
        for name, tensor in tensors.items():
            index, key = name.split("/", 1)
            state.setdefault(int(index), {})[key] = tensor
        for index, values in rest["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        return {"state": state, "param_groups": rest["param_groups"]}

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _DICT in value:
            return {key: decode(item) for key, item in value[_DICT]}
        if _TUPLE in value:
            return tuple(decode(item) for item in value[_TUPLE])
        if _FLOAT in value:
            return float(value[_FLOAT])
        return {key: decode(item) for key, item in value.items()}

    return {key: decode(value) for key, value in rest["tree"].items()}


_TENSOR, _DICT, _TUPLE, _FLOAT = (
    "__json_tensor__",
    "__json_dict__",
    "__json_tuple__",
    "__json_float__",
)


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
    family=None,
) -> Path:
    """Write the checkpoint for `epoch` completed epochs atomically; keep the latest `keep`."""
    final = checkpoint_dir(output_dir, epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        save_lora(unet, tmp / "lora", lora_metadata, family)
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
            "sha256": {name: _sha256(tmp / name) for name in HASHED},
        }
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        respect_umask(tmp)  # mkdtemp makes 0700 and safetensors 0600: as any file the user makes
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same epoch (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_adapter_fits(folder: Path, unet: torch.nn.Module, adapter: dict) -> None:
    """A one-line error when the saved LoRA's tensors do not match this run's LoRA (another
    lora.rank or lora.target_modules): names the shapes instead of a size-mismatch traceback."""
    expected = get_peft_model_state_dict(unet)
    missing = sorted(set(expected) - set(adapter))
    if missing:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} lacks {len(missing)} of this LoRA's tensors, such as "
            f"{missing[0]!r} (was lora.target_modules changed? resume with the run's own)"
        )
    for key, tensor in adapter.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            saved, wanted = _rank(key, tensor.shape), _rank(key, expected[key].shape)
            hint = (
                f"it was trained with lora.rank = {saved}, this config asks for {wanted}"
                if saved != wanted
                else "the LoRA's shape changed"
            )
            raise CheckpointError(
                f"checkpoint {str(folder)!r} does not fit this LoRA: {key!r} is "
                f"{tuple(tensor.shape)}, expected {tuple(expected[key].shape)} ({hint}); "
                "resume with the run's own lora settings (drop the --set that changes them)"
            )


def _rank(key: str, shape: torch.Size) -> int:
    """LoRA rank from a peft tensor's shape: lora_A is (rank, in), lora_B is (out, rank)."""
    return int(shape[0] if "lora_A" in key else shape[1])


def load_checkpoint(
    folder: str | Path, *, unet: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> CheckpointState:
    """Restore the LoRA weights and optimizer state in place; return the rest."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        for name, digest in (state.get("sha256") or {}).items():
            if _sha256(folder / name) != digest:
                raise ValueError(f"{name} is not the file that was saved (its SHA-256 differs)")
        adapter = load_file(folder / "adapter.safetensors")
        optimizer_tensors = load_file(folder / "optimizer.safetensors")
        rng = load_file(folder / "rng.safetensors")
    except Exception as err:  # noqa: BLE001 - OSError, JSON, safetensors' own errors: damaged
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedCheckpointError(f"cannot read checkpoint {str(folder)!r}: {reason}") from err
    match = _NAME.fullmatch(folder.name)
    if match and int(state.get("epoch", -1)) != int(match.group(1)):
        raise DamagedCheckpointError(
            f"checkpoint {str(folder)!r} records epoch {state.get('epoch')!r}, not its folder's"
        )
    bad = [k for k, v in adapter.items() if not torch.isfinite(v).all()]
    if bad:
        raise DamagedCheckpointError(f"checkpoint {str(folder)!r}: {bad[0]!r} is not finite")

    _check_adapter_fits(folder, unet, adapter)
    result = set_peft_model_state_dict(unet, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not fit this LoRA: {len(unexpected)} unexpected "
            f"keys such as {unexpected[0]!r} (was lora.rank or lora.target_modules changed?)"
        )
    try:
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, state["optimizer"]))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {str(folder)!r}: its optimizer state does not fit this run's optimizer "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); was "
            "memory.use_8bit_adam or the LoRA changed since it was written?"
        ) from err
    generators = [rng[f"generator/{i}"] for i in range(state["num_processes"])]
    return CheckpointState(
        epoch=int(state["epoch"]),
        tracker=state.get("tracker"),
        generator_states=generators,
        torch_rng_state=rng["torch"],
        extra=state.get("extra") or {},
    )

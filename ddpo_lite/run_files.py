"""A run's output folder: what is in it, refusing to clobber one, the per-epoch summary line,
the LoRA's metadata and the model card."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tomllib
import warnings
from pathlib import Path

from ddpo_lite import __version__
from ddpo_lite.checkpoint import CHECKPOINTS, latest_checkpoint
from ddpo_lite.config import Config, ConfigError, RewardConfig


class RunExistsError(ConfigError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


#: What a run writes into its output folder (and `overwrite` removes; nothing else is touched).
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "README.md",
    "lora",
    "best_lora",
    "samples",
    "logs",
    "stopped.json",
    "eval_baseline.json",
    "lora_kohya.safetensors",
    CHECKPOINTS,
)


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_FILES)


def check_output_folder(path: str | Path, what: str = "--output") -> Path:
    """Refuse, in one line, a folder that cannot be written: `path` is a file, sits under one, or
    its nearest existing folder is read-only. Nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder: choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{what} {str(path)!r}: {str(existing)!r} is a file, so no folder can be made under "
            "it; choose another folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {str(path)!r}: cannot write in {str(existing)!r} (read-only or not yours); "
            "choose another folder"
        )
    return path


def check_output_file(path: str | Path, what: str = "--output") -> Path:
    """As `check_output_folder`, for a file about to be written (or replaced) at `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give a file name")
    check_output_folder(path.parent, what=f"{what} {str(path)!r}: its folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {str(path)!r} is read-only; choose another file")
    return path


def prepare_output(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder against resume/overwrite; returns the checkpoint to resume from.

    A new run refuses a folder that holds one. `overwrite` deletes the previous run's files
    (only those in `RUN_FILES`). `resume` of a run that never reached a checkpoint starts it
    over; of a run that saved a LoRA but has no checkpoint (deleted: the two are saved together),
    it refuses, since starting over would replace the LoRA and the metrics.
    """
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: choose one")
    check_output_folder(output_dir, "output folder (--output / output_dir)")
    if resume:
        if not holds_run(output_dir):
            raise ConfigError(f"nothing to resume: {str(output_dir)!r} holds no ddpo-lite run")
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None and (output_dir / "lora").exists():
            raise ConfigError(
                f"cannot resume {str(output_dir)!r}: it has a LoRA and metrics but no checkpoint "
                f"in {CHECKPOINTS}/ to continue from; --overwrite starts it over (replacing "
                "them), or train into another --output"
            )
        return checkpoint
    if holds_run(output_dir):
        if not overwrite:
            raise RunExistsError(
                f"output folder {str(output_dir)!r} already holds a run: pass --resume to "
                "continue it, --overwrite to replace it, or choose another --output"
            )
        for name in RUN_FILES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return None


#: The folders whose atomic saves (a hidden temporary folder, then a rename) a crash can leave
#: half done: `.NAME-XXXXXXXX` (being written) and `.NAME-old` (the previous one, mid-swap).
SWAPPED = ("lora", "best_lora")


def clean_leftovers(output_dir: Path, resume: bool) -> None:
    """Remove what a crash left of the atomic saves: half-written `checkpoints/.epoch_NNNN-*`
    and `.lora-*` / `.best_lora-*` folders. A kill in the middle of a LoRA swap (`lora/` already
    moved to `.lora-old`, the new one not yet in place) is repaired on resume by moving the
    previous LoRA back, said aloud; a new run only removes it. Main process only."""
    for tmp in (output_dir / CHECKPOINTS).glob(".epoch_*-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for name in SWAPPED:
        final, old = output_dir / name, output_dir / f".{name}-old"
        if resume and old.is_dir() and not final.exists():
            os.rename(old, final)
            warnings.warn(
                f"{str(final)!r} was missing (a crash while replacing it): restored the previous "
                f"one from {old.name}; the next save replaces it",
                stacklevel=2,
            )
        for tmp in output_dir.glob(f".{name}-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def refresh_lora(output_dir: Path, checkpoint: Path) -> bool:
    """On resume: put the checkpoint's LoRA in `lora/` when that is missing or older than the
    checkpoint (a save that failed or was killed between the two), so that `lora/` is the
    resumed state even when no epoch is left to run. True when it was replaced."""
    final, saved = output_dir / "lora", checkpoint / "lora"
    if not (saved / "ddpo_lite.json").is_file():
        return False
    wanted = json.loads((saved / "ddpo_lite.json").read_text()).get("epoch")
    try:
        current = json.loads((final / "ddpo_lite.json").read_text()).get("epoch")
    except (OSError, ValueError):
        current = None
    if current is not None and wanted is not None and current >= wanted:
        return False
    tmp = output_dir / f".lora-from-{checkpoint.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(saved, tmp)
    old = output_dir / ".lora-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return True


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resumed_config(old_text: str, new_text: str, epoch: int) -> tuple[str, list[str]]:
    """The config.toml a resumed run writes, and 'key old -> new' for each setting it changes.

    The new text keeps the old file's `# resumed at ...` lines and adds one for this resume when
    anything changed, so the file says which epochs ran with which settings (TOML ignores them).
    """
    try:
        old = _flat(tomllib.loads(old_text))
    except tomllib.TOMLDecodeError:  # a damaged file (the API resumes without reading it)
        return new_text, []
    new = _flat(tomllib.loads(new_text))
    old.pop("output_dir", None)  # the folder resumed from, wherever it was moved: not a setting
    new.pop("output_dir", None)
    changed = [
        f"{key} {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in [*new, *(k for k in old if k not in new)]
        if old.get(key, "(unset)") != new.get(key, "(unset)")
    ]
    history = [line for line in old_text.splitlines() if line.startswith("# resumed at ")]
    if changed:
        history.append(f"# resumed at epoch {epoch} with {', '.join(changed)}")
    return "".join(f"{line}\n" for line in history) + new_text, changed


def epoch_summary(epoch: int, num_epochs: int, row: dict) -> str:
    """One plain line per epoch: reward, KL, clip fraction, evaluation (and its change from the
    base model), time, memory."""
    parts = [
        f"epoch {epoch + 1}/{num_epochs}",
        f"reward {row['reward_mean']:.4g} ± {row['reward_std']:.3g}",
    ]
    if "approx_kl" in row:
        parts.append(f"approx kl {row['approx_kl']:.3g}")
    if "clipfrac" in row:
        parts.append(f"clip {row['clipfrac']:.3f}")
    if "kl_to_base" in row:
        parts.append(f"kl to base {row['kl_to_base']:.3g} ({row['kl_seconds']:.1f} s)")
    if "diversity" in row:
        parts.append(f"diversity {row['diversity']:.3g}")
    if "eval_reward_mean" in row:
        parts.append(f"eval {row['eval_reward_mean']:.4g}")
    for key in row:  # paired with the base model's evaluation: change ± its standard error
        if key.startswith("eval_") and key.endswith("_gain"):
            group = key[len("eval_") : -len("_gain")]
            parts.append(f"{group} {row[key]:+.3g} ± {row[key + '_se']:.2g}")
    parts += [
        f"{row['epoch_seconds']:.1f} s/epoch",
        f"{row['samples_per_second']:.2f} samples/s",
        f"peak mem {row['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    return "  ".join(parts)


def metrics_before(path: Path, epoch: int) -> list[dict]:
    """The metrics.jsonl rows of the first `epoch` epochs (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    rows, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash, or edited
            damaged += int(bool(line.strip()))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("epoch", 0), int):
            damaged += 1
            continue
        if row.get("epoch", epoch + 1) <= epoch:  # rows are numbered 1.. (epochs done)
            rows.append(row)
    if damaged:  # the resumed run rewrites the file: keep what was there, and say so
        copy = path.with_name(f"{path.name}.damaged")
        shutil.copyfile(path, copy)
        warnings.warn(
            f"{path}: {damaged} line(s) are not metrics rows and are dropped from the resumed "
            f"history; the file as it was is kept in {copy}",
            stacklevel=2,
        )
    return rows


def reward_label(reward: RewardConfig) -> str:
    """The reward a `[reward]` section builds, in words: its name, a weighted sum
    ("1*aesthetic + 0.1*jpeg_compressibility") or the reward server's URL."""
    if reward.url:
        return reward.url
    if reward.weights:
        return " + ".join(f"{w:g}*{n}" for n, w in reward.weights.items())
    return reward.name


def lora_metadata(config: Config, reward_name: str | None = None) -> dict:
    """What a saved LoRA records about its run: enough for `ddpo-lite sample` to rebuild it, and
    for `ddpo-lite eval` to score it with the reward it was trained on.

    `reward_name` is the name of the reward the run used (the trainer's reward callable); one
    other than the `[reward]` section's is a Python function given to `train(reward_fn=...)`.
    `reward` says in words what was used; `reward_kind` is one of "registered", "user"
    ('module:function' or 'file.py:function'), "weighted", "remote" or "function";
    `reward_config` is the `[reward]` section as JSON, except for a "function".
    """
    base = config.model.name
    # the seed is part of the tiny models' identity
    if base in ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2"):
        base = f"{base}:{config.model.seed}"
    section = config.reward
    label = reward_label(section)
    if reward_name is not None and reward_name != label:
        kind, label = "function", f"{reward_name} (a Python function given to train())"
    elif section.url:
        kind = "remote"
    elif section.weights:
        kind = "weighted"
    else:
        kind = "user" if ":" in section.name else "registered"
    metadata = {
        "base_model": base,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "preset": config.preset,
        "reward": label,
        "reward_kind": kind,
        "num_steps": config.sample.num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "eta": config.sample.eta,
        "quantize_base": config.memory.quantize_base,  # `sample` loads the base the same way
        "version": __version__,
    }
    if kind != "function":
        metadata["reward_config"] = json.dumps(dataclasses.asdict(section), sort_keys=True)
    return metadata


def _best_line(output_dir: Path) -> str:
    """A line about best_lora/ when the run kept one."""
    meta_file = output_dir / "best_lora" / "ddpo_lite.json"
    if not meta_file.is_file():
        return ""
    meta = json.loads(meta_file.read_text())
    return (
        f"- the best LoRA by held-out evaluation reward ({meta.get('eval_reward_mean', 0):.4g}, "
        f"after epoch {meta.get('epoch')}) is in `best_lora/`\n"
    )


def _first_prompt(config: Config) -> str:
    """A prompt the run trained on (the first of its file, or of its list)."""
    file = Path(config.prompts.file) if config.prompts.file else None
    if file is not None and file.is_file():
        lines = (line.strip() for line in file.read_text().splitlines())
        return next((line for line in lines if line and not line.startswith("#")), "a cat")
    return config.prompts.prompts[0] if config.prompts.prompts else "a cat"


def write_model_card(
    output_dir: Path, config: Config, metadata: dict, epochs_done: int, metrics: list[dict]
) -> None:
    """README.md for the run: what was trained, and how to load and export the LoRA."""
    last = metrics[-1] if metrics else {}
    first = metrics[0] if metrics else {}
    rewards = (
        f"{first.get('reward_mean', float('nan')):.4g} (epoch 1) -> "
        f"{last.get('reward_mean', float('nan')):.4g} (epoch {epochs_done})"
    )
    base = metadata["base_model"]
    if base.startswith("tiny") or base == "shapes":  # built or shipped by ddpo-lite, not hub ids
        load_line = f"from ddpo_lite.models import load_pipeline\n\npipe = load_pipeline({base!r})"
    else:
        load_line = (
            "from diffusers import StableDiffusionPipeline\n\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({base!r})"
        )
    text = f"""# ddpo-lite LoRA: {config.preset or "custom config"}

A LoRA for the UNet of `{base}`, fine-tuned with DDPO ({config.train.algorithm}) by
ddpo-lite {__version__} for the reward `{metadata["reward"]}`.

- epochs: {epochs_done} of {config.num_epochs}
- reward mean: {rewards}
- LoRA rank {config.lora.rank}, alpha {config.lora.alpha}, on {", ".join(config.lora.target_modules)}
- sampling: {config.sample.num_steps} DDIM steps, eta {config.sample.eta}, \
guidance {config.sample.guidance_scale}
- the full configuration is in `config.toml`, per-epoch metrics in `metrics.jsonl`
  (reward, KL to the base model, diversity, held-out evaluation), sample grids in `samples/`
{_best_line(output_dir)}
## Load it

```python
{load_line}
pipe.load_lora_weights({str(output_dir / "lora")!r})
image = pipe({_first_prompt(config)!r},
             num_inference_steps={config.sample.num_steps},
             guidance_scale={config.sample.guidance_scale}).images[0]
```

or sample from the command line:

```
ddpo-lite sample --lora {output_dir / "lora"} --prompt "..."
```

For ComfyUI and AUTOMATIC1111 (kohya key names), export a single file:

```
ddpo-lite export {output_dir / "lora"} --output {output_dir / "lora_kohya.safetensors"}
```

Continue this run with `ddpo-lite train --resume {output_dir}`.
"""
    (output_dir / "README.md").write_text(text)

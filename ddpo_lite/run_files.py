"""A run's output folder: what is in it, refusing to clobber one, the per-epoch summary line,
the LoRA's metadata and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ddpo_lite import __version__
from ddpo_lite.checkpoint import CHECKPOINTS, latest_checkpoint
from ddpo_lite.config import Config, ConfigError


class RunExistsError(ConfigError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


#: What a run writes into its output folder (and `overwrite` removes; nothing else is touched).
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "README.md",
    "lora",
    "samples",
    "logs",
    CHECKPOINTS,
)


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_FILES)


def prepare_output(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder against resume/overwrite; returns the checkpoint to resume from.

    A new run refuses a folder that holds one. `overwrite` deletes the previous run's files
    (only those in `RUN_FILES`). `resume` of a run that never reached a checkpoint starts it over.
    """
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: choose one")
    if resume:
        if not holds_run(output_dir):
            raise ConfigError(f"nothing to resume: {str(output_dir)!r} holds no ddpo-lite run")
        return latest_checkpoint(output_dir)
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
        parts.append(f"kl to base {row['kl_to_base']:.3g}")
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
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if row.get("epoch", epoch + 1) <= epoch:  # rows are numbered 1.. (epochs done)
            rows.append(row)
    return rows


def lora_metadata(config: Config) -> dict:
    """What a saved LoRA records about its run: enough for `ddpo-lite sample` to rebuild it."""
    base = config.model.name
    if base == "tiny":  # the seed is part of the tiny model's identity
        base = f"tiny:{config.model.seed}"
    return {
        "base_model": base,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "preset": config.preset,
        "reward": config.reward.name,
        "num_steps": config.sample.num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "eta": config.sample.eta,
        "version": __version__,
    }


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
    if base.startswith("tiny"):  # built offline by ddpo-lite, not a hub id
        load_line = f'from ddpo_lite.models import load_pipeline\n\npipe = load_pipeline("{base}")'
    else:
        load_line = f'pipe = StableDiffusionPipeline.from_pretrained("{base}")'
    text = f"""# ddpo-lite LoRA: {config.preset or "custom config"}

A LoRA for the UNet of `{base}`, fine-tuned with DDPO ({config.train.algorithm}) by
ddpo-lite {__version__} for the reward `{config.reward.name}`.

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
from diffusers import StableDiffusionPipeline

{load_line}
pipe.load_lora_weights("{output_dir / "lora"}")
image = pipe("{config.prompts.prompts[0] if config.prompts.prompts else "a cat"}",
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

"""The DDPO epoch loop: rollout -> rewards -> advantages -> update -> log -> checkpoint.

Run it with `ddpo_lite.train(config)` (or `ddpo-lite train --preset NAME`). Under
`accelerate launch` / `torchrun` every process samples its own images, rewards and prompt ids
are gathered so that advantages use every process's samples, and LoRA gradients are averaged by
DDP on the last backward of each optimizer step.

The update is a chunked gradient accumulator: a train batch of `train.batch_size` samples is
scored `train.timestep_chunk` timesteps at a time (one forward+backward each), and the optimizer
steps once per `train.gradient_accumulation` batches. Losses are sums divided by the element count
of the whole optimizer step, so the accumulated gradient equals the unchunked one.
"""

from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDIMScheduler
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ddpo_lite import __version__
from ddpo_lite.advantages import PerPromptStatTracker, compute_advantages
from ddpo_lite.algorithms import ddpo_is_loss, ddpo_sf_loss, rwr_loss, rwr_weights
from ddpo_lite.checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint, save_checkpoint
from ddpo_lite.config import Config, ConfigError, to_dict, to_toml
from ddpo_lite.grid import make_grid
from ddpo_lite.models import load_pipeline
from ddpo_lite.models.lora import attach_lora, save_lora
from ddpo_lite.models.memory import apply_memory_settings
from ddpo_lite.rewards import get_reward
from ddpo_lite.sampling import (
    PromptEncoder,
    Trajectory,
    ddim_step_with_logprob,
    predict_noise,
    rollout,
)


@dataclass
class TrainResult:
    """What a run returns: its per-epoch metrics and where it wrote things."""

    metrics: list[dict] = field(default_factory=list)
    output_dir: Path = Path(".")
    lora_dir: Path = Path(".")
    pipeline: object = None
    """The pipeline with the trained LoRA still attached to its UNet, ready to sample."""


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def load_prompts(prompt_config) -> list[str]:
    """The prompt list: from `prompts.file` (one per line) if set, else `prompts.prompts`."""
    if not prompt_config.file:
        return list(prompt_config.prompts)
    path = Path(prompt_config.file)
    if not path.is_file():
        raise ConfigError(f"prompts.file = {prompt_config.file!r} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts.file = {prompt_config.file!r} holds no prompts")
    return prompts


def make_optimizer(
    params: list[torch.nn.Parameter], train, use_8bit: bool, device
) -> torch.optim.Optimizer:
    """bitsandbytes AdamW8bit when asked and it runs here; otherwise torch AdamW, said aloud."""
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if use_8bit:
        try:
            import bitsandbytes as bnb

            # probe one step on this device: some builds import but cannot run here
            probe = torch.nn.Parameter(torch.zeros(4096, device=device))
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
            return bnb.optim.AdamW8bit(params, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure means: fall back, loudly
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            warnings.warn(
                f"memory.use_8bit_adam: bitsandbytes AdamW8bit cannot run here ({reason}); "
                "using torch AdamW (32-bit state)",
                stacklevel=2,
            )
    return torch.optim.AdamW(params, **kwargs)


def make_accelerator(config: Config) -> Accelerator:
    """An Accelerator for this config. accelerate keeps one global state per process; it is reset
    (keeping the process group) so that train() can be called again with another precision."""
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=config.memory.mixed_precision,
        cpu=config.memory.cpu,
        log_with=list(config.log_with) or None,
        project_dir=config.output_dir,
    )
    if accelerator.device.type == "cpu" and config.memory.mixed_precision == "fp16":
        raise ConfigError(
            "memory.mixed_precision = 'fp16' needs a GPU (CPU autocast is bf16): "
            "set memory.mixed_precision = 'bf16' or 'no' for a CPU run"
        )
    return accelerator


def make_scheduler(pipe, num_steps: int, device) -> DDIMScheduler:
    """A DDIM scheduler from the pipeline's config with `num_steps` timesteps set."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps, device=device)
    # once here, not on every step of the denoising loop
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


@dataclass
class Components:
    """The pieces of a run, set up from a config: the policy twice (DDP-wrapped for the update,
    plain for sampling; one set of weights), the optimizer, the scheduler, the prompt encoder."""

    pipe: object
    unet: torch.nn.Module
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    scheduler: DDIMScheduler
    encoder: PromptEncoder


def build_components(config: Config, accelerator: Accelerator) -> Components:
    """Load the pipeline, apply the memory levers, attach the LoRA, prepare for accelerate."""
    device = accelerator.device
    with accelerator.main_process_first():  # one process writes caches, the others read them
        pipe = load_pipeline(config.model.name, seed=config.model.seed)
    apply_memory_settings(pipe, config.memory, device)
    torch.manual_seed(config.seed)  # the LoRA's initial A matrices (B starts at zero)
    params = attach_lora(pipe.unet, config.lora.rank, config.lora.alpha, config.lora.target_modules)
    optimizer = make_optimizer(params, config.train, config.memory.use_8bit_adam, device)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    pipe.unet.eval()
    return Components(
        pipe=pipe,
        unet=unet,
        policy=pipe.unet,  # the same module, unwrapped: sampling needs no gradient sync
        optimizer=optimizer,
        params=params,
        scheduler=make_scheduler(pipe, config.sample.num_steps, device),
        encoder=PromptEncoder(
            pipe, device, config.prompts.negative_prompt, config.memory.offload_text_encoder
        ),
    )


# ---------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------


@dataclass
class UpdateSettings:
    """What one chunk's loss needs besides the data."""

    algorithm: str
    guidance_scale: float
    eta: float
    clip_range: float


def score_log_probs(
    unet,
    scheduler,
    batch: Trajectory,
    cols: torch.Tensor,
    guidance_scale: float,
    eta: float,
    autocast,
) -> torch.Tensor:
    """log pi_theta(x_{t-1} | x_t) of the stored steps `cols` ((B, k) indices), shape (B, k).

    The same `predict_noise` + `ddim_step_with_logprob` the rollout used, on the stored float32
    latents, under the same autocast and CFG.
    """
    rows = torch.arange(len(batch), device=cols.device)[:, None]
    k = cols.shape[1]
    x_t = batch.latents[rows, cols].flatten(0, 1)  # (B*k, C, H, W)
    x_prev = batch.next_latents[rows, cols].flatten(0, 1)
    t = batch.timesteps[rows, cols].flatten()
    embeds = batch.prompt_embeds.repeat_interleave(k, dim=0)
    with autocast():
        noise_pred = predict_noise(unet, x_t, t, embeds, batch.negative_embeds, guidance_scale)
    _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, x_t, eta=eta, prev_sample=x_prev)
    return log_prob.view(len(batch), k)


def chunk_loss(
    unet,
    scheduler,
    batch: Trajectory,
    cols: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    settings: UpdateSettings,
    autocast,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss of one chunk: samples `batch`, their steps `cols` (B, k), per-sample
    `weights` (B,) = advantages (DDPO) or RWR weights; samples with `valid` False add nothing."""
    if settings.algorithm == "rwr":
        # denoising loss on the final samples x_0, noised afresh at the chunk's timesteps
        k = cols.shape[1]
        rows = torch.arange(len(batch), device=cols.device)[:, None]
        x0 = batch.next_latents[:, -1].repeat_interleave(k, dim=0)
        t = batch.timesteps[rows, cols].flatten()
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
        embeds = batch.prompt_embeds.repeat_interleave(k, dim=0)
        with autocast():
            noise_pred = predict_noise(unet, noisy, t, embeds, None, 1.0)
        return rwr_loss(noise_pred, noise, (weights * valid).repeat_interleave(k))

    log_prob = score_log_probs(
        unet, scheduler, batch, cols, settings.guidance_scale, settings.eta, autocast
    )
    old = batch.log_probs[torch.arange(len(batch), device=cols.device)[:, None], cols]
    # a dropped sample scores as its old log-prob: ratio 1, advantage 0, no gradient, no stats
    log_prob = torch.where(valid[:, None], log_prob, old)
    adv = (weights * valid)[:, None].expand_as(log_prob)
    if settings.algorithm == "ddpo-is":
        return ddpo_is_loss(log_prob, old, adv, settings.clip_range)
    return ddpo_sf_loss(log_prob, old, adv)


def accumulate_step(
    accelerator: Accelerator,
    unet,
    scheduler,
    batches: Sequence[tuple[Trajectory, torch.Tensor, torch.Tensor, torch.Tensor]],
    settings: UpdateSettings,
    timestep_chunk: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Forward+backward for one optimizer step, without stepping.

    `batches`: (samples, cols (B, k), weights (B,), valid (B,) bool) per train batch. Each batch
    runs `timestep_chunk` of its k timesteps per forward+backward (0 = all). Every chunk's summed
    loss is divided by the valid element count of the whole step, so the gradient is that of the
    step's mean loss however it is chunked. DDP all-reduces only on the step's last backward.
    """
    total = sum(int(valid.sum()) * cols.shape[1] for _, cols, _, valid in batches)
    total = max(total, 1)
    chunks = []
    for samples, cols, weights, valid in batches:
        k = cols.shape[1]
        size = timestep_chunk if 0 < timestep_chunk < k else k
        for start in range(0, k, size):
            chunks.append((samples, cols[:, start : start + size], weights, valid))
    sums: dict[str, float] = {}
    for i, (samples, cols, weights, valid) in enumerate(chunks):
        last = i == len(chunks) - 1
        context = torch.enable_grad() if last else accelerator.no_sync(unet)
        with context:
            loss, stats = chunk_loss(
                unet,
                scheduler,
                samples,
                cols,
                weights,
                valid,
                settings,
                accelerator.autocast,
                generator,
            )
            accelerator.backward(loss / total)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / total
        for name, value in stats.items():
            if name == "ratio_dev":
                sums[name] = max(sums.get(name, 0.0), float(value))
            else:
                sums[name] = sums.get(name, 0.0) + float(value) / total
    return sums


def timestep_columns(
    num_samples: int, num_steps: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """A random subset of int(num_steps * fraction) (at least 1) steps per sample, (N, k)."""
    k = max(1, int(num_steps * fraction))
    return torch.stack(
        [torch.randperm(num_steps, generator=generator)[:k] for _ in range(num_samples)]
    )


def update(
    accelerator: Accelerator,
    unet,
    optimizer,
    params: list[torch.nn.Parameter],
    scheduler,
    trajectory: Trajectory,
    weights: torch.Tensor,
    valid: torch.Tensor,
    config: Config,
    generator: torch.Generator,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """The inner epochs of one epoch's update; returns the mean of each statistic per step."""
    train = config.train
    settings = UpdateSettings(
        train.algorithm, config.sample.guidance_scale, config.sample.eta, train.clip_range
    )
    device = trajectory.latents.device
    num_samples, num_steps = trajectory.log_probs.shape
    history: list[dict[str, float]] = []
    unet.train()
    for _ in range(train.num_inner_epochs):
        order = torch.randperm(num_samples, generator=generator).to(device)
        cols = timestep_columns(num_samples, num_steps, train.timestep_fraction, generator).to(
            device
        )
        row_groups = order.split(train.batch_size)
        per_step = len(row_groups) if train.algorithm == "ddpo-sf" else train.gradient_accumulation
        for start in range(0, len(row_groups), per_step):
            # gather only this optimizer step's samples: no copy of the whole epoch's trajectory
            batches = [
                (trajectory.index(rows), cols[rows], weights[rows], valid[rows])
                for rows in row_groups[start : start + per_step]
            ]
            step_stats = accumulate_step(
                accelerator, unet, scheduler, batches, settings, train.timestep_chunk, generator
            )
            grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_stats["grad_norm"] = float(grad_norm)
            history.append(step_stats)
            progress()
    unet.eval()
    return {name: float(np.mean([h[name] for h in history])) for name in history[0]}


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def _peak_memory(device: torch.device) -> int:
    """Peak accelerator memory allocated (bytes); on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


#: Prompt lists up to this size are encoded once at the start (a few MB of embeddings).
PRELOAD_PROMPTS = 512


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


def _tracker_config(config: Config) -> dict[str, int | float | str | bool]:
    """The config flattened to scalars, as TensorBoard's hparams want them."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in to_dict(config).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, item in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = item if isinstance(item, int | float | str | bool) else str(item)
    return flat


def _summary(epoch: int, num_epochs: int, row: dict) -> str:
    """One plain line per epoch: reward, KL, clip fraction, time, memory."""
    parts = [
        f"epoch {epoch + 1}/{num_epochs}",
        f"reward {row['reward_mean']:.4g} ± {row['reward_std']:.3g}",
    ]
    if "approx_kl" in row:
        parts.append(f"kl {row['approx_kl']:.3g}")
    if "clipfrac" in row:
        parts.append(f"clip {row['clipfrac']:.3f}")
    parts += [
        f"{row['epoch_seconds']:.1f} s/epoch",
        f"{row['samples_per_second']:.2f} samples/s",
        f"peak mem {row['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    return "  ".join(parts)


def _metrics_before(path: Path, epoch: int) -> list[dict]:
    """The metrics.jsonl rows of epochs before `epoch` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if row.get("epoch", epoch) < epoch:
            rows.append(row)
    return rows


def train(
    config: Config,
    reward_fn=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Run DDPO with `config`; returns per-epoch metrics and where the LoRA was written.

    `reward_fn` overrides `config.reward.name` with a callable (images, prompts, metadata) ->
    (rewards, info). `resume` continues the run in `config.output_dir` from its latest
    checkpoint; `overwrite` replaces a previous run there (a new run refuses such a folder).
    `show_progress` False leaves only the one-line summary per epoch.
    """
    config.validate()
    prompts = load_prompts(config.prompts)
    output_dir = Path(config.output_dir)
    checkpoint = prepare_output(output_dir, resume, overwrite)
    accelerator = make_accelerator(config)
    device = accelerator.device
    reward = reward_fn or get_reward(config.reward.name)
    lora_dir = output_dir / "lora"
    metrics_file = output_dir / "metrics.jsonl"
    console = Console(soft_wrap=True)

    run = build_components(config, accelerator)
    if len(prompts) <= PRELOAD_PROMPTS:
        run.encoder.preload(prompts)
    pipe = run.pipe
    tracker = (
        PerPromptStatTracker(config.advantages.buffer_size, config.advantages.min_count)
        if config.advantages.per_prompt_stat_tracking
        else None
    )
    # each process draws its own prompts and noise; the update's shuffles need not agree
    generator = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index)
    first_epoch = 0
    if checkpoint is not None:
        first_epoch = _restore(checkpoint, run, tracker, generator, accelerator)
    result = TrainResult(output_dir=output_dir, lora_dir=lora_dir, pipeline=pipe)
    result.metrics = _metrics_before(metrics_file, first_epoch)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(config))
        with metrics_file.open("w") as f:  # a resumed run drops the rows it will redo
            f.writelines(json.dumps(row) + "\n" for row in result.metrics)
        if resume:
            where = f"epoch {first_epoch}" if checkpoint else "the start (no checkpoint yet)"
            console.print(f"resuming {output_dir} from {where}")
    if config.log_with:
        accelerator.init_trackers("logs", config=_tracker_config(config))
    metadata = lora_metadata(config)

    enabled = show_progress and accelerator.is_main_process and console.is_terminal
    with _progress(console, enabled) as progress:
        for epoch in range(first_epoch, config.num_epochs):
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            label = f"epoch {epoch + 1}/{config.num_epochs}"
            task = progress.add_task(f"{label} sampling", total=config.sample.num_batches_per_epoch)
            advance = functools.partial(progress.advance, task)

            # 1. rollout: images and their trajectories, from the current policy
            images, texts, trajectory = sample_epoch(
                run, prompts, config, generator, accelerator, advance
            )
            sampled_at = time.perf_counter()

            # 2-3. rewards and advantages over every process's samples; non-finite ones dropped
            progress.update(task, description=f"{label} rewarding", completed=0, total=1)
            raw, _info = reward(images, texts, [{} for _ in images])
            scored = score_epoch(raw, trajectory, prompts, tracker, config, accelerator)
            rewarded_at = time.perf_counter()
            if scored.dropped:
                warnings.warn(
                    f"epoch {epoch}: {scored.dropped} sample(s) had a non-finite reward or "
                    "trajectory and were dropped from the update",
                    stacklevel=2,
                )

            # 4. update
            total = _optimizer_steps(config, len(trajectory))
            progress.update(task, description=f"{label} training", completed=0, total=total)
            stats = update(
                accelerator,
                run.unet,
                run.optimizer,
                run.params,
                run.scheduler,
                sanitize(trajectory, scored.valid),
                scored.weights,
                scored.valid,
                config,
                generator,
                progress=advance,
            )
            progress.remove_task(task)

            # 5. log and save
            seconds = time.perf_counter() - start
            row = {
                "epoch": epoch,
                **reward_stats(scored.rewards),
                "dropped_samples": scored.dropped,
                **stats,
                "epoch_seconds": seconds,
                "sampling_seconds": sampled_at - start,
                "reward_seconds": rewarded_at - sampled_at,
                "samples_per_second": accelerator.num_processes * len(trajectory) / seconds,
                "peak_memory_bytes": _peak_memory(device),
            }
            result.metrics.append(row)
            accelerator.log(row, step=epoch)
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                save_samples(images, texts, raw, output_dir / "samples" / f"epoch_{epoch:04d}.png")
                console.print(_summary(epoch, config.num_epochs, row))
            if epoch + 1 == config.num_epochs or (epoch + 1) % config.save_every == 0:
                _save(epoch + 1, run, tracker, generator, accelerator, config, metadata, result)
            accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


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


def _restore(
    checkpoint: Path,
    run: Components,
    tracker: PerPromptStatTracker | None,
    generator: torch.Generator,
    accelerator: Accelerator,
) -> int:
    """Load a checkpoint into the run; returns the epoch to continue with."""
    state = load_checkpoint(checkpoint, unet=run.policy, optimizer=run.optimizer)
    if len(state.generator_states) != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} was written by {len(state.generator_states)} "
            f"process(es); resume it with the same number (this run has "
            f"{accelerator.num_processes})"
        )
    generator.set_state(state.generator_states[accelerator.process_index])
    torch.set_rng_state(state.torch_rng_state)
    if tracker is not None and state.tracker is not None:
        tracker.load_state_dict(state.tracker)
    return state.epoch


def _save(
    epochs_done: int,
    run: Components,
    tracker: PerPromptStatTracker | None,
    generator: torch.Generator,
    accelerator: Accelerator,
    config: Config,
    metadata: dict,
    result: TrainResult,
) -> None:
    """Write the checkpoint and the user-facing LoRA and model card (main process)."""
    # every process's generator state, so that a resumed run draws what this one would have
    states = accelerator.gather(generator.get_state()[None].to(accelerator.device)).cpu()
    if not accelerator.is_main_process:
        return
    save_checkpoint(
        result.output_dir,
        epochs_done,
        unet=run.policy,
        optimizer=run.optimizer,
        tracker_state=tracker.state_dict() if tracker is not None else None,
        generator_states=list(states),
        lora_metadata={**metadata, "epoch": epochs_done},
        keep=config.keep_checkpoints,
    )
    save_lora(run.policy, result.lora_dir, {**metadata, "epoch": epochs_done})
    write_model_card(result.output_dir, config, metadata, epochs_done, result.metrics)


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
- the full configuration is in `config.toml`, per-epoch metrics in `metrics.jsonl`,
  sample grids in `samples/`

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


def sample_epoch(
    run: Components,
    prompts: list[str],
    config: Config,
    generator: torch.Generator,
    accelerator: Accelerator,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list, list[str], Trajectory]:
    """`sample.num_batches_per_epoch` rollouts of uniformly drawn prompts, concatenated."""
    images, texts, parts = [], [], []
    for _ in range(config.sample.num_batches_per_epoch):
        ids = torch.randint(len(prompts), (config.sample.batch_size,), generator=generator)
        batch_texts = [prompts[i] for i in ids.tolist()]
        batch_images, trajectory = rollout(
            run.pipe,
            run.policy,
            run.encoder,
            batch_texts,
            ids,
            scheduler=run.scheduler,
            guidance_scale=config.sample.guidance_scale,
            eta=config.sample.eta,
            generator=generator,
            autocast=accelerator.autocast,
        )
        images += batch_images
        texts += batch_texts
        parts.append(trajectory)
        advance()
    return images, texts, Trajectory.cat(parts)


@dataclass
class Scored:
    """An epoch's rewards over all processes, and this process's share of the update."""

    rewards: torch.Tensor  # (N_all,) every process's finite rewards
    weights: torch.Tensor  # (B,) this process's advantages (or RWR weights); 0 where dropped
    valid: torch.Tensor  # (B,) bool, this process's samples that take part in the update
    dropped: int  # samples dropped over all processes


def score_epoch(
    raw_rewards,
    trajectory: Trajectory,
    prompts: list[str],
    tracker: PerPromptStatTracker | None,
    config: Config,
    accelerator: Accelerator,
) -> Scored:
    """Gather rewards and prompt ids from every process, drop non-finite samples, compute the
    advantages (or RWR weights) on what is left, and return this process's slice."""
    device = accelerator.device
    rewards = torch.as_tensor(np.asarray(raw_rewards, dtype=np.float64), device=device).float()
    all_rewards = accelerator.gather(rewards).cpu()
    all_ids = accelerator.gather(trajectory.prompt_ids).cpu()
    finite = torch.isfinite(all_rewards)
    finite &= accelerator.gather(trajectory_is_finite(trajectory)).cpu().bool()

    advantages = torch.zeros_like(all_rewards)
    kept = all_rewards[finite]
    if len(kept) and config.train.algorithm == "rwr":
        train = config.train
        advantages[finite] = rwr_weights(
            kept, train.rwr_weighting, train.rwr_temperature, train.rwr_sparse_quantile
        )
    elif len(kept):
        kept_prompts = [prompts[i] for i in all_ids[finite].tolist()]
        advantages[finite] = compute_advantages(
            kept, kept_prompts, tracker, config.train.adv_clip_max
        )
    n = len(trajectory)
    mine = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    return Scored(
        rewards=kept,
        weights=advantages[mine].to(device),
        valid=finite[mine].to(device),
        dropped=int((~finite).sum()),
    )


def reward_stats(rewards: torch.Tensor) -> dict[str, float]:
    """Mean, population std, min and max of an epoch's rewards (NaN when there are none)."""
    if len(rewards) == 0:
        return {f"reward_{k}": float("nan") for k in ("mean", "std", "min", "max")}
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "reward_min": float(rewards.min()),
        "reward_max": float(rewards.max()),
    }


def save_samples(images: list, texts: list[str], rewards, path: Path, limit: int = 16) -> None:
    """The first `limit` images of the epoch as a grid, prompt and reward under each."""
    values = np.asarray(rewards, dtype=np.float64)[:limit]
    captions = [f"{text}\nreward {value:.4g}" for text, value in zip(texts, values, strict=False)]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images[:limit], captions).save(path)


def _optimizer_steps(config: Config, num_samples: int) -> int:
    batches = math.ceil(num_samples / config.train.batch_size)
    per_step = (
        batches if config.train.algorithm == "ddpo-sf" else config.train.gradient_accumulation
    )
    return config.train.num_inner_epochs * math.ceil(batches / per_step)


def trajectory_is_finite(trajectory: Trajectory) -> torch.Tensor:
    """(B,) uint8 (gather-able over gloo): 1 where the sample's latents and log-probs are finite."""
    finite = (
        torch.isfinite(trajectory.latents).flatten(1).all(1)
        & torch.isfinite(trajectory.next_latents).flatten(1).all(1)
        & torch.isfinite(trajectory.log_probs).all(1)
    )
    return finite.to(torch.uint8)


def sanitize(trajectory: Trajectory, valid: torch.Tensor) -> Trajectory:
    """Zero the tensors of dropped samples so they stay finite; their weight is 0 in the loss.

    Dropped samples are masked rather than removed so that every process runs the same number
    of backward passes (DDP needs that); a weight of 0 makes their gradient exactly 0.
    """
    if bool(valid.all()):
        return trajectory
    keep = valid.view(-1, 1, 1, 1, 1)
    return Trajectory(
        latents=torch.where(keep, trajectory.latents, 0.0),
        next_latents=torch.where(keep, trajectory.next_latents, 0.0),
        timesteps=trajectory.timesteps,
        log_probs=torch.where(valid[:, None], trajectory.log_probs, 0.0),
        prompt_embeds=trajectory.prompt_embeds,
        negative_embeds=trajectory.negative_embeds,
        prompt_ids=trajectory.prompt_ids,
    )

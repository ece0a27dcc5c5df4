"""The DDPO epoch loop: rollout -> rewards -> advantages -> update -> log -> checkpoint.

Run it with `ddpo_lite.train(config)` (or `ddpo-lite train --preset NAME`). Under
`accelerate launch` / `torchrun` every process samples its own images, rewards and prompt ids
are gathered so that advantages use every process's samples, and LoRA gradients are averaged by
DDP on the last backward of each optimizer step.

The update itself is in `update.py`, the output folder's files in `run_files.py`, checkpoints in
`checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ddpo_lite.advantages import (
    PerPromptStatTracker,
    compute_advantages,
    group_advantages,
    group_normalised_advantages,
)
from ddpo_lite.algorithms import rwr_weights
from ddpo_lite.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    DamagedCheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ddpo_lite.config import TRAJECTORY_FREE, Config, ConfigError, to_dict, to_toml
from ddpo_lite.drift import adapters_disabled, diversity, trajectory_kl
from ddpo_lite.evaluate import (
    compare,
    eval_metrics,
    evaluate,
    load_groups,
    save_before_after_grid,
    save_eval_grid,
)
from ddpo_lite.families import family_of, sequence_length_problem, set_flow_timesteps
from ddpo_lite.grid import make_grid
from ddpo_lite.guard import Guard
from ddpo_lite.models import load_pipeline
from ddpo_lite.models.lora import attach_lora, save_lora
from ddpo_lite.models.memory import apply_memory_settings, compile_blocks
from ddpo_lite.policy import Policy
from ddpo_lite.reward_worker import RewardWorker
from ddpo_lite.rewards.compose import CheckedReward, RewardError, build_reward
from ddpo_lite.run_files import (
    clean_leftovers,
    epoch_summary,
    lora_metadata,
    metrics_before,
    prepare_output,
    refresh_lora,
    resumed_config,
    write_model_card,
)
from ddpo_lite.samplers.ddim import DDIMSampler
from ddpo_lite.samplers.dpm import DPMSolverSampler
from ddpo_lite.samplers.flow_sde import FlowSDESampler
from ddpo_lite.sampling import PromptEncoder, Trajectory, rollout
from ddpo_lite.update import optimizer_steps, update


@dataclass
class TrainResult:
    """What a run returns: its per-epoch metrics and where it wrote things."""

    metrics: list[dict] = field(default_factory=list)
    output_dir: Path = Path(".")
    lora_dir: Path = Path(".")
    pipeline: object = None
    """The pipeline with the trained LoRA still attached to its UNet, ready to sample."""
    stop_reason: str | None = None
    """Why a guard rule stopped the run early (None: it ran all its epochs)."""
    stopped_epoch: int | None = None
    """The epoch (1-based, as in metrics.jsonl) after which a guard rule stopped the run."""


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


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, train) -> list[str]:
    """Set the config's learning rate, betas, weight decay and epsilon on every param group (a
    restored optimizer carries the checkpoint's: `--resume --set train.learning_rate=...` must
    apply). Returns 'name old -> new' for each value that changed; none on a plain resume."""
    wanted = {
        "lr": train.learning_rate,
        "betas": (train.adam_beta1, train.adam_beta2),
        "weight_decay": train.adam_weight_decay,
        "eps": train.adam_epsilon,
    }
    changed = []
    for group in optimizer.param_groups:
        for key, value in wanted.items():
            old = tuple(group[key]) if isinstance(group.get(key), list | tuple) else group.get(key)
            if old != value:
                if f"{key} {old} -> {value}" not in changed:
                    changed.append(f"{key} {old} -> {value}")
            group[key] = value
    return changed


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


def make_sampler(
    pipe, family, config: Config, resolution: int, device, num_steps: int | None = None
):
    """The family's sampler with the config's steps (or `num_steps`) and noise: DDIM with eta
    for the UNets, Flow-GRPO's SDE (or CPS) on the pipeline's own FlowMatch sigmas for the flow
    models."""
    steps = num_steps or config.sample.num_steps
    if family.sampler == "ddim" and config.sample.sampler == "dpm-solver":
        scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        return DPMSolverSampler(scheduler)
    if family.sampler == "ddim":
        return DDIMSampler(make_scheduler(pipe, steps, device), config.sample.eta)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    set_flow_timesteps(pipe, scheduler, steps, resolution, device)
    scheduler.sigmas = scheduler.sigmas.to(device)  # diffusers keeps them on the CPU
    return FlowSDESampler(scheduler, config.sample.eta, config.sample.flow_sampler)


def check_family_settings(pipe, family, config: Config, resolution: int) -> None:
    """What this family cannot do with these settings: one line at setup."""
    multiple = family.resolution_multiple(pipe)
    if resolution % multiple:
        raise ConfigError(
            f"sample.resolution = {resolution} is not a multiple of {multiple} (the {family.name} "
            f"model's VAE factor x patch size); use e.g. {resolution // multiple * multiple or multiple}"
        )
    if family.sampler == "flow" and config.sample.sampler != "ddim":
        raise ConfigError(
            f"sample.sampler = {config.sample.sampler!r} is a UNet sampler; the {family.name} "
            "model samples its flow (sample.flow_sampler, and sample.eta = 0 for the ODE)"
        )
    if family.sampler == "ddim" and config.sample.flow_sampler != "sde":
        raise ConfigError(
            f"sample.flow_sampler = {config.sample.flow_sampler!r} applies to the flow models "
            f"(sd3, flux); the {family.name} model samples with DDIM (sample.eta sets its noise)"
        )
    if not family.has_negative_prompt and config.prompts.negative_prompt:
        raise ConfigError(
            f"prompts.negative_prompt is set but the {family.name} model has no classifier-free "
            "guidance with a negative prompt; leave it empty"
        )
    if problem := sequence_length_problem(pipe, config.model.max_sequence_length):
        raise ConfigError(problem)
    check = getattr(family, "check_settings", None)  # a family's own limits (flux2's distilled)
    if check is not None and (problem := check(pipe, config)):
        raise ConfigError(problem)


def make_policy(pipe, config: Config, device, autocast, denoiser=None) -> Policy:
    """The policy a config samples with: its family, sampler, cached prompt encoder."""
    family = family_of(pipe)
    resolution = config.sample.resolution or family.native_resolution(pipe)
    check_family_settings(pipe, family, config, resolution)
    encoder = PromptEncoder(
        pipe,
        device,
        config.prompts.negative_prompt,
        config.memory.offload_text_encoder,
        family=family,
        resolution=resolution,
        on_cpu=config.memory.encode_on_cpu,
        max_sequence_length=config.model.max_sequence_length,
    )
    return Policy(
        family=family,
        pipe=pipe,
        denoiser=denoiser if denoiser is not None else family.denoiser(pipe),
        sampler=make_sampler(pipe, family, config, resolution, device),
        encoder=encoder,
        guidance_scale=config.sample.guidance_scale,
        autocast=autocast,
        resolution=resolution,
        offload_vae=config.memory.offload_vae,
    )


def eval_policy(policy: Policy, config: Config, device) -> Policy:
    """The policy the held-out evaluation samples with: the training policy (same denoiser,
    prompt cache), with a sampler of eval.num_steps steps when that differs."""
    steps = config.eval.num_steps
    if not steps or steps == config.sample.num_steps:
        return policy
    sampler = make_sampler(policy.pipe, policy.family, config, policy.resolution, device, steps)
    return dataclasses.replace(policy, sampler=sampler)


@dataclass
class Components:
    """The pieces of a run, set up from a config: the policy (sampling with the plain denoiser)
    and the same denoiser DDP-wrapped for the update (one set of weights), the optimizer."""

    pipe: object
    model: torch.nn.Module
    """The denoiser as the optimizer sees it (DDP-wrapped under several processes)."""
    policy: Policy
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The LoRA'd denoiser, unwrapped (what is saved and loaded)."""
        return self.policy.denoiser


def build_components(config: Config, accelerator: Accelerator, pipe=None) -> Components:
    """Load the pipeline, apply the memory levers, attach the LoRA, prepare for accelerate.
    `pipe`: one already loaded instead (the bench's random-weight published architectures,
    load-time levers applied)."""
    device = accelerator.device
    if pipe is None:
        with accelerator.main_process_first():  # one process writes caches, the others read
            pipe = load_pipeline(
                config.model.name,
                seed=config.model.seed,
                family=config.model.family,
                memory=config.memory,  # load-time levers: quantize_base (nf4 / int8), drop_t5
            )
    apply_memory_settings(pipe, config.memory, device)
    denoiser = family_of(pipe).denoiser(pipe)
    torch.manual_seed(config.seed)  # the LoRA's initial A matrices (B starts at zero)
    params = attach_lora(denoiser, config.lora.rank, config.lora.alpha, config.lora.target_modules)
    if config.memory.compile_blocks:  # after the LoRA: its layers are inside the compiled blocks
        compile_blocks(denoiser, getattr(family_of(pipe), "repeated_blocks", ()))
    optimizer = make_optimizer(params, config.train, config.memory.use_8bit_adam, device)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    denoiser.eval()
    return Components(
        pipe=pipe,
        model=model,
        # the same module, unwrapped: sampling needs no gradient sync
        policy=make_policy(pipe, config, device, accelerator.autocast),
        optimizer=optimizer,
        params=params,
    )


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def json_line(row: dict) -> str:
    """One strict-JSON line: a non-finite number (an epoch with no reward, say) is null."""

    def finite(value):
        return value if not isinstance(value, float) or math.isfinite(value) else None

    return json.dumps({key: finite(value) for key, value in row.items()}, allow_nan=False) + "\n"


def _peak_memory(device: torch.device) -> int:
    """Peak accelerator memory allocated (bytes); on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def progress_bars(console: Console, enabled: bool) -> Progress:
    """The bars a long job shows (a description, done / total, elapsed, eta); gone when done."""
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


def _tracker_config(config: Config) -> dict[str, int | float | str | bool]:
    """The config flattened to scalars, as TensorBoard's hparams want them."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in to_dict(config).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, item in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = item if isinstance(item, int | float | str | bool) else str(item)
    return flat


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
    eval_groups = (
        load_groups(config.eval.prompts, config.eval.max_prompts) if config.eval.every else {}
    )
    output_dir = Path(config.output_dir)
    checkpoint = prepare_output(output_dir, resume, overwrite)
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        clean_leftovers(output_dir, resume)  # a crash's temporary folders, a half-done LoRA swap
    console = Console(soft_wrap=True, markup=False)  # paths and reasons print as text
    enabled = show_progress and accelerator.is_main_process and console.is_terminal
    loading = f"loading the model {config.model.name!r} and the reward"
    try:
        with console.status(loading) if enabled else contextlib.nullcontext():
            reward = (
                CheckedReward(reward_fn, getattr(reward_fn, "__name__", "reward_fn"))
                if reward_fn is not None
                else build_reward(
                    config.reward,
                    device=str(accelerator.device),
                    offload=config.memory.offload_reward,
                )
            )
            loop = TrainingLoop(
                config, accelerator, reward, prompts, eval_groups, output_dir, console
            )
    except torch.OutOfMemoryError as err:
        message = out_of_memory_message("loading the models", 0, config, accelerator.device)
        raise OutOfMemoryStop(message) from err
    first_epoch = loop.restore_intact(checkpoint) if checkpoint is not None else 0
    if first_epoch and accelerator.is_main_process:  # lora/ older than the checkpoint: its own
        refresh_lora(output_dir, checkpoint_dir(output_dir, first_epoch))
    loop.start(first_epoch, resumed=resume, from_checkpoint=checkpoint is not None)
    # the reward runs in its own thread (overlapping the next batch's sampling with
    # reward.overlap), so that every wait on it is bounded and Ctrl-C stops the run
    executor = RewardWorker()
    try:
        with progress_bars(loop.console, enabled) as progress:
            loop.progress = progress
            if first_epoch == 0 and eval_groups:
                loop.evaluate(0)  # the base model: the baseline every later evaluation beats
            for epoch in range(first_epoch, config.num_epochs):
                row = loop.epoch(epoch, progress, executor)
                stop = loop.stop_reason(row)
                last = epoch + 1 == config.num_epochs or stop is not None
                if last or (epoch + 1) % config.save_every == 0:
                    loop.save(epoch + 1)
                accelerator.wait_for_everyone()
                if stop is not None:
                    loop.stopped(epoch, stop)
                    break
    except torch.OutOfMemoryError as err:
        epoch = len(loop.result.metrics) + 1
        message = out_of_memory_message(loop.phase, epoch, config, accelerator.device)
        raise OutOfMemoryStop(message) from err
    except RewardError as err:
        raise RewardError(_stopped_message(err, loop.result)) from err
    except OSError as err:  # metrics.jsonl, sample grids, best_lora/: disk full, quota, ...
        what = f"writing {str(err.filename)!r}" if err.filename else "writing the run's files"
        raise CheckpointWriteError(_write_failed(what, err, loop.result)) from err
    finally:
        executor.shutdown(cancel_futures=True)  # never waits for a reward that hangs
        if accelerator.num_processes > 1:
            drop_ddp_wrapper(loop, accelerator)
        accelerator.end_training()
    return loop.result


def drop_ddp_wrapper(loop: TrainingLoop, accelerator: Accelerator) -> None:
    """Let the DDP-wrapped denoiser die while the process group still lives (before
    `end_training` destroys it).

    A DDP model's reducer holds the process group. Where the model is its last holder, the gloo
    group is destroyed inside the reducer's destructor with the GIL held, while a gloo thread may
    still need the GIL to free the tensors of a finished collective: the process hangs (seen in
    CI: one rank of a two-process CPU run stuck in ~ProcessGroupGloo after its run was done).
    Dropped here, the group's last holder is its Python object, whose destructor releases the
    GIL. On an error, the finished frames of the exception's traceback hold the model as a local:
    they are cleared (the traceback still prints; only pdb's locals are lost)."""
    loop.run = dataclasses.replace(loop.run, model=loop.run.denoiser)
    accelerator.free_memory()  # its list of prepared models holds the wrapper too
    error = sys.exc_info()[1]
    seen = set()
    while error is not None and id(error) not in seen:  # the chain of causes and contexts
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()  # a module's hooks make reference cycles


class TrainingLoop:
    """A run's state and its stages: one epoch, an evaluation, a checkpoint, a stop."""

    def __init__(
        self,
        config: Config,
        accelerator: Accelerator,
        reward,
        prompts: list[str],
        eval_groups: dict[str, list[str]],
        output_dir: Path,
        console: Console | None = None,
    ):
        self.config = config
        self.accelerator = accelerator
        self.reward = reward
        self.prompts = prompts
        self.eval_groups = eval_groups
        self.output_dir = output_dir
        self.metrics_file = output_dir / "metrics.jsonl"
        self.console = console or Console(soft_wrap=True, markup=False)  # text prints as text
        self.progress: Progress | None = None  # train() sets it: evaluations show a bar too
        self.phase = "setting up"  # what the run is doing: an out-of-memory stop names it
        self.run = build_components(config, accelerator)
        self.eval_policy = eval_policy(self.run.policy, config, accelerator.device)
        if len(prompts) <= PRELOAD_PROMPTS:
            self.run.policy.encoder.preload(prompts, config.memory.encode_batch_size)
        self.tracker = (
            PerPromptStatTracker(config.advantages.buffer_size, config.advantages.min_count)
            if config.advantages.per_prompt_stat_tracking
            else None
        )
        # each process draws its own prompts and noise; the update's shuffles need not agree
        seed = config.seed * 1000 + accelerator.process_index
        self.generator = torch.Generator().manual_seed(seed)
        self.guard = Guard(config.guard)
        self.baseline_results = None  # the base model's evaluation, for before_after.png
        self.pending_eval: dict[str, float] = {}
        self.metadata = lora_metadata(config, getattr(reward, "name", None))
        self.metadata["family"] = self.run.policy.family.name
        self.metadata["resolution"] = self.run.policy.resolution
        tokens = self.run.policy.encoder.max_sequence_length  # -1: CLIP's 77 only (sd1, sdxl)
        if tokens >= 0:  # a flow model's text tokens as trained: `sample` and `eval` use them
            self.metadata["max_sequence_length"] = tokens
        self.result = TrainResult(
            output_dir=output_dir, lora_dir=output_dir / "lora", pipeline=self.run.pipe
        )

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def restore_intact(self, newest: Path) -> int:
        """Restore the newest intact checkpoint, from `newest` back: one that is damaged
        (truncated, altered, non-finite) or does not fit the run's LoRA and optimizer exactly is
        said aloud and the previous one tried; returns the epoch. When none fits and none was
        damaged (the config changed: another rank, other targets), the newest's own error."""
        found = list_checkpoints(self.output_dir)  # oldest first
        candidates = found[: found.index(newest) + 1 if newest in found else len(found)][::-1]
        failed: list[CheckpointError] = []
        for folder in candidates:
            try:
                epoch = self.restore(folder)
            except CheckpointError as err:
                if not isinstance(err, DamagedCheckpointError) and len(candidates) == 1:
                    raise
                warnings.warn(f"{err}; trying the checkpoint before it", stacklevel=2)
                failed.append(err)
                continue
            if failed and self.is_main:
                self.console.print(
                    f"resuming from {folder.name}: the newer checkpoint(s) are damaged "
                    f"({len(failed)}; they stay in place, the run writes over them)"
                )
            return epoch
        if not any(isinstance(err, DamagedCheckpointError) for err in failed):
            raise failed[0]  # nothing is damaged: every checkpoint disagrees with this config
        raise CheckpointError(
            f"no intact checkpoint in {str(self.output_dir / 'checkpoints')!r} ({failed[0]}"
            f"{f' and {len(failed) - 1} more' if len(failed) > 1 else ''}); start over with "
            "--overwrite"
        )

    def restore(self, checkpoint: Path) -> int:
        """Load a checkpoint into the run; returns the epoch to continue with."""
        state = load_checkpoint(checkpoint, unet=self.run.denoiser, optimizer=self.run.optimizer)
        accelerator = self.accelerator
        if len(state.generator_states) != accelerator.num_processes:
            raise ConfigError(
                f"checkpoint {str(checkpoint)!r} was written by {len(state.generator_states)} "
                f"process(es); resume it with the same number (this run has "
                f"{accelerator.num_processes})"
            )
        changed = apply_optimizer_settings(self.run.optimizer, self.config.train)
        if changed and self.is_main:
            self.console.print(f"resumed with new optimizer settings: {', '.join(changed)}")
        self.generator.set_state(state.generator_states[accelerator.process_index])
        torch.set_rng_state(state.torch_rng_state)
        if self.tracker is not None and state.tracker is not None:
            self.tracker.load_state_dict(state.tracker)
        self.guard.load_state_dict(state.extra.get("guard", {}))
        return state.epoch

    def start(self, first_epoch: int, resumed: bool, from_checkpoint: bool) -> None:
        """Write config.toml, trim metrics.jsonl to the epochs kept, start the trackers."""
        self.result.metrics = metrics_before(self.metrics_file, first_epoch)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_file, text, changed = self.output_dir / "config.toml", to_toml(self.config), []
            if resumed and config_file.is_file():  # what the resume changed, said and kept
                text, changed = resumed_config(config_file.read_text(), text, first_epoch)
            config_file.write_text(text)
            with self.metrics_file.open("w") as f:  # a resumed run drops the rows it redoes
                f.writelines(json_line(row) for row in self.result.metrics)
            if resumed:
                where = f"epoch {first_epoch}" if from_checkpoint else "the start (no checkpoint)"
                self.console.print(f"resuming {self.output_dir} from {where}")
            if changed:
                self.console.print(f"resumed with changed settings: {', '.join(changed)}")
        if self.config.log_with:
            self.accelerator.init_trackers("logs", config=_tracker_config(self.config))

    def epoch(self, epoch: int, progress: Progress, executor) -> dict:
        """Sample, reward, update, measure drift, evaluate, log; returns the metrics row."""
        config, run, accelerator = self.config, self.run, self.accelerator
        device = accelerator.device
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        label = f"epoch {epoch + 1}/{config.num_epochs}"
        task = progress.add_task(f"{label} sampling", total=config.sample.num_batches_per_epoch)
        advance = functools.partial(progress.advance, task)

        # 1-2. rollout from the current policy; each batch scored while the next samples
        self.phase = "sampling and scoring"
        samples = sample_epoch(
            run, self.prompts, config, self.generator, accelerator, self.reward, advance, executor
        )
        trajectory = samples.trajectory
        sampled_at = time.perf_counter()

        # 3. advantages over every process's samples; non-finite ones dropped
        scored = score_epoch(
            samples.rewards, trajectory, self.prompts, self.tracker, config, accelerator
        )
        if len(scored.rewards) == 0:  # nothing to learn from: never step the optimizer on it
            raise NoSamplesError(
                f"epoch {epoch + 1}: all {scored.dropped} samples had a non-finite reward or "
                f"trajectory ({scored.nonfinite_rewards} non-finite rewards), so there is nothing "
                "to train on"
            )
        if scored.dropped:
            warnings.warn(
                f"epoch {epoch + 1}: {scored.dropped} sample(s) had a non-finite reward or "
                "trajectory and were dropped from the update",
                stacklevel=2,
            )
        self.phase = "measuring the KL to the base"
        drift = self.drift(samples, epoch)

        # 4. update
        self.phase = "training"
        total = optimizer_steps(config, len(trajectory))
        progress.update(task, description=f"{label} training", completed=0, total=total)
        stats = update(
            accelerator,
            run.policy,
            run.model,
            run.optimizer,
            run.params,
            sanitize(trajectory, scored.valid),
            scored.weights,
            scored.valid,
            config,
            self.generator,
            progress=advance,
        )
        progress.remove_task(task)
        seconds = time.perf_counter() - start

        # 5. evaluate, log
        evaluated = {}
        last = epoch + 1 == config.num_epochs  # the final LoRA is always evaluated
        if config.eval.every and ((epoch + 1) % config.eval.every == 0 or last):
            evaluated = self.evaluate(epoch + 1)
        row = {
            "epoch": epoch + 1,  # 1-based, as everywhere: the console, TensorBoard, samples/
            **reward_stats(scored.rewards),
            "dropped_samples": scored.dropped,
            **stats,
            **drift,
            **evaluated,
            "epoch_seconds": seconds,
            "sampling_seconds": sampled_at - start,
            "reward_wait_seconds": samples.reward_wait_seconds,
            "samples_per_second": accelerator.num_processes * len(trajectory) / seconds,
            "peak_memory_bytes": _peak_memory(device),
        }
        self.result.metrics.append(row)
        accelerator.log(row, step=epoch + 1)
        if self.is_main:
            with self.metrics_file.open("a") as f:
                f.write(json_line(row))
            grid = self.output_dir / "samples" / f"epoch_{epoch + 1:04d}.png"
            save_samples(samples.images, samples.prompts, samples.rewards, grid)
            self.console.print(epoch_summary(epoch, config.num_epochs, row))
        return row

    def drift(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        """Sample diversity; on the epochs `measures_kl` picks, the KL from the base model along
        this epoch's first trajectories and the seconds it took."""
        config = self.config
        row = {"diversity": diversity(samples.images, samples.prompts)}
        if measures_kl(config, epoch):
            start = time.perf_counter()
            kl = trajectory_kl(self.run.policy, samples.trajectory, config.guard.kl_samples)
            row["kl_to_base"] = float(kl.mean())
            row["kl_seconds"] = time.perf_counter() - start
        return row

    def evaluate(self, epochs_done: int) -> dict[str, float]:
        """Held-out evaluation (main process): metrics, grid, best LoRA."""
        row: dict[str, float] = {}
        if self.is_main:
            self.phase = "the held-out evaluation"
            config, run = self.config, self.run
            progress = self.progress or progress_bars(self.console, False)
            recompute = self.baseline_results is None and epochs_done
            prompts = sum(len(group) for group in self.eval_groups.values())
            what = "base model" if epochs_done == 0 else f"after epoch {epochs_done}"
            task = progress.add_task(
                f"evaluation ({what})", total=prompts * (2 if recompute else 1)
            )
            evaluate_policy = functools.partial(
                evaluate,
                self.eval_policy,
                self.eval_groups,
                self.reward,
                num_per_prompt=config.eval.num_per_prompt,
                seed=config.eval.seed,
                advance=functools.partial(progress.advance, task),
            )
            if recompute:  # resumed: the base, LoRA off
                with adapters_disabled(run.denoiser):
                    self.baseline_results = evaluate_policy()
            results = evaluate_policy()
            progress.remove_task(task)
            row = eval_metrics(results)
            if self.baseline_results is not None:  # paired with the base: the same noise
                for pair in compare(self.baseline_results, results):
                    row[f"eval_{pair['group']}_gain"] = pair["difference"]
                    row[f"eval_{pair['group']}_gain_se"] = pair["standard_error"]
            samples = self.output_dir / "samples"
            save_eval_grid(results, samples / f"eval_epoch_{epochs_done:04d}.png")
            if self.guard.observe_eval(row["eval_reward_mean"], epochs_done) and epochs_done:
                meta = {**self.metadata, "epoch": epochs_done}
                meta["eval_reward_mean"] = row["eval_reward_mean"]
                save_lora(run.denoiser, self.output_dir / "best_lora", meta, run.policy.family)
            if self.baseline_results is not None:  # base | this epoch, same prompts and noise
                path = samples / "before_after.png"
                save_before_after_grid(self.baseline_results, results, path, epochs_done)
            if epochs_done == 0:
                self.baseline_results = results
                (self.output_dir / "eval_baseline.json").write_text(json_line(row))
                self.console.print(
                    f"baseline evaluation (base model): reward {row['eval_reward_mean']:.4g}"
                )
        return row

    def stop_reason(self, row: dict) -> str | None:
        """The guard's verdict on the main process, the same on every process."""
        reason = [self.guard.check(row) if self.is_main else None]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(reason, from_process=0)
        return reason[0]

    def stopped(self, epoch: int, reason: str) -> None:
        """Record and say why the run stopped early."""
        self.result.stop_reason = reason
        self.result.stopped_epoch = epoch + 1
        if self.is_main:
            best = (
                f"; best evaluation {self.guard.best_eval:.4g} after epoch "
                f"{self.guard.best_epoch} (best_lora/)"
                if self.guard.best_epoch > 0
                else ""
            )
            self.console.print(f"stopped after epoch {epoch + 1} by {reason}{best}")
            with (self.output_dir / "stopped.json").open("w") as f:
                json.dump({"epoch": epoch + 1, "reason": reason, **self.guard.state_dict()}, f)

    def save(self, epochs_done: int) -> None:
        """Checkpoint, user-facing LoRA and model card (every process joins the gather)."""
        run, accelerator = self.run, self.accelerator
        self.phase = "saving the checkpoint"
        # every process's generator state, so that a resumed run draws what this one would have
        states = accelerator.gather(self.generator.get_state()[None].to(accelerator.device))
        if not self.is_main:
            return
        metadata = {**self.metadata, "epoch": epochs_done}
        what = f"the checkpoint of epoch {epochs_done}"
        try:  # each is written aside and renamed into place: a failure leaves the last intact
            save_checkpoint(
                self.output_dir,
                epochs_done,
                unet=run.denoiser,
                optimizer=run.optimizer,
                tracker_state=self.tracker.state_dict() if self.tracker is not None else None,
                generator_states=list(states.cpu()),
                lora_metadata=metadata,
                keep=self.config.keep_checkpoints,
                extra={"guard": self.guard.state_dict()},
                family=run.policy.family,
            )
            what = f"the LoRA of epoch {epochs_done} ({self.result.lora_dir.name}/)"
            save_lora(run.denoiser, self.result.lora_dir, metadata, run.policy.family)
            what = "the model card (README.md)"
            write_model_card(
                self.output_dir, self.config, self.metadata, epochs_done, self.result.metrics
            )
        except OSError as err:
            raise CheckpointWriteError(_write_failed(f"writing {what}", err, self.result)) from err


class NoSamplesError(RewardError):
    """Every sample of an epoch was dropped: the run stops instead of training on nothing."""


class OutOfMemoryStop(RuntimeError):
    """The accelerator ran out of memory: the run stopped, its last checkpoint intact."""


#: Per phase of a run, the levers that lower its memory, cheapest first (as `--vram` orders them).
PHASE_LEVERS = {
    "loading the models": (
        "half_base", "offload_text_encoder", "offload_vae", "encode_on_cpu", "quantize",
    ),
    "sampling and scoring": (
        "attention", "offload_vae", "overlap", "offload_reward", "vae_slicing",
        "offload_trajectory", "quantize",
    ),
    "measuring the KL to the base": ("attention", "offload_vae", "offload_trajectory", "quantize"),
    "training": (
        "attention", "offload_vae", "checkpointing", "micro_batch", "chunk",
        "offload_trajectory", "quantize",
    ),
    "the held-out evaluation": (
        "attention", "offload_vae", "offload_reward", "vae_slicing", "quantize",
    ),
}  # fmt: skip


def _leaner_settings(config: Config, phase: str) -> list[str]:
    """The memory levers that lower `phase`'s memory and this config has off, cheapest first
    (every lever for another phase)."""
    memory, train = config.memory, config.train
    levers = {  # name: (off in this config, the setting that turns it on)
        "half_base": (
            not memory.half_base and memory.mixed_precision != "no",
            "memory.half_base=true",
        ),
        "offload_text_encoder": (
            not memory.offload_text_encoder,
            "memory.offload_text_encoder=true",
        ),
        "encode_on_cpu": (not memory.encode_on_cpu, "memory.encode_on_cpu=true"),
        "attention": (memory.attention == "math", "memory.attention='sdpa'"),
        "checkpointing": (not memory.gradient_checkpointing, "memory.gradient_checkpointing=true"),
        "micro_batch": (
            train.micro_batch_size != 1 and train.batch_size > 1,
            "train.micro_batch_size=1",
        ),
        "chunk": (train.timestep_chunk != 1, "train.timestep_chunk=1"),
        "overlap": (config.reward.overlap, "reward.overlap=false"),
        "offload_reward": (not memory.offload_reward, "memory.offload_reward=true"),
        "offload_vae": (not memory.offload_vae, "memory.offload_vae=true"),
        "vae_slicing": (not memory.vae_slicing, "memory.vae_slicing=true"),
        "offload_trajectory": (not memory.offload_trajectory, "memory.offload_trajectory=true"),
        "quantize": (memory.quantize_base == "none", "memory.quantize_base='nf4'"),
    }
    names = PHASE_LEVERS.get(phase, tuple(levers))
    return [levers[name][1] for name in names if levers[name][0]]


def out_of_memory_message(phase: str, epoch: int, config: Config, device: torch.device) -> str:
    """Where the run ran out of memory, what the card held, and how to continue with less."""
    output_dir = Path(config.output_dir)
    last = latest_checkpoint(output_dir)
    where = f"in epoch {epoch} ({phase})" if epoch else f"while {phase}"
    text = f"out of {'GPU memory' if device.type == 'cuda' else 'memory'} {where}"
    budget = ""
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        reserved = torch.cuda.memory_reserved(device)
        unused = reserved - torch.cuda.memory_allocated(device)
        text += (
            f": the card has {total / 2**30:.1f} GiB, PyTorch held up to "
            f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB"
        )
        if unused > 0.1 * total:  # fragmentation: expandable segments give it back
            text += (
                f" ({unused / 2**30:.1f} GiB of it reserved but free: "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may be enough)"
            )
        from ddpo_lite.bench import suggested_vram

        vram = suggested_vram(total)
        budget = f" --vram {vram}"
    if last is not None:
        text += f"; the run stopped (the last checkpoint, {last.name}, is intact). Continue it "
        text += f"with less memory: `ddpo-lite train --resume {output_dir}{budget}`"
    else:
        text += "; the run stopped before its first checkpoint. Start it again with less "
        text += f"memory: the same command with `--overwrite{budget}`"
    if budget:
        text += f" (--vram picks the memory levers from the estimate; {vram} GB leaves room)"
    levers = _leaner_settings(config, phase)
    if levers:
        text += f", or --set one of {', '.join(levers[:4])}"
    return text + " (`ddpo-lite bench --estimate` shows where the memory goes)"


def _stopped_message(err: RewardError, result: TrainResult) -> str:
    """The reward's error, where the run stopped, and how to continue it."""
    done = len(result.metrics)
    last = latest_checkpoint(result.output_dir)
    where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
    return (
        f"{err}; the run stopped in epoch {done + 1} ({where}); fix the reward and continue "
        f"with `ddpo-lite train --resume {result.output_dir}`"
    )


def _write_failed(what: str, err: OSError, result: TrainResult) -> str:
    """What could not be written and why (disk full...), and how to continue."""
    last = latest_checkpoint(result.output_dir)
    kept = f"the last checkpoint, {last.name}, is intact" if last else "no checkpoint was written"
    return (
        f"{what} failed: {err.strerror or err}; the run stopped ({kept}); free some space (or fix "
        f"the folder) and continue with `ddpo-lite train --resume {result.output_dir}`"
    )


@dataclass
class EpochSamples:
    """One epoch's rollouts on this process, with their rewards in sampling order."""

    images: list
    prompts: list[str]
    trajectory: Trajectory
    rewards: np.ndarray
    reward_wait_seconds: float
    """Time spent waiting for rewards after the last batch was sampled."""


def sample_epoch(
    run: Components,
    prompts: list[str],
    config: Config,
    generator: torch.Generator,
    accelerator: Accelerator,
    reward,
    advance: Callable[[], None] = lambda: None,
    executor: RewardWorker | ThreadPoolExecutor | None = None,
) -> EpochSamples:
    """`sample.num_batches_per_epoch` rollouts of uniformly drawn prompts, each batch scored by
    `reward`. With an `executor` and `reward.overlap`, batch k is scored in its worker while
    batch k+1 is sampled (as the paper's implementation does); rewards are collected in
    submission order, so each lands with its own samples. Each wait for a batch's rewards is
    bounded by `reward.local_timeout` (in-process rewards; a server's by `reward.timeout`)."""
    images, texts, parts, pending = [], [], [], []
    chain = None  # the epoch's chains, filled batch by batch: no end-of-epoch copy
    num_batches, batch_size = config.sample.num_batches_per_epoch, config.sample.batch_size
    for b in range(num_batches):
        group = config.sample.group_size
        ids = torch.randint(len(prompts), (batch_size // group,), generator=generator)
        ids = ids.repeat_interleave(group)
        batch_texts = [prompts[i] for i in ids.tolist()]
        record = config.train.algorithm not in TRAJECTORY_FREE  # NFT/AWM: final latents only
        batch_images, trajectory = rollout(
            run.policy,
            batch_texts,
            ids,
            generator,
            group,
            record,
            window=sde_window(config.sample, generator),
            shared_noise=config.sample.same_initial_noise,
        )
        metadata = [{} for _ in batch_images]
        if executor is not None:
            pending.append(executor.submit(reward, batch_images, batch_texts, metadata))
            if not config.reward.overlap:  # scored before the next batch samples
                pending[-1] = _reward_result(pending[-1], reward, config)
        else:
            pending.append(reward(batch_images, batch_texts, metadata))
        if chain is None:
            shape = (num_batches * batch_size, *trajectory.chain.shape[1:])
            chain = _chain_buffer(trajectory.chain, shape, config.memory.offload_trajectory)
        chain[b * batch_size : (b + 1) * batch_size] = trajectory.chain
        trajectory.chain = trajectory.chain[:0]  # release this batch's copy
        images += batch_images
        texts += batch_texts
        parts.append(trajectory)
        advance()
    waited_from = time.perf_counter()
    scores = [_reward_result(item, reward, config) for item in pending]
    wait = time.perf_counter() - waited_from
    rewards = np.concatenate([values for values, _ in scores])
    return EpochSamples(images, texts, Trajectory.cat(parts, chain), rewards, wait)


def _chain_buffer(like: torch.Tensor, shape: tuple, offload: bool) -> torch.Tensor:
    """The epoch's chain buffer: beside `like`, or in pinned CPU memory (offload_trajectory;
    PyTorch's pinned-memory cache makes the epochs after the first reuse it)."""
    if not offload or like.device.type == "cpu":
        return like.new_empty(shape)
    return torch.empty(shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())


def measures_kl(config: Config, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) measures kl_to_base: every epoch for guard.max_kl, else
    every guard.kl_every epochs and after the last; never without a trajectory to measure on."""
    guard = config.guard
    if not guard.kl_samples or config.train.algorithm in TRAJECTORY_FREE:
        return False
    last = epoch + 1 == config.num_epochs
    return bool(guard.max_kl) or (
        guard.kl_every > 0 and ((epoch + 1) % guard.kl_every == 0 or last)
    )


def sde_window(sample, generator: torch.Generator) -> range | None:
    """This batch's SDE window (Flow-GRPO-Fast): `sde_window_size` steps from a start drawn
    uniformly below `sde_window_range`; None (every step) when the size is 0."""
    if not sample.sde_window_size:
        return None
    start = int(torch.randint(sample.sde_window_range, (1,), generator=generator))
    return range(start, start + sample.sde_window_size)


def _reward_result(item, reward, config: Config):
    """A batch's (rewards, info): `item` itself, or its Future's result, waited for at most
    `reward.local_timeout` seconds (a reward server's wait is bounded by its client)."""
    if not isinstance(item, Future):
        return item
    timeout = None if config.reward.url else config.reward.local_timeout
    try:
        return item.result(timeout=timeout)
    except FutureTimeout:
        name = getattr(reward, "name", None) or getattr(reward, "__name__", "the reward")
        raise RewardError(
            f"reward {name!r} did not return within reward.local_timeout = {timeout:g}s for one "
            "batch (hung? if it is only slow, raise reward.local_timeout)"
        ) from None


@dataclass
class Scored:
    """An epoch's rewards over all processes, and this process's share of the update."""

    rewards: torch.Tensor  # (N_all,) every process's finite rewards
    weights: torch.Tensor  # (B,) this process's advantages (or RWR weights); 0 where dropped
    valid: torch.Tensor  # (B,) bool, this process's samples that take part in the update
    dropped: int  # samples dropped over all processes
    nonfinite_rewards: int = 0  # of which with a non-finite reward (the rest: trajectory)


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
    elif len(kept) and config.sample.group_size > 1:
        groups = torch.arange(len(all_rewards)) // config.sample.group_size
        baseline = config.advantages.group_baseline
        if baseline == "normalised" or (baseline == "auto" and config.train.algorithm == "grpo"):
            advantage_fn = group_normalised_advantages
        else:
            advantage_fn = group_advantages
        advantages[finite] = advantage_fn(kept, groups[finite], config.train.adv_clip_max)
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
        nonfinite_rewards=int((~torch.isfinite(all_rewards)).sum()),
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


def trajectory_is_finite(trajectory: Trajectory) -> torch.Tensor:
    """(B,) uint8 (gather-able over gloo): 1 where the sample's latents, log-probs and
    conditioning are finite."""
    return trajectory.is_finite().to(torch.uint8)


def sanitize(trajectory: Trajectory, valid: torch.Tensor) -> Trajectory:
    """Zero the tensors of dropped samples so they stay finite; their weight is 0 in the loss.

    Dropped samples are masked rather than removed so that every process runs the same number
    of backward passes (DDP needs that); a weight of 0 makes their gradient exactly 0.
    """
    return trajectory if bool(valid.all()) else trajectory.masked(valid)

"""`ddpo-lite bench`: memory and speed of a preset, per phase, measured or predicted.

    ddpo-lite bench --preset tiny --epochs 2            # run it: peak memory, samples/s, s/epoch
    ddpo-lite bench --preset aesthetic --model sd15-random --estimate   # predict, run nothing
    ddpo-lite bench --preset tiny --vs-pipeline         # rollout vs StableDiffusionPipeline
    ... --json                                          # one JSON object instead of a table

A run goes through the epoch as the trainer does (rollout -> reward -> update), but with its phases
one after the other (the trainer overlaps the reward with sampling), so that each has its own
peak and time. Timing brackets each phase with `cuda.synchronize()`; the first epoch is burn-in
and is not timed when there are more. Peak memory on a GPU is the CUDA caching allocator's
(`max_memory_allocated`/`max_memory_reserved`, reset per phase). On a CPU no allocator reports
it: the first epoch runs under the dispatch counter of estimate.py (live tensor bytes, weights
included) and the numbers are marked `"peak_source": "dispatch-counter"`.

`--model sd15-random` builds SD 1.5 (and, for model-based rewards, CLIP ViT-L/14 with the
aesthetic head) from their configs with random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from ddpo_lite.bench.counting import MemoryCounter
from ddpo_lite.bench.estimate import Estimate, GiB, estimate
from ddpo_lite.bench.sd15 import SD15_RANDOM, build_clip_vision, build_sd15_pipeline
from ddpo_lite.config import Config, ConfigError, load_config

PHASES = ("sampling", "reward", "training")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ddpo-lite bench` options."""
    parser.add_argument(
        "--preset", default="tiny", help="preset name or .toml path (default: tiny)"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.timestep_chunk=2 (repeatable)",
    )
    parser.add_argument(
        "--model",
        help=f"replace model.name; '{SD15_RANDOM}' / 'sdxl-random' / 'sd35-random' build SD 1.5 "
        "/ SDXL / SD3.5 Medium with random weights from their published configs (offline)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"image side in pixels for --model {SD15_RANDOM} / sdxl-random (default: "
        "sample.resolution, else 512 / 1024; try 64 on a CPU)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs to run (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--estimate", action="store_true", help="predict each phase's peak memory; run nothing"
    )
    mode.add_argument(
        "--vs-pipeline",
        action="store_true",
        help="images/s of our rollout vs StableDiffusionPipeline.__call__, side by side",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="--vs-pipeline: timed calls of each (default 3)"
    )
    parser.add_argument(
        "--no-estimate",
        action="store_true",
        help="a measured run without the estimate beside it",
    )


def _config(args) -> Config:
    overrides = list(args.set or [])
    if args.model:
        overrides.append(f'model.name="{args.model}"')
    config = load_config(args.preset, overrides)
    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs} is invalid: give at least 1")
    # the latent is 1/8 of the image; diffusers' UNet takes any latent size (it passes the skip
    # connections' sizes to its upsamplers), so the image side is a multiple of 8 (sd15.py checks it)
    random_model = args.model in (SD15_RANDOM, "sdxl-random", "sd35-random")
    if (
        random_model
        and args.resolution is not None
        and (args.resolution < 64 or args.resolution % 8)
    ):
        raise ConfigError(
            f"--resolution {args.resolution}: give a multiple of 8 of at least 64, e.g. 64 or 512"
        )
    return config


def run_bench(args) -> int:
    """Run `ddpo-lite bench` as `args` (from `add_bench_arguments`) says; prints the result."""
    config = _config(args)
    if args.estimate:
        _emit(args, estimate(config, resolution=args.resolution).to_dict(), _estimate_table)
    elif args.vs_pipeline:
        _emit(args, vs_pipeline(config, args.resolution, args.repeats), _pipeline_table)
    else:
        result = measure(config, args.epochs, args.resolution)
        if not args.no_estimate:
            result["estimate"] = estimate(config, resolution=args.resolution).to_dict()
        _emit(args, result, _measure_table)
    return 0


def _emit(args, result: dict, table) -> None:
    from rich.console import Console

    if args.json:
        print(json.dumps(result))
    else:
        table(Console(soft_wrap=True, markup=False), result)  # model names and paths as text


# ---------------------------------------------------------------------------------------------
# setup: the run's parts, as the trainer builds them (with sd15-random built here)
# ---------------------------------------------------------------------------------------------


def build_pipeline(config: Config, resolution: int | None):
    """The config's pipeline; the random published-architecture models at `resolution` (default:
    sample.resolution, else the model's own)."""
    size = resolution or config.sample.resolution
    if config.model.name == SD15_RANDOM:
        return build_sd15_pipeline(resolution=size or 512)
    if config.model.name == "sdxl-random":
        from ddpo_lite.bench.sdxl import build_sdxl_pipeline

        return build_sdxl_pipeline(resolution=size or 1024)
    if config.model.name == "sd35-random":
        from ddpo_lite.bench.sd3 import build_sd3_pipeline

        return build_sd3_pipeline(resolution=size or 1024, t5=not config.memory.drop_t5)
    from ddpo_lite.models import load_pipeline

    return load_pipeline(config.model.name, seed=config.model.seed)


def build_bench_reward(config: Config, device: torch.device):
    """The config's reward; for sd15-random a model reward is CLIP ViT-L/14 + the aesthetic head
    with random weights, scored exactly as the aesthetic reward scores."""
    from ddpo_lite.rewards.compose import build_reward

    offload = config.memory.offload_reward
    if config.model.name != SD15_RANDOM or config.reward.name.startswith("jpeg"):
        return build_reward(config.reward, device=str(device), offload=offload)
    from transformers import CLIPImageProcessor

    from ddpo_lite.rewards import _models
    from ddpo_lite.rewards.aesthetic import aesthetic_head

    clip = build_clip_vision()
    processor = CLIPImageProcessor()  # OpenAI CLIP's defaults: 224, bicubic, CLIP mean/std
    mlp = aesthetic_head(clip.config.projection_dim)
    dtype = _models.resolve_dtype(str(device))

    def score(images, prompts, metadata):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = clip(pixel_values=pixels.to(device, dtype)).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return mlp(embeds).squeeze(-1), {}

    return _models.BatchedReward(
        "aesthetic(random)", score, [clip, mlp], str(device), dtype, offload, 16
    )


class Run:
    """The pieces the bench drives: pipeline, policy, optimizer, scheduler, prompts, reward."""

    def __init__(self, config: Config, resolution: int | None):
        from ddpo_lite.models.lora import attach_lora
        from ddpo_lite.models.memory import apply_memory_settings
        from ddpo_lite.trainer import load_prompts, make_accelerator, make_optimizer, make_policy

        self.config = config
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        self.pipe = build_pipeline(config, resolution)
        apply_memory_settings(self.pipe, config.memory, self.device)
        torch.manual_seed(config.seed)
        self.params = attach_lora(
            self.pipe.unet, config.lora.rank, config.lora.alpha, config.lora.target_modules
        )
        optimizer = make_optimizer(
            self.params, config.train, config.memory.use_8bit_adam, self.device
        )
        self.model, self.optimizer = self.accelerator.prepare(self.pipe.unet, optimizer)
        self.pipe.unet.eval()
        self.policy = make_policy(self.pipe, config, self.device, self.accelerator.autocast)
        self.prompts = load_prompts(config.prompts)
        self.policy.encoder.preload(self.prompts)
        self.reward = build_bench_reward(config, self.device)
        self.generator = torch.Generator().manual_seed(config.seed)

    def resident(self) -> list[torch.Tensor]:
        """The tensors that stay on the accelerator between phases (for the CPU counter)."""
        memory = self.config.memory
        models = [self.pipe.unet, self.pipe.vae]
        if not memory.offload_text_encoder:
            models += self.policy.family.text_encoders(self.pipe)
        if not memory.offload_reward:
            models += [m for m in getattr(self.reward, "models", [])]
        tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return tensors


# ---------------------------------------------------------------------------------------------
# a measured run
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _phase_memory(run: Run, counted: bool, held: list[torch.Tensor], out: dict):
    """Peak memory of the block: CUDA allocator stats, or the dispatch counter on a CPU."""
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    elif counted:
        with MemoryCounter(device_type=device.type) as counter:
            counter.register(run.resident() + held)
            yield
        out["peak_bytes"] = counter.peak
        out["reserved_bytes"] = None
    else:
        yield


def _epoch(run: Run, counted: bool) -> dict[str, dict]:
    """One epoch, phase after phase; per phase seconds, samples and (if counted) peak bytes."""
    from ddpo_lite.trainer import sample_epoch
    from ddpo_lite.update import update

    config, device = run.config, run.device
    n = config.sample.batch_size * config.sample.num_batches_per_epoch
    stats: dict[str, dict] = {name: {} for name in PHASES}

    _sync(device)
    start = time.perf_counter()
    # the trainer's own sampling loop; the reward is scored in its own phase below
    components = SimpleNamespace(policy=run.policy)

    def no_reward(images, prompts, metadata):
        return np.zeros(len(images)), {}

    with _phase_memory(run, counted, [], stats["sampling"]):
        samples = sample_epoch(
            components, run.prompts, config, run.generator, run.accelerator, no_reward
        )
    images, texts, trajectory = samples.images, samples.prompts, samples.trajectory
    _sync(device)
    stats["sampling"]["seconds"] = time.perf_counter() - start

    held = [
        trajectory.chain,
        trajectory.log_probs,
        trajectory.prompt_embeds,
    ]
    start = time.perf_counter()
    rewards = []
    with _phase_memory(run, counted, held, stats["reward"]):
        for i in range(0, n, config.sample.batch_size):
            part = slice(i, i + config.sample.batch_size)
            values, _ = run.reward(images[part], texts[part], [{} for _ in images[part]])
            rewards.append(np.asarray(values, dtype=np.float64))
    _sync(device)
    stats["reward"]["seconds"] = time.perf_counter() - start

    raw = torch.as_tensor(np.concatenate(rewards), dtype=torch.float32)
    raw = torch.nan_to_num(raw)
    advantages = ((raw - raw.mean()) / (raw.std() + 1e-8)).clamp(
        -config.train.adv_clip_max, config.train.adv_clip_max
    )
    start = time.perf_counter()
    with _phase_memory(run, counted, held, stats["training"]):
        update(
            run.accelerator,
            run.policy,
            run.model,
            run.optimizer,
            run.params,
            trajectory,
            advantages.to(device),
            torch.ones(n, dtype=torch.bool, device=device),
            config,
            run.generator,
        )
    _sync(device)
    stats["training"]["seconds"] = time.perf_counter() - start
    for name in PHASES:
        stats[name]["samples"] = n
    return stats


def measure(config: Config, epochs: int, resolution: int | None = None) -> dict:
    """Run `epochs` epochs phase by phase; the result `--json` prints."""
    config = copy.deepcopy(config)
    run = Run(config, resolution)
    device = run.device
    on_gpu = device.type == "cuda"
    epoch_stats = []
    for epoch in range(epochs):
        counted = on_gpu or epoch == 0  # the CPU counter slows the run: only the first epoch
        epoch_stats.append(_epoch(run, counted))
    timed = epoch_stats[1:] if epochs > 1 else epoch_stats  # the first is burn-in
    phases = {}
    for name in PHASES:
        seconds = statistics.mean(e[name]["seconds"] for e in timed)
        peaks = [e[name]["peak_bytes"] for e in epoch_stats if "peak_bytes" in e[name]]
        reserved = [e[name].get("reserved_bytes") for e in epoch_stats if "peak_bytes" in e[name]]
        samples = epoch_stats[0][name]["samples"]
        phases[name] = {
            "peak_bytes": max(peaks),
            "reserved_bytes": max(reserved) if on_gpu else None,
            "seconds": seconds,
            "samples_per_second": samples / seconds,
        }
    epoch_seconds = sum(phases[n]["seconds"] for n in PHASES)
    samples = epoch_stats[0]["sampling"]["samples"]
    return {
        "kind": "measurement",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": config.model.name,
        "resolution": run.pipe.unet.config.sample_size * run.pipe.vae_scale_factor,
        "preset": config.preset,
        "peak_bytes": max(p["peak_bytes"] for p in phases.values()),
        "peak_source": "cuda-allocator" if on_gpu else "dispatch-counter",
        "phases": phases,
        "epochs": epochs,
        "timed_epochs": len(timed),
        "timing_includes_counter": not on_gpu and epochs == 1,
        "seconds_per_epoch": epoch_seconds,
        "samples_per_second": samples / epoch_seconds,
        "memory": dict(vars(config.memory)),
        "train_shape": {
            "batch_size": config.train.batch_size,
            "micro_batch_size": getattr(config.train, "micro_batch_size", 0),
            "timestep_chunk": config.train.timestep_chunk,
            "timestep_fraction": config.train.timestep_fraction,
        },
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.1f} GiB), CUDA {torch.version.cuda}"
    return f"cpu ({torch.get_num_threads()} thread(s))"


# ---------------------------------------------------------------------------------------------
# rollout vs the diffusers pipeline
# ---------------------------------------------------------------------------------------------


def vs_pipeline(config: Config, resolution: int | None, repeats: int = 3) -> dict:
    """Images/s of `rollout` (log-probs and trajectory included) and of `pipe(...)` on the same
    pipeline object (same UNet with its LoRA, VAE, DDIM scheduler settings), steps, guidance,
    eta, batch and size, timed alternately after one untimed call of each; the ratio is the
    median over adjacent pairs of pipeline seconds / rollout seconds (> 1: the rollout is faster).
    The rollout uses cached prompt embeddings (as in training); the pipeline encodes its prompts
    on every call, as a user's `pipe(...)` does."""
    from ddpo_lite.sampling import rollout

    run = Run(config, resolution)
    sample, device = config.sample, run.device
    size = run.pipe.unet.config.sample_size * run.pipe.vae_scale_factor
    prompts = [run.prompts[i % len(run.prompts)] for i in range(sample.batch_size)]
    ids = torch.arange(sample.batch_size) % len(run.prompts)
    run.pipe.scheduler = copy.deepcopy(run.policy.sampler.scheduler)
    for encoder in run.policy.family.text_encoders(run.pipe):
        encoder.to(device)  # the pipeline encodes on the device
    negative = config.prompts.negative_prompt or None

    def ours():
        rollout(run.policy, prompts, ids, torch.Generator().manual_seed(0))

    def theirs():
        run.pipe(
            prompts,
            height=size,
            width=size,
            num_inference_steps=sample.num_steps,
            guidance_scale=sample.guidance_scale,
            eta=sample.eta,
            negative_prompt=[negative] * len(prompts) if negative else None,
            generator=torch.Generator().manual_seed(0),
            output_type="pil",
        )

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        return time.perf_counter() - start

    timed(ours), timed(theirs)  # burn-in
    times = {"rollout": [], "pipeline": []}
    for _ in range(repeats):
        times["rollout"].append(timed(ours))
        times["pipeline"].append(timed(theirs))
    rollout_s = statistics.median(times["rollout"])
    pipeline_s = statistics.median(times["pipeline"])
    # each rollout is timed next to a pipeline call: the pair's ratio cancels slow drifts of a
    # shared machine better than the ratio of medians
    paired = [p / r for r, p in zip(times["rollout"], times["pipeline"], strict=True)]
    return {
        "kind": "vs-pipeline",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": config.model.name,
        "resolution": size,
        "steps": sample.num_steps,
        "guidance_scale": sample.guidance_scale,
        "eta": sample.eta,
        "batch": sample.batch_size,
        "repeats": repeats,
        "rollout_seconds": times["rollout"],
        "pipeline_seconds": times["pipeline"],
        "rollout_images_per_second": sample.batch_size / rollout_s,
        "pipeline_images_per_second": sample.batch_size / pipeline_s,
        "paired_ratios": paired,
        "ratio": statistics.median(paired),
    }


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _estimate_table(console, result: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"predicted peak memory (estimate, not a measurement): {result['model']} at "
        f"{result['resolution']}x{result['resolution']}"
    )
    for column in ("phase", "peak MiB", "made of (MiB)"):
        table.add_column(column)
    for name, phase in result["phases"].items():
        parts = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in phase["parts"].items() if v)
        table.add_row(name, _mib(phase["peak_bytes"]), parts)
    console.print(table)
    console.print(
        f"run peak {_mib(result['peak_bytes'])} MiB allocated; predicted reserved "
        f"{_mib(result['reserved_bytes'])} MiB; on the card with the CUDA context "
        f"{_mib(result['device_bytes'])} MiB (computed in {result['seconds']:.1f} s)"
    )
    for line in result["notes"] + ["assumptions: " + "; ".join(result["assumptions"])]:
        console.print(line, highlight=False)


def _measure_table(console, result: dict) -> None:
    from rich.table import Table

    source = result["peak_source"]
    table = Table(
        title=f"bench {result['preset']} ({result['model']}, {result['resolution']}px) on "
        f"{result['device']}: peak memory by {source}"
    )
    columns = ["phase", "peak MiB", "reserved MiB", "estimate MiB", "s/epoch", "samples/s"]
    for column in columns:
        table.add_column(column)
    estimated = result.get("estimate", {}).get("phases", {})
    for name, phase in result["phases"].items():
        table.add_row(
            name,
            _mib(phase["peak_bytes"]),
            _mib(phase["reserved_bytes"]),
            _mib(estimated.get(name, {}).get("peak_bytes")),
            f"{phase['seconds']:.2f}",
            f"{phase['samples_per_second']:.2f}",
        )
    console.print(table)
    console.print(
        f"{result['seconds_per_epoch']:.2f} s/epoch, {result['samples_per_second']:.2f} "
        f"samples/s over {result['timed_epochs']} timed epoch(s) of {result['epochs']}"
    )
    if source == "dispatch-counter":
        console.print(
            "CPU: no allocator to measure; peaks are live tensor bytes counted by the dispatch "
            "counter in the first epoch (weights, optimizer state and trajectory included)"
        )


def _pipeline_table(console, result: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"rollout vs StableDiffusionPipeline.__call__: {result['model']} "
        f"{result['resolution']}px, {result['steps']} steps, batch {result['batch']}, "
        f"guidance {result['guidance_scale']}, eta {result['eta']}, {result['device']}"
    )
    for column in ("", "images/s (median)", "seconds per call"):
        table.add_column(column)
    for name in ("rollout", "pipeline"):
        seconds = ", ".join(f"{s:.2f}" for s in result[f"{name}_seconds"])
        table.add_row(name, f"{result[f'{name}_images_per_second']:.3f}", seconds)
    console.print(table)
    pairs = ", ".join(f"{r:.2f}" for r in result["paired_ratios"])
    console.print(
        f"rollout / pipeline images/s: {result['ratio']:.2f} (median of adjacent pairs: {pairs})"
    )


__all__ = ["Estimate", "add_bench_arguments", "measure", "run_bench", "vs_pipeline"]

"""`ddpo-lite bench`: memory and speed of a preset, per phase, measured or predicted.

    ddpo-lite bench --preset tiny --epochs 2            # run it: peak memory, samples/s, s/epoch
    ddpo-lite bench --preset aesthetic --model sd15-random --estimate   # predict, run nothing
    ddpo-lite bench --preset tiny --vs-pipeline         # rollout vs the family's own pipeline
    ... --json                                          # one JSON object instead of a table
    python -m ddpo_lite.bench.suite                     # every GPU preset (scripts/gpu_bench.sh)

A run goes through the epoch as the trainer does (rollout -> reward -> update), but with its phases
one after the other (the trainer overlaps the reward with sampling), so that each has its own
peak and time. Timing brackets each phase with `cuda.synchronize()`; the first epoch is burn-in
and is not timed when there are more. Peak memory on a GPU is the CUDA caching allocator's
(`max_memory_allocated`/`max_memory_reserved`, reset per phase). On a CPU no allocator reports
it: the first epoch runs under the dispatch counter of estimate.py (live tensor bytes, weights
included) and the numbers are marked `"peak_source": "dispatch-counter"`.

`--model sd15-random` (sdxl-random, sd35-random, flux-dev-random, flux2-klein-random) builds
the published architecture from its config with random weights, on the run's device: nothing
is downloaded. A model reward on them (and on the tiny models) is the model the estimate counts
for it, with random weights (`build_bench_reward`). The run is set up by the trainer's own
`build_components`, so every family and every lever goes through the trainer's code.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import statistics
import time
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from ddpo_lite.bench.counting import MemoryCounter
from ddpo_lite.bench.estimate import Estimate, GiB, estimate
from ddpo_lite.bench.sd15 import SD15_RANDOM, build_clip_vision, build_sd15_pipeline
from ddpo_lite.config import Config, ConfigError, load_config
from ddpo_lite.models.memory import visiting

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
        help=f"replace model.name; '{SD15_RANDOM}' / 'sdxl-random' / 'sd35-random' / "
        "'flux-dev-random' / 'flux2-klein-random' build SD 1.5 / SDXL / SD3.5 Medium / FLUX.1-dev "
        "/ FLUX.2-klein-4B with random weights from their published configs (offline)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels for the random-weight models (default: sample.resolution, "
        "else 512 for SD 1.5, 1024 for the others; try 64 on a CPU)",
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
        help="images/s of our rollout vs the family's diffusers pipeline call, side by side",
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
    random_model = args.model in RANDOM_MODELS
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
# setup: the run's parts, as the trainer builds them (the random-weight models built here)
# ---------------------------------------------------------------------------------------------

#: The published architectures with random weights (bench/sd15.py, sdxl.py, sd3.py, flux.py).
RANDOM_MODELS = (SD15_RANDOM, "sdxl-random", "sd35-random", "flux-dev-random", "flux2-klein-random")


def build_pipeline(config: Config, resolution: int | None, device="cpu"):
    """The config's pipeline with its load-time levers (quantize_base, drop_t5). The random-weight
    published architectures are built on `device` (initialising FLUX.1's 12B transformer on a
    CPU takes minutes; on a GPU, seconds), in the frozen dtype, at `resolution` (default:
    sample.resolution, else 512 for SD 1.5 and 1024 for the others)."""
    from ddpo_lite.models.memory import frozen_dtype

    name, memory = config.model.name, config.memory
    if name not in RANDOM_MODELS:
        from ddpo_lite.models import load_pipeline

        return load_pipeline(
            name, seed=config.model.seed, family=config.model.family, memory=memory
        )
    size = resolution or config.sample.resolution
    dtype = frozen_dtype(memory.mixed_precision, memory.half_base)
    if name == SD15_RANDOM:
        pipe = build_sd15_pipeline(resolution=size or 512, device=device)
    elif name == "sdxl-random":
        from ddpo_lite.bench.sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(resolution=size or 1024, device=device, dtype=dtype)
    elif name == "sd35-random":
        from ddpo_lite.bench.sd3 import build_sd3_pipeline

        pipe = build_sd3_pipeline(
            resolution=size or 1024, device=device, dtype=dtype, t5=not memory.drop_t5
        )
    elif name == "flux-dev-random":
        from ddpo_lite.bench.flux import build_flux_pipeline

        pipe = build_flux_pipeline(resolution=size or 1024, device=device, dtype=dtype)
    else:
        from ddpo_lite.bench.flux import build_flux2_pipeline

        pipe = build_flux2_pipeline(resolution=size or 1024, device=device, dtype=dtype)
    if memory.quantize_base in ("nf4", "int8"):
        quantize_denoiser(pipe, memory)
    return pipe


def quantize_denoiser(pipe, memory) -> None:
    """memory.quantize_base 'nf4' / 'int8' on a random-weight model, as load_pipeline applies it
    to a downloaded one: diffusers' bitsandbytes quantizer runs at load from weights on disk, so
    the denoiser is saved (safetensors, its frozen dtype) into a temporary folder
    (`$DDPO_LITE_BENCH_TMP`, else the system's) and loaded back with the trainer's own
    BitsAndBytesConfig (models/loading.py `load_options`)."""
    import gc
    import os
    import shutil
    import tempfile

    from ddpo_lite.families import family_of
    from ddpo_lite.models.loading import QUANTIZE_DENOISER, load_options

    family = family_of(pipe)
    options = load_options(memory)  # a one-line ModelLoadError without bitsandbytes or CUDA
    denoiser = family.denoiser(pipe)
    cls = type(denoiser)
    folder = tempfile.mkdtemp(prefix="ddpo-bench-", dir=os.environ.get("DDPO_LITE_BENCH_TMP"))
    try:
        denoiser.save_pretrained(folder, max_shard_size="100GB")
        pipe.register_modules(**{family.denoiser_name: None})
        del denoiser
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        quantized = cls.from_pretrained(
            folder,
            quantization_config=options[QUANTIZE_DENOISER],
            torch_dtype=options["torch_dtype"],
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pipe.register_modules(**{family.denoiser_name: quantized})


def build_bench_reward(config: Config, device: torch.device) -> tuple[object, list[str]]:
    """The config's reward, and notes on what stood in for it. On the random-weight and tiny
    models a model reward is the model the estimate counts for it (estimate.py), with random
    weights: PickScore / HPS a CLIP ViT-H/14 vision + text pair scored as PickScore scores
    (100 x cos), every other model reward CLIP ViT-L/14 + the aesthetic head, scored as the
    aesthetic reward scores (tiny towers of the same kind on the tiny models). OCR without
    RapidOCR installed: the JPEG reward stands in (both run on the CPU, nothing on the GPU)."""
    from ddpo_lite.bench.estimate import CPU_REWARDS, TINY_MODELS, VIT_H_REWARDS, _reward_names
    from ddpo_lite.rewards.compose import build_reward

    offload = config.memory.offload_reward
    names = _reward_names(config)
    random_model = config.model.name in RANDOM_MODELS
    tiny = config.model.name.split(":")[0] in TINY_MODELS
    model_rewards = [r for r in names if r not in CPU_REWARDS]
    if "ocr" in names and importlib.util.find_spec("rapidocr") is None:
        reward = copy.deepcopy(config.reward)
        reward.name, reward.weights = "jpeg_compressibility", {}
        note = "reward ocr: RapidOCR not installed, jpeg_compressibility (also CPU-only) stood in"
        return build_reward(reward, device=str(device), offload=offload), [note]
    if not (random_model or tiny) or not model_rewards:
        return build_reward(config.reward, device=str(device), offload=offload), []
    from transformers import CLIPImageProcessor

    from ddpo_lite.rewards import _models

    dtype = _models.resolve_dtype(str(device))
    vit_h = any(r in VIT_H_REWARDS for r in model_rewards)
    vision, text = random_clip(device, vit_h, tiny)
    size = vision.config.image_size
    processor = _pil(CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size))
    kind = "tiny " if tiny else ""
    if vit_h:
        from ddpo_lite.models.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        models = [vision, text]
        stood_in = f"a {kind}CLIP ViT-H/14 pair (random weights), scored as PickScore"
    else:
        from ddpo_lite.rewards.aesthetic import aesthetic_head

        head = aesthetic_head(vision.config.projection_dim)
        models = [vision, head]
        stood_in = f"{kind}CLIP ViT-L/14 + the aesthetic head (random weights)"

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    def score(images, prompts, metadata):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = unit(vision(pixel_values=pixels.to(device, dtype)).image_embeds)
        if not vit_h:
            return head(image).squeeze(-1), {}
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=77,
            return_tensors="pt",
        ).input_ids
        words = unit(text(input_ids=ids.to(device)).text_embeds)
        return 100.0 * (image * words).sum(-1), {}

    reward = _models.BatchedReward(
        f"{'+'.join(model_rewards)}(random)", score, models, str(device), dtype, offload, 16
    )
    return reward, [f"reward {', '.join(model_rewards)}: {stood_in}"]


#: Tiny CLIP towers for the tiny models' rewards (the code path of the full ones, in seconds).
TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
TINY_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)


def _pil(processor):
    """The same processor on PIL's backend, as the real rewards load theirs (the GPU image has
    torchvision, whose backend transformers would otherwise pick: other timings)."""
    import tempfile

    from ddpo_lite.rewards._models import pil_image_processor

    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        return pil_image_processor(folder)


def random_clip(device, vit_h: bool, tiny: bool):
    """(vision tower with projection, text tower with projection or None), random weights, on
    `device` ("meta" for the estimate): ViT-H/14 with its text tower (`vit_h`), else ViT-L/14;
    `tiny`: small towers of the same classes."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from ddpo_lite.bench.estimate import CLIP_VIT_H_TEXT
    from ddpo_lite.bench.sdxl import build_clip_vision_h

    if tiny:
        from ddpo_lite.models.tiny import build_tiny_tokenizer

        vocab = len(build_tiny_tokenizer())
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
            text = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT, vocab_size=vocab))
        return vision, text if vit_h else None
    if not vit_h:
        return build_clip_vision(device=device), None
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        text = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VIT_H_TEXT))
    return build_clip_vision_h(device=device), text


class Run:
    """The pieces the bench drives, as the trainer's `build_components` sets them up (any
    family): pipeline, policy, optimizer, prompts (encoded), reward."""

    def __init__(self, config: Config, resolution: int | None):
        import gc

        from ddpo_lite.trainer import build_components, load_prompts, make_accelerator

        config = copy.deepcopy(config)
        if resolution:
            config.sample.resolution = resolution
        self.config = config
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        pipe = build_pipeline(config, resolution, self.device)
        components = build_components(config, self.accelerator, pipe=pipe)
        self.pipe, self.policy = components.pipe, components.policy
        self.denoiser, self.model = components.denoiser, components.model
        self.optimizer, self.params = components.optimizer, components.params
        self.optimizer_name = type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__
        self.prompts = load_prompts(config.prompts)
        self.policy.encoder.preload(self.prompts, config.memory.encode_batch_size)
        self.reward, self.notes = build_bench_reward(config, self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        gc.collect()
        if self.device.type == "cuda":  # setup's freed blocks (float32 init, casts) leave the pool
            torch.cuda.empty_cache()

    def resident(self) -> list[torch.Tensor]:
        """The tensors that stay on the accelerator between phases (for the CPU counter)."""
        memory = self.config.memory
        models = [self.denoiser] + ([] if memory.offload_vae else [self.pipe.vae])
        if not (memory.offload_text_encoder or memory.encode_on_cpu):
            models += self.policy.family.text_encoders(self.pipe)
        if not memory.offload_reward:
            models += [m for m in getattr(self.reward, "models", [])]
        tensors = _weights(models)
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return tensors

    def visitors(self, phase: str) -> list[torch.Tensor]:
        """The offloaded models that visit the accelerator in `phase` (the VAE to decode while
        sampling, the reward model to score): on the CPU their visit moves nothing, so the
        counter is given them for the phase, as a GPU's allocator sees them arrive."""
        memory = self.config.memory
        if phase == "sampling" and memory.offload_vae:
            return _weights([self.pipe.vae])
        if phase == "reward" and memory.offload_reward:
            return _weights(getattr(self.reward, "models", []))
        return []


def _weights(models) -> list[torch.Tensor]:
    """The parameters and buffers of `models`."""
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


# ---------------------------------------------------------------------------------------------
# a measured run
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _phase_memory(run: Run, counted: bool, held: list[torch.Tensor], out: dict, phase: str):
    """Peak memory of `phase`'s block: CUDA allocator stats, or the dispatch counter on a CPU
    (over what stays resident, `held` and the phase's visitors)."""
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    elif counted:
        with MemoryCounter(device_type=device.type) as counter:
            counter.register(run.resident() + held + run.visitors(phase))
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

    with _phase_memory(run, counted, [], stats["sampling"], "sampling"):
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
    with _phase_memory(run, counted, held, stats["reward"], "reward"):
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
    with _phase_memory(run, counted, held, stats["training"], "training"):
        trained = update(
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
    # the epoch's one optimizer step scores samples of the policy it steps: on-policy
    stats["training"]["ratio_dev"] = trained.get("ratio_dev")
    for name in PHASES:
        stats[name]["samples"] = n
    return stats


def measure(
    config: Config, epochs: int, resolution: int | None = None, run: Run | None = None
) -> dict:
    """Run `epochs` epochs phase by phase (on `run`, else one set up here); the result `--json`
    prints."""
    run = run or Run(config, resolution)
    config, device = run.config, run.device
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
    outside = None
    if on_gpu:  # what the card holds beyond PyTorch's allocator: the CUDA context, kernels
        free, total = torch.cuda.mem_get_info(device)
        outside = int(total - free - torch.cuda.memory_reserved(device))
    deviations = [e["training"]["ratio_dev"] for e in epoch_stats]
    if any(d is None for d in deviations):  # the log-prob-free algorithms have no ratio
        deviations = []
    return {
        "kind": "measurement",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": config.model.name,
        "family": run.policy.family.name,
        "resolution": run.policy.resolution,
        "preset": config.preset,
        "peak_bytes": max(p["peak_bytes"] for p in phases.values()),
        "peak_source": "cuda-allocator" if on_gpu else "dispatch-counter",
        "phases": phases,
        # measured after the epochs, beside the estimate's assumed CUDA_CONTEXT_BYTES
        "outside_allocator_bytes": outside,
        "epochs": epochs,
        "timed_epochs": len(timed),
        "timing_includes_counter": not on_gpu and epochs == 1,
        "seconds_per_epoch": epoch_seconds,
        "samples_per_second": samples / epoch_seconds,
        # max |pi / pi_old - 1| where the two are the same policy (exactly 1 in exact arithmetic):
        # what sampling and training compute differently under this preset's levers
        "on_policy_ratio_dev": max(deviations) if deviations else None,
        "memory": dict(vars(config.memory)),
        "text_tokens": run.policy.encoder.max_sequence_length,  # the flow families' T5 / Qwen3
        "optimizer": run.optimizer_name,
        "notes": list(run.notes),
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


def vs_pipeline(
    config: Config,
    resolution: int | None,
    repeats: int = 3,
    run: Run | None = None,
    steps: int | None = None,
    burn_in: bool = True,
) -> dict:
    """Images/s of the rollout (log-probs and trajectory kept, as training samples), of the same
    rollout keeping nothing (`record=False`: the extras' cost), and of the family's own diffusers
    pipeline call on the same pipeline object (same denoiser with its LoRA, VAE, attention
    processors, frozen dtype, under the same autocast), at the same steps, guidance, batch and
    size: SD 1.x / SDXL with the DDIM scheduler and eta; SD3 / FLUX / FLUX.2 with their own
    FlowMatch sigma grid (the sampler's, held equal in tests/test_families_flux.py), and no eta
    (the pipelines sample the ODE; the rollout keeps the preset's SDE noise, which costs one
    randn per step). FLUX.1's guidance is the transformer's embedding input on both sides.

    Each is called once untimed (`burn_in`), then `repeats` times in turn; the ratio is the median
    over rounds of pipeline seconds / rollout seconds (> 1: the rollout is faster). The rollout
    uses cached prompt embeddings (as in training); the pipeline encodes its prompts on every
    call, as a user's `pipe(...)` does. `steps` (default sample.num_steps) sets both sides'."""
    from ddpo_lite.sampling import rollout
    from ddpo_lite.trainer import make_sampler, sde_window

    run = run or Run(config, resolution)
    config, device, family = run.config, run.device, run.policy.family
    sample = copy.deepcopy(config.sample)
    sample.num_steps = steps or sample.num_steps
    policy = run.policy
    if sample.num_steps != config.sample.num_steps:
        stepped = copy.deepcopy(config)
        stepped.sample = sample
        sampler = make_sampler(run.pipe, family, stepped, policy.resolution, device)
        policy = dataclasses.replace(policy, sampler=sampler)
    size, group = policy.resolution, sample.group_size
    ids = (torch.arange(sample.batch_size // group) % len(run.prompts)).repeat_interleave(group)
    prompts = [run.prompts[i] for i in ids.tolist()]
    if family.sampler == "ddim":  # the pipeline steps with the sampler's DDIM scheduler
        run.pipe.scheduler = copy.deepcopy(policy.sampler.scheduler)
    for encoder in family.text_encoders(run.pipe):
        encoder.to(device)  # the pipeline encodes on the device
    kwargs = dict(
        height=size,
        width=size,
        num_inference_steps=sample.num_steps,
        guidance_scale=sample.guidance_scale,
        output_type="pil",
    )
    if family.sampler == "ddim":
        kwargs["eta"] = sample.eta
    negative = config.prompts.negative_prompt
    if family.has_negative_prompt and negative:
        kwargs["negative_prompt"] = [negative] * len(prompts)

    def ours(record: bool):
        generator = torch.Generator().manual_seed(0)
        window = sde_window(sample, generator)
        rollout(policy, prompts, ids, generator, group, record, window, sample.same_initial_noise)

    def theirs():
        # the denoiser under the policy's autocast as ours; the VAE decodes outside it, as ours
        # does (under fp16 autocast an fp32 VAE would decode in fp16: faster, and it can overflow)
        # an offloaded VAE (memory.offload_vae) visits for the call, as ours visits per decode
        vae = run.pipe.vae
        with policy.autocast(), _decoding_outside_autocast(vae, device):
            with visiting(vae, device, policy.offload_vae):
                run.pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs)

    calls = {"rollout": lambda: ours(True), "rollout_no_record": lambda: ours(False)}
    calls["pipeline"] = theirs

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        return time.perf_counter() - start

    syncs = {name: None for name in calls}
    if burn_in:  # the untimed call also counts the host-device syncs (CUDA only)
        for name, fn in calls.items():
            syncs[name] = count_syncs(device, lambda fn=fn: timed(fn))
    times = {name: [] for name in calls}
    for round_ in range(repeats):
        for name, fn in calls.items():
            if round_ == 0 and not burn_in:  # counted in the first round (a warning per sync)
                seconds = []
                syncs[name] = count_syncs(device, lambda fn=fn, out=seconds: out.append(timed(fn)))
                times[name] += seconds
            else:
                times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    # each rollout is timed next to a pipeline call: the round's ratio cancels slow drifts of a
    # shared machine better than the ratio of medians
    paired = [p / r for r, p in zip(times["rollout"], times["pipeline"], strict=True)]
    extras = [r / n - 1 for r, n in zip(times["rollout"], times["rollout_no_record"], strict=True)]
    return {
        "kind": "vs-pipeline",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": config.model.name,
        "family": family.name,
        "pipeline": type(run.pipe).__name__,
        "resolution": size,
        "steps": sample.num_steps,
        "guidance_scale": sample.guidance_scale,
        "eta": sample.eta,
        "batch": sample.batch_size,
        "repeats": repeats,
        "burn_in": burn_in,
        **{f"{name}_seconds": values for name, values in times.items()},
        **{f"{name}_images_per_second": sample.batch_size / median[name] for name in calls},
        "paired_ratios": paired,
        "ratio": statistics.median(paired),
        "record_overhead": statistics.median(extras),
        **{f"{name}_syncs": count for name, count in syncs.items()},
    }


@contextmanager
def _decoding_outside_autocast(vae, device: torch.device):
    """`vae.decode` with autocast off for the block (the pipeline's call sits inside it), its
    input in the VAE's dtype."""
    decode = vae.decode

    def plain(latents, *args, **kwargs):  # in the VAE's dtype, as the rollout decodes
        with torch.autocast(device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    own = vae.__dict__.get("decode")  # an instance attribute already there, if any
    vae.decode = plain
    try:
        yield
    finally:
        if own is None:
            del vae.decode  # the class's method again
        else:
            vae.decode = own


def count_syncs(device: torch.device, fn) -> int | None:
    """How many times `fn` makes the host wait on the GPU (an `.item()`, a copy without
    `non_blocking`), as CUDA's sync debug mode reports them; None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    # torch's words for each one: "called a synchronizing CUDA operation"
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


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
        title=f"rollout vs {result['pipeline']}.__call__: {result['model']} "
        f"{result['resolution']}px, {result['steps']} steps, batch {result['batch']}, "
        f"guidance {result['guidance_scale']}, eta {result['eta']}, {result['device']}"
    )
    for column in ("", "images/s (median)", "seconds per call"):
        table.add_column(column)
    for name in ("rollout", "rollout_no_record", "pipeline"):
        seconds = ", ".join(f"{s:.2f}" for s in result[f"{name}_seconds"])
        table.add_row(name, f"{result[f'{name}_images_per_second']:.3f}", seconds)
    console.print(table)
    pairs = ", ".join(f"{r:.2f}" for r in result["paired_ratios"])
    console.print(
        f"rollout / pipeline images/s: {result['ratio']:.2f} (median of adjacent pairs: {pairs}); "
        f"keeping log-probs and the chain costs {100 * result['record_overhead']:+.0f}%"
    )
    if result.get("rollout_syncs") is not None:
        console.print(
            f"host-device syncs per call: rollout {result['rollout_syncs']}, "
            f"pipeline {result['pipeline_syncs']}"
        )


__all__ = ["Estimate", "add_bench_arguments", "measure", "run_bench", "vs_pipeline"]

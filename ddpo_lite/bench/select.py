"""`train --vram GB`: choose memory levers that fit a card, from the estimate.

A config that already fits is returned as it is. Otherwise the levers are tried cheapest first
(by what they cost in speed):

1. the free ones, always: attention 'math' -> 'sdpa'; frozen weights in the autocast dtype
   (half_base, unless mixed_precision is 'no'); the text encoder off the accelerator (prompt
   embeddings are cached); the VAE off it but while it decodes; VAE slicing; the prompt list
   encoded 8 prompts at a time;
2. then, in this order, until one fits: gradient checkpointing, the reward offload and
   `reward.overlap` as the config has them; overlap off, where the overlap costs memory (a
   model reward scoring beside a denoising step): each batch is scored before the next one
   samples, exposing the reward's host-side work (its kernels share the GPU with sampling
   either way); the reward model off the accelerator between calls (its weights moved there and
   back per sampling batch); both; then the same four with gradient checkpointing on (about a
   third more training compute); then the frozen denoiser in NF4 (memory.quantize_base, a GPU
   with bitsandbytes: slower matmuls, a slightly different base); then the text encoders run on
   the CPU (memory.encode_on_cpu: a slower setup, nothing per step). At each of these the
   largest forward+backward (samples x timesteps, a binary search over micro-batch and timestep
   chunk) that fits is taken.

A lever the config has on is never turned off (nor overlap back on). A config fits when its
predicted device memory (peak allocated x (1 + allocator overhead) + the CUDA context, see
estimate.py) is at most the budget. The batch the optimizer sees never changes: a smaller
forward+backward is a micro-batch or a timestep chunk inside the same accumulated step.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

from ddpo_lite.bench.estimate import (
    OVERLAP_PHASE,
    Estimate,
    GiB,
    Transients,
    build_meta_models,
    compose,
    train_shape,
)
from ddpo_lite.config import Config, ConfigError

#: Timestep chunks tried, largest first (capped at the timesteps trained per sample).
CHUNKS = (50, 25, 10, 5, 4, 2, 1)


def _fits(estimate: Estimate, budget: int) -> bool:
    return estimate.device_bytes <= budget


def _shapes(config: Config) -> list[tuple[int, int]]:
    """(samples, timesteps) per forward+backward, largest product first."""
    batch = config.train.batch_size
    _, _, k = train_shape(config)
    micros = [m for m in range(batch, 0, -1) if batch % m == 0]
    if not hasattr(config.train, "micro_batch_size"):
        micros = [batch]
    chunks = sorted({min(c, k) for c in CHUNKS} | {k}, reverse=True)
    shapes = {(m, c) for m in micros for c in chunks}
    return sorted(shapes, key=lambda s: (s[0] * s[1], s[1]), reverse=True)


def _with_shape(config: Config, samples: int, chunk: int) -> Config:
    new = copy.deepcopy(config)
    _, _, k = train_shape(config)
    new.train.timestep_chunk = 0 if chunk >= k else chunk
    if hasattr(new.train, "micro_batch_size"):
        new.train.micro_batch_size = 0 if samples >= new.train.batch_size else samples
    return new


class _Search:
    """Estimates for one set of model levers, sharing the meta models and counted transients."""

    def __init__(self, config: Config, shared: dict | None = None):
        self.config = config
        self.models = build_meta_models(config)
        self.transients = Transients(self.models, config)
        if shared is not None:  # inference-only transients do not depend on checkpointing
            self.transients.shared = shared

    def estimate(self, config: Config) -> Estimate:
        self.transients.config = config
        return compose(config, self.models, self.transients)

    def best_shape(self, config: Config, budget: int) -> tuple[Config, Estimate] | None:
        """The largest training shape that fits (binary search: memory grows with the shape)."""
        shapes = _shapes(config)
        lo, hi, found = 0, len(shapes) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = _with_shape(config, *shapes[mid])
            result = self.estimate(candidate)
            if _fits(result, budget):
                found, hi = (candidate, result), mid - 1
            else:
                lo = mid + 1
        return found


def _model_levers(config: Config) -> tuple:
    """The levers that change the models themselves (the rest only change the accounting);
    gradient checkpointing is the fourth (the inference-only transients are shared across it)."""
    m = config.memory
    return (
        m.mixed_precision,
        m.half_base,
        m.attention,
        m.gradient_checkpointing,
        m.vae_slicing,
        m.quantize_base,
        m.drop_t5,
    )


def _rungs(
    config: Config, overlap_costs: bool, reward_model: bool
) -> list[tuple[bool, bool, bool]]:
    """(gradient_checkpointing, offload_reward, reward.overlap) per rung, cheapest first: a lever
    the config has on stays on; overlap is turned off only where it costs memory, and the reward
    offloaded only where it has a model on the card."""
    m = config.memory
    overlaps = (config.reward.overlap, False) if overlap_costs else (config.reward.overlap,)
    offloads = (m.offload_reward, True) if reward_model else (m.offload_reward,)
    rungs = []
    for rung in itertools.product((m.gradient_checkpointing, True), offloads, overlaps):
        if rung not in rungs:
            rungs.append(rung)
    return rungs


def _describe(old: Config, new: Config) -> list[str]:
    changes = []
    for section in ("memory", "reward", "train"):
        before, after = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(after):
            a, b = getattr(before, f.name), getattr(after, f.name)
            if a != b:
                changes.append(f"{section}.{f.name}: {a!r} -> {b!r}")
    return changes


def _report(old: Config, new: Config, result: Estimate, vram_gb: float) -> str:
    changes = _describe(old, new)
    micro, chunk, _ = train_shape(new)
    lines = [
        f"--vram {vram_gb:g}: "
        + ("the config fits as it is" if not changes else "chose " + "; ".join(changes)),
        f"predicted peak {result.peak_bytes / GiB:.2f} GiB allocated, "
        f"{result.device_bytes / GiB:.2f} GiB on the card with allocator overhead and CUDA "
        f"context (budget {vram_gb:g} GiB, margin {vram_gb - result.device_bytes / GiB:.2f} GiB); "
        f"forward+backward on {micro} sample(s) x {chunk} timestep(s); phases: "
        + ", ".join(f"{n} {p.peak_bytes / GiB:.2f}" for n, p in result.phases.items()),
        "this is an estimate (meta-device count, see `ddpo-lite bench --estimate`), not a measurement",
    ]
    return "\n".join(lines)


def select_for_vram(config: Config, vram_gb: float) -> tuple[Config, str]:
    """A copy of `config` with memory levers that fit `vram_gb` GiB, and a report of the choice.

    Raises ConfigError when the budget is not positive, the config runs on the CPU, or no
    combination of levers fits.
    """
    if not vram_gb > 0:
        raise ConfigError(f"--vram {vram_gb} is invalid: give the card's memory in GB, e.g. 8")
    if config.memory.cpu:
        raise ConfigError("--vram picks GPU memory settings, but memory.cpu = true: drop one")
    budget = int(vram_gb * GiB)

    current = _Search(config)
    result = current.estimate(config)
    if _fits(result, budget):
        return config, _report(config, config, result, vram_gb)

    # 1. free levers
    free = copy.deepcopy(config)
    if free.memory.attention == "math":
        free.memory.attention = "sdpa"
    if free.memory.mixed_precision != "no":
        free.memory.half_base = True
    free.memory.offload_text_encoder = True
    free.memory.offload_vae = True  # two copies of its weights per sampling batch
    free.memory.vae_slicing = True
    free.memory.encode_batch_size = min(free.memory.encode_batch_size, 8)  # setup only
    # 2. overlap off, the reward model off the accelerator between calls, both; then 3-4 the
    # same with checkpointing; the config's own setting of a lever is kept unless turning it on
    # is needed (never off)
    ladder = []
    reward = result.phases["reward"].parts
    reward_model = reward.get("reward_weights", 0) + reward.get("reward_weights_visit", 0) > 0
    rungs = _rungs(config, OVERLAP_PHASE in result.phases, reward_model)
    for checkpointing, offload_reward, overlap in rungs:
        step = copy.deepcopy(free)
        step.memory.gradient_checkpointing = checkpointing
        step.memory.offload_reward = offload_reward
        step.reward.overlap = overlap
        ladder.append(step)
    # 5-7. the epoch's chains in CPU memory (a copy per micro-batch), the quantized base, then
    # the text encoders on the CPU (every step above kept on)
    if not config.memory.offload_trajectory:
        step = copy.deepcopy(ladder[-1])
        step.memory.offload_trajectory = True
        ladder.append(step)
    if config.memory.quantize_base == "none":
        step = copy.deepcopy(ladder[-1])
        step.memory.quantize_base = "nf4"
        ladder.append(step)
    if not config.memory.encode_on_cpu:
        step = copy.deepcopy(ladder[-1])
        step.memory.encode_on_cpu = True
        ladder.append(step)
    searches: dict[tuple, _Search] = {_model_levers(config): current}
    shared: dict[tuple, dict] = {}

    def search(step: Config) -> _Search:
        key = _model_levers(step)
        if key not in searches:
            searches[key] = _Search(step, shared.setdefault(key[:3] + key[4:], {}))
        return searches[key]

    # the floor first: every lever on, 1 sample x 1 timestep per forward+backward
    floor = search(ladder[-1]).estimate(_with_shape(ladder[-1], 1, 1))
    if not _fits(floor, budget):
        largest = max(floor.phases, key=lambda n: floor.phases[n].peak_bytes)
        raise ConfigError(
            f"--vram {vram_gb:g}: nothing fits; the leanest settings (every lever on, 1 sample x "
            f"1 timestep per backward) are predicted to need {floor.device_bytes / GiB:.2f} GiB "
            f"(largest phase: {largest}); use a larger card, fewer samples per epoch "
            "(sample.num_batches_per_epoch) or a smaller sample.resolution"
        )
    best = None
    for step in ladder:
        if not _fits(search(step).estimate(_with_shape(step, 1, 1)), budget):
            continue  # not even its smallest forward+backward fits: no shape search
        best = search(step).best_shape(step, budget)
        if best is not None:
            break
    assert best is not None  # the floor fits, and it is the last step's smallest shape
    chosen, estimate = best
    return chosen, _report(config, chosen, estimate, vram_gb)


def suggested_vram(card_bytes: int) -> int:
    """The `--vram` to suggest for a card of `card_bytes`: 85% of it, in whole GB (room for the
    estimate's allocator and context guesses and for what else the card holds)."""
    return max(1, int(0.85 * card_bytes / GiB))


def over_card_warning(config: Config, card_bytes: int) -> str | None:
    """One line when `config`'s predicted device memory is more than a card of `card_bytes`
    holds; None when it fits, or when no estimate can be made for this config."""
    try:
        predicted = _Search(config).estimate(config).device_bytes
    except Exception:  # advisory: an estimate that cannot be made does not stop a run
        return None
    if predicted <= card_bytes:
        return None
    return (
        f"this config is predicted to need {predicted / GiB:.1f} GiB on the GPU, which has "
        f"{card_bytes / GiB:.1f} GiB: it will likely run out of memory. `--vram "
        f"{suggested_vram(card_bytes)}` picks memory levers that fit (a prediction: "
        "`ddpo-lite bench --estimate` shows where it goes)"
    )

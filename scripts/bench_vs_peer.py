"""ddpo-lite's epoch against the DDPO authors' loop structure, on one model with one set of settings.

    OMP_NUM_THREADS=1 python scripts/bench_vs_peer.py                 # sd15-random at 64 px, CPU
    python scripts/bench_vs_peer.py --model tiny --repeats 1          # a fast check
    python scripts/bench_vs_peer.py --chunks 0 1 2 --repeats 5 --json
    python scripts/bench_vs_peer.py --preset aesthetic --resolution 512 --set sample.num_steps=50 \\
        --set sample.batch_size=8 --set train.batch_size=4           # a GPU: the preset's levers

The peer is a minimal reimplementation of kvablack/ddpo-pytorch scripts/train.py (the code the DDPO
paper's results came from): its sampling loop (`pipeline_with_logprob`: one UNet call per step on
the batch doubled for classifier-free guidance, then `ddim_step_with_logprob`, written here from
the DDIM equations) and its training loop (for each train batch, for each of the sample's shuffled
timesteps j: one guided UNet forward on (x_t, t_j), the log-prob of the stored x_{t-1}, PPO's clipped
loss, one backward; the optimizer steps every gradient_accumulation * timesteps backwards, as
`accelerator.accumulate` there does). ddpo-lite runs through its own code (`trainer.sample_epoch`,
`update.update`), which scores `train.timestep_chunk` timesteps of a train batch per forward (0:
all of them at once), once per value of `--chunks`.

Both train the same peft LoRA (ddpo-lite's targets) on one pipeline, each with its own optimizer of
the same kind and settings; the config's sampling, training, precision, attention and memory
settings apply to both. Method: one untimed burn-in epoch of each (on a CPU it runs under the
dispatch counter, which counts live tensor bytes: weights, optimizer state and trajectories
included, and slows the run, hence untimed), then `--repeats` rounds of peer, ours, ours, ...
interleaved, each phase bracketed by `cuda.synchronize()`; on a GPU every epoch's peak is the CUDA
allocator's `max_memory_allocated`, reset per phase. Reported: per-phase medians, and ours / peer
as the median over rounds of the ratio within a round (a shared machine's slow drift cancels).
No reward is computed: the epoch is sampling then training, with random advantages.

Where the peer differs from ddpo-pytorch (none of it changes what a UNet call computes): prompts
come from the config's list, not a prompt function; no reward, logging or checkpoints; its
optimizer steps only on the accumulation boundary (accelerate skips the others) and its backward is
plain `loss.backward()` (no fp16 loss scaling); it runs under the config's autocast (ddpo-pytorch's
LoRA path runs without autocast, on half-precision weights) and the config's gradient
checkpointing, attention backend and VAE slicing, where ddpo-pytorch has none of them. As there,
it encodes each batch's prompts with the text encoder, which stays on the device all epoch.
On a GPU both loops' (LoRA-sized) optimizer states are allocated throughout, so each peak holds
the other's too: a few MiB.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from ddpo_lite.bench.bench import Run, _device_name  # noqa: E402
from ddpo_lite.bench.counting import MemoryCounter  # noqa: E402
from ddpo_lite.bench.sd15 import SD15_RANDOM  # noqa: E402
from ddpo_lite.config import Config, ConfigError, load_config  # noqa: E402
from ddpo_lite.samplers.ddim import DDIMSampler  # noqa: E402

#: Paper-like settings shrunk for a CPU (the paper: 50 steps, sample batch 8 x 4, train batch 4 x
#: accumulation 2, 512 px); `--set` changes any of them.
SETTINGS = [
    "sample.num_steps=20",
    "sample.guidance_scale=5.0",
    "sample.eta=1.0",
    "sample.batch_size=2",
    "sample.num_batches_per_epoch=2",
    "train.batch_size=2",
    "train.gradient_accumulation=1",
    "train.timestep_fraction=1.0",
    "train.num_inner_epochs=1",
    "train.clip_range=1e-4",
    "train.learning_rate=3e-4",
]
PHASES = ("sampling", "training")


# ---------------------------------------------------------------------------------------------
# the peer: ddpo-pytorch's sampling and training loops, minimal
# ---------------------------------------------------------------------------------------------


def peer_ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step and the log-density of x_{t-1}, the way ddpo-pytorch's patched step has it.

    Notation (DDIM, Song et al. 2021, eq. 12 and 16):
        a_t = alphas_cumprod[t], a_prev = alphas_cumprod[t - T/N]
        x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        mean    = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps
        log p   = mean over elements of log N(x_{t-1}; mean, sigma_t^2)

    As there: the alphas are gathered on the CPU (`timestep.cpu()`, a sync on a GPU) and moved to
    the sample's device, the previous timestep is clamped to >= 0 (so the last step uses
    alphas_cumprod[0]: the same as final_alpha_cumprod for set_alpha_to_one=False, as in SD 1.x),
    and x_{t-1} keeps the sample's dtype. Epsilon prediction only (SD 1.x).
    """
    # 1. alphas of t and of the previous timestep, per batch element, broadcast over (C, H, W)
    t = torch.as_tensor(timestep).reshape(-1).cpu()
    prev_t = (t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, scheduler.config.num_train_timesteps - 1
    )
    alphas = scheduler.alphas_cumprod.cpu()
    shape = (-1, *([1] * (sample.ndim - 1)))
    a_t = alphas.gather(0, t).reshape(shape).to(sample.device)
    a_prev = alphas.gather(0, prev_t).reshape(shape).to(sample.device)

    # 2. x0_hat (eq. 12's "predicted x0"), sigma_t (eq. 16), the mean
    x0_hat = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    mean = a_prev**0.5 * x0_hat + (1 - a_prev - sigma**2) ** 0.5 * model_output

    # 3. draw x_{t-1} unless given; its Gaussian log-density, averaged over the latent's elements
    if prev_sample is None:
        noise = torch.randn(
            model_output.shape, generator=generator, device=generator.device if generator else None
        ).to(model_output.device, model_output.dtype)
        prev_sample = mean + sigma * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * sigma**2)
        - torch.log(sigma)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@dataclass
class Peer:
    """The peer's state: the shared pipeline and LoRA parameters, its own optimizer and scheduler."""

    pipe: object
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: DDIMScheduler
    autocast: object
    device: torch.device
    negative_embeds: torch.Tensor  # (1, 77, D): the empty prompt's, encoded once at setup
    latent_side: int = 0  # the latent's side: the run's image size / the VAE factor

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Tokenize and encode, as the peer does for every sampling batch: (B, 77, D)."""
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tokenizer(
            prompts,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
        ).input_ids
        return encoder(ids.to(encoder.device))[0].to(self.device)


def make_peer(run: Run) -> Peer:
    """The peer on `run`'s pipeline: its DDIM scheduler, its optimizer over the same LoRA."""
    from ddpo_lite.trainer import make_optimizer

    config = run.config
    scheduler = DDIMScheduler.from_config(run.pipe.scheduler.config)
    optimizer = make_optimizer(run.params, config.train, config.memory.use_8bit_adam, run.device)
    side = run.policy.resolution // run.pipe.vae_scale_factor  # the size ddpo-lite samples at
    peer = Peer(
        run.pipe, run.params, optimizer, scheduler, run.policy.autocast, run.device, None, side
    )
    with torch.no_grad():
        peer.negative_embeds = peer.encode([""])
    return peer


@torch.no_grad()
def peer_pipeline_with_logprob(
    peer: Peer,
    prompt_embeds: torch.Tensor,
    config: Config,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """ddpo-pytorch's `pipeline_with_logprob`: the guided denoising loop, one UNet call per step
    on the batch doubled; returns (images (B, 3, H, W) in [0, 1], latents x_T..x_0, log-probs)."""
    pipe, scheduler, sample = peer.pipe, peer.scheduler, config.sample
    batch = prompt_embeds.shape[0]
    embeds = torch.cat([peer.negative_embeds.expand(batch, -1, -1), prompt_embeds])
    scheduler.set_timesteps(sample.num_steps, device=peer.device)
    size = peer.latent_side
    shape = (batch, pipe.unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator, device=generator.device)
    latents = latents.to(peer.device, prompt_embeds.dtype) * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds).sample
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + sample.guidance_scale * (text - uncond)
        latents, log_prob = peer_ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, sample.eta, generator=generator
        )
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(image, output_type="pt")
    return images, all_latents, all_log_probs


def peer_batch(peer: Peer, prompt_embeds: torch.Tensor, config: Config, generator) -> dict:
    """One sampling batch as the peer stores it: (B, ...) tensors, x_t and x_{t-1} as views of
    one stacked chain."""
    with peer.autocast():
        _, latents, log_probs = peer_pipeline_with_logprob(peer, prompt_embeds, config, generator)
    latents = torch.stack(latents, dim=1)  # (B, N+1, C, H, W)
    return {
        "prompt_embeds": prompt_embeds,
        "timesteps": peer.scheduler.timesteps.repeat(len(prompt_embeds), 1),  # (B, N)
        "latents": latents[:, :-1],  # x_t before each step
        "next_latents": latents[:, 1:],  # x_{t-1} after it
        "log_probs": torch.stack(log_probs, dim=1),  # (B, N)
    }


def peer_sample(peer: Peer, prompts: list[str], config: Config, generator: torch.Generator):
    """The peer's sampling phase: per batch, encode the prompts, sample, stack the trajectory;
    the epoch's batches concatenated into one dict of (N, ...) tensors (copies: x_t and x_{t-1}
    are then separate tensors, as there)."""
    batches = []
    for _ in range(config.sample.num_batches_per_epoch):
        ids = torch.randint(len(prompts), (config.sample.batch_size,), generator=generator)
        with torch.no_grad():
            embeds = peer.encode([prompts[i] for i in ids.tolist()])
        batches.append(peer_batch(peer, embeds, config, generator))
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def peer_train(
    peer: Peer,
    samples: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    config: Config,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """The peer's training phase: one guided forward and one backward per (train batch, timestep);
    an optimizer step every gradient_accumulation * timesteps backwards. The loss of a backward is
    the batch mean divided by that count (what accelerate's `backward` does under accumulate)."""
    train, guidance, eta = config.train, config.sample.guidance_scale, config.sample.eta
    optimizer = optimizer or peer.optimizer
    unet = peer.pipe.unet
    n, num_steps = samples["timesteps"].shape
    k = int(num_steps * train.timestep_fraction)
    per_step = train.gradient_accumulation * k
    samples = {**samples, "advantages": advantages}
    negative = peer.negative_embeds.expand(train.batch_size, -1, -1)
    rows = torch.arange(n, device=peer.device)[:, None]
    backwards = 0
    unet.train()
    for _ in range(train.num_inner_epochs):
        perm = torch.randperm(n, generator=generator).to(peer.device)
        samples = {key: value[perm] for key, value in samples.items()}
        # each sample's timesteps in its own random order; the first k are trained
        perms = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(n)])
        for key in ("timesteps", "latents", "next_latents", "log_probs"):
            samples[key] = samples[key][rows, perms.to(peer.device)]
        for first in range(0, n, train.batch_size):
            batch = {key: value[first : first + train.batch_size] for key, value in samples.items()}
            embeds = torch.cat([negative, batch["prompt_embeds"]])
            for j in range(k):
                with peer.autocast():
                    noise_pred = unet(
                        torch.cat([batch["latents"][:, j]] * 2),
                        torch.cat([batch["timesteps"][:, j]] * 2),
                        embeds,
                    ).sample
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance * (text - uncond)
                    _, log_prob = peer_ddim_step_with_logprob(
                        peer.scheduler,
                        noise_pred,
                        batch["timesteps"][:, j],
                        batch["latents"][:, j],
                        eta,
                        prev_sample=batch["next_latents"][:, j],
                    )
                adv = batch["advantages"].clamp(-train.adv_clip_max, train.adv_clip_max)
                ratio = torch.exp(log_prob - batch["log_probs"][:, j])
                clipped = ratio.clamp(1.0 - train.clip_range, 1.0 + train.clip_range)
                loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
                (loss / per_step).backward()
                backwards += 1
                if backwards % per_step == 0:
                    torch.nn.utils.clip_grad_norm_(peer.params, train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
    unet.eval()


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def check_settings(config: Config, run: Run) -> None:
    """The settings both loops can run with; a ConfigError names the value and the fix."""
    sample, train = config.sample, config.train
    problems = []
    if run.policy.family.name != "sd1" or not isinstance(run.policy.sampler, DDIMSampler):
        problems.append("the peer loop is SD 1.x with DDIM: use an SD 1.x model")
    if train.algorithm != "ddpo-is":
        problems.append(f"train.algorithm = {train.algorithm!r}: the peer is DDPO-IS")
    if sample.guidance_scale <= 1.0 or sample.eta <= 0:
        problems.append("the peer samples with CFG and eta > 0: sample.guidance_scale > 1, eta > 0")
    if train.first_steps or train.kl_coef or sample.group_size != 1 or sample.sde_window_size:
        problems.append("train.first_steps, kl_coef, sample.group_size, sde_window_size: defaults")
    n = sample.batch_size * sample.num_batches_per_epoch
    if sample.batch_size % train.batch_size or n % (train.batch_size * train.gradient_accumulation):
        problems.append(
            f"sample.batch_size {sample.batch_size} must be a multiple of train.batch_size "
            f"{train.batch_size}, and the epoch's {n} samples of train.batch_size x "
            f"gradient_accumulation {train.batch_size * train.gradient_accumulation} (as the peer "
            "asserts)"
        )
    if problems:
        raise ConfigError("bench_vs_peer: " + "; ".join(problems))


def resident(run: Run, optimizer: torch.optim.Optimizer, text_encoder: bool) -> list[torch.Tensor]:
    """What stays on the device between phases: UNet, VAE, the text encoder if `text_encoder`, and
    this loop's optimizer state (no reward model: neither loop scores here)."""
    models = [run.pipe.unet, run.pipe.vae]
    if text_encoder:
        models.append(run.pipe.text_encoder)
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


@contextmanager
def phase(device: torch.device, counted: bool, tensors, out: dict):
    """Seconds of the block, and its peak: the CUDA allocator's, or the CPU dispatch counter's
    when `counted` (`tensors`: a callable giving what already lives on the device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if device.type == "cuda":
        yield
        torch.cuda.synchronize(device)
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    elif counted:
        with MemoryCounter(device_type=device.type) as counter:
            counter.register(tensors())
            yield
        out["peak_bytes"] = counter.peak
    else:
        yield
    out["seconds"] = time.perf_counter() - start


def advantages_for(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random unit-normal advantages (no reward is computed: only the arithmetic is timed)."""
    return torch.randn(n, generator=generator).to(device)


def peer_epoch(run: Run, peer: Peer, config: Config, generator, counted: bool) -> dict:
    """The peer's epoch. Its text encoder is on the device all epoch, as in ddpo-pytorch (where
    ddpo-lite offloads it, it visits for the peer's epoch; the moves are not timed)."""
    stats = {name: {} for name in PHASES}
    encoder = run.pipe.text_encoder
    home = encoder.device
    encoder.to(run.device)

    with phase(run.device, counted, lambda: resident(run, peer.optimizer, True), stats["sampling"]):
        samples = peer_sample(peer, run.prompts, config, generator)
    n = samples["timesteps"].shape[0]
    advantages = advantages_for(n, generator, run.device)
    # the training phase owns the samples, as the peer's loop does (it rebinds them when it
    # shuffles, freeing the epoch's copy): the counter holds only weak references
    box = [samples]
    del samples

    def tensors():
        return resident(run, peer.optimizer, True) + list(box[0].values())

    with phase(run.device, counted, tensors, stats["training"]):
        peer_train(peer, box.pop(), advantages, config, generator)
    encoder.to(home)
    return stats


def ours_epoch(run: Run, config: Config, counted: bool) -> dict:
    from ddpo_lite.trainer import sample_epoch
    from ddpo_lite.update import update

    def no_reward(images, prompts, metadata):
        return np.zeros(len(images)), {}

    stats = {name: {} for name in PHASES}
    on_device = not config.memory.offload_text_encoder  # else it stays on the CPU (all cached)
    components = SimpleNamespace(policy=run.policy)
    with phase(
        run.device, counted, lambda: resident(run, run.optimizer, on_device), stats["sampling"]
    ):
        samples = sample_epoch(
            components, run.prompts, config, run.generator, run.accelerator, no_reward
        )
    trajectory = samples.trajectory
    held = [trajectory.chain, trajectory.log_probs, trajectory.timesteps, trajectory.prompt_embeds]
    n = len(trajectory)
    advantages = advantages_for(n, run.generator, run.device)
    with phase(
        run.device,
        counted,
        lambda: resident(run, run.optimizer, on_device) + held,
        stats["training"],
    ):
        update(
            run.accelerator,
            run.policy,
            run.model,
            run.optimizer,
            run.params,
            trajectory,
            advantages,
            torch.ones(n, dtype=torch.bool, device=run.device),
            config,
            run.generator,
        )
    return stats


def with_chunk(config: Config, chunk: int) -> Config:
    config = copy.deepcopy(config)
    config.train.timestep_chunk = chunk
    return config


def build(config: Config, resolution: int | None) -> tuple[Run, Peer]:
    """One pipeline with ddpo-lite's LoRA (its bench `Run`, set up as the trainer does), and the
    peer on the same pipeline."""
    run = Run(config, resolution)
    check_settings(config, run)
    return run, make_peer(run)


def compare(config: Config, resolution: int | None, chunks: list[int], repeats: int, log) -> dict:
    """Burn-in of each, then `repeats` interleaved rounds; the result `--json` prints."""
    run, peer = build(config, resolution)
    device = run.device
    generator = torch.Generator().manual_seed(config.seed + 1)
    names = ["peer"] + [f"ours chunk {c}" for c in chunks]
    configs = {f"ours chunk {c}": with_chunk(config, c) for c in chunks}

    def epoch(name: str, counted: bool) -> dict:
        if name == "peer":
            return peer_epoch(run, peer, config, generator, counted)
        return ours_epoch(run, configs[name], counted)

    epochs: dict[str, list[dict]] = {name: [] for name in names}
    memory: dict[str, dict] = {}
    for name in names:  # burn-in; on a CPU under the counter, untimed
        log(f"burn-in: {name}")
        memory[name] = epoch(name, counted=True)
    for r in range(repeats):
        for name in names:
            log(f"round {r + 1}/{repeats}: {name}")
            epochs[name].append(epoch(name, counted=False))

    result = {}
    for name in names:
        runs = epochs[name]
        peaks = [e for e in [memory[name], *runs] if "peak_bytes" in e["sampling"]]
        entry = {}
        for p in (*PHASES, "epoch"):
            seconds = [
                sum(e[q]["seconds"] for q in PHASES) if p == "epoch" else e[p]["seconds"]
                for e in runs
            ]
            entry[p] = {"seconds": seconds, "median_seconds": statistics.median(seconds)}
            if p != "epoch":
                entry[p]["peak_bytes"] = max(e[p]["peak_bytes"] for e in peaks)
        entry["peak_bytes"] = max(entry[p]["peak_bytes"] for p in PHASES)
        result[name] = entry
    ratios = {}
    for name in names[1:]:
        ratios[name] = {
            p: statistics.median(
                o / q
                for o, q in zip(
                    result[name][p]["seconds"], result["peer"][p]["seconds"], strict=True
                )
            )
            for p in (*PHASES, "epoch")
        }
        for p in PHASES:
            ratios[name][f"{p}_memory"] = (
                result[name][p]["peak_bytes"] / result["peer"][p]["peak_bytes"]
            )
        ratios[name]["memory"] = result[name]["peak_bytes"] / result["peer"]["peak_bytes"]
    sample, train = config.sample, config.train
    return {
        "kind": "vs-peer",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model": config.model.name,
        "resolution": run.policy.resolution,
        "peak_source": "cuda-allocator" if device.type == "cuda" else "dispatch-counter",
        "repeats": repeats,
        "settings": {
            "steps": sample.num_steps,
            "guidance_scale": sample.guidance_scale,
            "eta": sample.eta,
            "sample_batch": sample.batch_size,
            "batches_per_epoch": sample.num_batches_per_epoch,
            "train_batch": train.batch_size,
            "gradient_accumulation": train.gradient_accumulation,
            "timestep_fraction": train.timestep_fraction,
            "inner_epochs": train.num_inner_epochs,
            "clip_range": train.clip_range,
            "learning_rate": train.learning_rate,
            "memory": dict(vars(config.memory)),
        },
        "runs": result,
        "ratios": ratios,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    table = Table(
        title=f"ddpo-lite vs the ddpo-pytorch loop: {result['model']} {result['resolution']}px, "
        f"{s['steps']} steps, CFG {s['guidance_scale']}, {s['sample_batch']} x "
        f"{s['batches_per_epoch']} samples, train batch {s['train_batch']} x "
        f"{s['gradient_accumulation']}, {result['device']}, median of {result['repeats']}"
    )
    columns = ["loop", "sampling s", "training s", "epoch s", "sampling MiB", "training MiB"]
    columns += ["time ours/peer (samp, train, epoch)", "memory ours/peer (samp, train, peak)"]
    for column in columns:
        table.add_column(column)
    for name, entry in result["runs"].items():
        ratio = result["ratios"].get(name)
        time_ratio = memory_ratio = "-"
        if ratio:
            time_ratio = f"{ratio['sampling']:.2f}, {ratio['training']:.2f}, {ratio['epoch']:.2f}"
            memory_ratio = (
                f"{ratio['sampling_memory']:.2f}, {ratio['training_memory']:.2f}, "
                f"{ratio['memory']:.2f}"
            )
        table.add_row(
            name,
            *(f"{entry[p]['median_seconds']:.2f}" for p in (*PHASES, "epoch")),
            *(f"{entry[p]['peak_bytes'] / 2**20:,.0f}" for p in PHASES),
            time_ratio,
            memory_ratio,
        )
    console = Console(soft_wrap=True, markup=False)
    console.width = max(console.width, 150)  # the ratio columns, unwrapped, also when piped
    console.print(table)
    console.print(
        f"peak memory by {result['peak_source']} (live tensor bytes, weights and optimizer state "
        "included); time ratios: median over rounds of ours / peer within a round"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SD15_RANDOM, help="sd15-random (default) or tiny")
    parser.add_argument(
        "--resolution", type=int, help="image side (default: 64 for sd15-random, else native)"
    )
    parser.add_argument("--preset", default="tiny", help="base preset (default tiny: CPU, fp32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--chunks", type=int, nargs="+", help="ddpo-lite's timestep_chunk values")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # no reward is scored: the JPEG one builds no model that would sit on the device for both
    fixed = [f'model.name="{args.model}"', 'reward.name="jpeg_compressibility"']
    config = load_config(args.preset, [*SETTINGS, *args.set, *fixed])
    chunks = args.chunks or list(dict.fromkeys([config.train.timestep_chunk, 1]))
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: give at least 1")

    from rich.console import Console

    status = Console(stderr=True)

    resolution = args.resolution or (64 if args.model == SD15_RANDOM else None)
    result = compare(config, resolution, chunks, args.repeats, status.log)  # progress: stderr
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The DDPO update: a chunked gradient accumulator over an epoch's trajectories.

A train batch of `train.batch_size` samples is scored `train.timestep_chunk` timesteps at a time
(one forward+backward each), and the optimizer steps once per `train.gradient_accumulation`
batches. Losses are sums divided by the element count of the whole optimizer step, so the
accumulated gradient equals the unchunked one. Under DDP, gradients are all-reduced only on the
last backward of each optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from ddpo_lite.algorithms import (
    awm_loss,
    ddpo_is_loss,
    ddpo_sf_loss,
    nft_loss,
    optimality_probability,
    rwr_loss,
)
from ddpo_lite.config import ONE_STEP_ALGORITHMS, TRAJECTORY_FREE, Config
from ddpo_lite.drift import adapters_disabled
from ddpo_lite.policy import Policy
from ddpo_lite.sampling import Trajectory


@dataclass
class UpdateSettings:
    """What one chunk's loss needs besides the data and the policy."""

    algorithm: str
    clip_range: float
    kl_coef: float = 0.0
    adv_clip_max: float = 5.0
    nft_beta: float = 1.0
    awm_weighting: str = "uniform"
    awm_power: float = 0.25


def score_log_probs(
    policy: Policy,
    model: torch.nn.Module,
    batch: Trajectory,
    cols: torch.Tensor,
    kl_coef: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta(x_{t-1} | x_t) of the stored steps `cols` ((B, k) indices), shape (B, k).

    The same `Policy.predict` + sampler step the rollout used, on the stored float32 latents,
    under the same autocast and CFG; `model` is the policy's denoiser (DDP-wrapped for the
    update). With `kl_coef` > 0 also returns each step's KL(policy || base) (B, k), the base
    being the same denoiser with its LoRA disabled.
    """
    rows = torch.arange(len(batch), device=cols.device)[:, None]
    k = cols.shape[1]
    x_t = batch.latents[rows, cols].flatten(0, 1)  # (B*k, C, H, W)
    x_prev = batch.next_latents[rows, cols].flatten(0, 1)
    t = batch.timesteps[rows, cols].flatten()
    cond = batch.cond.repeat_interleave(k)
    model_output = policy.predict(x_t, t, cond, batch.negative, model=model)
    _, log_prob = policy.sampler.step(model_output, t, x_t, prev_sample=x_prev)
    if not kl_coef:
        return log_prob.view(len(batch), k)
    inner = getattr(model, "module", model)  # DDP wraps it; the adapters live on the inner model
    with torch.no_grad(), adapters_disabled(inner):
        base_output = policy.predict(x_t, t, cond, batch.negative, model=inner)
    kl = policy.sampler.kl(model_output, base_output, t, x_t)
    return log_prob.view(len(batch), k), kl.view(len(batch), k)


def chunk_loss(
    policy: Policy,
    model: torch.nn.Module,
    batch: Trajectory,
    cols: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    settings: UpdateSettings,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss of one chunk: samples `batch`, their steps `cols` (B, k), per-sample
    `weights` (B,) = advantages (DDPO) or RWR weights; samples with `valid` False add nothing."""
    if settings.algorithm in TRAJECTORY_FREE:
        return matching_loss(policy, model, batch, cols, weights, valid, settings, generator)
    if settings.algorithm == "rwr":
        # denoising loss on the final samples x_0, noised afresh at the chunk's timesteps
        _, t, noise, noisy, cond = noised_final_samples(policy, batch, cols, generator)
        noise_pred = policy.predict(noisy, t, cond, None, model=model)
        return rwr_loss(noise_pred, noise, (weights * valid).repeat_interleave(cols.shape[1]))

    scored = score_log_probs(policy, model, batch, cols, kl_coef=settings.kl_coef)
    log_prob, kl = scored if settings.kl_coef else (scored, None)
    old = batch.log_probs[torch.arange(len(batch), device=cols.device)[:, None], cols]
    # a dropped sample scores as its old log-prob: ratio 1, advantage 0, no gradient, no stats
    log_prob = torch.where(valid[:, None], log_prob, old)
    adv = (weights * valid)[:, None].expand_as(log_prob)
    if settings.algorithm in ("ddpo-is", "grpo"):  # GRPO: PPO's clipped ratio, group advantages
        loss, stats = ddpo_is_loss(log_prob, old, adv, settings.clip_range)
    else:
        loss, stats = ddpo_sf_loss(log_prob, old, adv)
    if kl is not None:
        kl_sum = (kl * valid[:, None]).sum()
        loss = loss + settings.kl_coef * kl_sum
        stats["kl_penalty"] = kl_sum.detach()
    return loss, stats


def noised_final_samples(
    policy: Policy, batch: Trajectory, cols: torch.Tensor, generator: torch.Generator | None
):
    """Each sample's final latent x0 noised afresh at its timesteps `cols` (B, k), for the
    denoising losses (RWR, NFT, AWM): (x0, t, noise, x_t, cond), each with B*k rows."""
    k = cols.shape[1]
    rows = torch.arange(len(batch), device=cols.device)[:, None]
    x0 = batch.final_latents.repeat_interleave(k, dim=0)  # (B*k, C, H, W)
    t = batch.timesteps[rows, cols].flatten()
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = policy.sampler.add_noise(x0, noise, t)
    return x0, t, noise, x_t, batch.cond.repeat_interleave(k)


def matching_loss(
    policy: Policy,
    model: torch.nn.Module,
    batch: Trajectory,
    cols: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    settings: UpdateSettings,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NFT's or AWM's summed loss: each sample's final latent x0 noised afresh at the sampling
    grid's timesteps `cols` (B, k), the conditional prediction (no CFG) against its target.

    The old (sampling-time) policy NFT needs is the current one, detached: these algorithms
    take one optimizer step per epoch, so until that step the LoRA is the one that sampled. No
    second copy of any weights and no second forward. Dropped samples (`valid` False) add 0.
    """
    k = cols.shape[1]
    sampler = policy.sampler
    x0, t, noise, x_t, cond = noised_final_samples(policy, batch, cols, generator)
    output = policy.predict(x_t, t, cond, None, model=model)
    mask = valid.repeat_interleave(k).float()
    advantages = weights.repeat_interleave(k) * mask
    if settings.algorithm == "nft":
        x0_pred = sampler.predict_x0(output, t, x_t)
        r = optimality_probability(advantages, settings.adv_clip_max)
        loss, stats = nft_loss(
            x0_pred * mask.view(-1, 1, 1, 1),  # a dropped sample's error is 0: it adds nothing
            x0_pred.detach() * mask.view(-1, 1, 1, 1),
            x0 * mask.view(-1, 1, 1, 1),
            r,
            settings.nft_beta,
            settings.adv_clip_max,
        )
    else:
        target = sampler.target(x0, noise, t)
        loss, stats = awm_loss(
            output,
            target,
            advantages,
            sampler.noise_level(t),
            settings.awm_weighting,
            settings.awm_power,
        )
    if settings.kl_coef:  # the papers' KL to the base: || output - base output ||^2
        inner = getattr(model, "module", model)
        with torch.no_grad(), adapters_disabled(inner):
            base = policy.predict(x_t, t, cond, None, model=inner)
        kl = ((output - base) ** 2).flatten(1).mean(1) * mask
        loss = loss + settings.kl_coef * kl.sum()
        stats["kl_penalty"] = kl.sum().detach()
    return loss, stats


def accumulate_step(
    accelerator: Accelerator,
    policy: Policy,
    model: torch.nn.Module,
    batches: Sequence[tuple[Trajectory, torch.Tensor, torch.Tensor, torch.Tensor]],
    settings: UpdateSettings,
    timestep_chunk: int,
    generator: torch.Generator | None = None,
    micro_batch: int = 0,
) -> dict[str, float]:
    """Forward+backward for one optimizer step, without stepping.

    `batches`: (samples, cols (B, k), weights (B,), valid (B,) bool) per train batch. Each batch
    is split into micro-batches of `micro_batch` samples (0 = the whole batch), and each of those
    runs `timestep_chunk` of its k timesteps per forward+backward (0 = all). Every piece's summed
    loss is divided by the valid element count of the whole step, so the gradient is that of the
    step's mean loss however it is split. DDP all-reduces only on the step's last backward.
    """
    total = sum(int(valid.sum()) * cols.shape[1] for _, cols, _, valid in batches)
    total = max(total, 1)
    # a micro-batch is gathered (and its chain brought to the device) when its turn comes, so
    # one micro-batch's copy exists at a time
    micros = []  # (train batch, its rows or None = all of them)
    chunks = []  # (micro-batch index, cols, weights, valid) per forward+backward
    for samples, cols, weights, valid in batches:
        n, k = cols.shape
        rows = micro_batch if 0 < micro_batch < n else n
        size = timestep_chunk if 0 < timestep_chunk < k else k
        for first in range(0, n, rows):
            part = slice(first, first + rows)
            micros.append((samples, None if rows == n else part))
            for start in range(0, k, size):
                chunks.append(
                    (len(micros) - 1, cols[part, start : start + size], weights[part], valid[part])
                )
    # the statistics stay on the device until the step's end: one read, not one per backward
    sums: dict[str, torch.Tensor] = {}
    held_index, held = -1, None
    for i, (m, cols, weights, valid) in enumerate(chunks):
        if m != held_index:
            held = None  # the previous micro-batch goes before the next one is gathered
            samples, part = micros[m]
            if part is not None:
                samples = samples.index(torch.arange(len(samples), device=cols.device)[part])
            held_index, held = m, samples.on_device()
            del samples
        last = i == len(chunks) - 1
        context = torch.enable_grad() if last else accelerator.no_sync(model)
        with context:
            loss, stats = chunk_loss(policy, model, held, cols, weights, valid, settings, generator)
            accelerator.backward(loss / total)
        for name, value in {"loss": loss, **stats}.items():
            value = torch.as_tensor(value).detach().float()
            if name == "ratio_dev":
                sums[name] = torch.maximum(sums[name], value) if name in sums else value
            else:
                sums[name] = sums.get(name, 0.0) + value / total
    return {name: float(value) for name, value in sums.items()}


def timestep_columns(
    num_samples: int,
    num_steps: int,
    fraction: float,
    generator: torch.Generator,
    first_steps: int = 0,
) -> torch.Tensor:
    """A random subset of int(n * fraction) (at least 1) steps per sample, (N, k), drawn from
    the first `first_steps` denoising steps (0 = from all n = num_steps)."""
    window = min(first_steps, num_steps) if first_steps else num_steps
    k = max(1, int(window * fraction))
    return torch.stack(
        [torch.randperm(window, generator=generator)[:k] for _ in range(num_samples)]
    )


def update(
    accelerator: Accelerator,
    policy: Policy,
    model: torch.nn.Module,
    optimizer,
    params: list[torch.nn.Parameter],
    trajectory: Trajectory,
    weights: torch.Tensor,
    valid: torch.Tensor,
    config: Config,
    generator: torch.Generator,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """The inner epochs of one epoch's update; returns the mean of each statistic per step.
    `model` is the policy's denoiser as the optimizer sees it (DDP-wrapped under several
    processes)."""
    train = config.train
    settings = UpdateSettings(
        train.algorithm,
        train.clip_range,
        train.kl_coef,
        train.adv_clip_max,
        train.nft_beta,
        train.awm_weighting,
        train.awm_power,
    )
    device = trajectory.device
    num_samples, num_steps = trajectory.timesteps.shape
    history: list[dict[str, float]] = []
    model.train()
    for _ in range(train.num_inner_epochs):
        order = torch.randperm(num_samples, generator=generator).to(device)
        cols = timestep_columns(
            num_samples, num_steps, train.timestep_fraction, generator, train.first_steps
        ).to(device)
        row_groups = order.split(train.batch_size)
        one_step = train.algorithm in ONE_STEP_ALGORITHMS
        per_step = len(row_groups) if one_step else train.gradient_accumulation
        for start in range(0, len(row_groups), per_step):
            # gather only this optimizer step's samples: no copy of the whole epoch's trajectory
            batches = [
                (trajectory.index(rows), cols[rows], weights[rows], valid[rows])
                for rows in row_groups[start : start + per_step]
            ]
            if not _any_valid(accelerator, batches):
                continue  # every sample of this step was dropped: AdamW would still move the LoRA
            step_stats = accumulate_step(
                accelerator,
                policy,
                model,
                batches,
                settings,
                train.timestep_chunk,
                generator,
                micro_batch=train.micro_batch_size,
            )
            grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_stats["grad_norm"] = float(grad_norm)
            history.append(step_stats)
            progress()
    model.eval()
    if not history:
        return {}
    return {name: float(np.mean([h[name] for h in history])) for name in history[0]}


def _any_valid(accelerator: Accelerator, batches) -> bool:
    """Whether any process has a sample left in this optimizer step (the same on every process,
    so that all of them step, or none)."""
    count = torch.tensor(
        [sum(int(valid.sum()) for *_, valid in batches)], device=accelerator.device
    )
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return bool(count.item() > 0)


def optimizer_steps(config: Config, num_samples: int) -> int:
    batches = math.ceil(num_samples / config.train.batch_size)
    one_step = config.train.algorithm in ONE_STEP_ALGORITHMS
    per_step = batches if one_step else config.train.gradient_accumulation
    return config.train.num_inner_epochs * math.ceil(batches / per_step)

"""The policy-gradient losses of the DDPO paper, as pure functions of tensors.

Each returns `(loss, stats)`: `loss` is the SUM over the elements it is given (so a caller that
splits a batch into chunks adds the chunks' losses and divides once by the batch's element count,
and the gradient is the same as the unsplit mean), `stats` holds detached sums for logging.

- DDPO-IS (`ddpo_is_loss`): PPO's clipped importance-sampling objective, per (sample, timestep):
  max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(logp_new - logp_old).
- DDPO-SF (`ddpo_sf_loss`): the score-function (REINFORCE) estimator, -A * logp_new, valid only
  on-policy: one optimizer step per round of sampling.
- RWR (`rwr_loss`): reward-weighted regression, the denoising loss on the final samples weighted
  per sample, the baseline the paper compares against.

Log-probs are the per-element MEAN of the Gaussian log-density (see sampling.py), so the clip
range eps is a bound on the ratio of those averaged densities, as in the authors' code.
"""

from __future__ import annotations

import torch


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped loss summed over elements; all inputs share one shape, e.g. (B, T)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).sum()
    with torch.no_grad():
        stats = {
            # k3-free estimate used by the DDPO code: 0.5 * (logp - logp_old)^2
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).sum(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().sum(),
            "ratio_dev": (ratio - 1.0).abs().max(),
        }
    return loss, stats


def ddpo_sf_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score-function loss -A * logp summed over elements (no ratio, no clipping)."""
    loss = (-advantages * log_prob).sum()
    with torch.no_grad():
        stats = {
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).sum(),
            "clipfrac": torch.zeros((), device=log_prob.device),
            "ratio_dev": (torch.exp(log_prob - old_log_prob) - 1.0).abs().max(),
        }
    return loss, stats


def rwr_loss(
    noise_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted denoising loss summed over samples: sum_i w_i * mean_elems (eps_hat - eps)^2.

    noise_pred, noise: (B, C, H, W); weights: (B,).
    """
    mse = ((noise_pred.float() - noise.float()) ** 2).flatten(1).mean(1)
    loss = (weights * mse).sum()
    with torch.no_grad():
        stats = {"mse": mse.sum()}
    return loss, stats


def rwr_weights(
    rewards: torch.Tensor, weighting: str, temperature: float, sparse_quantile: float
) -> torch.Tensor:
    """Per-sample RWR weights, normalised to mean 1 over the batch.

    "exp": w ∝ exp((r - max r) / temperature) (the paper's RWR, with beta = 1 / temperature);
    "sparse": w ∝ 1[r >= quantile(r, sparse_quantile)] (the paper's sparse RWR).
    """
    rewards = rewards.float()
    if weighting == "exp":
        weights = torch.exp((rewards - rewards.max()) / temperature)
    elif weighting == "sparse":
        weights = (rewards >= torch.quantile(rewards, sparse_quantile)).float()
    else:
        raise ValueError(f"unknown RWR weighting {weighting!r}; expected 'exp' or 'sparse'")
    return weights * (len(weights) / weights.sum())

"""The losses: the DDPO paper's and the log-prob-free ones, as pure functions of tensors.

Each returns `(loss, stats)`: `loss` is the SUM over the elements it is given (so a caller that
splits a batch into chunks adds the chunks' losses and divides once by the batch's element count,
and the gradient is the same as the unsplit mean), `stats` holds detached sums for logging.

- DDPO-IS (`ddpo_is_loss`): PPO's clipped importance-sampling objective, per (sample, timestep):
  max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(logp_new - logp_old).
- DDPO-SF (`ddpo_sf_loss`): the score-function (REINFORCE) estimator, -A * logp_new, valid only
  on-policy: one optimizer step per round of sampling.
- RWR (`rwr_loss`): reward-weighted regression, the denoising loss on the final samples weighted
  per sample, the baseline the paper compares against.
- DiffusionNFT (`nft_loss`, Zheng et al. 2025): on the final samples only, noised afresh, the
  current prediction mixed with the old policy's into an implicit positive and negative policy,
  weighted by the reward's optimality probability (`optimality_probability`). No log-prob, no
  trajectory.
- AWM (`awm_loss`, advantage-weighted matching, arXiv 2509.25050): the denoising / flow-matching
  loss on the final samples weighted by the (signed) advantage. No log-prob, no trajectory.

docs/ALGORITHM.md writes the two log-prob-free objectives out with their sources.

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


def nft_loss(
    x0_pred: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    optimality: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's negative-aware loss, summed over samples (Zheng et al. 2025; NVlabs'
    scripts/train_nft_sd3.py), in x0 space so that it reads the same for every parametrisation.

    x0_pred, x0_old: (B, C, H, W) the clean sample the current and the old (sampling-time)
    policy predict from the same x_t; x0: the sampled clean latent the x_t was noised from;
    optimality: (B,) r in [0, 1], the reward mapped to an optimality probability (see
    `optimality_probability`). The implicit positive and negative policies mix the two
    predictions (every model output is affine in x0_hat at fixed x_t, so mixing x0_hat is mixing
    the outputs):
        x0+ = beta * x0_pred + (1 - beta) * x0_old,   x0- = (1 + beta) * x0_old - beta * x0_pred
        l+- = mean_elems (x0+- - x0)^2 / sg(mean_elems |x0+- - x0|)   (the code's adaptive weight)
        loss_i = (adv_clip_max / beta) * (r_i * l+ + (1 - r_i) * l-)
    """
    x0_pred, x0_old, x0 = x0_pred.float(), x0_old.float().detach(), x0.float()
    positive = beta * x0_pred + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_pred

    def adaptive(x0_hat: torch.Tensor) -> torch.Tensor:
        error = x0_hat - x0
        with torch.no_grad():
            scale = error.abs().flatten(1).mean(1).clamp(min=1e-5)
        return (error**2).flatten(1).mean(1) / scale

    positive_loss, negative_loss = adaptive(positive), adaptive(negative)
    per_sample = optimality * positive_loss + (1 - optimality) * negative_loss
    loss = (adv_clip_max / beta * per_sample).sum()
    with torch.no_grad():
        stats = {"positive_loss": positive_loss.sum(), "negative_loss": negative_loss.sum()}
    return loss, stats


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DiffusionNFT's reward -> optimality mapping: r = clip(A, -m, m) / m / 2 + 1/2, in [0, 1]
    (A: the normalised advantage; m = adv_clip_max). A = 0 (the baseline) gives 1/2."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0, 1)


def awm_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    noise_level: torch.Tensor,
    weighting: str = "uniform",
    power: float = 0.25,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage-weighted matching, summed over samples (AWM, arXiv 2509.25050; the authors'
    train_sd3_awm.py with its on-policy configs, where the PPO ratio is 1): the model's own
    denoising / flow-matching error on the final samples, weighted by the advantage.

    model_output, target: (B, C, H, W) the prediction and its regression target (epsilon, v or
    flow velocity, as the model predicts); advantages: (B,), clipped; noise_level: (B,) t of the
    noised input (flow t, or sigma_t = sqrt(1 - alpha_bar_t) for a DDPM model).
        e_i = mean_elems (output - target)^2
        "uniform": l_i = e_i          "ghuber": l_i = t_i * ((e_i + 1e-10)^p - 1e-10^p) / p
        loss = sum_i A_i * l_i        (A > 0 pulls the model towards that sample, A < 0 away)
    """
    error = ((model_output.float() - target.float()) ** 2).flatten(1).mean(1)
    if weighting == "uniform":
        matched = error
    elif weighting == "ghuber":
        matched = noise_level * ((error + 1e-10) ** power - 1e-10**power) / power
    else:
        raise ValueError(f"unknown AWM weighting {weighting!r}; expected 'uniform' or 'ghuber'")
    loss = (advantages * matched).sum()
    with torch.no_grad():
        stats = {"mse": error.sum()}
    return loss, stats

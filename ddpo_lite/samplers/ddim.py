"""The DDIM step as a Gaussian policy: mean and std, a step with its log-probability, the
closed-form KL between two policies' steps, and the forward noising the denoising losses use.

DDPO treats each DDIM step with eta > 0 as an action drawn from a Gaussian policy
pi(x_{t-1} | x_t, c). `ddim_step_with_logprob` takes that step and returns the log-density of the
sample it took (or of one it is given), so the trainer can recompute the same quantity under the
current LoRA. `DDIMSampler` holds a scheduler with its timesteps set and the eta: the sampler a
policy steps with. It knows a scheduler's numbers and nothing of model families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] reshaped to broadcast over a (batch, ...) tensor with `ndim` dims."""
    out = values.to(index.device)[index]
    return out.reshape(-1, *([1] * (ndim - 1)))


def ddim_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (like `sample`) and std (broadcastable, (B, 1, ...)) of the DDIM policy
    p(x_{t-1} | x_t), in float32; `ddim_step_with_logprob` documents the formulas. eta = 0 is
    the deterministic DDIM step (std 0: no log-probability)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before stepping")
    if scheduler.config.thresholding:
        raise ValueError("DDIM thresholding is not supported: set scheduler thresholding=False")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    model_output = model_output.float()
    sample = sample.float()
    ndim = sample.ndim
    batch = sample.shape[0]
    device = sample.device

    # 1. alphas for t and for the previous timestep t - T/N (per batch element)
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch)
    step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step_size
    alphas_cumprod = scheduler.alphas_cumprod.float()
    alpha_prod_t = _gather(alphas_cumprod, t, ndim)
    final = float(scheduler.final_alpha_cumprod)  # a host scalar: no copy to the device
    alpha_prod_prev = torch.where(
        prev_t >= 0, alphas_cumprod.to(device)[prev_t.clamp(min=0)], final
    ).reshape(-1, *([1] * (ndim - 1)))
    beta_prod_t = 1 - alpha_prod_t

    # 2. x0_hat and eps from the model output
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_eps = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_prod_t.sqrt() * pred_x0) / beta_prod_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    # 3. clipping of x0_hat, as DDIMScheduler does it (eps is not recomputed: use_clipped_model_output=False)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    # 4. mean and std of the Gaussian (DDIM eq. 12 and 16)
    variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev = eta * variance.sqrt()
    direction = (1 - alpha_prod_prev - std_dev**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prod_prev.sqrt() * pred_x0 + direction
    return mean, std_dev


def ddim_kl(
    scheduler: DDIMScheduler,
    policy_output: torch.Tensor,
    base_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """KL(policy || base) of one DDIM step from the same x_t, shape (batch,).

    Both are Gaussians with the same std (it depends on t and eta only), so the KL is
    |mean_policy - mean_base|^2 / (2 std^2), averaged over the latent's elements like the log-prob.
    """
    mean_policy, std = ddim_mean_std(scheduler, policy_output, timestep, sample, eta)
    mean_base, _ = ddim_mean_std(scheduler, base_output, timestep, sample, eta)
    kl = (mean_policy - mean_base) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, sample.ndim)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy; returns (prev_sample, log_prob).

    Notation (DDIM paper, Song et al. 2021, eq. 12; diffusers `DDIMScheduler.step`):
        a_t     = alphas_cumprod[t],  a_prev = alphas_cumprod[t - T/N] (or final_alpha_cumprod)
        x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)             (epsilon prediction)
        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        mean    = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps
        x_{t-1} ~ N(mean, sigma_t^2 I)

    Steps:
        1. look up a_t, a_prev per batch element (`timestep` may be a scalar or shape (batch,)),
        2. predict x0_hat and eps from the model output (epsilon, v_prediction or sample),
        3. clip x0_hat as the scheduler is configured to (thresholding is not supported),
        4. compute mean and sigma_t; draw x_{t-1} unless `prev_sample` is given,
        5. log N(x_{t-1}; mean, sigma_t^2), averaged over the latent's elements.

    Reduction: the log-density is the MEAN over the non-batch elements (C*H*W), as in the DDPO
    authors' code, not the sum; log_prob has shape (batch,). The PPO clip range is interpreted
    against this per-element average. Everything is computed in float32 whatever the input dtype.

    Held against `diffusers.DDIMScheduler.step(..., eta=eta, variance_noise=z)` in
    tests/test_sampling.py: same mean and std, and the same density as a float64 reference.
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a stochastic policy with a log-probability, got {eta}"
        )
    mean, std_dev = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    device = sample.device
    ndim = sample.ndim
    if prev_sample is None:
        noise = torch.randn(
            sample.shape, generator=generator, device=generator.device if generator else device
        ).to(device)
        prev_sample = mean + std_dev * noise

    # 5. Gaussian log-density, averaged over the latent's elements -> (batch,)
    log_prob = (
        -((prev_sample.detach().float() - mean) ** 2) / (2 * std_dev**2)
        - torch.log(std_dev)
        - _LOG_SQRT_2PI
    )
    log_prob = log_prob.mean(dim=tuple(range(1, ndim)))
    return prev_sample, log_prob


def _alpha_bar(scheduler: DDIMScheduler, t: torch.Tensor, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(t).long().reshape(-1)
    return _gather(scheduler.alphas_cumprod.float(), t, ndim)


def predict_x0(
    scheduler: DDIMScheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """x0_hat from the model output at x_t (epsilon, v or sample prediction), float32: the same
    step 2 as `ddim_mean_std`, without clipping. Affine in the model output at fixed x_t."""
    a = _alpha_bar(scheduler, t.to(sample.device), sample.ndim)
    model_output, sample = model_output.float(), sample.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {kind!r}")


def regression_target(
    scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the model regresses onto for x_t = sqrt(a) x0 + sqrt(1 - a) noise: noise (epsilon),
    sqrt(a) noise - sqrt(1 - a) x0 (v, diffusers' `get_velocity`) or x0 (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _alpha_bar(scheduler, t.to(x0.device), x0.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


@dataclass(frozen=True)
class DDIMSampler:
    """The policy's transition kernel: DDIM with `eta` on `scheduler` (its timesteps set)."""

    scheduler: DDIMScheduler
    eta: float

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t-1}, log pi(x_{t-1} | x_t)); see `ddim_step_with_logprob`."""
        return ddim_step_with_logprob(
            self.scheduler, model_output, timestep, sample, self.eta, prev_sample, generator
        )

    def begin(self) -> None:
        """Start of a rollout: DDIM keeps no state between steps."""

    def model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The timestep the model is called with: the stored one (DDIM stores UNet timesteps)."""
        return timestep

    def stochastic_steps(self) -> list[int]:
        """The steps with noise, and so a log-probability: all of them when eta > 0."""
        return list(range(len(self.scheduler.timesteps))) if self.eta > 0 else []

    def advance(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        stochastic: bool = True,
    ) -> torch.Tensor:
        """x_{t-1} without its log-probability (eta = 0 allowed: the deterministic DDIM step);
        draws the same noise as `step`, so a run that records and one that does not agree.
        `stochastic` False takes the deterministic step whatever the eta (outside an SDE window)."""
        if self.eta > 0 and stochastic:
            return self.step(model_output, timestep, sample, generator=generator)[0]
        mean, _ = ddim_mean_std(self.scheduler, model_output, timestep, sample, 0.0)
        return mean

    def predict_x0(self, model_output, timestep, sample) -> torch.Tensor:
        return predict_x0(self.scheduler, model_output, timestep, sample)

    def target(self, x0, noise, timestep) -> torch.Tensor:
        return regression_target(self.scheduler, x0, noise, timestep)

    def noise_level(self, timestep: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_bar_t), (B,): the noised input's noise level."""
        return (1 - _alpha_bar(self.scheduler, timestep, 1)).sqrt().reshape(-1)

    def kl(self, policy_output, base_output, timestep, sample) -> torch.Tensor:
        """KL(policy || base) of one step, (batch,); see `ddim_kl`."""
        return ddim_kl(self.scheduler, policy_output, base_output, timestep, sample, self.eta)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from a clean x_0 by the forward process (RWR's denoising loss)."""
        return self.scheduler.add_noise(x0, noise, t)

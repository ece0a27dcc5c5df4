"""The flow-matching Euler step as a Gaussian policy: Flow-GRPO's ODE-to-SDE conversion and
the coefficient-preserving variant (CPS), each with its log-probability and closed-form KL.

A flow-matching model (SD3, FLUX) predicts a velocity v = eps - x0 at
x_t = (1 - t) x0 + t eps, and diffusers' `FlowMatchEulerDiscreteScheduler` samples the ODE
dx = v dt deterministically. An RL policy needs a stochastic step with a density, so the ODE is
replaced by an SDE with the same marginals (Flow-GRPO, Liu et al. 2025, eq. 8-9) or by a step
that keeps the coefficients of x0 and eps on the schedule (CPS, Wang et al. 2025, eq. 10-11).
`FlowSDESampler` holds the scheduler (its sigmas set) and the noise level `a`; like the DDIM
sampler it knows a scheduler's numbers and nothing of model families.

Notation (diffusers' FlowMatchEulerDiscreteScheduler; i is the step index, 0..N-1):
    t     = sigmas[i]        the noise level of x_t (1 = pure noise)
    s     = sigmas[i + 1]    the next one (0 after the last step)
    dt    = s - t < 0
    v     = the model output (velocity),  x0_hat = x_t - t v,  eps_hat = x_t + (1 - t) v
    Euler (the scheduler's own step):  x_s = x_t + dt * v

SDE (Flow-GRPO eq. 9; its code, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py):
    sigma_t = a * sqrt(t / (1 - t))       (t = 1 uses the next grid point in 1 - t, as theirs)
    mean    = x_t + dt * (v + sigma_t^2 / (2 t) * (x_t + (1 - t) v))
    std     = sigma_t * sqrt(-dt)
CPS (Wang et al. 2025, "Coefficient-preserving sampling"):
    std     = s * sin(a * pi / 2)
    mean    = (1 - s) * x0_hat + sqrt(s^2 - std^2) * eps_hat
    (the last step, s = 0, has std 0: it is deterministic and carries no log-probability)

Both reduce to the Euler step as a -> 0. Everything is computed in float32 (Flow-GRPO's FAQ:
fp32 for the SDE math). The log-density is the MEAN over the latent's elements, as the DDIM
sampler's, so the PPO clip range reads the same for both. Flow-GRPO's CPS code drops the
density's normalisation (it uses -(x - mean)^2); here it is the Gaussian's log-density, whose
ratio is the one PPO is defined on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
SDE_KINDS = ("sde", "cps")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


def flow_mean_std(
    sigmas: torch.Tensor,
    model_output: torch.Tensor,
    step: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    kind: str = "sde",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (like `sample`) and std ((B, 1, ...)) of p(x_s | x_t) at step indices `step`
    (scalar or (B,)), float32; the module docstring has the formulas. noise_level 0 is the
    scheduler's Euler step (std 0)."""
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown flow sampler {kind!r}; expected one of {', '.join(SDE_KINDS)}")
    if noise_level < 0:
        raise ValueError(f"the noise level must be >= 0, got {noise_level}")
    v, x = model_output.float(), sample.float()
    ndim, batch = x.ndim, x.shape[0]
    sigmas = sigmas.float().to(x.device)

    # 1. t and s per batch element
    index = torch.as_tensor(step, device=x.device).long().reshape(-1).expand(batch)
    t = _per_sample(sigmas[index], ndim)
    s = _per_sample(sigmas[index + 1], ndim)
    dt = s - t

    # 2. mean and std of the Gaussian step
    if kind == "sde":
        # t = 1 would divide by 0: Flow-GRPO takes the next grid point there (sigmas[1])
        below_one = torch.where(t >= 1, sigmas[1].clamp(max=1 - 1e-6), t)
        sigma_t = noise_level * (t / (1 - below_one)).sqrt()
        mean = x + dt * (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v))
        std = sigma_t * (-dt).sqrt()
    else:
        std = s * math.sin(noise_level * math.pi / 2)
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        mean = (1 - s) * x0_hat + (s**2 - std**2).clamp(min=0).sqrt() * eps_hat
    return mean, std


def flow_step_with_logprob(
    sigmas: torch.Tensor,
    model_output: torch.Tensor,
    step: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    kind: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic step x_t -> x_s; returns (x_s, log p(x_s | x_t)), the log-density (B,)
    averaged over the latent's elements. `prev_sample` given: its density (the update's
    recomputation); else one is drawn with `generator`.

    Steps: 1. t, s per sample; 2. mean and std (`flow_mean_std`); 3. draw x_s unless given;
    4. log N(x_s; mean, std^2), averaged over elements. A step with std 0 (noise level 0, the
    CPS last step) has no density: ValueError.
    """
    _check_has_density(sigmas, step, noise_level, kind)
    mean, std = flow_mean_std(sigmas, model_output, step, sample, noise_level, kind)
    if prev_sample is None:
        where = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=where).to(sample.device)
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach().float() - mean) ** 2) / (2 * std**2)
    log_prob = log_prob - torch.log(std) - _LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def _is_deterministic(sigmas: torch.Tensor, step, noise_level: float, kind: str) -> bool:
    """Whether the step at `step` has std 0: noise level 0, or CPS's last step (s = 0). The
    second reads the step index, so it is known only where that costs no device sync (an index
    on the CPU); the rollout asks `stochastic_steps` instead."""
    if noise_level <= 0:
        return True
    index = torch.as_tensor(step)
    if kind != "cps" or index.device.type != "cpu":
        return False
    return bool((index.long() >= len(sigmas) - 2).any())


def _check_has_density(sigmas: torch.Tensor, step, noise_level: float, kind: str) -> None:
    if _is_deterministic(sigmas, step, noise_level, kind):
        raise ValueError(
            "this flow step is deterministic (std 0: noise level 0, or the CPS sampler's last "
            "step) and has no log-probability"
        )


def flow_kl(
    sigmas: torch.Tensor,
    policy_output: torch.Tensor,
    base_output: torch.Tensor,
    step: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    kind: str = "sde",
) -> torch.Tensor:
    """KL(policy || base) of one step from the same x_t, (B,): two Gaussians with the same std,
    |mean_policy - mean_base|^2 / (2 std^2), averaged over elements (Flow-GRPO's KL)."""
    mean_policy, std = flow_mean_std(sigmas, policy_output, step, sample, noise_level, kind)
    mean_base, _ = flow_mean_std(sigmas, base_output, step, sample, noise_level, kind)
    kl = (mean_policy - mean_base) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, sample.ndim)))


@dataclass(frozen=True)
class FlowSDESampler:
    """A flow-matching model's transition kernel: the scheduler's sigma grid (set_timesteps
    called), stepped as Flow-GRPO's SDE or CPS (`kind`) with noise level `eta` (Flow-GRPO's a,
    0.7 in its SD3 configs; `sample.eta` in the config). Its `timesteps` are step indices
    0..N-1 (what a trajectory stores); `model_timestep` turns them into the scheduler's
    timesteps (sigma * 1000) the transformer is called with.
    """

    scheduler: object
    eta: float
    kind: str = "sde"

    @property
    def sigmas(self) -> torch.Tensor:
        return self.scheduler.sigmas

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.arange(len(self.scheduler.timesteps), device=self.scheduler.timesteps.device)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def begin(self) -> None:
        """Start of a rollout: the flow step keeps no state between steps."""

    def model_timestep(self, step: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep (sigma * 1000) of step index `step`."""
        timesteps = self.scheduler.timesteps
        index = torch.as_tensor(step, device=timesteps.device).long()
        return timesteps[index.reshape(-1)].reshape(index.shape)  # a gather: no device sync

    def stochastic_steps(self) -> list[int]:
        """The steps with noise, and so a log-probability: all, less CPS's last (s = 0)."""
        n = len(self.scheduler.timesteps)
        if self.eta <= 0:
            return []
        return list(range(n - 1 if self.kind == "cps" else n))

    def step(self, model_output, step, sample, prev_sample=None, generator=None):
        """(x_s, log p(x_s | x_t)); see `flow_step_with_logprob`."""
        return flow_step_with_logprob(
            self.sigmas, model_output, step, sample, self.eta, self.kind, prev_sample, generator
        )

    def advance(self, model_output, step, sample, generator=None, stochastic: bool = True):
        """x_s without its log-probability: the stochastic step (the same noise draw as `step`)
        where it has noise and `stochastic` is True, else the deterministic Euler (ODE) step."""
        eta = self.eta if stochastic else 0.0
        mean, std = flow_mean_std(self.sigmas, model_output, step, sample, eta, self.kind)
        if _is_deterministic(self.sigmas, step, eta, self.kind):
            return mean
        where = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=where).to(sample.device)
        return mean + std * noise

    def kl(self, policy_output, base_output, step, sample) -> torch.Tensor:
        """KL(policy || base) of one step, (B,); see `flow_kl`."""
        return flow_kl(self.sigmas, policy_output, base_output, step, sample, self.eta, self.kind)

    def _t(self, step: torch.Tensor, ndim: int) -> torch.Tensor:
        sigmas = self.sigmas.float()
        index = torch.as_tensor(step).long().reshape(-1).to(sigmas.device)
        return _per_sample(sigmas[index], ndim)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise at step index `step` (the forward process)."""
        t = self._t(step, x0.ndim).to(x0.device)
        return (1 - t) * x0.float() + t * noise.float()

    def predict_x0(self, model_output, step, sample) -> torch.Tensor:
        """x0_hat = x_t - t v (affine in the model output at fixed x_t)."""
        t = self._t(step, sample.ndim).to(sample.device)
        return sample.float() - t * model_output.float()

    def target(self, x0, noise, step) -> torch.Tensor:
        """The flow-matching target: v = noise - x0."""
        return noise.float() - x0.float()

    def noise_level(self, step: torch.Tensor) -> torch.Tensor:
        """t of the noised input, (B,) (AWM's weighting)."""
        return self._t(step, 1).reshape(-1)

"""DPM-Solver++ (diffusers' `DPMSolverMultistepScheduler`) as a deterministic sampler for the
log-prob-free algorithms (NFT, AWM) on the UNet families.

These algorithms need no log-probability, only final samples and the forward process that noises
them again for the loss, so any sampler the pipeline has will do (DiffusionNFT: "any black-box
sampler"). DPM-Solver++ reaches in 10-20 steps what DDIM needs 50 for. The sampling side is the
scheduler's own multistep `step` (its state is reset by `begin`, once per rollout); the training side
(forward noising, x0 from the model output, the regression target) is the DDPM forward process on the
same `alphas_cumprod`, written once in samplers/ddim.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler

from ddpo_lite.samplers.ddim import _alpha_bar, predict_x0, regression_target


@dataclass(frozen=True)
class DPMSolverSampler:
    """Deterministic DPM-Solver++ on `scheduler` (its timesteps set); no log-probability."""

    scheduler: DPMSolverMultistepScheduler
    eta: float = 0.0

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def begin(self) -> None:
        """Forget the previous rollout's model outputs (the multistep history)."""
        self.scheduler.set_timesteps(len(self.scheduler.timesteps), device=self.timesteps.device)

    def model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep

    def stochastic_steps(self) -> list[int]:
        return []

    def step(self, *args, **kwargs):
        raise ValueError(
            "DPM-Solver is deterministic and has no log-probability: it samples for the "
            "log-prob-free algorithms (train.algorithm = 'nft' or 'awm') only"
        )

    def kl(self, *args, **kwargs):
        raise ValueError("DPM-Solver has no per-step density, so no per-step KL")

    def advance(self, model_output, timestep, sample, generator=None, stochastic=True):
        """The scheduler's own step (float32 in, float32 out)."""
        step = self.scheduler.step(model_output.float(), timestep, sample.float())
        return step.prev_sample.float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (the DDPM forward process)."""
        a = _alpha_bar(self.scheduler, t.to(x0.device), x0.ndim).to(x0.device)
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    def predict_x0(self, model_output, timestep, sample) -> torch.Tensor:
        return predict_x0(self.scheduler, model_output, timestep, sample)

    def target(self, x0, noise, timestep) -> torch.Tensor:
        return regression_target(self.scheduler, x0, noise, timestep)

    def noise_level(self, timestep: torch.Tensor) -> torch.Tensor:
        return (1 - _alpha_bar(self.scheduler, timestep, 1)).sqrt().reshape(-1)

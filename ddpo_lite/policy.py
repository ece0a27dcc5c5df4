"""The policy a run samples and trains: one small object built at setup.

It bundles what rollout, the update, the KL to the base and the evaluation all need (the model
family, the pipeline, the LoRA'd denoiser, the sampler, the cached prompt conditioning, the
guidance scale, the autocast context, the resolution), so that they are passed as one thing and
both sides of the PPO ratio are computed by the same calls under the same settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ddpo_lite.families import Cond, Family
from ddpo_lite.models.memory import visiting
from ddpo_lite.samplers.ddim import DDIMSampler
from ddpo_lite.samplers.dpm import DPMSolverSampler
from ddpo_lite.samplers.flow_sde import FlowSDESampler


@dataclass(frozen=True)
class Policy:
    family: Family
    pipe: Any
    denoiser: torch.nn.Module
    """The model that carries the LoRA (UNet or transformer), unwrapped: sampling needs no
    gradient sync; the update passes its DDP-wrapped twin (the same weights) to `predict`."""
    sampler: DDIMSampler | FlowSDESampler | DPMSolverSampler
    encoder: Any
    """A `PromptEncoder`: prompts -> (Cond, negative Cond), cached."""
    guidance_scale: float
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    resolution: int = 0
    """Image side in pixels (the family's native one when built from a config with 0)."""
    offload_vae: bool = False
    """The VAE waits on the CPU and visits the latents' device for each decode."""

    @property
    def guided(self) -> bool:
        """Classifier-free guidance with the negative prompt: scale > 1 on a family that has it
        (FLUX's guidance is an input of the transformer instead: its family reads the scale)."""
        return self.guidance_scale > 1.0 and self.family.has_negative_prompt

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Final latents as PIL images through the family's VAE; with `offload_vae` the VAE is
        on the latents' device for the decode only (back on the CPU after, also on an error)."""
        with visiting(self.pipe.vae, latents.device, self.offload_vae):
            return self.family.decode(self.pipe, latents)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        negative: Cond | None,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The guided model output (float32) of `model` (default: the policy's denoiser), under
        the policy's autocast; `negative` None means no guidance."""
        with self.autocast():
            return self.family.predict(
                model if model is not None else self.denoiser,
                latents,
                self.sampler.model_timestep(timesteps),
                cond,
                negative,
                self.guidance_scale,
            )

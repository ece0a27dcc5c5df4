"""How far the policy has moved from the base model, and how varied its images still are.

- `trajectory_kl`: the KL divergence of the policy from the base model along sampled trajectories.
  Per step both are DDIM Gaussians with the same std, so the KL is closed-form (`ddim_kl`); the
  path's KL is the sum over its steps. The base is the same UNet with its LoRA switched off
  (`disable_adapters`): no second copy of the weights.
- `diversity`: the mean pairwise RMS pixel distance between images of the same prompt, in [0, 1].
  A policy collapsing onto one image per prompt drives it towards 0.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ddpo_lite.policy import Policy
from ddpo_lite.sampling import Trajectory


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """The UNet as the base model inside the block (its LoRA layers bypassed), policy after."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@torch.no_grad()
def trajectory_kl(policy: Policy, trajectory: Trajectory, max_samples: int = 4) -> torch.Tensor:
    """KL(policy || base) summed over the denoising steps of the first `max_samples` sampled
    trajectories, shape (n,); each step's KL is averaged over latent elements."""
    n = min(max_samples, len(trajectory))
    part = trajectory.index(torch.arange(n, device=trajectory.device)).on_device()
    total = torch.zeros(n, device=part.latents.device)
    for step in range(part.latents.shape[1]):
        x_t, t = part.latents[:, step], part.timesteps[:, step]
        policy_output = policy.predict(x_t, t, part.cond, part.negative)
        with adapters_disabled(policy.denoiser):
            base_output = policy.predict(x_t, t, part.cond, part.negative)
        total += policy.sampler.kl(policy_output, base_output, t, x_t)
    return total


def _pixels(image: Image.Image, size: int = 64) -> np.ndarray:
    if max(image.size) > size:
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def diversity(images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt (NaN if no prompt
    has two images); images larger than 64 px are compared at 64x64."""
    by_prompt: dict[str, list[np.ndarray]] = defaultdict(list)
    for image, prompt in zip(images, prompts, strict=True):
        by_prompt[prompt].append(_pixels(image))
    distances = [
        float(np.sqrt(np.mean((a - b) ** 2)))
        for group in by_prompt.values()
        for a, b in itertools.combinations(group, 2)
    ]
    return float(np.mean(distances)) if distances else float("nan")

"""Advantage estimation for DDPO: reward normalisation and clipping.

DDPO (Black et al. 2023) turns each image's scalar reward into an advantage by normalising it.
Prompts differ in difficulty: one prompt may routinely score 6.5 on an aesthetic model while another
scores 4.0. Normalising with global batch statistics would give every sample of the easy prompt a
positive advantage and every sample of the hard prompt a negative one, so the policy would learn
"which prompt am I" rather than "which image is better for this prompt". Per-prompt normalisation
(``PerPromptStatTracker``, as in the paper's code) keeps a running buffer of recent rewards for each
prompt and normalises against that prompt's own mean and std, which removes the between-prompt
variance from the gradient signal.

A fresh prompt has too few samples for reliable statistics, so until its buffer holds ``min_count``
rewards it is normalised with the mean/std of the whole current batch (global statistics), exactly
as the paper's code does.

All statistics use the population standard deviation (``correction=0``, i.e. ``unbiased=False``),
matching ``np.std`` in the reference implementation, and are computed in float64 before the result
is returned as float32. Advantages are ``(r - mean) / (std + 1e-6)``, so a batch whose rewards are
all equal (e.g. a single sample) gets advantage 0, never NaN.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

EPS = 1e-6

__all__ = [
    "EPS",
    "GROUP_EPS",
    "PerPromptStatTracker",
    "compute_advantages",
    "group_advantages",
    "group_normalised_advantages",
]

#: GRPO's std floor, as Flow-GRPO's stat tracker: a group of equal rewards gets advantage 0.
GROUP_EPS = 1e-4


def _check_finite(rewards: torch.Tensor) -> None:
    """Raise ValueError if any reward is NaN or infinite."""
    bad = int((~torch.isfinite(rewards)).sum().item())
    if bad:
        raise ValueError(
            f"{bad} of {rewards.numel()} rewards are non-finite (NaN/inf); "
            "drop non-finite samples before computing advantages"
        )


def _normalise(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (values - mean) / (std + EPS)


class PerPromptStatTracker:
    """Per-prompt running reward statistics for advantage normalisation.

    Each prompt keeps a deque of its ``buffer_size`` most recent rewards. In ``update``, a prompt
    whose buffer (after appending the new rewards) holds fewer than ``min_count`` rewards is
    normalised with the mean/std of all rewards in the current batch; otherwise with the mean/std of
    its buffer. The std is the population std (``unbiased=False``), as ``np.std`` in the DDPO code.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 0:
            raise ValueError(f"min_count must be >= 0, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add ``rewards`` to the per-prompt buffers and return float32 advantages.

        ``prompts[i]`` is the prompt of the i-th reward (in ``rewards.flatten()`` order). The result
        has the shape and device of ``rewards``. Rewards must be finite.
        """
        flat = torch.as_tensor(rewards).detach().flatten().to("cpu", torch.float64)
        if len(prompts) != flat.numel():
            raise ValueError(f"got {len(prompts)} prompts for {flat.numel()} rewards")
        _check_finite(flat)
        out = torch.empty_like(flat)
        if flat.numel() > 0:
            batch_mean = flat.mean()
            batch_std = flat.std(correction=0)
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(p, []).append(i)
            for prompt, idx_list in groups.items():
                idx = torch.tensor(idx_list, dtype=torch.long)
                prompt_rewards = flat[idx]
                buf = self._buffers.get(prompt)
                if buf is None:
                    buf = self._buffers[prompt] = deque(maxlen=self.buffer_size)
                buf.extend(prompt_rewards.tolist())
                if len(buf) < self.min_count:
                    mean, std = batch_mean, batch_std
                else:
                    hist = torch.tensor(list(buf), dtype=torch.float64)
                    mean, std = hist.mean(), hist.std(correction=0)
                out[idx] = _normalise(prompt_rewards, mean, std)
        r = torch.as_tensor(rewards)
        return out.to(torch.float32).reshape(r.shape).to(r.device)

    def stats(self) -> dict[str, float]:
        """Return ``{"num_prompts": int, "mean_buffer_len": float}`` (0.0 when empty)."""
        n = len(self._buffers)
        mean_len = sum(len(b) for b in self._buffers.values()) / n if n else 0.0
        return {"num_prompts": n, "mean_buffer_len": float(mean_len)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able snapshot: config plus each prompt's buffer as a list of floats."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: [float(x) for x in b] for p, b in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore buffers from ``state_dict()`` output, replacing the current ones.

        This tracker's own ``buffer_size``/``min_count`` are kept; a saved buffer longer than
        ``buffer_size`` keeps only its most recent rewards.
        """
        buffers = state.get("buffers")
        if not isinstance(buffers, dict):
            raise ValueError("state must contain a 'buffers' dict of prompt -> list of floats")
        self._buffers = {
            str(p): deque((float(x) for x in vals), maxlen=self.buffer_size)
            for p, vals in buffers.items()
        }

    def clear(self) -> None:
        """Forget all prompts."""
        self._buffers.clear()


def compute_advantages(
    rewards: torch.Tensor,
    prompts: list[str] | None,
    tracker: PerPromptStatTracker | None,
    adv_clip_max: float,
) -> torch.Tensor:
    """Normalise ``rewards`` into float32 advantages clipped to ``[-adv_clip_max, adv_clip_max]``.

    With a ``tracker`` (which then needs ``prompts``), per-prompt normalisation via
    ``tracker.update``; otherwise global ``(r - mean) / (std + 1e-6)`` over the batch, with the
    population std. Raises ValueError if any reward is non-finite.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    r = torch.as_tensor(rewards)
    flat = r.detach().flatten().to("cpu", torch.float64)
    _check_finite(flat)
    if prompts is not None and len(prompts) != flat.numel():
        raise ValueError(f"got {len(prompts)} prompts for {flat.numel()} rewards")
    if tracker is not None:
        if prompts is None:
            raise ValueError("per-prompt normalisation (tracker given) needs prompts")
        adv = tracker.update(prompts, r).to("cpu", torch.float64).flatten()
    elif flat.numel() == 0:
        adv = flat
    else:
        adv = _normalise(flat, flat.mean(), flat.std(correction=0))
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    return adv.to(torch.float32).reshape(r.shape).to(r.device)


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, adv_clip_max: float
) -> torch.Tensor:
    """Leave-one-out group baselines: each reward minus the mean of the other rewards of its
    group (`groups[i]` is reward i's group id), divided by the population std of these
    differences over the batch, clipped to [-adv_clip_max, adv_clip_max].

    The baseline never depends on the sample it is subtracted from, so the policy gradient stays
    unbiased. A member alone in its group (its partners dropped) gets advantage 0.
    """
    flat = torch.as_tensor(rewards).detach().flatten().to("cpu", torch.float64)
    _check_finite(flat)
    ids = torch.as_tensor(groups).flatten().to("cpu", torch.long)
    if len(ids) != len(flat):
        raise ValueError(f"got {len(ids)} group ids for {len(flat)} rewards")
    _, ids = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, ids, flat)
    counts.index_add_(0, ids, torch.ones_like(flat))
    others = counts[ids] - 1
    centred = torch.where(
        others > 0, flat - (sums[ids] - flat) / others.clamp(min=1), torch.zeros_like(flat)
    )
    adv = centred / (centred.std(correction=0) + EPS) if len(flat) else centred
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    return adv.to(torch.float32).reshape(torch.as_tensor(rewards).shape)


def group_normalised_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, adv_clip_max: float, eps: float = GROUP_EPS
) -> torch.Tensor:
    """GRPO's advantage: (r - mean of its group) / (population std of its group + eps),
    clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO's per-prompt tracker on one batch, with
    a group being one prompt's images). A group of one, or of equal rewards, gets 0."""
    flat = torch.as_tensor(rewards).detach().flatten().to("cpu", torch.float64)
    _check_finite(flat)
    ids = torch.as_tensor(groups).flatten().to("cpu", torch.long)
    if len(ids) != len(flat):
        raise ValueError(f"got {len(ids)} group ids for {len(flat)} rewards")
    adv = torch.zeros_like(flat)
    for group in torch.unique(ids):
        members = ids == group
        values = flat[members]
        adv[members] = (values - values.mean()) / (values.std(correction=0) + eps)
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    return adv.to(torch.float32).reshape(torch.as_tensor(rewards).shape)

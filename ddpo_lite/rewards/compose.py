"""From `[reward]` config to one checked reward callable.

The config names a registered reward, a weighted sum of them, a user's own function
('module:function' or 'path/to/file.py:function'), or a reward server's URL. Whatever it is, the
trainer gets a callable `(images, prompts, metadata) -> (rewards (B,), info)` wrapped by
`CheckedReward`, so that a reward that raises or returns the wrong shape stops the run with a
message naming the reward, instead of training on wrong numbers. NaN/inf values pass through: the
trainer drops those samples with a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpo_lite.rewards.registry import Reward, UnknownRewardError, get_reward


class RewardError(RuntimeError):
    """A reward failed or returned something unusable; the message names it."""


class CheckedReward:
    """Calls `reward` and checks what comes back: a finite-or-NaN float array of length B."""

    def __init__(self, reward: Reward, name: str):
        self.reward = reward
        self.name = name

    def __call__(
        self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            out = self.reward(images, prompts, metadata)
        except (RewardError, torch.OutOfMemoryError):  # the trainer says where memory ran out
            raise
        except (Exception, SystemExit) as err:  # sys.exit() in a reward stops the run, in a line
            first = str(err).splitlines()[0] if str(err) else ""
            raise RewardError(f"reward {self.name!r} raised {type(err).__name__}: {first}") from err
        # KeyboardInterrupt passes through: Ctrl-C stops the run, whichever thread it reached
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise RewardError(
                f"reward {self.name!r} must return (rewards, info dict), got {type(out).__name__}"
            )
        raw, info = out
        try:
            rewards = as_reward_values(raw)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardError(f"reward {self.name!r} returned non-numeric rewards: {err}") from err
        if rewards.shape != (len(images),):
            raise RewardError(
                f"reward {self.name!r} returned shape {rewards.shape} for {len(images)} images; "
                f"expected ({len(images)},)"
            )
        return rewards, info


def as_reward_values(raw: Any) -> np.ndarray:
    """Rewards as a float64 array: numbers only. A torch tensor is detached (a reward computed
    with gradients, or on a GPU, is fine); booleans and strings are refused (TypeError), not
    read as 1.0/0.0 or parsed: a reward returning `score > 0.5` or "0.7" is a bug to hear of."""
    if hasattr(raw, "detach"):  # a torch tensor
        if str(raw.dtype) == "torch.bool":
            raise TypeError("a bool tensor: return numbers (e.g. scores.float())")
        raw = raw.detach().cpu().double().numpy()
    elif isinstance(raw, list | tuple):
        raw = [v.detach().cpu().double().item() if hasattr(v, "detach") else v for v in raw]
    values = np.asarray(raw)
    items = values.ravel().tolist() if values.dtype.kind == "O" else []
    if isinstance(raw, list | tuple):
        items = raw
    bad = next((v for v in items if isinstance(v, bool | np.bool_ | str | bytes)), None)
    if values.dtype.kind == "b" or isinstance(bad, bool | np.bool_):
        raise TypeError("booleans, not numbers: return float scores (e.g. 1.0 and 0.0)")
    if values.dtype.kind == "c":
        raise TypeError("complex numbers, not real ones")
    if values.dtype.kind in "USV" or bad is not None:
        raise TypeError(
            f"strings such as {bad if bad is not None else values.flat[0]!r}, not numbers"
        )
    return np.asarray(values, dtype=np.float64)


class WeightedSum:
    """sum_i w_i * reward_i; `info` holds each part's rewards under its name."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        self.parts = parts

    def __call__(self, images, prompts, metadata):
        total = np.zeros(len(images), dtype=np.float64)
        info: dict[str, Any] = {}
        for name, weight, reward in self.parts:
            values, part_info = reward(images, prompts, metadata)
            total += weight * values
            info[name] = values
            info.update({f"{name}/{k}": v for k, v in part_info.items()})
        return total, info


def load_user_reward(spec: str) -> Callable:
    """The callable named by 'package.module:function' or 'path/to/file.py:function'."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UnknownRewardError(
            f"reward {spec!r}: expected 'module:function' or 'file.py:function'"
        )
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UnknownRewardError(f"reward {spec!r}: no file {str(path)!r}")
        module_name = f"ddpo_lite_user_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise UnknownRewardError(f"reward {spec!r}: cannot import {target!r} ({err})") from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise UnknownRewardError(f"reward {spec!r}: {target!r} has no callable {attr!r}")
    return function


def is_user_code(name: str) -> bool:
    """'module:function' or 'file.py:function': Python that building the reward imports."""
    return ":" in name and not name.startswith(("http://", "https://"))


def user_code_names(reward_config) -> list[str]:
    """The user-code rewards `build_reward` would import for this `[reward]` section (none for a
    reward server: its URL takes precedence)."""
    if reward_config.url:
        return []
    names = list(reward_config.weights) if reward_config.weights else [reward_config.name]
    return [name for name in names if is_user_code(name)]


def _one(name: str, options: dict[str, Any], models: dict[str, str]) -> Reward:
    if is_user_code(name):
        return load_user_reward(name)
    return get_reward(name, model=models.get(name), **options)


def build_reward(reward_config, *, device: str = "cpu", offload: bool = False) -> CheckedReward:
    """The run's reward from its `[reward]` config section, wrapped in `CheckedReward`."""
    if reward_config.url:
        from ddpo_lite.rewards.client import RemoteReward

        remote = RemoteReward(
            reward_config.url,
            timeout=reward_config.timeout,
            retries=reward_config.retries,
            backoff=reward_config.backoff,
        )
        return CheckedReward(remote, reward_config.url)
    options = {"device": device, "offload": offload}
    if reward_config.weights:
        parts = [
            (name, float(weight), CheckedReward(_one(name, options, reward_config.models), name))
            for name, weight in reward_config.weights.items()
        ]
        label = " + ".join(f"{w:g}*{n}" for n, w in reward_config.weights.items())
        return CheckedReward(WeightedSum(parts), label)
    return CheckedReward(
        _one(reward_config.name, options, reward_config.models), reward_config.name
    )

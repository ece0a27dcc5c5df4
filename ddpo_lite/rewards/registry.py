"""The reward registry: a name -> factory map, so a config can name a reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image


class Reward(Protocol):
    """A reward scores a batch: (images, prompts, metadata) -> (rewards (B,), info dict)."""

    def __call__(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[np.ndarray, dict[str, Any]]: ...


class UnknownRewardError(ValueError):
    """A config names a reward that is not registered."""


_REGISTRY: dict[str, tuple[Callable[[], Reward], str]] = {}


def register_reward(name: str, description: str) -> Callable:
    """Decorator: register a zero-argument factory that builds the reward `name`."""

    def wrap(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        _REGISTRY[name] = (factory, description)
        return factory

    return wrap


def list_rewards() -> dict[str, str]:
    """Registered reward names with their one-line descriptions."""
    _load_builtins()
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def get_reward(name: str) -> Reward:
    """Build the registered reward `name`; a clear error lists the known names otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownRewardError(f"unknown reward {name!r}; registered rewards: {known}")
    factory, _ = _REGISTRY[name]
    return factory()


def _load_builtins() -> None:
    from ddpo_lite.rewards import jpeg, shapes  # noqa: F401  (registers on import)

"""The reward registry: a name -> factory map, so a config can name a reward."""

from __future__ import annotations

import inspect
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
    """Decorator: register a factory that builds the reward `name`.

    A factory takes no positional arguments; model-based rewards take keyword options such as
    `device: str = "cpu"`, `model: str | None = None` (a hub id or local path replacing the
    default), `offload: bool = False` (keep the model off the accelerator between calls).
    """

    def wrap(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        _REGISTRY[name] = (factory, description)
        return factory

    return wrap


def list_rewards() -> dict[str, str]:
    """Registered reward names with their one-line descriptions."""
    _load_builtins()
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def get_reward(name: str, **options: Any) -> Reward:
    """Build the registered reward `name`; a clear error lists the known names otherwise.

    `options` (e.g. `device`, `model`, `offload`) are passed to the factory when its signature
    takes them and dropped otherwise, so one call site can build any reward.
    """
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownRewardError(f"unknown reward {name!r}; registered rewards: {known}")
    factory, _ = _REGISTRY[name]
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {k: v for k, v in options.items() if takes_any or k in parameters}
    return factory(**accepted)


def _load_builtins() -> None:
    from ddpo_lite.rewards import (  # noqa: F401  (registers on import)
        aesthetic,
        alignment,
        clip_score,
        hps,
        image_reward,
        jpeg,
        ocr,
        pickscore,
        shapes,
    )

"""ddpo-lite: fine-tune Stable Diffusion with reinforcement learning (DDPO) by training LoRA.

Public API: `Config`, `load_config`, `train`, `load_pipeline`, the reward registry.
"""

__version__ = "0.1.0"

from ddpo_lite.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "__version__", "load_config", "load_pipeline", "train"]


def __getattr__(name: str):
    # the heavy parts import torch/diffusers; load them on first use
    if name == "train":
        from ddpo_lite.trainer import train

        return train
    if name == "load_pipeline":
        from ddpo_lite.models import load_pipeline

        return load_pipeline
    if name in ("get_reward", "list_rewards", "register_reward"):
        from ddpo_lite import rewards

        return getattr(rewards, name)
    raise AttributeError(f"module 'ddpo_lite' has no attribute {name!r}")

"""Rewards: named callables `(images, prompts, metadata) -> (rewards, info)` over a batch."""

from ddpo_lite.rewards.registry import (
    UnknownRewardError,
    get_reward,
    list_rewards,
    register_reward,
)

__all__ = ["UnknownRewardError", "get_reward", "list_rewards", "register_reward"]

"""Prompt-alignment rewards for the shapes world, computed from pixels.

Each image is read back with `ddpo_lite.shapes.analyse` (background = border median, object =
largest region unlike the background, shape = template match against the renderer's own
drawings) and compared with what its prompt, a caption of the shapes grammar such as
"a red circle on a blue background", asks for:

- shapes_colour: the scorer's probability that the object has the prompted colour, in [0, 1];
- shapes_shape: the scorer's probability that the object has the prompted shape, in [0, 1];
- shapes_alignment: their sum, in [0, 2].

An image with no object scores 0. The info dict carries both parts and 0/1 "right" flags (the
argmax agrees with the prompt), so a run's metrics can report accuracy beside the reward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ddpo_lite.rewards.registry import register_reward
from ddpo_lite.shapes.score import analyse
from ddpo_lite.shapes.world import COLOURS, parse_caption


def alignment_scores(
    images: Sequence[Image.Image], prompts: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per image: colour and shape probabilities of the prompted values, and whether each is the
    argmax ("colour_right", "shape_right"); arrays of shape (B,)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = {k: np.zeros(len(images)) for k in ("colour", "shape", "colour_right", "shape_right")}
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        colour, shape, _background = parse_caption(prompt)
        analysis = analyse(image)
        if not analysis.found:
            continue
        out["colour"][i] = analysis.colour[colour]
        out["shape"][i] = analysis.shape[shape]
        out["colour_right"][i] = float(max(analysis.colour, key=analysis.colour.get) == colour)
        out["shape_right"][i] = float(max(analysis.shape, key=analysis.shape.get) == shape)
    return out


@register_reward("shapes_colour", "shapes world: probability (from pixels) of the prompted colour")
def shapes_colour():
    def reward(images, prompts, metadata):
        scores = alignment_scores(images, prompts)
        return scores["colour"], scores

    return reward


@register_reward("shapes_shape", "shapes world: probability (from pixels) of the prompted shape")
def shapes_shape():
    def reward(images, prompts, metadata):
        scores = alignment_scores(images, prompts)
        return scores["shape"], scores

    return reward


@register_reward(
    "shapes_alignment", "shapes world: colour + shape alignment from pixels, in [0, 2]"
)
def shapes_alignment():
    def reward(images, prompts, metadata):
        scores = alignment_scores(images, prompts)
        return scores["colour"] + scores["shape"], scores

    return reward


def colour_share(images: Sequence[Image.Image], colour: str = "red", tolerance: float = 80.0):
    """Per image, the share of pixels within `tolerance` (RGB distance) of a palette colour, (B,)."""
    target = np.asarray(COLOURS[colour], dtype=np.float32)
    shares = []
    for image in images:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        shares.append(float((np.linalg.norm(rgb - target, axis=-1) < tolerance).mean()))
    return np.asarray(shares)


@register_reward(
    "shapes_red_share",
    "shapes world: share of red pixels, whatever the prompt (hackable: a red field maximises it)",
)
def shapes_red_share():
    """The deliberately hackable reward of docs/ALGORITHM.md's guard demonstration: it ignores the
    prompt, so the policy can win by painting every image red, losing content and diversity."""

    def reward(images, prompts, metadata):
        shares = colour_share(images, "red")
        return shares, {"red_share": shares}

    return reward

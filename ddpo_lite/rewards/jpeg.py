"""The DDPO paper's JPEG rewards.

Definition (as in the paper's code): encode each image as RGB JPEG at quality 95 with PIL and
measure the file size in kilobytes (bytes / 1000). compressibility = -size_kB,
incompressibility = +size_kB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ddpo_lite.rewards.registry import register_reward


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def _sizes(images: Sequence[Image.Image]) -> np.ndarray:
    return np.array([jpeg_size_kb(image) for image in images], dtype=np.float64)


@register_reward("jpeg_compressibility", "minus the JPEG size (kB, quality 95): smaller files")
def jpeg_compressibility():
    def reward(images, prompts, metadata):
        sizes = _sizes(images)
        return -sizes, {"jpeg_kb": sizes}

    return reward


@register_reward("jpeg_incompressibility", "the JPEG size (kB, quality 95): larger files")
def jpeg_incompressibility():
    def reward(images, prompts, metadata):
        sizes = _sizes(images)
        return sizes, {"jpeg_kb": sizes}

    return reward

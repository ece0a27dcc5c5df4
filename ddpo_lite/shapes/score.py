"""Read a shapes-world image back from its pixels: background colour, object colour, shape.

`analyse(image)` returns an `Analysis` with, for every colour and shape of the world, a score in
[0, 1] that sums to 1 over the alternatives (a softmax), plus the argmax names. How:

1. background = the per-channel median of the 1-pixel border ring (the renderer keeps the object
   2 pixels inside it);
2. foreground = pixels further than `FG_DISTANCE` from the background colour (RGB, 0-255);
   the object is the largest 4-connected foreground component; its colour is the component's
   per-channel median;
3. soft mask = how far each pixel sits from the background towards the object colour (0 to 1,
   zero outside the component's box grown by one pixel);
4. shape = template match: each shape of the world is drawn anti-aliased (`shape_mask`, the
   renderer's own drawing) into the box where its mean and standard deviation (x and y) equal the
   soft mask's, and compared with the soft mask by soft IoU (sum of minima / sum of maxima); the
   softmax of IoU / `SHAPE_TEMPERATURE` gives the shape scores. Matching moments rather than the
   mask's hard bounding box keeps the placement stable when edges are blurred;
5. colour scores = softmax of -RGB distance / `COLOUR_TEMPERATURE` over the palette, for the
   object and for the background.

An image with no foreground gets all-zero object scores (nothing was drawn). Only numpy and PIL.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, SHAPES, shape_mask

__all__ = ["Analysis", "analyse"]

FG_DISTANCE = 60.0
COLOUR_TEMPERATURE = 15.0
SHAPE_TEMPERATURE = 0.03
MIN_OBJECT_PIXELS = 4

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)


@dataclass
class Analysis:
    """Scores in [0, 1] per name (summing to 1, or all 0 when no object was `found`)."""

    background: dict[str, float]
    colour: dict[str, float]
    shape: dict[str, float]
    shape_iou: dict[str, float]
    found: bool

    def best(self, scores: dict[str, float]) -> str | None:
        """The highest-scoring name of `scores` (one of this analysis' dicts); None if all are 0."""
        name = max(scores, key=scores.__getitem__)
        return name if scores[name] > 0 else None


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _colour_scores(rgb: np.ndarray) -> dict[str, float]:
    dist = np.linalg.norm(_PALETTE - rgb[None], axis=1)
    return dict(zip(COLOURS, _softmax(-dist / COLOUR_TEMPERATURE).tolist(), strict=True))


@functools.cache
def _unit_moments(shape: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Mean and standard deviation (x, y) of `shape` drawn in its unit box [-1, 1]^2."""
    n = 64
    mask = shape_mask(shape, (0, 0, n, n), size=n).astype(np.float64)
    grid = (np.arange(n) + 0.5) / n * 2 - 1
    mass = mask.sum()
    mx, my = (mask.sum(axis=0) * grid).sum() / mass, (mask.sum(axis=1) * grid).sum() / mass
    sx = np.sqrt((mask.sum(axis=0) * (grid - mx) ** 2).sum() / mass)
    sy = np.sqrt((mask.sum(axis=1) * (grid - my) ** 2).sum() / mass)
    return (float(mx), float(my)), (float(sx), float(sy))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a small boolean image."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, region = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def analyse(image: Image.Image) -> Analysis:
    """Scores for what `image` shows (see the module docstring)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = _colour_scores(bg)

    component = _largest_component(np.linalg.norm(pixels - bg, axis=2) > FG_DISTANCE)
    if component.sum() < MIN_OBJECT_PIXELS:
        zeros = dict.fromkeys(COLOURS, 0.0)
        return Analysis(
            background, zeros, dict.fromkeys(SHAPES, 0.0), dict.fromkeys(SHAPES, 0.0), False
        )

    obj = np.median(pixels[component], axis=0)
    direction = obj - bg
    soft = np.clip((pixels - bg) @ direction / float(direction @ direction), 0.0, 1.0)  # (H, W)
    ys, xs = np.nonzero(component)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    keep = np.zeros_like(soft)
    keep[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = 1.0
    soft = soft * keep

    # each template is placed where its own mean and spread match the soft mask's
    grid = np.arange(h, dtype=np.float32) + 0.5  # pixel centres
    mass = soft.sum()
    mean_x = float((soft.sum(axis=0) * grid).sum() / mass)
    mean_y = float((soft.sum(axis=1) * grid).sum() / mass)
    std_x = float(np.sqrt((soft.sum(axis=0) * (grid - mean_x) ** 2).sum() / mass))
    std_y = float(np.sqrt((soft.sum(axis=1) * (grid - mean_y) ** 2).sum() / mass))
    iou = {}
    for name in SHAPES:
        (mu_x, mu_y), (sd_x, sd_y) = _unit_moments(name)
        half_x, half_y = std_x / sd_x, std_y / sd_y
        cx, cy = mean_x - mu_x * half_x, mean_y - mu_y * half_y
        template = shape_mask(name, (cx - half_x, cy - half_y, cx + half_x, cy + half_y), size=h)
        overlap = np.minimum(soft, template).sum() / max(np.maximum(soft, template).sum(), 1e-6)
        iou[name] = float(overlap)
    probs = _softmax(np.array(list(iou.values())) / SHAPE_TEMPERATURE)
    return Analysis(
        background=background,
        colour=_colour_scores(obj),
        shape=dict(zip(SHAPES, probs.tolist(), strict=True)),
        shape_iou=iou,
        found=True,
    )

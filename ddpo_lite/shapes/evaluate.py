"""How well a model follows shapes captions, scored from pixels, against a chance baseline.

`prompt_accuracy(pipe, n)` samples `n` seeded images for `n` captions of the grammar and reports,
per attribute (object colour, shape, background colour), how often the image's pixels show what
its caption says, and how often they show what a *shuffled* caption says (the same images scored
against a fixed permutation of the captions: the chance baseline, which accounts for any bias in
what the model draws).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .score import analyse
from .world import all_captions, parse_caption

__all__ = ["ATTRIBUTES", "attribute_hits", "eval_captions", "prompt_accuracy"]

ATTRIBUTES = ("colour", "shape", "background")


def eval_captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions: every caption of the grammar once per round, each round shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    captions = all_captions()
    out: list[str] = []
    while len(out) < n:
        out += [captions[i] for i in rng.permutation(len(captions))]
    return out[:n]


def attribute_hits(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per attribute, a 0/1 array: does image i show what prompts[i] says (argmax from pixels)."""
    hits = {name: np.zeros(len(images)) for name in ATTRIBUTES}
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        analysis = analyse(image)
        want = dict(zip(ATTRIBUTES, parse_caption(prompt), strict=True))
        for name in ATTRIBUTES:
            scores = getattr(analysis, name)
            if name != "background" and not analysis.found:
                continue
            hits[name][i] = float(max(scores, key=scores.__getitem__) == want[name])
    return hits


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
) -> list[Image.Image]:
    """Seeded images for `prompts` with the pipeline's own DDIM sampling loop."""
    generator = torch.Generator().manual_seed(seed)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        out = pipe(
            list(prompts[start : start + batch_size]),
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generator,
            output_type="pil",
        )
        images += out.images
    return images


def prompt_accuracy(pipe, n: int = 128, *, seed: int = 0, **sample_kwargs) -> dict[str, float]:
    """{attribute: accuracy, attribute + "_chance": accuracy against shuffled captions}."""
    prompts = eval_captions(n, seed)
    images = sample(pipe, prompts, seed=seed, **sample_kwargs)
    shuffled = [prompts[i] for i in np.random.default_rng(seed + 1).permutation(n)]
    right, chance = attribute_hits(images, prompts), attribute_hits(images, shuffled)
    result: dict[str, float] = {}
    for name in ATTRIBUTES:
        result[name] = float(right[name].mean())
        result[name + "_chance"] = float(chance[name].mean())
    result["found"] = float(np.mean([analyse(im).found for im in images]))
    return result

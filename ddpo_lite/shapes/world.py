"""The shapes world: a caption grammar and a renderer that draws exactly what a caption says.

One object per image, e.g. "a red triangle on a blue background":

    caption := "a " COLOUR " " SHAPE " on a " COLOUR " background"    (the two colours differ)
    COLOUR  := red | green | blue | yellow | white | black              (`COLOURS`)
    SHAPE   := circle | square | triangle | diamond                    (`SHAPES`)

6 x 4 x 5 = 120 captions. What a caption leaves free is drawn at random: the object's size (a
half-extent of 5-10 pixels at 32x32) and its centre (anywhere that keeps it 2 pixels inside the
border). Every shape fills the square [-1, 1]^2 of its own bounding box, so a shape is given by its
type and its box; `shape_mask` draws it anti-aliased (4x supersampling) into any box, which is what
both the renderer and the pixel scorers (`ddpo_lite.shapes.score`) use.

Only numpy and PIL: no torch, so the world and its scorers are cheap to import and to test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "ShapeSpec",
    "all_captions",
    "caption",
    "parse_caption",
    "random_spec",
    "render",
    "shape_mask",
]

IMAGE_SIZE = 32

#: Name -> RGB. Chosen far apart (the closest pair, green/black, is ~160 apart in RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}

#: Each shape's outline in its unit box [-1, 1]^2, y pointing down (None: the inscribed ellipse).
SHAPES: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
}

MIN_HALF, MAX_HALF = 5.0, 10.0  # object half-extent in pixels at IMAGE_SIZE
MARGIN = 2.0  # pixels kept between the object and the border (the border is background)
SUPERSAMPLE = 4

_CAPTION_RE = re.compile(r"a (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background")


@dataclass(frozen=True)
class ShapeSpec:
    """One image: what the caption says, and where the object is (pixels, at IMAGE_SIZE)."""

    colour: str
    shape: str
    background: str
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    half: float = 8.0

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    """The grammar's one sentence form."""
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption of the grammar; ValueError for anything else."""
    match = _CAPTION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a shapes caption; expected e.g. 'a red circle on a blue background'"
        )
    colour, shape, background = match.group("colour", "shape", "background")
    for word, known in ((colour, COLOURS), (shape, SHAPES), (background, COLOURS)):
        if word not in known:
            raise ValueError(f"{text!r}: unknown word {word!r}; known: {', '.join(known)}")
    return colour, shape, background


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order (object colour, shape, background)."""
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def random_spec(rng: np.random.Generator, text: str | None = None) -> ShapeSpec:
    """A random image spec; for `text`, only its free parts (size, position) are random."""
    if text is None:
        colour, background = rng.choice(list(COLOURS), size=2, replace=False)
        shape = rng.choice(list(SHAPES))
    else:
        colour, shape, background = parse_caption(text)
    half = rng.uniform(MIN_HALF, MAX_HALF)
    lo, hi = half + MARGIN, IMAGE_SIZE - half - MARGIN
    cx, cy = rng.uniform(lo, hi, size=2)
    return ShapeSpec(str(colour), str(shape), str(background), float(cx), float(cy), float(half))


def shape_mask(
    shape: str, box: tuple[float, float, float, float], size: int = IMAGE_SIZE
) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1] of `shape` filling `box` = (x0, y0, x1, y1).

    Box coordinates are continuous pixel coordinates (pixel i covers [i, i + 1)).
    """
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in box)
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    outline = SHAPES[shape]
    if outline is None:
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        draw.polygon([(cx + u * hx, cy + v * hy) for u, v in outline], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `spec` as an RGB image of side `size` (positions scale from IMAGE_SIZE)."""
    k = size / IMAGE_SIZE
    box = (
        (spec.cx - spec.half) * k,
        (spec.cy - spec.half) * k,
        (spec.cx + spec.half) * k,
        (spec.cy + spec.half) * k,
    )
    alpha = shape_mask(spec.shape, box, size)[..., None]  # (H, W, 1)
    fg = np.array(COLOURS[spec.colour], dtype=np.float32)
    bg = np.array(COLOURS[spec.background], dtype=np.float32)
    pixels = alpha * fg + (1 - alpha) * bg  # (H, W, 3)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")

"""The shapes world: captions from a grammar, a renderer, and scorers that read images back.

`world` (grammar, renderer) and `score` (pixel scorers) need only numpy and PIL; `model` (the
architecture of the shipped `shapes` model) and `evaluate` (prompt accuracy of a pipeline) import
torch. See docs/SHAPES.md.
"""

from .score import Analysis, analyse
from .world import (
    COLOURS,
    SHAPES,
    ShapeSpec,
    all_captions,
    caption,
    parse_caption,
    random_spec,
    render,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "Analysis",
    "ShapeSpec",
    "all_captions",
    "analyse",
    "caption",
    "parse_caption",
    "random_spec",
    "render",
]

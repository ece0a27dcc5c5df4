"""An image grid with a caption under each image (prompt and reward), for a run's samples/ folder."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

CELL = 128  # pixels per image side in the grid (small images are scaled up, nearest-neighbour)
CAPTION = 28  # pixels of caption under each image


def make_grid(
    images: Sequence[Image.Image], captions: Sequence[str], columns: int = 4
) -> Image.Image:
    """Lay `images` out `columns` wide, each scaled to CELL x CELL with its caption below."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + CAPTION)
        resample = Image.NEAREST if image.width < CELL else Image.BICUBIC
        grid.paste(image.convert("RGB").resize((CELL, CELL), resample), (x, y))
        for line_number, line in enumerate(caption.splitlines()[:2]):
            draw.text((x + 3, y + CELL + 2 + 12 * line_number), line[:24], fill="black", font=font)
    return grid

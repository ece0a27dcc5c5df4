import pytest
from PIL import Image

from ddpo_lite.grid import CAPTION, CELL, make_grid


def test_grid_layout_and_captions():
    images = [Image.new("RGB", (32, 32), (255, 0, 0)) for _ in range(5)]
    grid = make_grid(images, [f"a cat\nreward {i}" for i in range(5)], columns=4)
    assert grid.size == (4 * CELL, 2 * (CELL + CAPTION))
    assert grid.getpixel((CELL // 2, CELL // 2)) == (255, 0, 0)  # an image cell
    caption_area = grid.crop((0, CELL, CELL, CELL + CAPTION))
    assert min(caption_area.convert("L").getdata()) < 128  # text was drawn
    assert grid.getpixel((CELL + CELL // 2, CELL + CAPTION + CELL // 2)) == (255, 255, 255)  # empty


def test_grid_rejects_mismatched_captions():
    with pytest.raises(ValueError, match="captions"):
        make_grid([Image.new("RGB", (8, 8))], [])

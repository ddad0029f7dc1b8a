"""Seam blending of context-dependent transforms over a slide grid (studio.blending)."""

from __future__ import annotations

import numpy as np
import pytest

from studio.blending import blended_tiles, ramp
from studio.data.samples import load_sample
from studio.errors import InputError
from studio.io import write_image
from studio.metrics import seam_ratio
from studio.slides import open_slide, read_tile, tile_grid


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    image = np.ascontiguousarray(load_sample("hgsc_nest")[:700, :900])  # not a multiple of the tile size
    return write_image(tmp_path_factory.mktemp("s") / "region.png", image), image


def assemble(tiles, grid) -> np.ndarray:
    out = np.zeros((grid.height, grid.width, 3), np.uint8)
    for tile, pixels in zip(grid.tiles, tiles, strict=True):
        w, h = tile.size
        out[tile.y:tile.y + h, tile.x:tile.x + w] = pixels
    return out


def test_ramps_of_neighbours_sum_to_one():
    total, t, h = 600, 256, 32
    acc = np.zeros(total, np.float32)
    for start in range(0, total, t):
        stop = min(total, start + t)
        a, b = max(0, start - h), min(total, stop + h)
        acc[a:b] += ramp(a, b, start, stop, total, h)
    np.testing.assert_allclose(acc, 1.0, atol=1e-6)


def test_identity_transform_reproduces_the_slide(slide_path):
    path, image = slide_path
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size=256)
        tiles = list(blended_tiles(grid, lambda box: read_tile(slide, grid, box), lambda ws, boxes: ws, halo=32))
    out = assemble(tiles, grid)
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1  # float16 accumulation, +-1 in the halo bands
    assert (out == image).mean() > 0.99


def test_blending_removes_seams_of_a_context_dependent_transform(slide_path):
    """A transform whose output depends on its whole window (brightness set by the window
    mean, like a network's global context) leaves seams when tiles are processed alone."""
    path, _ = slide_path

    def contextual(windows, boxes):
        return [np.clip(w.astype(np.float32) * (150.0 / w.mean()), 0, 255).astype(np.uint8) for w in windows]

    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size=128)
        plain = assemble(blended_tiles(grid, lambda b: read_tile(slide, grid, b), contextual, halo=0), grid)
        blended = assemble(blended_tiles(grid, lambda b: read_tile(slide, grid, b), contextual, halo=48), grid)
    assert seam_ratio(plain, 128) > 1.2  # visible seams
    assert seam_ratio(blended, 128) < 1.1  # within 10% of the gradient energy inside tiles


def test_halo_larger_than_half_a_tile_is_refused(slide_path):
    path, _ = slide_path
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size=128)
        with pytest.raises(InputError, match="half the tile size"):
            list(blended_tiles(grid, lambda b: read_tile(slide, grid, b), lambda ws, boxes: ws, halo=100))

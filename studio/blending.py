"""Seamless tile-by-tile processing of whole slides for context-dependent transforms.

A pixelwise transform (a stain LUT) can run tile by tile with no seams. A network (the
diffusion normalizer, a virtual-IHC translator) cannot: its output near a tile border
depends on what lies beyond it, and independently processed tiles disagree there --
StainFuser's own WSI mode (512x512 tiles, no overlap) shows exactly those seams.

:func:`blended_tiles` reads every tile with a ``halo`` of context on each side (a window),
runs the transform on the windows, and blends neighbouring windows linearly across the
``2 x halo`` band around each tile border: the weights of the two windows sum to one
there, so the result is a smooth cross-fade, and away from borders each pixel comes from
the window that has the most context around it. Output tiles come out in the slide
grid's row-major order, ready for :func:`studio.slides.write_pyramid`, and memory holds
three tile rows (float16), so it does not grow with the slide's height.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from studio.errors import InputError

WindowFn = Callable[[list[np.ndarray], list], list[np.ndarray]]  # (windows, their boxes) -> outputs


def ramp(start: int, stop: int, tile_start: int, tile_stop: int, total: int, halo: int) -> np.ndarray:
    """1-D blending weight over a window ``[start, stop)`` whose own tile is ``[tile_start, tile_stop)``.

    Ramps 0 -> 1 across ``[tile_start - halo, tile_start + halo)`` when a neighbour lies
    before it, 1 -> 0 across ``[tile_stop - halo, tile_stop + halo)`` when one lies after
    it; neighbouring ramps sum to exactly one.
    """
    u = np.arange(start, stop, dtype=np.float32) + 0.5
    w = np.ones(stop - start, dtype=np.float32)
    if halo > 0 and tile_start > 0:
        w = np.minimum(w, np.clip((u - (tile_start - halo)) / (2 * halo), 0, 1))
    if halo > 0 and tile_stop < total:
        w = np.minimum(w, np.clip(((tile_stop + halo) - u) / (2 * halo), 0, 1))
    return w


def blended_tiles(grid, read_window: Callable[[object], np.ndarray], transform: WindowFn, halo: int,
                  batch_size: int = 8) -> Iterator[np.ndarray]:
    """Yield the transformed tiles of ``grid`` (row-major), seams blended.

    Args:
        grid: a :class:`studio.slides.TileGrid`.
        read_window: reads a tile-like box (``x, y, size``) at the grid's scale, e.g.
            ``lambda t: read_tile(slide, grid, t)``.
        transform: ``(uint8 windows, their boxes)`` -> uint8 windows of the same shapes; a box
            carries the window's position (``x``, ``y``) on the grid, e.g. for noise that
            must agree where windows overlap.
        halo: context pixels on each side (at most half the tile size).
    """
    t = grid.tile_size
    if not 0 <= halo <= t // 2:
        raise InputError("halo", f"{halo}; use 0..{t // 2} (half the tile size)")
    width, height = grid.width, grid.height
    rows: dict[int, list] = {}
    for tile in grid.tiles:
        rows.setdefault(tile.row, []).append(tile)
    acc: dict[int, np.ndarray] = {}

    def band(r: int) -> np.ndarray:
        if r not in acc:
            y0 = r * t
            acc[r] = np.zeros((min(t, height - y0), width, 3), dtype=np.float16)
        return acc[r]

    def add(r: int, window: np.ndarray, wy0: int, wx0: int, weight: np.ndarray) -> None:
        """Add the part of a weighted window that falls in tile row ``r``."""
        if r < 0 or r * t >= height:
            return
        y0, y1 = r * t, min((r + 1) * t, height)
        a, b = max(y0, wy0), min(y1, wy0 + window.shape[0])
        if a >= b:
            return
        part = window[a - wy0:b - wy0].astype(np.float32) * weight[a - wy0:b - wy0, :, None]
        target = band(r)[a - y0:b - y0, wx0:wx0 + window.shape[1]]
        target += part.astype(np.float16)

    for r in sorted(rows):
        tiles = rows[r]
        windows = []
        for tile in tiles:
            w, h = tile.size
            x0, y0 = max(0, tile.x - halo), max(0, tile.y - halo)
            x1, y1 = min(width, tile.x + w + halo), min(height, tile.y + h + halo)
            windows.append((tile, replace(tile, x=x0, y=y0, size=(x1 - x0, y1 - y0))))
        outputs: list[np.ndarray] = []
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            outputs += transform([read_window(box) for _, box in chunk], [box for _, box in chunk])
        for (tile, box), out in zip(windows, outputs, strict=True):
            bw, bh = box.size
            if out.shape[:2] != (bh, bw):
                raise InputError("transform", f"returned {out.shape[:2]} for a {bh}x{bw} window")
            wy = ramp(box.y, box.y + bh, tile.y, tile.y + tile.size[1], height, halo)
            wx = ramp(box.x, box.x + bw, tile.x, tile.x + tile.size[0], width, halo)
            weight = wy[:, None] * wx[None, :]
            for rr in (r - 1, r, r + 1):
                add(rr, out, box.y, box.x, weight)
        # row r - 1 has every contribution now (from r - 2, r - 1 and r)
        if r - 1 in acc:
            yield from _emit(acc.pop(r - 1), rows[r - 1], t)
    last = max(rows)
    if last in acc:
        yield from _emit(acc.pop(last), rows[last], t)


def _emit(strip: np.ndarray, tiles: Sequence, t: int) -> Iterator[np.ndarray]:
    for tile in tiles:
        w, h = tile.size
        yield np.clip(np.rint(strip[:h, tile.x:tile.x + w].astype(np.float32)), 0, 255).astype(np.uint8)

"""Exact colour lookup tables for fixed per-pixel transforms.

Once a slide's source profile is fixed, every classical normalizer is a pure function of
a pixel's RGB triplet. There are only 256^3 triplets, so we push all of them through the
float transform once (~16.8 M pixels, about the cost of 256 tiles) and from then on a
tile is a table lookup on its uint8 pixels: no float conversion, no log/exp, bit-identical
to the float path followed by rounding. Measured on 2 cores: 40 ms per 64 tiles of
256x256 with one thread, against ~100 ms for the float path with its conversions.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from studio.errors import InputError

LUT_SIZE = 256 ** 3


def all_colours(start: int, stop: int) -> torch.Tensor:
    """The RGB triplets with packed index ``r << 16 | g << 8 | b`` in [start, stop), as
    float ``(1, 3, 1, stop - start)`` in [0, 1]."""
    idx = torch.arange(start, stop, dtype=torch.int64)
    rgb = torch.stack(((idx >> 16) & 255, (idx >> 8) & 255, idx & 255)).to(torch.float32).div_(255.0)
    return rgb.reshape(1, 3, 1, -1)


def pixel_words(images: np.ndarray) -> np.ndarray:
    """Each uint8 ``(..., 3)`` pixel's bytes read as one integer ``r | g << 8 | b << 16`` (uint32).

    Why this order: it is the pixel as it lies in memory. The pixels are copied once,
    contiguously, into a buffer one byte longer; a little-endian uint32 view with a 3-byte
    stride then reads (r, g, b, next r) per pixel, and the mask drops the neighbour's byte.
    That is one memcpy and one masked pass: ~4x faster than assembling the integer from
    strided channel copies (measured on slide tiles, 1 thread: ~700 vs ~180 MPix/s).
    """
    arr = np.asarray(images)
    n = arr.size // 3
    buf = np.empty(3 * n + 1, dtype=np.uint8)
    np.copyto(buf[:-1].reshape(arr.shape), arr)
    buf[-1] = 0
    words = np.ndarray((n,), dtype="<u4", buffer=buf, offset=0, strides=(3,))
    return (words & 0xFFFFFF).reshape(arr.shape[:-1])


def words_to_pixels(words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 ``shape`` (..., 3) pixels from integers ``r | g << 8 | b << 16``, the inverse of
    :func:`pixel_words`.

    The words are written as little-endian uint32 at a 3-byte stride, so each write also sets
    the first byte of the next pixel; a second, 1-byte strided pass restores every first
    byte. Neither pass depends on the order numpy writes in."""
    flat = np.ascontiguousarray(words, dtype="<u4").reshape(-1)
    n = flat.size
    buf = np.empty(3 * n + 1, dtype=np.uint8)
    np.ndarray((n,), dtype="<u4", buffer=buf, offset=0, strides=(3,))[...] = flat
    buf[0:3 * n:3] = flat.view(np.uint8)[0::4]  # the low byte of each little-endian word
    return buf[:-1].reshape(shape)


#: Pixels looked up per pass: one 512 px tile. Its scratch (11 bytes a pixel, ~2.9 MB) is
#: allocated once per thread and reused from pass to pass.
SEGMENT_PIXELS = 1 << 18


class _Scratch:
    """One thread's buffers for :meth:`ColorLUT._map_segments`: the staged pixels (one byte
    longer, for the last 4-byte read), their table indices and the looked-up words."""

    def __init__(self) -> None:
        self.pixels = np.empty(3 * SEGMENT_PIXELS + 1, dtype=np.uint8)
        self.index = np.empty(SEGMENT_PIXELS, dtype=np.uint32)
        self.value = np.empty(SEGMENT_PIXELS, dtype=np.uint32)


#: Scratch buffers not in use, shared by every table and thread (at most one per thread
#: that ever ran a lookup at once; ~2.9 MB each).
_SCRATCH: queue.SimpleQueue[_Scratch] = queue.SimpleQueue()


def _as_tiles(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 ``(..., 3)`` arrays of one shape: an array's leading axis (or the array itself
    when it is one image or a pixel run), or the sequence's members."""
    if isinstance(images, (list, tuple)):
        tiles = [np.asarray(t) for t in images]
    else:
        arr = np.asarray(images)
        tiles = [arr] if arr.ndim <= 3 else list(arr.reshape((math.prod(arr.shape[:-3]),) + arr.shape[-3:]))
    if not tiles:
        raise InputError("images", "no images to map")
    shape = tiles[0].shape
    for t in tiles:
        if t.dtype != np.uint8 or t.ndim < 1 or t.shape[-1] != 3 or t.shape != shape:
            raise InputError("images", f"{t.shape} {t.dtype}; expected uint8 RGB (..., 3), every tile {shape}")
    return tiles


def _pixel_segments(tile: np.ndarray, slot: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``tile``'s pixels and their output ``slot`` in runs of at most :data:`SEGMENT_PIXELS`:
    ``(src, dst)`` with ``dst`` a contiguous ``(n, 3)`` view of ``slot`` and ``src`` the same
    pixels in any layout (a strided tile is cut into bands of whole rows, never copied)."""
    if tile.size == 0:
        return []
    dst = slot.reshape(-1, 3)
    if tile.flags.c_contiguous:
        src = tile.reshape(-1, 3)
        return [(src[i:i + SEGMENT_PIXELS], dst[i:i + SEGMENT_PIXELS]) for i in range(0, len(src), SEGMENT_PIXELS)]
    rows = tile.reshape((-1,) + tile.shape[-2:]) if tile.ndim >= 3 else tile.reshape((1,) + tile.shape[-2:])
    width = rows.shape[1]
    if width <= SEGMENT_PIXELS:
        step = SEGMENT_PIXELS // width
        return [(rows[r:r + step], dst[r * width:(r + step) * width]) for r in range(0, len(rows), step)]
    return [(rows[r, c:c + SEGMENT_PIXELS], dst[r * width + c:r * width + min(c + SEGMENT_PIXELS, width)])
            for r in range(len(rows)) for c in range(0, width, SEGMENT_PIXELS)]


class ColorLUT:
    """A table mapping every RGB colour to its transformed colour.

    Stored as ``words``: 256^3 uint32 (64 MiB), indexed and valued in the pixel-in-memory
    order ``r | g << 8 | b << 16`` (:func:`pixel_words`). A gather of one 4-byte word per
    pixel is ~2x faster than gathering 3-byte rows (``np.take(..., axis=0)``), and a slide's
    normalize job spends most of its non-codec time in this lookup."""

    def __init__(self, table: np.ndarray):
        """``table``: uint8 ``(256^3, 3)``, row ``r << 16 | g << 8 | b`` holds that colour's output."""
        table = np.asarray(table)
        if table.shape != (LUT_SIZE, 3) or table.dtype != np.uint8:
            raise InputError("lut", f"table of shape {table.shape} {table.dtype}; expected ({LUT_SIZE}, 3) uint8")
        # row r<<16|g<<8|b as a (r, g, b) cube; the word order is (b, g, r) from the outside in
        cube = table.reshape(256, 256, 256, 3).transpose(2, 1, 0, 3)
        self.words = pixel_words(cube).reshape(-1)

    @classmethod
    def from_words(cls, words: np.ndarray) -> ColorLUT:
        """A table already in the word layout (no conversion)."""
        words = np.ascontiguousarray(words, dtype="<u4").reshape(-1)
        if words.shape != (LUT_SIZE,):
            raise InputError("lut", f"{words.shape} words; expected ({LUT_SIZE},)")
        lut = cls.__new__(cls)
        lut.words = words
        return lut

    @property
    def table(self) -> np.ndarray:
        """The uint8 ``(256^3, 3)`` table in the constructor's row order (for inspection and tests)."""
        cube = words_to_pixels(self.words, (256, 256, 256, 3))  # axes (b, g, r)
        return np.ascontiguousarray(cube.transpose(2, 1, 0, 3)).reshape(LUT_SIZE, 3)

    @classmethod
    def from_transform(cls, transform: Callable[[torch.Tensor], torch.Tensor], chunk: int = 1 << 20) -> ColorLUT:
        """Tabulate ``transform`` (float ``(B,3,H,W)`` -> same) over every RGB colour."""
        table = np.empty((LUT_SIZE, 3), dtype=np.uint8)
        with torch.no_grad():
            for start in range(0, LUT_SIZE, chunk):
                stop = min(start + chunk, LUT_SIZE)
                out = transform(all_colours(start, stop))
                table[start:stop] = out.reshape(3, -1).T.clamp(0, 1).mul(255.0).add_(0.5).to(torch.uint8).numpy()
        return cls(table)

    @classmethod
    def from_od_map(cls, matrix: torch.Tensor, background: float = 1.0) -> ColorLUT:
        """The table of ``od_to_rgb(matrix @ rgb_to_od(rgb))`` built per channel.

        A transform that is linear in optical density factorises: output channel ``c`` is
        ``background * prod_k exp(-matrix[c, k] * od(rgb_k)) - offset``, a product of three
        256-entry tables. So the 16.8 M-entry table is three outer products, not 16.8 M
        pixels through log, matmul and exp: ~5x less work per slide. Equal to
        :meth:`from_transform` of the same map but for rounding ties (a product of exps is
        not bit-equal to the exp of a sum: at most 1 grey level, on ~1e-4 of colours).
        """
        from studio.color import DEFAULT_OFFSET, rgb_to_od

        m = torch.as_tensor(matrix, dtype=torch.float32).reshape(3, 3)
        od = rgb_to_od(torch.arange(256, dtype=torch.float32).div_(255.0), background=background)
        # Word layout: index b << 16 | g << 8 | r, value bytes (out r, out g, out b, 0).
        bytes_ = np.zeros((256, 65536, 4), dtype=np.uint8)
        rows = 16  # (16, 65536) float blocks stay in cache through the passes below
        with torch.no_grad():
            for c in range(3):
                e = torch.exp(-m[c].reshape(3, 1) * od)  # (3, 256): one factor per input channel
                blue = e[2].mul(255.0 * background)  # the output scale folded into one factor
                green_red = (e[1].reshape(256, 1) * e[0].reshape(1, 256)).reshape(1, 65536)
                for b0 in range(0, 256, rows):
                    block = blue[b0:b0 + rows].reshape(-1, 1) * green_red
                    # round(255 * clamp(x - offset, 0, 1)): + 0.5 then truncate, clamped to [0, 255]
                    block.add_(0.5 - 255.0 * DEFAULT_OFFSET).clamp_(0.0, 255.5)
                    bytes_[b0:b0 + rows, :, c] = block.to(torch.uint8).numpy()
        return cls.from_words(bytes_.reshape(-1).view("<u4"))

    def apply(self, images: np.ndarray | Sequence[np.ndarray], workers: int = 1) -> np.ndarray:
        """Map uint8 ``(..., 3)`` images, or a sequence of same-shaped ``(H, W, 3)`` tiles
        (mapped as their stack, which is never built); ``workers > 1`` splits the pixels
        over threads.

        Why a sequence: a slide job's tiles arrive as separate decoded arrays. Each is read
        straight into a reused scratch buffer and its result written into its slot of the
        one output array, so a batch costs no stack or concatenation copy and no fresh
        scratch memory (page faults). Measured on 12 batches of 16 slide tiles of 512 px, 2
        threads, 3 interleaved runs: 448-491 MPix/s (~265 MPix per CPU-second) against
        112-205 MPix/s (81-121) for the previous path (stack the batch, split the array over
        threads, concatenate their halves). ``bench/stain.py --sections 6`` keeps a row of it.
        """
        if not isinstance(images, (list, tuple)):
            images = np.asarray(images)
        tiles = _as_tiles(images)
        out = np.empty((len(tiles),) + tiles[0].shape, dtype=np.uint8)
        segments = [(src, dst) for tile, slot in zip(tiles, out, strict=True)
                    for src, dst in _pixel_segments(tile, slot)]
        workers = max(1, min(int(workers), len(segments)))
        if workers == 1:
            self._map_segments(segments)
        else:
            parts = [segments[i::workers] for i in range(workers)]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(self._map_segments, parts))
        return out if isinstance(images, (list, tuple)) else out.reshape(images.shape)

    def _map_segments(self, segments: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Look up each ``(src, dst)`` pair: ``src`` a run of pixels in any layout, ``dst``
        its contiguous ``(n, 3)`` slot in the output. The output is written as little-endian
        words at a 3-byte stride for all but the last pixel (each word's high byte falls on
        the next pixel's first byte, which the 1-byte strided pass then restores), and the
        last pixel as 3 bytes, so no write leaves the run: threads may fill neighbouring runs
        of one array."""
        try:
            scratch = _SCRATCH.get_nowait()
        except queue.Empty:
            scratch = _Scratch()
        try:
            for src, dst in segments:
                n = src.size // 3
                staged = scratch.pixels[:3 * n + 1]
                np.copyto(staged[:-1].reshape(src.shape), src)
                staged[-1] = 0
                words = np.ndarray((n,), dtype="<u4", buffer=staged, strides=(3,))
                index = np.bitwise_and(words, 0xFFFFFF, out=scratch.index[:n])
                value = np.take(self.words, index, out=scratch.value[:n])
                flat = dst.reshape(-1)
                np.ndarray((n - 1,), dtype="<u4", buffer=flat, strides=(3,))[...] = value[:-1]
                flat[0::3] = value.view(np.uint8)[0::4]  # the low byte of each little-endian word
                flat[-3:] = value[-1:].view(np.uint8)[:3]
        finally:
            _SCRATCH.put(scratch)

    def apply_tensor(self, tiles: torch.Tensor) -> torch.Tensor:
        """Float ``(B,3,H,W)`` in [0,1] (quantised to uint8 first) -> float in [0,1]."""
        u8 = tiles.clamp(0, 1).mul(255.0).add_(0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = torch.from_numpy(self.apply(u8)).permute(0, 3, 1, 2)
        return out.to(tiles.device, torch.float32).div_(255.0)

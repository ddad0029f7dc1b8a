"""Whole-slide images: reading, tissue detection, tiling, and streaming pyramid writing.

The module is split the way tiatoolbox splits it, so each part can be tested and replaced
on its own:

* **reading** -- :func:`open_slide` returns a thin :class:`Slide` over tiffslide (TIFF
  family, the default), OpenSlide (MIRAX, Hamamatsu VMS, ... or on request) or an
  in-memory plain image (PNG/JPEG/small TIFF), all with one coordinate convention:
  locations in **level-0 pixels** ``(x, y)``, sizes in pixels of the level read, RGB
  ``uint8``; anything outside the slide is white glass (255).
* **tissue** -- :func:`tissue_mask` thresholds optical density on a thumbnail and cleans
  it with morphology; the result is a low-resolution boolean :class:`TissueMask`.
* **tiling** -- :func:`tile_grid` lays a row-major grid of tiles over the *output* image
  at a working resolution (``mpp`` in microns per pixel or an objective magnification),
  picks the pyramid level to read from, and records each tile's tissue fraction;
  :func:`read_tile` / :func:`read_tiles` fetch tile pixels (the latter reads ahead in a
  small thread pool so disk IO and JPEG decoding overlap the caller's compute).
* **writing** -- :func:`write_pyramid` streams tiles into a tiled, pyramidal TIFF that
  both tiffslide and OpenSlide (hence QuPath) open with every level visible, holding at
  most a strip of ``tile_size`` rows in memory; :func:`write_mosaic_slide` uses it to make
  arbitrarily large test slides out of the real H&E samples the studio ships.

Pyramid layout (why it is readable everywhere). OpenSlide's *generic tiled TIFF* driver
walks the **main IFD chain** only: directory 0 must be tiled and is level 0, and every
later tiled directory whose ``NewSubfileType`` has the reduced-resolution bit (1) is a
level (SubIFDs are never visited; levels are sorted by width). tifffile -- and therefore
tiffslide, which uses ``TiffFile.series[0].levels`` -- groups main-chain pages by shape
into series and *pyramidizes* them when each one is a 2x (floor or ceil) reduction of
the previous. So :func:`write_pyramid` writes every level as a tiled page in the main
chain, level 0 with ``NewSubfileType=0`` and each reduced level with ``NewSubfileType=1``,
level ``k+1`` being ``ceil(level k / 2)`` on each side, and no tifffile "shaped" JSON
(which would make tifffile treat pages as one stacked series). JPEG tiles are YCbCr 4:2:0
(like Aperio SVS); deflate tiles use the horizontal predictor. Level 0 carries
``XResolution/YResolution`` in pixels per centimetre (``ResolutionUnit=3``), from which
tiffslide reports ``tiffslide.mpp-x`` and OpenSlide ``openslide.mpp-x``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from studio.errors import InputError
from studio.io import (
    IMAGE_SUFFIXES,
    LARGE_IMAGE_MAX_PIXELS,
    TIFF_SUFFIXES,
    atomic_path,
    plain_image_pixels,
    quiet_tifffile,
    read_image,
)

__all__ = [
    "SLIDE_SUFFIXES",
    "Slide",
    "Tile",
    "TileGrid",
    "TissueMask",
    "is_slide_path",
    "open_slide",
    "read_tile",
    "read_tiles",
    "tile_grid",
    "tissue_mask",
    "write_mosaic_slide",
    "write_pyramid",
]

# Whole-slide formats. TIFF-family ones are read by tiffslide (pure Python, no system
# library); the rest need OpenSlide. Plain .tif/.tiff are slides only when tiled, pyramidal
# or large (see is_slide_path).
TIFFSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff")
OPENSLIDE_ONLY_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide",
                                   ".tif", ".tiff")
BACKENDS = ("auto", "tiffslide", "openslide", "image")

# A plain TIFF is treated as a slide above this many pixels on a side: beyond it, reading
# the whole image into memory as a "tile" stops being reasonable.
LARGE_TIFF_SIDE = 4096
# Relative tolerance when matching a requested working resolution to level 0 or to a
# pyramid level (scanner calibrations of "20x" range over ~0.48-0.51 um/px).
MPP_TOLERANCE = 0.02
# mpp values outside this range are metadata noise (72 dpi defaults give 352 um/px).
_MPP_RANGE = (0.01, 100.0)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_WHITE = 255


# =========================================================================== reading
def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _is_tiff_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _above_plain_image_limit(path: Path) -> bool:
    """A PNG/JPEG larger than Pillow's decompression-bomb limit: read as a one-level slide."""
    from PIL import Image

    pixels = plain_image_pixels(path) if path.is_file() else None
    return bool(pixels and Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS)


@quiet_tifffile()  # tifffile logs what it fails on; a bad file becomes our one-line error instead
def is_slide_path(path: str | Path) -> bool:
    """True when ``path`` should be opened as a whole slide rather than read as one image.

    Whole-slide formats (.svs, .ndpi, .mrxs, ...) are slides by extension. A .tif/.tiff is
    a slide when it is tiled, holds a pyramid (more than one resolution) or is larger than
    ``LARGE_TIFF_SIDE`` pixels on a side; small plain (stripped, single-level) TIFF tiles,
    PNG and JPEG are images, unless a PNG/JPEG is above Pillow's decompression-bomb limit:
    then it is a one-level slide, read whole (up to ``LARGE_IMAGE_MAX_PIXELS``) and
    processed tile by tile. A TIFF that cannot be parsed is not a slide (reading it as an
    image then gives the precise error).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES and suffix not in TIFF_SUFFIXES:
        return _above_plain_image_limit(path)
    if suffix not in SLIDE_SUFFIXES:
        return False
    if suffix not in TIFF_SUFFIXES:
        return True
    if not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            if page.is_tiled or max(page.shape[:2]) > LARGE_TIFF_SIDE:
                return True
            series = tf.series
            return bool(series) and len(series[0].levels) > 1
    except Exception:
        return False


def _valid_mpp(*values: Any) -> float | None:
    """First value that parses as a plausible microns-per-pixel, else None."""
    for value in values:
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(mpp) and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
            return mpp
    return None


def _as_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Backend pixels (gray, RGB, RGBA; 8 or 16 bit) -> contiguous uint8 (h, w, 3)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    channels = arr.shape[-1]
    if channels in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    elif channels == 4:
        alpha = arr[..., 3:4]
        if alpha.min(initial=255) < 255:
            a = alpha.astype(np.float32) / 255.0
            arr = (arr[..., :3] * a + _WHITE * (1.0 - a) + 0.5).astype(np.uint8)
        else:
            arr = arr[..., :3]
    elif channels > 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


class _TiffSlideReader:
    """tiffslide (tifffile + zarr): TIFF-family slides, no system library needed."""

    name = "tiffslide"

    def __init__(self, path: Path):
        import tiffslide

        self._slide = tiffslide.TiffSlide(path)
        try:
            self.level_dimensions = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
            self.properties = {k: v for k, v in self._slide.properties.items() if v is not None}
            self.mpp = _valid_mpp(self.properties.get("tiffslide.mpp-x"), self.properties.get("tiffslide.mpp-y"))
        except BaseException:
            self._slide.close()
            raise

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # tiffslide maps level-0 locations with int(loc / downsample); ceil(x * ds) lands
        # back on exactly x for any downsample >= 1.
        ds = self.level_downsamples[level]
        loc = (x, y) if level == 0 else (math.ceil(x * ds), math.ceil(y * ds))
        return self._slide.read_region(loc, level, (w, h), as_array=True, padding=False)

    def close(self) -> None:
        self._slide.close()


class _OpenSlideReader:
    """OpenSlide (C library via openslide-python + openslide-bin): every vendor format."""

    name = "openslide"

    def __init__(self, path: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        try:
            self.level_dimensions = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
            self.properties = dict(self._slide.properties)
            self.mpp = _valid_mpp(self.properties.get("openslide.mpp-x"), self.properties.get("openslide.mpp-y"))
        except BaseException:
            self._slide.close()
            raise

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # OpenSlide keeps loc / downsample fractional (sub-pixel shift); round() keeps the
        # shift below half a level pixel for non-integer downsamples and exact otherwise.
        ds = self.level_downsamples[level]
        loc = (x, y) if level == 0 else (round(x * ds), round(y * ds))
        return np.asarray(self._slide.read_region(loc, level, (w, h)))

    def close(self) -> None:
        self._slide.close()


class _ImageReader:
    """A plain image held in memory as a one-level slide."""

    name = "image"

    def __init__(self, image: np.ndarray):
        self._image = np.ascontiguousarray(image)
        h, w = self._image.shape[:2]
        self.level_dimensions = [(int(w), int(h))]
        self.level_downsamples = [1.0]
        self.properties: dict[str, Any] = {}
        self.mpp = None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._image[y:y + h, x:x + w]

    def close(self) -> None:
        self._image = np.zeros((0, 0, 3), np.uint8)


class Slide:
    """A thin, backend-independent slide reader (use as a context manager).

    Attributes:
        path: the file.
        backend: ``"tiffslide"``, ``"openslide"`` or ``"image"``.
        dimensions: ``(width, height)`` of level 0 in pixels.
        level_count, level_dimensions, level_downsamples: the pyramid (downsample = level-0
            pixels per level pixel, 1.0 for level 0).
        mpp: microns per pixel at level 0, or None when the file does not say (or says
            something implausible, outside 0.01-100 um/px).
        properties: the backend's metadata (vendor keys, ``tiff.*``, ...).

    Reads are thread-safe to the extent of the backend (tiffslide and OpenSlide both are);
    a background reader (:func:`read_tiles`) and the caller may share one slide.

    Sub-pixel note: a level-0 location maps to ``location / downsample`` at a reduced
    level. tiffslide truncates that to a whole pixel; OpenSlide keeps the fraction and
    interpolates, so on levels whose downsample is not an integer (e.g. 3.99 for a
    ceil-halved pyramid of odd size) OpenSlide's offset reads are slightly resampled.
    :meth:`read_level` asks each backend for the location closest to the exact level
    pixel (exact with tiffslide and for integer downsamples).
    """

    def __init__(self, path: str | Path, backend: str, reader: Any):
        self.path = Path(path)
        self.backend = backend
        self._reader = reader
        self.level_dimensions: list[tuple[int, int]] = list(reader.level_dimensions)
        self.level_downsamples: list[float] = list(reader.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.mpp: float | None = reader.mpp
        self.properties: dict[str, Any] = dict(reader.properties)
        self._closed = False
        self._mask_cache: dict[tuple[int, float], TissueMask] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle (idempotent)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._reader.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:g} um/px" if self.mpp else "mpp unknown"
        return f"Slide({self.path.name!r}, {self.backend}, {w}x{h}, {self.level_count} levels, {mpp})"

    # ------------------------------------------------------------------ geometry
    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1e-6 slack)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise InputError(self.path, f"has no level {level!r} (levels 0..{self.level_count - 1})")

    # ------------------------------------------------------------------ pixels
    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read ``(w, h)`` pixels at ``(x, y)`` in **level** coordinates; white outside.

        Returns a new uint8 ``(h, w, 3)`` RGB array.
        """
        if self._closed:
            raise InputError(self.path, "slide is closed")
        self._check_level(level)
        w, h, x, y = int(w), int(h), int(x), int(y)
        if w <= 0 or h <= 0:
            raise InputError(self.path, f"region size must be positive, got {w}x{h}")
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        inside = x1 > x0 and y1 > y0
        if inside and (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._read_inside(level, x, y, w, h)
        out = np.full((h, w, 3), _WHITE, dtype=np.uint8)
        if inside:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_inside(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            arr = _as_rgb_uint8(self._reader.read(level, x, y, w, h))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(self.path, f"cannot read level {level} at ({x}, {y}) size {w}x{h}: corrupt or "
                                        f"truncated slide data ({type(exc).__name__}: {exc})") from exc
        if arr.shape[:2] != (h, w):
            raise InputError(self.path, f"backend returned {arr.shape[1]}x{arr.shape[0]} pixels for a "
                                        f"{w}x{h} read at level {level}")
        if self.backend == "image":
            arr = arr.copy()
        return arr

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region as uint8 ``(h, w, 3)`` RGB (the OpenSlide convention).

        Args:
            location: ``(x, y)`` of the top-left corner in **level-0** pixels.
            level: pyramid level to read from.
            size: ``(w, h)`` in pixels **of that level**.

        Parts outside the slide are white (255), as glass would be.
        """
        self._check_level(level)
        ds = self.level_downsamples[level]
        x, y = (int(v) for v in location)
        lx, ly = (x, y) if level == 0 else (math.floor(x / ds), math.floor(y / ds))
        return self.read_level(level, lx, ly, int(size[0]), int(size[1]))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide as uint8 RGB, longest side ``max_size`` (or the slide's own size
        when smaller), aspect ratio kept.

        Reads the coarsest level that is still at least as fine as the thumbnail, in bands
        of at most ~32 MB, and area-averages (PIL box filter) each band, so memory stays
        bounded even on a single-level gigapixel TIFF.
        """
        from PIL import Image

        if int(max_size) < 1:
            raise InputError("max_size", f"must be a positive number of pixels, got {max_size}")
        w0, h0 = self.dimensions
        factor = max(1.0, max(w0, h0) / int(max_size))
        ow, oh = max(1, math.floor(w0 / factor + 0.5)), max(1, math.floor(h0 / factor + 0.5))
        ow, oh = min(ow, int(max_size)), min(oh, int(max_size))
        level = self.best_level_for_downsample(factor)
        lw, lh = self.level_dimensions[level]
        if (lw, lh) == (ow, oh):
            return self.read_level(level, 0, 0, lw, lh)
        out = np.empty((oh, ow, 3), dtype=np.uint8)
        ry = lh / oh
        band = max(1, int(32e6 / (lw * 3 * ry)))
        for o0 in range(0, oh, band):
            o1 = min(oh, o0 + band)
            sy0, sy1 = o0 * ry, min(o1 * ry, lh)
            iy0, iy1 = math.floor(sy0), min(lh, math.ceil(sy1))
            strip = self.read_level(level, 0, iy0, lw, iy1 - iy0)
            img = Image.fromarray(strip).resize((ow, o1 - o0), Image.Resampling.BOX,
                                                box=(0.0, sy0 - iy0, float(lw), sy1 - iy0))
            out[o0:o1] = np.asarray(img)
        return out


def _check_tiff_integrity(path: Path) -> None:
    """Refuse a TIFF whose image data runs past the end of the file (truncated copy,
    interrupted download), before any tile read fails deep inside a job."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise InputError(path, "TIFF holds no images")
            for k, level in enumerate(tf.series[0].levels):
                for page in level.pages:
                    if page is None:
                        raise InputError(path, f"is truncated or corrupt: level {k} is missing pages")
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    if offsets.size and int((offsets + counts).max()) > size:
                        need = int((offsets + counts).max())
                        raise InputError(path, f"is truncated: level {k} image data needs {need} bytes, "
                                               f"the file has {size}")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"corrupt or truncated TIFF ({type(exc).__name__}: {exc})") from exc


def _import_ok(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # ImportError, or OSError when openslide-bin's library is missing
        return False
    return True


def _open_with(path: Path, backend: str) -> Slide:
    if backend == "image":
        return Slide(path, "image", _ImageReader(read_image(path, max_pixels=LARGE_IMAGE_MAX_PIXELS)))
    module = {"tiffslide": "tiffslide", "openslide": "openslide"}[backend]
    if not _import_ok(module):
        hint = "pip install tiffslide" if backend == "tiffslide" else "pip install openslide-python openslide-bin"
        raise InputError(path, f"needs the {backend} backend, which is not installed ({hint})")
    reader_cls = _TiffSlideReader if backend == "tiffslide" else _OpenSlideReader
    try:
        reader = reader_cls(path)
    except Exception as exc:
        raise InputError(path, f"cannot be opened with {backend}: unsupported, corrupt or truncated slide "
                               f"({type(exc).__name__}: {exc})") from exc
    if not reader.level_dimensions or min(reader.level_dimensions[0]) <= 0:
        reader.close()
        raise InputError(path, f"{backend} found no image in this slide")
    return Slide(path, backend, reader)


@quiet_tifffile()  # tifffile logs what it fails on; a bad file becomes our one-line error instead
def open_slide(path: str | Path, backend: str = "auto") -> Slide:
    """Open a whole slide (or a plain image, as a one-level slide).

    Args:
        path: the slide file (.svs, .ndpi, .mrxs, pyramidal .tif, ...) or an image.
        backend: ``"auto"`` (tiffslide for the TIFF family, OpenSlide for formats tiffslide
            cannot read -- MIRAX, VMS/VMU, Sakura -- and as a fallback when tiffslide fails
            on a TIFF-family file; plain images via :func:`studio.io.read_image`),
            ``"tiffslide"``, ``"openslide"`` or ``"image"``.

    Raises:
        InputError: naming the file, for a missing path, a folder, an unknown backend or
            extension, a backend that is not installed, or a corrupt/truncated file.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(path, f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, expected a slide file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from exc
    suffix = _suffix(path)
    if suffix not in SLIDE_SUFFIXES and suffix not in IMAGE_SUFFIXES:
        raise InputError(path, f"unknown slide format {suffix or '(no extension)'!r}; "
                               f"expected one of {', '.join(SLIDE_SUFFIXES + IMAGE_SUFFIXES)}")
    tiff_like = _is_tiff_file(path)
    if tiff_like:
        _check_tiff_integrity(path)
    elif suffix in TIFFSLIDE_SUFFIXES and suffix not in TIFF_SUFFIXES:
        raise InputError(path, f"is not a valid {suffix} slide (not a TIFF file)")

    if backend != "auto":
        return _open_with(path, backend)
    if suffix in OPENSLIDE_ONLY_SUFFIXES:
        return _open_with(path, "openslide")
    if suffix in IMAGE_SUFFIXES and (suffix not in TIFF_SUFFIXES or not is_slide_path(path)):
        return _open_with(path, "image")
    try:
        return _open_with(path, "tiffslide")
    except InputError as first:
        if not _import_ok("openslide"):
            raise
        try:
            return _open_with(path, "openslide")
        except InputError:
            raise first from None


# =========================================================================== tissue
@dataclass(frozen=True)
class TissueMask:
    """Low-resolution tissue mask.

    Attributes:
        mask: bool ``(h, w)``; True where there is tissue.
        downsample: level-0 pixels per mask pixel.
    """

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


# OD thresholds of the artefact rules (natural-log OD, white = 1.0).
_DARK_MIN_OD = 1.4      # every channel below ~63/255 ...
_DARK_GREYNESS = 0.8    # ... and nearly grey (min/max OD): black pen; dense nuclei are purple (~0.55)
_INK_MIN_OD = 0.3       # chromatic ink must be clearly coloured
_GREEN_INK_RATIO = 0.5  # green channel transmits far more than red and blue: green pen
_BLUE_INK_RATIO = 0.25  # blue transmits >> red (hematoxylin is ~0.45): blue pen


def _remove_small(mask: np.ndarray, size: int, *, holes: bool) -> np.ndarray:
    """skimage remove_small_objects/holes across the 0.26 ``max_size`` API change."""
    from skimage import morphology

    fn = morphology.remove_small_holes if holes else morphology.remove_small_objects
    size = max(int(size), 1)
    try:
        return fn(mask, max_size=size)
    except TypeError:  # scikit-image < 0.26
        return fn(mask, size + 1)


def _pixel_rules(rgb: np.ndarray, min_od: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of uint8 ``(..., 3)``: (absorbs enough to be tissue, is an artefact: black
    pen or green/blue ink); see :func:`tissue_mask` for the thresholds."""
    import torch

    from studio import color

    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:
        rgb = rgb.copy()  # torch.from_numpy warns on read-only arrays
    x = torch.from_numpy(rgb).movedim(-1, 0).float().div_(255.0)
    od = color.rgb_to_od(x).numpy()
    od_r, od_g, od_b = od
    od_max = od.max(axis=0)
    od_min = od.min(axis=0)
    dark = (od_min >= _DARK_MIN_OD) & (od_min >= _DARK_GREYNESS * od_max)
    green_ink = (od_max >= _INK_MIN_OD) & (od_g < _GREEN_INK_RATIO * np.minimum(od_r, od_b))
    blue_ink = (od_r >= 1.0) & (od_b < _BLUE_INK_RATIO * od_r)
    return od_max >= min_od, dark | green_ink | blue_ink


#: A tile is blank when less than this share of its pixels is tissue (glass, black, ink) ...
BLANK_MAX_TISSUE = 0.01
#: ... or when its grey level changes by less than this per pixel on average (flat, or so far
#: out of focus that no nucleus can be told; in-focus H&E tiles of the shipped samples: >= 7.5).
BLANK_MAX_DETAIL = 1.0


def blank_tiles(tiles: np.ndarray, *, min_od: float = 0.1) -> np.ndarray:
    """Which uint8 tiles ``(B, H, W, 3)`` hold nothing to stain or segment: bool ``(B,)``.

    Blank means glass, black (scanner dropout, black pen), ink, or featureless (a flat
    colour, or far out of focus): fewer than :data:`BLANK_MAX_TISSUE` of the pixels pass
    the tissue rule of :func:`tissue_mask` (before morphology), or a mean absolute grey
    gradient below :data:`BLANK_MAX_DETAIL` grey levels per pixel. Translate passes such
    tiles through unchanged and segment gives them empty maps, as a white tile gets.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    out = np.zeros(len(tiles), dtype=bool)
    for i, tile in enumerate(tiles):
        tissue, ink = _pixel_rules(tile, min_od)
        if float((tissue & ~ink).mean()) < BLANK_MAX_TISSUE:
            out[i] = True
            continue
        grey = tile.astype(np.float32).mean(axis=-1)
        if min(grey.shape) < 2:
            out[i] = True
            continue
        detail = (np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2
        out[i] = bool(detail < BLANK_MAX_DETAIL)
    return out


def tissue_mask_from_rgb(rgb: np.ndarray, *, min_od: float = 0.1, pixel_um: float | None = None) -> np.ndarray:
    """Tissue mask of a (thumbnail) RGB image; see :func:`tissue_mask` for the rules.

    Args:
        rgb: uint8 ``(h, w, 3)``.
        min_od: optical density (natural log) a pixel must reach in at least one channel.
        pixel_um: microns per pixel of ``rgb``, to size the morphology physically; None
            uses sizes relative to the image.
    """
    from scipy import ndimage
    from skimage.morphology import disk

    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:
        rgb = rgb.copy()  # torch.from_numpy warns on read-only arrays
    h = rgb.shape[0]
    tissue = np.zeros(rgb.shape[:2], dtype=bool)
    ink = np.zeros(rgb.shape[:2], dtype=bool)
    band = max(1, (1 << 20) // max(1, rgb.shape[1]))  # ~1 MPix of float OD at a time
    for y0 in range(0, h, band):
        tissue[y0:y0 + band], ink[y0:y0 + band] = _pixel_rules(rgb[y0:y0 + band], min_od)
    if ink.any():
        # pen strokes have soft, less saturated rims: exclude a small margin around them
        ink = ndimage.binary_dilation(ink, structure=disk(2))
        tissue &= ~ink
    # sizes: objects < (50 um)^2 are dust/debris; holes < (100 um)^2 (fat cells, small
    # lumina) belong to the tissue around them.
    if pixel_um:
        min_object = 2500.0 / pixel_um**2
        max_hole = 10000.0 / pixel_um**2
    else:
        min_object = max(16.0, tissue.size * 1e-5)
        max_hole = max(64.0, tissue.size * 5e-5)
    r = 2
    padded = np.pad(tissue, r, mode="edge")
    tissue = ndimage.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
    tissue = _remove_small(tissue, int(max_hole), holes=True)
    tissue = _remove_small(tissue, int(min_object), holes=False)
    return tissue


def tissue_mask(slide: Slide, *, max_size: int = 2048, min_od: float = 0.1) -> TissueMask:
    """Where the tissue is, from a thumbnail (longest side ``max_size`` pixels).

    Rule: a pixel is tissue when its optical density reaches ``min_od`` in **any**
    channel (``OD = -ln(I / I_white)`` via :func:`studio.color.rgb_to_od`). A fixed,
    physical threshold rather than Otsu: Otsu assumes a two-mode histogram and drifts
    into the tissue on slides that are nearly all tissue, or into the glass noise on
    slides with a small biopsy, while glass is always near OD 0 (< 0.05 on a calibrated
    scanner) and the faintest eosin-stained stroma still absorbs green at OD > 0.1.
    "Any channel" rather than Macenko's "every channel" (:func:`studio.color.tissue_mask`):
    pale eosin barely absorbs red, and a tissue mask must keep it.

    Artefacts removed: black pen (every channel OD >= 1.4, i.e. below ~63/255, and nearly
    grey: min/max OD >= 0.8 -- the darkest hematoxylin nuclei are purple, ~0.55), green
    ink (green transmitted far more than red and blue -- H&E never does that, both stains
    absorb green) and saturated blue ink (red OD >= 1, blue OD < 0.25 x red; hematoxylin
    has ~0.45), with a 2-pixel margin. Then morphology: a closing (radius 2, scipy), then
    scikit-image hole filling (holes smaller than (100 um)^2: fat cells, small lumina) and
    small-object removal (smaller than (50 um)^2: dust, debris); relative sizes when the
    slide has no mpp.

    The result is cached on the slide per ``(max_size, min_od)``.
    """
    key = (int(max_size), float(min_od))
    cached = slide._mask_cache.get(key)
    if cached is not None:
        return cached
    thumb = slide.thumbnail(max_size)
    w0, h0 = slide.dimensions
    downsample = (w0 / thumb.shape[1] + h0 / thumb.shape[0]) / 2.0
    pixel_um = slide.mpp * downsample if slide.mpp else None
    result = TissueMask(tissue_mask_from_rgb(thumb, min_od=min_od, pixel_um=pixel_um), float(downsample))
    slide._mask_cache[key] = result
    return result


# =========================================================================== tiling
@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes:
        index: position in the grid's row-major order.
        row, col: grid row and column.
        x, y: top-left corner in **output** pixels (at the grid's scale).
        size: ``(w, h)`` in output pixels; edge tiles are clipped to the image.
        tissue: fraction of the tile's area that the tissue mask calls tissue.
    """

    index: int
    row: int
    col: int
    x: int
    y: int
    size: tuple[int, int]
    tissue: float


@dataclass(frozen=True)
class TileGrid:
    """Row-major tiles covering the whole output image exactly once.

    Attributes:
        tiles: every tile, row-major (tissue or not: a slide job rewrites all of them).
        tile_size: nominal tile side in output pixels.
        width, height: the output image at the grid's scale, in pixels.
        scale: level-0 pixels per output pixel (1.0 = native resolution).
        level: the pyramid level tiles are read from (the coarsest one at least as fine
            as ``scale``).
        mpp: microns per output pixel (None when the slide has no mpp).
    """

    tiles: list[Tile]
    tile_size: int
    width: int
    height: int
    scale: float
    level: int
    mpp: float | None = field(default=None)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_size)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile_size)

    def tissue_tiles(self, min_tissue: float) -> list[Tile]:
        """Tiles whose tissue fraction is at least ``min_tissue`` (0..1), in grid order."""
        return [t for t in self.tiles if t.tissue >= min_tissue]


def _working_scale(slide: Slide, mpp: float | None, magnification: float | None) -> tuple[float, int, bool]:
    """(scale, level, native) for a requested working resolution.

    ``native`` is True when the scale is (within ``MPP_TOLERANCE``) a level's own
    downsample, so tiles are read from that level without resampling.
    """
    if mpp is not None and magnification is not None:
        raise InputError("magnification", "give a working resolution as mpp or as magnification, not both")
    if magnification is not None:
        if not (isinstance(magnification, numbers.Real) and math.isfinite(magnification) and magnification > 0):
            raise InputError("magnification", f"must be a positive number (e.g. 20 for 20x), got {magnification!r}")
        mpp = 10.0 / float(magnification)
    if mpp is None:
        return 1.0, 0, True
    if not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
        raise InputError("mpp", f"must be a positive number of microns per pixel, got {mpp!r}")
    if slide.mpp is None:
        raise InputError(slide.path, f"has no microns-per-pixel metadata, so {mpp:g} um/px cannot be honoured; "
                                     "work at native resolution (no mpp/magnification)")
    scale = float(mpp) / slide.mpp
    if scale < 1.0 - MPP_TOLERANCE:
        raise InputError(slide.path, f"is scanned at {slide.mpp:g} um/px; {mpp:g} um/px is finer than the scan "
                                     "and would need upsampling (ask for a coarser mpp or lower magnification)")
    for level, ds in enumerate(slide.level_downsamples):
        if abs(scale / ds - 1.0) <= MPP_TOLERANCE:
            return float(ds), level, True
    return scale, slide.best_level_for_downsample(scale), False


def _tissue_fractions(mask: TissueMask, boxes: np.ndarray) -> np.ndarray:
    """Tissue fraction under level-0 boxes ``(n, 4)`` = x0, y0, x1, y1 (summed-area table)."""
    m = mask.mask
    mh, mw = m.shape
    sat = np.zeros((mh + 1, mw + 1), dtype=np.int64 if m.size >= 2**31 else np.int32)
    np.cumsum(m, axis=0, dtype=sat.dtype, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    b = boxes / mask.downsample
    x0 = np.clip(np.floor(b[:, 0]).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.floor(b[:, 1]).astype(np.int64), 0, mh - 1)
    x1 = np.clip(np.maximum(np.ceil(b[:, 2]).astype(np.int64), x0 + 1), 1, mw)
    y1 = np.clip(np.maximum(np.ceil(b[:, 3]).astype(np.int64), y0 + 1), 1, mh)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return total / np.maximum(area, 1)


def tile_grid(slide: Slide, tile_size: int = 256, *, mpp: float | None = None, magnification: float | None = None,
              mask: TissueMask | None = None) -> TileGrid:
    """Lay a row-major tile grid over the slide at a working resolution.

    Args:
        slide: an open slide.
        tile_size: tile side in output pixels.
        mpp: working resolution in microns per pixel (None: native, level 0).
        magnification: alternatively an objective magnification (``mpp = 10 / M``: 20x is
            0.5 um/px, 40x 0.25 um/px).
        mask: tissue mask (computed with :func:`tissue_mask` when None).

    The output image is ``round(level-0 size / scale)`` with ``scale = mpp / slide.mpp``
    level-0 pixels per output pixel. A scale within 2% of a level's downsample (level 0
    included) snaps to it, so tiles are read from that level unresampled; otherwise tiles
    are read from the coarsest finer level and area-resampled.

    Raises:
        InputError: bad tile size, both mpp and magnification, mpp requested on a slide
            without mpp, or a resolution finer than level 0 (beyond the 2% tolerance).
    """
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise InputError("tile_size", f"must be a positive integer, got {tile_size!r}")
    tile_size = int(tile_size)
    scale, level, native = _working_scale(slide, mpp, magnification)
    w0, h0 = slide.dimensions
    if native:
        width, height = slide.level_dimensions[level]
        if level == 0:
            scale = 1.0
    else:
        width, height = max(1, math.floor(w0 / scale + 0.5)), max(1, math.floor(h0 / scale + 0.5))
    if mask is None:
        mask = tissue_mask(slide)
    ys = np.arange(0, height, tile_size)
    xs = np.arange(0, width, tile_size)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    ww = np.minimum(tile_size, width - xx)
    hh = np.minimum(tile_size, height - yy)
    boxes = np.stack([xx * scale, yy * scale, (xx + ww) * scale, (yy + hh) * scale], axis=1).astype(np.float64)
    fractions = _tissue_fractions(mask, boxes)
    ncols = len(xs)
    tiles = [
        Tile(index=i, row=i // ncols, col=i % ncols, x=int(xx[i]), y=int(yy[i]), size=(int(ww[i]), int(hh[i])),
             tissue=float(fractions[i]))
        for i in range(len(xx))
    ]
    out_mpp = slide.mpp * scale if slide.mpp else None
    return TileGrid(tiles=tiles, tile_size=tile_size, width=int(width), height=int(height), scale=float(scale),
                    level=int(level), mpp=out_mpp)


def read_tile(slide: Slide, grid: TileGrid, tile: Tile) -> np.ndarray:
    """Pixels of one tile at the grid's scale: uint8 ``(h, w, 3)`` with ``(w, h) = tile.size``.

    At a level's own scale the tile is a direct read of that level; otherwise the tile's
    exact footprint (fractional level pixels) is area-averaged with PIL's box filter, so
    neighbouring tiles resample consistently and there are no seams.
    """
    from PIL import Image

    w, h = tile.size
    ds = slide.level_downsamples[grid.level]
    ratio = grid.scale / ds  # level pixels per output pixel
    if abs(ratio - 1.0) < 1e-9:
        return slide.read_level(grid.level, round(tile.x * ratio), round(tile.y * ratio), w, h)
    lw, lh = slide.level_dimensions[grid.level]
    sx0, sy0 = tile.x * ratio, tile.y * ratio
    sx1, sy1 = min((tile.x + w) * ratio, float(lw)), min((tile.y + h) * ratio, float(lh))
    sx1, sy1 = max(sx1, sx0 + 1e-3), max(sy1, sy0 + 1e-3)
    ix0, iy0 = math.floor(sx0), math.floor(sy0)
    ix1, iy1 = max(ix0 + 1, math.ceil(sx1)), max(iy0 + 1, math.ceil(sy1))
    region = slide.read_level(grid.level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    resample = Image.Resampling.BOX if ratio >= 1.0 else Image.Resampling.BILINEAR
    img = Image.fromarray(region).resize((w, h), resample, box=(sx0 - ix0, sy0 - iy0, sx1 - ix0, sy1 - iy0))
    return np.asarray(img).copy()


def read_tiles(slide: Slide, grid: TileGrid, tiles: Sequence[Tile] | None = None, *, batch_size: int = 16,
               prefetch: int = 2, readers: int | None = None) -> Iterator[tuple[list[np.ndarray], list[Tile]]]:
    """Yield ``(arrays, tiles)`` batches in the given order, read ahead by a small thread pool.

    ``readers`` threads read and decode tiles ahead of the caller, at most ``prefetch``
    batches beyond the one being assembled (a bounded window of futures, so memory does
    not grow with the slide), and batches come back in order whatever order the reads
    finish in. Reading overlaps whatever the caller does with the current batch, and the
    readers overlap one another, because tiffslide (tifffile + imagecodecs), OpenSlide
    and PIL release the GIL while they decode. An exception in a read is re-raised here,
    in the consumer, at the batch holding that tile (earlier batches are yielded first);
    stopping early (``break``, ``close()``, garbage collection of the generator) cancels
    the reads not yet started and joins the threads.

    Args:
        tiles: subset/order of tiles (default: every tile of the grid, row-major).
        batch_size: tiles per batch (the last batch may be shorter).
        prefetch: batches read ahead (the window's bound).
        readers: reading threads (default: ``min(2, CPUs)``; 1 reads in one background thread).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError("batch_size", f"must be a positive integer, got {batch_size!r}")
    if not isinstance(prefetch, (int, np.integer)) or prefetch < 1:
        raise InputError("prefetch", f"must be a positive integer, got {prefetch!r}")
    if readers is None:
        readers = max(1, min(2, os.cpu_count() or 1))
    if not isinstance(readers, (int, np.integer)) or readers < 1:
        raise InputError("readers", f"must be a positive integer, got {readers!r}")
    order = list(grid.tiles if tiles is None else tiles)
    return _prefetched_batches(slide, grid, order, int(batch_size), int(prefetch), int(readers))


def _prefetched_batches(slide: Slide, grid: TileGrid, order: list[Tile], batch_size: int, prefetch: int,
                        readers: int) -> Iterator[tuple[list[np.ndarray], list[Tile]]]:
    pool = ThreadPoolExecutor(readers, thread_name_prefix="histostudio-read-tiles")
    pending: collections.deque[Future[np.ndarray]] = collections.deque()
    submitted = 0
    try:
        for start in range(0, len(order), batch_size):
            # in flight: the batch being assembled, ``prefetch`` batches ahead of it and one
            # more (the bound of a queue of ``prefetch`` batches fed by one reader thread)
            limit = min(len(order), start + (prefetch + 2) * batch_size)
            while submitted < limit:
                pending.append(pool.submit(read_tile, slide, grid, order[submitted]))
                submitted += 1
            batch = order[start:start + batch_size]
            arrays = [pending.popleft().result() for _ in batch]
            yield arrays, batch
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)



# =========================================================================== writing
_COMPRESSIONS = {"jpeg": "jpeg", "jpg": "jpeg", "deflate": "deflate", "zlib": "deflate", "none": "none",
                 "raw": "none"}
_DEFLATE_LEVEL = 1  # libdeflate level 1 compresses H&E (with the predictor) as well as 6, 1.5x faster


class _TileEncoder:
    """Encodes full ``(ts, ts, 3)`` uint8 tiles exactly as tifffile would, plus the
    matching ``TiffWriter.write`` arguments (the writer is handed pre-encoded bytes so
    every level can be encoded once, while streaming)."""

    def __init__(self, compression: str, quality: int):
        import imagecodecs

        self.kind = compression
        if compression == "jpeg":
            def encode(tile: np.ndarray) -> bytes:
                return imagecodecs.jpeg_encode(tile, level=quality, subsampling=(2, 2), colorspace="RGB",
                                               outcolorspace="YCBCR")

            self.tiff_args: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": quality},
                                              "subsampling": (2, 2)}
        elif compression == "deflate":
            deflate = imagecodecs.deflate_encode if imagecodecs.DEFLATE.available else imagecodecs.zlib_encode

            def encode(tile: np.ndarray) -> bytes:
                return deflate(imagecodecs.delta_encode(tile, axis=-2), level=_DEFLATE_LEVEL)

            self.tiff_args = {"compression": "zlib", "predictor": "horizontal"}
        else:
            def encode(tile: np.ndarray) -> bytes:
                return tile.tobytes()

            self.tiff_args = {"compression": None}
        self._encode = encode

    def __call__(self, tile: np.ndarray) -> bytes:
        return self._encode(np.ascontiguousarray(tile))


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 box average of an even-sized uint8 (h, w, 3) array, rounding half up."""
    s = a[0::2, 0::2].astype(np.uint16)
    s += a[1::2, 0::2]
    s += a[0::2, 1::2]
    s += a[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def pyramid_level_sizes(width: int, height: int, min_level_size: int = 512) -> list[tuple[int, int]]:
    """Level sizes :func:`write_pyramid` writes: halve (rounding up) until the longest side
    is below ``min_level_size``."""
    sizes = [(int(width), int(height))]
    while max(sizes[-1]) >= min_level_size and max(sizes[-1]) > 1:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


class _LevelSpill:
    """One reduced level built while streaming: a strip buffer of ``tile_size`` rows.

    Rows arrive (already 2x-reduced) from the level above; each full strip is padded
    (edge replication), cut into tiles, encoded, appended to a spill file on disk and
    2x-reduced into the next level. A strip's tiles are encoded in the pool while the
    next strip fills; they are appended (in order) when that one is flushed, or at
    :meth:`finish`. Memory: two ``tile_size x width x 3`` strips.
    """

    def __init__(self, width: int, height: int, tile_size: int, encoder: _TileEncoder, pool: ThreadPoolExecutor,
                 spill_path: Path, below: _LevelSpill | None):
        self.width, self.height, self.ts = width, height, tile_size
        self.cols = math.ceil(width / tile_size)
        self.rows = math.ceil(height / tile_size)
        self.buf = np.empty((tile_size, self.cols * tile_size, 3), dtype=np.uint8)
        self.filled = 0       # rows of the current strip received
        self.strip = 0        # index of the current strip
        self.encoder, self.pool, self.below = encoder, pool, below
        self.path = spill_path
        self._fh: BinaryIO | None = open(spill_path, "wb")  # closed by finish()/close()
        self.lengths: list[int] = []
        self._encoding: list[Future[bytes]] = []  # the previous strip's tiles, not yet appended

    def add(self, rows: np.ndarray) -> None:
        """Append reduced rows (``(r, >= width, 3)``; columns past ``width`` ignored)."""
        done = 0
        while done < rows.shape[0]:
            take = min(rows.shape[0] - done, self.ts - self.filled)
            self.buf[self.filled:self.filled + take, :self.width] = rows[done:done + take, :self.width]
            self.filled += take
            done += take
            strip_rows = min(self.ts, self.height - self.strip * self.ts)
            if self.filled >= strip_rows:
                self._flush(strip_rows)

    def _flush(self, valid: int) -> None:
        buf, ts = self.buf, self.ts
        if valid < ts:
            buf[valid:] = buf[valid - 1:valid]
        if self.width < buf.shape[1]:
            buf[:, self.width:] = buf[:, self.width - 1:self.width]
        futures = [self.pool.submit(self.encoder, buf[:, c * ts:(c + 1) * ts]) for c in range(self.cols)]
        if self.below is not None:
            self.below.add(_halve(buf)[: (valid + 1) // 2])
        self._append_encoded()
        self._encoding = futures
        self.buf = np.empty_like(buf)  # the encoders still read the old one
        self.filled = 0
        self.strip += 1

    def _append_encoded(self) -> None:
        assert self._fh is not None
        for f in self._encoding:
            data = f.result()
            self._fh.write(data)
            self.lengths.append(len(data))
        self._encoding = []

    def finish(self) -> None:
        if self.strip != self.rows:
            raise RuntimeError(f"pyramid level {self.width}x{self.height} got {self.strip} of {self.rows} strips")
        self._append_encoded()
        self.close()

    def close(self) -> None:
        for f in self._encoding:
            f.cancel()
        self._encoding = []
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def encoded_tiles(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            for n in self.lengths:
                yield fh.read(n)


def _level0_stream(tiles: Iterator[np.ndarray], width: int, height: int, ts: int, encoder: _TileEncoder,
                   pool: ThreadPoolExecutor, below: _LevelSpill | None) -> Iterator[bytes]:
    """Encoded level-0 tiles, row-major, from the caller's tiles; feeds the reduced levels.

    One row of lag: row ``r``'s tiles are encoded in the pool while row ``r + 1`` is
    pulled from the caller (reading, transforming), and handed on after it, in order.
    """
    cols, rows = math.ceil(width / ts), math.ceil(height / ts)
    total = rows * cols
    previous: list[Future[bytes]] = []
    for r in range(rows):
        h = min(ts, height - r * ts)
        strip = np.empty((ts, cols * ts, 3), dtype=np.uint8)
        for c in range(cols):
            w = min(ts, width - c * ts)
            index = r * cols + c
            try:
                tile = next(tiles)
            except StopIteration:
                raise InputError("tiles", f"the tile iterator ended after {index} of {total} tiles "
                                          f"({cols}x{rows} grid of {ts} px over {width}x{height})") from None
            tile = np.asarray(tile)
            if (tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3 or not h <= tile.shape[0] <= ts
                    or not w <= tile.shape[1] <= ts):
                raise InputError("tiles", f"tile {index} (row {r}, col {c}) is {tile.dtype} {tuple(tile.shape)}; "
                                          f"expected uint8 ({h}, {w}, 3) (edge tiles clipped, or padded to {ts})")
            strip[:h, c * ts:c * ts + w] = tile[:h, :w]
        if h < ts:
            strip[h:] = strip[h - 1:h]
        if width < strip.shape[1]:
            strip[:, width:] = strip[:, width - 1:width]
        futures: list[Future[bytes]] = [pool.submit(encoder, strip[:, c * ts:(c + 1) * ts]) for c in range(cols)]
        if below is not None:
            below.add(_halve(strip)[: (h + 1) // 2])
        for f in previous:
            yield f.result()
        previous = futures
    for f in previous:
        yield f.result()


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def write_pyramid(path: str | Path, tiles: Iterable[np.ndarray], width: int, height: int, *, tile_size: int = 256,
                  mpp: float | None = None, compression: str = "jpeg", quality: int = 90, min_level_size: int = 512,
                  description: str | None = None) -> Path:
    """Stream tiles into a tiled, pyramidal TIFF that tiffslide, OpenSlide and QuPath open.

    Args:
        path: output file (.tif); written atomically (temporary file, then rename).
        tiles: uint8 ``(h, w, 3)`` tiles in **row-major** order of a ``tile_size`` grid over
            ``(width, height)``; edge tiles may be clipped (or full size: the excess is
            ignored). Consumed once, lazily.
        width, height: level-0 size in pixels.
        tile_size: TIFF tile side in pixels (multiple of 16).
        mpp: microns per level-0 pixel, stored as resolution tags (None: not stored).
        compression: ``"jpeg"`` (lossy, ``quality`` 1-100, YCbCr 4:2:0), ``"deflate"``
            / ``"zlib"`` (lossless, horizontal predictor) or ``"none"``.
        min_level_size: reduced levels (each half the previous, rounded up, 2x2 box
            average) are added until the longest side is below this.
        description: appended to the ImageDescription (which says what wrote the file).

    Memory does not grow with the slide: level 0 goes from the iterator to the encoder a
    tile row at a time, and each reduced level is a ``tile_size``-row strip buffer whose
    encoded tiles spill to a temporary file beside the output (about a third of the
    output's size) and are copied into the TIFF after level 0. Peak is about
    ``2 x width x tile_size x 3`` bytes plus encoder buffers.

    Layout: every level in the main IFD chain, reduced levels flagged
    ``NewSubfileType=1`` -- what OpenSlide's generic-TIFF driver and tifffile's pyramid
    detection both require (see the module docstring).

    Raises:
        InputError: bad arguments, or tiles of the wrong count/shape/dtype.
        OutputError: the file cannot be written (nothing is left behind).
    """
    import tifffile

    path = Path(path)
    if not isinstance(width, (int, np.integer)) or not isinstance(height, (int, np.integer)) or width < 1 \
            or height < 1:
        raise InputError("width/height", f"must be positive integers, got {width!r} x {height!r}")
    width, height = int(width), int(height)
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 16 or tile_size % 16:
        raise InputError("tile_size", f"must be a positive multiple of 16 (TIFF tiles), got {tile_size!r}")
    tile_size = int(tile_size)
    kind = _COMPRESSIONS.get(str(compression).lower()) if compression is not None else "none"
    if kind is None:
        raise InputError("compression", f"unknown compression {compression!r}; use jpeg, deflate (zlib) or none")
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise InputError("quality", f"JPEG quality must be an integer 1-100, got {quality!r}")
    if mpp is not None and not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
        raise InputError("mpp", f"must be a positive number of microns per pixel or None, got {mpp!r}")
    if not isinstance(min_level_size, (int, np.integer)) or min_level_size < 1:
        raise InputError("min_level_size", f"must be a positive integer, got {min_level_size!r}")

    sizes = pyramid_level_sizes(width, height, int(min_level_size))
    encoder = _TileEncoder(kind, int(quality))
    text = (f"histostudio.slides.write_pyramid: {width}x{height} px, {len(sizes)} levels, tile {tile_size}, "
            f"{kind}{f' q{quality}' if kind == 'jpeg' else ''}")
    if mpp is not None:
        text += f", mpp {mpp:.6g}"
    if description:
        text += f"; {description}"
    # Classic TIFF offsets are 32-bit; go BigTIFF well before the data could reach 4 GB.
    bigtiff = width * height * 3 * 4 // 3 > 2**31
    workers = max(1, min(4, os.cpu_count() or 1))
    tile_iter = iter(tiles)

    with atomic_path(path) as tmp:
        spill_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".levels", dir=path.parent))
        spills: list[_LevelSpill] = []
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="histostudio-encode") as pool:
                below: _LevelSpill | None = None
                for k in range(len(sizes) - 1, 0, -1):
                    w, h = sizes[k]
                    below = _LevelSpill(w, h, tile_size, encoder, pool, spill_dir / f"level{k}.bin", below)
                    spills.insert(0, below)
                with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
                    for k, (w, h) in enumerate(sizes):
                        if k == 0:
                            data: Iterator[bytes] = _level0_stream(tile_iter, width, height, tile_size, encoder, pool,
                                                                   spills[0] if spills else None)
                        else:
                            spills[k - 1].finish()
                            data = spills[k - 1].encoded_tiles()
                        args: dict[str, Any] = {}
                        if mpp is not None:
                            args["resolution"] = (1e4 / (mpp * width / w), 1e4 / (mpp * height / h))
                            args["resolutionunit"] = "CENTIMETER"
                        tw.write(data, shape=(h, w, 3), dtype=np.uint8, tile=(tile_size, tile_size),
                                 photometric="rgb", planarconfig="contig", subfiletype=0 if k == 0 else 1,
                                 description=_ascii(text) if k == 0 else None, metadata=None,
                                 software="histostudio", **encoder.tiff_args, **args)
                        if k == 0:
                            _check_exhausted(tile_iter, len(_grid_positions(width, height, tile_size)))
        finally:
            for spill in spills:
                spill.close()
            shutil.rmtree(spill_dir, ignore_errors=True)
    return path


def _grid_positions(width: int, height: int, ts: int) -> list[tuple[int, int]]:
    return [(x, y) for y in range(0, height, ts) for x in range(0, width, ts)]


def _check_exhausted(tiles: Iterator[np.ndarray], expected: int) -> None:
    sentinel = object()
    if next(tiles, sentinel) is not sentinel:
        raise InputError("tiles", f"the tile iterator yields more than the {expected} tiles of the grid "
                                  "(wrong width/height/tile_size, or tiles not clipped at the edges?)")


# =========================================================================== mosaic test slides
_MOSAIC_SOURCES = ("hgsc_nest", "tiatoolbox_target", "skin")
_MOSAIC_CELL = 768            # texture cells: one random crop of a real sample each
_GLASS = np.array([245, 245, 243], dtype=np.float32)


def _interp_weights(coords: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Linear-interpolation matrix from a grid of ``n`` samples to ``coords`` (grid units),
    restricted to the grid rows it touches: returns (first grid index, (len(coords), k))."""
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.int64)
    first = int(i0.min())
    last = min(int(i0.max()) + 1, n - 1)
    k = last - first + 1
    weights = np.zeros((len(c), k), dtype=np.float32)
    frac = (c - i0).astype(np.float32)
    rows = np.arange(len(c))
    weights[rows, i0 - first] += 1.0 - frac
    weights[rows, np.minimum(i0 + 1, last) - first] += frac
    return first, weights


class _Mosaic:
    """Procedural slide of real tissue: smooth random blobs (a Gaussian-filtered noise
    field, thresholded at the quantile that gives ``tissue_fraction``) filled with random
    crops, flips and 90-degree rotations of the shipped H&E samples, on white glass.

    Any region renders independently of the others (and of the tile size), so a slide of
    any size streams tile by tile; memory is the small field plus the samples.
    """

    def __init__(self, width: int, height: int, seed: int = 0, tissue_fraction: float = 0.6):
        from scipy import ndimage

        from studio.data.samples import load_sample

        if not 0.0 <= tissue_fraction <= 1.0:
            raise InputError("tissue_fraction", f"must be in [0, 1], got {tissue_fraction!r}")
        self.width, self.height, self.seed = width, height, seed
        self.sources = [load_sample(name) for name in _MOSAIC_SOURCES]
        self.step = max(32, math.ceil(max(width, height) / 1024))  # level-0 px per field sample
        gh, gw = math.ceil(height / self.step) + 2, math.ceil(width / self.step) + 2
        rng = np.random.default_rng([seed, 0x7155])
        blob_px = min(1200.0, max(width, height) / 5.0)
        noise = rng.standard_normal((gh, gw)).astype(np.float32)
        self.field = ndimage.gaussian_filter(noise, sigma=max(1.0, blob_px / 2.5 / self.step), mode="reflect")
        inner = self.field[: gh - 2, : gw - 2]
        if tissue_fraction >= 1.0:
            self.threshold = -np.inf
        elif tissue_fraction <= 0.0:
            self.threshold = np.inf
        else:
            self.threshold = float(np.quantile(inner, 1.0 - tissue_fraction))
        self.soft = float(inner.std()) * 0.04 + 1e-12  # blob edge anti-aliasing, a few pixels wide

    def _cell(self, row: int, col: int) -> np.ndarray:
        """The texture crop of one cell: a view into a rotated/flipped sample."""
        rng = np.random.default_rng([self.seed, row, col, 0xCE11])
        src = self.sources[int(rng.integers(len(self.sources)))]
        view = np.rot90(src, int(rng.integers(4)))
        if rng.integers(2):
            view = view[:, ::-1]
        oy = int(rng.integers(view.shape[0] - _MOSAIC_CELL + 1))
        ox = int(rng.integers(view.shape[1] - _MOSAIC_CELL + 1))
        return view[oy:oy + _MOSAIC_CELL, ox:ox + _MOSAIC_CELL]

    def _texture(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), dtype=np.uint8)
        cell = _MOSAIC_CELL
        for r in range(y // cell, (y + h - 1) // cell + 1):
            for c in range(x // cell, (x + w - 1) // cell + 1):
                y0, y1 = max(y, r * cell), min(y + h, (r + 1) * cell)
                x0, x1 = max(x, c * cell), min(x + w, (c + 1) * cell)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = self._cell(r, c)[y0 - r * cell:y1 - r * cell,
                                                                     x0 - c * cell:x1 - c * cell]
        return out

    def alpha(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Tissue weight in [0, 1] for each pixel of the region (float32 ``(h, w)``)."""
        fy = (np.arange(y, y + h) + 0.5) / self.step - 0.5
        fx = (np.arange(x, x + w) + 0.5) / self.step - 0.5
        ry, wy = _interp_weights(fy, self.field.shape[0])
        rx, wx = _interp_weights(fx, self.field.shape[1])
        sub = self.field[ry:ry + wy.shape[1], rx:rx + wx.shape[1]]
        values = wy @ sub @ wx.T
        return np.clip((values - self.threshold) / self.soft + 0.5, 0.0, 1.0)

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 ``(h, w, 3)`` pixels of the region at level-0 ``(x, y)``."""
        a = self.alpha(x, y, w, h)
        if not a.any():
            return np.broadcast_to(_GLASS.astype(np.uint8), (h, w, 3)).copy()
        tex = self._texture(x, y, w, h)
        if a.min() >= 1.0:
            return tex
        out = _GLASS + a[..., None] * (tex.astype(np.float32) - _GLASS)
        return (out + 0.5).astype(np.uint8)

    def tiles(self, tile_size: int) -> Iterator[np.ndarray]:
        """Row-major clipped tiles, as :func:`write_pyramid` wants them."""
        for y in range(0, self.height, tile_size):
            for x in range(0, self.width, tile_size):
                yield self.render(x, y, min(tile_size, self.width - x), min(tile_size, self.height - y))


def mosaic_tiles(width: int, height: int, *, seed: int = 0, tile_size: int = 256,
                 tissue_fraction: float = 0.6) -> Iterator[np.ndarray]:
    """The tiles :func:`write_mosaic_slide` writes (row-major, clipped), without writing."""
    return _Mosaic(width, height, seed, tissue_fraction).tiles(tile_size)


def write_mosaic_slide(path: str | Path, width: int, height: int, *, seed: int = 0, tile_size: int = 256,
                       mpp: float = 0.5, tissue_fraction: float = 0.6, compression: str = "jpeg") -> Path:
    """Write a test slide of any size made of real tissue, deterministic per ``seed``.

    Tissue blobs (about ``tissue_fraction`` of the area; the samples themselves hold
    some glass, so the measured tissue fraction is a little lower) are filled with random
    768-px crops, flips and rotations of the shipped H&E images (hgsc_nest,
    tiatoolbox_target, skin) on near-white glass (245, 245, 243), streamed through
    :func:`write_pyramid`, so writing a 20000 x 20000 slide needs no more memory than a
    small one. Pixels do not depend on ``tile_size``.
    """
    if not isinstance(width, (int, np.integer)) or not isinstance(height, (int, np.integer)) or width < 1 \
            or height < 1:
        raise InputError("width/height", f"must be positive integers, got {width!r} x {height!r}")
    mosaic = _Mosaic(int(width), int(height), seed, tissue_fraction)
    return write_pyramid(path, mosaic.tiles(tile_size), int(width), int(height), tile_size=tile_size, mpp=mpp,
                         compression=compression,
                         description=f"mosaic test slide of real H&E crops, seed {seed}, "
                                     f"tissue fraction {tissue_fraction:g}")

"""Reading and writing images and arrays at the studio's IO boundary.

Inside the studio, tiles are float32 RGB tensors ``(B, 3, H, W)`` in [0, 1]; on disk
they are uint8 ``(H, W, 3)`` images. This module is the only place that converts between
the two and the only place that touches image files, so every corrupt, truncated,
oddly-shaped or missing input fails here with one :class:`~studio.errors.InputError`
that names the file and the problem, and every output is written atomically (temporary
file in the target folder, then ``os.replace``): an interrupted or failed write never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from studio.errors import InputError, OutputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
# A plain PNG/JPEG above Pillow's decompression-bomb limit (89 MPix) is read as a one-level
# slide (studio.slides), tiled, up to this many pixels (3 GiB of RGB in memory).
LARGE_IMAGE_MAX_PIXELS = 1 << 30


# --------------------------------------------------------------------------- tifffile's log
class _QuietWhileReading(logging.Filter):
    """Drops tifffile's log records while any of our reads runs (see :func:`quiet_tifffile`)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.depth == 0


_TIFF_QUIET = _QuietWhileReading()


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's logger around a read (also usable as a decorator).

    tifffile logs what it tolerates or fails on (``<tifffile.TiffFile ...> shaped series
    raised TiffFileError(...)``, ``invalid page offset``) through Python logging, whose
    last-resort handler prints it to stderr above the one-line error the studio raises for
    the same file. Our reads turn every such problem into that one :class:`InputError`, so
    the log lines are noise. Outside our reads tifffile's logging is left as it is.
    """
    logger = logging.getLogger("tifffile")
    with _TIFF_QUIET.lock:
        if _TIFF_QUIET.depth == 0 and _TIFF_QUIET not in logger.filters:
            logger.addFilter(_TIFF_QUIET)
        _TIFF_QUIET.depth += 1
    try:
        yield
    finally:
        with _TIFF_QUIET.lock:
            _TIFF_QUIET.depth -= 1
            if _TIFF_QUIET.depth == 0:
                logger.removeFilter(_TIFF_QUIET)


# --------------------------------------------------------------------------- atomic writes
def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _process_umask()


def default_mode(*, folder: bool = False) -> int:
    """The permission bits a plain ``open()`` / ``mkdir()`` would give under this process'
    umask: temporary files and folders (mkstemp 0600, mkdtemp 0700) get them before they are
    renamed onto their target, so atomic writes do not make outputs private."""
    return (0o777 if folder else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file lives in the same folder so the final ``os.replace`` is atomic on
    POSIX and Windows. On any exception (including ``ENOSPC`` mid-write) the temporary
    file is removed, an existing ``target`` is left untouched, and an
    :class:`~studio.errors.OutputError` naming the target is raised for OS errors.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(target, f"cannot write here ({exc.strerror or exc})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give the result the mode a plain open() would.
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(target, f"write failed ({reason}); nothing was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically and return the path."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def save_npy(target: str | Path, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` atomically (never pickled)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)
    return Path(target)


# --------------------------------------------------------------------------- arrays
def _require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, expected a file")


def load_npy(path: str | Path, *, mmap: bool = True) -> np.ndarray:
    """Load a ``.npy`` array, memory-mapped when possible, never unpickling.

    The header is read first so that each failure gets its own message: not an ``.npy``
    file at all, a pickled (object) array, or data shorter than the header promises.

    Raises:
        InputError: missing file, not .npy, object array, truncated or corrupt data.
    """
    path = Path(path)
    _require_file(path)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            # Format 3.0 (utf-8 field names, rare) is left to numpy's own reader below.
            header = readers[version](fh) if version in readers else None
            data_start = fh.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"is not a valid .npy file ({exc})") from exc
    if header is not None:
        shape, _, dtype = header
        if dtype.hasobject:
            raise InputError(path, "holds pickled Python objects; only plain numeric or string arrays are read")
        expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = path.stat().st_size
        if size < expected:
            raise InputError(path, f"is truncated: {size} bytes on disk, {expected} needed for {shape} {dtype}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"corrupt .npy file ({exc})") from exc


def load_npz_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """Load one array from an ``.npz`` archive (the only one, or ``key``)."""
    path = Path(path)
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if key is None:
                if len(keys) != 1:
                    raise InputError(path, f"holds {len(keys)} arrays {keys}; name the one to read")
                key = keys[0]
            if key not in keys:
                raise InputError(path, f"has no array {key!r} (it has {keys})")
            return archive[key]
    except InputError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError
        raise InputError(path, f"corrupt or truncated .npz file ({exc})") from exc


# --------------------------------------------------------------------------- images
def _to_uint8_rgb(array: np.ndarray, path: Path, *, allow_gray: bool) -> np.ndarray:
    """Bring any decoded image array to uint8 (H, W, 3), or explain why not."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C, H, W)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 2)):
        if not allow_gray:
            raise InputError(
                path, "is a grayscale image; an RGB (H&E or IHC) image is needed for stain work"
            )
        gray = arr if arr.ndim == 2 else arr[..., 0]
        arr = np.repeat(gray[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(path, f"has shape {tuple(array.shape)}; expected an RGB image (H, W, 3)")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise InputError(path, "contains NaN or infinite pixel values")
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(path, f"has pixel type {arr.dtype}; expected 8- or 16-bit RGB")
    if arr.shape[-1] == 4:
        # Composite transparent pixels over white (glass), as a scanner would see them.
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32)
        arr = (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def plain_image_pixels(path: str | Path) -> int | None:
    """Width x height from a PNG/JPEG/BMP/WebP header (nothing decoded), or None when the
    header cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as img:
                    return int(img.size[0]) * int(img.size[1])
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except Exception:
        return None


def _fast_png_rgb(path: Path, max_pixels: int | None) -> np.ndarray | None:
    """The pixels of an 8-bit RGB PNG (the common tile), decoded by libpng through imagecodecs:
    ~1.6x faster than Pillow on 512 px tiles (5.8 vs 9.3 ms). Anything else (grey, palette,
    alpha, 16-bit, oversized, corrupt) returns None, and Pillow's path reads it or explains
    why it cannot."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The IHDR chunk opens every PNG: width, height (big-endian), bit depth 8, colour type 2 (RGB).
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or data[24] != 8 \
            or data[25] != 2:
        return None
    from PIL import Image

    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > (max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 2**62)):
        return None
    try:
        import imagecodecs

        array = imagecodecs.png_decode(data)
    except Exception:  # any decoder complaint: Pillow's path below gives the one-line error
        return None
    if array.dtype != np.uint8 or array.shape != (height, width, 3):
        return None
    return array


def read_image(path: str | Path, *, allow_gray: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)``.

    Accepts PNG, JPEG, BMP, WebP and (multi-page, 8/16-bit) TIFF. RGBA is composited over
    white; 16-bit is scaled to 8-bit; grayscale is refused unless ``allow_gray`` (stain
    methods need colour). ``max_pixels`` raises Pillow's decompression-bomb limit for this
    read (the slide jobs read large plain images whole, as one-level slides).

    Raises:
        InputError: missing file, unknown format, truncated or corrupt data, wrong channels.
    """
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            with quiet_tifffile():
                array = tifffile.imread(path, key=0)
        except Exception as exc:
            raise InputError(path, f"corrupt or truncated TIFF ({exc})") from exc
    elif suffix == ".png" and (fast := _fast_png_rgb(path, max_pixels)) is not None:
        return fast
    else:
        from PIL import Image, UnidentifiedImageError

        previous = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if max_pixels is not None:
                    Image.MAX_IMAGE_PIXELS = max_pixels
                with Image.open(path) as img:
                    img.load()
                    # np.array (not asarray): PIL's buffer is read-only.
                    if img.mode in ("I;16", "I;16B", "I"):
                        array = np.array(img).astype(np.uint16)
                    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                        array = np.array(img.convert("RGBA"))
                    elif img.mode in ("L", "1"):
                        array = np.array(img.convert("L"))
                    else:
                        array = np.array(img.convert("RGB"))
        except UnidentifiedImageError as exc:
            raise InputError(path, "is not a readable image (unknown or corrupt format)") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            pixels = plain_image_pixels(path) or 0
            if max_pixels is not None:
                raise InputError(path, f"has {pixels / 1e6:.0f} MPix, more than a plain image can be read whole "
                                       f"({max_pixels / 1e6:.0f} MPix); convert it to a pyramidal TIFF (e.g. vips "
                                       f"tiffsave {path.name} {path.stem}.tif --tile --pyramid --compression jpeg)"
                                 ) from exc
            raise InputError(path, f"has {pixels / 1e6:.0f} MPix, above the plain-image limit "
                                   f"({Image.MAX_IMAGE_PIXELS / 1e6:.0f} MPix); the slide jobs (normalize, translate, "
                                   f"segment) read it as a tiled slide, or open it with "
                                   f"studio.slides.open_slide") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(path, f"corrupt or truncated image ({exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    return _to_uint8_rgb(array, path, allow_gray=allow_gray)


def write_image(path: str | Path, image: np.ndarray, *, quality: int = 95) -> Path:
    """Write uint8 ``(H, W, 3)`` (or ``(H, W)``) to ``path`` atomically; format from the suffix."""
    path = Path(path)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError("image", f"dtype {arr.dtype}; write_image expects uint8 (use to_uint8 first)")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(path, f"unknown image format {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, arr, photometric="rgb" if arr.ndim == 3 else "minisblack",
                             compression="zlib")
        elif suffix == ".png" and arr.ndim == 3 and arr.shape[-1] == 3:
            import imagecodecs

            # libpng at zlib level 1 with OpenCV's default PNG settings (the SUB row filter and the
            # RLE strategy, as cv2.imwrite writes): lossless, 2.35 vs 4.42 ms per 256 px H&E tile
            # against adaptive filtering, for ~10 % more bytes than Pillow's level 1 (141.7 vs
            # 128.8 KB, `bench/stain.py --sections 5`). Tile-folder jobs are bound by this encoder.
            Path(tmp).write_bytes(imagecodecs.png_encode(
                np.ascontiguousarray(arr), level=imagecodecs.PNG.COMPRESSION.SPEED,
                strategy=imagecodecs.PNG.STRATEGY.RLE, filter=imagecodecs.PNG.FILTER.SUB))
        else:
            from PIL import Image

            fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[suffix]
            kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {"compress_level": 1}
            Image.fromarray(arr).save(tmp, format=fmt, **kwargs)
    return path


# --------------------------------------------------------------------------- tensors
def to_tensor(images: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)`` in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError("images", f"shape {arr.shape}; expected (H, W, 3) or (B, H, W, 3)")
    if not arr.flags.writeable:  # shared read-only samples; torch warns on those
        arr = arr.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(device=device)
    # Contiguous NCHW: a permuted view would make .float() channels-last, which some CPU
    # kernels mishandle (torch 2.13: a strided 1x1 conv backward crashes on it).
    return tensor.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def to_uint8(tiles: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [0, 1] -> uint8 ``(B, H, W, 3)`` (rounded, clipped)."""
    if tiles.ndim != 4 or tiles.shape[1] != 3:
        raise InputError("tiles", f"shape {tuple(tiles.shape)}; expected (B, 3, H, W)")
    out = tiles.detach().float().clamp(0, 1).mul(255.0).add_(0.5).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()

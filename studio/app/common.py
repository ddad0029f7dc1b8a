"""What every page shares: upload validation, the "sample or upload" picker, tile crops,
PNG/ZIP bytes for downloads.

Every uploaded file goes through :func:`decode_upload` and nowhere else: size limit,
format check on the bytes themselves (PNG, JPEG, TIFF), a pixel-size check read from the
header before anything is decoded, then :func:`studio.io.read_image`, which explains
corrupt, truncated and grayscale files. Failures are :class:`~studio.errors.InputError`
naming the uploaded file; the widgets show them with ``st.error`` (no traceback) and the
page carries on without that file.

The functions above the ``# --- widgets`` line use no Streamlit call and are tested directly.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

from studio.errors import InputError

MAX_UPLOAD_MB = 20
MAX_SIDE = 8192
UPLOAD_TYPES = ("png", "jpg", "jpeg", "tif", "tiff")
LIMITS_TEXT = f"PNG, JPEG or TIFF; RGB; at most {MAX_UPLOAD_MB} MB and {MAX_SIDE} px a side."

# Leading bytes of each accepted format -> the suffix read_image should decode it as.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),  # BigTIFF
    (b"MM\x00+", ".tif"),
)


@dataclass(frozen=True)
class Picked:
    """An image the user chose: a shipped sample (or a crop of one) or a decoded upload."""

    name: str
    image: np.ndarray = field(repr=False)

    @property
    def digest(self) -> str:
        """Content key for caches (pixels and shape, not the name)."""
        return image_digest(self.image)


def image_digest(image: np.ndarray) -> str:
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(arr.tobytes(), digest_size=12)
    h.update(repr(arr.shape).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- validation
def sniff_format(data: bytes) -> str | None:
    """The decoding suffix of PNG/JPEG/TIFF bytes, from their signature; None otherwise."""
    for signature, suffix in _SIGNATURES:
        if data.startswith(signature):
            return suffix
    return None


def _header_size(data: bytes, suffix: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header cannot be read
    (then read_image reports the corruption in its own words)."""
    try:
        if suffix == ".tif":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as exc:
        if type(exc).__name__ == "DecompressionBombError":
            raise InputError("image", f"is too large ({exc})") from exc
        return None


def decode_upload(name: str, data: bytes, *, max_mb: float = MAX_UPLOAD_MB, max_side: int = MAX_SIDE
                  ) -> np.ndarray:
    """Validate and decode an uploaded image file to uint8 RGB ``(H, W, 3)``.

    Raises:
        InputError: naming ``name``: empty, too large (bytes or pixels), not PNG/JPEG/TIFF,
            corrupt or truncated, grayscale, or an unusable shape.
    """
    name = Path(name).name or "upload"
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        shown = f".{suffix}" if suffix else "no extension"
        raise InputError(name, f"has {shown}; upload a PNG, JPEG or TIFF image (.png, .jpg, .jpeg, .tif, .tiff)")
    if not data:
        raise InputError(name, "is empty (0 bytes)")
    size_mb = len(data) / 2**20
    if size_mb > max_mb:
        raise InputError(name, f"is {size_mb:.1f} MB; the limit is {max_mb:g} MB. Crop or downsample it first "
                               "(whole slides: use `histostudio normalize` on the command line)")
    kind = sniff_format(data)
    if kind is None:
        raise InputError(name, "is not a PNG, JPEG or TIFF image (its contents match none of them)")
    try:
        dims = _header_size(data, kind)
    except InputError as exc:
        raise InputError(name, exc.problem) from None
    if dims is not None and max(dims) > max_side:
        raise InputError(name, f"is {dims[0]}x{dims[1]} px; the limit is {max_side} px a side. Crop it first "
                               "(whole slides: use `histostudio normalize` on the command line)")
    with tempfile.TemporaryDirectory(prefix="histostudio-upload-") as tmp:
        path = Path(tmp) / f"upload{kind}"
        path.write_bytes(data)
        from studio.io import read_image

        try:
            image = read_image(path)
        except InputError as exc:
            raise InputError(name, exc.problem) from None
    if max(image.shape[:2]) > max_side:  # headers can lie
        raise InputError(name, f"is {image.shape[1]}x{image.shape[0]} px; the limit is {max_side} px a side")
    if min(image.shape[:2]) < 16:
        raise InputError(name, f"is {image.shape[1]}x{image.shape[0]} px; at least 16 px a side is needed")
    image.setflags(write=False)
    return image


# --------------------------------------------------------------------------- images
def limit_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (area average) so that neither side exceeds ``max_side``; else unchanged."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BOX))


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` x ``side`` region (the whole side where the image is smaller)."""
    h, w = image.shape[:2]
    ch, cw = min(h, side), min(w, side)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[y:y + ch, x:x + cw])


def tissue_crops(image: np.ndarray, size: int, count: int) -> list[tuple[int, int]]:
    """Top-left corners of the ``count`` non-overlapping ``size`` crops with most tissue
    (``studio.color.tissue_mask``), best first; deterministic."""
    import torch

    from studio.color import tissue_mask
    from studio.io import to_tensor

    h, w = image.shape[:2]
    if h < size or w < size:
        return [(0, 0)]
    step = 4  # the mask on a 4x subsample is plenty to rank crops
    with torch.no_grad():
        mask = tissue_mask(to_tensor(np.ascontiguousarray(image[::step, ::step])))[0, 0].numpy()
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s = size // step
    scored = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            ys, xs = y // step, x // step
            total = integral[ys + s, xs + s] - integral[ys, xs + s] - integral[ys + s, xs] + integral[ys, xs]
            scored.append((-total, y, x))
    scored.sort()
    return [(y, x) for _, y, x in scored[:count]]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def sample_label(name: str) -> str:
    from studio.data.samples import SAMPLES

    description = SAMPLES[name].description
    return f"{name} — {description[:60]}{'…' if len(description) > 60 else ''}"


# --------------------------------------------------------------------------- widgets
def show_error(exc: Exception) -> None:
    """A user-facing error: one line, no traceback."""
    st.error(str(exc), icon=":material/error:")


@st.cache_resource(max_entries=6, show_spinner="Reading the upload…")
def _decode_cached(name: str, digest: str, _data: bytes) -> np.ndarray:
    return decode_upload(name, _data)


@st.cache_data(max_entries=32, show_spinner=False)
def _crop_corners(sample: str, size: int, count: int) -> list[tuple[int, int]]:
    return tissue_crops(sample_image(sample), size, count)


def sample_image(name: str) -> np.ndarray:
    """A shipped sample, uint8 RGB, read-only (cached by :func:`studio.data.samples.load_sample`)."""
    from studio.data.samples import load_sample

    return load_sample(name)


def read_uploaded(uploaded) -> Picked | None:
    """Decode one ``st.file_uploader`` file; shows the problem and returns None when it fails."""
    data = uploaded.getvalue()
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    try:
        image = _decode_cached(uploaded.name, digest, data)
    except InputError as exc:
        show_error(exc)
        return None
    return Picked(Path(uploaded.name).name, image)


def sample_crops(sample: str, size: int, count: int) -> list[Picked]:
    """The ``count`` most tissue-rich ``size`` crops of a sample, named ``sample@x,y``."""
    image = sample_image(sample)
    out = []
    for y, x in _crop_corners(sample, size, count):
        crop = np.ascontiguousarray(image[y:y + size, x:x + size])
        crop.setflags(write=False)
        out.append(Picked(f"{sample}@{x},{y}", crop))
    return out


def pick_image(label: str, key: str, *, samples: Sequence[str], default_sample: str,
               help: str | None = None) -> Picked | None:
    """"Pick a real sample or upload a file": one image, or None (nothing usable chosen yet)."""
    mode = st.radio(f"{label} from", ("Sample", "Upload"), horizontal=True, key=f"{key}_mode", help=help)
    if mode == "Sample":
        names = list(samples)
        index = names.index(default_sample) if default_sample in names else 0
        name = st.selectbox(f"{label} sample", names, index=index, key=f"{key}_sample", format_func=sample_label)
        return Picked(name, sample_image(name))
    uploaded = st.file_uploader(f"{label} image", type=list(UPLOAD_TYPES), key=f"{key}_file",
                                max_upload_size=MAX_UPLOAD_MB, help=LIMITS_TEXT)
    st.caption(LIMITS_TEXT)
    if uploaded is None:
        return None
    return read_uploaded(uploaded)


def pick_tiles(label: str, key: str, *, samples: Sequence[str], default_sample: str, max_files: int = 6,
               crop_sizes: Sequence[int] = (256, 512), max_crops: int = 4) -> list[Picked]:
    """Several tiles: tissue-rich crops of a sample, or uploaded files (each validated)."""
    mode = st.radio(f"{label} from", ("Sample crops", "Upload"), horizontal=True, key=f"{key}_mode")
    if mode == "Sample crops":
        names = list(samples)
        index = names.index(default_sample) if default_sample in names else 0
        name = st.selectbox(f"{label} sample", names, index=index, key=f"{key}_sample", format_func=sample_label)
        left, right = st.columns(2)
        size = left.selectbox("Crop size (px)", list(crop_sizes), key=f"{key}_size")
        count = right.number_input("Crops", min_value=1, max_value=max_crops, value=2, key=f"{key}_count",
                                   help="The most tissue-rich non-overlapping crops of the sample.")
        return sample_crops(name, int(size), int(count))
    files = st.file_uploader(f"{label} images", type=list(UPLOAD_TYPES), key=f"{key}_files",
                             accept_multiple_files=True, max_upload_size=MAX_UPLOAD_MB, help=LIMITS_TEXT)
    st.caption(f"Up to {max_files} files. {LIMITS_TEXT}")
    files = list(files or [])
    if len(files) > max_files:
        st.warning(f"{len(files)} files uploaded; the first {max_files} are used.")
        files = files[:max_files]
    picked = [read_uploaded(f) for f in files]
    return [p for p in picked if p is not None]

"""PanNuke folds: read (memory-mapped) and write (all-or-nothing).

Layout of one fold folder (the flat form this module writes)::

    images.npy    (N, H, W, 3)  uint8 here; the official release stores float64 0..255
    masks.npy     (N, H, W, 6)  float64 (as the release): one instance-id map per class
    types.npy     (N,)          tissue name per tile, unicode strings (never pickled)
    manifest.csv  optional studio sidecar: name, source, tissue, provenance columns

The official download nests the same files as ``images/fold1/{images,types}.npy`` and
``masks/fold1/masks.npy``; :class:`PanNukeDataset` reads both forms.

Mask channels: 0 neoplastic, 1 inflammatory, 2 connective/soft tissue, 3 dead,
4 epithelial (each an instance-id map, 0 = none), so PanNuke class code ``c`` (1..5) is
channel ``c - 1``. Channel 5 is *background*: in the official release it is 1 where no
nucleus is and 0 on nuclei (converters that stack a zero "background" channel first and
take ``argmax`` over channels rely on that). The writer fills it that way; the reader
ignores it and derives everything from channels 0-4, because re-packaged copies disagree on
channel 5 (all zeros, or an instance map) while channels 0-4 are always the labels.

Dtype decisions:

* images are written **uint8**: lossless for 8-bit tiles, 8x smaller than float64, and
  every PanNuke loader casts or divides anyway. Readers accept uint8/float32/float64.
* masks are written **float64** by default, as in the release, because third-party
  loaders were written against the release files; float64 holds integer ids exactly (up
  to 2**53). ``mask_dtype=np.int32`` halves the size where compatibility does not matter.

Conversion between masks and ``(inst, cls)`` keeps instance ids as they are (no
relabelling), so ``labels -> masks -> labels`` is lossless for valid labels. Real-release
quirks are resolved, not refused: an id reused by two channels gets a fresh id in the
later channel, and a pixel set in two channels goes to the later channel (as the common
converters do); ``meta["label_fixes"]`` counts such repairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from studio.data.base import (
    MemmapArrays,
    NucleiDataset,
    NucleiSample,
    as_samples,
    atomic_folder,
    common_size,
    image_to_uint8,
    manifest_by_row,
    sample_names,
    slug,
    validate_image,
    validate_labels,
    write_manifest,
)
from studio.data.samples import PANNUKE_CLASSES
from studio.errors import InputError
from studio.io import save_npy

PANNUKE_CHANNELS: tuple[str, ...] = (
    "neoplastic", "inflammatory", "connective", "dead", "epithelial", "background",
)  # fmt: skip
NUM_CLASSES = 5
BACKGROUND_CHANNEL = 5
IMAGE_DTYPES = (np.uint8, np.float32, np.float64)
PANNUKE_FILES = ("images.npy", "masks.npy", "types.npy")
# The 19 tissue names used in the release's types.npy; for reference only (writers accept
# any name, since a new source may come from a tissue PanNuke lacks).
PANNUKE_TISSUES: tuple[str, ...] = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck", "Kidney",
    "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis", "Thyroid", "Uterus",
)  # fmt: skip


# --------------------------------------------------------------------------- masks <-> labels
def _max_exact(dtype: np.dtype) -> int:
    """Largest integer id ``dtype`` stores exactly."""
    if np.issubdtype(dtype, np.floating):
        return 2 ** (np.finfo(dtype).nmant + 1)
    return int(np.iinfo(dtype).max)


def _masks_to_labels(masks: np.ndarray, source: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(H, W, 6) masks -> (inst int32, cls uint8, number of repairs)."""
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[-1] != 6:
        raise InputError(source, f"mask has shape {m.shape}; expected (H, W, 6)")
    nuclei = m[..., :BACKGROUND_CHANNEL]
    if np.issubdtype(nuclei.dtype, np.floating):
        if not np.isfinite(nuclei).all():
            raise InputError(source, "mask contains NaN or infinite values")
        if (nuclei != np.floor(nuclei)).any():
            raise InputError(source, "mask holds non-integer instance ids")
    elif not np.issubdtype(nuclei.dtype, np.integer):
        raise InputError(source, f"mask dtype {nuclei.dtype}; expected integer or float instance ids")
    if nuclei.size and nuclei.min() < 0:
        raise InputError(source, f"mask has negative instance id {nuclei.min():g}")
    if nuclei.size and nuclei.max() > np.iinfo(np.int32).max:
        raise InputError(source, f"instance id {nuclei.max():g} does not fit int32")

    inst = np.zeros(m.shape[:2], dtype=np.int32)
    cls = np.zeros(m.shape[:2], dtype=np.uint8)
    seen = np.zeros(0, dtype=np.int64)
    next_id = int(nuclei.max(initial=0)) + 1
    fixes = 0
    for c in range(NUM_CLASSES):
        channel = nuclei[..., c]
        fg = channel > 0
        if not fg.any():
            continue
        ids = channel[fg].astype(np.int64)
        uniq = np.unique(ids)
        for clash in np.intersect1d(uniq, seen):
            ids[ids == clash] = next_id
            uniq = np.append(uniq[uniq != clash], next_id)
            next_id += 1
            fixes += 1
        overlap = fg & (inst > 0)
        if overlap.any():
            fixes += len(np.unique(inst[overlap]))
        inst[fg] = ids
        cls[fg] = c + 1
        seen = np.union1d(seen, uniq)
    return inst, cls, fixes


def masks_to_labels(masks: np.ndarray, source: str | Path = "masks") -> tuple[np.ndarray, np.ndarray]:
    """PanNuke ``(H, W, 6)`` masks -> ``(inst int32, cls uint8)`` with ids kept as stored.

    Channel 5 (background) is ignored; see the module docstring for repairs of real-release
    quirks.
    """
    inst, cls, _ = _masks_to_labels(masks, source)
    return inst, cls


def labels_to_masks(
    inst: np.ndarray, cls: np.ndarray, *, dtype: Any = np.float64, source: str | Path = "labels"
) -> np.ndarray:
    """``(inst, cls)`` in PanNuke codes -> ``(H, W, 6)`` masks (channel 5 = 1 off nuclei).

    Raises:
        InputError: invalid labels, an instance without a class (PanNuke stores every
            nucleus in one of channels 0-4), or ids too large for ``dtype``.
    """
    inst = np.asarray(inst)
    inst, cls = validate_labels(inst, cls, inst.shape, NUM_CLASSES, source)
    unclassified = np.unique(inst[(inst > 0) & (cls == 0)])
    if unclassified.size:
        first = int(unclassified[0])
        raise InputError(source, f"instance {first} has class 0; PanNuke needs a class 1..5 per nucleus")
    dtype = np.dtype(dtype)
    if int(inst.max(initial=0)) > _max_exact(dtype):
        raise InputError(source, f"instance id {int(inst.max())} cannot be stored exactly as {dtype}")
    masks = np.zeros((*inst.shape, 6), dtype=dtype)
    for code in range(1, NUM_CLASSES + 1):
        masks[..., code - 1] = np.where(cls == code, inst, 0)
    masks[..., BACKGROUND_CHANNEL] = inst == 0
    return masks


# --------------------------------------------------------------------------- reading
def find_pannuke_files(folder: str | Path) -> dict[str, Path] | None:
    """Paths of images/masks(/types) in a fold folder (flat or official nested form)."""
    folder = Path(folder)
    flat = {key: folder / f"{key}.npy" for key in ("images", "masks", "types")}
    if flat["images"].is_file() and flat["masks"].is_file():
        return {k: p for k, p in flat.items() if p.is_file()}
    nested = {
        "images": sorted(folder.glob("images/*/images.npy")),
        "masks": sorted(folder.glob("masks/*/masks.npy")),
        "types": sorted(folder.glob("images/*/types.npy")),
    }
    if len(nested["images"]) == 1 and len(nested["masks"]) == 1 and len(nested["types"]) <= 1:
        return {k: v[0] for k, v in nested.items() if v}
    return None


class PanNukeDataset(NucleiDataset):
    """One PanNuke fold, memory-mapped: opening is instant and a read touches one tile.

    Args:
        folder: the fold folder (flat files or the official ``images/fold1`` nesting).
        source: ``meta["source"]`` for tiles that ``manifest.csv`` does not describe.
        validate: re-check each converted tile's labels on read (cheap; on by default).

    Raises:
        InputError: missing files; wrong shapes, channels or dtypes; truncated, corrupt or
            pickled ``.npy``; different sample counts across files (each names the file).
    """

    classes = dict(PANNUKE_CLASSES)

    def __init__(self, folder: str | Path, source: str = "real", *, validate: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(self.folder, "no such folder")
        files = find_pannuke_files(self.folder)
        if files is None:
            raise InputError(
                self.folder,
                "is not a PanNuke fold: looked for images.npy + masks.npy (+ types.npy), "
                "or images/<fold>/images.npy + masks/<fold>/masks.npy",
            )
        self.files = files
        self.source = source
        self.validate = validate
        self._maps = MemmapArrays(files)
        images, masks = self.images, self.masks
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(files["images"], f"has shape {images.shape}; expected (N, H, W, 3)")
        if images.dtype not in IMAGE_DTYPES:
            raise InputError(files["images"], f"has dtype {images.dtype}; expected uint8, float32 or float64")
        if masks.ndim != 4:
            raise InputError(files["masks"], f"has shape {masks.shape}; expected (N, H, W, 6)")
        if masks.shape[-1] != 6:
            raise InputError(
                files["masks"],
                f"has {masks.shape[-1]} channels; PanNuke masks have 6 (5 classes + background)",
            )
        if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
            raise InputError(
                files["masks"], f"has dtype {masks.dtype}; expected integer or float instance ids"
            )
        n = images.shape[0]
        if masks.shape[0] != n:
            raise InputError(
                files["masks"], f"has {masks.shape[0]} samples but {files['images'].name} has {n}"
            )
        if masks.shape[1:3] != images.shape[1:3]:
            raise InputError(files["masks"], f"tiles are {masks.shape[1]}x{masks.shape[2]} but images are "
                             f"{images.shape[1]}x{images.shape[2]}")
        types = self.types
        if types is not None:
            if types.ndim != 1 or types.dtype.kind not in "US":
                raise InputError(
                    files["types"], f"has shape {types.shape} dtype {types.dtype}; expected (N,) strings"
                )
            if types.shape[0] != n:
                raise InputError(
                    files["types"], f"has {types.shape[0]} entries but {files['images'].name} has {n}"
                )
        self.manifest = manifest_by_row(self.folder / "manifest.csv", n)

    # Arrays are exposed memory-mapped (np.memmap), opened lazily in DataLoader workers.
    @property
    def images(self) -> np.ndarray:
        return self._maps["images"]

    @property
    def masks(self) -> np.ndarray:
        return self._maps["masks"]

    @property
    def types(self) -> np.ndarray | None:
        return self._maps["types"] if "types" in self._maps else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, index: int) -> NucleiSample:
        i = self._index(index)
        image = image_to_uint8(self.images[i], f"{self.files['images']}[{i}]")
        mask_src = f"{self.files['masks']}[{i}]"
        inst, cls, fixes = _masks_to_labels(np.asarray(self.masks[i]), mask_src)
        if self.validate:
            inst, cls = validate_labels(inst, cls, image.shape, NUM_CLASSES, mask_src)
        meta: dict[str, Any] = {"name": f"{slug(self.folder.name)}_{i:05d}", "source": self.source}
        if self.manifest is not None:
            meta.update(self.manifest[i])
        types = self.types
        if types is not None:
            t = types[i]
            meta["tissue"] = t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
        if fixes:
            meta["label_fixes"] = fixes
        meta.update(index=i, dataset="pannuke", path=str(self.folder))
        return NucleiSample(image, inst, cls, meta)


# --------------------------------------------------------------------------- writing
def write_pannuke(
    folder: str | Path,
    samples: Any,
    tissue: str | Sequence[str] | None = None,
    *,
    source: str | None = None,
    mask_dtype: Any = np.float64,
    overwrite: bool = False,
) -> Path:
    """Write samples (PanNuke class codes) as one fold folder, all-or-nothing.

    Args:
        folder: the fold folder to create.
        samples: NucleiSamples, a NucleiDataset, or ``(images, inst, cls)`` stacked arrays.
        tissue: one tissue name for all tiles, or one per tile; default ``meta["tissue"]``
            (``"Unknown"`` where absent).
        source: ``meta["source"]`` for samples that have none (required then).
        mask_dtype: float64 (release-compatible, default) or an integer dtype.
        overwrite: replace an existing ``folder`` (only once the new one is complete).

    The arrays are assembled in memory, then each ``.npy`` goes through
    :func:`studio.io.save_npy` into a temporary sibling folder that is renamed onto
    ``folder`` only when every file is written.
    """
    items = as_samples(samples, source)
    names = sample_names(items)
    h, w = common_size(items, "PanNuke")
    n = len(items)
    if tissue is None:
        tissues = [str(s.meta.get("tissue", "Unknown")) for s in items]
    elif isinstance(tissue, str):
        tissues = [tissue] * n
    else:
        tissues = [str(t) for t in tissue]
        if len(tissues) != n:
            raise InputError("tissue", f"has {len(tissues)} names for {n} samples")
    images = np.empty((n, h, w, 3), dtype=np.uint8)
    masks = np.empty((n, h, w, 6), dtype=np.dtype(mask_dtype))
    metas = []
    for i, (s, name) in enumerate(zip(items, names, strict=True)):
        src = f"samples[{i}] ({name})"
        images[i] = validate_image(s.image, src)
        masks[i] = labels_to_masks(s.inst, s.cls, dtype=mask_dtype, source=src)
        metas.append({**s.meta, "tissue": tissues[i]})
    types = np.array(tissues, dtype=np.str_)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_npy(tmp / "images.npy", images)
        save_npy(tmp / "masks.npy", masks)
        save_npy(tmp / "types.npy", types)
        write_manifest(tmp / "manifest.csv", metas, names)
    return Path(folder)

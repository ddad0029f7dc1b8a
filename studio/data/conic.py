"""CoNIC (Lizard patches): read (memory-mapped) and write (all-or-nothing).

Layout of a CoNIC folder, as released for the CoNIC 2022 challenge::

    images.npy      (N, 256, 256, 3) uint8
    labels.npy      (N, 256, 256, 2) uint16: channel 0 instance ids, channel 1 class 0..6
    counts.csv      optional: columns neutrophil,epithelial,lymphocyte,plasma,eosinophil,
                    connective; one row per patch, in patch order
    patch_info.csv  optional: one column ``patch_info`` naming each patch
                    (``<lizard image>-<NNNN>``)
    manifest.csv    optional studio sidecar: name, source, tissue, provenance columns

Class codes are CoNIC's own (:data:`CONIC_CLASSES`), not PanNuke's; convert with
:func:`studio.data.conic.pannuke_to_conic` (an approximation) before mixing.

``counts.csv`` follows the challenge's rule, which is *not* "all nuclei in the patch": a
nucleus is counted when any of its pixels lies in the central 224x224 region of the
256x256 patch (a :data:`COUNT_MARGIN` = 16 px border is excluded). The writer computes
counts that way (:func:`conic_counts`), and the reader checks each row against the labels
when the tile is read (``verify_counts``), so a counts file that does not belong to its
labels is caught. ``labels.npy`` is written uint16 like the release (instance ids above
65535 are refused); images uint8.
"""

from __future__ import annotations

import csv
import io
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
from studio.errors import InputError
from studio.io import atomic_write_text, save_npy

CONIC_CLASSES: dict[int, str] = {
    1: "neutrophil",
    2: "epithelial",
    3: "lymphocyte",
    4: "plasma",
    5: "eosinophil",
    6: "connective",
}
COUNT_COLUMNS: tuple[str, ...] = tuple(CONIC_CLASSES.values())
NUM_CLASSES = 6
COUNT_MARGIN = 16  # 256 -> central 224x224, as in the challenge
IMAGE_DTYPES = (np.uint8, np.float32, np.float64)
# PanNuke -> CoNIC, approximate: neoplastic and epithelial nuclei are both epithelial in
# CoNIC, inflammatory is mostly lymphocytes, connective is connective. PanNuke "dead" has
# no CoNIC class and is refused.
PANNUKE_TO_CONIC: dict[int, int] = {1: 2, 2: 3, 3: 6, 5: 2}


def pannuke_to_conic(cls: np.ndarray, source: str = "class map") -> np.ndarray:
    """Map a PanNuke-coded class map to CoNIC codes (see :data:`PANNUKE_TO_CONIC`)."""
    cls = np.asarray(cls)
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for pannuke, conic in PANNUKE_TO_CONIC.items():
        lut[pannuke] = conic
    if cls.size and (cls.min() < 0 or cls.max() > 255):
        raise InputError(source, f"class codes {int(cls.min())}..{int(cls.max())} are not PanNuke codes")
    out = lut[cls.astype(np.intp)]
    if (out == 255).any():
        bad = int(cls[out == 255].flat[0])
        raise InputError(source, f"PanNuke class {bad} has no CoNIC equivalent")
    return out


def conic_counts(inst: np.ndarray, cls: np.ndarray, margin: int = COUNT_MARGIN) -> np.ndarray:
    """Nuclei per CoNIC class (int64, length 6) whose pixels reach the central region.

    The central region excludes a ``margin`` border (none for tiles too small to have one).
    """
    inst = np.asarray(inst)
    cls = np.asarray(cls)
    h, w = inst.shape
    m = margin if min(h, w) > 2 * margin else 0
    ci, cc = inst[m : h - m, m : w - m], cls[m : h - m, m : w - m]
    fg = ci > 0
    pairs = np.unique(ci[fg].astype(np.int64) * (NUM_CLASSES + 1) + cc[fg].astype(np.int64))
    codes = pairs % (NUM_CLASSES + 1)
    return np.bincount(codes, minlength=NUM_CLASSES + 1)[1 : NUM_CLASSES + 1].astype(np.int64)


# --------------------------------------------------------------------------- csv files
def read_counts(path: str | Path, n: int) -> np.ndarray:
    """``counts.csv`` -> (n, 6) int64 in :data:`COUNT_COLUMNS` order."""
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({exc})") from exc
    rows = [r for r in rows if r]
    if not rows:
        raise InputError(path, "is empty; expected a header " + ",".join(COUNT_COLUMNS))
    header = [h.strip() for h in rows[0]]
    missing = [c for c in COUNT_COLUMNS if c not in header]
    if missing:
        expected = ",".join(COUNT_COLUMNS)
        raise InputError(path, f"lacks column(s) {missing}; expected {expected} (has {header})")
    if len(rows) - 1 != n:
        raise InputError(path, f"has {len(rows) - 1} rows but the dataset has {n} patches")
    cols = [header.index(c) for c in COUNT_COLUMNS]
    counts = np.zeros((n, NUM_CLASSES), dtype=np.int64)
    for i, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise InputError(path, f"line {i + 2} has {len(row)} fields; the header has {len(header)}")
        try:
            counts[i] = [int(float(row[c])) for c in cols]
        except ValueError as exc:
            raise InputError(path, f"line {i + 2} holds a non-numeric count ({exc})") from exc
    if (counts < 0).any():
        raise InputError(path, "holds negative counts")
    return counts


def _counts_csv(counts: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COUNT_COLUMNS)
    writer.writerows(np.asarray(counts, dtype=np.int64).tolist())
    return buf.getvalue()


def read_patch_info(path: str | Path, n: int) -> list[str]:
    """``patch_info.csv`` -> patch names (first column, or the ``patch_info`` column)."""
    path = Path(path)
    try:
        rows = [r for r in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))) if r]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({exc})") from exc
    if not rows:
        raise InputError(path, "is empty; expected a 'patch_info' header and one name per patch")
    col = rows[0].index("patch_info") if "patch_info" in rows[0] else 0
    names = [r[col] if col < len(r) else "" for r in rows[1:]]
    if len(names) != n:
        raise InputError(path, f"has {len(names)} rows but the dataset has {n} patches")
    return names


# --------------------------------------------------------------------------- reading
class CoNICDataset(NucleiDataset):
    """A CoNIC folder, memory-mapped (one tile read per ``read``).

    Args:
        folder: holds ``images.npy`` and ``labels.npy`` (+ optional csv files).
        source: ``meta["source"]`` for patches that ``manifest.csv`` does not describe.
        verify_counts: check each read tile against its ``counts.csv`` row.

    Raises:
        InputError: missing files; wrong shapes, channels or dtypes; truncated, corrupt or
            pickled ``.npy``; sample counts that differ across files; bad csv files.
    """

    classes = dict(CONIC_CLASSES)

    def __init__(self, folder: str | Path, source: str = "real", *, verify_counts: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(self.folder, "no such folder")
        self.files = {"images": self.folder / "images.npy", "labels": self.folder / "labels.npy"}
        for path in self.files.values():
            if not path.is_file():
                raise InputError(path, "no such file (a CoNIC folder holds images.npy and labels.npy)")
        self.source = source
        self.verify_counts = verify_counts
        self._maps = MemmapArrays(self.files)
        images, labels = self.images, self.labels
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(self.files["images"], f"has shape {images.shape}; expected (N, H, W, 3)")
        if images.dtype not in IMAGE_DTYPES:
            raise InputError(self.files["images"], f"has dtype {images.dtype}; expected uint8")
        if labels.ndim != 4:
            raise InputError(self.files["labels"], f"has shape {labels.shape}; expected (N, H, W, 2)")
        if labels.shape[-1] != 2:
            raise InputError(
                self.files["labels"], f"has {labels.shape[-1]} channels; expected 2 (instance, class)"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(self.files["labels"], f"has dtype {labels.dtype}; expected integers (uint16)")
        n = images.shape[0]
        if labels.shape[0] != n:
            raise InputError(self.files["labels"], f"has {labels.shape[0]} samples but images.npy has {n}")
        if labels.shape[1:3] != images.shape[1:3]:
            raise InputError(
                self.files["labels"],
                f"tiles are {labels.shape[1]}x{labels.shape[2]} but images are "
                f"{images.shape[1]}x{images.shape[2]}",
            )
        counts_path = self.folder / "counts.csv"
        self.counts = read_counts(counts_path, n) if counts_path.is_file() else None
        info_path = self.folder / "patch_info.csv"
        self.patch_names = read_patch_info(info_path, n) if info_path.is_file() else None
        self.manifest = manifest_by_row(self.folder / "manifest.csv", n)

    @property
    def images(self) -> np.ndarray:
        return self._maps["images"]

    @property
    def labels(self) -> np.ndarray:
        return self._maps["labels"]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, index: int) -> NucleiSample:
        i = self._index(index)
        image = image_to_uint8(self.images[i], f"{self.files['images']}[{i}]")
        lab = np.asarray(self.labels[i])
        src = f"{self.files['labels']}[{i}]"
        inst, cls = validate_labels(lab[..., 0], lab[..., 1], image.shape, NUM_CLASSES, src)
        if self.verify_counts and self.counts is not None:
            got = conic_counts(inst, cls)
            if not np.array_equal(got, self.counts[i]):
                raise InputError(
                    self.folder / "counts.csv",
                    f"row {i} (line {i + 2}) says {self.counts[i].tolist()} but labels.npy[{i}] has "
                    f"{got.tolist()} nuclei per class in the central region; counts do not match the labels",
                )
        meta: dict[str, Any] = {"name": f"{slug(self.folder.name)}_{i:05d}", "source": self.source}
        if self.patch_names is not None and self.patch_names[i]:
            meta["name"] = self.patch_names[i]
        if self.manifest is not None:
            meta.update(self.manifest[i])
        meta.update(index=i, dataset="conic", path=str(self.folder))
        return NucleiSample(image, inst, cls, meta)


# --------------------------------------------------------------------------- writing
def write_conic(
    folder: str | Path, samples: Any, *, source: str | None = None, overwrite: bool = False
) -> Path:
    """Write samples (CoNIC class codes) as a CoNIC folder, all-or-nothing.

    Writes ``images.npy`` (uint8), ``labels.npy`` (uint16, as released), ``counts.csv``
    computed from the labels by the challenge rule, ``patch_info.csv`` (sample names) and
    ``manifest.csv`` (meta), into a temporary sibling folder renamed onto ``folder`` only
    when complete.
    """
    items = as_samples(samples, source)
    names = sample_names(items)
    h, w = common_size(items, "CoNIC")
    n = len(items)
    images = np.empty((n, h, w, 3), dtype=np.uint8)
    labels = np.empty((n, h, w, 2), dtype=np.uint16)
    counts = np.empty((n, NUM_CLASSES), dtype=np.int64)
    for i, (s, name) in enumerate(zip(items, names, strict=True)):
        src = f"samples[{i}] ({name})"
        images[i] = validate_image(s.image, src)
        inst, cls = validate_labels(s.inst, s.cls, images[i].shape, NUM_CLASSES, src)
        if int(inst.max(initial=0)) > np.iinfo(np.uint16).max:
            raise InputError(src, f"instance id {int(inst.max())} exceeds 65535, the CoNIC (uint16) limit")
        labels[i, ..., 0] = inst
        labels[i, ..., 1] = cls
        counts[i] = conic_counts(inst, cls)
    info = "patch_info\n" + "".join(f"{name}\n" for name in names)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_npy(tmp / "images.npy", images)
        save_npy(tmp / "labels.npy", labels)
        atomic_write_text(tmp / "counts.csv", _counts_csv(counts))
        atomic_write_text(tmp / "patch_info.csv", info)
        write_manifest(tmp / "manifest.csv", [s.meta for s in items], names)
    return Path(folder)

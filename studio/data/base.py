"""The one nuclei-sample type and the one Dataset interface every layout reader serves.

A *nuclei sample* is what every reader returns and every writer takes, whatever the
file layout (PanNuke, CoNIC, the studio's folder layout, crops of a shipped tile):

* ``image``  uint8 ``(H, W, 3)`` RGB,
* ``inst``   int32 ``(H, W)`` instance ids, 0 = background,
* ``cls``    uint8 ``(H, W)`` class code of each instance's pixels, 0 = background,
* ``meta``   flat dict: at least ``index``, ``name``, ``source`` ("real", "synthetic", ...),
  optionally ``tissue`` and any provenance (crop origin, parent image, ...),
* ``ignore`` optional bool ``(H, W)``: pixels whose label is unknown (a pseudo-label's
  unconfident nuclei), left out of the training loss rather than taught as background.

Training code reads ``NucleiDataset[i]`` (tensors) and never looks at where a sample came
from: real and synthetic data differ only by ``meta["source"]``, which is carried through
concatenation, collation and every writer/reader round trip.

The class codes of ``cls`` are those of the dataset (``dataset.classes``): PanNuke codes for
PanNuke and the shipped tile, CoNIC codes for CoNIC. :class:`ConcatNucleiDataset` refuses
to mix datasets whose class tables differ instead of silently mixing code meanings.

This module also holds the small helpers the layout modules share: label validation,
array-to-uint8 image conversion, the ``manifest.csv`` provenance sidecar and the
all-or-nothing folder writer :func:`atomic_folder`.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from studio.errors import InputError, OutputError
from studio.io import atomic_write_text, default_mode, load_npy, to_tensor

Meta = dict[str, Any]

# Meta keys a reader sets itself; they are not written to manifest.csv.
READER_KEYS = ("index", "dataset", "path", "he_path", "ihc_path")
# Manifest columns that are always text (a name "00012" must not become the int 12).
TEXT_KEYS = ("name", "source", "tissue", "split", "stain", "parent")
_NAME_RE = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\- ]*")


@dataclass
class NucleiSample:
    """One labelled tile, numpy in memory (see the module docstring for the contract)."""

    image: np.ndarray
    inst: np.ndarray
    cls: np.ndarray
    meta: Meta = field(default_factory=dict)
    ignore: np.ndarray | None = None

    @property
    def num_instances(self) -> int:
        """Number of distinct non-zero instance ids."""
        ids = np.unique(self.inst)
        return int((ids > 0).sum())


# --------------------------------------------------------------------------- validation
def validate_image(image: np.ndarray, source: str | Path) -> np.ndarray:
    """Check an in-memory image is uint8 ``(H, W, 3)`` and return it."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(source, f"image has shape {arr.shape}; expected (H, W, 3) RGB")
    if arr.dtype != np.uint8:
        raise InputError(source, f"image has dtype {arr.dtype}; expected uint8")
    return arr


def validate_labels(
    inst: np.ndarray,
    cls: np.ndarray,
    image_shape: Sequence[int],
    num_classes: int,
    source: str | Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Check an instance map and class map against each other and their image.

    Rules (each violation raises one :class:`InputError` naming ``source``): both maps are
    2-D with the image's height and width; integer dtypes; instance ids >= 0 and fit int32;
    class codes within ``0..num_classes``; background pixels (id 0) have class 0; every
    instance has exactly one class (class 0 = an unclassified nucleus is allowed here;
    layouts that cannot store it refuse it when writing).

    Returns:
        ``(inst int32, cls uint8)``: the same arrays when they already have those dtypes.
    """
    inst = np.asarray(inst)
    cls = np.asarray(cls)
    hw = tuple(int(s) for s in tuple(image_shape)[:2])
    for what, arr in (("instance map", inst), ("class map", cls)):
        if arr.ndim != 2:
            raise InputError(source, f"{what} has shape {arr.shape}; expected 2-D (H, W)")
        if arr.shape != hw:
            raise InputError(
                source, f"{what} is {arr.shape[0]}x{arr.shape[1]} but the image is {hw[0]}x{hw[1]}"
            )
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise InputError(source, f"{what} has dtype {arr.dtype}; expected integers")
    if inst.size == 0:
        return inst.astype(np.int32), cls.astype(np.uint8)
    lo, hi = int(inst.min()), int(inst.max())
    if lo < 0:
        raise InputError(source, f"instance map has negative id {lo}; ids must be >= 0 (0 = background)")
    if hi > np.iinfo(np.int32).max:
        raise InputError(source, f"instance id {hi} does not fit int32")
    cmin, cmax = int(cls.min()), int(cls.max())
    if cmin < 0 or cmax > num_classes:
        bad = cmin if cmin < 0 else cmax
        raise InputError(source, f"class {bad} outside the range 0..{num_classes}")
    fg = inst > 0
    stray = cls[~fg]
    if stray.any():
        n = int(np.count_nonzero(stray))
        raise InputError(source, f"class map marks {n} background pixel(s) (instance 0) with a class")
    if fg.any():
        k = num_classes + 1
        key = np.unique(inst[fg].astype(np.int64) * k + cls[fg].astype(np.int64))
        ids = key // k
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            bad_id = int(ids[dup[0]])
            classes = sorted(int(c) for c in key[ids == bad_id] % k)
            raise InputError(
                source, f"instance {bad_id} has pixels of several classes {classes}; one class per instance"
            )
    inst_out = inst if inst.dtype == np.int32 else inst.astype(np.int32)
    cls_out = cls if cls.dtype == np.uint8 else cls.astype(np.uint8)
    return inst_out, cls_out


def validate_sample(sample: NucleiSample, num_classes: int, source: str | Path | None = None) -> NucleiSample:
    """Validate image and labels of ``sample``; return it with canonical dtypes."""
    src = source if source is not None else sample.meta.get("name", "sample")
    image = validate_image(sample.image, src)
    inst, cls = validate_labels(sample.inst, sample.cls, image.shape, num_classes, src)
    return NucleiSample(image, inst, cls, sample.meta, ignore=sample.ignore)


def image_to_uint8(array: np.ndarray, source: str | Path) -> np.ndarray:
    """Stored image array -> uint8 ``(H, W, 3)`` copy.

    uint8 passes through. float32/float64 are read as 0..255 values (the PanNuke release
    stores its images as float64 holding integers): they are rounded, and NaN or values
    outside 0..255 are refused rather than clipped, since they mean the file is not what
    its layout says.
    """
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        return np.array(arr)
    if arr.dtype not in (np.float32, np.float64):
        raise InputError(source, f"image dtype {arr.dtype}; expected uint8, float32 or float64 (0..255)")
    if not np.isfinite(arr).all():
        raise InputError(source, "image contains NaN or infinite values")
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    if lo < -0.5 or hi > 255.5:
        raise InputError(source, f"image values span {lo:g}..{hi:g}; expected 0..255")
    return np.rint(arr).clip(0, 255).astype(np.uint8)


def check_name(name: str, source: str | Path) -> str:
    """A sample name must be usable as a file stem: no path separators, no leading dot."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.strip() != name:
        raise InputError(
            source, f"sample name {name!r} cannot be a file name (letters, digits, . _ - + only)"
        )
    return name


def slug(text: str) -> str:
    """Make ``text`` usable inside a sample name."""
    return re.sub(r"[^A-Za-z0-9_.+\-]+", "_", text).strip("._") or "sample"


# --------------------------------------------------------------------------- inputs to writers
def as_samples(data: Any, source: str | None = None) -> list[NucleiSample]:
    """Normalise what a writer is given into a list of :class:`NucleiSample`.

    Accepts a :class:`NucleiDataset`, a sequence of samples, or a tuple of stacked arrays
    ``(images (N,H,W,3), inst (N,H,W), cls (N,H,W))``. ``source`` fills ``meta["source"]``
    where a sample has none; a sample with neither is refused (a writer never guesses
    whether data is real).
    """
    if isinstance(data, NucleiDataset):
        items = [data.read(i) for i in range(len(data))]
    elif isinstance(data, tuple) and len(data) == 3 and all(isinstance(a, np.ndarray) for a in data):
        images, inst, cls = data
        if not (len(images) == len(inst) == len(cls)):
            counts = f"{len(images)}, {len(inst)}, {len(cls)}"
            raise InputError("samples", f"images, inst and cls have {counts} items; they must match")
        items = [NucleiSample(images[i], inst[i], cls[i], {"name": f"{i:05d}"}) for i in range(len(images))]
    else:
        items = list(data)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, NucleiSample):
            raise InputError("samples", f"item {i} is a {type(item).__name__}; expected NucleiSample")
        meta = dict(item.meta)
        if "source" not in meta:
            if source is None:
                raise InputError(f"samples[{i}]", "meta has no 'source'; pass source='real' or 'synthetic'")
            meta["source"] = source
        out.append(NucleiSample(item.image, item.inst, item.cls, meta, ignore=item.ignore))
    if not out:
        raise InputError("samples", "is empty; nothing to write")
    return out


def sample_names(samples: Sequence[NucleiSample]) -> list[str]:
    """Each sample's ``meta["name"]`` (``NNNNN`` when absent), checked and unique."""
    names = []
    for i, s in enumerate(samples):
        names.append(check_name(str(s.meta.get("name", f"{i:05d}")), f"samples[{i}]"))
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise InputError("samples", f"duplicate sample names {dups[:5]}; names must be unique")
    return names


def common_size(samples: Sequence[NucleiSample], layout: str) -> tuple[int, int]:
    """The one tile size of ``samples``; array layouts stack tiles, so sizes must agree."""
    h, w = np.asarray(samples[0].image).shape[:2]
    for i, s in enumerate(samples):
        hi, wi = np.asarray(s.image).shape[:2]
        if (hi, wi) != (h, w):
            raise InputError(
                f"samples[{i}]", f"is {hi}x{wi} but samples[0] is {h}x{w}; {layout} stores one tile size"
            )
    return int(h), int(w)


# --------------------------------------------------------------------------- manifest.csv
def write_manifest(path: str | Path, metas: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Path:
    """Write per-sample provenance as ``manifest.csv`` (one row per sample, in order).

    Columns: ``name``, ``source``, ``tissue``, then every other meta key in first-seen
    order. Reader-set keys (index, dataset, path) are left out. Values must be flat
    scalars; numbers round-trip as numbers, everything else as text.
    """
    keys: list[str] = ["name", "source", "tissue"]
    for meta in metas:
        for key in meta:
            if key not in keys and key not in READER_KEYS:
                keys.append(key)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for meta, name in zip(metas, names, strict=True):
        row = []
        for key in keys:
            value = name if key == "name" else meta.get(key)
            if isinstance(value, (list, tuple, dict, np.ndarray)):
                kind = type(value).__name__
                raise InputError(path, f"meta[{key!r}] of {name} is a {kind}; manifest values are scalars")
            row.append("" if value is None else str(value))
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def _parse_value(key: str, text: str) -> Any:
    if key in TEXT_KEYS:
        return text
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text):
        return float(text)
    return text


def read_manifest(path: str | Path) -> list[Meta]:
    """Read ``manifest.csv`` rows as meta dicts (empty cells are left out)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({exc})") from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or "name" not in rows[0]:
        raise InputError(path, "has no header with a 'name' column")
    header = rows[0]
    out = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InputError(path, f"line {line_no} has {len(row)} fields; the header has {len(header)}")
        out.append({k: _parse_value(k, v) for k, v in zip(header, row, strict=True) if v != ""})
    return out


def manifest_by_row(path: Path, n: int) -> list[Meta] | None:
    """``manifest.csv`` for the array layouts: absent -> None, else exactly ``n`` rows."""
    if not path.is_file():
        return None
    rows = read_manifest(path)
    if len(rows) != n:
        raise InputError(path, f"has {len(rows)} rows but the dataset has {n} samples")
    return rows


# --------------------------------------------------------------------------- atomic folders
@contextlib.contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it becomes ``target``.

    All-or-nothing: a writer fills the temporary folder, and only a complete dataset is
    renamed onto ``target``. On any error (disk full, unwritable folder, bad sample found
    half-way) the temporary folder is removed and no ``target`` appears. With ``overwrite``
    an existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputError(target, "already exists; pass --overwrite (overwrite=True) to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise OutputError(target, f"cannot write here ({exc.strerror or exc})") from exc
    try:
        yield tmp
        # mkdtemp creates the folder 0700; give the result the mode a plain mkdir() would.
        os.chmod(tmp, default_mode(folder=True))
        old = None
        if target.exists():
            if not overwrite:
                raise OutputError(target, "appeared while writing; nothing was written")
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(target, f"write failed ({exc.strerror or exc}); nothing was written") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- datasets
class NucleiDataset(Dataset, abc.ABC):
    """The one Dataset interface for labelled nuclei.

    Subclasses implement ``__len__`` and :meth:`read` (numpy sample) and set ``classes``
    (code -> name, without 0). ``dataset[i]`` gives training tensors::

        {"image": float32 (3, H, W) in [0, 1], "inst": int64 (H, W),
         "cls": int64 (H, W), "meta": dict}

    Batch them with :func:`collate`.
    """

    classes: Mapping[int, str] = {}

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> NucleiSample:
        """Sample ``index`` as numpy arrays (uint8 image, int32 inst, uint8 cls)."""

    @property
    def num_classes(self) -> int:
        """Highest class code (0 is background)."""
        return max(self.classes, default=0)

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return i

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.read(index)
        image = sample.image if sample.image.flags.writeable else np.array(sample.image)
        return {
            "image": to_tensor(image)[0],
            "inst": torch.from_numpy(np.asarray(sample.inst, dtype=np.int64)),
            "cls": torch.from_numpy(np.asarray(sample.cls, dtype=np.int64)),
            "meta": dict(sample.meta),
        }

    def sources(self) -> list[str]:
        """``meta["source"]`` of every sample (reads every sample; for small datasets)."""
        return [str(self.read(i).meta.get("source", "")) for i in range(len(self))]


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a batch of ``dataset[i]`` dicts; other values become lists.

    Works for nuclei items (image/inst/cls/meta) and paired items (he/ihc/meta). Tiles of
    different sizes cannot be stacked and raise an :class:`InputError` saying so.
    """
    if not batch:
        raise InputError("batch", "is empty")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise InputError(
                    "batch", f"{key!r} tensors differ in shape {sorted(shapes)}; crop to one size"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class ArrayNucleiDataset(NucleiDataset):
    """Samples held in memory (crops of a tile, generated phantoms, a loaded subset).

    Every sample is validated once, here, against ``classes``. ``source`` fills
    ``meta["source"]`` where a sample has none; a sample with neither is refused.
    """

    def __init__(
        self,
        samples: Iterable[NucleiSample],
        classes: Mapping[int, str],
        name: str = "arrays",
        source: str | None = None,
    ):
        self.classes = dict(classes)
        self.samples: list[NucleiSample] = []
        for i, s in enumerate(samples):
            src = f"{name}[{i}]"
            checked = validate_sample(s, self.num_classes, src)
            meta = {"name": f"{slug(name)}_{i:05d}", "dataset": name, **s.meta, "index": i}
            if "source" not in meta:
                if source is None:
                    # Never guess: a synthetic tile silently labelled "real" would leak
                    # into real-only evaluation.
                    raise InputError(src, "meta has no 'source'; pass source='real' or 'synthetic'")
                meta["source"] = source
            self.samples.append(NucleiSample(checked.image, checked.inst, checked.cls, meta, ignore=checked.ignore))

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> NucleiSample:
        s = self.samples[self._index(index)]
        return NucleiSample(s.image, s.inst, s.cls, dict(s.meta), ignore=s.ignore)


class ConcatNucleiDataset(NucleiDataset):
    """Several datasets as one (e.g. real PanNuke folds + synthetic phantoms).

    Each sample keeps its own meta (``source`` included), so a mixed batch still says which
    tiles were synthetic, while the training loop treats them all alike. The class tables
    must be identical: mixing PanNuke codes with CoNIC codes would silently mean different
    classes.
    """

    def __init__(self, datasets: Sequence[NucleiDataset]):
        self.datasets = list(datasets)
        if not self.datasets:
            raise InputError("datasets", "is empty; give at least one dataset")
        self.classes = dict(self.datasets[0].classes)
        for k, ds in enumerate(self.datasets[1:], start=1):
            if dict(ds.classes) != self.classes:
                raise InputError(
                    f"datasets[{k}]",
                    f"class table {dict(ds.classes)} differs from datasets[0] {self.classes}; "
                    "remap classes first",
                )
        self.offsets = np.cumsum([0] + [len(ds) for ds in self.datasets]).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (which dataset, index inside it)."""
        i = self._index(index)
        part = bisect.bisect_right(self.offsets, i) - 1
        return part, i - int(self.offsets[part])

    def read(self, index: int) -> NucleiSample:
        part, local = self.locate(index)
        return self.datasets[part].read(local)

    def sampling_weights(self, proportions: Sequence[float]) -> torch.Tensor:
        """Per-sample weights for ``torch.utils.data.WeightedRandomSampler`` so that part k
        is drawn with probability ``proportions[k] / sum(proportions)`` whatever its size
        (e.g. ``[0.7, 0.3]`` real vs synthetic)."""
        props = np.asarray(proportions, dtype=np.float64)
        if props.shape != (len(self.datasets),):
            raise InputError("proportions", f"has {props.size} values for {len(self.datasets)} datasets")
        if (props < 0).any() or props.sum() <= 0 or not np.isfinite(props).all():
            raise InputError("proportions", f"{props.tolist()} must be >= 0 with a positive sum")
        weights = np.zeros(len(self), dtype=np.float64)
        for k, ds in enumerate(self.datasets):
            if len(ds):
                weights[self.offsets[k] : self.offsets[k + 1]] = props[k] / props.sum() / len(ds)
            elif props[k] > 0:
                raise InputError(f"datasets[{k}]", "is empty but was given a positive proportion")
        return torch.from_numpy(weights)


# --------------------------------------------------------------------------- memmap helpers
class MemmapArrays:
    """Lazily (re)opened memory maps, dropped when pickled.

    A DataLoader worker started with ``spawn`` pickles the dataset; pickling an
    ``np.memmap`` copies its whole content. Datasets keep their maps here and reopen them
    in the worker instead.
    """

    def __init__(self, paths: Mapping[str, Path]):
        self.paths = dict(paths)
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            self._arrays[key] = load_npy(self.paths[key], mmap=True)
        return self._arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self.paths

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "_arrays": {}}

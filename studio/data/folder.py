"""The studio's plain folder layout: one image file and one label file per tile.

Layout::

    <root>/
      images/<name>.png       uint8 RGB (any size; other image formats are read too)
      labels/<name>.npy       (H, W, 2) int32: channel 0 instance id (0 = background),
                              channel 1 class code (0 = background); an optional channel 2
                              (H, W, 3) marks pixels whose label is unknown (non-zero: left
                              out of the training loss, e.g. a pseudo-label's unsure nuclei)
        or labels/<name>.tif  the same two channels as a TIFF (when there is no .npy)
      manifest.csv            optional: name, source, tissue, then any provenance columns
      classes.json            optional: {"1": "neoplastic", ...}; PanNuke classes if absent

Names are the file stems, served in sorted order. Every image needs a label file (a
missing one is an error listing it); a label file without an image is ignored with a
warning. Tiles may differ in size (batch them after cropping to one size).

Why this layout: it is what people can make by hand or from any annotation tool, it
diffs and inspects with ordinary tools, and it holds tiles of any size, unlike the
fixed-size stacked arrays of PanNuke and CoNIC. Images are written as PNG (lossless) and
labels as ``.npy`` int32, so a write/read round trip is bit-identical.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from studio.data.base import (
    NucleiDataset,
    NucleiSample,
    as_samples,
    atomic_folder,
    read_manifest,
    sample_names,
    validate_image,
    validate_labels,
    write_manifest,
)
from studio.data.samples import PANNUKE_CLASSES
from studio.errors import InputError
from studio.io import (
    IMAGE_SUFFIXES,
    atomic_path,
    atomic_write_text,
    load_npy,
    read_image,
    save_npy,
    write_image,
)

LABEL_SUFFIXES = (".npy", ".tif", ".tiff")


def read_classes(path: str | Path) -> dict[int, str]:
    """``classes.json`` -> {code: name} for codes >= 1 (a "0" entry is ignored)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, 'must be an object mapping class codes to names, e.g. {"1": "neoplastic"}')
    classes: dict[int, str] = {}
    for key, name in raw.items():
        try:
            code = int(key)
        except ValueError:
            raise InputError(path, f"key {key!r} is not an integer class code") from None
        if code < 0 or code > 255:
            raise InputError(path, f"class code {code} outside 0..255")
        if code > 0:
            classes[code] = str(name)
    return classes


def read_label_file(path: str | Path) -> np.ndarray:
    """A ``labels/<name>`` file -> (H, W, 2) integer array [instance, class], or (H, W, 3) with an ignore channel."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = load_npy(path, mmap=False)
    else:
        import tifffile

        if not path.is_file():
            raise InputError(path, "no such file")
        try:
            arr = tifffile.imread(path)
        except Exception as exc:
            raise InputError(path, f"corrupt or truncated TIFF ({exc})") from exc
        if arr.ndim == 3 and arr.shape[0] in (2, 3) and arr.shape[-1] not in (2, 3):
            arr = np.moveaxis(arr, 0, -1)  # planar (2, H, W)
    if arr.ndim != 3 or arr.shape[-1] not in (2, 3):
        raise InputError(path, f"has shape {arr.shape}; expected (H, W, 2) [instance, class] "
                               "or (H, W, 3) [instance, class, ignore]")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(path, f"has dtype {arr.dtype}; expected integers (int32)")
    return arr


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in found and suffixes != LABEL_SUFFIXES:
                other = found[path.stem].name
                raise InputError(path, f"two files for sample {path.stem!r} ({other}, {path.name})")
            # For labels .npy sorts before .tif, and .npy wins.
            found.setdefault(path.stem, path)
    return found


class FolderDataset(NucleiDataset):
    """Tiles stored as ``images/<name>.png`` + ``labels/<name>.npy`` (see module docstring).

    Args:
        folder: the dataset root.
        source: ``meta["source"]`` for tiles that ``manifest.csv`` does not describe.

    Raises:
        InputError: missing folders, images without labels, unknown manifest names, bad
            ``classes.json``; on read, unreadable files and labels that do not fit their
            image (each naming the file).
    """

    def __init__(self, folder: str | Path, source: str = "real"):
        self.folder = Path(folder)
        self.source = source
        image_dir, label_dir = self.folder / "images", self.folder / "labels"
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise InputError(d, "no such folder (the folder layout needs images/ and labels/)")
        images = _by_stem(image_dir, IMAGE_SUFFIXES)
        labels = _by_stem(label_dir, LABEL_SUFFIXES)
        if not images:
            raise InputError(image_dir, f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [name for name in images if name not in labels]
        if missing:
            shown = ", ".join(f"labels/{m}.npy" for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InputError(
                label_dir, f"no labels for {len(missing)} image(s): missing {shown}{more} (or .tif)"
            )
        orphans = sorted(set(labels) - set(images))
        if orphans:
            warnings.warn(
                f"{label_dir}: {len(orphans)} label file(s) without an image ignored, e.g. {orphans[:3]}",
                stacklevel=2,
            )
        self.names = sorted(images)
        self.image_paths = [images[n] for n in self.names]
        self.label_paths = [labels[n] for n in self.names]
        classes_path = self.folder / "classes.json"
        self.classes = read_classes(classes_path) if classes_path.is_file() else dict(PANNUKE_CLASSES)
        self.manifest: dict[str, dict[str, Any]] = {}
        manifest_path = self.folder / "manifest.csv"
        if manifest_path.is_file():
            for row in read_manifest(manifest_path):
                name = str(row.get("name", ""))
                if name not in images:
                    raise InputError(manifest_path, f"names {name!r}, which has no image in images/")
                self.manifest[name] = row

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> NucleiSample:
        i = self._index(index)
        name = self.names[i]
        image = np.array(read_image(self.image_paths[i]))  # writable copy (PIL buffers are read-only)
        label_path = self.label_paths[i]
        lab = read_label_file(label_path)
        if lab.shape[:2] != image.shape[:2]:
            raise InputError(label_path, f"labels are {lab.shape[0]}x{lab.shape[1]} but image "
                             f"{self.image_paths[i].name} is {image.shape[0]}x{image.shape[1]}")
        inst, cls = validate_labels(lab[..., 0], lab[..., 1], image.shape, self.num_classes, label_path)
        meta: dict[str, Any] = {"source": self.source, **self.manifest.get(name, {})}
        meta.update(index=i, name=name, dataset="folder", path=str(self.folder))
        ignore = lab[..., 2] != 0 if lab.shape[-1] == 3 else None
        return NucleiSample(image, inst, cls, meta, ignore=ignore)


def write_folder(
    folder: str | Path,
    samples: Any,
    *,
    classes: Mapping[int, str] = PANNUKE_CLASSES,
    source: str | None = None,
    label_format: str = "npy",
    overwrite: bool = False,
) -> Path:
    """Write samples in the folder layout, all-or-nothing.

    Args:
        folder: the dataset root to create.
        samples: NucleiSamples, a NucleiDataset, or ``(images, inst, cls)`` stacked arrays.
        classes: the class table written to ``classes.json`` (labels are checked against it).
        source: ``meta["source"]`` for samples that have none (required then).
        label_format: ``"npy"`` (default) or ``"tif"``.
        overwrite: replace an existing ``folder`` (only once the new one is complete).
    """
    if label_format not in ("npy", "tif"):
        raise InputError("label_format", f"{label_format!r}; use 'npy' or 'tif'")
    items = as_samples(samples, source)
    names = sample_names(items)
    table = {int(k): str(v) for k, v in classes.items() if int(k) > 0}
    num_classes = max(table, default=0)
    checked = []
    for i, (s, name) in enumerate(zip(items, names, strict=True)):
        src = f"samples[{i}] ({name})"
        image = validate_image(s.image, src)
        inst, cls = validate_labels(s.inst, s.cls, image.shape, num_classes, src)
        channels = [inst, cls.astype(np.int32)]
        if s.ignore is not None:
            ignore = np.asarray(s.ignore)
            if ignore.shape != inst.shape:
                raise InputError(src, f"ignore mask is {ignore.shape}, labels {inst.shape}")
            channels.append(ignore.astype(np.int32))
        checked.append((image, np.stack(channels, axis=-1)))
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for (image, labels), name in zip(checked, names, strict=True):
            write_image(tmp / "images" / f"{name}.png", image)
            if label_format == "npy":
                save_npy(tmp / "labels" / f"{name}.npy", labels)
            else:
                _write_label_tif(tmp / "labels" / f"{name}.tif", labels)
        write_manifest(tmp / "manifest.csv", [s.meta for s in items], names)
        table_json = json.dumps({str(k): v for k, v in sorted(table.items())}, indent=1)
        atomic_write_text(tmp / "classes.json", table_json)
    return Path(folder)


def _write_label_tif(path: Path, labels: np.ndarray) -> None:
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, photometric="minisblack", planarconfig="contig", compression="zlib")

"""Paired H&E / IHC tiles (virtual staining): the BCI and MIST layouts.

BCI (HER2, 1024x1024 PNG)::

    <root>/HE/{train,test}/<name>.png
    <root>/IHC/{train,test}/<name>.png          same names as HE

MIST (HER2, Ki67, ER, PR; 1024x1024 JPEG; A = H&E, B = IHC)::

    <root>/<stain>/TrainValAB/{trainA,trainB,valA,valB}/<name>.jpg

Pairs are matched by file stem. A name present on one side only is an error listing a
few of them (``strict=True``, default) or is skipped with a warning (``strict=False``).
Both sides of a pair must have the same size (the layouts hold registered tiles).

A reader yields ``PairedSample(he uint8 (H,W,3), ihc uint8 (H,W,3), meta)`` from
:meth:`PairedDataset.read` and ``{"he", "ihc": float32 (3,H,W) in [0,1], "meta"}`` from
``dataset[i]`` (batch with :func:`studio.data.base.collate`). ``meta`` holds index, name,
split, stain and source ("real" unless a ``manifest.csv`` sidecar says otherwise).

The writers create the same layouts, all-or-nothing (a temporary sibling folder renamed
into place): :func:`write_bci` writes a whole BCI root, :func:`write_mist` one stain
folder of a MIST root. MIST's JPEG is lossy; pass ``suffix=".png"`` for bit-exact pairs
(the readers accept any image format).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from studio.data.base import Meta, atomic_folder, check_name, read_manifest, validate_image, write_manifest
from studio.errors import InputError
from studio.io import IMAGE_SUFFIXES, read_image, to_tensor, write_image

BCI_SPLITS = ("train", "test")
MIST_STAINS = ("HER2", "Ki67", "ER", "PR")
MIST_SPLITS = ("train", "val")
_SHOW = 5  # how many unmatched names an error lists


@dataclass
class PairedSample:
    """One registered H&E / IHC pair (uint8 RGB, same size)."""

    he: np.ndarray
    ihc: np.ndarray
    meta: Meta = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``he, ihc, meta = dataset.read(i)``."""
        return iter((self.he, self.ihc, self.meta))


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in found:
                other = found[path.stem].name
                raise InputError(path, f"two images named {path.stem!r} ({other}, {path.name})")
            found[path.stem] = path
    return found


def match_pairs(he_dir: Path, ihc_dir: Path, *, strict: bool = True) -> list[tuple[str, Path, Path]]:
    """Pair the images of two folders by file stem, reporting names found on one side only."""
    he, ihc = _images_by_stem(he_dir), _images_by_stem(ihc_dir)
    only_he = sorted(set(he) - set(ihc))
    only_ihc = sorted(set(ihc) - set(he))
    if only_he or only_ihc:
        parts = []
        if only_he:
            parts.append(f"{len(only_he)} H&E image(s) in {he_dir} have no IHC partner in {ihc_dir} "
                         f"(e.g. {', '.join(only_he[:_SHOW])})")
        if only_ihc:
            parts.append(f"{len(only_ihc)} IHC image(s) in {ihc_dir} have no H&E partner in {he_dir} "
                         f"(e.g. {', '.join(only_ihc[:_SHOW])})")
        msg = "; ".join(parts)
        if strict:
            raise InputError(he_dir.parent.parent, f"unmatched names: {msg}; pass strict=False to skip them")
        warnings.warn(f"unmatched names skipped: {msg}", stacklevel=3)
    names = sorted(set(he) & set(ihc))
    if not names:
        raise InputError(he_dir, f"no H&E/IHC pairs with matching names (checked {he_dir} and {ihc_dir})")
    return [(n, he[n], ihc[n]) for n in names]


class PairedDataset(Dataset):
    """Matched H&E/IHC image pairs from two folders; base of the BCI and MIST readers."""

    def __init__(self, he_dir: Path, ihc_dir: Path, base_meta: Meta, *, strict: bool, manifest: Path | None):
        self.pairs = match_pairs(he_dir, ihc_dir, strict=strict)
        self.base_meta = dict(base_meta)
        self.manifest: dict[str, Meta] = {}
        if manifest is not None and manifest.is_file():
            split = base_meta.get("split")
            for row in read_manifest(manifest):
                if row.get("split", split) == split:
                    self.manifest[str(row["name"])] = row

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> PairedSample:
        n = len(self.pairs)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} pairs")
        name, he_path, ihc_path = self.pairs[i]
        # read_image may hand back read-only buffers (PIL); samples are the caller's to edit.
        he, ihc = np.array(read_image(he_path)), np.array(read_image(ihc_path))
        if he.shape != ihc.shape:
            raise InputError(
                ihc_path,
                f"is {ihc.shape[0]}x{ihc.shape[1]} but its H&E partner {he_path.name} is "
                f"{he.shape[0]}x{he.shape[1]}; pairs must be registered tiles of one size",
            )
        meta = {**self.base_meta, **self.manifest.get(name, {})}
        meta.update(index=i, name=name, he_path=str(he_path), ihc_path=str(ihc_path))
        return PairedSample(he, ihc, meta)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.read(index)
        return {"he": to_tensor(pair.he)[0], "ihc": to_tensor(pair.ihc)[0], "meta": dict(pair.meta)}


class BCIDataset(PairedDataset):
    """BCI pairs of one split (``root/HE/<split>``, ``root/IHC/<split>``)."""

    def __init__(self, root: str | Path, split: str = "train", *, strict: bool = True, source: str = "real"):
        self.root = Path(root)
        if split not in BCI_SPLITS:
            raise InputError("split", f"{split!r}; BCI splits are {', '.join(BCI_SPLITS)}")
        if not self.root.is_dir():
            raise InputError(self.root, "no such folder")
        meta = {"source": source, "split": split, "stain": "HER2", "dataset": "bci"}
        super().__init__(self.root / "HE" / split, self.root / "IHC" / split, meta,
                         strict=strict, manifest=self.root / "manifest.csv")


def _mist_stain_dir(root: Path, stain: str) -> Path:
    if not root.is_dir():
        raise InputError(root, "no such folder")
    present = sorted(p.name for p in root.iterdir() if (p / "TrainValAB").is_dir())
    for name in present:
        if name.lower() == stain.lower():
            return root / name
    raise InputError(root / stain, f"no MIST stain folder <stain>/TrainValAB here; found {present or 'none'} "
                     f"(MIST stains: {', '.join(MIST_STAINS)})")


class MISTDataset(PairedDataset):
    """MIST pairs of one stain and split (``<stain>/TrainValAB/{split}A`` and ``{split}B``)."""

    def __init__(self, root: str | Path, stain: str, split: str = "train", *, strict: bool = True,
                 source: str = "real"):
        self.root = Path(root)
        if split not in MIST_SPLITS:
            raise InputError("split", f"{split!r}; MIST splits are {', '.join(MIST_SPLITS)}")
        stain_dir = _mist_stain_dir(self.root, stain)
        base = stain_dir / "TrainValAB"
        meta = {"source": source, "split": split, "stain": stain_dir.name, "dataset": "mist"}
        super().__init__(
            base / f"{split}A", base / f"{split}B", meta, strict=strict, manifest=base / "manifest.csv"
        )


# --------------------------------------------------------------------------- writing
def _as_pairs(items: Sequence[Any], split: str, source: str | None) -> list[PairedSample]:
    out = []
    for i, item in enumerate(items):
        where = f"{split}[{i}]"
        if isinstance(item, PairedSample):
            pair = PairedSample(item.he, item.ihc, dict(item.meta))
        elif isinstance(item, tuple) and len(item) in (2, 3):
            pair = PairedSample(item[0], item[1], dict(item[2]) if len(item) == 3 else {})
        else:
            raise InputError(where, f"is a {type(item).__name__}; expected PairedSample or (he, ihc[, meta])")
        he = validate_image(pair.he, f"{where} H&E")
        ihc = validate_image(pair.ihc, f"{where} IHC")
        if he.shape != ihc.shape:
            raise InputError(
                where, f"H&E is {he.shape[0]}x{he.shape[1]} but IHC is {ihc.shape[0]}x{ihc.shape[1]}"
            )
        pair.meta.setdefault("name", f"{i:05d}")
        check_name(str(pair.meta["name"]), where)
        if "source" not in pair.meta:
            if source is None:
                raise InputError(where, "meta has no 'source'; pass source='real' or 'synthetic'")
            pair.meta["source"] = source
        pair.meta["split"] = split
        out.append(pair)
    names = [str(p.meta["name"]) for p in out]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise InputError(split, f"duplicate pair names {dups[:_SHOW]}")
    return out


def _check_splits(splits: Mapping[str, Sequence[Any]], allowed: tuple[str, ...]) -> None:
    bad = [s for s in splits if s not in allowed]
    if bad or not splits:
        raise InputError("splits", f"{sorted(splits)}; give pairs for one or more of {', '.join(allowed)}")


def write_bci(
    root: str | Path,
    splits: Mapping[str, Sequence[Any]],
    *,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a BCI root (``{"train": pairs, "test": pairs}``) as PNG, all-or-nothing.

    Pairs are PairedSamples or ``(he, ihc[, meta])``; names come from ``meta["name"]``.
    A ``manifest.csv`` at the root records name, split, source and other meta.
    """
    _check_splits(splits, BCI_SPLITS)
    prepared = {split: _as_pairs(items, split, source) for split, items in splits.items()}
    with atomic_folder(root, overwrite=overwrite) as tmp:
        def folder_of(split: str, side: str) -> Path:
            return tmp / ("HE" if side == "A" else "IHC") / split

        metas, names = _write_pairs(prepared, folder_of, ".png", 95)
        write_manifest(tmp / "manifest.csv", metas, names)
    return Path(root)


def write_mist(
    root: str | Path,
    stain: str,
    splits: Mapping[str, Sequence[Any]],
    *,
    source: str | None = None,
    suffix: str = ".jpg",
    quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Write one MIST stain folder (``root/<stain>/TrainValAB``), all-or-nothing.

    ``splits`` maps "train"/"val" to pairs. JPEG (the MIST format) is lossy; ``suffix=".png"``
    keeps pixels exact. Other stains already under ``root`` are left alone.
    """
    if stain not in MIST_STAINS:
        raise InputError("stain", f"{stain!r}; MIST stains are {', '.join(MIST_STAINS)}")
    if suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError("suffix", f"{suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    _check_splits(splits, MIST_SPLITS)
    prepared = {split: _as_pairs(items, split, source) for split, items in splits.items()}
    with atomic_folder(Path(root) / stain, overwrite=overwrite) as tmp:
        base = tmp / "TrainValAB"
        metas, names = _write_pairs(prepared, lambda split, side: base / f"{split}{side}", suffix, quality)
        write_manifest(base / "manifest.csv", metas, names)
    return Path(root) / stain


def _write_pairs(prepared: Mapping[str, list[PairedSample]], folder_of, suffix: str,
                 quality: int) -> tuple[list[Meta], list[str]]:
    metas, names = [], []
    for split, pairs in prepared.items():
        for side in ("A", "B"):
            folder_of(split, side).mkdir(parents=True, exist_ok=True)
        for pair in pairs:
            name = str(pair.meta["name"])
            write_image(folder_of(split, "A") / f"{name}{suffix}", pair.he, quality=quality)
            write_image(folder_of(split, "B") / f"{name}{suffix}", pair.ihc, quality=quality)
            metas.append(pair.meta)
            names.append(name)
    return metas, names

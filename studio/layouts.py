"""Nuclei layouts for mask-conditioned synthesis: what a patch will contain, before any pixel exists.

A *layout* is an instance map plus a class map (the studio's label contract, see
:mod:`studio.data.base`). The rare-class generator draws layouts with a requested number
of nuclei of each rare class, renders pixels for them with the mask-conditioned diffusion
model, and writes the layouts unchanged as the labels: the labels are exact by
construction, the pixels are what has to be checked.

Two sources of layouts:

* **real label maps** (PanNuke / CoNIC / folder datasets, or the shipped hgsc_nest tile),
  edited DiffMix-style by :class:`LayoutEditor`: nuclei of other classes are *relabelled*
  to the rare class and *resampled* (their outline redrawn from the rare class's shape
  statistics, at the same place), new rare nuclei are *added* in free space near existing
  nuclei (cellular areas, not lumen or glass), and surplus rare nuclei are removed, until
  every requested class has exactly its requested count;
* **the tissue phantom's parametric layouts** (:func:`studio.data.phantom.sample_layout`),
  drawn with the requested class mix and then edited the same way.

Shapes come from :class:`NucleusStats`: per-class size and elongation measured from the
label maps themselves (scikit-image ``regionprops``), falling back to the phantom's
biological priors (in microns) for classes with too few examples, e.g. dead nuclei, which
the real tile does not contain. Overlaps are never created: a new outline may only claim
pixels that are background and at least ``gap`` pixels from every other nucleus.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from studio.errors import InputError

MIN_EXAMPLES = 5  # a class measured from fewer nuclei uses the phantom's prior


# --------------------------------------------------------------------------- layouts
@dataclass
class Layout:
    """One patch's labels: ``inst`` int32 ``(H, W)`` (0 background, ids 1..n contiguous),
    ``cls`` uint8 ``(H, W)`` (class code on each nucleus' pixels), where it came from and
    how it was edited."""

    inst: np.ndarray
    cls: np.ndarray
    source: str
    edits: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inst.shape)  # type: ignore[return-value]

    def classes_of(self) -> dict[int, int]:
        """Instance id -> class code."""
        fg = self.inst > 0
        ids, first = np.unique(self.inst[fg], return_index=True)
        return {int(i): int(c) for i, c in zip(ids, self.cls[fg][first], strict=True)}

    def counts(self) -> dict[int, int]:
        """Nuclei per class code (codes with none omitted)."""
        codes, n = np.unique(list(self.classes_of().values()) or np.zeros(0, int), return_counts=True)
        return {int(c): int(k) for c, k in zip(codes, n, strict=True)}

    def relabelled(self) -> Layout:
        """The same layout with ids renumbered 1..n (row-major order of first pixel)."""
        inst = np.zeros_like(self.inst, dtype=np.int32)
        ids = [int(i) for i in np.unique(self.inst) if i > 0]
        lut = np.zeros(int(self.inst.max()) + 1 if self.inst.size else 1, dtype=np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        inst = lut[self.inst]
        return Layout(inst.astype(np.int32), self.cls.astype(np.uint8), self.source, list(self.edits))


def check_layout(inst: np.ndarray, cls: np.ndarray, num_classes: int, source: str) -> None:
    """The label contract (one class per instance, classes in range, same shape), as a clear error."""
    from studio.data.base import validate_labels

    validate_labels(inst, cls, inst.shape, num_classes, source)


# --------------------------------------------------------------------------- statistics
@dataclass
class ClassShape:
    """Size and elongation of one class' nuclei, in pixels at the layouts' resolution.

    ``log_area_mean`` / ``log_area_sd``: log-normal area; ``aspect_lo`` / ``aspect_hi``:
    the 10th / 90th percentile of minor/major axis; ``n``: nuclei measured (0 = prior).
    """

    log_area_mean: float
    log_area_sd: float
    aspect_lo: float
    aspect_hi: float
    n: int

    def draw(self, rng: np.random.Generator) -> tuple[float, float]:
        """(major, minor) full axis lengths in pixels of one new nucleus."""
        area = math.exp(rng.normal(self.log_area_mean, self.log_area_sd))
        aspect = float(rng.uniform(self.aspect_lo, self.aspect_hi))
        major = math.sqrt(4 * area / (math.pi * aspect))
        return major, max(2.0, major * aspect)


class NucleusStats:
    """Per-class nucleus shape statistics (measured, or the phantom's priors)."""

    def __init__(self, shapes: Mapping[int, ClassShape], classes: Mapping[int, str], mpp: float):
        self.shapes = dict(shapes)
        self.classes = dict(classes)
        self.mpp = mpp

    @classmethod
    def priors(cls, classes: Mapping[int, str], mpp: float = 0.5) -> NucleusStats:
        """The phantom's biological priors (PanNuke classes; sizes in microns -> pixels)."""
        from studio.data.phantom import SPECS

        shapes = {}
        for code, name in classes.items():
            spec = _prior_spec(code, name)
            if spec is None:
                continue
            major = np.mean(SPECS[spec].major_um) / mpp
            aspect = float(np.mean(SPECS[spec].aspect))
            area = math.pi / 4 * major * major * aspect
            shapes[code] = ClassShape(math.log(area), 0.2, *SPECS[spec].aspect, n=0)
        return cls(shapes, classes, mpp)

    @classmethod
    def measure(cls, layouts: Sequence[tuple[np.ndarray, np.ndarray]], classes: Mapping[int, str],
                mpp: float = 0.5) -> NucleusStats:
        """Measure from ``(inst, cls)`` maps; classes with < :data:`MIN_EXAMPLES` use priors.

        Nuclei touching the patch border are skipped (their outline is cut).
        """
        from skimage.measure import regionprops

        areas: dict[int, list[float]] = {c: [] for c in classes}
        aspects: dict[int, list[float]] = {c: [] for c in classes}
        for inst, cl in layouts:
            h, w = inst.shape
            for region in regionprops(np.asarray(inst, dtype=np.int32)):
                y0, x0, y1, x1 = region.bbox
                if y0 == 0 or x0 == 0 or y1 == h or x1 == w or region.area < 4:
                    continue
                code = int(cl[region.coords[0, 0], region.coords[0, 1]])
                if code not in areas or region.axis_major_length <= 0:
                    continue
                areas[code].append(float(region.area))
                aspects[code].append(float(region.axis_minor_length / region.axis_major_length))
        prior = cls.priors(classes, mpp).shapes
        shapes = {}
        for code in classes:
            a = np.asarray(areas[code])
            if len(a) >= MIN_EXAMPLES:
                r = np.clip(np.asarray(aspects[code]), 0.1, 1.0)
                shapes[code] = ClassShape(float(np.log(a).mean()), float(max(np.log(a).std(), 0.05)),
                                          float(np.quantile(r, 0.1)), float(max(np.quantile(r, 0.9),
                                                                                np.quantile(r, 0.1) + 1e-3)),
                                          n=len(a))
            elif code in prior:
                shapes[code] = prior[code]
        return cls(shapes, classes, mpp)

    def shape(self, code: int) -> ClassShape:
        if code not in self.shapes:
            raise InputError("classes", f"no shape statistics for class {self.classes.get(code, code)!r} "
                                        "(not in the data and no prior)")
        return self.shapes[code]

    def to_dict(self) -> dict[str, Any]:
        return {"mpp": self.mpp, "classes": {self.classes[c]: {
            "mean_area_px": round(math.exp(s.log_area_mean), 1), "log_area_sd": round(s.log_area_sd, 3),
            "aspect": [round(s.aspect_lo, 3), round(s.aspect_hi, 3)], "measured_from": s.n}
            for c, s in sorted(self.shapes.items())}}


def _prior_spec(code: int, name: str) -> int | None:
    from studio.data.phantom import CLASS_CODES

    return CLASS_CODES.get(name.lower())


# --------------------------------------------------------------------------- drawing
def ellipse(shape: tuple[int, int], cy: float, cx: float, major: float, minor: float, theta: float) -> np.ndarray:
    """Boolean mask of a filled ellipse (full axis lengths, ``theta`` from the +x axis, y down)."""
    h, w = shape
    r = major / 2 + 1
    y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 2)
    mask = np.zeros(shape, dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    c, s = math.cos(theta), math.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c
    mask[y0:y1, x0:x1] = (u / (major / 2)) ** 2 + (v / (minor / 2)) ** 2 <= 1.0
    return mask


class LayoutEditor:
    """DiffMix-style edits that bring a layout to exact per-class counts.

    Args:
        stats: shape statistics used to draw rare-class outlines.
        gap: free pixels kept between nuclei.
        near: new nuclei are placed within this many pixels of an existing nucleus when
            the layout has any (cellular areas rather than lumen or glass).
        relabel_share: at most this share of the missing nuclei come from relabelling
            nuclei of other classes (the rest are added), so edited patches keep most of
            their original composition.
    """

    def __init__(self, stats: NucleusStats, *, gap: int = 2, near: int = 40, relabel_share: float = 0.5):
        self.stats = stats
        self.gap = gap
        self.near = near
        self.relabel_share = relabel_share

    def _free(self, inst: np.ndarray, keep_out: int | None = None) -> np.ndarray:
        """Pixels a new outline may claim: background, ``gap`` px from every other nucleus."""
        taken = inst > 0 if keep_out is None else (inst > 0) & (inst != keep_out)
        return ~ndi.binary_dilation(taken, iterations=self.gap) if self.gap > 0 else ~taken

    def _outline(self, code: int, shape: tuple[int, int], cy: float, cx: float, rng: np.random.Generator,
                 free: np.ndarray) -> np.ndarray | None:
        """A drawn outline of class ``code`` at (cy, cx) clipped to ``free``; None if too little fits."""
        major, minor = self.stats.shape(code).draw(rng)
        mask = ellipse(shape, cy, cx, major, minor, float(rng.uniform(-math.pi / 2, math.pi / 2)))
        want = int(mask.sum())
        mask &= free
        if want == 0 or mask.sum() < 0.85 * want:
            return None
        labels, n = ndi.label(mask)
        if n > 1:  # keep the largest piece only: one nucleus, one connected outline
            sizes = ndi.sum(mask, labels, range(1, n + 1))
            mask = labels == (int(np.argmax(sizes)) + 1)
        return mask

    def add(self, layout: Layout, code: int, n: int, rng: np.random.Generator) -> int:
        """Add up to ``n`` new nuclei of ``code`` in free space; returns how many were placed."""
        inst, cls = layout.inst, layout.cls
        shape = layout.shape
        placed = 0
        r = math.sqrt(math.exp(self.stats.shape(code).log_area_mean) / math.pi)
        for _ in range(n):
            free = self._free(inst)
            margin = max(1, int(r))
            candidates = ndi.binary_erosion(free, iterations=margin)
            if (inst > 0).any() and self.near > 0:
                close = ndi.distance_transform_edt(inst == 0) <= self.near
                if (candidates & close).any():
                    candidates &= close
            ys, xs = np.nonzero(candidates)
            if len(ys) == 0:
                break
            for _attempt in range(12):
                k = int(rng.integers(len(ys)))
                mask = self._outline(code, shape, ys[k] + 0.5, xs[k] + 0.5, rng, free)
                if mask is not None:
                    new_id = int(inst.max()) + 1
                    inst[mask] = new_id
                    cls[mask] = code
                    placed += 1
                    break
            else:
                break
        if placed:
            layout.edits.append(f"add {placed} {self.stats.classes.get(code, code)}")
        return placed

    def relabel(self, layout: Layout, code: int, n: int, rng: np.random.Generator,
                protect: Sequence[int] = ()) -> int:
        """Turn up to ``n`` nuclei of other classes into ``code``, redrawing each outline from
        the class' statistics at the same centroid; ``protect``: classes never relabelled."""
        inst, cls = layout.inst, layout.cls
        owners = layout.classes_of()
        pool = [i for i, c in owners.items() if c != code and c not in protect]
        rng.shuffle(pool)
        done = 0
        for nid in pool:
            if done >= n:
                break
            ys, xs = np.nonzero(inst == nid)
            if len(ys) == 0 or ys.min() == 0 or xs.min() == 0 or ys.max() == inst.shape[0] - 1 \
                    or xs.max() == inst.shape[1] - 1:
                continue  # border nuclei keep their (cut) outline and class
            mask = self._outline(code, layout.shape, ys.mean() + 0.5, xs.mean() + 0.5, rng, self._free(inst, nid))
            if mask is None:
                continue
            inst[inst == nid] = 0
            cls[(inst == 0) & (cls > 0)] = 0
            inst[mask] = nid
            cls[mask] = code
            done += 1
        if done:
            layout.edits.append(f"relabel {done} -> {self.stats.classes.get(code, code)}")
        return done

    def remove(self, layout: Layout, code: int, n: int, rng: np.random.Generator) -> int:
        """Delete ``n`` nuclei of ``code`` (surplus over the requested count)."""
        ids = [i for i, c in layout.classes_of().items() if c == code]
        rng.shuffle(ids)
        gone = ids[:n]
        if gone:
            drop = np.isin(layout.inst, gone)
            layout.inst[drop] = 0
            layout.cls[drop] = 0
            layout.edits.append(f"remove {len(gone)} {self.stats.classes.get(code, code)}")
        return len(gone)

    def exact_counts(self, layout: Layout, targets: Mapping[int, int], rng: np.random.Generator) -> Layout | None:
        """Edit a copy of ``layout`` so class ``c`` has exactly ``targets[c]`` nuclei.

        Returns None when the patch has no room for them (the caller draws another base).
        """
        out = Layout(layout.inst.astype(np.int32).copy(), layout.cls.astype(np.uint8).copy(), layout.source,
                     list(layout.edits))
        protect = list(targets)
        for code, want in targets.items():
            have = out.counts().get(code, 0)
            if have > want:
                self.remove(out, code, have - want, rng)
            elif have < want:
                missing = want - have
                relabel = int(round(missing * self.relabel_share))
                missing -= self.relabel(out, code, relabel, rng, protect=protect)
                missing -= self.add(out, code, missing, rng)
                if missing > 0:
                    return None
        out = out.relabelled()
        counts = out.counts()
        if any(counts.get(c, 0) != n for c, n in targets.items()):
            return None
        return out


# Where each class lives: the phantom preset that gives its nuclei their own surroundings.
# Why it matters: the mask-conditioned generator draws a nucleus like its neighbours; connective
# nuclei added among lymphocytes come out lymphocyte-like (typed connective 33 % by the shipped
# segmenter), on stroma layouts spindle-shaped (94 %; bench/synthetic_audit.py, README).
HOME_TISSUE: dict[str, str] = {"connective": "stroma", "inflammatory": "inflamed", "neoplastic": "tumor",
                               "epithelial": "glandular", "dead": "necrotic"}


def home_tissue(class_names: Sequence[str]) -> str:
    """The phantom preset for drawing ``class_names``: their shared home tissue, else "mixed"."""
    homes = {HOME_TISSUE.get(name.lower(), "mixed") for name in class_names}
    return homes.pop() if len(homes) == 1 else "mixed"


# --------------------------------------------------------------------------- sources
class LayoutSource:
    """Base label maps to edit: crops of a dataset, of the shipped tile, or phantom layouts.

    Args:
        name: a dataset folder (PanNuke / CoNIC / folder layout), ``"hgsc_nest"`` (the
            shipped labelled tile; ``split`` picks its train or held-out band) or
            ``"phantom"`` (parametric layouts; ``tissue`` picks the preset).
        size: patch side in pixels.
        classes: the class table the layouts are coded in (the model's; CoNIC datasets are
            mapped to PanNuke codes, see :data:`CONIC_TO_PANNUKE`).
    """

    def __init__(self, name: str, size: int, classes: Mapping[int, str], *, split: str = "train",
                 tissue: str = "tumor", mpp: float = 0.5):
        self.name = str(name)
        self.size = int(size)
        self.classes = dict(classes)
        self.split = split
        self.tissue = tissue
        self.mpp = mpp
        self._maps: list[tuple[np.ndarray, np.ndarray, str]] | None = None
        if self.name != "phantom":
            self._maps = self._load_maps()
            if not self._maps:
                raise InputError(self.name, f"holds no labelled patch of at least {size}x{size} pixels")

    def _load_maps(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
        if self.name == "hgsc_nest":
            from studio.data.crops import hgsc_nest_crops
            from studio.data.splits import split_bounds

            y0, y1, x0, x1 = split_bounds("hgsc_nest", self.split)
            region = (y0, y1 - self.size + 1, x0, x1 - self.size + 1)
            crops = hgsc_nest_crops(self.size, max(16, self.size // 4), region=region)
            return [(c.inst, c.cls, f"hgsc_nest[{self.split}] y={c.meta.get('y')} x={c.meta.get('x')}")
                    for c in crops]
        from studio.data.registry import open_dataset

        path = Path(self.name)
        dataset = open_dataset(path)
        table = dataset.classes
        mapping = _class_mapping(table, self.classes, path)
        maps = []
        for i in range(len(dataset)):
            s = dataset.read(i)
            h, w = s.inst.shape
            if h < self.size or w < self.size:
                continue
            cls = mapping[s.cls.astype(np.intp)]
            for y in range(0, h - self.size + 1, self.size):
                for x in range(0, w - self.size + 1, self.size):
                    maps.append((s.inst[y:y + self.size, x:x + self.size].copy(),
                                 cls[y:y + self.size, x:x + self.size].copy(),
                                 f"{path.name}[{s.meta.get('name', i)}] y={y} x={x}"))
        return maps

    def stats(self) -> NucleusStats:
        """Shape statistics of this source's nuclei (phantom: the priors)."""
        if self._maps is None:
            return NucleusStats.priors(self.classes, self.mpp)
        return NucleusStats.measure([(i, c) for i, c, _ in self._maps], self.classes, self.mpp)

    def draw(self, rng: np.random.Generator) -> Layout:
        """One base layout (a random crop, flipped / rotated; or a fresh phantom layout)."""
        if self._maps is None:
            from studio.data.phantom import sample_layout

            seed = int(rng.integers(0, 2**31 - 1))
            lay = sample_layout(self.size, seed=seed, mpp=self.mpp, tissue=self.tissue)
            return Layout(lay.instance_map.copy(), lay.class_map.copy(), f"phantom tissue={self.tissue} seed={seed}")
        inst, cls, where = self._maps[int(rng.integers(len(self._maps)))]
        k = int(rng.integers(4))
        inst, cls = np.rot90(inst, k), np.rot90(cls, k)
        if rng.random() < 0.5:
            inst, cls = inst[:, ::-1], cls[:, ::-1]
        return Layout(np.ascontiguousarray(inst, dtype=np.int32), np.ascontiguousarray(cls, dtype=np.uint8),
                      f"{where} rot90={k}")

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
        return iter(self._maps or [])


# CoNIC -> PanNuke codes for conditioning: the inflammatory subtypes are inflammatory.
CONIC_TO_PANNUKE: dict[str, str] = {"neutrophil": "inflammatory", "lymphocyte": "inflammatory",
                                    "plasma": "inflammatory", "eosinophil": "inflammatory",
                                    "epithelial": "epithelial", "connective": "connective"}


def _class_mapping(table: Mapping[int, str], model: Mapping[int, str], source: str | Path) -> np.ndarray:
    """A lookup table from the dataset's class codes to the model's (by class name)."""
    by_name = {n.lower(): c for c, n in model.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for code, name in table.items():
        key = name.lower()
        key = key if key in by_name else CONIC_TO_PANNUKE.get(key, key)
        if key not in by_name:
            raise InputError(source, f"dataset class {name!r} (code {code}) is not one of the model's classes "
                                     f"{sorted(model.values())}")
        lut[code] = by_name[key]
    return lut


# --------------------------------------------------------------------------- names
def parse_classes(text: str | Sequence[str], classes: Mapping[int, str]) -> list[int]:
    """``"dead,inflammatory"`` -> codes of the table, with a clear error for unknown names."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise InputError("--classes", "name at least one class")
    by_name = {n.lower(): c for c, n in classes.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError("--classes", f"unknown class {', '.join(map(repr, unknown))}; "
                                      f"choose from {', '.join(classes.values())}")
    if len(set(names)) != len(names):
        raise InputError("--classes", "a class is named twice")
    return [by_name[n] for n in names]


def stats_json(stats: NucleusStats) -> str:
    return json.dumps(stats.to_dict(), indent=2)

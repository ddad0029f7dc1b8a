"""Does synthetic data (or stain augmentation, or test-time normalization) help the
nucleus segmenter? A controlled experiment: same splits, same seeds, only the training
data or the evaluation pre-processing changes.

    histostudio experiment augment --real hgsc_nest --synthetic phantom --seeds 3 --out runs/exp

(The command calls :func:`run_augment_experiment`; ``bench/augment_experiment.py`` is
the reproducible experiment on the shipped data.)

**Data and splits.** ``real`` and ``synthetic`` are dataset folders (any layout
:func:`studio.data.registry.open_dataset` reads) or built-ins:

* ``hgsc_nest`` (real only): the shipped labelled 1500x1500 tile. Training uses the
  256x256 crops of its *train* region (crop origins every ``stride`` = 128 px whose crops
  end left of x = 1125, as the segmenter recipe); the **held-out set is the shipped
  held-out band** (x >= 1125, :mod:`studio.data.splits`) cut into six non-overlapping
  250x375 tiles, so every held-out pixel is scored exactly once and none was seen in
  training.
* ``phantom``: procedural tiles with exact labels
  (:func:`studio.data.phantom_dataset.phantom_samples`). As ``real`` it is split like a
  folder; as ``synthetic`` its class mix favours ``scarce_class`` when one is given.

Any other real dataset is split by tile with a seeded permutation (``split_seed``; tiles
that share a ``parent`` image in their metadata stay on one side); a ``heldout`` dataset
may be given instead. The split is made once and recorded (tile names) in
``results.json``; every variant and seed uses exactly these tiles.

**Scarce class** (``scarce_class``, ``scarce_keep``). To study a class the real training
set barely has, the real *training* tiles are thinned until at most ``scarce_keep`` of the
class' distinct nuclei remain: tiles are visited from the fewest to the most nuclei of
the class (ties in a seeded order) and a tile is kept when the distinct nuclei of the
class kept so far, with its own, stay within the budget; tiles without the class are
always kept. Dropping whole tiles is what "we have few examples" means in practice: the
images stay untouched (erasing nuclei would leave unlabelled nuclei in the pictures, and
the HoVer-Net loss has no "ignore" label to mask them), at the price of also losing some
nuclei of other classes, which is recorded. Nuclei are counted once even when
overlapping crops share them (hgsc_nest crops are keyed by the parent tile's ids). The
held-out set is never thinned.

**Variants** (each trained ``seeds`` times, seeds 0..K-1, the same seeds for every
variant, so runs are paired; :func:`training.segmenter.train` with ``steps`` steps):

* ``baseline``: real training tiles only, no stain augmentation;
* ``synthetic``: real + synthetic tiles, ``synthetic_ratio`` of the batches synthetic on
  average (:meth:`~studio.data.base.ConcatNucleiDataset.sampling_weights`); every tile
  keeps its ``meta["source"]``, training never looks at it;
* ``stain_augment`` (``stain_augment=True``): real only, with
  :class:`~studio.stain.augment.StainAugment` on every batch;
* ``tta_<method>`` (``tta_normalize``): the *baseline* models, evaluated on held-out tiles
  stain-normalized per tile with ``method`` fitted to the real training tiles (those the
  baseline trained on, after any thinning); no extra training.

**Evaluation** on the held-out tiles with the CoNIC definitions (:mod:`studio.metrics`):
PQ (binary, per tile, averaged), mPQ+ (per-class TP/FP/FN/IoU summed over tiles) and
per-class PQ, multi-class count R² (:func:`~studio.metrics.counts_r2` of
:func:`~studio.metrics.class_counts` per tile), and detection F1 (centroids matched
within 8 px, counts summed over tiles). mPQ+ and R² average over the classes present in
the held-out truth (hgsc_nest has no dead or epithelial nuclei: a class that cannot be
found would add a constant 0 to every variant); ``mpq_plus_all_classes`` keeps CoNIC's
literal mean over every class. The classical threshold-watershed segmentation
(:func:`studio.nuclei.threshold_watershed_baseline`, no classes) is scored alongside for
reference.

**Outputs** in ``out``: ``results.json`` (settings, splits, data counts, every run's
metrics and timings, summaries), ``results.md`` (mean ± sd over seeds per variant, and
the paired differences to the baseline), ``results.png`` (per-class PQ and mPQ+ per
variant with ±sd error bars), ``data/`` (the exact training and held-out tiles, folder
layout) and ``runs/<variant>/seed_<k>/`` (each training run; ``final/`` is the model).
Files are written atomically; ``results.*`` are rewritten after every run, so an
interrupted experiment leaves the runs done so far. Each run's console output goes to its
``train.log``; its checkpoints (optimizer state) are deleted once the model is saved.

**Step budget.** ``DEFAULT_STEPS`` is sized on a 2-core CPU already busy with other
jobs (load ~2.8): the segmenter recipe's model (widths 24-48-96-192, batch 8 of 128 px
crops, one thread) took 2.5-2.6 s per step inside :func:`training.segmenter.train`, plus
~5 s of set-up, validation and saving per run and ~4.5 s to segment and score the six
held-out tiles. The default experiment on shipped data (2 variants x 3 seeds x 100 steps)
therefore takes about 6 x (255 + 5 + 4.5) s = 26.5 min, less on an idle machine. That
budget buys a weakly trained model: compare variants with the paired differences, and
scale up with ``steps`` and ``train_options`` (e.g. ``batch_size``) on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import InputError, OutputError

DEFAULT_STEPS = 100
DEFAULT_SCARCE_KEEP = 0.2
DEFAULT_HELDOUT_FRACTION = 0.25
DETECTION_RADIUS = 8.0
BUILTINS = ("hgsc_nest", "phantom")
PHANTOM_REAL_DEFAULTS = {"n": 48, "seed": 1000, "size": 256}
PHANTOM_SYNTHETIC_DEFAULTS = {"n": 48, "seed": 50_000, "size": 256}
SCARCE_MIX_SHARE = 0.6  # share of the scarce class in a synthetic phantom's class mix
HGSC_BAND_ROWS = 6  # the held-out band (1500 x 375) is cut into this many tiles

Progress = Callable[[dict[str, Any]], None]


# =========================================================================== data
def _as_spec(value: Any, role: str) -> dict[str, Any]:
    """``"hgsc_nest"`` / ``"phantom"`` / a folder / a mapping -> a spec dict."""
    arg = f"--{role}"
    if isinstance(value, Mapping):
        spec = dict(value)
        if ("name" in spec) == ("path" in spec):
            raise InputError(arg, f"{spec}: give either 'name' ({' or '.join(BUILTINS)}) or 'path'")
        if "name" in spec and spec["name"] not in BUILTINS:
            raise InputError(arg, f"unknown built-in dataset {spec['name']!r}; built-ins: {', '.join(BUILTINS)}")
        return spec
    if isinstance(value, (str, Path)):
        text = str(value)
        if text in BUILTINS:
            return {"name": text}
        path = Path(text).expanduser()
        if path.exists():
            return {"path": str(path)}
        raise InputError(text, f"no such dataset folder, and not a built-in dataset ({', '.join(BUILTINS)})")
    raise InputError(arg, f"got {type(value).__name__}; expected a dataset folder or {' / '.join(BUILTINS)}")


def _describe(spec: Mapping[str, Any]) -> Any:
    spec = {k: v for k, v in spec.items()}
    return spec["name"] if set(spec) == {"name"} else spec


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], role: str) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise InputError(f"--{role}", f"unknown options {unknown} for {_describe(spec)}; known: {sorted(allowed)}")


def _read_all(dataset: Any, role: str) -> list[Any]:
    samples = [dataset.read(i) for i in range(len(dataset))]
    if not samples:
        raise InputError(f"--{role}", "the dataset has no tiles")
    return samples


def _open_folder(spec: Mapping[str, Any], role: str, source: str) -> tuple[list[Any], dict[int, str]]:
    from studio.data.registry import open_dataset

    _check_keys(spec, ("path", "layout"), role)
    data = open_dataset(spec["path"], spec.get("layout"), source=source)
    return _read_all(data, role), dict(data.classes)


def _phantoms(spec: Mapping[str, Any], defaults: Mapping[str, Any], role: str,
              class_mix: Mapping[Any, float] | None = None) -> list[Any]:
    from studio.data.phantom_dataset import phantom_samples

    _check_keys(spec, ("name", "n", "seed", "size", "class_mix", "tissue", "stain_variation"), role)
    opts = {**defaults, **{k: v for k, v in spec.items() if k != "name"}}
    if class_mix is not None and "class_mix" not in spec:
        opts["class_mix"] = dict(class_mix)
    n = opts.pop("n")
    return phantom_samples(int(n), **opts)


def _hgsc_train_crops(spec: Mapping[str, Any], role: str) -> tuple[list[Any], np.ndarray]:
    """Train-region crops of hgsc_nest and the parent instance map (for nucleus keys)."""
    from studio.data.crops import hgsc_nest_crops
    from studio.data.samples import load_hgsc_nest_labels
    from training.segmenter import HGSC_TRAIN_REGION

    _check_keys(spec, ("name", "stride"), role)
    stride = int(spec.get("stride", 128))
    if stride < 1:
        raise InputError(f"--{role}", f"stride {stride}; must be positive")
    crops = hgsc_nest_crops(256, stride, region=HGSC_TRAIN_REGION)
    return crops, load_hgsc_nest_labels()[1]


def _hgsc_heldout_tiles() -> list[Any]:
    """The held-out band of hgsc_nest cut into non-overlapping tiles (every pixel once)."""
    from studio.data.base import NucleiSample
    from studio.data.crops import HGSC_TISSUE, relabel_contiguous
    from studio.data.samples import load_hgsc_nest_labels
    from studio.data.splits import split_bounds

    image, inst, cls = load_hgsc_nest_labels()
    y0, y1, x0, x1 = split_bounds("hgsc_nest", "heldout")
    edges = np.linspace(y0, y1, HGSC_BAND_ROWS + 1).round().astype(int)
    tiles = []
    for top, bottom in zip(edges[:-1], edges[1:], strict=True):
        meta = {"name": f"hgsc_nest_y{top:04d}_x{x0:04d}", "source": "real", "tissue": HGSC_TISSUE,
                "parent": "hgsc_nest", "y": int(top), "x": int(x0)}
        tiles.append(NucleiSample(np.array(image[top:bottom, x0:x1]), relabel_contiguous(inst[top:bottom, x0:x1]),
                                  np.array(cls[top:bottom, x0:x1]), meta))
    return tiles


def _split_by_tile(samples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded train / held-out split; tiles sharing ``meta['parent']`` stay together."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        key = str(s.meta.get("parent", s.meta.get("name", i)))
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    if len(keys) < 2:
        raise InputError("--heldout", f"the real dataset has {len(keys)} independent tile(s); a train / held-out "
                                      "split needs at least 2 (or give a held-out dataset)")
    order = np.random.default_rng(seed).permutation(len(keys))
    n_held = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
    held = {keys[j] for j in order[:n_held]}
    train = [s for k in keys if k not in held for s in (samples[i] for i in groups[k])]
    heldout = [s for k in keys if k in held for s in (samples[i] for i in groups[k])]
    return train, heldout


def _class_code(value: Any, classes: Mapping[int, str]) -> int:
    if isinstance(value, str) and not value.isdigit():
        for code, name in classes.items():
            if name.lower() == value.strip().lower():
                return int(code)
    else:
        with contextlib.suppress(TypeError, ValueError):
            code = int(value)
            if code in classes:
                return code
    names = ", ".join(f"{c} {n}" for c, n in sorted(classes.items()))
    raise InputError("--scarce-class", f"{value!r} is not a class of the real data ({names})")


def _nucleus_keys(sample: Any, code: int, parents: Mapping[str, np.ndarray]) -> set[tuple[str, int]]:
    """Distinct nuclei of class ``code`` in a tile, keyed so overlapping crops agree."""
    mask = np.asarray(sample.cls) == code
    if not mask.any():
        return set()
    parent = sample.meta.get("parent")
    if parent in parents and "y" in sample.meta and "x" in sample.meta:
        h, w = mask.shape
        y, x = int(sample.meta["y"]), int(sample.meta["x"])
        ids = np.unique(parents[parent][y:y + h, x:x + w][mask])
        return {(str(parent), int(i)) for i in ids if i}
    ids = np.unique(np.asarray(sample.inst)[mask])
    return {(str(sample.meta.get("name")), int(i)) for i in ids if i}


def _distinct_counts(samples: Sequence[Any], classes: Mapping[int, str],
                     parents: Mapping[str, np.ndarray]) -> dict[str, int]:
    out = {}
    for code, name in sorted(classes.items()):
        keys: set[tuple[str, int]] = set()
        for s in samples:
            keys |= _nucleus_keys(s, code, parents)
        out[name] = len(keys)
    return out


def make_scarce(samples: Sequence[Any], code: int, keep: float, seed: int,
                parents: Mapping[str, np.ndarray] | None = None) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Drop training tiles until at most ``keep`` of class ``code``'s distinct nuclei remain.

    Tiles are visited from the fewest to the most nuclei of the class (ties in a seeded
    random order); tiles without the class are always kept; a tile with it is kept while
    the distinct nuclei kept so far, with its own, fit the budget ``round(keep * total)``.

    Returns:
        ``(kept tiles, dropped tiles, summary)``.
    """
    parents = parents or {}
    keys = [_nucleus_keys(s, code, parents) for s in samples]
    total = len(set().union(*keys)) if keys else 0
    budget = int(round(keep * total))
    tie = np.random.default_rng(seed).random(len(samples))
    order = sorted(range(len(samples)), key=lambda j: (len(keys[j]), tie[j]))
    kept_keys: set[tuple[str, int]] = set()
    keep_idx = set()
    for j in order:
        if not keys[j]:
            keep_idx.add(j)
        elif len(kept_keys | keys[j]) <= budget:
            kept_keys |= keys[j]
            keep_idx.add(j)
    kept = [s for j, s in enumerate(samples) if j in keep_idx]
    dropped = [s for j, s in enumerate(samples) if j not in keep_idx]
    summary = {"class": code, "keep": keep, "nuclei_before": total, "budget": budget, "nuclei_after": len(kept_keys),
               "tiles_before": len(samples), "tiles_after": len(kept),
               "method": "drop whole training tiles (fewest nuclei of the class first, seeded ties) until at most "
                         "keep x the class' distinct nuclei remain; held-out tiles untouched"}
    return kept, dropped, summary


def _class_mix_favouring(code: int, present: Sequence[int]) -> dict[int, float]:
    others = [c for c in present if c != code]
    mix = {code: SCARCE_MIX_SHARE}
    for c in others:
        mix[c] = (1.0 - SCARCE_MIX_SHARE) / len(others)
    if not others:
        mix[code] = 1.0
    return mix


def _relabel_source(samples: Sequence[Any], default: str) -> list[Any]:
    """Synthetic tiles keep their own non-"real" source; unlabeled or "real" ones get ``default``."""
    from studio.data.base import NucleiSample

    out = []
    for s in samples:
        src = str(s.meta.get("source") or "")
        meta = dict(s.meta)
        meta["source"] = src if src and src != "real" else default
        out.append(NucleiSample(s.image, s.inst, s.cls, meta))
    return out


def _write(folder: Path, samples: Sequence[Any], classes: Mapping[int, str], role: str) -> Path:
    from studio.data.base import NucleiSample
    from studio.data.folder import write_folder

    clean = []
    for s in samples:
        meta = {k: v for k, v in s.meta.items() if k not in ("index", "dataset", "path")
                and not isinstance(v, (list, tuple, dict, np.ndarray))}
        meta["role"] = role
        clean.append(NucleiSample(s.image, s.inst, s.cls, meta))
    return write_folder(folder, clean, classes=classes, overwrite=True)


def _heldout_truth(samples: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(np.ascontiguousarray(s.image), np.asarray(s.inst), np.asarray(s.cls)) for s in samples]


@dataclass
class _Data:
    """The experiment's tiles: real train (after scarcity) / held-out, and synthetic."""

    train: list[Any]
    heldout: list[Any]
    classes: dict[int, str]
    split_method: str
    split_seed: int
    parents: dict[str, np.ndarray] = field(default_factory=dict)
    held_spec: dict[str, Any] | None = None
    dropped: list[Any] = field(default_factory=list)
    scarcity: dict[str, Any] | None = None
    synthetic: list[Any] = field(default_factory=list)
    synthetic_mix: Any = None
    counts_before: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.heldout:
            raise InputError("--heldout", "the held-out set is empty")
        if not self.train:
            raise InputError("--real", "no training tiles are left after the split")
        if not self.evaluated:
            raise InputError("--heldout", "the held-out tiles hold no classified nuclei; nothing to score")
        self.counts_before = _distinct_counts(self.train, self.classes, self.parents)

    @property
    def evaluated(self) -> list[int]:
        """Class codes present in the held-out truth."""
        return sorted({int(c) for s in self.heldout for c in np.unique(np.asarray(s.cls)) if c})

    def splits(self) -> dict[str, Any]:
        def names(items: Sequence[Any]) -> list[str]:
            return [str(s.meta.get("name")) for s in items]

        return {"method": self.split_method, "split_seed": self.split_seed, "real_train": names(self.train),
                "heldout": names(self.heldout), "synthetic": names(self.synthetic),
                "dropped_for_scarcity": names(self.dropped)}

    def info(self, folders: Mapping[str, Path]) -> dict[str, Any]:
        distinct = _distinct_counts(self.heldout, self.classes, self.parents)
        held = {self.classes[c]: distinct[self.classes[c]] for c in self.evaluated}
        roles = (("real_train", self.train), ("synthetic", self.synthetic), ("heldout", self.heldout))
        return {
            "tiles": {"real_train": len(self.train), "synthetic": len(self.synthetic), "heldout": len(self.heldout),
                      "dropped_for_scarcity": len(self.dropped)},
            "nuclei": {"real_train_before_scarcity": self.counts_before,
                       "real_train": _distinct_counts(self.train, self.classes, self.parents),
                       "synthetic": _distinct_counts(self.synthetic, self.classes, {}), "heldout": held,
                       "heldout_instances": int(sum(int(np.asarray(s.inst).max(initial=0)) for s in self.heldout))},
            "synthetic_class_mix": self.synthetic_mix,
            "sources": {role: dict(Counter(str(s.meta.get("source")) for s in items)) for role, items in roles},
            "folders": {k: str(v) for k, v in folders.items()},
        }


def _load_real(spec: Mapping[str, Any], heldout: Any, split_seed: int) -> _Data:
    """Real tiles split into train / held-out (see the module docstring)."""
    held_spec = None
    fraction = DEFAULT_HELDOUT_FRACTION
    if isinstance(heldout, str) and not Path(heldout).expanduser().exists():
        with contextlib.suppress(ValueError):
            heldout = float(heldout)
    if heldout is not None:
        if isinstance(heldout, (int, float)) and not isinstance(heldout, bool):
            fraction = float(heldout)
            if not 0.0 < fraction < 1.0:
                raise InputError("--heldout", f"{heldout}; a held-out fraction must be in (0, 1)")
        else:
            held_spec = _as_spec(heldout, "heldout")
    parents: dict[str, np.ndarray] = {}
    held: list[Any] = []
    if spec.get("name") == "hgsc_nest":
        if heldout is not None and held_spec is None:
            raise InputError("--heldout", "hgsc_nest has a fixed held-out band (x >= 1125); a fraction does not "
                                          "apply (give a held-out dataset or leave it out)")
        train, parents["hgsc_nest"] = _hgsc_train_crops(spec, "real")
        classes = dict(_pannuke_classes())
        method = (f"region: hgsc_nest train-region crops; held-out = its held-out band (x >= 1125) in "
                  f"{HGSC_BAND_ROWS} non-overlapping tiles")
        if held_spec is None:
            held = _hgsc_heldout_tiles()
    else:
        if spec.get("name") == "phantom":
            samples = [_with_meta(s, source="real-phantom") for s in _phantoms(spec, PHANTOM_REAL_DEFAULTS, "real")]
            classes = dict(_pannuke_classes())
        else:
            samples, classes = _open_folder(spec, "real", "real")
        train = samples
        if held_spec is None:
            train, held = _split_by_tile(samples, fraction, split_seed)
            method = (f"seeded by tile (seed {split_seed}, {fraction:g} held out; tiles sharing a parent image "
                      "stay together)")
    if held_spec is not None:
        if held_spec.get("name") == "hgsc_nest":
            _check_keys(held_spec, ("name",), "heldout")
            held, held_classes = _hgsc_heldout_tiles(), dict(_pannuke_classes())
        elif held_spec.get("name") == "phantom":
            held = _phantoms(held_spec, {**PHANTOM_REAL_DEFAULTS, "seed": 90_000}, "heldout")
            held_classes = dict(_pannuke_classes())
        else:
            held, held_classes = _open_folder(held_spec, "heldout", "real")
        if held_classes != classes:
            raise InputError("--heldout", f"class table {held_classes} differs from the real data's {classes}")
        method = f"given held-out dataset {json.dumps(_describe(held_spec))}; every real tile trains"
    return _Data(train=train, heldout=held, classes=classes, split_method=method, split_seed=split_seed,
                 parents=parents, held_spec=held_spec)


def _load_synthetic(data: _Data, spec: Mapping[str, Any], scarce_code: int | None) -> None:
    """Synthetic tiles (phantoms favour the scarce class); class tables must match."""
    if spec.get("name") == "phantom":
        present = [c for c in sorted(data.classes) if data.counts_before[data.classes[c]]]
        mix = _class_mix_favouring(scarce_code, present) if scarce_code is not None else None
        syn = _phantoms(spec, PHANTOM_SYNTHETIC_DEFAULTS, "synthetic", mix)
        syn_classes = dict(_pannuke_classes())
        if "class_mix" in spec:
            data.synthetic_mix = spec["class_mix"]
        else:
            data.synthetic_mix = {data.classes[c]: round(w, 4) for c, w in mix.items()} if mix else \
                "phantom tissue presets"
    else:
        syn, syn_classes = _open_folder(spec, "synthetic", "synthetic")
    if syn_classes != data.classes:
        raise InputError("--synthetic", f"class table {syn_classes} differs from the real data's {data.classes}; "
                                        "remap classes first")
    data.synthetic = _relabel_source(syn, "synthetic")


def class_census(real: str | Path | Mapping[str, Any] = "hgsc_nest",
                 heldout: float | str | Path | Mapping[str, Any] | None = None, split_seed: int = 0) -> dict[str, Any]:
    """Distinct nuclei per class in the real training tiles and the held-out tiles of the
    experiment's split (to choose a class to make scarce: it needs enough held-out nuclei
    for its PQ to mean something)."""
    data = _load_real(_as_spec(real, "real"), heldout, split_seed)
    return {"train": data.counts_before, "heldout": _distinct_counts(data.heldout, data.classes, data.parents),
            "tiles": {"train": len(data.train), "heldout": len(data.heldout)}, "split": data.split_method}


# =========================================================================== evaluation
def score(truth: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
          preds: Sequence[tuple[np.ndarray, np.ndarray]], classes: Mapping[int, str],
          evaluated: Sequence[int], classify: bool = True) -> dict[str, Any]:
    """CoNIC metrics of predicted ``(inst, cls)`` maps against ``(image, inst, cls)`` truth.

    ``evaluated``: class codes averaged into ``mpq_plus`` and ``r2`` (those present in
    the held-out truth). With ``classify=False`` (a method without classes) only PQ and
    detection are filled in.
    """
    from studio.metrics import (
        binary_pq_dataset,
        class_counts,
        counts_r2,
        detection_f1,
        instance_centroids,
        multi_pq_plus,
    )

    true_i = [t[1] for t in truth]
    true_c = [t[2] for t in truth]
    pred_i = [p[0] for p in preds]
    pred_c = [p[1] for p in preds]
    pq = binary_pq_dataset(true_i, pred_i)
    tp = fp = fn = 0
    for t, p in zip(true_i, pred_i, strict=True):
        d = detection_f1(instance_centroids(t)[1], instance_centroids(p)[1], DETECTION_RADIUS)
        tp, fp, fn = tp + d["tp"], fp + d["fp"], fn + d["fn"]
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    out: dict[str, Any] = {
        "pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"],
        "detection_f1": f1, "detection_precision": tp / (tp + fp) if tp + fp else 0.0,
        "detection_recall": tp / (tp + fn) if tp + fn else 0.0,
        "nuclei_true": int(sum(int(t.max(initial=0)) for t in true_i)),
        "nuclei_pred": int(sum(int(p.max(initial=0)) for p in pred_i)),
    }
    if not classify:
        out.update({"mpq_plus": None, "mpq_plus_all_classes": None, "r2": None,
                    "pq_per_class": {classes[c]: None for c in sorted(classes)},
                    "r2_per_class": {classes[c]: None for c in sorted(classes)}})
        return out
    k = max(classes)
    m = multi_pq_plus(true_i, true_c, pred_i, pred_c, k)
    idx = [c - 1 for c in evaluated]
    true_counts = np.stack([class_counts(i, c, k) for i, c in zip(true_i, true_c, strict=True)])
    pred_counts = np.stack([class_counts(i, c, k) for i, c in zip(pred_i, pred_c, strict=True)])
    r2 = counts_r2(true_counts[:, idx], pred_counts[:, idx])
    out.update({
        "mpq_plus": float(np.mean(m["pq"][idx])),
        "mpq_plus_all_classes": float(m["mpq_plus"]),
        "r2": r2["r2"],
        "pq_per_class": {classes[c]: float(m["pq"][c - 1]) for c in sorted(classes)},
        "r2_per_class": {classes[c]: float(v) for c, v in zip(evaluated, r2["per_class"], strict=True)},
        "per_class_counts": {classes[c]: {"tp": int(m["tp"][c - 1]), "fp": int(m["fp"][c - 1]),
                                          "fn": int(m["fn"][c - 1])} for c in sorted(classes)},
        "class_counts_true": true_counts.sum(axis=0).tolist(),
        "class_counts_pred": pred_counts.sum(axis=0).tolist(),
    })
    return out


def _segment_all(model_dir: Path, tiles: Sequence[np.ndarray], device: str) -> list[tuple[np.ndarray, np.ndarray]]:
    from pipelines.segmenter import NucleiSegmenter

    seg = NucleiSegmenter.from_pretrained(model_dir, device=device)
    out = []
    for tile in tiles:
        inst, cls, _ = seg.segment(np.ascontiguousarray(tile))
        out.append((inst, cls))
    return out


# =========================================================================== summaries
def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _metric_keys(evaluated_names: Sequence[str]) -> list[tuple[str, str]]:
    """(key in the summary, column title) in table order."""
    keys = [("pq", "PQ"), ("mpq_plus", "mPQ+")]
    keys += [(f"pq_{n}", f"PQ {n}") for n in evaluated_names]
    keys += [("r2", "count R²"), ("detection_f1", "det. F1")]
    return keys


def _flat(metrics: Mapping[str, Any], evaluated_names: Sequence[str]) -> dict[str, float | None]:
    out = {"pq": _finite(metrics["pq"]), "mpq_plus": _finite(metrics.get("mpq_plus")),
           "r2": _finite(metrics.get("r2")), "detection_f1": _finite(metrics["detection_f1"])}
    for n in evaluated_names:
        out[f"pq_{n}"] = _finite((metrics.get("pq_per_class") or {}).get(n))
    return out


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0, "values": list(values)}
    arr = np.asarray(vals, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()), "sd": sd, "n": int(arr.size), "values": list(values)}


def summarize(runs: Sequence[Mapping[str, Any]], variants: Sequence[Mapping[str, Any]],
              evaluated_names: Sequence[str]) -> dict[str, Any]:
    """Mean ± sd over seeds per variant and metric, and paired differences to the baseline."""
    keys = [k for k, _ in _metric_keys(evaluated_names)]
    summary: dict[str, Any] = {}
    base = {r["seed"]: _flat(r["metrics"], evaluated_names) for r in runs if r["variant"] == "baseline"}
    for v in variants:
        rows = [r for r in runs if r["variant"] == v["id"]]
        flats = [(r["seed"], _flat(r["metrics"], evaluated_names)) for r in rows]
        entry = {k: _stats([f[k] for _, f in flats]) for k in keys}
        if v["id"] != "baseline" and base:
            deltas = {}
            for k in keys:
                d = [f[k] - base[s][k] for s, f in flats
                     if s in base and f[k] is not None and base[s][k] is not None]
                deltas[k] = _stats(d)
            entry["delta_vs_baseline"] = deltas
        summary[v["id"]] = entry
    return summary


def _fmt(stat: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    sd = stat.get("sd")
    return f"{fmt.format(stat['mean'])} ± {'–' if sd is None else f'{sd:.3f}'}"


def results_markdown(result: Mapping[str, Any]) -> str:
    """``results.md``: settings, data, the mean ± sd table and the paired differences."""
    s = result["settings"]
    names = result["evaluated_class_names"]
    keys = _metric_keys(names)
    scarce = s.get("scarce_class_name")
    titles = [t + (" *(scarce)*" if scarce and t == f"PQ {scarce}" else "") for _, t in keys]
    n_seeds = len(s["seeds"])
    lines = [f"# Augmentation experiment: {result['title']}", ""]
    for note in result.get("notes", []):
        lines.append(f"> {note}")
    if result.get("notes"):
        lines.append("")
    d = result["data"]
    lines += [
        f"- real: `{json.dumps(s['real'])}`; synthetic: `{json.dumps(s['synthetic'])}` "
        f"(ratio {s['synthetic_ratio']:g} of the batches in the synthetic variant)",
        f"- split: {result['splits']['method']}; {d['tiles']['real_train']} real training tiles, "
        f"{d['tiles']['synthetic']} synthetic, {d['tiles']['heldout']} held-out tiles "
        f"({d['nuclei']['heldout_instances']} nucleus instances; distinct held-out nuclei per class: "
        + ", ".join(f"{k} {v}" for k, v in d['nuclei']['heldout'].items()) + ")",
    ]
    if result.get("scarcity"):
        sc = result["scarcity"]
        lines.append(f"- scarce class **{scarce}**: {sc['nuclei_after']} of {sc['nuclei_before']} distinct training "
                     f"nuclei kept (keep {sc['keep']:g}) by dropping {sc['tiles_before'] - sc['tiles_after']} of "
                     f"{sc['tiles_before']} training tiles; training nuclei per class after: "
                     + ", ".join(f"{k} {v}" for k, v in d["nuclei"]["real_train"].items()))
    lines += [
        f"- {n_seeds} seed(s) per variant ({', '.join(map(str, s['seeds']))}), {s['steps']} training steps each "
        f"(batch {s['train']['batch_size']} x {s['train']['crop_size']} px, widths {list(s['train']['widths'])}); "
        f"mean ± sd over seeds (sample sd, – with one seed)",
        f"- mPQ+ and count R² averaged over the classes present in the held-out truth ({', '.join(names)}); "
        f"detection F1: centroids within {DETECTION_RADIUS:g} px",
        "",
        "| variant | " + " | ".join(titles) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for v in result["variants"]:
        stats = result["summary"].get(v["id"], {})
        lines.append(f"| {v['label']} | " + " | ".join(_fmt(stats.get(k)) for k, _ in keys) + " |")
    ref = result.get("reference", {}).get("threshold_watershed")
    if ref:
        flat = _flat(ref, names)
        cells = ["–" if flat[k] is None else f"{flat[k]:.3f}" for k, _ in keys]
        lines.append("| threshold-watershed (no classes, reference) | " + " | ".join(cells) + " |")
    deltas = [v for v in result["variants"] if "delta_vs_baseline" in result["summary"].get(v["id"], {})]
    if deltas:
        lines += ["", "Paired difference to the baseline (same seed; mean ± sd over seeds):", "",
                  "| variant | " + " | ".join(f"Δ {t}" for t in titles) + " |", "|---|" + "---|" * len(keys)]
        for v in deltas:
            dd = result["summary"][v["id"]]["delta_vs_baseline"]
            lines.append(f"| {v['label']} | " + " | ".join(_fmt(dd.get(k), signed=True) for k, _ in keys) + " |")
    t = result["timings"]
    lines += ["", f"Time: {t['total_seconds']:.0f} s in all; training {t['train_seconds']:.0f} s "
              f"({t['seconds_per_step']:.2f} s/step on {s['device']}, {s['threads']} thread(s)), "
              f"evaluation {t['eval_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def results_plot(result: Mapping[str, Any]):
    """Grouped bars: per-class PQ, mPQ+ and PQ per variant with ±sd error bars, and the
    threshold-watershed PQ as a dashed reference line (a PIL image)."""
    from PIL import Image, ImageDraw

    from studio.report import _font

    names = result["evaluated_class_names"]
    scarce = result["settings"].get("scarce_class_name")
    groups = [(f"pq_{n}", f"PQ {n}" + (" (scarce)" if n == scarce else "")) for n in names]
    groups += [("mpq_plus", "mPQ+"), ("pq", "PQ (binary)")]
    variants = result["variants"]
    summary = result["summary"]
    ref = (result.get("reference") or {}).get("threshold_watershed") or {}
    palette = [(70, 110, 180), (220, 120, 40), (60, 160, 90), (170, 70, 160), (200, 60, 60), (120, 120, 120)]
    nb = max(1, len(variants))
    left, top, plot_h, gap = 56, 58, 300, 18
    bar_w = max(12, min(26, (124 - gap) // nb))
    group_w = max(124, nb * bar_w + gap)
    width = max(640, left + len(groups) * group_w + 20)
    legend_rows = (len(variants) + (1 if ref.get("pq") is not None else 0) + 1) // 2
    height = top + plot_h + 40 + 18 * legend_rows + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    n_seeds = len(result["settings"]["seeds"])
    draw.text((left, 8), str(result["title"])[:100], fill="black", font=_font(14))
    draw.text((left, 28), f"held-out PQ per class, mPQ+ and binary PQ; mean ± sd over {n_seeds} seed(s), "
                          f"{result['settings']['steps']} steps per run", fill=(60, 60, 60), font=_font(11))

    highest = [ref["pq"]] if ref.get("pq") is not None else []
    for v in variants:
        for key, _ in groups:
            stat = summary.get(v["id"], {}).get(key) or {}
            if stat.get("mean") is not None:
                highest.append(stat["mean"] + (stat.get("sd") or 0))
    tenths = min(10, max(2, math.ceil((max(highest, default=0) + 0.02) * 10)))  # y axis top, in 0.1 units
    y_max = tenths / 10

    def y_of(v: float) -> float:
        return top + plot_h * (1.0 - max(0.0, min(1.0, v / y_max)))

    step = 1 if tenths <= 5 else 2
    for t in range(0, tenths + 1, step):
        y = y_of(t / 10)
        draw.line([(left, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 7), f"{t / 10:.1f}", fill="black", font=_font(11))
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    draw.line([(left, top + plot_h), (width - 10, top + plot_h)], fill="black")
    for g, (key, title) in enumerate(groups):
        x0 = left + gap // 2 + g * group_w
        for i, v in enumerate(variants):
            stat = summary.get(v["id"], {}).get(key) or {}
            mean = stat.get("mean")
            if mean is None:
                continue
            bx = x0 + i * bar_w
            draw.rectangle([bx, y_of(mean), bx + bar_w - 3, top + plot_h], fill=palette[i % len(palette)])
            sd = stat.get("sd")
            if sd:
                cx = bx + (bar_w - 3) / 2
                lo, hi = y_of(mean - sd), y_of(mean + sd)
                draw.line([(cx, lo), (cx, hi)], fill="black")
                for yy in (lo, hi):
                    draw.line([(cx - 3, yy), (cx + 3, yy)], fill="black")
        draw.text((x0, top + plot_h + 6), title[:24], fill="black", font=_font(11))
        if key == "pq" and ref.get("pq") is not None:
            yy = y_of(ref["pq"])
            for xx in range(int(x0) - 4, int(x0 + nb * bar_w), 8):
                draw.line([(xx, yy), (xx + 4, yy)], fill=(90, 90, 90), width=2)
    entries = [(v["label"], palette[i % len(palette)]) for i, v in enumerate(variants)]
    if ref.get("pq") is not None:
        entries.append(("threshold-watershed PQ (reference)", None))
    for i, (label, colour) in enumerate(entries):
        lx, yy = left + (i % 2) * 300, top + plot_h + 28 + 18 * (i // 2)
        if colour is None:
            draw.line([(lx, yy + 7), (lx + 12, yy + 7)], fill=(90, 90, 90), width=2)
        else:
            draw.rectangle([lx, yy + 2, lx + 12, yy + 12], fill=colour)
        draw.text((lx + 18, yy), label[:44], fill="black", font=_font(11))
    return img


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out: Path, result: Mapping[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``results.png``, each written atomically."""
    from studio.io import atomic_write_text
    from studio.report import save_png

    clean = _jsonable(result)
    atomic_write_text(out / "results.json", json.dumps(clean, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "results.md", results_markdown(clean))
    save_png(results_plot(clean), out / "results.png")


# =========================================================================== the experiment
def _check_options(seeds: int, steps: int, synthetic_ratio: float, scarce_keep: float, threads: int) -> None:
    if not isinstance(seeds, int) or seeds < 1:
        raise InputError("--seeds", f"{seeds!r}; need at least 1")
    if not isinstance(steps, int) or steps < 1:
        raise InputError("--steps", f"{steps!r}; need at least 1 training step")
    if not 0.0 < float(synthetic_ratio) < 1.0:
        raise InputError("--synthetic-ratio", f"{synthetic_ratio}; expected a share of the batches in (0, 1)")
    if not 0.0 <= float(scarce_keep) <= 1.0:
        raise InputError("--scarce-keep", f"{scarce_keep}; expected a fraction in [0, 1]")
    if not isinstance(threads, int) or threads < 1:
        raise InputError("--threads", f"{threads!r}; need at least 1")


def _train_config(train_options: Mapping[str, Any] | None, steps: int, threads: int):
    from training.segmenter import SegmenterConfig

    opts = dict(train_options or {})
    fixed = {"output_dir", "seed", "sources", "val", "max_steps", "stain_jitter", "threads"}
    bad = sorted(set(opts) & fixed)
    if bad:
        raise InputError("train_options", f"{bad} are set by the experiment itself")
    known = set(SegmenterConfig.__dataclass_fields__)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise InputError("train_options", f"unknown keys {unknown}; known: {sorted(known - fixed)}")
    for key, value in list(opts.items()):
        if isinstance(value, list):
            opts[key] = tuple(value)
    base = {"val_tiles": 1, "checkpoint_every": steps, "keep_checkpoints": 1, "validate_every": steps,
            "log_every": max(1, min(10, steps)), "warmup_steps": max(1, min(50, steps // 10))}
    return replace(SegmenterConfig(), **{**base, **opts, "max_steps": steps, "threads": threads})


def _prepare_output(out: Path, overwrite: bool, create: bool) -> None:
    """Refuse a file or a folder holding an experiment (unless ``overwrite``); with
    ``create``, remove the old ``runs``/``data`` and make the folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(out, "is a file; give a folder for the experiment")
    ours = [out / n for n in ("results.json", "runs", "data")]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise OutputError(out, "already holds an experiment (results.json / runs / data); pass overwrite=True "
                                   "(--overwrite) or another folder")
        if not create:
            return
        for p in ours[1:]:
            shutil.rmtree(p, ignore_errors=True)
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot create ({exc.strerror or exc})") from exc


def run_augment_experiment(
    real: str | Path | Mapping[str, Any],
    synthetic: str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    seeds: int = 3,
    stain_augment: bool = False,
    tta_normalize: str | None = None,
    steps: int = DEFAULT_STEPS,
    heldout: float | str | Path | Mapping[str, Any] | None = None,
    synthetic_ratio: float = 0.3,
    scarce_class: str | int | None = None,
    scarce_keep: float = DEFAULT_SCARCE_KEEP,
    threads: int = 1,
    progress: Progress | None = None,
    split_seed: int = 0,
    train_options: Mapping[str, Any] | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
    overwrite: bool = False,
    keep_models: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Train the segmenter with and without synthetic data (and the other variants) on
    identical splits, ``seeds`` times each, and score every model on the held-out tiles.

    Args:
        real: ``"hgsc_nest"``, ``"phantom"``, a dataset folder, or a spec mapping
            (``{"name": "hgsc_nest", "stride": 128}``, ``{"name": "phantom", "n": 48,
            "seed": 1000}``, ``{"path": ..., "layout": ...}``).
        synthetic: ``"phantom"``, a dataset folder or a spec mapping; its class table must
            equal the real one. Tiles whose source is missing or "real" are recorded as
            "synthetic".
        out: output folder (see the module docstring).
        seeds: training runs per variant (seeds 0..seeds-1, shared by all variants).
        stain_augment: add the stain-augmentation variant.
        tta_normalize: ``macenko`` / ``reinhard`` / ``vahadane``: add the baseline models
            evaluated on held-out tiles normalized to the real training tiles.
        steps: training steps per run.
        heldout: None = the default split (hgsc_nest: its held-out band; otherwise 25 %
            of the tiles, seeded); a fraction in (0, 1) for the seeded split; or a dataset
            (folder / built-in / spec) used whole as the held-out set.
        synthetic_ratio: share of the synthetic tiles in the batches of the synthetic variant.
        scarce_class: a class (name or code) to make scarce in the real training tiles.
        scarce_keep: fraction of that class' distinct training nuclei to keep.
        threads: torch CPU threads.
        progress: called with event dicts: ``{"event": "data", "real_train", "synthetic",
            "heldout", "scarcity"}`` (tile counts; the scarcity summary or None),
            ``{"event": "run_start", "variant", "seed", "index", "count", "steps"}``,
            ``{"event": "run_done", "variant", "seed", "index", "count", "train_seconds",
            "eval_seconds", "metrics"}``, ``{"event": "evaluated", "variant", "seed",
            "metrics"}`` (evaluation-only variants), ``{"event": "done", "results",
            "seconds"}``.
        split_seed: seed of the tile split and of the scarcity tie-breaking.
        train_options: :class:`~training.segmenter.SegmenterConfig` fields for every run
            (``widths``, ``batch_size``, ``crop_size``, ``learning_rate``, ...).
        title, notes: shown at the top of ``results.md`` (notes also in the JSON).
        overwrite: replace an experiment already in ``out``.
        keep_models: keep each run's ``final`` model (checkpoints are always removed).
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``; training and
            evaluation both run there (:func:`experiment_device`).

    Returns:
        The content of ``results.json`` (a dict).

    Raises:
        InputError: unknown dataset names or missing folders, class tables that differ,
            an empty held-out set, bad options -- all before any training.
        OutputError: ``out`` is not writable or already holds an experiment.
    """
    t_start = time.time()
    _check_options(seeds, steps, synthetic_ratio, scarce_keep, threads)
    device = experiment_device(device)  # a missing GPU is a one-line error before anything is read or written
    out = Path(out)
    _prepare_output(out, overwrite, create=False)
    torch.set_num_threads(threads)

    def emit(event: str, **values: Any) -> None:
        if progress is not None:
            progress({"event": event, **values})

    normalizer = None
    if tta_normalize is not None:
        from studio.stain import get_normalizer

        normalizer = get_normalizer(str(tta_normalize))
        tta_normalize = normalizer.name
    base_cfg = _train_config(train_options, steps, threads)
    real_spec = _as_spec(real, "real")
    syn_spec = _as_spec(synthetic, "synthetic")
    if syn_spec.get("name") == "hgsc_nest":
        raise InputError("--synthetic", "hgsc_nest is the real labelled tile (its held-out band would leak into "
                                        "training); give synthetic tiles (phantom or a folder)")
    if "path" in real_spec and "path" in syn_spec and \
            Path(real_spec["path"]).resolve() == Path(syn_spec["path"]).resolve():
        raise InputError("--synthetic", f"{syn_spec['path']} is the real dataset itself")

    data = _load_real(real_spec, heldout, split_seed)
    scarce_code = None
    if scarce_class is not None:
        scarce_code = _class_code(scarce_class, data.classes)
        name = data.classes[scarce_code]
        if data.counts_before[name] == 0:
            raise InputError("--scarce-class", f"{name} has no nuclei in the real training tiles")
        data.train, data.dropped, data.scarcity = make_scarce(data.train, scarce_code, float(scarce_keep),
                                                              split_seed, data.parents)
        data.scarcity["class_name"] = name
        if not data.train:
            raise InputError("--scarce-keep", f"{scarce_keep} leaves no training tiles")
    _load_synthetic(data, syn_spec, scarce_code)
    crop = base_cfg.crop_size
    for role, items in (("real", data.train), ("synthetic", data.synthetic)):
        small = [s.meta.get("name") for s in items if min(np.asarray(s.inst).shape) < crop]
        if small:
            raise InputError(f"--{role}", f"{len(small)} training tile(s) smaller than the {crop} px training crop, "
                                          f"e.g. {small[0]}")

    # ---------------------------------------------------------------- write the data
    _prepare_output(out, overwrite, create=True)
    folders = {role: _write(out / "data" / role, items, data.classes, role)
               for role, items in (("real_train", data.train), ("synthetic", data.synthetic),
                                   ("heldout", data.heldout))}
    truth = _heldout_truth(data.heldout)
    held_ids = [str(s.meta.get("name")) for s in data.heldout]  # what every run is scored on
    names = [data.classes[c] for c in data.evaluated]
    emit("data", real_train=len(data.train), synthetic=len(data.synthetic), heldout=len(data.heldout),
         scarcity=data.scarcity)

    # ---------------------------------------------------------------- variants
    real_src = {"path": str(folders["real_train"]), "layout": "folder", "source": "real"}
    syn_src = {"path": str(folders["synthetic"]), "layout": "folder", "source": "synthetic"}
    ratio = float(synthetic_ratio)
    variants: list[dict[str, Any]] = [
        {"id": "baseline", "label": "baseline (real only)", "sources": [{**real_src, "weight": 1.0}],
         "stain_jitter": False},
        {"id": "synthetic", "label": f"+synthetic ({ratio:.0%} of batches)",
         "sources": [{**real_src, "weight": 1.0 - ratio}, {**syn_src, "weight": ratio}], "stain_jitter": False},
    ]
    if stain_augment:
        variants.append({"id": "stain_augment", "label": "+stain augment", "sources": [{**real_src, "weight": 1.0}],
                         "stain_jitter": True})
    tta_id = f"tta_{tta_normalize}"
    if normalizer is not None:
        variants.append({"id": tta_id, "label": f"baseline + TTA {tta_normalize}", "evaluate_models_of": "baseline",
                         "normalize": tta_normalize, "normalize_reference": "real training tiles"})
    trained = [v for v in variants if "sources" in v]
    settings = {
        "real": _describe(real_spec), "synthetic": _describe(syn_spec), "seeds": list(range(seeds)),
        "stain_augment": bool(stain_augment), "tta_normalize": tta_normalize, "steps": steps,
        "heldout": _describe(data.held_spec) if data.held_spec is not None else heldout,
        "synthetic_ratio": ratio, "scarce_class": scarce_class,
        "scarce_class_name": data.classes[scarce_code] if scarce_code is not None else None,
        "scarce_keep": float(scarce_keep), "threads": threads, "device": device, "split_seed": split_seed,
        "train": {k: v for k, v in asdict(base_cfg).items() if k not in ("output_dir", "seed", "sources", "val")},
    }
    result: dict[str, Any] = {
        "experiment": "augment", "version": 1, "title": title or f"{_label(real_spec)} + {_label(syn_spec)}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "notes": list(notes), "settings": settings,
        "classes": {int(c): n for c, n in sorted(data.classes.items())}, "evaluated_classes": data.evaluated,
        "evaluated_class_names": names, "splits": data.splits(), "data": data.info(folders),
        "scarcity": data.scarcity, "variants": variants, "runs": [], "reference": {}, "summary": {}, "timings": {},
    }

    # ---------------------------------------------------------------- reference: classical baseline
    from studio.nuclei import threshold_watershed_baseline

    t0 = time.time()
    ref_preds = [threshold_watershed_baseline(t[0]) for t in truth]
    result["reference"]["threshold_watershed"] = {
        **score(truth, ref_preds, data.classes, data.evaluated, classify=False), "seconds": round(time.time() - t0, 2)}
    normalized_tiles = None
    if normalizer is not None:
        normalizer.fit([np.ascontiguousarray(s.image) for s in data.train], source="real training tiles")
        normalized_tiles = [normalizer.transform_uint8(t[0][None])[0] for t in truth]

    # ---------------------------------------------------------------- train and evaluate
    timings = {"train_seconds": 0.0, "eval_seconds": 0.0, "steps": 0, "step_seconds": []}
    count = len(trained) * seeds
    index = 0
    for seed in range(seeds):  # seed-major: every variant gets seed 0 before any gets seed 1
        for var in trained:
            run_dir = out / "runs" / var["id"] / f"seed_{seed}"
            cfg = replace(base_cfg, output_dir=str(run_dir), seed=seed, sources=tuple(var["sources"]),
                          val=str(folders["heldout"]), stain_jitter=var["stain_jitter"])
            emit("run_start", variant=var["id"], seed=seed, index=index, count=count, steps=steps)
            final, train_s, step_s = _train_run(cfg, device)
            t1 = time.time()
            metrics = score(truth, _segment_all(final, [t[0] for t in truth], device), data.classes, data.evaluated)
            eval_s = time.time() - t1
            result["runs"].append({"variant": var["id"], "seed": seed, "run_dir": str(run_dir), "model": str(final),
                                   "train_seconds": round(train_s, 2), "seconds_per_step": step_s,
                                   "eval_seconds": round(eval_s, 2), "heldout_ids": held_ids,
                                   "training_sources": list(var["sources"]), "stain_jitter": var["stain_jitter"],
                                   "metrics": metrics})
            timings["train_seconds"] += train_s
            timings["eval_seconds"] += eval_s
            timings["steps"] += steps
            if step_s is not None:
                timings["step_seconds"].append(step_s)
            emit("run_done", variant=var["id"], seed=seed, index=index, count=count,
                 train_seconds=round(train_s, 2), eval_seconds=round(eval_s, 2), metrics=_jsonable(metrics))
            if var["id"] == "baseline" and normalized_tiles is not None:
                t1 = time.time()
                metrics = score(truth, _segment_all(final, normalized_tiles, device), data.classes, data.evaluated)
                eval_s = time.time() - t1
                result["runs"].append({"variant": tta_id, "seed": seed, "run_dir": str(run_dir),
                                       "model": str(final), "train_seconds": 0.0, "seconds_per_step": None,
                                       "eval_seconds": round(eval_s, 2), "heldout_ids": held_ids,
                                       "normalized_with": tta_normalize, "metrics": metrics})
                timings["eval_seconds"] += eval_s
                emit("evaluated", variant=tta_id, seed=seed, metrics=_jsonable(metrics))
            if not keep_models:
                shutil.rmtree(final, ignore_errors=True)
            index += 1
            _finish(result, timings, t_start, names)
            write_results(out, result)
    emit("done", results=str(out / "results.json"), seconds=round(time.time() - t_start, 1))
    return _jsonable(result)


def experiment_device(spec: str | None) -> str:
    """``--device`` of ``experiment``, resolved (:func:`studio.devices.resolve_device`).

    Training goes through ``accelerate``, which runs one process on the CPU or on the first
    visible GPU; so ``cuda:N`` past 0 is refused with the way to pick that card instead.
    """
    from studio.devices import resolve_device

    device = resolve_device(spec)
    if device.startswith("cuda:") and device != "cuda:0":
        raise InputError("--device", f"{device}: experiment trains through accelerate on the first visible GPU; "
                                     f"run it with CUDA_VISIBLE_DEVICES={device.split(':')[1]} and --device cuda")
    if device == "mps":
        raise InputError("--device", "mps: experiment trains on cpu or cuda only; use --device cpu")
    return "cuda" if device.startswith("cuda") else device


def _train_run(cfg: Any, device: str = "cpu") -> tuple[Path, float, float | None]:
    """One :func:`training.segmenter.train` run, its console output to ``train.log``;
    returns the final model, wall seconds and the seconds per step measured between the
    first and last logged steps (set-up, validation and saving excluded). On ``cpu`` the
    run is kept off any GPU (``ACCELERATE_USE_CPU``: accelerate's own switch)."""
    import os

    from training.segmenter import train

    run_dir = Path(cfg.output_dir)
    t0 = time.time()
    log = io.StringIO()
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            final = train(cfg)
    finally:
        if device == "cpu":
            if previous is None:
                os.environ.pop("ACCELERATE_USE_CPU", None)
            else:
                os.environ["ACCELERATE_USE_CPU"] = previous
    seconds = time.time() - t0
    (run_dir / "train.log").write_text(log.getvalue(), encoding="utf-8")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer state: large, not needed
    step_s = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        if len(rows) >= 2 and rows[-1]["step"] > rows[0]["step"]:
            step_s = round((rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"]), 3)
    return final, seconds, step_s


def _finish(result: dict[str, Any], timings: Mapping[str, Any], t_start: float, names: Sequence[str]) -> None:
    result["summary"] = summarize(result["runs"], result["variants"], names)
    result["timings"] = {"total_seconds": round(time.time() - t_start, 1),
                         "train_seconds": round(timings["train_seconds"], 1),
                         "eval_seconds": round(timings["eval_seconds"], 1),
                         "seconds_per_step": round(float(np.median(timings["step_seconds"])), 3)
                         if timings["step_seconds"] else round(timings["train_seconds"] / max(1, timings["steps"]), 3)}


def _pannuke_classes() -> Mapping[int, str]:
    from studio.data.samples import PANNUKE_CLASSES

    return PANNUKE_CLASSES


def _with_meta(sample: Any, **meta: Any) -> Any:
    from studio.data.base import NucleiSample

    return NucleiSample(sample.image, sample.inst, sample.cls, {**sample.meta, **meta})


def _label(spec: Mapping[str, Any]) -> str:
    return str(spec.get("name") or Path(str(spec.get("path"))).name)


__all__ = ["DEFAULT_STEPS", "class_census", "make_scarce", "results_markdown", "results_plot",
           "run_augment_experiment", "score", "summarize"]

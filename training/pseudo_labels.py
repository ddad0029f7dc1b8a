"""Pseudo-labels for unlabelled real tissue: a teacher's confident nuclei, the rest marked unknown.

    python -m training.pseudo_labels --out runs/pseudo_labels            # shipped samples, shipped teacher
    python -m training.pseudo_labels --images slides/*.png --out runs/pl --checkpoint my-segmenter

Self-training as teacher-student pipelines do it (Noisy Student; the pseudo-labelling of
HoVer-Net-style models in CoNIC entries): the teacher segments each unlabelled image under
several *views* -- the 8 dihedral transforms, stain jitter and a scale shift of about 10 %
-- and every view's instance map is brought back to the image's grid. A nucleus of the
reference view is **kept** when an instance overlapping it with IoU >= ``match_iou`` turns
up in at least ``min_agreement`` of the other views; its class is the majority class over
the views that found it. Agreement across augmentations is the confidence: a nucleus that
appears only in some views (faint, out of focus, an edge artefact) is exactly what a
student should not be taught either way.

What the student is told, per pixel:

* nucleus (a kept instance, with its class);
* background, where **no** view saw a nucleus;
* unknown (``ignore``), everywhere else: rejected nuclei (dilated by 2 px) and any pixel
  some view called nuclear. The training loss leaves these out
  (:func:`training.segmenter.hovernet_loss`), so an unsure nucleus is not taught as
  background.

The output is the studio's folder layout (:mod:`studio.data.folder`) with the ignore
channel, ``source = "pseudo"`` and provenance per tile (parent image, origin, teacher,
thresholds), ready as a ``sources`` entry of a segmenter recipe:
``{path: runs/pseudo_labels, layout: folder, weight: 0.3}``.

Which pixels it may use: for the shipped samples, every image's right quarter
(``x >= 0.75 W``) is left out, so label-free checks on unseen tissue
(``bench/segmenter_eval.py``) run on pixels the student never saw; hgsc_nest is not
used (its labelled bands are the real training and held-out data).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import InputError
from studio.metrics import best_match

UNLABELLED_SAMPLES = ("skin", "tiatoolbox_target", "cmu_small_region")
EVAL_FRACTION = 0.25  # right part of each shipped sample kept out of pseudo-labelling


@dataclass
class PseudoLabelConfig:
    """Views and thresholds of the teacher (defaults: what the shipped student used)."""

    match_iou: float = 0.5
    min_agreement: float = 0.8  # share of the other views that must find the nucleus
    stain_views: int = 2
    scales: tuple[float, ...] = (0.9, 1.1)  # image_mpp / model mpp of the scale views
    ignore_margin: int = 2
    seed: int = 0


@dataclass
class PseudoLabels:
    """One image's pseudo-labels and what the filter did."""

    inst: np.ndarray
    cls: np.ndarray
    ignore: np.ndarray
    agreement: dict[int, float] = field(default_factory=dict)  # kept id -> share of views agreeing
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- views
def dihedral(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def undo_dihedral(plane: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = plane[:, ::-1] if flip else plane
    return np.ascontiguousarray(np.rot90(out, -k, axes=(0, 1)))


def stain_jittered(image: np.ndarray, seed: int) -> np.ndarray:
    """The image re-stained by one draw of :class:`studio.stain.augment.StainAugment`."""
    from studio.io import to_tensor, to_uint8
    from studio.stain.augment import StainAugment

    tiles = StainAugment()(to_tensor(image[None]), torch.Generator().manual_seed(seed))
    return to_uint8(tiles)[0]


def teacher_views(segment: Callable[..., tuple[np.ndarray, np.ndarray, dict]], image: np.ndarray,
                  cfg: PseudoLabelConfig, model_mpp: float | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(view name, inst, cls)]`` on the image's grid; the first is the plain view."""
    views = []
    for k in range(4):
        for flip in (False, True):
            inst, cls, _ = segment(dihedral(image, k, flip))
            views.append((f"rot{90 * k}{'_flip' if flip else ''}", undo_dihedral(inst, k, flip),
                          undo_dihedral(cls, k, flip)))
    for j in range(cfg.stain_views):
        inst, cls, _ = segment(stain_jittered(image, cfg.seed * 7919 + j))
        views.append((f"stain{j}", inst, cls))
    if model_mpp:
        for factor in cfg.scales:
            inst, cls, _ = segment(image, image_mpp=model_mpp * factor)
            views.append((f"scale{factor:g}", inst, cls))
    return views


# --------------------------------------------------------------------------- agreement
def filter_confident(views: Sequence[tuple[str, np.ndarray, np.ndarray]], cfg: PseudoLabelConfig,
                     num_classes: int) -> PseudoLabels:
    """Keep the reference view's nuclei that the other views agree on (module docstring)."""
    from scipy import ndimage as ndi

    from studio.nuclei import relabel_sequential

    _, ref_inst, ref_cls = views[0]
    n = int(ref_inst.max(initial=0))
    votes = np.zeros(n)
    class_votes = np.zeros((n, num_classes + 1))
    ref_types = np.zeros(n + 1, dtype=np.int64)
    ref_types[ref_inst[ref_inst > 0]] = ref_cls[ref_inst > 0]
    class_votes[np.arange(n), ref_types[1:]] += 1
    any_nuclear = ref_inst > 0
    for _, inst, cls in views[1:]:
        any_nuclear |= inst > 0
        iou, match = best_match(ref_inst, inst)
        agree = iou >= cfg.match_iou
        votes += agree
        other_types = np.zeros(int(inst.max(initial=0)) + 1, dtype=np.int64)
        other_types[inst[inst > 0]] = cls[inst > 0]
        ids = np.nonzero(agree)[0]
        np.add.at(class_votes, (ids, other_types[match[ids]]), 1)
    others = max(1, len(views) - 1)
    agreement = votes / others
    keep = agreement >= cfg.min_agreement
    kept_ids = np.nonzero(keep)[0] + 1
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[kept_ids] = kept_ids
    inst = relabel_sequential(lut[ref_inst])
    # majority class (ties to the lower code), never 0 when a class was voted
    majority = np.where(class_votes[:, 1:].sum(1) > 0, class_votes[:, 1:].argmax(1) + 1, 0)
    cls_lut = np.zeros(n + 1, dtype=np.uint8)
    cls_lut[kept_ids] = majority[kept_ids - 1]
    cls = np.where(inst > 0, cls_lut[ref_inst], 0).astype(np.uint8)
    rejected = (ref_inst > 0) & (lut[ref_inst] == 0)
    if cfg.ignore_margin > 0 and rejected.any():
        rejected = ndi.binary_dilation(rejected, iterations=cfg.ignore_margin)
    ignore = (rejected | any_nuclear) & (inst == 0)
    kept_agreement = {int(new): float(agreement[old - 1]) for new, old in
                      enumerate(kept_ids.tolist(), start=1)}
    stats = {"candidates": n, "kept": int(keep.sum()), "views": [v[0] for v in views],
             "ignored_fraction": round(float(ignore.mean()), 4),
             "mean_agreement": round(float(agreement.mean()) if n else 0.0, 4)}
    return PseudoLabels(inst.astype(np.int32), cls, ignore, kept_agreement, stats)


def pseudo_label(segmenter: Any, image: np.ndarray, cfg: PseudoLabelConfig | None = None) -> PseudoLabels:
    """Pseudo-labels of one uint8 ``(H, W, 3)`` image by a :class:`~pipelines.segmenter.NucleiSegmenter`."""
    cfg = cfg or PseudoLabelConfig()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError("image", f"shape {arr.shape} dtype {arr.dtype}; expected uint8 (H, W, 3) RGB")
    if not 0 < cfg.min_agreement <= 1 or not 0 < cfg.match_iou <= 1:
        raise InputError("min_agreement/match_iou", f"{cfg.min_agreement}/{cfg.match_iou}; each must be in (0, 1]")
    views = teacher_views(segmenter.segment, arr, cfg, segmenter.mpp)
    return filter_confident(views, cfg, segmenter.num_classes)


def pseudo_label_precision(labels: PseudoLabels, true_inst: np.ndarray, candidates: np.ndarray,
                           match_iou: float = 0.5) -> dict[str, float]:
    """Precision of kept pseudo-labels against known truth, beside that of all candidates.

    A kept or candidate nucleus is correct when it overlaps a true nucleus with IoU >=
    ``match_iou``. Recall of the kept set is reported too (what the filter gave away).
    """
    kept_iou, _ = best_match(labels.inst, true_inst)
    cand_iou, _ = best_match(candidates, true_inst)
    truth_iou, _ = best_match(true_inst, labels.inst)
    return {"kept": int(kept_iou.size), "candidates": int(cand_iou.size),
            "precision_kept": float((kept_iou >= match_iou).mean()) if kept_iou.size else 0.0,
            "precision_candidates": float((cand_iou >= match_iou).mean()) if cand_iou.size else 0.0,
            "recall_kept": float((truth_iou >= match_iou).mean()) if truth_iou.size else 0.0}


# --------------------------------------------------------------------------- dataset
def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    if length < tile:
        return []
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def pseudo_tiles(name: str, image: np.ndarray, labels: PseudoLabels, *, tile: int = 256, stride: int = 128,
                 min_tissue: float = 0.3, provenance: dict[str, Any] | None = None) -> list:
    """Tissue tiles of one pseudo-labelled image as :class:`~studio.data.base.NucleiSample` s."""
    from studio.data.base import NucleiSample
    from studio.nuclei import relabel_sequential

    out = []
    h, w = labels.inst.shape
    for y in tile_origins(h, tile, stride):
        for x in tile_origins(w, tile, stride):
            crop = image[y:y + tile, x:x + tile]
            if float((crop.mean(-1) < 215).mean()) < min_tissue:
                continue
            inst = relabel_sequential(labels.inst[y:y + tile, x:x + tile])
            meta = {"name": f"{name}_y{y:05d}_x{x:05d}", "source": "pseudo", "parent": name,
                    "origin_y": y, "origin_x": x, **(provenance or {})}
            out.append(NucleiSample(np.ascontiguousarray(crop), inst, labels.cls[y:y + tile, x:x + tile].copy(),
                                    meta, ignore=labels.ignore[y:y + tile, x:x + tile].copy()))
    return out


def build_pseudo_dataset(out: str | Path, images: Iterable[tuple[str, np.ndarray]], checkpoint: str | Path,
                         cfg: PseudoLabelConfig | None = None, *, tile: int = 256, stride: int = 128,
                         overwrite: bool = False, device: str | None = "auto",
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pseudo-label ``images`` with the segmenter at ``checkpoint``; write one folder dataset."""
    from pipelines.segmenter import NucleiSegmenter
    from studio.data.folder import write_folder
    from studio.devices import resolve_device

    cfg = cfg or PseudoLabelConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(out, "exists; pass --overwrite to replace it")
    teacher = NucleiSegmenter.from_pretrained(checkpoint, device=resolve_device(device))
    classes = dict(enumerate(teacher.class_names.values(), start=1)) if teacher.class_names else {}
    provenance = {"teacher": str(checkpoint), "min_agreement": cfg.min_agreement, "match_iou": cfg.match_iou}
    samples, report = [], {"config": asdict(cfg), "teacher": str(checkpoint), "images": {}}
    for name, image in images:
        start = time.time()
        labels = pseudo_label(teacher, image, cfg)
        tiles = pseudo_tiles(name, image, labels, tile=tile, stride=stride, provenance=provenance)
        samples.extend(tiles)
        report["images"][name] = {**labels.stats, "shape": list(image.shape[:2]), "tiles": len(tiles),
                                  "seconds": round(time.time() - start, 1)}
        log(f"{name}: kept {labels.stats['kept']} of {labels.stats['candidates']} nuclei "
            f"({labels.stats['ignored_fraction']:.1%} of pixels unknown), {len(tiles)} tiles")
    if not samples:
        raise InputError("images", "gave no tissue tiles to pseudo-label")
    write_folder(out, samples, classes=classes or {1: "nucleus"}, overwrite=overwrite)
    (out / "pseudo_labels.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {out} ({len(samples)} tiles) and {out / 'pseudo_labels.json'}")
    return report


def shipped_unlabelled(eval_fraction: float = EVAL_FRACTION) -> list[tuple[str, np.ndarray]]:
    """The shipped samples without labels, less the right ``eval_fraction`` kept for label-free checks."""
    from studio.data.samples import load_sample

    out = []
    for name in UNLABELLED_SAMPLES:
        image = load_sample(name)
        out.append((name, np.ascontiguousarray(image[:, : int(round(image.shape[1] * (1 - eval_fraction)))])))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "nuclei-segmenter"
    parser.add_argument("--checkpoint", default=str(shipped), help="a local segmenter folder (the teacher)")
    parser.add_argument("--images", nargs="*", default=None,
                        help="unlabelled images (default: the shipped samples' pseudo-labelling parts)")
    parser.add_argument("--min-agreement", type=float, default=PseudoLabelConfig.min_agreement)
    parser.add_argument("--match-iou", type=float, default=PseudoLabelConfig.match_iou)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.images:
        from studio.io import read_image

        images = [(Path(p).stem, np.asarray(read_image(p))) for p in args.images]
    else:
        images = shipped_unlabelled()
    cfg = PseudoLabelConfig(match_iou=args.match_iou, min_agreement=args.min_agreement, seed=args.seed)
    return build_pseudo_dataset(args.out, images, args.checkpoint, cfg, overwrite=args.overwrite,
                                device=args.device)


if __name__ == "__main__":
    main()

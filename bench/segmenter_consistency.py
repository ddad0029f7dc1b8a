"""Label-free evidence on tissue the segmenter never saw: do its nuclei survive stain and scale shifts?

    python bench/segmenter_consistency.py --checkpoints checkpoints/nuclei-segmenter runs/segmenter_student/final

The shipped samples without labels (skin, tiatoolbox's breast tile, the Aperio skin region)
are scored on their **right quarter** (``x >= 0.75 W``), which pseudo-labelling never used
(``training/pseudo_labels.py``). For each model and image, the plain prediction is
compared with predictions of the same pixels under shifts a user's slides bring:

* two stain re-draws (:class:`studio.stain.augment.StainAugment`, seeds unused in training),
* Reinhard normalization to each of the other shipped H&E images (other labs' colours),
* a scale shift (the image taken as 0.45 and 0.55 um/px: 10 % smaller / larger nuclei),
* scanner blur, noise and JPEG.

**Consistency** is detection F1 (centroids within 8 px) between the plain prediction and
each shifted one, and their binary PQ; a segmenter that has learnt nuclei rather than a
colour threshold keeps them. *Control row that exposes gaming*: a model that predicts
nothing, or one blob, would be perfectly consistent, so every row also gives nuclei per
100 x 100 um beside the hematoxylin threshold baseline's (and the baseline's own
consistency, which is a colour rule's). Counts far below the baseline's mean collapse.

Why no accuracy here: these images have no labels. Accuracy lives in
``bench/segmenter_eval.py`` (held-out real band, phantoms with exact truth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from studio.metrics import detection_f1, instance_centroids, panoptic_quality

IMAGES = ("skin", "tiatoolbox_target", "cmu_small_region")
EVAL_FRACTION = 0.25


def eval_region(name: str) -> np.ndarray:
    from studio.data.samples import load_sample

    image = load_sample(name)
    return np.ascontiguousarray(image[:, int(round(image.shape[1] * (1 - EVAL_FRACTION))):])


def shifted_views(name: str, image: np.ndarray) -> dict[str, tuple[np.ndarray, float | None]]:
    """``{shift: (image, image_mpp or None)}`` of one evaluation region."""
    from studio.data.samples import load_sample
    from studio.scanner import scanner_degrade
    from studio.stain import ReinhardNormalizer
    from training.pseudo_labels import stain_jittered

    views: dict[str, tuple[np.ndarray, float | None]] = {
        "stain_a": (stain_jittered(image, 424_242), None),
        "stain_b": (stain_jittered(image, 515_151), None),
        "scale_0.45": (image, 0.45),
        "scale_0.55": (image, 0.55),
        "scanner": (scanner_degrade(image, np.random.default_rng(7), blur=1.2, noise=5, quality=60), None),
    }
    for ref in ("hgsc_nest", *IMAGES):
        if ref != name:
            norm = ReinhardNormalizer()
            norm.fit(load_sample(ref))
            views[f"reinhard_to_{ref}"] = (norm.transform_uint8(image[None])[0], None)
    return views


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    f1 = detection_f1(instance_centroids(a)[1], instance_centroids(b)[1], radius=8.0)["f1"]
    return {"f1": float(f1), "pq": float(panoptic_quality(a, b)["pq"])}


def density(inst: np.ndarray, mpp: float = 0.5) -> float:
    """Nuclei per 100 x 100 um."""
    area_um2 = inst.shape[0] * inst.shape[1] * mpp * mpp
    return float(inst.max(initial=0)) / area_um2 * 1e4


def _label(checkpoint: str) -> str:
    """The row name: the folder relative to the repository when it lies inside it, so the
    JSON reads the same on every machine."""
    path, root = Path(checkpoint).resolve(), Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else checkpoint


def run(checkpoints: list[str], out: Path | None) -> dict:
    from pipelines.segmenter import NucleiSegmenter
    from studio.nuclei import relabel_sequential, threshold_watershed_baseline

    models = {_label(c): NucleiSegmenter.from_pretrained(c) for c in checkpoints}
    results: dict = {"images": list(IMAGES), "region": f"right {EVAL_FRACTION:.0%} of each image", "rows": {}}
    for name in IMAGES:
        image = eval_region(name)
        views = shifted_views(name, image)
        row = results["rows"].setdefault(name, {})
        base_plain = relabel_sequential(threshold_watershed_baseline(image)[0])
        base_scores = [agreement(base_plain, relabel_sequential(threshold_watershed_baseline(v)[0]))
                       for k, (v, mpp) in views.items() if mpp is None]
        row["threshold baseline"] = {"density": round(density(base_plain), 1),
                                     "f1": round(float(np.mean([s["f1"] for s in base_scores])), 4),
                                     "pq": round(float(np.mean([s["pq"] for s in base_scores])), 4)}
        for ckpt, seg in models.items():
            start = time.time()
            plain, _, _ = seg.segment(image)
            per_shift = {}
            for shift, (view, mpp) in views.items():
                pred, _, _ = seg.segment(view, image_mpp=mpp)
                per_shift[shift] = {k: round(v, 4) for k, v in agreement(plain, pred).items()}
            row[ckpt] = {"density": round(density(plain), 1),
                         "f1": round(float(np.mean([s["f1"] for s in per_shift.values()])), 4),
                         "pq": round(float(np.mean([s["pq"] for s in per_shift.values()])), 4),
                         "per_shift": per_shift, "seconds": round(time.time() - start, 1)}
            print(f"{name:18s} {ckpt:40s} density {row[ckpt]['density']:6.1f}  consistency F1 "
                  f"{row[ckpt]['f1']:.3f}  PQ {row[ckpt]['pq']:.3f}", flush=True)
        b = row["threshold baseline"]
        print(f"{name:18s} {'threshold baseline (colour shifts only)':40s} density {b['density']:6.1f}  "
              f"consistency F1 {b['f1']:.3f}  PQ {b['pq']:.3f}", flush=True)
    for ckpt in models:
        results.setdefault("mean", {})[ckpt] = {
            k: round(float(np.mean([results["rows"][n][ckpt][k] for n in IMAGES])), 4) for k in ("f1", "pq")}
    print("mean consistency:", json.dumps(results["mean"]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "nuclei-segmenter"
    parser.add_argument("--checkpoints", nargs="+", default=[str(shipped)],
                        help="local segmenter folders (save_pretrained layout)")
    parser.add_argument("--out", type=Path, default=Path("docs/segmenter_consistency.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args.checkpoints, args.out)


if __name__ == "__main__":
    main()

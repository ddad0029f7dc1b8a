"""Does the shipped nucleus segmenter learn, and does it generalise? Against the classical baseline.

    python bench/segmenter_eval.py [--checkpoint checkpoints/nuclei-segmenter] [--out docs/]

1. **Held-out real region**: the whole held-out band of the labelled hgsc_nest tile
   (x >= 1125, never in training) segmented in one pass, scored against its labels.
2. **Held-out phantom tiles**: phantom tiles from seeds training never used (exact truth):
   the default preset cycle (isolated nuclei) and the ``crowded`` preset (touching nuclei,
   which a threshold merges), each as rendered and after a scanner's degradations
   (:func:`scanner_degrade`: optical blur, sensor noise, JPEG) that the clean rendering lacks.
3. **Tissue it never saw**: skin, tiatoolbox_target (breast) and the Aperio slide region
   (cmu_small_region): nuclei counts per 100 x 100 um next to the baseline's, and outline
   overlays in ``<out>/segmenter_eval.png`` to inspect -- collapse would show as near-zero
   counts or blobs.

Metrics: binary PQ (DQ, SQ), detection F1 with centroids matched within 8 px (4 um),
foreground Dice, and mPQ+ over the classes present, for the segmenter and for the
hematoxylin threshold + watershed baseline (:func:`studio.nuclei.threshold_watershed_baseline`),
and a third row, ``true maps``: the segmenter's own post-processing applied to *perfect*
NP / HV / TP maps made from the labels -- the ceiling any model reaches with those
settings, which separates what the network gets wrong from what marker-controlled
watershed cannot recover (the smallest and the most curved nuclei).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipelines.segmenter import NucleiSegmenter
from studio.data.samples import load_hgsc_nest_labels, load_sample
from studio.metrics import (
    binary_pq_dataset,
    detection_confusion,
    detection_f1,
    dice,
    instance_centroids,
    multi_pq_plus,
)
from studio.nuclei import hovernet_postprocess, hv_targets, threshold_watershed_baseline
from studio.report import contact_sheet, overlay_labels, save_png
from studio.scanner import scanner_degrade

PHANTOM_HELD_OUT_SEED = 700_000  # training uses phantom seeds 1000.. (segmenter) and 2000.. (ControlNet)


def true_maps(inst: np.ndarray, cls: np.ndarray, seg: NucleiSegmenter) -> tuple[np.ndarray, np.ndarray]:
    """The segmenter's post-processing on perfect maps of a label map (its ceiling)."""
    k = max(seg.num_classes, int(cls.max(initial=0)))
    tp = np.eye(k + 1, dtype=np.float32)[np.where(inst > 0, cls, 0)].transpose(2, 0, 1)
    return hovernet_postprocess((inst > 0).astype(np.float32), hv_targets(inst), tp, config=seg.postprocess)


def score(truth: list[tuple[np.ndarray, np.ndarray]], pred: list[tuple[np.ndarray, np.ndarray | None]],
          num_classes: int = 5) -> dict:
    ti = [t[0] for t in truth]
    pi = [p[0] for p in pred]
    pq = binary_pq_dataset(ti, pi)
    f1 = [detection_f1(instance_centroids(t)[1], instance_centroids(p)[1], 8.0) for t, p in zip(ti, pi, strict=True)]
    tp, fp, fn = (sum(r[k] for r in f1) for k in ("tp", "fp", "fn"))
    out = {"pq": pq["pq"], "dq": pq["dq"], "sq": pq["sq"], "f1": 2 * tp / max(1, 2 * tp + fp + fn),
           "dice": float(np.mean([dice(t, p) for t, p in zip(ti, pi, strict=True)])),
           "nuclei_true": int(sum(len(np.unique(t[t > 0])) for t in ti)),
           "nuclei_pred": int(sum(len(np.unique(p[p > 0])) for p in pi))}
    # what is missed, by true class, and how many detections match nothing (any method: the
    # baseline's nuclei count as one class, only the true class of a missed nucleus matters)
    confusion = sum(detection_confusion(t[0], t[1], p[0], p[1] if p[1] is not None else (p[0] > 0).astype(np.uint8),
                                        num_classes) for t, p in zip(truth, pred, strict=True))
    out["missed_per_class"] = {str(c): [int(confusion[c, 0]), int(confusion[c].sum())]
                               for c in range(1, num_classes + 1) if confusion[c].sum()}
    out["false_detections"] = int(confusion[0].sum())
    if all(p[1] is not None for p in pred):
        m = multi_pq_plus(ti, [t[1] for t in truth], pi, [p[1] for p in pred], num_classes)
        out["mpq_plus"] = m["mpq_plus"]
        out["pq_per_class"] = [None if np.isnan(v) else round(float(v), 4) for v in m["pq"]]
    return out




def most_tissue(image: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` crop (on a half-size grid) with the most non-glass pixels."""
    h, w = image.shape[:2]
    best, where = -1.0, (0, 0)
    for y in range(0, h - size + 1, size // 2):
        for x in range(0, w - size + 1, size // 2):
            frac = float((image[y:y + size, x:x + size].mean(-1) < 215).mean())
            if frac > best:
                best, where = frac, (y, x)
    return image[where[0]:where[0] + size, where[1]:where[1] + size]


def median_area(inst: np.ndarray) -> float:
    sizes = np.bincount(inst.ravel())[1:]
    sizes = sizes[sizes > 0]
    return float(np.median(sizes)) if sizes.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/nuclei-segmenter")
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--tta", choices=("none", "flips", "dihedral"), default="none",
                        help="test-time augmentation of the segmenter (dihedral: 8 transforms, 8x time)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from studio.data.phantom_dataset import phantom_samples

    seg = NucleiSegmenter.from_pretrained(args.checkpoint, tta=False if args.tta == "none" else args.tta)
    results: dict = {"checkpoint": args.checkpoint, "tta": args.tta}
    rows = []

    # 1. the held-out band of the real labelled tile, in one pass
    image, inst, cls = load_hgsc_nest_labels()
    band = np.s_[:, 1125:]
    img, ti, tc = np.ascontiguousarray(image[band]), inst[band], cls[band]
    p_inst, p_cls, _ = seg.segment(img)
    b_inst, _ = threshold_watershed_baseline(img)
    results["hgsc_heldout"] = {"segmenter": score([(ti, tc)], [(p_inst, p_cls)]),
                               "baseline": score([(ti, tc)], [(b_inst, None)]),
                               "true maps": score([(ti, tc)], [true_maps(ti, tc, seg)])}
    crop = np.s_[600:856, :256]
    rows.append(("held-out real band (truth | segmenter | baseline)",
                 [("truth", overlay_labels(img[crop], ti[crop], tc[crop])),
                  ("segmenter", overlay_labels(img[crop], p_inst[crop], p_cls[crop])),
                  ("baseline", overlay_labels(img[crop], b_inst[crop]))]))

    # 2. held-out phantom tiles: the default preset cycle, and crowded tumour (touching nuclei),
    # each as rendered and through a scanner's blur / noise / JPEG
    sets = {"phantom_heldout": (None, False), "phantom_heldout_scanner": (None, True),
            "phantom_crowded": ("crowded", False), "phantom_crowded_scanner": ("crowded", True)}
    for key, (tissue, degrade) in sets.items():
        tiles = phantom_samples(args.phantoms, seed=PHANTOM_HELD_OUT_SEED, tissue=tissue)
        rng = np.random.default_rng(0)
        images = [scanner_degrade(s.image, rng) if degrade else np.ascontiguousarray(s.image) for s in tiles]
        seg_pred = [seg.segment(image)[:2] for image in images]
        base_pred = [(threshold_watershed_baseline(image)[0], None) for image in images]
        truth = [(s.inst, s.cls) for s in tiles]
        results[key] = {"segmenter": score(truth, seg_pred), "baseline": score(truth, base_pred),
                        "true maps": score(truth, [true_maps(s.inst, s.cls, seg) for s in tiles])}
        if not degrade:
            rows.append((f"held-out phantom{' (crowded)' if tissue else ''} (truth | segmenter | baseline)",
                         [("truth", overlay_labels(images[0], tiles[0].inst, tiles[0].cls)),
                          ("segmenter", overlay_labels(images[0], *seg_pred[0])),
                          ("baseline", overlay_labels(images[0], base_pred[0][0]))]))

    # 3. tissue it never saw. skin.tif has no pixel size; its nuclei are about half as long as
    # at 0.5 um/px (median baseline nucleus area ratio printed below), so it is read at ~1 um/px.
    unseen = {"skin": (load_sample("skin")[400:912, 300:812], 1.0),
              "breast (tiatoolbox_target)": (load_sample("tiatoolbox_target")[:512, :512], 0.5),
              "cmu slide region (0.499 um/px)": (most_tissue(load_sample("cmu_small_region"), 512), 0.499)}
    cells = []
    ref_area = median_area(threshold_watershed_baseline(img)[0])
    for name, (tile, mpp) in unseen.items():
        tile = np.ascontiguousarray(tile)
        i, c, info = seg.segment(tile, image_mpp=mpp)
        b, _ = threshold_watershed_baseline(tile)
        area = tile.shape[0] * tile.shape[1] * mpp * mpp / 1e4  # in units of 100 x 100 um
        results.setdefault("unseen_tissue", {})[name] = {
            "mpp": mpp, "baseline_nucleus_area_vs_hgsc": round(median_area(b) / ref_area, 2),
            "nuclei_per_100um2": round(int(i.max()) / area, 1), "baseline_per_100um2": round(int(b.max()) / area, 1),
            "class_counts": {str(k): v for k, v in info["class_counts"].items()}}
        cells += [(f"{name}: {int(i.max())}", overlay_labels(tile, i, c)), (f"baseline {int(b.max())}",
                                                                            overlay_labels(tile, b))]
    rows.append(("tissue never seen in training (segmenter | baseline)", cells))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segmenter_eval.json").write_text(json.dumps(results, indent=2) + "\n")
    save_png(contact_sheet(rows, cell=200), args.out / "segmenter_eval.png")
    print("| held-out set | method | PQ | DQ | SQ | detection F1 (8 px) | Dice | mPQ+ | nuclei (true / found) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, label in (("hgsc_heldout", "real hgsc_nest band"), ("phantom_heldout", "phantom tiles"),
                       ("phantom_heldout_scanner", "phantom tiles + scanner blur/noise/JPEG"),
                       ("phantom_crowded", "crowded phantom tiles (touching nuclei)"),
                       ("phantom_crowded_scanner", "crowded phantom tiles + scanner")):
        for method in ("segmenter", "baseline", "true maps"):
            r = results[key][method]
            mpq = f"{r['mpq_plus']:.3f}" if "mpq_plus" in r else "-"
            print(f"| {label} | {method} | {r['pq']:.3f} | {r['dq']:.3f} | {r['sq']:.3f} | {r['f1']:.3f} | "
                  f"{r['dice']:.3f} | {mpq} | {r['nuclei_true']} / {r['nuclei_pred']} |")
    print("\nmissed / labelled nuclei per true class (PanNuke codes), false detections:")
    for key in results:
        if key.startswith("phantom"):
            for method in ("segmenter", "baseline", "true maps"):
                r = results[key][method]
                print(f"  {key} {method}: {r['missed_per_class']}, false {r['false_detections']}")
    for name, r in results["unseen_tissue"].items():
        print(f"{name} at {r['mpp']} um/px: {r['nuclei_per_100um2']} nuclei per 100x100 um (baseline "
              f"{r['baseline_per_100um2']}; baseline nucleus area {r['baseline_nucleus_area_vs_hgsc']}x hgsc's), "
              f"classes {r['class_counts']}")
    print(f"wrote {args.out / 'segmenter_eval.json'} and {args.out / 'segmenter_eval.png'}")


if __name__ == "__main__":
    main()

"""Do generated nuclei look like their labels? The shipped segmenter reads synthetic and real tiles.

    python bench/synthetic_audit.py DATASET [--checkpoint checkpoints/nuclei-segmenter] [--out docs/]

Synthetic patches (e.g. ``histostudio generate rare`` output) carry the label maps they were
drawn to. A segmenter that learned from real tissue is run on them, and on the real
held-out band of hgsc_nest (never in the segmenter's training) for scale. Per class,
pooled over tiles (:func:`studio.metrics.detection_confusion`, centroids within 8 px):

* **recall**: share of labelled nuclei the segmenter finds;
* **typed as labelled**: share of the found ones it assigns the labelled class;
* **called as**: what it calls them instead (the confusion row).

If a class is found and typed on real tissue but not on the synthetic patches, the
generator does not draw that class the way real tissue shows it: synthetic labels of
that class then teach a segmenter a look it will not meet (label noise for exactly the
class the synthetic data was meant to add). Writes ``<out>/synthetic_audit.json``.

    python bench/synthetic_audit.py --render checkpoints/mask-ldm [--n 8] [--out docs/]

Separates the generator from the layout edits: real label maps of each hgsc_nest band
(train, held-out; 256 px crops) are drawn unchanged by the mask-conditioned generator and
audited beside the real band images they came from. (The segmenter trained on the train
band, so its figures on the real train band are optimistic.) Writes
``<out>/synthetic_audit_render.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def audit(segmenter, samples, num_classes: int) -> np.ndarray:
    from studio.metrics import detection_confusion

    total = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image, inst, cls in samples:
        pred_inst, pred_cls, _ = segmenter.segment(np.ascontiguousarray(image))
        total += detection_confusion(inst, cls, pred_inst, pred_cls, num_classes)
    return total


def summary(confusion: np.ndarray, classes: dict[int, str]) -> dict[str, dict]:
    out = {}
    for code, name in classes.items():
        row = confusion[code]
        n, found = int(row.sum()), int(row[1:].sum())
        if n == 0:
            continue
        called = {classes.get(p, "?"): int(row[p]) for p in range(1, len(row)) if row[p] and p != code}
        out[name] = {"n": n, "recall": found / n, "typed_as_labelled": row[code] / found if found else float("nan"),
                     "called_as": called}
    return out


def print_rows(result: dict, sets: list[tuple[str, str]]) -> None:
    print("| set | class | nuclei | recall | typed as labelled | called instead |\n|---|---|---|---|---|---|")
    for key, title in sets:
        for name, row in result[key].items():
            instead = ", ".join(f"{c} {n}" for c, n in sorted(row["called_as"].items(), key=lambda x: -x[1])) or "-"
            print(f"| {title} | {name} | {row['n']} | {row['recall']:.2f} | {row['typed_as_labelled']:.2f} | "
                  f"{instead} |")


def render_real_layouts(generator: str, n: int, seed: int = 0, size: int = 256) -> dict[str, list]:
    """Band -> ``n`` (generated image, inst, cls) drawn by ``generator`` on real label maps of it."""
    import torch

    from pipelines.mask_to_image import MaskToImagePipeline
    from studio.io import to_uint8
    from studio.layouts import LayoutSource

    pipe = MaskToImagePipeline.from_pretrained(generator)
    out = {}
    for split in ("train", "heldout"):
        source = LayoutSource("hgsc_nest", size, pipe.classes, split=split)
        rng = np.random.default_rng(seed)
        layouts = [source.draw(rng) for _ in range(n)]
        images = pipe([(lay.inst, lay.cls) for lay in layouts], num_inference_steps=20, guidance_scale=2.0,
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type="pt",
                      progress=False).images
        out[split] = [(image, lay.inst, lay.cls) for image, lay in zip(to_uint8(images), layouts, strict=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipelines.segmenter import NucleiSegmenter
    from studio.data.registry import open_dataset
    from studio.data.samples import PANNUKE_CLASSES, load_hgsc_nest_labels
    from studio.data.splits import split_bounds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, nargs="?", help="synthetic dataset folder (PanNuke / CoNIC / folder layout)")
    p.add_argument("--render", metavar="GENERATOR", default=None,
                   help="instead of a dataset: a MaskToImagePipeline folder drawn on real label maps of each band")
    p.add_argument("--n", type=int, default=8, help="--render: label maps per band")
    p.add_argument("--checkpoint", default="checkpoints/nuclei-segmenter")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    segmenter = NucleiSegmenter.from_pretrained(args.checkpoint)
    classes = dict(PANNUKE_CLASSES)
    k = len(classes)
    if (args.dataset is None) == (args.render is None):
        p.error("give a synthetic DATASET or --render GENERATOR")
    if args.render:
        image, inst, cls = load_hgsc_nest_labels()
        result = {"generator": args.render, "checkpoint": str(args.checkpoint), "n_per_band": args.n}
        sets = []
        for split, drawn in render_real_layouts(args.render, args.n).items():
            y0, y1, x0, x1 = split_bounds("hgsc_nest", split)
            band = [(image[y0:y1, x0:x1], inst[y0:y1, x0:x1], cls[y0:y1, x0:x1])]
            result[f"rendered_{split}"] = summary(audit(segmenter, drawn, k), classes)
            result[f"real_{split}"] = summary(audit(segmenter, band, k), classes)
            sets += [(f"rendered_{split}", f"{split} band, generated ({len(drawn)} real maps)"),
                     (f"real_{split}", f"{split} band, real image")]
        print_rows(result, sets)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "synthetic_audit_render.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out / 'synthetic_audit_render.json'}")
        return 0

    dataset = open_dataset(args.dataset)
    if dict(dataset.classes) != classes:
        p.error(f"{args.dataset}: class table {dataset.classes} is not PanNuke's {classes}")
    synthetic = [(s.image, s.inst, s.cls) for s in (dataset.read(i) for i in range(len(dataset)))]
    y0, y1, x0, x1 = split_bounds("hgsc_nest", "heldout")
    image, inst, cls = load_hgsc_nest_labels()
    real = [(image[y0:y1, x0:x1], inst[y0:y1, x0:x1], cls[y0:y1, x0:x1])]  # the band as one image
    result = {"dataset": str(args.dataset), "checkpoint": str(args.checkpoint),
              "synthetic": summary(audit(segmenter, synthetic, k), classes),
              "real_heldout": summary(audit(segmenter, real, k), classes),
              "tiles": {"synthetic": len(synthetic), "real_heldout": len(real)}}
    print_rows(result, [("synthetic", f"synthetic ({len(synthetic)} tiles)"),
                        ("real_heldout", f"real held-out band ({real[0][0].shape[1]}x{real[0][0].shape[0]} px)")])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic_audit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out / 'synthetic_audit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

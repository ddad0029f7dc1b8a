"""Does the mask-conditioned model draw the nuclei it is given? Measured on held-out layouts.

    python bench/mask_fidelity.py [--checkpoint checkpoints/mask-ldm] [--n 32] [--size 128] [--out docs/]

1. **Mask fidelity**: for ``n`` held-out label maps (hgsc_nest's held-out band, never seen
   in training, each edited to hold ``--rare`` dead nuclei, plus phantom layouts drawn
   from seeds the training never used), nuclei are found in the generated image and
   matched to the conditioning map: object-level F1 (centroids within 8 px), foreground
   Dice, and per-class recall (per-class F1 too when the detector classifies). The
   *unconditioned* sample is the same model and seed with the ControlNet switched off
   (scale 0, no guidance): what the base model draws without a mask. Detector:
   hematoxylin threshold + watershed (``--detector watershed``, default: needs nothing
   trained) or the shipped segmenter (``--detector segmenter``, classifies too).
2. **Diversity**: the same map with ``--seeds`` seeds: mean pairwise 1 - SSIM and mean
   pairwise CIEDE2000 between the images (0 would mean the seed does nothing), beside the
   same numbers between images of *different* maps for scale.

Writes ``<out>/mask_fidelity.json`` and ``<out>/mask_fidelity.png`` (maps, conditioned,
unconditioned, and seed variations) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.mask_to_image import MaskToImagePipeline
from studio.io import to_uint8
from studio.layouts import LayoutEditor, LayoutSource
from studio.metrics import ciede2000, mask_fidelity, ssim
from studio.report import contact_sheet, overlay_labels, save_png


def held_out_layouts(classes: dict[int, str], size: int, n: int, rare: int, seed: int) -> list[tuple]:
    """Half real held-out maps (each with ``rare`` dead nuclei added), half phantom layouts."""
    rng = np.random.default_rng(seed)
    real = LayoutSource("hgsc_nest", size, classes, split="heldout")
    editor = LayoutEditor(real.stats())
    dead = next(c for c, name in classes.items() if name == "dead")
    out = []
    while len(out) < n // 2:
        lay = editor.exact_counts(real.draw(rng), {dead: rare}, rng)
        if lay is not None:
            out.append(("real held-out", lay))
    phantom = LayoutSource("phantom", size, classes, tissue="mixed")
    while len(out) < n:
        out.append(("phantom", phantom.draw(rng).relabelled()))
    return out


def generate(pipe, layouts, steps: int, guidance: float, seed: int, batch: int = 8, **kw) -> np.ndarray:
    images = []
    for i in range(0, len(layouts), batch):
        part = layouts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(part))]
        images.append(to_uint8(pipe([(lay.inst, lay.cls) for lay in part], num_inference_steps=steps,
                                    guidance_scale=guidance, generator=gens, output_type="pt", progress=False,
                                    **kw).images))
    return np.concatenate(images)


def detector(kind: str):
    if kind == "segmenter":
        from pipelines.segmenter import NucleiSegmenter
        from studio.info import checkpoints_dir

        seg = NucleiSegmenter.from_pretrained(checkpoints_dir() / "nuclei-segmenter")
        return lambda image: seg.segment(np.ascontiguousarray(image))[:2]
    from studio.nuclei import threshold_watershed_baseline

    return lambda image: (threshold_watershed_baseline(image)[0], None)


def summarise(rows: list[dict], classes: dict[int, str]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("f1", "precision", "recall", "dice")}
    per = {}
    for c, name in classes.items():
        rec = [r["per_class"][c]["recall"] for r in rows if r["per_class"][c]["n"]]
        f1 = [r["per_class"][c].get("f1", np.nan) for r in rows if r["per_class"][c]["n"]]
        if rec:
            per[name] = {"nuclei": int(sum(r["per_class"][c]["n"] for r in rows)),
                         "recall": float(np.mean(rec)), "f1": float(np.nanmean(f1)) if not np.all(np.isnan(f1))
                         else None}
    out["per_class"] = per
    return out


def pairwise(images: np.ndarray) -> tuple[float, float]:
    """Mean pairwise (1 - SSIM, CIEDE2000) over all pairs of uint8 images."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pairs = list(itertools.combinations(range(len(t)), 2))
    a = torch.stack([t[i] for i, _ in pairs])
    b = torch.stack([t[j] for _, j in pairs])
    return float((1 - ssim(a, b)).mean()), float(ciede2000(a, b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/mask-ldm")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rare", type=int, default=3, help="dead nuclei added to each real held-out map")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per map for diversity")
    parser.add_argument("--detector", choices=["watershed", "segmenter"], default="watershed")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = MaskToImagePipeline.from_pretrained(args.checkpoint)
    classes = pipe.classes
    layouts = held_out_layouts(classes, args.size, args.n, args.rare, args.seed)
    detect = detector(args.detector)
    t0 = time.perf_counter()
    cond = generate(pipe, [lay for _, lay in layouts], args.steps, args.guidance, args.seed)
    seconds = time.perf_counter() - t0
    free = generate(pipe, [lay for _, lay in layouts], args.steps, 1.0, args.seed, controlnet_conditioning_scale=0.0)

    results: dict = {"checkpoint": args.checkpoint, "detector": args.detector, "n": args.n, "size": args.size,
                     "steps": args.steps, "guidance": args.guidance,
                     "seconds_per_image": round(seconds / len(layouts), 3)}
    for group in ("real held-out", "phantom", "all"):
        idx = [i for i, (g, _) in enumerate(layouts) if group in ("all", g)]
        for name, images in (("conditioned", cond), ("unconditioned", free)):
            rows = []
            for i in idx:
                inst, cls = detect(images[i])
                lay = layouts[i][1]
                rows.append(mask_fidelity(lay.inst, lay.cls, inst, cls, num_classes=len(classes)))
            results.setdefault(group, {})[name] = summarise(rows, classes)

    # diversity: the first 4 maps, each with several seeds
    k = min(4, len(layouts))
    variations = [generate(pipe, [layouts[i][1]] * args.seeds, args.steps, args.guidance, 10_000 * (i + 1))
                  for i in range(k)]
    same_map = [pairwise(v) for v in variations]
    across = pairwise(np.stack([v[0] for v in variations]))
    results["diversity"] = {"seeds": args.seeds, "maps": k,
                            "same_map_1_minus_ssim": float(np.mean([s[0] for s in same_map])),
                            "same_map_ciede2000": float(np.mean([s[1] for s in same_map])),
                            "different_maps_1_minus_ssim": across[0], "different_maps_ciede2000": across[1]}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask_fidelity.json").write_text(json.dumps(results, indent=2) + "\n")
    show = list(range(0, len(layouts), max(1, len(layouts) // 8)))[:8]
    white = np.full((args.size, args.size, 3), 255, np.uint8)
    rows = [("conditioning maps (class colours)", [(layouts[i][0], overlay_labels(white, layouts[i][1].inst,
                                                                                  layouts[i][1].cls)) for i in show]),
            ("mask-conditioned", [(f"{i}", cond[i]) for i in show]),
            ("outlines on the generated image", [(f"{i}", overlay_labels(cond[i], layouts[i][1].inst,
                                                                         layouts[i][1].cls)) for i in show]),
            ("same seed, ControlNet off", [(f"{i}", free[i]) for i in show]),
            (f"map 0, {args.seeds} seeds", [(f"seed {j}", im) for j, im in enumerate(variations[0])])]
    save_png(contact_sheet(rows, cell=128), args.out / "mask_fidelity.png")

    print(f"| layouts ({args.detector}) | variant | F1 | Dice | " + " | ".join(f"recall {n}" for n in classes.values())
          + " |")
    print("|---|---|---|---|" + "---|" * len(classes))
    for group in ("real held-out", "phantom", "all"):
        for name in ("conditioned", "unconditioned"):
            r = results[group][name]
            per = [f"{r['per_class'][n]['recall']:.2f}" if n in r["per_class"] else "-" for n in classes.values()]
            print(f"| {group} | {name} | {r['f1']:.3f} | {r['dice']:.3f} | " + " | ".join(per) + " |")
    d = results["diversity"]
    print(f"\ndiversity ({d['seeds']} seeds x {d['maps']} maps): same map 1-SSIM {d['same_map_1_minus_ssim']:.3f}, "
          f"dE00 {d['same_map_ciede2000']:.2f}; different maps 1-SSIM {d['different_maps_1_minus_ssim']:.3f}, "
          f"dE00 {d['different_maps_ciede2000']:.2f}")
    print(f"{results['seconds_per_image']:.2f} s per {args.size}px image ({args.steps} steps, CFG)")
    print(f"wrote {args.out / 'mask_fidelity.json'} and {args.out / 'mask_fidelity.png'}")


if __name__ == "__main__":
    main()

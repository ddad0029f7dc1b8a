"""Does adding synthetic tiles rich in a rare class help the nucleus segmenter on that class?

    python bench/augment_experiment.py                        # both parts, ~28 min on a busy 2-core CPU
    python bench/augment_experiment.py --parts real --steps 300   # the README's run (~65 min, one thread)
    python bench/augment_experiment.py --parts real --seeds 5 --steps 400
    python bench/augment_experiment.py --steps 3000 --batch-size 16 --threads 8   # a GPU / a big CPU
    python bench/augment_experiment.py --tiny                 # smoke run: toy model, 2 steps (~1 min)

Two parts, each :func:`training.experiment.run_augment_experiment` (same splits and seeds
for every variant; mean ± sd over seeds, paired differences to the baseline):

1. **real** -- real data first: the shipped labelled hgsc_nest tile. Training on its train
   region, evaluation on its held-out band (x >= 1125, never seen in training). One class
   is made scarce in the *training* tiles (``--scarce-keep`` of its distinct nuclei kept,
   by dropping whole training crops). The class is chosen by measurement
   (``--scarce-class auto``): the class with the most held-out nuclei, because a per-class
   PQ on a handful of nuclei is noise. Measured census (distinct nuclei, train / held-out):
   neoplastic 264 / 7, inflammatory 559 / 12, connective 184 / 143 -- the held-out band is
   mostly stroma, so connective is the only class the held-out set can score.
   **Synthetic = generated patches** (default ``--synthetic generated``): the shipped
   rare-class generator (``checkpoints/mask-ldm``, mask-conditioned latent diffusion) draws
   ``--synthetic-n`` patches with ``--per-patch`` nuclei of the scarce class each, the
   labels being the conditioning maps (cached under ``--out``). Base maps
   (``--synthetic-base``): ``auto`` (default) = phantom layouts of the tissue the class
   lives in (connective: stroma), because the generator draws a nucleus like its
   neighbours; ``hgsc_nest`` = label maps of the *training* band (its connective nuclei sit
   among lymphocytes and come out lymphocyte-like). ``--synthetic phantom`` swaps in
   procedural phantom tiles rich in the class (exact labels, another domain),
   ``--synthetic DIR`` any dataset written by ``histostudio generate rare``.
2. **phantom** -- the same on phantom data: train on phantom tiles, evaluate on held-out
   phantom tiles (a seeded 25 % of the tiles) with exact truth, the same class made
   scarce (part 1's choice; with ``--parts phantom`` alone, ``auto`` chooses on the phantom
   census), synthetic = other phantom tiles rich in it (no domain gap: the best case for
   added data). Phantom tiles cycle through tissue presets and most hold connective
   nuclei, so making it scarce drops more than half of the phantom training tiles
   (measured at the defaults: 14 of 36 kept, 43 of 235 connective nuclei).

Each part writes ``results.json`` / ``results.md`` / ``results.png`` under ``--out`` and the
tables are printed. Default budget: 2 parts x 2 variants x 3 seeds x 50 steps of the
recipe's model (batch 8 x 128 px) at ~2.5 s per step on one thread of a 2-core CPU busy
with other jobs, plus ~10 s per run for set-up and evaluation: about 28 min. That is a
weakly trained model: read the paired differences, and scale up with ``--steps``,
``--seeds``, ``--batch-size`` where there is a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

STAND_IN_NOTE = ("Synthetic tiles are procedural phantoms rich in the scarce class (--synthetic phantom): exact "
                 "labels from another domain, not generated look-alikes of the real tissue.")


def choose_class(census: dict, requested: str) -> str:
    """``auto``: the class with the most held-out nuclei (ties: more training nuclei)."""
    if requested != "auto":
        return requested
    held, train = census["heldout"], census["train"]
    return max(held, key=lambda name: (held[name], train.get(name, 0)))


def synthetic_base(requested: str, class_name: str) -> str:
    """``auto``: phantom layouts of the class' home tissue (:data:`studio.layouts.HOME_TISSUE`)."""
    from studio.layouts import home_tissue

    return f"phantom:{home_tissue([class_name])}" if requested == "auto" else requested


def generate_synthetic(args: argparse.Namespace, class_name: str, count: int) -> str:
    """The real part's synthetic set: ``count`` patches from the rare-class generator, each
    with ``--per-patch`` nuclei of the scarce class added to a label map of the hgsc_nest
    *training* band (never the held-out band). Cached under ``--out``: a rerun with the same
    request reuses it."""
    from pipelines.rare_generation import RareRequest, generate_rare

    base_labels = synthetic_base(args.synthetic_base, class_name)
    base = "" if base_labels == "hgsc_nest" else "_" + base_labels.replace(":", "_")
    folder = args.out / f"generated_{class_name}_{count}x{args.per_patch}{base}_seed0"
    if args.tiny:
        folder = folder.with_name(folder.name + "_tiny")
    if (folder / "provenance.json").is_file():
        from pipelines.rare_generation import pipeline_digest

        made_with = json.loads((folder / "provenance.json").read_text()).get("checkpoint_digest")
        if made_with == pipeline_digest(args.generator):
            print(f"  synthetic: reusing {folder}", flush=True)
            return str(folder)
        print(f"  synthetic: {folder} was drawn with other weights than {args.generator}; regenerating", flush=True)
    print(f"  synthetic: generating {count} patches of {class_name} with {args.generator} -> {folder}", flush=True)
    labels, _, tissue = base_labels.partition(":")
    request = RareRequest(labels=labels, classes=class_name, count=count, out=str(folder), tissue=tissue or "tumor",
                          per_patch=args.per_patch, checkpoint=args.generator, seed=0, split="train",
                          size=128 if args.tiny else 256, steps=2 if args.tiny else 20, overwrite=True)
    generate_rare(request, log=lambda line: print(f"  {line}", flush=True))
    return str(folder)


def synthetic_note(folder: str) -> str:
    """What the synthetic set is, from the generator's own provenance record."""
    prov_path = Path(folder) / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    req = prov.get("request", {})
    if req.get("labels") == "hgsc_nest":
        base = f"label maps of the hgsc_nest {req.get('split', 'train')} band"
    elif req.get("labels") == "phantom":
        base = f"phantom {req.get('tissue')} layouts (no real labels)"
    else:
        base = f"label maps from {req.get('labels', 'an unrecorded source')}"
    return (f"Synthetic tiles: {folder}, written by the rare-class generator (mask-conditioned diffusion on {base}, "
            f"{req.get('per_patch', '?')} nuclei of the scarce class each); labels are the conditioning maps.")


def print_census(title: str, census: dict, chosen: str) -> None:
    print(f"\n{title}: distinct nuclei per class ({census['tiles']['train']} training tiles / "
          f"{census['tiles']['heldout']} held-out tiles; {census['split']})")
    print(f"  {'class':<14}{'train':>7}{'held-out':>10}")
    for name in census["train"]:
        mark = "  <- made scarce" if name == chosen else ""
        print(f"  {name:<14}{census['train'][name]:>7}{census['heldout'].get(name, 0):>10}{mark}")


def table(result: dict) -> str:
    """The results.md tables (from the first table row on)."""
    from training.experiment import results_markdown

    lines = results_markdown(result).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant"))
    return "\n".join(lines[start:])


def main(argv: list[str] | None = None) -> int:
    from training.experiment import DEFAULT_SCARCE_KEEP, class_census, run_augment_experiment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/augment_experiment"))
    p.add_argument("--parts", default="real,phantom", help="comma-separated: real, phantom")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--widths", default="24,48,96,192", help="HoVerNetLite encoder widths")
    p.add_argument("--scarce-class", default="auto", help="a class name, or 'auto' (most held-out nuclei)")
    p.add_argument("--scarce-keep", type=float, default=DEFAULT_SCARCE_KEEP)
    p.add_argument("--synthetic-ratio", type=float, default=0.3)
    p.add_argument("--synthetic-n", type=int, default=48, help="synthetic tiles (generated or phantom)")
    p.add_argument("--synthetic", default="generated",
                   help="'generated' (the shipped rare-class generator draws --synthetic-n patches of the scarce "
                        "class on label maps of the training band, cached under --out), 'phantom' (procedural "
                        "stand-in) or a dataset folder written by `histostudio generate rare`; used by the real "
                        "part, the phantom part always uses phantom tiles")
    p.add_argument("--per-patch", type=int, default=6, help="scarce-class nuclei added to every generated patch")
    p.add_argument("--synthetic-base", default="auto",
                   help="base label maps for 'generated': auto (phantom layouts of the tissue the scarce class lives "
                        "in: connective -> stroma, inflammatory -> inflamed, ...), hgsc_nest (its training band) or "
                        "phantom:<tissue>")
    p.add_argument("--generator", default="checkpoints/mask-ldm", help="MaskToImagePipeline folder for 'generated'")
    p.add_argument("--phantom-n", type=int, default=48, help="phantom tiles of part 2 (split 75/25)")
    p.add_argument("--stain-augment", action="store_true", help="add the stain-augmentation variant")
    p.add_argument("--tta-normalize", default=None, help="add baseline + test-time normalization (macenko, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke run: toy model, 2 steps, 1 seed, few tiles")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_options = {"batch_size": args.batch_size, "crop_size": args.crop_size,
                     "widths": tuple(int(w) for w in args.widths.split(","))}
    hgsc = {"name": "hgsc_nest"}
    phantom_real = {"name": "phantom", "n": args.phantom_n, "seed": 1000}
    syn_n = args.synthetic_n
    if args.tiny:
        args.seeds, args.steps = min(args.seeds, 2), 2
        train_options = {"batch_size": 2, "crop_size": 64, "widths": (8, 16, 16), "decoder_scale": 1.0}
        hgsc = {"name": "hgsc_nest", "stride": 256}
        phantom_real = {"name": "phantom", "n": 8, "seed": 1000}
        syn_n = 4

    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - {"real", "phantom"})
    if unknown:
        p.error(f"unknown parts {unknown}; use real and/or phantom")
    start = time.time()

    def progress(event: dict) -> None:
        kind = event["event"]
        if kind == "data":
            sc = event.get("scarcity") or {}
            extra = f"; scarce {sc.get('class_name')}: {sc.get('nuclei_after')}/{sc.get('nuclei_before')} " \
                    f"nuclei, {sc.get('tiles_after')}/{sc.get('tiles_before')} tiles kept" if sc else ""
            print(f"  data: {event['real_train']} real training tiles, {event['synthetic']} synthetic, "
                  f"{event['heldout']} held-out{extra}", flush=True)
        elif kind == "run_done":
            m = event["metrics"]
            print(f"  [{event['index'] + 1}/{event['count']}] {event['variant']:<14} seed {event['seed']}: "
                  f"PQ {m['pq']:.3f} mPQ+ {m['mpq_plus']:.3f} (train {event['train_seconds']:.0f} s, "
                  f"eval {event['eval_seconds']:.0f} s, {time.time() - start:.0f} s so far)", flush=True)
        elif kind == "evaluated":
            m = event["metrics"]
            print(f"        {event['variant']:<14} seed {event['seed']}: PQ {m['pq']:.3f} mPQ+ {m['mpq_plus']:.3f}",
                  flush=True)

    summary = {}
    chosen = None
    for part in parts:
        real = hgsc if part == "real" else phantom_real
        census = class_census(real)
        # The phantom part asks the real part's question: same scarce class.
        chosen = chosen or choose_class(census, args.scarce_class)
        title = ("hgsc_nest (real), scarce " if part == "real" else "phantom (exact truth), scarce ") + chosen
        print_census(f"[{part}] {title}", census, chosen)
        out = args.out / part
        print(f"[{part}] {args.seeds} seed(s) x {args.steps} steps -> {out}", flush=True)
        generated = part == "real" and args.synthetic != "phantom"
        synthetic_dir = args.synthetic
        if generated and args.synthetic == "generated":
            synthetic_dir = generate_synthetic(args, chosen, syn_n)
        elif generated and not Path(args.synthetic).is_dir():
            p.error(f"--synthetic {args.synthetic}: no such dataset folder (write one with histostudio generate rare)")
        synthetic = synthetic_dir if generated else {"name": "phantom", "n": syn_n, "seed": 50_000}
        generated_note = synthetic_note(synthetic_dir) if generated else ""
        notes = ([generated_note] if generated else [STAND_IN_NOTE]) if part == "real" else [
            "Phantom part: real = phantom tiles (exact labels), held-out = a seeded 25 % of them; synthetic = other "
            "phantom tiles rich in the scarce class (same domain: the best case for added data)."]
        result = run_augment_experiment(
            real, synthetic, out, seeds=args.seeds,
            stain_augment=args.stain_augment, tta_normalize=args.tta_normalize, steps=args.steps,
            synthetic_ratio=args.synthetic_ratio, scarce_class=chosen, scarce_keep=args.scarce_keep,
            threads=args.threads, progress=progress, train_options=train_options, title=title, notes=notes,
            overwrite=args.overwrite)
        print(f"\n## {title}\n")
        if part == "real":
            print(f"NOTE: {notes[0]}\n")
        print(table(result))
        print(f"\nwrote {out / 'results.json'}, results.md, results.png")
        summary[part] = {"results": str(out / "results.json"), "seconds": result["timings"]["total_seconds"]}
    print(f"\ntotal {time.time() - start:.0f} s: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

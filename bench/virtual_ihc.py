"""How well does virtual IHC predict the stain? Held-out pairs, both translators, a naive baseline.

    python bench/virtual_ihc.py [--checkpoint checkpoints/virtual-ihc-her2] [--n 48] [--out docs/]

Pairs (:mod:`studio.data.ihc_pairs`) from seeds training never draws: phantom H&E with
its IHC truth, **misregistered** like consecutive sections (shift, rotation, elastic) and
**aligned** (the same pairs without the warp). Metrics against the truth:

* PSNR and SSIM (pixel agreement; misalignment caps them, which is why both are reported);
* Fréchet distance in the built-in SSL encoder's feature space (realism of the set;
  alignment-free);
* DAB-positive area (:func:`studio.dab.dab_positive_fraction` on prediction and truth):
  Pearson correlation over the pairs and mean absolute error (alignment-free: the number
  a pathologist reads off the slide).

Methods: the naive baseline (hematoxylin re-coloured in DAB tones: every nucleus
"positive"), the fast translator, and the diffusion translator when the checkpoint has
one; plus tiles/s of each at 256 px. Real held-out H&E (hgsc_nest's held-out band, skin)
goes through each model for a visual check; the diffusion model is run twice with one
seed to confirm determinism.

Writes ``<out>/virtual_ihc.json`` and ``<out>/virtual_ihc.png``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.virtual_ihc import VirtualIHCPipeline
from studio.dab import dab_positive_fraction
from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs
from studio.io import to_tensor, to_uint8
from studio.metrics import encoder_features, frechet_distance, psnr, ssim
from studio.report import contact_sheet, save_png


def naive_baseline(he: np.ndarray) -> np.ndarray:
    """Hematoxylin re-coloured in DAB tones (no counterstain): what 'IHC' would look like if
    every hematoxylin-stained structure were marker-positive."""
    from studio.color import compose_rgb, hematoxylin_od
    from studio.data.phantom import IHC_MATRIX

    h = hematoxylin_od(to_tensor(he))
    conc = torch.cat([0.3 * h, h], dim=1)  # light counterstain, DAB = hematoxylin
    return to_uint8(compose_rgb(conc, IHC_MATRIX))


def run_method(method: str, pipe: VirtualIHCPipeline | None, he: np.ndarray, seed: int = 0, steps: int = 6,
               batch: int = 8, **diffusion: object) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    outs = []
    for i in range(0, len(he), batch):
        part = he[i:i + batch]
        if method == "naive":
            outs.append(naive_baseline(part))
        else:
            extra = diffusion if method == "diffusion" else {}
            img = pipe(part, model=method, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                       output_type="pt", **extra).images
            outs.append(to_uint8(img))
    return np.concatenate(outs), time.perf_counter() - start


def score(pred: np.ndarray, truth: np.ndarray, encoder) -> dict[str, float]:
    p, t = to_tensor(pred), to_tensor(truth)
    area_p = np.array([dab_positive_fraction(x) for x in pred])
    area_t = np.array([dab_positive_fraction(x) for x in truth])
    corr = float(np.corrcoef(area_p, area_t)[0, 1]) if area_p.std() > 0 and area_t.std() > 0 else 0.0
    embed = encoder.embed  # (b, 1, D) global tokens
    fd = frechet_distance(encoder_features(embed, p), encoder_features(embed, t))
    return {"psnr": float(psnr(p, t).mean()), "ssim": float(ssim(p, t).mean()), "fd": float(fd),
            "dab_area_corr": corr, "dab_area_mae_pct": float(100 * np.abs(area_p - area_t).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/virtual-ihc-her2")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=None,
                        help="fast-prior and residual translators: noise level sampling starts from "
                             "(default: the trained one)")
    parser.add_argument("--detail", default="prior", help="fast-prior and residual translators: prior or model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.encoders import load_encoder

    pipe = VirtualIHCPipeline.from_pretrained(args.checkpoint)
    stain = pipe.config.stain
    encoder = load_encoder("builtin")
    methods = ["naive", *pipe.models]
    refine = {}
    if getattr(pipe.config, "diffusion_prior", "none") != "none":
        refine = {"strength": args.strength, "detail": args.detail}
    results: dict = {"checkpoint": args.checkpoint, "stain": stain, "n": args.n, "size": args.size,
                     "steps": args.steps, "refiner": refine}
    shown: dict[str, np.ndarray] = {}
    for setting, aligned in (("misregistered", False), ("aligned", True)):
        pairs = phantom_pairs(args.n, args.size, stain, seed=IHC_SEEDS_HELD_OUT, aligned=aligned)
        he = np.stack([p.he for p in pairs])
        truth = np.stack([p.ihc for p in pairs])
        if setting == "misregistered":
            shown["H&E (held-out phantom)"], shown["IHC truth (misregistered)"] = he[:6], truth[:6]
        for method in methods:
            pred, seconds = run_method(method, pipe, he, args.seed, args.steps, **refine)
            row = score(pred, truth, encoder)
            row["tiles_per_s"] = len(he) / seconds
            results.setdefault(setting, {})[method] = row
            if setting == "misregistered":
                shown[f"{method}"] = pred[:6]
    # real H&E the model never trained on
    from studio.data.samples import load_sample
    from studio.data.splits import region

    real = np.stack([np.ascontiguousarray(region("hgsc_nest", "heldout")[300:300 + args.size, :args.size]),
                     np.ascontiguousarray(region("hgsc_nest", "heldout")[900:900 + args.size, 100:100 + args.size]),
                     np.ascontiguousarray(load_sample("skin")[500:500 + args.size, 400:400 + args.size])])
    rows = [(name, [(f"{i}", im) for i, im in enumerate(images)]) for name, images in shown.items()]
    rows.append(("real held-out H&E", [(f"{i}", im) for i, im in enumerate(real)]))
    for method in pipe.models:
        a, _ = run_method(method, pipe, real, seed=7, steps=args.steps, **refine)
        b, _ = run_method(method, pipe, real, seed=7, steps=args.steps, **refine)
        results.setdefault("real_he", {})[method] = {
            "deterministic_for_a_seed": bool(np.array_equal(a, b)),
            "dab_positive_pct": [round(100 * dab_positive_fraction(x), 2) for x in a]}
        rows.append((f"virtual {stain}: {method}", [(f"{i}", im) for i, im in enumerate(a)]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "virtual_ihc.json").write_text(json.dumps(results, indent=2) + "\n")
    save_png(contact_sheet(rows, cell=160), args.out / "virtual_ihc.png")
    print(f"| {stain} held-out phantom pairs (n={args.n}) | method | PSNR | SSIM | FD (SSL) | DAB-area r | "
          "DAB-area MAE (pp) | tiles/s |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in ("misregistered", "aligned"):
        for method in methods:
            r = results[setting][method]
            print(f"| {setting} | {method} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fd']:.2f} | "
                  f"{r['dab_area_corr']:.3f} | {r['dab_area_mae_pct']:.2f} | {r['tiles_per_s']:.1f} |")
    print(f"real H&E: {results.get('real_he')}")
    print(f"wrote {args.out / 'virtual_ihc.json'} and {args.out / 'virtual_ihc.png'}")


if __name__ == "__main__":
    main()

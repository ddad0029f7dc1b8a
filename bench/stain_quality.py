"""Stain normalization quality against a known truth: classical methods, the one-step
regressor and the diffusion normalizer, one table.

    python bench/stain_quality.py [--fuser checkpoints/stain-fuser] [--regressor checkpoints/stain-fuser-regressor]

Held-out truth: 128x128 tiles (``--size``) of the *held-out* band (250 px wide) of ``tiatoolbox_target`` (never in
training), real pixels in the target stain. Sources: the same tiles under known shifts
(:data:`studio.data.stain_pairs.KNOWN_SHIFTS`): stain shifts of the training family
("lab-a", "lab-b", "faded") and scanner-like changes outside it ("scanner-tone",
"desaturated"). Reference: tiles of the *train* band of the same image (the target stain,
other tissue). Classical methods estimate one source profile per shifted set (as the slide
job does per slide).

Learned methods appear twice: as shipped (colour transferred onto the source pixels,
``detail="source"``) and ``(decoded)``, the VAE's output as it is.

Per method: SSIM, PSNR and CIEDE2000 (tissue pixels) against the truth; structure
preservation = SSIM between the hematoxylin channels of output and source; nuclei-count
change = mean |count(output) - count(truth)| / count(truth) with the threshold + watershed
counter; tiles/s. Learned methods are skipped when their checkpoint is missing.
Writes ``<out>/stain_quality.json`` / ``.png`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from studio.color import hematoxylin_od, tissue_mask
from studio.data.splits import region
from studio.data.stain_pairs import KNOWN_SHIFTS, apply_known_shift
from studio.io import to_tensor, to_uint8
from studio.metrics import ciede2000, psnr, ssim
from studio.nuclei import threshold_watershed_baseline
from studio.report import contact_sheet, save_png
from studio.stain import get_normalizer


def tiles_of(image: np.ndarray, size: int, limit: int) -> np.ndarray:
    """Tissue tiles covering ``image`` edge to edge (the last row / column flush with the
    border, so a 250 px band still gives two 128 px columns)."""
    h, w = image.shape[:2]
    if min(h, w) < size:
        raise SystemExit(f"--size {size} is larger than the {h}x{w} region")
    ys = np.linspace(0, h - size, -(-h // size)).round().astype(int)
    xs = np.linspace(0, w - size, -(-w // size)).round().astype(int)
    out = [image[y:y + size, x:x + size] for y in ys for x in xs]
    out = [t for t in out if (t.mean(-1) < 215).mean() > 0.5]
    return np.stack(out[:limit])


def classical(method: str, reference: list[np.ndarray]):
    norm = get_normalizer(method)
    norm.fit(reference)

    def run(src: np.ndarray) -> np.ndarray:
        profile = norm.estimate(list(src))
        return norm.transform_uint8(src, source=profile)

    return run


def learned(folder: str, reference: list[np.ndarray], steps: int, strength: float, detail: str = "source"):
    from pipelines.stain_fuser import StainFuserPipeline, reference_statistics, reinhard_target
    from studio.stain.reinhard import ReinhardNormalizer

    pipe = StainFuserPipeline.from_pretrained(folder)
    stats = torch.stack([reference_statistics(to_tensor(r)) for r in reference]).mean(0)

    prior_target = reinhard_target(reference) if pipe.prior == "reinhard" else None

    def run(src: np.ndarray) -> np.ndarray:
        # A prior model gets the source statistics the classical methods get: pooled over the
        # whole held-out set (a slide-level estimate).
        prior_source = ReinhardNormalizer().estimate(list(src)) if prior_target is not None else None
        out = [pipe(src[i:i + 4], stats, num_inference_steps=steps, strength=strength, detail=detail,
                    output_type="np", prior_target=prior_target, prior_source=prior_source).images
               for i in range(0, len(src), 4)]
        return (np.concatenate(out) * 255 + 0.5).astype(np.uint8)

    return run


def published(checkpoint: str | Path, reference: list[np.ndarray], steps: int | None = None, device: str = "auto",
              workdir: Path | None = None):
    """StainFuser's released weights through the slide job's transform (20 PNDM steps as
    released unless ``steps``), styled by the same reference tiles as every other row."""
    import tempfile

    from pipelines.stainfuser_published import create_published_transform
    from studio.io import write_image

    folder = Path(workdir or tempfile.mkdtemp(prefix="stain-quality-"))
    ref_path = write_image(folder / "reference.png", np.concatenate(reference[:4], axis=1))
    transform = create_published_transform(checkpoint, ref_path, device=device, steps=steps)

    def run(src: np.ndarray) -> np.ndarray:
        return np.concatenate([transform.apply(src[i:i + 4]) for i in range(0, len(src), 4)])

    return run


def published_checkpoint(explicit: str | None) -> Path | None:
    """``--published`` or the StainFuser release found in ``$HISTOSTUDIO_MODELS``."""
    if explicit:
        return Path(explicit)
    from studio.published import find_published, models_dir

    found = [m.path for m in find_published(models_dir()) if m.kind == "stainfuser"]
    return found[0] if found else None


def score(out: np.ndarray, src: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    o, s, t = to_tensor(out), to_tensor(src), to_tensor(truth)
    mask = tissue_mask(t)
    counts_o = np.array([threshold_watershed_baseline(x)[0].max() for x in out], dtype=float)
    counts_t = np.array([threshold_watershed_baseline(x)[0].max() for x in truth], dtype=float)
    h_o, h_s = hematoxylin_od(o), hematoxylin_od(s)
    top = float(torch.quantile(h_s.flatten(), 0.99).clamp_min(1e-3))
    return {"ssim": float(ssim(o, t).mean()), "psnr": float(psnr(o, t).mean()),
            "ciede2000": float(ciede2000(o, t, mask).mean()),
            "structure_ssim_h": float(ssim((h_o / top).clamp(0, 1).expand(-1, 3, -1, -1),
                                           (h_s / top).clamp(0, 1).expand(-1, 3, -1, -1)).mean()),
            "nuclei_count_change": float(np.mean(np.abs(counts_o - counts_t) / np.maximum(counts_t, 1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuser", default="checkpoints/stain-fuser")
    parser.add_argument("--regressor", default="checkpoints/stain-fuser-regressor")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tiles", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--published", default=None,
                        help="StainFuser's released weights (R-J/StainFuser; default: found in $HISTOSTUDIO_MODELS)")
    parser.add_argument("--device", default="auto", help="device of the published model's row")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    truth = tiles_of(np.ascontiguousarray(region("tiatoolbox_target", "heldout")), args.size, args.tiles)
    reference = list(tiles_of(np.ascontiguousarray(region("tiatoolbox_target", "train")), args.size, 16))
    methods = {m: classical(m, reference) for m in ("macenko", "reinhard", "vahadane")}
    for name, folder in (("regressor", args.regressor), ("diffusion", args.fuser)):
        if Path(folder).is_dir():
            methods[name] = learned(folder, reference, args.steps, args.strength)
            # the decoded output as it is: what the guided colour transfer buys
            methods[f"{name} (decoded)"] = learned(folder, reference, args.steps, args.strength, detail="model")
        else:
            print(f"skipping {name}: no checkpoint at {folder}")
    released = published_checkpoint(args.published)
    if released is not None:
        methods["stainfuser (published weights)"] = published(released, reference, device=args.device)
    else:
        print("skipping stainfuser (published weights): none given (--published) or found in $HISTOSTUDIO_MODELS")
    results: dict = {"tiles": len(truth), "size": args.size, "steps": args.steps, "strength": args.strength}
    sheet = [("truth (held-out, target stain)", [(str(i), t) for i, t in enumerate(truth[:4])])]
    for shift in KNOWN_SHIFTS:
        src = to_uint8(apply_known_shift(to_tensor(truth), shift))
        results.setdefault(shift, {})["source"] = score(src, src, truth)
        if shift == "scanner-tone":
            sheet.append((f"source: {shift}", [(str(i), t) for i, t in enumerate(src[:4])]))
        for name, run in methods.items():
            t0 = time.perf_counter()
            out = run(src)
            row = score(out, src, truth)
            row["tiles_per_s"] = len(src) / (time.perf_counter() - t0)
            results[shift][name] = row
            if shift == "scanner-tone":
                sheet.append((name, [(str(i), t) for i, t in enumerate(out[:4])]))
    names = ["source", *methods]
    mean = {n: {k: float(np.mean([results[s][n][k] for s in KNOWN_SHIFTS])) for k in results["lab-a"][n]}
            for n in names}
    results["mean"] = mean
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stain_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    save_png(contact_sheet(sheet, cell=160), args.out / "stain_quality.png")
    print("| shift | method | SSIM | PSNR | CIEDE2000 | structure (SSIM of H) | nuclei-count change | tiles/s |")
    print("|---|---|---|---|---|---|---|---|")
    for shift in [*KNOWN_SHIFTS, "mean"]:
        rows = results[shift] if shift != "mean" else mean
        for n in names:
            r = rows[n]
            tps = f"{r['tiles_per_s']:.1f}" if "tiles_per_s" in r else "-"
            print(f"| {shift} | {n} | {r['ssim']:.3f} | {r['psnr']:.2f} | {r['ciede2000']:.2f} | "
                  f"{r['structure_ssim_h']:.3f} | {r['nuclei_count_change']:.1%} | {tps} |")
    print(f"wrote {args.out / 'stain_quality.json'} and {args.out / 'stain_quality.png'}")


if __name__ == "__main__":
    main()

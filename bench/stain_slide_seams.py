"""Whole-slide stain normalization: seams and throughput, classical vs learned, one table.

    python bench/stain_slide_seams.py [--slide cmu_small_region] [--reference tiatoolbox_target]
                                      [--methods macenko,stainfuser,stainfuser-regressor] [--tile-size 256]
                                      [--fuser DIR] [--regressor DIR]

Each method runs through the same slide job users get from ``histostudio normalize`` (tile
grid, per-slide source profile for the classical methods, halo windows with cross-faded
seams and shared positional noise for the learned ones), writes a pyramidal TIFF, and the
output is read back with tiffslide (and OpenSlide when its C library is present: the file
must open in both). Seam metric: :func:`studio.metrics.seam_ratio` on level 0 at the job's
tile period, over tissue pixels (gradient energy across tile borders / inside tiles; 1.0 =
invisible). The unnormalized slide is the floor: a JPEG-compressed scan already has a ratio
above 1 at any period that is a multiple of 8 (its 8x8 block edges fall on the tile borders),
so the table also gives each method's ratio relative to the source's (1.00 = the method
added no seams). StainFuser's own WSI mode tiles 512x512
with no overlap or blending; ``--halo 0`` reproduces that kind of tiling for comparison.

Writes ``<out>/stain_slide_seams.json`` and prints the Markdown table. Lossless
(``deflate``) output so JPEG block edges do not enter the measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from studio.data.samples import get_sample
from studio.jobs import JobOptions, expand_inputs, run_job
from studio.metrics import seam_ratio
from studio.slides import open_slide, tissue_mask_from_rgb
from studio.transforms import create_tile_transform


def read_level0(path: Path) -> np.ndarray:
    import tiffslide

    with tiffslide.TiffSlide(str(path)) as s:
        w, h = s.dimensions
        image = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as s:  # must open in OpenSlide too
            assert s.dimensions == (w, h)
    except ImportError:
        pass
    return image


def make_transform(method: str, reference: str, halo: int | None, seed: int, folders: dict[str, str]):
    kwargs = {"reference": reference, "seed": seed}
    if method.startswith("stainfuser"):
        kwargs["checkpoint"] = folders[method]
        if halo is not None:
            kwargs["halo"] = halo
        method = "stainfuser"
    return create_tile_transform(method, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", default="cmu_small_region", help="a sample name or a slide path")
    parser.add_argument("--reference", default="tiatoolbox_target")
    parser.add_argument("--methods", default="macenko,stainfuser,stainfuser-regressor")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--halo", type=int, default=None, help="override the learned methods' halo (0: none)")
    parser.add_argument("--fuser", default="checkpoints/stain-fuser")
    parser.add_argument("--regressor", default="checkpoints/stain-fuser-regressor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    slide_path = Path(args.slide) if Path(args.slide).exists() else get_sample(args.slide).path
    with open_slide(slide_path) as slide:
        source = slide.read_region((0, 0), 0, slide.dimensions)
    tissue = tissue_mask_from_rgb(source)
    results: dict = {"slide": str(slide_path.name), "size": list(source.shape[:2]), "tile_size": args.tile_size,
                     "tissue_fraction": round(float(tissue.mean()), 3),
                     "methods": {"source": {"seam_ratio": seam_ratio(source, args.tile_size, tissue)}}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            try:
                transform = make_transform(method, args.reference, args.halo, args.seed,
                                           {"stainfuser": args.fuser, "stainfuser-regressor": args.regressor})
            except Exception as exc:  # a missing checkpoint skips that row, loudly
                print(f"skipping {method}: {exc}")
                continue
            out = Path(tmp) / method
            units = expand_inputs([slide_path], out)
            t0 = time.perf_counter()
            report = run_job(units, transform, out, JobOptions(tile_size=args.tile_size, compression="deflate",
                                                               seed=args.seed, workers=1))
            elapsed = time.perf_counter() - t0
            if not report.ok:
                raise SystemExit(f"{method} failed: {report.failed}")
            image = read_level0(Path(units[0].output))
            n_tiles = int(np.ceil(source.shape[0] / args.tile_size) * np.ceil(source.shape[1] / args.tile_size))
            ratio = seam_ratio(image, args.tile_size, tissue)
            results["methods"][method] = {"seam_ratio": ratio,
                                          "relative_to_source": ratio / results["methods"]["source"]["seam_ratio"],
                                          "seconds": round(elapsed, 1), "tiles_per_s": round(n_tiles / elapsed, 2),
                                          "halo": transform.describe().get("halo", 0)}
            print(f"{method}: seam ratio {results['methods'][method]['seam_ratio']:.3f}, {elapsed:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stain_slide_seams.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['slide']} {results['size'][1]}x{results['size'][0]}, tiles {args.tile_size} px, "
          f"tissue {results['tissue_fraction']:.0%}\n")
    print("| method | seam ratio (tissue) | relative to source | halo | tiles/s |")
    print("|---|---|---|---|---|")
    for name, row in results["methods"].items():
        print(f"| {name} | {row['seam_ratio']:.3f} | {row.get('relative_to_source', 1.0):.3f} | "
              f"{row.get('halo', '-')} | {row.get('tiles_per_s', '-')} |")
    print(f"wrote {args.out / 'stain_slide_seams.json'}")


if __name__ == "__main__":
    main()

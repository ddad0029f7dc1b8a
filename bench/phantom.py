"""Phantom tile speed (and an optional contact sheet to look at).

    python bench/phantom.py                       # median ms per tile, 256 and 512
    python bench/phantom.py --tiles 20 --sizes 256
    python bench/phantom.py --sheet /tmp/phantom_sheet.png

Times layout (:func:`sample_layout`) and H&E render (:func:`render_he`) separately and
together, single-threaded (``torch.set_num_threads(1)``), wall clock and process CPU time
(the CPU column is the one to trust on a shared, busy machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from studio.data import phantom as ph


def bench(size: int, tiles: int) -> dict[str, float]:
    ph.render_he(ph.sample_layout(size, seed=10_000), seed=0)  # warm-up (imports, caches)
    wall = {"layout": [], "render": [], "total": []}
    cpu = {"layout": [], "render": [], "total": []}
    for seed in range(tiles):
        w0, c0 = time.perf_counter(), time.process_time()
        layout = ph.sample_layout(size, seed=seed)
        w1, c1 = time.perf_counter(), time.process_time()
        ph.render_he(layout, seed=seed)
        w2, c2 = time.perf_counter(), time.process_time()
        for store, a, b, c in ((wall, w0, w1, w2), (cpu, c0, c1, c2)):
            store["layout"].append(b - a)
            store["render"].append(c - b)
            store["total"].append(c - a)
    out = {f"wall_{k}": 1e3 * float(np.median(v)) for k, v in wall.items()}
    out.update({f"cpu_{k}": 1e3 * float(np.median(v)) for k, v in cpu.items()})
    return out


def contact_sheet(path: Path) -> None:
    """Phantoms (mixes, stains, IHC) above 256x256 crops of the shipped real images."""
    from PIL import Image, ImageDraw

    from studio import color
    from studio.data.samples import load_sample

    def label(img: np.ndarray, text: str) -> np.ndarray:
        pil = Image.fromarray(np.ascontiguousarray(img))
        draw = ImageDraw.Draw(pil)
        draw.rectangle([0, 0, 6 * len(text) + 6, 13], fill=(255, 255, 255))
        draw.text((3, 1), text, fill=(0, 0, 0))
        return np.asarray(pil)

    rng = np.random.default_rng(0)
    tiles = []
    for seed, tissue in enumerate(["mixed", "tumor", "glandular", "stroma", "inflamed", "necrotic"]):
        layout = ph.sample_layout(256, seed=seed, tissue=tissue)
        tiles.append(label(ph.render_he(layout, seed=seed), f"phantom {tissue}"))
    tumour = ph.sample_layout(256, seed=21, tissue="tumor")
    tiles.append(label(ph.render_he(tumour, seed=21), "tumor, default (Macenko) stain"))
    ruifrok = color.RUIFROK_HED[:, :2]
    tiles.append(label(ph.render_he(tumour, ruifrok, seed=21), "same layout, Ruifrok H&E"))
    tiles.append(label(ph.render_he(tumour, ph.random_stain_matrix(rng, strength=2.5), seed=21),
                       "same layout, random_stain_matrix"))
    tiles.append(label(ph.render_ihc(tumour, {"neoplastic": 0.9}, "membrane", seed=21), "IHC membrane (HER2-like)"))
    tiles.append(label(ph.render_ihc(tumour, {"neoplastic": 0.5, "inflammatory": 0.2}, "nuclear", seed=21),
                       "IHC nuclear (Ki67-like)"))
    # Label outlines in class colours (PanNuke codes 1-5).
    overlay = ph.render_he(tumour, seed=21).copy()
    inst, cls = tumour.instance_map, tumour.class_map
    edge = np.zeros(inst.shape, dtype=bool)
    edge[:-1] |= inst[:-1] != inst[1:]
    edge[1:] |= inst[1:] != inst[:-1]
    edge[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge &= inst > 0
    palette = np.array([[0, 0, 0], [255, 40, 40], [40, 220, 40], [40, 120, 255], [255, 230, 0], [0, 230, 230]],
                       dtype=np.uint8)
    overlay[edge] = palette[cls[edge]]
    tiles.append(label(overlay, "labels (class colours)"))
    tiles.append(label(ph.render_he(ph.sample_layout(256, seed=5, mpp=0.25, tissue="tumor"), seed=5),
                       "tumor at 40x (0.25 um/px)"))
    for name, (y, x) in [("hgsc_nest", (600, 600)), ("tiatoolbox_target", (300, 300)), ("skin", (500, 600)),
                         ("cmu_small_region", (1200, 1000))]:
        tiles.append(label(np.asarray(load_sample(name))[y : y + 256, x : x + 256], f"real {name}"))
    tiles.append(label(np.asarray(load_sample("ihc"))[100:356, 100:356], "real IHC (FHL2)"))
    tiles.append(label(np.asarray(load_sample("ihc"))[256:512, 0:256], "real IHC (FHL2)"))
    cols = 4
    while len(tiles) % cols:
        tiles.append(np.full((256, 256, 3), 255, dtype=np.uint8))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    print(f"contact sheet: {path} ({sheet.shape[1]}x{sheet.shape[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sheet", type=Path, default=None, help="also write a contact sheet PNG here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"phantom tiles, median over {args.tiles} seeds, 1 thread (tissue='mixed', mpp=0.5)")
    print(f"{'size':>6} {'layout ms':>10} {'render ms':>10} {'total ms':>9} {'cpu total ms':>13}")
    for size in args.sizes:
        r = bench(size, args.tiles)
        print(f"{size:>6} {r['wall_layout']:>10.1f} {r['wall_render']:>10.1f} {r['wall_total']:>9.1f}"
              f" {r['cpu_total']:>13.1f}")
    if args.sheet is not None:
        contact_sheet(args.sheet)


if __name__ == "__main__":
    main()

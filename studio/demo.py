"""``histostudio demo``: the studio's main jobs end to end on shipped real data.

Each step writes its outputs under ``OUT/`` and contributes a row to
``OUT/contact_sheet.png``; ``OUT/summary.json`` holds the numbers. The demo grows with
the studio: every capability adds a step.

1. real samples (what ships);
2. the labelled real tile as PanNuke, CoNIC and folder datasets, read back and checked;
3. tissue phantoms: exact labels, the same layout under two stains, its IHC twin;
4. a multi-lab slide batch (the real Aperio slide and re-stained copies as pyramidal
   TIFFs, plus a folder of PNG tiles) normalized to one target by the slide job; the
   spread of tissue colour between sources before and after says what it bought;
5. nuclei segmentation (shipped segmenter) on real tissue it never saw, next to the
   classical threshold-and-watershed baseline;
6. synthetic H&E: variations of a held-out real tile from its SSL embedding;
7. rare-class nuclei patches (dead + inflammatory) drawn to edited real label maps, written
   as a PanNuke dataset with exact labels (``histostudio generate rare``);
8. virtual IHC: held-out real H&E translated to HER2 (and any other installed stain), with
   the DAB read-out (``histostudio translate``).

Steps 5-8 run when their shipped checkpoints exist.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from studio.io import atomic_write_text, to_tensor, to_uint8, write_image
from studio.report import contact_sheet, overlay_labels, save_png

Written = list[tuple[str, Path]]


def _tissue_lab_mean(image: np.ndarray) -> np.ndarray:
    """Mean CIELAB over tissue pixels (the colour a batch should agree on)."""
    from studio.color import rgb_to_lab, tissue_mask

    t = to_tensor(np.ascontiguousarray(image))
    mask = tissue_mask(t, min_od=0.1)[0, 0]
    lab = rgb_to_lab(t)[0]
    return lab[:, mask].mean(dim=1).numpy()


def _spread(means: list[np.ndarray]) -> float:
    """Mean pairwise CIELAB distance between sources' tissue colours (Delta E 76)."""
    d = [float(np.linalg.norm(a - b)) for i, a in enumerate(means) for b in means[i + 1:]]
    return float(np.mean(d)) if d else 0.0


def _restain_image(image: np.ndarray, shift: str) -> np.ndarray:
    from studio.stain.augment import known_shift, restain

    matrix, scale, offset = known_shift(shift, 1)
    return to_uint8(restain(to_tensor(np.ascontiguousarray(image)), matrix, scale, offset))[0]


def _write_restained_slide(src: Path, dst: Path, shift: str) -> Path:
    """Stream a slide through a known stain shift into a new pyramidal TIFF (a 'lab')."""
    from studio.slides import open_slide, read_tiles, tile_grid, write_pyramid

    with open_slide(src) as slide:
        grid = tile_grid(slide, tile_size=256)

        def tiles():
            for batch, _ in read_tiles(slide, grid, batch_size=16):
                for tile in batch:
                    yield _restain_image(tile, shift)

        return write_pyramid(dst, tiles(), grid.width, grid.height, tile_size=256, mpp=slide.mpp,
                             compression="jpeg", quality=92, description=f"{src.name} re-stained '{shift}'")


def step_samples(out: Path, rows: list, summary: dict) -> Written:
    from studio.data.samples import SAMPLES, load_sample

    cells = [(name, load_sample(name)) for name in SAMPLES]
    rows.append(("1. real samples shipped with the studio", cells))
    summary["samples"] = {name: list(img.shape) for name, img in cells}
    return []


def step_datasets(out: Path, rows: list, summary: dict) -> Written:
    from studio.data.crops import hgsc_nest_crops
    from studio.data.registry import open_dataset, write_dataset

    crops = hgsc_nest_crops(256)
    written: Written = []
    checks = {}
    for layout in ("pannuke", "conic", "folder"):
        folder = write_dataset(out / "datasets" / f"hgsc_nest_{layout}", crops, layout, overwrite=True)
        back = open_dataset(folder)
        first = back.read(0)
        checks[layout] = {"tiles": len(back), "image_identical": bool(np.array_equal(first.image, crops[0].image)),
                          "instances_identical": bool(np.array_equal(first.inst, crops[0].inst))}
        written.append((f"{layout} dataset ({len(back)} real 256x256 crops)", folder))
    summary["datasets"] = checks
    cells = [(f"crop {i} ({c.num_instances} nuclei)", overlay_labels(c.image, c.inst, c.cls))
             for i, c in enumerate(crops[6:11])]
    rows.append(("2. real labelled tile -> datasets (outlines: red neoplastic, green inflammatory, blue connective)",
                 cells))
    return written


def step_phantom(out: Path, rows: list, summary: dict, seed: int) -> Written:
    from studio.data.phantom import (
        make_phantom,
        random_stain_matrix,
        render_he,
        render_ihc,
    )
    from studio.data.phantom_dataset import phantom_samples
    from studio.data.registry import write_dataset

    folder = write_dataset(out / "datasets" / "phantom_folder", phantom_samples(12, seed=seed), "folder",
                           overwrite=True)
    tile = make_phantom(256, seed, tissue="tumor")
    other = render_he(tile.layout, random_stain_matrix(seed + 1, strength=3.0), seed=seed)
    ihc = render_ihc(tile.layout, marker_positive={"neoplastic": 0.8}, pattern="membrane", seed=seed)
    ki67 = render_ihc(tile.layout, marker_positive={"neoplastic": 0.5}, pattern="nuclear", seed=seed)
    rows.append(("3. tissue phantom: exact labels; one layout under two stains and as IHC", [
        ("phantom H&E", tile.image), ("exact labels", overlay_labels(tile.image, tile.instance_map, tile.class_map)),
        ("same layout, another stain", other), ("IHC twin, membrane (HER2-like)", ihc),
        ("IHC twin, nuclear (Ki67-like)", ki67)]))
    summary["phantom"] = {"tiles": 12, "nuclei_in_example": int(tile.layout.n_nuclei)}
    return [("phantom dataset (12 tiles, folder layout)", folder)]


def step_normalize(out: Path, rows: list, summary: dict, seed: int, console: Console) -> Written:
    from studio.data.samples import SAMPLES, load_sample
    from studio.jobs import JobOptions, expand_inputs, run_job
    from studio.slides import open_slide
    from studio.transforms import create_tile_transform

    batch_dir = out / "slide_batch"
    batch_dir.mkdir(parents=True, exist_ok=True)
    svs = SAMPLES["cmu_small_region"].path
    lab_b = _write_restained_slide(svs, batch_dir / "cmu_lab_b.tif", "lab-b")
    lab_faded = _write_restained_slide(svs, batch_dir / "cmu_faded.tif", "faded")
    tiles_dir = batch_dir / "hgsc_tiles_lab_a"
    tiles_dir.mkdir(exist_ok=True)
    hgsc = _restain_image(load_sample("hgsc_nest"), "lab-a")
    for i, (y, x) in enumerate([(y, x) for y in range(0, 1024, 256) for x in range(0, 1024, 256)]):
        write_image(tiles_dir / f"tile_{i:02d}.png", hgsc[y:y + 256, x:x + 256])
    inputs = [svs, lab_b, lab_faded, tiles_dir]

    norm_dir = out / "normalized"
    transform = create_tile_transform("reinhard", reference="tiatoolbox_target", seed=seed)
    units = expand_inputs(inputs, norm_dir)
    start = time.perf_counter()
    report = run_job(units, transform, norm_dir, JobOptions(seed=seed), overwrite=True)
    seconds = time.perf_counter() - start

    def thumb(path: Path) -> np.ndarray:
        if path.is_dir():
            return np.ascontiguousarray(load_tiles_mosaic(path))
        with open_slide(path) as slide:
            return slide.thumbnail(512)

    before = [thumb(Path(p)) for p in inputs]
    after = [thumb(Path(u.output)) for u in units]
    lab_before = [_tissue_lab_mean(im) for im in before]
    lab_after = [_tissue_lab_mean(im) for im in after]
    target = np.array(transform.normalizer.target.lab_mean)
    summary["normalize"] = {
        "method": "reinhard", "reference": "tiatoolbox_target", "units": len(units), "seconds": round(seconds, 1),
        "failed": report.failed,
        "tissue_colour_spread_between_sources_deltaE": {"before": round(_spread(lab_before), 2),
                                                        "after": round(_spread(lab_after), 2)},
        "distance_to_target_tissue_colour_deltaE": {
            "before": [round(float(np.linalg.norm(m - target)), 2) for m in lab_before],
            "after": [round(float(np.linalg.norm(m - target)), 2) for m in lab_after]},
    }
    names = [u.id for u in units]
    rows.append(("4. a multi-lab batch before normalization (real Aperio slide, re-stained copies, PNG tiles)",
                 list(zip(names, before, strict=True))))
    rows.append((f"   ... after `normalize --method reinhard --reference tiatoolbox_target`: tissue colour spread "
                 f"{_spread(lab_before):.1f} -> {_spread(lab_after):.1f} Delta E",
                 list(zip(names, after, strict=True)) + [("target", load_sample("tiatoolbox_target"))]))
    console.print(f"  normalized {len(units)} units in {seconds:.1f} s; colour spread between sources "
                  f"{_spread(lab_before):.1f} -> {_spread(lab_after):.1f} Delta E")
    return [("multi-lab input batch", batch_dir), ("normalized batch + manifest.json", norm_dir)]


def step_segment(out: Path, rows: list, summary: dict) -> Written:
    """Nuclei in real tissue the segmenter never trained on (the held-out band of the
    labelled tile, skin), with the classical baseline beside it."""
    from pipelines.segment_job import segment_inputs
    from pipelines.segmenter import NucleiSegmenter
    from studio.data.samples import load_sample
    from studio.data.splits import region
    from studio.info import checkpoints_dir
    from studio.nuclei import threshold_watershed_baseline

    folder = checkpoints_dir() / "nuclei-segmenter"
    if not folder.is_dir():
        rows.append(("5. nuclei segmentation: skipped (no checkpoints/nuclei-segmenter)", []))
        return []
    segmenter = NucleiSegmenter.from_pretrained(folder)
    # skin.tif carries no pixel size; its nuclei are half as long as at 0.5 um/px: ~1 um/px (10x)
    tiles = {"hgsc_heldout": (np.ascontiguousarray(region("hgsc_nest", "heldout")[600:856, :256]), None),
             "skin": (np.ascontiguousarray(load_sample("skin")[500:756, 400:656]), 1.0)}
    written = []
    for name, (tile, image_mpp) in tiles.items():  # one folder each: each has its own summary.csv
        path = write_image(out / "segmentation" / "inputs" / f"{name}.png", tile)
        written += segment_inputs([path], out / "segmentation" / name, segmenter, image_mpp=image_mpp)
    tiles = {name: tile for name, (tile, _) in tiles.items()}
    cells = []
    for name, tile in tiles.items():
        inst = np.load(out / "segmentation" / name / f"{name}_inst.npy")
        cls = np.load(out / "segmentation" / name / f"{name}_cls.npy")
        base, _ = threshold_watershed_baseline(tile)
        label = f"{name} (read at 1 um/px)" if name == "skin" else name
        cells += [(f"{label}: {int(inst.max())} nuclei", overlay_labels(tile, inst, cls)),
                  (f"baseline: {int(base.max())}", overlay_labels(tile, base))]
        summary.setdefault("segmentation", {})[name] = {"nuclei": int(inst.max()), "baseline_nuclei": int(base.max())}
    rows.append(("5. nuclei segmentation on tissue the segmenter never saw (histostudio segment) vs "
                 "threshold + watershed", cells))
    return [("nuclei maps, GeoJSON, HoVer-Net JSON", out / "segmentation")] + [w for w in written if w[0] == "summary"]


def step_generate(out: Path, rows: list, summary: dict, seed: int) -> Written:
    """Variations of a held-out real tile from its SSL embedding (histostudio generate)."""
    from pipelines.generation import GenerationSettings, run_variations
    from studio.data.splits import region
    from studio.info import checkpoints_dir
    from studio.io import read_image

    folder = checkpoints_dir() / "embedding-ldm"
    if not folder.is_dir():
        rows.append(("6. generation: skipped (no checkpoints/embedding-ldm)", []))
        return []
    source = write_image(out / "generation" / "heldout_tile.png",
                         np.ascontiguousarray(region("tiatoolbox_target", "heldout")[300:556, :256]))
    settings = GenerationSettings(checkpoint=str(folder), encoder="auto", steps=20, seed=seed)
    written = run_variations(str(source), 3, out / "generation" / "variations", settings)
    images = [(p.stem, read_image(p)) for label, p in written if label == "image"]
    rows.append(("6. synthetic H&E conditioned on a held-out tile's SSL embedding (histostudio generate "
                 "embedding)", [("real held-out tile", read_image(source))] + images))
    summary["generation"] = {"variations": len(images), "steps": 20}
    return [("generated variations", out / "generation" / "variations")]


RARE_STEPS = 20  # sampling steps of the rare-class demo step


def step_rare(out: Path, rows: list, summary: dict, seed: int) -> Written:
    """Rare-class patches as a ready-to-train PanNuke dataset (histostudio generate rare)."""
    from pipelines.rare_generation import RareRequest, generate_rare
    from studio.data.registry import open_dataset
    from studio.info import checkpoints_dir

    folder = checkpoints_dir() / "mask-ldm"
    if not folder.is_dir():
        rows.append(("7. rare-class patches: skipped (no checkpoints/mask-ldm)", []))
        return []
    from studio.errors import OutputError

    target = out / "rare_dead_inflammatory"
    try:
        info = generate_rare(RareRequest(labels="hgsc_nest", classes="dead,inflammatory", count=4, per_patch=3,
                                         size=128, out=str(target), checkpoint=str(folder), seed=seed,
                                         steps=RARE_STEPS, overwrite=True), log=lambda _: None)
    except OutputError as exc:  # the quality filter rejected too much: say so, keep the demo going
        rows.append((f"7. rare-class patches: none passed the quality filter ({exc})", []))
        summary["rare"] = {"error": str(exc)}
        return []
    data = open_dataset(target)
    cells = []
    for i in range(len(data)):
        s = data.read(i)
        cells += [(s.meta["name"], s.image), ("labels", overlay_labels(s.image, s.inst, s.cls))]
    rows.append((f"7. rare-class patches for training (histostudio generate rare): "
                 f"{info['written_counts']} nuclei, rejection rate {info['rejection_rate']:.0%}", cells))
    summary["rare"] = {k: info[k] for k in ("requested_counts", "written_counts", "rejection_rate")}
    return [("rare-class PanNuke dataset", target)]


def step_virtual_ihc(out: Path, rows: list, summary: dict, seed: int) -> Written:
    """Held-out real H&E -> virtual IHC with the DAB read-out (histostudio translate)."""
    from pipelines.virtual_ihc import load_virtual_ihc, virtual_ihc_checkpoints
    from studio.dab import dab_heatmap, dab_readout
    from studio.data.splits import region
    from studio.info import checkpoints_dir

    found = virtual_ihc_checkpoints(checkpoints_dir())
    if not found:
        rows.append(("8. virtual IHC: skipped (no checkpoints/virtual-ihc-<stain>)", []))
        return []
    he = np.ascontiguousarray(region("tiatoolbox_target", "heldout")[300:556, :256])  # breast carcinoma
    cells = [("held-out real H&E (breast)", he)]
    written: Written = []
    for stain in found:
        pipe = load_virtual_ihc(stain, checkpoints_dir())
        model = pipe.models[0]
        ihc = (pipe(he, model=model, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
               * 255 + 0.5).astype(np.uint8)
        path = write_image(out / "virtual_ihc" / f"virtual_{stain}.png", ihc)
        readout = dab_readout(ihc)
        cells += [(f"virtual {stain} ({model})", ihc),
                  (f"DAB {readout['dab_positive_percent']:.1f} %, H {readout['h_score']:.0f}", dab_heatmap(ihc))]
        summary.setdefault("virtual_ihc", {})[stain] = {k: round(v, 3) for k, v in readout.items()}
        written.append((f"virtual {stain}", path))
    rows.append(("8. virtual IHC of real H&E the translator never saw (histostudio translate), DAB read-out",
                 cells))
    return written


def load_tiles_mosaic(folder: Path, columns: int = 4) -> np.ndarray:
    """A folder of equal tiles (names sorted) as one mosaic, for thumbnails."""
    from studio.io import read_image

    tiles = [read_image(p) for p in sorted(folder.glob("*.png"))]
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate([r for r in rows if r.shape == rows[0].shape], axis=0)


def run_demo(out: str | Path, seed: int = 0, console: Console | None = None) -> Written:
    """Run every step; return (label, path) of everything written."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rows: list = []
    summary: dict[str, Any] = {"seed": seed}
    written: Written = []
    steps: list[tuple[str, Callable[[], Written]]] = [
        ("real samples", lambda: step_samples(out, rows, summary)),
        ("datasets", lambda: step_datasets(out, rows, summary)),
        ("tissue phantom", lambda: step_phantom(out, rows, summary, seed)),
        ("slide-batch normalization", lambda: step_normalize(out, rows, summary, seed, console)),
        ("nuclei segmentation", lambda: step_segment(out, rows, summary)),
        ("embedding-conditioned generation", lambda: step_generate(out, rows, summary, seed)),
        ("rare-class patches", lambda: step_rare(out, rows, summary, seed)),
        ("virtual IHC", lambda: step_virtual_ihc(out, rows, summary, seed)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        console.print(f"[bold]demo:[/] {name} ...")
        written += step()
        summary.setdefault("step_seconds", {})[name] = round(time.perf_counter() - start, 1)
    sheet = save_png(contact_sheet(rows, cell=200, title="histostudio demo"), out / "contact_sheet.png")
    summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return written + [("visual summary", sheet), ("numbers", summary_path)]

"""Stain-normalization speed, against peers measured in the same run.

    python bench/stain.py                     # everything (about 10 minutes on 2 quiet cores)
    python bench/stain.py --quick             # fewer repeats, smaller slide
    python bench/stain.py --peers-venv PATH   # staintools (spams) in its own venv, see below
    python bench/stain.py --sections 5,6 --quick --json docs/slide_job_speed.json   # slide-job speed only

What it measures (medians over repeats, 2 torch threads, the same real 256x256 tiles for
every method: crops of the four shipped H&E samples):

1. per-tile fitting (the work torchstain does): tiles/s and MPix/s for torchstain
   (numpy and torch backends, one tile at a time) and this engine (batched);
2. slide-level fitting (a fixed source profile): this engine's exact uint8 lookup-table
   path and its float path, against the memory-bandwidth bound of one pass over the
   pixels (a uint8 copy of the same data);
3. staintools (Macenko, Vahadane via spams), which cannot share this environment (its
   spams/opencv stack): run as a subprocess in ``--peers-venv`` made by
   ``python -m venv V && V/bin/pip install staintools spams-bin opencv-python-headless``;
   torch-staintools needs torchvision, whose wheels pull a CUDA torch: left out (its
   author-reported CPU rates are in ../shared/REFERENCES.md);
4. robustness: which methods raise on white, black, near-empty and pen-marked tiles;
5. a folder of 512 PNG tiles, whole process (decode, normalize, encode): ``normalize``'s
   job (reads, transform and writes pipelined over a small thread pool) vs a torchstain
   loop (Pillow, zlib level 1), and a control row: the same torchstain loop with this
   studio's PNG codec (libpng at level 1 with OpenCV's SUB filter and RLE strategy), which
   separates what the codec buys from what the engine buys; mean bytes per tile beside;
6. the slide job end to end on a generated slide of real tissue (JPEG q90 in and out), in
   a child process each, against:
   * the **codec-only pass**: the same slide through the same pipelined reader
     (:func:`studio.slides.read_tiles`, its thread pool) into the same pipelined pyramid
     writer (:func:`studio.slides.write_pyramid`, same tile size, codec, quality, levels),
     with no transform -- all the job's decoding and encoding and nothing else;
   * the bare level-0 codec pass: every tile decoded and re-encoded (``imagecodecs``, a
     thread pool), no pyramid, no file -- a floor the job cannot reach;
   * the same job with every pool replaced by in-order, one-at-a-time execution (what
     the pipelining buys);
   * the bare lookup-table kernel; and peak RSS.
   Each pass also reports its CPU seconds (all threads): on a shared machine the
   wall-clock ratio moves with other load, the CPU ratio much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.data.samples import load_sample  # noqa: E402
from studio.io import read_image, to_tensor, to_uint8, write_image  # noqa: E402
from studio.stain import get_normalizer  # noqa: E402

METHODS = ("macenko", "reinhard", "vahadane")


def real_tiles(n: int, size: int = 256) -> np.ndarray:
    """``n`` tissue tiles cut from the four shipped H&E images, interleaved."""
    per_image = []
    for name in ("hgsc_nest", "tiatoolbox_target", "skin", "cmu_small_region"):
        img = load_sample(name)
        h, w, _ = img.shape
        tiles = [img[y:y + size, x:x + size] for y in range(0, h - size + 1, size // 2)
                 for x in range(0, w - size + 1, size // 2)]
        tiles = [t for t in tiles if (t.mean(axis=2) < 220).mean() > 0.5]  # tissue tiles
        per_image.append(tiles)
    out = [per_image[i % 4][i // 4 % len(per_image[i % 4])] for i in range(n)]
    return np.ascontiguousarray(np.stack(out))


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, tiles: int, seconds: float, size: int = 256, ref: float | None = None) -> dict:
    rate = tiles / seconds
    entry = {"method": name, "tiles_per_s": round(rate, 1), "mpix_per_s": round(rate * size * size / 1e6, 2)}
    if ref:
        entry["x_torchstain"] = round(rate / ref, 2)
    return entry


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


# --------------------------------------------------------------------------- 1 + 2
def bench_kernels(tiles: np.ndarray, reference: np.ndarray, repeats: int) -> tuple[list[dict], list[dict], float]:
    import torchstain

    chw = [torch.from_numpy(t.copy()).permute(2, 0, 1) for t in tiles]
    ts_torch = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_torch.fit(torch.from_numpy(reference.copy()).permute(2, 0, 1))
    ts_numpy = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts_numpy.fit(reference.transpose(2, 0, 1).copy())
    ts_reinhard = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts_reinhard.fit(torch.from_numpy(reference.copy()).permute(2, 0, 1))
    n = len(tiles)
    t_torch = timed(lambda: [ts_torch.normalize(t, stains=False) for t in chw], repeats)
    ref_rate = n / t_torch
    per_tile = [row("torchstain macenko (torch), per tile", n, t_torch)]
    per_tile.append(row("torchstain macenko (numpy), per tile", n,
                        timed(lambda: [ts_numpy.normalize(t.numpy(), stains=False) for t in chw], repeats)))
    per_tile.append(row("torchstain reinhard (torch), per tile", n,
                        timed(lambda: [ts_reinhard.normalize(t) for t in chw], repeats)))
    batch = to_tensor(tiles)
    for name in METHODS:
        for stride in (1, 2):
            norm = get_normalizer(name, estimate_stride=stride)
            norm.fit(reference)
            label = "exact" if stride == 1 else "estimate on every 2nd pixel (estimate_stride=2)"
            per_tile.append(row(f"histostudio {name}, per-tile fit, {label}", n,
                                timed(lambda norm=norm: norm.transform(batch), repeats), ref=ref_rate))
    big = np.stack([load_sample("tiatoolbox_target")[y:y + 512, x:x + 512] for y, x in ((0, 0), (488, 488))])
    norm = get_normalizer("vahadane")
    norm.fit(reference)
    r = row("histostudio vahadane, per-tile fit, 512x512", 2, timed(lambda: norm.transform(big), repeats), size=512)
    r["seconds_per_tile"] = round(1 / r["tiles_per_s"], 4)
    per_tile.append(r)
    for r in per_tile[:3]:
        r["x_torchstain"] = round(r["tiles_per_s"] / ref_rate, 2)

    # slide level: one source profile, uint8 in -> uint8 out
    slide = []
    bandwidth = timed(lambda: np.copyto(np.empty_like(tiles), tiles), repeats)
    slide.append(row("memory bound: one uint8 copy of the tiles", n, bandwidth, ref=ref_rate))
    for name in METHODS:
        norm = get_normalizer(name)
        norm.fit(reference)
        source = norm.estimate(tiles)
        build = timed(lambda norm=norm, source=source: (norm._lut_cache.clear(), norm.lut(source)), 1)
        lut_t = timed(lambda norm=norm, source=source: norm.transform_uint8(tiles, source=source, workers=2),
                      repeats)
        r = row(f"histostudio {name}, slide profile, LUT (uint8)", n, lut_t, ref=ref_rate)
        r["of_memory_bound"] = round(bandwidth / lut_t, 2)
        r["lut_build_s"] = round(build, 2)
        slide.append(r)
        float_t = timed(lambda norm=norm, source=source: to_uint8(norm.transform(tiles, source=source)), repeats)
        slide.append(row(f"histostudio {name}, slide profile, float path", n, float_t, ref=ref_rate))
    return per_tile, slide, ref_rate


# --------------------------------------------------------------------------- 3
PEER_SCRIPT = r"""
import json, sys, time, statistics, numpy as np, staintools
tiles = np.load(sys.argv[1]); ref = np.load(sys.argv[2]); big = np.load(sys.argv[3]); repeats = int(sys.argv[4])
out = []
for method in ("macenko", "vahadane"):
    norm = staintools.StainNormalizer(method=method)
    norm.fit(ref)
    for name, data in (("256x256", tiles), ("512x512", big)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for t in data:
                norm.transform(t)
            times.append(time.perf_counter() - start)
        sec = statistics.median(times) / len(data)
        out.append({"method": f"staintools {method} ({name})", "seconds_per_tile": round(sec, 4)})
print(json.dumps(out))
"""


def bench_peers(venv: Path | None, tiles: np.ndarray, reference: np.ndarray, repeats: int) -> list[dict]:
    if venv is None or not (venv / "bin" / "python").exists():
        return [{"method": "staintools", "note": "skipped: pass --peers-venv (see module docstring)"}]
    big = np.stack([load_sample("tiatoolbox_target")[y:y + 512, x:x + 512] for y, x in ((0, 0), (488, 488))])
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f for f in ("tiles.npy", "ref.npy", "big.npy")]
        for p, a in zip(paths, (tiles[:16], reference, big), strict=True):
            np.save(p, a)
        res = subprocess.run([str(venv / "bin" / "python"), "-c", PEER_SCRIPT, *map(str, paths), str(repeats)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if res.returncode:
        return [{"method": "staintools", "note": f"failed: {res.stderr.strip().splitlines()[-1:]}"}]
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 4
def bench_robustness(reference: np.ndarray) -> list[dict]:
    import torchstain

    from studio.data.samples import bad_tiles  # the same bad-input set the tests use

    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts.fit(torch.from_numpy(reference.copy()).permute(2, 0, 1))
    rows = []
    for name, tile in bad_tiles().items():
        entry = {"tile": name}
        try:
            out = ts.normalize(torch.from_numpy(tile.copy()).permute(2, 0, 1), stains=False)[0].float()
            entry["torchstain macenko"] = "NaN" if torch.isnan(out).any() else "ok"
        except Exception as exc:
            entry["torchstain macenko"] = f"raises {type(exc).__name__}"
        for method in METHODS:
            norm = get_normalizer(method)
            norm.fit(reference)
            out = norm.transform(tile)
            entry[f"histostudio {method}"] = "ok" if torch.isfinite(out).all() else "NaN"
        rows.append(entry)
    return rows


# --------------------------------------------------------------------------- 5
def bench_folder(tiles: np.ndarray, reference: np.ndarray, workdir: Path, repeats: int) -> list[dict]:
    import torchstain
    from PIL import Image

    from studio.jobs import JobOptions, expand_inputs, run_job
    from studio.transforms import create_tile_transform

    folder = workdir / "tiles512"
    folder.mkdir(exist_ok=True)
    picks = np.resize(np.arange(len(tiles)), 512)
    for i, k in enumerate(picks):
        write_image(folder / f"t{i:03d}.png", tiles[k])
    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts.fit(torch.from_numpy(reference.copy()).permute(2, 0, 1))

    def pillow_read(path: Path) -> np.ndarray:
        return np.array(Image.open(path).convert("RGB"))

    def pillow_write(path: Path, image: np.ndarray) -> None:
        Image.fromarray(image).save(path, compress_level=1)

    def torchstain_loop(out: Path, read: Callable = pillow_read, write: Callable = pillow_write) -> None:
        out.mkdir(exist_ok=True)
        for p in sorted(folder.iterdir()):
            img = torch.from_numpy(read(p)).permute(2, 0, 1)
            try:
                res = ts.normalize(img, stains=False)[0].numpy().astype(np.uint8)
            except Exception:
                res = img.permute(1, 2, 0).numpy()
            write(out / p.name, res)

    transform = create_tile_transform("macenko", reference=None)
    transform.normalizer.fit(reference)

    def ours(fit: str) -> Callable[[], None]:
        def run() -> None:
            out = workdir / f"ours_{fit}"
            run_job(expand_inputs([folder], out), transform, out, JobOptions(fit=fit), overwrite=True)
        return run

    def mean_kb(name: str) -> float:
        return round(float(np.mean([p.stat().st_size for p in (workdir / name).rglob("*.png")])) / 1e3, 1)

    t_ts = timed(lambda: torchstain_loop(workdir / "ts_out"), repeats)
    # Control row: the same loop with this studio's PNG reader and writer, so the table shows
    # how much of the ratio is the codec (libpng, SUB filter, RLE) and how much the engine.
    t_same = timed(lambda: torchstain_loop(workdir / "ts_same_codec_out", read_image, write_image), repeats)
    rows = [row("torchstain macenko loop (Pillow read, write PNG compress_level=1)", 512, t_ts),
            row("control: the same torchstain loop with histostudio's PNG codec", 512, t_same, ref=512 / t_ts)]
    rows[0]["x_torchstain"] = 1.0
    rows[0]["kb_per_tile"], rows[1]["kb_per_tile"] = mean_kb("ts_out"), mean_kb("ts_same_codec_out")
    for fit in ("slide", "tile"):
        t_ours = timed(ours(fit), repeats)
        r = row(f"histostudio normalize --fit {fit} (same folder)", 512, t_ours, ref=512 / t_ts)
        r["x_same_codec_loop"] = round(t_same / t_ours, 2)
        r["kb_per_tile"] = mean_kb(f"ours_{fit}")
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- 6
SLIDE_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(int(sys.argv[5]))
import imagecodecs
from concurrent.futures import Future, ThreadPoolExecutor
import studio.jobs as J, studio.slides as S
from studio.jobs import JobOptions, expand_inputs, run_job
from studio.transforms import create_tile_transform
slide, out, mode = sys.argv[1], sys.argv[2], sys.argv[4]
opts = JobOptions()


class Inline:  # every task run when submitted, in order: the serial reference
    def __init__(self, *a, **k): pass
    def submit(self, fn, *a, **k):
        f = Future(); f.set_result(fn(*a, **k)); return f
    def map(self, fn, *its): return [fn(*a) for a in zip(*its)]
    def shutdown(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *e): pass


class Ok:
    ok = True


if mode == "serial":
    S.ThreadPoolExecutor = J.ThreadPoolExecutor = Inline
transform = create_tile_transform("macenko", reference="tiatoolbox_target")
start, cpu0 = time.perf_counter(), time.process_time()
if mode in ("job", "serial"):
    report = run_job(expand_inputs([slide], out), transform, out, opts, overwrite=True)
elif mode == "codec":  # the job's reading and writing, same pools, no transform
    with S.open_slide(slide) as s:
        grid = S.tile_grid(s, tile_size=opts.tile_size)
        tiles = (t for batch, _ in S.read_tiles(s, grid, batch_size=opts.batch_size) for t in batch)
        S.write_pyramid(out + ".tif", tiles, grid.width, grid.height, tile_size=grid.tile_size,
                        compression=opts.compression, quality=opts.quality)
    report = Ok()
else:  # bare: decode every tile, re-encode it (level 0 only, nothing written)
    with S.open_slide(slide) as s, ThreadPoolExecutor(2) as pool:
        grid = S.tile_grid(s, tile_size=opts.tile_size)
        enc = lambda t: len(imagecodecs.jpeg_encode(t, level=opts.quality, subsampling=(2, 2),
                                                    colorspace="RGB", outcolorspace="YCBCR"))
        pending = []
        for batch, _ in S.read_tiles(s, grid, batch_size=opts.batch_size):
            pending += [pool.submit(enc, t) for t in batch]
            while len(pending) > 64:
                pending.pop(0).result()
        [f.result() for f in pending]
    report = Ok()
sec, cpu = time.perf_counter() - start, time.process_time() - cpu0  # cpu: every thread of the process
# VmHWM is this process's own peak; ru_maxrss can carry the parent's across fork+exec.
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": sec, "cpu_s": cpu, "ok": report.ok, "peak_rss_mb": peak}))
"""


def bench_slide_job(workdir: Path, side: int, repeats: int = 1, threads: int = 2) -> list[dict]:
    from studio.slides import open_slide, read_tiles, tile_grid, write_mosaic_slide

    slide = write_mosaic_slide(workdir / "mosaic.tif", side, side, seed=0)
    mpix = side * side / 1e6

    def child(mode: str) -> dict:
        res = subprocess.run([sys.executable, "-c", SLIDE_CHILD, str(slide), str(workdir / f"slide_{mode}"),
                              str(ROOT), mode, str(threads)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr)
        return json.loads(res.stdout.strip().splitlines()[-1])

    # interleaved repeats, median per mode: the machine is shared, its load drifts
    modes = ("job", "codec", "bare", "serial")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            runs[m].append(child(m))
    med = {m: statistics.median(r["seconds"] for r in runs[m]) for m in modes}
    cpu = {m: statistics.median(r["cpu_s"] for r in runs[m]) for m in modes}
    job = {"seconds": med["job"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["job"]),
           "ok": all(r["ok"] for r in runs["job"])}
    # The bare kernel on the same pixels: read every tile, LUT-transform, no writing.
    norm = get_normalizer("macenko")
    norm.fit(load_sample("tiatoolbox_target"))
    with open_slide(slide) as s:
        grid = tile_grid(s, tile_size=512)
        sample = [b for b, _ in zip(read_tiles(s, grid, batch_size=16), range(4), strict=False)]
        source = norm.estimate([t for batch, _ in sample for t in batch])
        lut = norm.lut(source)
        tiles = [t for batch, _ in sample for t in batch]
        kernel = timed(lambda: [lut.apply(t) for t in tiles], 3)
        kernel_mpix = sum(t.shape[0] * t.shape[1] for t in tiles) / 1e6 / kernel
        # as the job calls it: each batch's list of decoded tiles, two threads
        same_shape = [batch for batch, _ in sample if len({t.shape for t in batch}) == 1]
        batched = timed(lambda: [lut.apply(batch, workers=2) for batch in same_shape], 3)
        batched_mpix = sum(t.shape[0] * t.shape[1] for b in same_shape for t in b) / 1e6 / batched
    rate = {m: mpix / med[m] for m in modes}
    names = {"job": "normalize job (macenko --fit slide), pipelined",
             "serial": "the same job, every pool run in order one task at a time",
             "codec": "codec-only pass: same reader + pyramid writer, no transform",
             "bare": "bare codec pass: decode + re-encode level-0 tiles, no pyramid, no file"}
    rows = [{"pass": names[m], "mpix_per_s": round(rate[m], 1), "seconds": round(med[m], 2),
             "job_over_this": round(rate["job"] / rate[m], 2), "cpu_s": round(cpu[m], 2),
             "job_over_this_by_cpu": round(cpu[m] / cpu["job"], 2)} for m in modes]
    rows.append({"pass": "bare lookup-table kernel (1 thread)", "mpix_per_s": round(kernel_mpix, 1),
                 "job_over_this": round(rate["job"] / kernel_mpix, 2)})
    rows.append({"pass": "lookup on the job's 16-tile batches (the tile list, 2 threads)",
                 "mpix_per_s": round(batched_mpix, 1), "job_over_this": round(rate["job"] / batched_mpix, 2)})
    rows[0].update(peak_rss_mb=round(job["peak_rss_mb"]), ok=job["ok"])
    for r in rows:
        r["slide"] = f"{side}x{side} ({mpix:.0f} MPix), {repeats} run(s), median"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller slide (a few minutes)")
    parser.add_argument("--peers-venv", type=Path, default=None)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--slide-side", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="which of the numbered sections to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    tiles = real_tiles(64 if args.quick else args.tiles)
    reference = np.ascontiguousarray(load_sample("tiatoolbox_target")[:512, :512])
    results: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "cpus": os.cpu_count(), "quick": args.quick}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{len(tiles)} real 256x256 tiles")
    if sections & {1, 2}:
        per_tile, slide, _ = bench_kernels(tiles, reference, repeats)
        print_table("per-tile fitting (torchstain's work), median", per_tile)
        print_table("slide-level profile (fixed source), median", slide)
        results.update(per_tile=per_tile, slide_level=slide)
    if 3 in sections:
        results["staintools"] = peers = bench_peers(args.peers_venv, tiles, reference, 1 if args.quick else 3)
        print_table("staintools (separate venv, one tile at a time)", peers)
    if 4 in sections:
        results["robustness"] = robust = bench_robustness(reference)
        print_table("robustness on bad tiles", robust)
    with tempfile.TemporaryDirectory() as tmp:
        if 5 in sections:
            results["folder"] = folder = bench_folder(tiles, reference, Path(tmp), 1 if args.quick else 3)
            print_table("a folder of 512 PNG tiles, whole process", folder)
        if 6 in sections:
            side = args.slide_side or (8192 if args.quick else 16384)
            results["slide_job"] = job = bench_slide_job(Path(tmp), side, repeats=1 if args.quick else 3,
                                                         threads=args.threads)
            print_table("slide job end to end (a child process per pass)", job)
    results["peak_rss_mb_bench"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

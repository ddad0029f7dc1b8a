"""Slide IO throughput: streaming pyramid writes and prefetched tile reads.

    python bench/slide_io.py                      # 16k x 16k mosaic, jpeg and deflate
    python bench/slide_io.py --size 8192 --keep /tmp/bench_slides

For each compression it reports, in megapixels of level 0 per second (wall clock) and
process CPU seconds:

* ``mosaic``: generating the mosaic tiles alone (real H&E crops on glass), no writing;
* ``write_pyramid``: :func:`studio.slides.write_pyramid` fed from tiles already in memory
  (a cycle of 64 real tiles), i.e. encode + reduce + TIFF writing only;
* ``write_mosaic_slide``: the two together, end to end;
* ``tile_grid``: the grid with its tissue mask (seconds);
* ``read_tiles``: reading every tile of the written slide back at native resolution
  through :func:`studio.slides.read_tiles` (tiffslide, background prefetch).

Memory: each row shows how far RSS rose above its starting point during that step (the
kernel high-water mark VmHWM, reset before the step), to compare with the ~768 MB of raw
pixels of a 16k x 16k level 0; the process's overall peak (``resource.getrusage``) is
printed at the start and the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from studio import slides
from studio.data.samples import load_sample


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``resource.getrusage``)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        return None
    return None


def timed(fn):
    """Run ``fn``; return (result, wall s, cpu s, peak RSS growth MB during the call).

    The growth is the kernel high-water mark (VmHWM, reset through /proc/self/clear_refs
    just before the call) minus the RSS before; None where /proc does not offer that.
    """
    before = _proc_status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        before = None
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = _proc_status_mb("VmHWM")
    growth = peak - before if before is not None and peak is not None else None
    return out, wall, cpu, growth


def memory_tiles(width: int, height: int, tile: int):
    """Row-major clipped tiles cycling through 64 real H&E tiles held in memory."""
    image = load_sample("hgsc_nest")
    pool = [np.ascontiguousarray(image[y:y + tile, x:x + tile])
            for y in range(0, 1500 - tile + 1, tile) for x in range(0, 1500 - tile + 1, tile)]
    cycle = itertools.cycle(pool)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            t = next(cycle)
            yield t[: min(tile, height - y), : min(tile, width - x)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384, help="slide side in pixels (square)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--compressions", default="jpeg,deflate")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the written slides in")
    args = parser.parse_args()

    n = args.size
    mpix = n * n / 1e6
    folder = args.keep or Path(tempfile.mkdtemp(prefix="histostudio_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    # warm-up: imports, samples, codecs, thread pool
    slides.write_mosaic_slide(folder / "warmup.tif", 1024, 1024)
    print(f"slide {n}x{n} ({mpix:.0f} MPix), tile {args.tile}, {os.cpu_count()} CPUs; "
          f"peak RSS after warm-up {peak_rss_mb():.0f} MB; raw level 0 = {n * n * 3 / 1e6:.0f} MB")

    def row(name: str, wall: float, cpu: float, growth: float | None, extra: str = "") -> None:
        mem = f"peak RSS +{growth:.0f} MB" if growth is not None else ""
        print(f"  {name:<20} {mpix / wall:7.1f} MPix/s  wall {wall:6.1f} s  cpu {cpu:6.1f} s  {mem:<18} {extra}")

    try:
        _, wall, cpu, growth = timed(lambda: sum(1 for _ in slides.mosaic_tiles(n, n, tile_size=args.tile)))
        print("tile generation")
        row("mosaic", wall, cpu, growth)
        for comp in args.compressions.split(","):
            print(comp)
            target = folder / f"mem_{comp}.tif"
            _, wall, cpu, growth = timed(lambda c=comp, t=target: slides.write_pyramid(
                t, memory_tiles(n, n, args.tile), n, n, tile_size=args.tile, mpp=0.5, compression=c))
            row("write_pyramid", wall, cpu, growth, f"file {target.stat().st_size / 1e6:.0f} MB")
            target.unlink()
            target = folder / f"mosaic_{comp}.tif"
            _, wall, cpu, growth = timed(lambda c=comp, t=target: slides.write_mosaic_slide(
                t, n, n, tile_size=args.tile, compression=c))
            row("write_mosaic_slide", wall, cpu, growth, f"file {target.stat().st_size / 1e6:.0f} MB")
            with slides.open_slide(target) as slide:
                levels = slide.level_count
                grid, wall, cpu, growth = timed(lambda s=slide: slides.tile_grid(s, args.tile))
                print(f"  {'tile_grid':<20} {wall:7.2f} s (tissue mask from a 2048 px thumbnail), "
                      f"{len(grid.tissue_tiles(0.5))}/{len(grid.tiles)} tiles >= 50% tissue")

                def read_all(s=slide, g=grid) -> int:
                    return sum(len(b) for b, _ in slides.read_tiles(s, g, batch_size=32, prefetch=2))

                count, wall, cpu, growth = timed(read_all)
            row("read_tiles", wall, cpu, growth, f"{count} tiles, {levels} levels")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"peak RSS of the process (getrusage) {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()

"""The slide-batch runner behind ``histostudio normalize`` (and later ``translate``).

A batch is a list of *units*, each with one manifest entry:

* a **slide** (SVS, NDPI, pyramidal TIFF, ...) -> one tiled pyramidal TIFF;
* a **tile set**: plain images from one folder (or given loosely) -> images of the same
  name and format. A folder of tiles is one source, like a slide: its stain profile is
  estimated once from sampled tiles, so its tiles stay mutually consistent.

Per unit: sample tissue tiles -> ``transform.estimate`` (one source profile) -> stream
every tile through ``transform.apply`` -> write atomically. A unit that fails is recorded
with its error and the batch goes on; the manifest (``manifest.json`` in the output
folder, rewritten atomically after every unit) makes ``--resume`` skip finished units and
finished files. Units run locally one after another (each uses both cores) or as
independent ``dask.distributed`` tasks, so a crashed worker loses at most its unit.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from studio import __version__
from studio.errors import HistostudioError, InputError, OutputError
from studio.inputs import expand_inputs as expand_paths
from studio.io import IMAGE_SUFFIXES, atomic_write_text, read_image, write_image
from studio.transforms import TileTransform

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One manifest entry: a slide, or a set of plain images treated as one source."""

    id: str
    kind: str  # "slide" | "tiles"
    inputs: tuple[str, ...]
    output: str  # slide: output file; tiles: output folder

    def output_files(self) -> list[Path]:
        if self.kind == "slide":
            return [Path(self.output)]
        return [Path(self.output) / Path(p).name for p in self.inputs]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _classify(path: Path) -> str:
    from studio.slides import is_slide_path

    return "slide" if is_slide_path(path) else "image"


def expand_inputs(inputs: Sequence[str | Path], out: str | Path) -> list[Unit]:
    """Turn the command line's INPUTS (paths, globs, folders, CSV manifests) into units.

    Slides become one unit each (``OUT/<stem>.tif``). Images found in a folder form one
    tile-set unit written to ``OUT/<folder name>/``; images given one by one or by glob
    form one unit written straight into ``OUT``. Missing inputs are errors (a typo should
    not silently shrink a batch).
    """
    out = Path(out)
    kinds: dict[Path, str] = {}

    def accept(path: Path) -> bool:
        kinds[path] = "slide" if _classify(path) == "slide" else ("image" if _is_image(path) else "")
        return bool(kinds[path])

    slides: list[Path] = []
    loose: list[Path] = []
    folders: dict[Path, list[Path]] = {}
    for path, folder in expand_paths(inputs, accept, "slides or images"):
        if kinds[path] == "slide":
            slides.append(path)
        elif folder is not None:
            folders.setdefault(folder, []).append(path)
        else:
            loose.append(path)

    units: list[Unit] = []
    seen_outputs: dict[str, str] = {}

    def claim(unit: Unit) -> None:
        for f in unit.output_files():
            key = str(f)
            if key in seen_outputs:
                raise InputError(unit.inputs[0], f"would write {f}, which {seen_outputs[key]} also writes; "
                                                 f"rename one input or run them separately")
            seen_outputs[key] = unit.inputs[0]
        units.append(unit)

    for path in dict.fromkeys(slides):
        claim(Unit(id=path.stem, kind="slide", inputs=(str(path),), output=str(out / f"{path.stem}.tif")))
    for folder, images in folders.items():
        claim(Unit(id=folder.name, kind="tiles", inputs=tuple(str(p) for p in images), output=str(out / folder.name)))
    if loose:
        claim(Unit(id="images", kind="tiles", inputs=tuple(str(p) for p in dict.fromkeys(loose)), output=str(out)))
    if not units:
        raise InputError("INPUTS", "nothing to process")
    return units


# --------------------------------------------------------------------------- options
@dataclass
class JobOptions:
    """Everything that changes a unit's output (recorded; ``--resume`` requires a match)
    plus how the work is run (not recorded)."""

    fit: str = "slide"  # "slide": one source profile per unit; "tile": every tile its own
    tile_size: int = 512
    mpp: float | None = None
    compression: str = "jpeg"
    quality: int = 90
    fit_tiles: int = 64
    seed: int = 0
    # execution only
    batch_size: int = 16
    workers: int = 2

    def recorded(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("batch_size", "workers"):
            d.pop(key)
        return d

    def validate(self) -> None:
        if self.fit not in ("slide", "tile"):
            raise InputError("--fit", f"{self.fit!r}; use 'slide' (one profile per slide/folder) or 'tile'")
        if self.tile_size < 64 or self.tile_size % 16:
            raise InputError("--tile-size", f"{self.tile_size}; use a multiple of 16, at least 64")
        if self.compression not in ("jpeg", "deflate", "none"):
            raise InputError("--compression", f"{self.compression!r}; use jpeg, deflate or none")
        if self.batch_size < 1 or self.workers < 1 or self.fit_tiles < 1:
            raise InputError("options", "batch size, workers and fit tiles must be positive")


class Reporter(Protocol):
    """Progress callbacks (the CLI passes a rich implementation; the default does nothing)."""

    def unit_started(self, unit: Unit, total: int) -> None: ...
    def unit_advanced(self, unit: Unit, n: int) -> None: ...
    def unit_finished(self, unit: Unit, result: dict[str, Any]) -> None: ...


class SilentReporter:
    def unit_started(self, unit: Unit, total: int) -> None:
        pass

    def unit_advanced(self, unit: Unit, n: int) -> None:
        pass

    def unit_finished(self, unit: Unit, result: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------- manifest
class Manifest:
    """``manifest.json``: run parameters plus one entry per unit, rewritten atomically."""

    def __init__(self, folder: Path, header: dict[str, Any], units: dict[str, dict[str, Any]] | None = None):
        self.folder = folder
        self.header = header
        self.units: dict[str, dict[str, Any]] = units or {}

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        path = folder / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(folder, data["run"], data.get("units", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(path, f"is not a readable histostudio manifest ({exc}); "
                                   f"move it away to start afresh") from exc

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"run": self.header, "units": self.units}, indent=2) + "\n")

    def done(self, unit: Unit) -> bool:
        entry = self.units.get(unit.id)
        return bool(entry) and entry.get("status") == "done" and all(p.exists() for p in unit.output_files())


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".histostudio-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(out, f"output folder is not writable ({exc.strerror or exc})") from exc


def _remove_stale_temporaries(out: Path) -> int:
    """Temporary files an interrupted run left behind (atomic writes that never finished)."""
    n = 0
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------- slides
def sample_tissue_tiles(slide: Any, count: int = 64, seed: int = 0, tile_size: int = 256,
                        mpp: float | None = None, min_tissue: float = 0.5) -> list[np.ndarray]:
    """Up to ``count`` tiles drawn (seeded) from the slide's tissue: what a slide-level
    stain profile is estimated from. Falls back to the most tissue-rich tiles when few
    pass ``min_tissue``."""
    from studio.slides import read_tile, tile_grid

    grid = tile_grid(slide, tile_size=tile_size, mpp=mpp)
    candidates = [t for t in grid.tiles if t.tissue >= min_tissue]
    if len(candidates) < min(count, 4):
        candidates = sorted(grid.tiles, key=lambda t: -t.tissue)[: max(count, 4)]
        candidates = [t for t in candidates if t.tissue > 0] or candidates[:1]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [read_tile(slide, grid, candidates[i]) for i in sorted(picks)]


def _process_slide(unit: Unit, transform: TileTransform, opts: JobOptions, reporter: Reporter) -> dict[str, Any]:
    from studio.slides import open_slide, read_tiles, tile_grid, write_pyramid

    path = Path(unit.inputs[0])
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_size=opts.tile_size, mpp=opts.mpp)
        source = None
        if opts.fit == "slide" or not transform.pixelwise:
            sample = sample_tissue_tiles(slide, count=opts.fit_tiles, seed=opts.seed, mpp=opts.mpp)
            source = transform.estimate(sample)
        reporter.unit_started(unit, len(grid.tiles))

        halo = int(getattr(transform, "halo", 0) or 0) if not transform.pixelwise else 0

        def normalized_tiles() -> Iterator[np.ndarray]:
            if halo:  # context-dependent transform: windows with a halo, seams cross-faded
                from studio.blending import blended_tiles
                from studio.slides import read_tile

                for n, tile in enumerate(blended_tiles(grid, lambda box: read_tile(slide, grid, box),
                                                       lambda windows, boxes: _apply_batch(
                                                           transform, windows, source,
                                                           origins=[(b.y, b.x) for b in boxes]),
                                                       halo=min(halo, grid.tile_size // 2),
                                                       batch_size=opts.batch_size), start=1):
                    yield tile
                    if n % grid.cols == 0 or n == len(grid.tiles):
                        reporter.unit_advanced(unit, grid.cols if n % grid.cols == 0 else n % grid.cols)
                return
            for batch, tiles in read_tiles(slide, grid, batch_size=opts.batch_size):
                yield from _apply_batch(transform, batch, source)
                reporter.unit_advanced(unit, len(tiles))

        out_mpp = slide.mpp * grid.scale if slide.mpp else None
        write_pyramid(unit.output, normalized_tiles(), grid.width, grid.height, tile_size=grid.tile_size,
                      mpp=out_mpp, compression=opts.compression, quality=opts.quality,
                      description=f"histostudio {__version__} {getattr(transform, 'command', 'normalize')} "
                                  f"{transform.name} of {path.name}")
        return {"tiles": len(grid.tiles), "width": grid.width, "height": grid.height, "mpp": out_mpp,
                "megapixels": grid.width * grid.height / 1e6, "profile": _record(source),
                "fallback": bool(getattr(source, "fallback", False)), "halo": halo}


def _apply_batch(transform: TileTransform, batch: Sequence[np.ndarray], source: Any,
                 origins: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """Apply to a list of tiles: same-shaped tiles are stacked into one call. Transforms that
    declare ``positional = True`` also get each tile's (y, x) origin on the slide grid."""
    out: list[np.ndarray | None] = [None] * len(batch)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, tile in enumerate(batch):
        by_shape.setdefault(tile.shape, []).append(i)
    for idx in by_shape.values():
        stack = np.stack([batch[i] for i in idx])
        if origins is not None and getattr(transform, "positional", False):
            result = transform.apply(stack, source, origins=[origins[i] for i in idx])
        else:
            result = transform.apply(stack, source)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def _record(source: Any) -> dict[str, Any] | None:
    to_dict = getattr(source, "to_dict", None)
    return to_dict() if callable(to_dict) else None


# --------------------------------------------------------------------------- tile sets
def _write_like_input(src: Path, dst: Path, image: np.ndarray) -> None:
    write_image(dst, image, quality=95)


def _process_tiles(unit: Unit, transform: TileTransform, opts: JobOptions, reporter: Reporter) -> dict[str, Any]:
    inputs = [Path(p) for p in unit.inputs]
    outputs = unit.output_files()
    todo = [(i, o) for i, o in zip(inputs, outputs, strict=True) if not o.exists()]
    reporter.unit_started(unit, len(inputs))
    reporter.unit_advanced(unit, len(inputs) - len(todo))
    failed: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=opts.workers)

    check = getattr(transform, "check", None)  # optional per-file input check (TileTransform)

    def safe_read(path: Path) -> np.ndarray | None:
        try:
            image = read_image(path)
            if check is not None:
                check(image, str(path))
            return image
        except HistostudioError as exc:
            failed[path.name] = str(exc)
            return None

    try:
        # One source profile for the whole set, from a seeded sample of its tiles.
        source = None
        if opts.fit == "slide" or not transform.pixelwise:
            rng = np.random.default_rng(opts.seed)
            pick = sorted(rng.choice(len(inputs), size=min(opts.fit_tiles, len(inputs)), replace=False))
            sample = [im for im in pool.map(safe_read, [inputs[i] for i in pick]) if im is not None]
            reasons = list(failed.values())
            failed.clear()  # read errors are reported when the file itself is processed
            if not sample:
                raise InputError(unit.inputs[0], "no usable image in this set to estimate a stain profile from"
                                                 + (f" (e.g. {reasons[0]})" if reasons else ""))
            source = transform.estimate(sample)
        megapixels = 0.0
        for start in range(0, len(todo), opts.batch_size):
            chunk = todo[start:start + opts.batch_size]
            images = list(pool.map(safe_read, [src for src, _ in chunk]))
            good = [(c, im) for c, im in zip(chunk, images, strict=True) if im is not None]
            results = _apply_batch(transform, [im for _, im in good], source) if good else []
            writes = [pool.submit(_write_like_input, src, dst, res) for ((src, dst), _), res in zip(good, results,
                                                                                                     strict=True)]
            for w in writes:
                w.result()
            megapixels += sum(im.shape[0] * im.shape[1] for _, im in good) / 1e6
            reporter.unit_advanced(unit, len(chunk))
    finally:
        pool.shutdown(wait=True)
    result: dict[str, Any] = {"files": len(inputs), "written": len(todo) - len(failed),
                              "skipped_existing": len(inputs) - len(todo), "megapixels": megapixels,
                              "profile": _record(source), "fallback": bool(getattr(source, "fallback", False))}
    if failed:
        result["failed_files"] = failed
        raise _PartialFailure(result, f"{len(failed)} of {len(inputs)} images could not be read or were refused")
    return result


class _PartialFailure(HistostudioError):
    def __init__(self, result: dict[str, Any], message: str):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- running
def process_unit(unit: Unit, transform: TileTransform, opts: JobOptions,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one unit and return its manifest entry; never raises for a bad input."""
    reporter = reporter or SilentReporter()
    start = time.perf_counter()
    entry: dict[str, Any] = {"kind": unit.kind, "inputs": list(unit.inputs), "output": unit.output}
    try:
        work = _process_slide if unit.kind == "slide" else _process_tiles
        entry.update(work(unit, transform, opts, reporter))
        entry["status"] = "done"
    except _PartialFailure as exc:
        entry.update(exc.result)
        entry.update(status="failed", error=str(exc))
    except HistostudioError as exc:
        entry.update(status="failed", error=str(exc))
    except Exception as exc:  # a bad slide must not stop the batch; keep the evidence
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=6))
    entry["seconds"] = round(time.perf_counter() - start, 3)
    if entry.get("megapixels"):
        entry["megapixels_per_second"] = round(entry["megapixels"] / max(entry["seconds"], 1e-9), 2)
    return entry


@dataclass
class JobReport:
    out: Path
    manifest: Path
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_job(
    units: Sequence[Unit],
    transform: TileTransform,
    out: str | Path,
    opts: JobOptions,
    *,
    command: str = "normalize",
    resume: bool = False,
    overwrite: bool = False,
    executor: str = "local",
    scheduler: str | None = None,
    reporter: Reporter | None = None,
    on_unit_done: Callable[[Unit, dict[str, Any]], None] | None = None,
) -> JobReport:
    """Run every unit, keeping the manifest current; see the module docstring."""
    opts.validate()
    out = Path(out)
    _check_writable(out)
    reporter = reporter or SilentReporter()
    header = {"histostudio": __version__, "command": command, "method": transform.name,
              "transform": transform.describe(), "options": opts.recorded()}
    existing = Manifest.load(out)
    if existing is not None and not overwrite:
        if not resume:
            raise InputError(out, f"already holds a {existing.header.get('command', '')} run ({MANIFEST}); pass "
                                  f"--resume to continue it or --overwrite to redo it")
        mine = {k: header[k] for k in ("command", "method", "transform", "options")}
        theirs = {k: existing.header.get(k) for k in mine}
        if json.loads(json.dumps(mine)) != theirs:
            changed = [k for k in mine if json.loads(json.dumps(mine[k])) != theirs[k]]
            raise InputError(out / MANIFEST, f"was made with different {', '.join(changed)}; "
                                             f"resume with the same settings or use another --out")
        manifest = existing
    else:
        manifest = Manifest(out, header)
        if overwrite:
            for unit in units:
                for f in unit.output_files():
                    f.unlink(missing_ok=True)
    _remove_stale_temporaries(out)
    report = JobReport(out=out, manifest=manifest.path)
    todo = []
    for unit in units:
        if resume and manifest.done(unit):
            report.skipped.append(unit.id)
        else:
            todo.append(unit)
    manifest.save()

    def finish(unit: Unit, entry: dict[str, Any]) -> None:
        manifest.units[unit.id] = entry
        manifest.save()
        if entry["status"] == "done":
            report.done.append(unit.id)
        else:
            report.failed[unit.id] = entry.get("error", "failed")
        reporter.unit_finished(unit, entry)
        if on_unit_done:
            on_unit_done(unit, entry)

    if executor == "local":
        for unit in todo:
            finish(unit, process_unit(unit, transform, opts, reporter))
    elif executor == "dask":
        _run_dask(todo, transform, opts, scheduler, finish)
    else:
        raise InputError("--executor", f"{executor!r}; use local or dask")
    return report


def _run_dask(units: Sequence[Unit], transform: TileTransform, opts: JobOptions, scheduler: str | None,
              finish: Callable[[Unit, dict[str, Any]], None]) -> None:
    """Each unit is an independent dask.distributed task; results come back to this
    process, which alone writes the manifest."""
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise InputError("--executor dask", "needs the 'distributed' extra: pip install 'histostudio[distributed]'"
                         ) from exc
    if not scheduler:
        raise InputError("--scheduler", "is required with --executor dask (e.g. tcp://127.0.0.1:8786)")
    try:
        client = Client(scheduler, timeout=20)
    except (OSError, TimeoutError) as exc:
        raise InputError(scheduler, f"cannot reach the dask scheduler ({exc})") from exc
    try:
        futures = {client.submit(process_unit, unit, transform, opts, pure=False, key=f"histostudio-{unit.id}"): unit
                   for unit in units}
        for future in as_completed(futures):
            unit = futures[future]
            try:
                entry = future.result()
            except Exception as exc:  # the worker died: record and go on
                entry = {"kind": unit.kind, "inputs": list(unit.inputs), "output": unit.output,
                         "status": "failed", "error": f"worker failed: {type(exc).__name__}: {exc}"}
            finish(unit, entry)
    finally:
        client.close()

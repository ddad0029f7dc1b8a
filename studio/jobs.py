"""The slide-batch runner behind ``histostudio normalize``, ``translate`` and ``segment``.

A batch is a list of *units*, each with one manifest entry:

* a **slide** (SVS, NDPI, pyramidal TIFF, ...) -> one tiled pyramidal TIFF (or, for a
  segmenter, its GeoJSON);
* a **tile set**: plain images from one folder (or given loosely) -> images of the same
  name and format. A folder of tiles is one source, like a slide: its stain profile is
  estimated once from sampled tiles, so its tiles stay mutually consistent;
* any other kind a unit processor defines (``segment``: one unit per image, with maps,
  GeoJSON and HoVer-Net JSON).

The runner never knows what a unit's processing is: it hands each unit to a **unit
processor** (:class:`UnitProcessor`: ``process_unit(unit, opts, reporter) -> entry``).
A plain :class:`~studio.transforms.TileTransform` (stain normalizers, virtual IHC) is
adapted by :class:`TileJob` (sample tissue -> ``estimate`` -> stream tiles through
``apply`` -> write atomically); a segmenter is a processor of its own
(:mod:`pipelines.segment_job`). A processor may also ``finalize`` the batch from the
manifest (segment's ``summary.csv``), so a resumed run's summary stays true.

Per unit, the runner keeps the manifest (``manifest.json`` in the output folder,
rewritten atomically after every unit) and its guarantees: a unit that fails is
recorded with its error and the batch goes on; ``--resume`` skips finished units (and a
tile set's finished files) and first removes every temporary an interrupted run left
(atomic-write ``.*.tmp`` files, pyramid spill folders ``.*.levels/``, write probes);
a full disk stops the batch with one line, ``disk full: <path>``. Entries record what
reading changed (``converted``: RGBA composited over white, 16-bit scaled to 8-bit; see
:func:`image_conversion`) as one-line ``notes`` the CLI prints, and tile sets count their
files written and failed. A transform that declares ``skip_blank`` (virtual IHC) never sees
blank tiles (:func:`studio.slides.blank_tiles`): they pass through unchanged, counted.

Units run locally one after another (each uses both cores) or as independent
``dask.distributed`` tasks (:func:`_run_dask`). Workers never receive weights: a
transform built from a :class:`TransformSpec` (an importable factory and JSON-able
arguments: checkpoint paths, options) travels as that spec, and each worker process
loads it once (:func:`load_transform` caches it). A worker lost while it holds a unit
costs that unit one retry on another worker; a second loss records it as failed, and
the entry's ``attempts`` says how many tries it took.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import importlib
import json
import os
import re
import shutil
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from studio import __version__
from studio.errors import HistostudioError, InputError, OutputError
from studio.inputs import expand_inputs as expand_paths
from studio.io import IMAGE_SUFFIXES, atomic_write_text, read_image, write_image
from studio.transforms import TileTransform

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
#: Hidden folder (in the output folder) where Dask tasks claim their attempts; removed after the run.
ATTEMPTS_DIR = ".histostudio-attempts"
#: Tries a unit gets when workers are lost while they hold it (the first run plus one retry).
MAX_ATTEMPTS = 2
#: Seconds to wait for a Dask scheduler to answer (``HISTOSTUDIO_DASK_TIMEOUT`` overrides it).
DASK_CONNECT_TIMEOUT = 20.0
_PROBE_PREFIX = ".histostudio-write-test-"


class DiskFullError(OutputError):
    """The disk filled up: every later unit would fail the same way, so the batch stops."""

    def __init__(self, target: str | Path):
        super().__init__(target, "disk full")
        self.args = (f"disk full: {target} (free some space, then rerun with --resume)",)

    def __str__(self) -> str:
        return self.args[0]


# --------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One manifest entry: a slide, a set of plain images treated as one source, or any
    unit a processor defines (``files``: the outputs it must leave for it to count as done)."""

    id: str
    kind: str  # "slide" | "tiles" | a processor's own kind (segment: "image")
    inputs: tuple[str, ...]
    output: str  # slide: output file; tiles: output folder
    files: tuple[str, ...] = ()

    def output_files(self) -> list[Path]:
        if self.files:
            return [Path(p) for p in self.files]
        if self.kind == "slide":
            return [Path(self.output)]
        return [Path(self.output) / Path(p).name for p in self.inputs]

    @classmethod
    def from_entry(cls, unit_id: str, entry: Mapping[str, Any]) -> Unit:
        """The unit a manifest entry was made for (to find an earlier run's outputs)."""
        files = entry.get("output_files")
        return cls(unit_id, str(entry.get("kind", "")), tuple(entry.get("inputs") or ()),
                   str(entry.get("output", "")), tuple(files) if isinstance(files, list) else ())

    def absolute(self) -> Unit:
        """The same unit with absolute paths (what a worker with another working folder needs)."""
        def a(p: str) -> str:
            return str(Path(p).absolute())

        return dataclasses.replace(self, inputs=tuple(map(a, self.inputs)), output=a(self.output),
                                   files=tuple(map(a, self.files)))


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

    def validate_execution(self) -> None:
        if self.batch_size < 1 or self.workers < 1:
            raise InputError("options", "batch size and workers must be positive")

    def validate(self) -> None:
        if self.fit not in ("slide", "tile"):
            raise InputError("--fit", f"{self.fit!r}; use 'slide' (one profile per slide/folder) or 'tile'")
        if self.tile_size < 64 or self.tile_size % 16:
            raise InputError("--tile-size", f"{self.tile_size}; use a multiple of 16, at least 64")
        if self.compression not in ("jpeg", "deflate", "none"):
            raise InputError("--compression", f"{self.compression!r}; use jpeg, deflate or none")
        if self.fit_tiles < 1:
            raise InputError("options", "fit tiles must be positive")
        self.validate_execution()


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


# --------------------------------------------------------------------------- processors
@runtime_checkable
class UnitProcessor(Protocol):
    """What the runner needs from whatever processes its units.

    Optional methods: ``validate(opts)`` (refuse options before any work; default
    :meth:`JobOptions.validate`), ``recorded_options(opts)`` (the options recorded in the
    manifest header; default :meth:`JobOptions.recorded`), and ``finalize(out, entries,
    units) -> list[Path]`` (files aggregated from every manifest entry after the batch).
    """

    name: str

    def describe(self) -> dict[str, Any]:
        """Parameters, JSON-serialisable, recorded in the manifest (``--resume`` requires a match)."""

    def process_unit(self, unit: Unit, opts: JobOptions, reporter: Reporter) -> dict[str, Any]:
        """Write the unit's outputs (atomically) and return its manifest fields. Raise a
        :class:`~studio.errors.HistostudioError` for a bad input (recorded, batch goes on)."""


class PartialFailure(HistostudioError):
    """Some of a unit's files were written, others failed: ``result`` keeps both counts."""

    def __init__(self, result: dict[str, Any], message: str):
        super().__init__(message)
        self.result = result


_PartialFailure = PartialFailure  # the name earlier code used


@dataclass
class TileJob:
    """A :class:`~studio.transforms.TileTransform` as a unit processor: slides -> pyramidal
    TIFF, tile sets -> images of the same names."""

    transform: TileTransform

    @property
    def name(self) -> str:
        return self.transform.name

    def describe(self) -> dict[str, Any]:
        return self.transform.describe()

    def validate(self, opts: JobOptions) -> None:
        opts.validate()

    def recorded_options(self, opts: JobOptions) -> dict[str, Any]:
        return opts.recorded()

    def process_unit(self, unit: Unit, opts: JobOptions, reporter: Reporter) -> dict[str, Any]:
        work = _process_slide if unit.kind == "slide" else _process_tiles
        return work(unit, self.transform, opts, reporter)


def as_processor(transform: Any) -> Any:
    """The unit processor of ``transform``: itself when it processes units, else a :class:`TileJob`."""
    if isinstance(transform, TransformSpec):
        transform = load_transform(transform)
    if callable(getattr(transform, "process_unit", None)):
        return transform
    return TileJob(transform)


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TransformSpec:
    """How to build a transform: ``factory`` ("module:function") called with ``kwargs``.

    This, not the loaded model, is what a Dask worker receives: checkpoint folders and
    options, JSON-serialisable. Paths should be absolute (workers may run elsewhere).
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps({"factory": self.factory, "kwargs": dict(self.kwargs)}, sort_keys=True, default=str)

    def load(self) -> Any:
        return load_transform(self)

    def build(self) -> Any:
        """A fresh transform (no cache), with this spec attached as ``.spec``."""
        module, _, name = self.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InputError(self.factory, f"cannot load this transform factory ({exc})") from exc
        transform = factory(**dict(self.kwargs))
        try:
            transform.spec = self
        except AttributeError:  # slots or frozen: the runner then pickles the object itself
            pass
        return transform


_LOADED: OrderedDict[str, Any] = OrderedDict()
_LOADED_LOCK = threading.Lock()
#: Loaded transforms kept per process (a worker switching between models keeps the last two).
CACHE_SIZE = 2


def _fingerprint(value: Any) -> Any:
    """Modification stamps of a path argument's files, so a checkpoint rewritten in place is reloaded."""
    if not isinstance(value, (str, Path)) or not str(value) or len(str(value)) > 4096:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return [path.stat().st_mtime_ns, path.stat().st_size]
        if path.is_dir():
            return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size)
                          for p in list(path.glob("*")) + list(path.glob("*/*")) if p.is_file())
    except OSError:
        return None
    return None


def load_transform(spec: TransformSpec) -> Any:
    """Build ``spec`` once per process (the per-worker pipeline cache) and return it."""
    stamps = {k: _fingerprint(v) for k, v in sorted(dict(spec.kwargs).items())}
    key = spec.key() + json.dumps(stamps, default=str)
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        transform = spec.build()
        _LOADED[key] = transform
        while len(_LOADED) > CACHE_SIZE:
            _LOADED.popitem(last=False)
        return transform


def spec_of(transform: Any) -> TransformSpec | None:
    """The spec a transform was built from, if any."""
    if isinstance(transform, TransformSpec):
        return transform
    for obj in (transform, getattr(transform, "transform", None)):
        spec = getattr(obj, "spec", None)
        if isinstance(spec, TransformSpec):
            return spec
    return None


def _holds_weights(transform: Any) -> bool:
    """Whether pickling ``transform`` would ship a model (what workers must never receive)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    for value in getattr(transform, "__dict__", {}).values():
        if isinstance(value, torch.nn.Module) or hasattr(value, "components") or \
                hasattr(getattr(value, "model", None), "state_dict"):
            return True
    return False


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
        try:
            atomic_write_text(self.path, json.dumps({"run": self.header, "units": self.units}, indent=2) + "\n")
        except OSError as exc:
            full = _disk_full(exc, self.path)
            if full:
                raise DiskFullError(full) from exc
            raise

    def done(self, unit: Unit) -> bool:
        entry = self.units.get(unit.id)
        return bool(entry) and entry.get("status") == "done" and all(p.exists() for p in unit.output_files())


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk (no errno)


def _disk_full(exc: BaseException, default: str | Path) -> str | None:
    """The path a full disk refused, when ``exc`` (or what caused it) says the disk is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    target = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutputError) and target is None:
            target = e.target
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _SHORT_WRITE.search(str(e)) or \
                "disk full" in str(e):
            return str(target or getattr(e, "filename", None) or default)
        e = e.__cause__ or e.__context__
    return None


def _check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there (the probe never stays behind)."""
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; give a folder for --out")
    probe = out / f"{_PROBE_PREFIX}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as exc:
        if _disk_full(exc, out):
            raise DiskFullError(out) from exc
        raise OutputError(out, f"output folder is not writable ({exc.strerror or exc})") from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_stale_temporaries(out: Path) -> int:
    """Every temporary an interrupted run can leave behind in ``out``: atomic writes that
    never finished (``.*.tmp``), pyramid spill folders (``.*.levels/``, see
    :func:`studio.slides.write_pyramid`), write probes and Dask attempt claims."""
    n = 0
    for tmp in list(out.rglob(".*.tmp")):
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            n += 1
    for spill in list(out.rglob(".*.levels")):
        if spill.is_dir() and not spill.is_symlink():
            shutil.rmtree(spill, ignore_errors=True)
            n += 1
    for probe in list(out.glob(f"{_PROBE_PREFIX}*")):
        probe.unlink(missing_ok=True)
        n += 1
    if (out / ATTEMPTS_DIR).is_dir():
        shutil.rmtree(out / ATTEMPTS_DIR, ignore_errors=True)
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
        blanks = [0]

        def normalized_tiles() -> Iterator[np.ndarray]:
            if halo:  # context-dependent transform: windows with a halo, seams cross-faded
                from studio.blending import blended_tiles
                from studio.slides import read_tile

                for n, tile in enumerate(blended_tiles(grid, lambda box: read_tile(slide, grid, box),
                                                       lambda windows, boxes: _apply_batch(
                                                           transform, windows, source,
                                                           origins=[(b.y, b.x) for b in boxes], blanks=blanks),
                                                       halo=min(halo, grid.tile_size // 2),
                                                       batch_size=opts.batch_size), start=1):
                    yield tile
                    if n % grid.cols == 0 or n == len(grid.tiles):
                        reporter.unit_advanced(unit, grid.cols if n % grid.cols == 0 else n % grid.cols)
                return
            for batch, tiles in read_tiles(slide, grid, batch_size=opts.batch_size):
                yield from _apply_batch(transform, batch, source, blanks=blanks)
                reporter.unit_advanced(unit, len(tiles))

        out_mpp = slide.mpp * grid.scale if slide.mpp else None
        write_pyramid(unit.output, normalized_tiles(), grid.width, grid.height, tile_size=grid.tile_size,
                      mpp=out_mpp, compression=opts.compression, quality=opts.quality,
                      description=f"histostudio {__version__} {getattr(transform, 'command', 'normalize')} "
                                  f"{transform.name} of {path.name}")
        result = {"tiles": len(grid.tiles), "width": grid.width, "height": grid.height, "mpp": out_mpp,
                  "megapixels": grid.width * grid.height / 1e6, "profile": _record(source),
                  "fallback": bool(getattr(source, "fallback", False)), "halo": halo, "written": 1}
        if getattr(transform, "skip_blank", False):
            result["blank_tiles"] = blanks[0]
        return result


def _apply_batch(transform: TileTransform, batch: Sequence[np.ndarray], source: Any,
                 origins: Sequence[tuple[int, int]] | None = None, blanks: list[int] | None = None
                 ) -> list[np.ndarray]:
    """Apply to a list of tiles: same-shaped tiles go in one call, stacked unless the transform
    declares ``accepts_tile_lists = True`` (then as the list, with no copy). Transforms that
    declare ``positional = True`` also get each tile's (y, x) origin on the slide grid.

    Transforms that declare ``skip_blank = True`` (virtual IHC) never see blank tiles --
    glass, black, ink or featureless (:func:`studio.slides.blank_tiles`): those are passed
    through unchanged, as a white tile would come out, and counted in ``blanks[0]``.
    """
    out: list[np.ndarray | None] = [None] * len(batch)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    skip = bool(getattr(transform, "skip_blank", False))
    if skip and batch:
        from studio.slides import blank_tiles

        for i, tile in enumerate(batch):
            if blank_tiles(tile[None])[0]:
                out[i] = tile
        if blanks is not None:
            blanks[0] += sum(o is not None for o in out)
    for i, tile in enumerate(batch):
        if out[i] is None:
            by_shape.setdefault(tile.shape, []).append(i)
    as_list = bool(getattr(transform, "accepts_tile_lists", False))
    for idx in by_shape.values():
        stack = [batch[i] for i in idx] if as_list else np.stack([batch[i] for i in idx])
        where = [origins[i] for i in idx] if origins is not None and getattr(transform, "positional", False) \
            else None
        result = apply_fitted(transform, stack, source, where)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def apply_fitted(transform: TileTransform, stack: np.ndarray | list[np.ndarray], source: Any,
                 origins: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """``transform.apply`` on ``stack`` in chunks that fit the device's memory.

    ``--batch-size`` is what a user asks for; a GPU with less free memory than that batch
    needs raises out-of-memory. Then the chunk is halved (accelerate's
    ``should_reduce_batch_size`` decides what counts as out-of-memory, on CUDA, MPS or the
    CPU) and the size that worked is kept as ``transform.fitted_batch_size`` for the rest of
    the job, so only the first batch pays for the search. Any other error propagates.
    """
    limit = int(getattr(transform, "fitted_batch_size", 0) or len(stack))
    parts: list[np.ndarray] = []
    start = 0
    while start < len(stack):
        n = min(limit, len(stack) - start)
        chunk = stack[start:start + n]
        try:
            if origins is not None:
                parts.append(transform.apply(chunk, source, origins=list(origins[start:start + n])))
            else:
                parts.append(transform.apply(chunk, source))
        except RuntimeError as exc:
            from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

            if n == 1 or not should_reduce_batch_size(exc):
                raise
            clear_device_cache(garbage_collection=True)
            limit = n // 2
            transform.fitted_batch_size = limit
            continue
        start += n
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _record(source: Any) -> dict[str, Any] | None:
    to_dict = getattr(source, "to_dict", None)
    return to_dict() if callable(to_dict) else None


# --------------------------------------------------------------------------- input notes
def image_conversion(path: str | Path) -> str | None:
    """What :func:`studio.io.read_image` changes to make ``path`` 8-bit RGB, from the file's
    header: ``"RGBA composited over white"``, ``"16-bit scaled to 8-bit"`` (or both), or
    None. Recorded in the manifest and printed as a note, since both change pixel values
    a user may rely on (alpha masks, 16-bit dynamic range)."""
    path = Path(path)
    notes = []
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                dtype, samples = np.dtype(page.dtype), int(page.samplesperpixel)
            alpha = samples == 4
            deep = "16-bit" if dtype.itemsize == 2 else ("floating-point" if dtype.kind == "f" else None)
        else:
            from PIL import Image

            with Image.open(path) as img:
                mode, info = img.mode, img.info
            alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in info)
            deep = "16-bit" if mode in ("I;16", "I;16B", "I;16L", "I") else None
    except Exception:  # the reader proper reports unreadable files
        return None
    if alpha:
        notes.append("RGBA composited over white")
    if deep:
        notes.append(f"{deep} scaled to 8-bit")
    return " and ".join(notes) or None


def conversions_note(converted: Mapping[str, str], total: int) -> str | None:
    """One line for the conversions of a unit's files (``{file: conversion}``)."""
    if not converted:
        return None
    kinds: dict[str, int] = {}
    for what in converted.values():
        kinds[what] = kinds.get(what, 0) + 1
    parts = [f"{n} of {total} file(s) {what}" for what, n in kinds.items()] if total > 1 else list(kinds)
    return "; ".join(parts)


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
    converted: dict[str, str] = {}
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

    def read_checked(path: Path) -> tuple[np.ndarray | None, str | None, str | None]:
        """(image, error, conversion) of one file, in a pool thread; errors are recorded
        by the caller, in file order."""
        try:
            image = read_image(path)
            if check is not None:
                check(image, str(path))
        except HistostudioError as exc:
            return None, str(exc), None
        return image, None, image_conversion(path)

    written = 0
    blanks = [0]
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
                raise InputError(unit.inputs[0], "no image of this set could be read or was accepted"
                                                 + (f" (e.g. {reasons[0]})" if reasons else ""))
            source = transform.estimate(sample)
        # A three-stage pipeline over chunks of ``batch_size`` files: chunk k+1 is read and
        # decoded in the pool while chunk k is transformed here and chunk k-1 is encoded and
        # written in the pool (PNG/JPEG codecs release the GIL). At most three chunks are
        # held. Outputs, failures and their order are those of one chunk at a time: a
        # chunk's read errors, then its write errors, chunk after chunk.
        megapixels = 0.0
        chunks = deque(todo[start:start + opts.batch_size] for start in range(0, len(todo), opts.batch_size))

        def start_reads() -> tuple[list[tuple[Path, Path]], list[Any]] | None:
            if not chunks:
                return None
            chunk = chunks.popleft()
            return chunk, [pool.submit(read_checked, src) for src, _ in chunk]

        def finish_chunk(chunk: list[tuple[Path, Path]], read_errors: dict[str, str],
                         writes: list[tuple[Path, Path, Any]], mpix: float) -> None:
            nonlocal written, megapixels
            failed.update(read_errors)
            for src, dst, w in writes:
                try:
                    w.result()
                    written += 1
                except OSError as exc:  # this file could not be written: counted, the others go on
                    if _disk_full(exc, dst):
                        raise
                    failed[src.name] = str(exc)
            megapixels += mpix
            reporter.unit_advanced(unit, len(chunk))

        reading = start_reads()
        writing: tuple[Any, ...] | None = None
        while reading is not None:
            chunk, reads = reading
            reading = start_reads()  # the next chunk decodes while this one is transformed
            good, read_errors = [], {}
            for (src, dst), f in zip(chunk, reads, strict=True):
                image, error, what = f.result()
                if error is not None:
                    read_errors[src.name] = error
                    continue
                if what:
                    converted[src.name] = what
                good.append(((src, dst), image))
            results = _apply_batch(transform, [im for _, im in good], source, blanks=blanks) if good else []
            writes = [(src, dst, pool.submit(_write_like_input, src, dst, res))
                      for ((src, dst), _), res in zip(good, results, strict=True)]
            mpix = sum(im.shape[0] * im.shape[1] for _, im in good) / 1e6
            del good, results
            if writing is not None:
                finish_chunk(*writing)
            writing = (chunk, read_errors, writes, mpix)
        if writing is not None:
            finish_chunk(*writing)
    finally:
        pool.shutdown(wait=True)
    result: dict[str, Any] = {"files": len(inputs), "written": written,
                              "skipped_existing": len(inputs) - len(todo), "megapixels": megapixels,
                              "profile": _record(source), "fallback": bool(getattr(source, "fallback", False))}
    if getattr(transform, "skip_blank", False):
        result["blank_files"] = blanks[0]
    if converted:
        result["converted"] = converted
        result["notes"] = [conversions_note(converted, len(inputs))]
    if failed:
        result["failed_files"] = failed
        first = next(iter(failed.items()))
        raise PartialFailure(result, f"{len(failed)} of {len(inputs)} images failed and {written} were written "
                                     f"(first failure: {first[1]})")
    return result


# --------------------------------------------------------------------------- running
def _base_entry(unit: Unit) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": unit.kind, "inputs": list(unit.inputs), "output": unit.output}
    if unit.files:
        entry["output_files"] = list(unit.files)
    return entry


def _discard(files: Sequence[Path]) -> None:
    for f in files:
        try:
            f.unlink(missing_ok=True)
        except OSError:
            pass


def process_unit(unit: Unit, transform: Any, opts: JobOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one unit and return its manifest entry; never raises for a bad input.

    ``transform``: a unit processor, a tile transform or a :class:`TransformSpec`. A unit
    that declares its files (``Unit.files``, e.g. segment's maps and GeoJSON) counts only
    whole: when it fails, none of its files is left behind.
    """
    reporter = reporter or SilentReporter()
    start = time.perf_counter()
    entry = _base_entry(unit)
    try:
        entry.update(as_processor(transform).process_unit(unit, opts, reporter))
        entry["status"] = "done"
    except PartialFailure as exc:
        entry.update(exc.result)
        entry.update(status="failed", error=str(exc))
    except Exception as exc:  # a bad slide must not stop the batch; keep the evidence
        full = _disk_full(exc, unit.output)
        if full:
            entry.update(status="failed", error=str(DiskFullError(full)), disk_full=full)
        elif isinstance(exc, HistostudioError):
            entry.update(status="failed", error=str(exc))
        else:
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=6))
    if entry["status"] != "done" and unit.files:
        _discard(unit.output_files())
    fitted = getattr(getattr(transform, "transform", transform), "fitted_batch_size", None)
    if fitted:  # apply_fitted halved --batch-size to fit the device's memory
        entry["fitted_batch_size"] = int(fitted)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    if entry.get("megapixels") and entry["status"] == "done":
        entry["megapixels_per_second"] = round(entry["megapixels"] / max(entry["seconds"], 1e-9), 2)
    return entry


@dataclass
class JobReport:
    out: Path
    manifest: Path
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: Files written / failed across the units run now (tile sets count their images).
    files_written: int = 0
    files_failed: int = 0
    #: Per unit run now: (files written, files failed).
    unit_files: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Units that needed a retry after a lost worker: id -> attempts.
    retried: dict[str, int] = field(default_factory=dict)
    #: One line per unit whose inputs were changed on reading (RGBA, 16-bit) or were blank.
    notes: list[str] = field(default_factory=list)
    #: Files the processor aggregated at the end (e.g. segment's summary.csv).
    outputs: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: units done and failed, and the files behind them."""
        text = f"{len(self.done)} done, {len(self.failed)} failed"
        if self.files_written or self.files_failed:
            text += f" (input files: {self.files_written} written, {self.files_failed} failed)"
        if self.retried:
            text += f"; retried after a lost worker: {', '.join(f'{k} ({v} tries)' for k, v in self.retried.items())}"
        return text

    def failure_lines(self) -> list[str]:
        """One line per failed unit: its error, and for tile sets what was written and what failed."""
        lines = []
        for unit_id, error in self.failed.items():
            written, failed = self.unit_files.get(unit_id, (0, 0))
            counts = f" [input files: {written} written, {failed} failed]" if written or failed > 1 else ""
            lines.append(f"{unit_id}: {error}{counts}")
        return lines


def _entry_files(entry: Mapping[str, Any]) -> tuple[int, int]:
    """(input files processed and written, input files that failed) of one entry."""
    if "written" in entry:
        return int(entry["written"] or 0), len(entry.get("failed_files") or {})
    if entry.get("kind") == "tiles" and entry.get("status") != "done":
        return 0, len(entry.get("inputs") or ())
    return (1, 0) if entry.get("status") == "done" else (0, 1)


def run_job(
    units: Sequence[Unit],
    transform: Any,
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
    """Run every unit, keeping the manifest current; see the module docstring.

    ``transform``: a tile transform, a unit processor, or a :class:`TransformSpec` (what
    Dask workers then receive). Before anything is written: the options are validated,
    ``out`` must be a folder (or not exist), and with ``executor="dask"`` the scheduler
    must answer and its workers run this histostudio.
    """
    if executor not in ("local", "dask"):
        raise InputError("--executor", f"{executor!r}; use local or dask")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a folder; give a folder for --out")
    processor = as_processor(transform)
    validate = getattr(processor, "validate", None)
    if callable(validate):
        validate(opts)
    else:
        opts.validate()
    client = None
    if executor == "dask":
        wire = spec_of(transform) or transform
        _refuse_weights(wire)
        client = _connect(scheduler)
    try:
        if client is not None:
            _check_workers(client, str(scheduler))
        return _run(units, processor, out, opts, command=command, resume=resume, overwrite=overwrite,
                    reporter=reporter or SilentReporter(), on_unit_done=on_unit_done,
                    dask=(client, wire) if client is not None else None)
    finally:
        if client is not None:
            client.close()


def _run(units: Sequence[Unit], processor: Any, out: Path, opts: JobOptions, *, command: str, resume: bool,
         overwrite: bool, reporter: Reporter, on_unit_done: Callable[[Unit, dict[str, Any]], None] | None,
         dask: tuple[Any, Any] | None) -> JobReport:
    _check_writable(out)
    recorded = getattr(processor, "recorded_options", None)
    header = {"histostudio": __version__, "command": command, "method": processor.name,
              "transform": processor.describe(), "options": recorded(opts) if callable(recorded) else opts.recorded()}
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
            earlier = [Unit.from_entry(k, v) for k, v in (existing.units.items() if existing else ())]
            _remove_outputs([*units, *earlier], out)
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
        if entry.get("disk_full"):
            raise DiskFullError(entry["disk_full"])
        if entry["status"] == "done":
            report.done.append(unit.id)
        else:
            report.failed[unit.id] = entry.get("error", "failed")
        written, failed = _entry_files(entry)
        report.files_written += written
        report.files_failed += failed
        report.unit_files[unit.id] = (written, failed)
        report.notes.extend(f"{unit.id}: {note}" for note in entry.get("notes") or ())
        if int(entry.get("attempts", 1)) > 1:
            report.retried[unit.id] = int(entry["attempts"])
        reporter.unit_finished(unit, entry)
        if on_unit_done:
            on_unit_done(unit, entry)

    if dask is None:
        for unit in todo:
            entry = process_unit(unit, processor, opts, reporter)
            entry["attempts"] = 1
            finish(unit, entry)
    else:
        _run_dask(todo, dask[1], opts, dask[0], out, finish)
    finalize = getattr(processor, "finalize", None)
    if callable(finalize):
        try:
            report.outputs = list(finalize(out, manifest.units, units))
        except OSError as exc:
            full = _disk_full(exc, out)
            if full:
                raise DiskFullError(full) from exc
            raise
    return report


def _remove_outputs(units: Sequence[Unit], out: Path) -> None:
    """``--overwrite``: the outputs of this run's units and of the run the folder held (inside ``out`` only)."""
    root = out.resolve()
    for unit in units:
        for f in unit.output_files():
            try:
                inside = f.resolve().is_relative_to(root)
            except OSError:
                continue
            if inside and f.is_file():
                f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- dask
def _claim_attempt(folder: Path, unit_id: str) -> int:
    """Number this start of a unit's task (1, 2, ...): a lost worker's unit is restarted by
    the scheduler, and only the claims on the shared output folder tell how often."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        try:
            fd = os.open(folder / f"{unit_id}.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            k += 1
            continue
        os.close(fd)
        return k


def _attempts_made(folder: Path, unit_id: str) -> int:
    return sum(1 for _ in folder.glob(f"{glob.escape(unit_id)}.*")) if folder.is_dir() else 0


def _failed_entry(unit: Unit, error: str, attempts: int) -> dict[str, Any]:
    return {**_base_entry(unit), "status": "failed", "error": error, "attempts": attempts}


def _finished_path(attempts_dir: Path, unit_id: str) -> Path:
    return attempts_dir / "finished" / f"{unit_id}.json"


def _record_finished(attempts_dir: Path, unit_id: str, entry: dict[str, Any]) -> None:
    """Keep a finished unit's entry on the shared output folder, atomically. A task's result
    lives in its worker's memory until the client gathers it; when that worker is killed
    first, the scheduler recomputes the task elsewhere, and this record lets the rerun return
    the finished entry instead of processing the unit a second time."""
    path = _finished_path(attempts_dir, unit_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(entry))


def _recorded_finished(attempts_dir: Path, unit_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(_finished_path(attempts_dir, unit_id).read_text())
    except (OSError, ValueError):
        return None


def dask_task(unit: Unit, transform: Any, opts: JobOptions, attempts_dir: str,
              max_attempts: int = MAX_ATTEMPTS) -> dict[str, Any]:
    """One unit on a Dask worker: return its entry if an earlier start finished it (its
    result was lost with its worker before it was gathered), else claim the attempt, load
    the transform (cached per process when it is a spec), process, record and return the
    manifest entry."""
    finished = _recorded_finished(Path(attempts_dir), unit.id)
    if finished is not None:
        return finished
    attempt = _claim_attempt(Path(attempts_dir), unit.id)
    if attempt > max_attempts:
        return _failed_entry(unit, f"its worker was lost {max_attempts} times while processing it; not retried "
                                   f"again", max_attempts)
    try:
        loaded = load_transform(transform) if isinstance(transform, TransformSpec) else transform
    except HistostudioError as exc:
        return _failed_entry(unit, f"the worker could not load the transform: {exc}", attempt)
    entry = process_unit(unit, loaded, opts)
    entry["attempts"] = attempt
    try:
        from distributed import get_worker

        entry["worker"] = get_worker().address
    except (ImportError, ValueError):
        pass
    try:
        _record_finished(Path(attempts_dir), unit.id, entry)
    except (OSError, TypeError):  # no record: a lost result would only be recomputed, as before
        pass
    return entry


def _connect(scheduler: str | None) -> Any:
    """A ``distributed.Client`` on ``scheduler``, or one line saying why not."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise InputError("--executor dask", "needs the 'distributed' extra: pip install 'histostudio[distributed]'"
                         ) from exc
    if not scheduler:
        raise InputError("--scheduler", "is required with --executor dask (e.g. tcp://127.0.0.1:8786)")
    import logging

    quiet = [logging.getLogger(n) for n in ("distributed.client", "distributed.comm", "distributed.core")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # a refused connection is reported here in one line, not as retries in the log
        lg.setLevel(logging.CRITICAL)
    try:
        timeout = float(os.environ.get("HISTOSTUDIO_DASK_TIMEOUT") or DASK_CONNECT_TIMEOUT)
        return Client(scheduler, timeout=timeout)
    except Exception as exc:  # OSError, TimeoutError, ValueError (bad address), CommClosedError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--scheduler {scheduler}", f"cannot reach the dask scheduler ({reason[:200]}); start "
                                                     f"one (dask scheduler) or check the address") from exc
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _check_workers(client: Any, scheduler: str) -> None:
    """Every worker present must run this histostudio (a task it cannot import would fail on each)."""
    import importlib.metadata

    try:
        versions = client.run(importlib.metadata.version, "histostudio", on_error="return")
    except Exception:  # a scheduler refusing run() must not stop the batch
        return
    for worker, version in versions.items():
        if isinstance(version, BaseException):
            raise InputError(f"--scheduler {scheduler}", f"worker {worker} cannot import histostudio ({version}); "
                                                         f"install it on every worker: pip install "
                                                         f"'histostudio[distributed]'")
        if version != __version__:
            raise InputError(f"--scheduler {scheduler}", f"worker {worker} runs histostudio {version}, this "
                                                         f"client {__version__}; install the same version on "
                                                         f"every worker")


def _refuse_weights(transform: Any) -> None:
    if not isinstance(transform, TransformSpec) and _holds_weights(transform):
        raise InputError("--executor dask", f"the {getattr(transform, 'name', 'given')} transform holds a model "
                                            f"and has no TransformSpec; workers load models from checkpoint "
                                            f"paths, never pickled weights (build it with TransformSpec)")


def _run_dask(units: Sequence[Unit], transform: Any, opts: JobOptions, client: Any, out: Path,
              finish: Callable[[Unit, dict[str, Any]], None]) -> None:
    """Each unit is an independent dask.distributed task; results come back to this
    process, which alone writes the manifest.

    ``transform`` travels as its :class:`TransformSpec` when it has one (workers load and
    cache it), otherwise pickled (only transforms without a model: :func:`_refuse_weights`).
    A unit whose worker is lost is restarted once (by the scheduler, or resubmitted here
    when the scheduler gives up on it with ``KilledWorker``); each start claims an attempt
    in ``OUT/.histostudio-attempts``, so a third start refuses and the unit is recorded
    failed, with ``attempts`` in its entry.
    """
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    attempts_dir = out.absolute() / ATTEMPTS_DIR / token
    futures: dict[Any, Unit] = {}
    try:
        submits: dict[str, int] = {}

        def submit(unit: Unit) -> Any:
            submits[unit.id] = submits.get(unit.id, 0) + 1
            return client.submit(dask_task, unit.absolute(), transform, opts, str(attempts_dir), MAX_ATTEMPTS,
                                 key=f"histostudio-{token}-{unit.id}-{submits[unit.id]}", pure=False)

        for unit in units:
            futures[submit(unit)] = unit
        pending = as_completed(list(futures))
        for future in pending:
            unit = futures.pop(future)
            try:
                entry = future.result()
            except Exception as exc:  # KilledWorker, a worker that cannot unpickle the task, ...
                tries = _attempts_made(attempts_dir, unit.id)
                if type(exc).__name__ == "KilledWorker" and tries < MAX_ATTEMPTS \
                        and submits[unit.id] <= MAX_ATTEMPTS:
                    again = submit(unit)
                    futures[again] = unit
                    pending.add(again)
                    continue
                kind = "worker lost" if type(exc).__name__ == "KilledWorker" else "worker failed"
                first = (str(exc).strip().splitlines() or [""])[0]
                entry = _failed_entry(unit, f"{kind}: {type(exc).__name__}: {first}", max(tries, 1))
            finally:
                future.release()
            entry.update(_base_entry(unit))  # this process's paths, as the local executor records them
            finish(unit, entry)
    finally:
        for future in list(futures):  # the batch stopped (disk full): do not leave tasks running
            future.cancel()
        shutil.rmtree(attempts_dir, ignore_errors=True)
        try:
            attempts_dir.parent.rmdir()
        except OSError:
            pass

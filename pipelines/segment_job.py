"""The job behind ``histostudio segment``: nuclei of tiles, folders, globs and whole slides.

:func:`segment_inputs` expands the inputs (files, folders -- their images and slides,
not recursive --, glob patterns), then segments each one with a
:class:`~pipelines.segmenter.NucleiSegmenter` and writes, under ``out``:

=====================  =========================================================  ========
file                   content                                                    inputs
=====================  =========================================================  ========
``<name>_inst.npy``    int32 ``(H, W)`` instance ids ``1..n`` (0 = background)    images
``<name>_cls.npy``     uint8 ``(H, W)`` class code of each nucleus' pixels        images
``<name>.geojson``     QuPath detections, full-resolution pixel coordinates      all
``json/<name>.json``   HoVer-Net-style per-nucleus JSON                          images
``summary.csv``        one row per input: status, size, nuclei per class, error  all
=====================  =========================================================  ========

Instance and class maps are two ``.npy`` files (the :class:`~studio.data.base.NucleiSample`
dtypes), not one stacked array: a whole slide's maps would not fit in memory, so slides get
GeoJSON only, streamed nucleus by nucleus while the slide is segmented.

Images are segmented at their own pixel size. Slides are read through
:func:`studio.slides.tile_grid` at a working resolution: ``mpp`` when given (an error
for a slide without mpp metadata), otherwise the segmenter's training resolution when the
slide has mpp metadata (native resolution when it has none, or when it is scanned coarser
than that). Windows with no tissue (:func:`studio.slides.tissue_mask`) are skipped.
GeoJSON coordinates are level-0 pixels whatever the working resolution.

Windows overlap by ``overlap`` pixels and are blended and merged in bands of rows
(:func:`pipelines.segmenter.segment_windows`), so nuclei on window borders come out
whole and once, and memory stays bounded by a band of rows, not the slide.

Every file is written atomically. A bad input (corrupt image, unreadable slide) is
recorded in ``summary.csv`` with its error and the others go on; inputs that do not
exist, globs that match nothing and files of unknown type are refused before any work.
"""

from __future__ import annotations

import csv
import io
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from studio.errors import HistostudioError, InputError
from studio.inputs import expand_inputs as expand_paths

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SegmentInput:
    """One expanded input: output stem ``name``, the file, ``kind`` "image" or "slide"."""

    name: str
    path: Path
    kind: str


def _kind(path: Path) -> str | None:
    from studio.io import IMAGE_SUFFIXES
    from studio.slides import SLIDE_SUFFIXES, is_slide_path

    if is_slide_path(path):
        return "slide"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return "slide"
    return None


def expand_segment_inputs(inputs: Sequence[str | Path]) -> list[SegmentInput]:
    """Files, folders (their images and slides) and globs -> inputs with unique names.

    Raises:
        InputError: no inputs, a missing path, a glob matching nothing, a file that is
            neither image nor slide, a folder with neither, two inputs with one name.
    """
    kinds: dict[Path, str | None] = {}

    def accept(path: Path) -> bool:
        kinds[path] = _kind(path)
        return kinds[path] is not None

    found = [(path, kinds[path]) for path, _ in expand_paths(inputs, accept, "images or slides")]
    out: list[SegmentInput] = []
    names: dict[str, Path] = {}
    for path, kind in dict.fromkeys(found):
        name = path.stem
        if name in names:
            raise InputError(path, f"has the same name as {names[name]}; outputs would collide (rename one or "
                                   "run them separately)")
        names[name] = path
        out.append(SegmentInput(name, path, kind))
    return out


# --------------------------------------------------------------------------- summary
def _summary_text(rows: list[dict[str, Any]], class_names: dict[int, str]) -> str:
    columns = ["name", "input", "kind", "status", "width", "height", "mpp", "n_nuclei",
               *[class_names[c] for c in sorted(class_names)], "unknown", "seconds", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def _counts_row(counts: np.ndarray, class_names: dict[int, str]) -> dict[str, int]:
    row = {class_names[c]: int(counts[c]) if c < len(counts) else 0 for c in class_names}
    row["unknown"] = int(counts[0]) if len(counts) else 0
    return row


# --------------------------------------------------------------------------- one image
def _segment_image(item: SegmentInput, out: Path, segmenter: Any, opts: dict[str, Any],
                   emit: Callable[..., None]) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    from studio.export import nucleus_features, write_features, write_hovernet_json
    from studio.io import read_image, save_npy

    image = read_image(item.path)
    h, w = image.shape[:2]
    inst, cls, info = segmenter.segment(image, tile_size=opts["tile_size"], overlap=opts["overlap"],
                                        batch_size=opts["batch_size"], image_mpp=opts.get("image_mpp"),
                                        progress=lambda d, t: emit("windows", done=d, total=t))
    names = segmenter.class_names
    written = [(f"{item.name} inst", save_npy(out / f"{item.name}_inst.npy", inst)),
               (f"{item.name} cls", save_npy(out / f"{item.name}_cls.npy", cls))]
    geo = out / f"{item.name}.geojson"
    write_features(geo, nucleus_features(inst, cls, names or {}, simplify=opts["simplify"],
                                         type_prob=info["type_prob"]))
    written.append((f"{item.name} geojson", geo))
    mpp = opts.get("image_mpp") or opts["mpp"]
    js = write_hovernet_json(out / "json" / f"{item.name}.json", inst, cls, type_prob=info["type_prob"],
                             mag=round(10.0 / mpp, 2) if mpp else None)
    written.append((f"{item.name} json", js))
    counts = np.bincount(_instance_classes(inst, cls), minlength=len(names) + 1)
    row = {"width": w, "height": h, "mpp": mpp, "n_nuclei": int(inst.max(initial=0)), **_counts_row(counts, names)}
    return row, written


def _instance_classes(inst: np.ndarray, cls: np.ndarray) -> np.ndarray:
    n = int(inst.max(initial=0))
    out = np.zeros(n + 1, dtype=np.int64)
    fg = inst > 0
    out[inst[fg]] = cls[fg]
    return out[1:]


# --------------------------------------------------------------------------- one slide
def _slide_mpp(slide: Any, requested: float | None, model_mpp: float | None) -> float | None:
    from studio.slides import MPP_TOLERANCE

    if requested is not None:
        return requested
    if model_mpp is None or slide.mpp is None:
        return None
    if model_mpp < slide.mpp * (1 - MPP_TOLERANCE):
        return None  # scanned coarser than the model's resolution: work at native resolution
    return model_mpp


def _segment_slide(item: SegmentInput, out: Path, segmenter: Any, opts: dict[str, Any],
                   emit: Callable[..., None]) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    from pipelines.segmenter import Box, segment_windows
    from studio.export import nucleus_feature, write_features
    from studio.slides import Tile, open_slide, read_tiles, tile_grid, tissue_mask

    names = segmenter.class_names
    counts = np.zeros(len(names) + 1, dtype=np.int64)
    with open_slide(item.path) as slide:
        mpp = _slide_mpp(slide, opts["mpp"], segmenter.mpp)
        mask = tissue_mask(slide)
        grid = tile_grid(slide, opts["tile_size"], mpp=mpp, mask=mask)
        scale = grid.scale

        def keep(box: Box) -> bool:
            m = mask.mask
            f = scale / mask.downsample
            y0, x0 = int(box.y * f), int(box.x * f)
            y1 = max(y0 + 1, int(np.ceil((box.y + box.h) * f)))
            x1 = max(x0 + 1, int(np.ceil((box.x + box.w) * f)))
            return bool(m[y0:y1, x0:x1].any())

        def read(boxes: list[Box]) -> Iterator[tuple[list[np.ndarray], list[Box]]]:
            tiles = [Tile(index=k, row=0, col=k, x=b.x, y=b.y, size=(b.w, b.h), tissue=1.0)
                     for k, b in enumerate(boxes)]
            start = 0
            for arrays, batch in read_tiles(slide, grid, tiles, batch_size=opts["batch_size"]):
                yield arrays, boxes[start:start + len(batch)]
                start += len(batch)

        def features() -> Iterator[dict[str, Any]]:
            for nuc in segment_windows(segmenter.predict, read, grid.height, grid.width,
                                       num_classes=segmenter.num_classes, tile_size=opts["tile_size"],
                                       overlap=opts["overlap"], postprocess=segmenter.postprocess, keep_window=keep,
                                       on_windows=lambda d, t: emit("windows", done=d, total=t)):
                counts[nuc.type] += 1
                feat = nucleus_feature(nuc.mask, nuc.type, names, origin=(nuc.x, nuc.y), scale=scale,
                                       simplify=opts["simplify"], nucleus_id=nuc.id, type_prob=nuc.type_prob)
                if feat is not None:
                    yield feat

        geo = out / f"{item.name}.geojson"
        n = write_features(geo, features())
        w0, h0 = slide.dimensions
    row = {"width": w0, "height": h0, "mpp": grid.mpp, "n_nuclei": n, **_counts_row(counts, names)}
    return row, [(f"{item.name} geojson", geo)]


# --------------------------------------------------------------------------- the job
def segment_inputs(
    inputs: Sequence[str | Path],
    out: str | Path,
    segmenter: Any,
    *,
    tile_size: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    mpp: float | None = None,
    image_mpp: float | None = None,
    simplify: float = 0.5,
    progress: Progress | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> list[tuple[str, Path]]:
    """Segment every input and write its outputs (see the module docstring).

    Args:
        inputs: image files, folders, glob patterns and slides.
        out: output folder (created).
        segmenter: a :class:`~pipelines.segmenter.NucleiSegmenter`.
        tile_size, overlap: sliding-window side and overlap in pixels.
        batch_size: windows per forward pass.
        image_mpp: microns per pixel of plain images when it differs from the model's; they are
            resampled to the model's resolution and the maps returned on the image's grid.
        mpp: working resolution for slides (microns per pixel); None = the segmenter's.
            Images are always segmented at their own pixel size; for them ``mpp`` is only
            recorded (summary, and ``mag = 10 / mpp`` in the HoVer-Net JSON).
        simplify: GeoJSON outline simplification tolerance in pixels.
        progress: called with event dicts: ``{"event": "start", "input", "kind", "index",
            "count"}``, ``{"event": "windows", "input", "done", "total"}``,
            ``{"event": "done", "input", "n_nuclei", "seconds"}``,
            ``{"event": "failed", "input", "error"}``.
        errors: when given, ``(input name, error message)`` of each failed input is appended.

    Returns:
        ``(label, path)`` of every file written, ``summary.csv`` last (labelled "summary").
        Failed inputs are rows of ``summary.csv`` with ``status=failed`` and the error.

    Raises:
        InputError: bad options or inputs (before anything is written).
    """
    if not isinstance(tile_size, int) or tile_size < 32:
        raise InputError("--tile-size", f"{tile_size!r}; use at least 32 pixels")
    if not isinstance(overlap, int) or not 0 <= overlap <= tile_size // 2:
        raise InputError("--overlap", f"{overlap!r}; use 0 to half the tile size ({tile_size // 2})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError("--batch-size", f"{batch_size!r}; must be a positive integer")
    if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < 100):
        raise InputError("--mpp", f"{mpp!r}; expected microns per pixel, e.g. 0.5")
    if simplify < 0:
        raise InputError("--simplify", f"{simplify}; must be >= 0 pixels")
    items = expand_segment_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opts = {"tile_size": tile_size, "overlap": overlap, "batch_size": batch_size, "mpp": mpp, "simplify": simplify,
            "image_mpp": image_mpp}
    names = segmenter.class_names
    rows: list[dict[str, Any]] = []
    written: list[tuple[str, Path]] = []
    summary = out / "summary.csv"

    from studio.io import atomic_write_text

    for index, item in enumerate(items):
        def emit(event: str, _item: SegmentInput = item, **values: Any) -> None:
            if progress is not None:
                progress({"event": event, "input": _item.name, **values})

        emit("start", kind=item.kind, index=index, count=len(items))
        start = time.time()
        base = {"name": item.name, "input": str(item.path), "kind": item.kind}
        try:
            worker = _segment_slide if item.kind == "slide" else _segment_image
            row, files = worker(item, out, segmenter, opts, emit)
        except (HistostudioError, OSError, ValueError, RuntimeError) as exc:
            message = str(exc) if isinstance(exc, HistostudioError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, HistostudioError):
                message += " | " + traceback.format_exc(limit=2).strip().splitlines()[-1]
            rows.append({**base, "status": "failed", "seconds": round(time.time() - start, 2), "error": message})
            if errors is not None:
                errors.append((item.name, message))
            emit("failed", error=message)
        else:
            seconds = round(time.time() - start, 2)
            rows.append({**base, **row, "status": "done", "seconds": seconds})
            written.extend(files)
            emit("done", n_nuclei=row["n_nuclei"], seconds=seconds)
        atomic_write_text(summary, _summary_text(rows, names))
    written.append(("summary", summary))
    return written

"""The job behind ``histostudio segment``: nuclei of tiles, folders, globs and whole slides.

Segmentation is a unit processor of the one slide-job runner (:func:`studio.jobs.run_job`),
like stain normalization and virtual IHC: every image and every slide is a unit with a
manifest entry, atomic outputs, ``--resume``, a per-input error that does not stop the
batch, and ``--executor dask``. :class:`SegmentTransform` holds a
:class:`~pipelines.segmenter.NucleiSegmenter` and writes, under ``out``:

=====================  =========================================================  ========
file                   content                                                    inputs
=====================  =========================================================  ========
``<name>_inst.npy``    int32 ``(H, W)`` instance ids ``1..n`` (0 = background)    images
``<name>_cls.npy``     uint8 ``(H, W)`` class code of each nucleus' pixels        images
``<name>.geojson``     QuPath detections, full-resolution pixel coordinates      all
``json/<name>.json``   HoVer-Net-style per-nucleus JSON                          images
``summary.csv``        one row per input: status, size, nuclei per class, error  all
``manifest.json``      the runner's record of every unit (resume, errors, tries)  all
=====================  =========================================================  ========

``summary.csv`` is aggregated from the manifest after every run (:meth:`SegmentTransform.finalize`),
so a resumed run's summary lists every input, whichever run segmented it.

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

Blank images -- glass, black, ink, or featureless (:func:`studio.slides.blank_tiles`, judged
per ``tile_size`` block) -- get empty maps without running the model, as a white tile
would come out; in a partly blank image, nuclei lying mostly on blank blocks are dropped
(a model invents nuclei on black). Both are recorded in the unit's manifest entry (``blank``,
``blank_blocks``), as is an input read as RGBA or 16-bit (``converted``), with a one-line
note printed and kept in ``summary.csv``.

:func:`run_segment` is what ``histostudio segment`` calls (a folder holding an earlier run
is refused unless ``--resume`` or ``--overwrite``); :func:`segment_inputs` is the library
call with a loaded segmenter. Dask workers receive :func:`segment_spec` (the checkpoint
folder and options, never the weights) and load the segmenter once per worker process
(:func:`studio.jobs.load_transform`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from studio.errors import InputError
from studio.inputs import expand_inputs as expand_paths

Progress = Callable[[dict[str, Any]], None]
SUMMARY = "summary.csv"


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


def output_files(name: str, kind: str, out: Path) -> list[Path]:
    """The files one input leaves in ``out`` (all must exist for its unit to count as done)."""
    if kind == "slide":
        return [out / f"{name}.geojson"]
    return [out / f"{name}_inst.npy", out / f"{name}_cls.npy", out / f"{name}.geojson", out / "json" / f"{name}.json"]


def segment_units(inputs: Sequence[str | Path], out: str | Path) -> list[Any]:
    """The runner's units (:class:`studio.jobs.Unit`): one per image or slide, named by its stem."""
    from studio.jobs import Unit

    out = Path(out)
    units = []
    for item in expand_segment_inputs(inputs):
        files = output_files(item.name, item.kind, out)
        units.append(Unit(id=item.name, kind=item.kind, inputs=(str(item.path),),
                          output=str(out / f"{item.name}.geojson"), files=tuple(str(f) for f in files)))
    return units


# --------------------------------------------------------------------------- summary
def _summary_text(rows: list[dict[str, Any]], class_names: dict[int, str]) -> str:
    columns = ["name", "input", "kind", "status", "width", "height", "mpp", "n_nuclei",
               *[class_names[c] for c in sorted(class_names)], "unknown", "seconds", "error", "note"]
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
def _blank_cells(image: np.ndarray, cell: int) -> np.ndarray:
    """Bool ``(rows, cols)``: which ``cell``-pixel blocks of ``image`` are blank (glass, black,
    ink, featureless; :func:`studio.slides.blank_tiles`)."""
    from studio.slides import blank_tiles

    h, w = image.shape[:2]
    rows, cols = -(-h // cell), -(-w // cell)
    out = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = blank_tiles(image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][None])[0]
    return out


def _drop_blank_nuclei(inst: np.ndarray, cls: np.ndarray, type_prob: dict[int, float], blank: np.ndarray,
                       cell: int) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Remove nuclei lying mostly on blank blocks (what a model invents on black or flat
    pixels), renumbering the rest ``1..n`` in their order."""
    h, w = inst.shape
    on_blank = np.repeat(np.repeat(blank, cell, axis=0), cell, axis=1)[:h, :w]
    n = int(inst.max(initial=0))
    if n == 0 or not on_blank.any():
        return inst, cls, type_prob
    area = np.bincount(inst.ravel(), minlength=n + 1)
    blank_area = np.bincount(inst[on_blank], minlength=n + 1)
    keep = blank_area * 2 < area
    keep[0] = False
    new_id = np.zeros(n + 1, dtype=np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    inst2 = new_id[inst]
    cls2 = np.where(inst2 > 0, cls, 0).astype(np.uint8)
    probs = {int(new_id[k]): v for k, v in type_prob.items() if 0 < k <= n and keep[k]}
    return inst2, cls2, probs


def _segment_image(item: SegmentInput, out: Path, segmenter: Any, opts: dict[str, Any],
                   emit: Callable[..., None]) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    from studio.export import nucleus_features, write_features, write_hovernet_json
    from studio.io import read_image, save_npy
    from studio.jobs import image_conversion

    image = read_image(item.path)
    h, w = image.shape[:2]
    cell = int(opts["tile_size"])
    blank = _blank_cells(image, cell)
    extra: dict[str, Any] = {}
    if blank.all():
        # Glass, black or featureless: no nuclei, as a white tile gives (the model would invent some).
        inst, cls, info = np.zeros((h, w), np.int32), np.zeros((h, w), np.uint8), {"type_prob": {}}
        emit("windows", done=1, total=1)
        extra["blank"] = True
    else:
        inst, cls, info = segmenter.segment(image, tile_size=opts["tile_size"], overlap=opts["overlap"],
                                            batch_size=opts["batch_size"], image_mpp=opts.get("image_mpp"),
                                            progress=lambda d, t: emit("windows", done=d, total=t))
        if blank.any():
            inst, cls, info["type_prob"] = _drop_blank_nuclei(inst, cls, info["type_prob"], blank, cell)
            extra["blank_blocks"] = int(blank.sum())
    converted = image_conversion(item.path)
    if converted:
        extra["converted"] = converted
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
    row = {"width": w, "height": h, "mpp": mpp, "n_nuclei": int(inst.max(initial=0)), **_counts_row(counts, names),
           **extra}
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


# --------------------------------------------------------------------------- the unit processor
def check_segment_options(tile_size: int = 256, overlap: int = 64, mpp: float | None = None,
                          image_mpp: float | None = None, simplify: float = 0.5, batch_size: int = 4) -> None:
    """Refuse bad options before any model is loaded or anything written."""
    if not isinstance(tile_size, int) or tile_size < 32:
        raise InputError("--tile-size", f"{tile_size!r}; use at least 32 pixels")
    if not isinstance(overlap, int) or not 0 <= overlap <= tile_size // 2:
        raise InputError("--overlap", f"{overlap!r}; use 0 to half the tile size ({tile_size // 2})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError("--batch-size", f"{batch_size!r}; must be a positive integer")
    if mpp is not None and not (isinstance(mpp, (int, float)) and 0 < mpp < 100):
        raise InputError("--mpp", f"{mpp!r}; expected microns per pixel, e.g. 0.5")
    if image_mpp is not None and not (isinstance(image_mpp, (int, float)) and 0 < image_mpp < 100):
        raise InputError("--image-mpp", f"{image_mpp!r}; expected microns per pixel, e.g. 1.0")
    if simplify < 0:
        raise InputError("--simplify", f"{simplify}; must be >= 0 pixels")


class SegmentTransform:
    """A nuclei segmenter as the slide job's unit processor (see the module docstring).

    Args:
        segmenter: a :class:`~pipelines.segmenter.NucleiSegmenter`.
        tile_size, overlap: sliding-window side and overlap in pixels.
        mpp: working resolution for slides (microns per pixel); None = the segmenter's.
            Images are always segmented at their own pixel size; for them ``mpp`` is only
            recorded (summary, and ``mag = 10 / mpp`` in the HoVer-Net JSON).
        image_mpp: microns per pixel of plain images when it differs from the model's; they are
            resampled to the model's resolution and the maps returned on the image's grid.
        simplify: GeoJSON outline simplification tolerance in pixels.
        checkpoint: the folder the segmenter came from (recorded in the manifest).
    """

    name = "nuclei-segmenter"
    command = "segment"

    def __init__(self, segmenter: Any, *, tile_size: int = 256, overlap: int = 64, mpp: float | None = None,
                 image_mpp: float | None = None, simplify: float = 0.5, checkpoint: str = ""):
        check_segment_options(tile_size, overlap, mpp, image_mpp, simplify)
        self.segmenter = segmenter
        self.tile_size, self.overlap, self.mpp, self.image_mpp, self.simplify = (tile_size, overlap, mpp, image_mpp,
                                                                                 simplify)
        self.checkpoint = checkpoint

    @property
    def class_names(self) -> dict[int, str]:
        return self.segmenter.class_names

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "checkpoint": self.checkpoint, "classes": self.class_names,
                "model_mpp": self.segmenter.mpp, "tta": bool(getattr(self.segmenter, "tta", False)),
                "tile_size": self.tile_size, "overlap": self.overlap, "mpp": self.mpp, "image_mpp": self.image_mpp,
                "simplify": self.simplify}

    def validate(self, opts: Any) -> None:
        opts.validate_execution()  # the tile options of JobOptions are not segmentation's

    def recorded_options(self, opts: Any) -> dict[str, Any]:
        return {}  # every option that changes the output is in describe()

    def process_unit(self, unit: Any, opts: Any, reporter: Any) -> dict[str, Any]:
        item = SegmentInput(unit.id, Path(unit.inputs[0]), unit.kind)
        out = Path(unit.output).parent
        options = {"tile_size": self.tile_size, "overlap": self.overlap, "batch_size": opts.batch_size,
                   "mpp": self.mpp, "simplify": self.simplify, "image_mpp": self.image_mpp}
        seen = {"started": False, "done": 0}

        def emit(event: str, done: int = 0, total: int = 0, **_: Any) -> None:
            if event != "windows":
                return
            if not seen["started"]:
                reporter.unit_started(unit, total)
                seen["started"] = True
            if done > seen["done"]:
                reporter.unit_advanced(unit, done - seen["done"])
                seen["done"] = done

        worker = _segment_slide if item.kind == "slide" else _segment_image
        row, _ = worker(item, out, self.segmenter, options, emit)
        names = set(self.class_names.values())
        entry = {"width": row["width"], "height": row["height"], "mpp": row["mpp"], "n_nuclei": row["n_nuclei"],
                 "classes": {k: v for k, v in row.items() if k in names}, "unknown": row["unknown"],
                 "megapixels": row["width"] * row["height"] / 1e6}
        notes = []
        if row.get("blank"):
            entry["blank"] = True
            notes.append("blank (glass, black or featureless): written as empty maps, no nuclei")
        if row.get("blank_blocks"):
            entry["blank_blocks"] = row["blank_blocks"]
        if row.get("converted"):
            entry["converted"] = row["converted"]
            notes.append(f"read as 8-bit RGB: {row['converted']}")
        if notes:
            entry["notes"] = ["; ".join(notes)]
        return entry

    def finalize(self, out: Path, entries: Mapping[str, Mapping[str, Any]], units: Sequence[Any]) -> list[Path]:
        """``summary.csv`` from every manifest entry: this run's units first, then earlier ones."""
        from studio.io import atomic_write_text

        order = [u.id for u in units if u.id in entries] + [k for k in entries if k not in {u.id for u in units}]
        rows = []
        for name in order:
            entry = entries[name]
            inputs = entry.get("inputs") or [""]
            rows.append({"name": name, "input": inputs[0], "kind": entry.get("kind"), "status": entry.get("status"),
                         "width": entry.get("width"), "height": entry.get("height"), "mpp": entry.get("mpp"),
                         "n_nuclei": entry.get("n_nuclei"), **(entry.get("classes") or {}),
                         "unknown": entry.get("unknown"), "seconds": entry.get("seconds"),
                         "error": entry.get("error"), "note": "; ".join(entry.get("notes") or ())})
        return [atomic_write_text(Path(out) / SUMMARY, _summary_text(rows, self.class_names))]


def resolve_device(device: str | None) -> str:
    """``auto`` -> CUDA when present, else CPU; a CUDA device that is not there is a one-line error.

    Kept as a name for the jobs that import it; the one resolver is :func:`studio.devices.resolve_device`.
    """
    from studio.devices import resolve_device as studio_resolve

    return studio_resolve(device)


def create_segment_transform(checkpoint: str, device: str | None = "auto", tta: bool = False, tile_size: int = 256,
                             overlap: int = 64, mpp: float | None = None, image_mpp: float | None = None,
                             simplify: float = 0.5) -> SegmentTransform:
    """The factory a :func:`segment_spec` names: options checked first, then the model loaded."""
    from pipelines.segmenter import NucleiSegmenter

    check_segment_options(tile_size, overlap, mpp, image_mpp, simplify)
    segmenter = NucleiSegmenter.from_pretrained(checkpoint, device=resolve_device(device), tta=tta)
    return SegmentTransform(segmenter, tile_size=tile_size, overlap=overlap, mpp=mpp, image_mpp=image_mpp,
                            simplify=simplify, checkpoint=str(checkpoint))


def segment_spec(checkpoint: str | Path, *, device: str | None = "auto", tta: bool = False, tile_size: int = 256,
                 overlap: int = 64, mpp: float | None = None, image_mpp: float | None = None,
                 simplify: float = 0.5, batch_size: int = 4) -> Any:
    """What a worker needs to build the segmenter (:class:`studio.jobs.TransformSpec`): the
    checkpoint folder (absolute) and the options, checked here, before anything loads."""
    from studio.jobs import TransformSpec

    check_segment_options(tile_size, overlap, mpp, image_mpp, simplify, batch_size)
    return TransformSpec("pipelines.segment_job:create_segment_transform",
                         {"checkpoint": str(Path(checkpoint).absolute()), "device": device, "tta": bool(tta),
                          "tile_size": tile_size, "overlap": overlap, "mpp": mpp, "image_mpp": image_mpp,
                          "simplify": simplify})


# --------------------------------------------------------------------------- the library call
class _EventReporter:
    """The runner's progress callbacks as :func:`segment_inputs`' event dicts."""

    def __init__(self, progress: Progress | None, units: Sequence[Any]):
        self.progress = progress
        self.index = {u.id: i for i, u in enumerate(units)}
        self.count = len(units)
        self.started: set[str] = set()
        self.windows: dict[str, list[int]] = {}

    def _emit(self, event: str, unit: Any, **values: Any) -> None:
        if self.progress is not None:
            self.progress({"event": event, "input": unit.id, **values})

    def _start(self, unit: Any) -> None:
        if unit.id not in self.started:
            self.started.add(unit.id)
            self._emit("start", unit, kind=unit.kind, index=self.index.get(unit.id, 0), count=self.count)

    def unit_started(self, unit: Any, total: int) -> None:
        self._start(unit)
        self.windows[unit.id] = [0, total]
        self._emit("windows", unit, done=0, total=total)

    def unit_advanced(self, unit: Any, n: int) -> None:
        state = self.windows.setdefault(unit.id, [0, 0])
        state[0] += n
        self._emit("windows", unit, done=state[0], total=state[1])

    def unit_finished(self, unit: Any, result: dict[str, Any]) -> None:
        self._start(unit)
        if result.get("status") == "done":
            self._emit("done", unit, n_nuclei=result.get("n_nuclei"), seconds=result.get("seconds"))
        else:
            self._emit("failed", unit, error=result.get("error"))


def run_segment(
    inputs: Sequence[str | Path],
    out: str | Path,
    transform: Any,
    *,
    batch_size: int = 4,
    resume: bool = False,
    overwrite: bool = False,
    executor: str = "local",
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[tuple[str, Path]], Any]:
    """Segment every input through the slide-job runner; what ``histostudio segment`` runs.

    Args:
        inputs: image files, folders, glob patterns and slides.
        out: output folder. One that holds an earlier run (``manifest.json``) is refused
            unless ``resume`` (skip what it finished) or ``overwrite`` (remove its outputs).
        transform: a :class:`SegmentTransform`, or :func:`segment_spec` (what Dask workers need).
        batch_size: windows per forward pass.
        executor, scheduler: ``"local"``, or ``"dask"`` with a scheduler address.
        progress: event callback, see :func:`segment_inputs`.

    Returns:
        ``(label, path)`` of every output of the units done now or earlier (``summary.csv``
        last), and the runner's :class:`~studio.jobs.JobReport`.
    """
    from studio.jobs import JobOptions, run_job

    units = segment_units(inputs, out)
    _check_unmanaged_run(Path(out), overwrite=overwrite and not resume)
    report = run_job(units, transform, out, JobOptions(batch_size=batch_size), command="segment", resume=resume,
                     overwrite=overwrite and not resume, executor=executor, scheduler=scheduler,
                     reporter=_EventReporter(progress, units))
    labels = ("inst", "cls", "geojson", "json")
    written: list[tuple[str, Path]] = []
    for unit in units:
        if unit.id in report.done or unit.id in report.skipped:
            kinds = labels if unit.kind != "slide" else ("geojson",)
            written.extend((f"{unit.id} {k}", f) for k, f in zip(kinds, unit.output_files(), strict=True))
    written.append(("summary", Path(out) / SUMMARY))
    return written, report


def _check_unmanaged_run(out: Path, *, overwrite: bool) -> None:
    """Refuse an output folder holding a segment run from before the job manifest.

    Such a folder has ``summary.csv`` (and maps per image) but no ``manifest.json``, so the
    runner would see an empty folder: it would replace ``summary.csv`` and leave the earlier
    images' files behind, unlisted. ``--resume`` cannot continue it (nothing records what
    finished); ``--overwrite`` removes the files its summary lists, then runs afresh.
    """
    from studio.jobs import MANIFEST

    summary = out / SUMMARY
    if not summary.is_file() or (out / MANIFEST).exists():
        return
    if not overwrite:
        raise InputError(out, f"already holds a segment run from before the job manifest ({SUMMARY}, no "
                              f"{MANIFEST}); --resume cannot continue it: pass --overwrite to redo it or use "
                              "another --out")
    try:
        with summary.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(summary, f"cannot be read to remove the earlier run's files ({exc}); remove the folder "
                                  "or use another --out") from exc
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name or Path(name).name != name or name in (".", ".."):  # never a path outside the folder
            continue
        for file in output_files(name, "slide" if row.get("kind") == "slide" else "image", out):
            file.unlink(missing_ok=True)
    summary.unlink(missing_ok=True)


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
    resume: bool = False,
    overwrite: bool = True,
) -> list[tuple[str, Path]]:
    """Segment every input with an already-loaded segmenter, through the slide-job runner.

    Args:
        inputs: image files, folders, glob patterns and slides.
        out: output folder (created).
        segmenter: a :class:`~pipelines.segmenter.NucleiSegmenter`.
        tile_size, overlap, mpp, image_mpp, simplify: see :class:`SegmentTransform`.
        batch_size: windows per forward pass.
        progress: called with event dicts: ``{"event": "start", "input", "kind", "index",
            "count"}``, ``{"event": "windows", "input", "done", "total"}``,
            ``{"event": "done", "input", "n_nuclei", "seconds"}``,
            ``{"event": "failed", "input", "error"}``.
        errors: when given, ``(input name, error message)`` of each failed input is appended.
        resume, overwrite: as for :func:`studio.jobs.run_job`. This library call replaces an
            earlier run in ``out`` by default (``overwrite=True``); the ``segment`` command
            refuses to unless told.

    Returns:
        ``(label, path)`` of every file written, ``summary.csv`` last (labelled "summary").
        Failed inputs are rows of ``summary.csv`` with ``status=failed`` and the error.

    Raises:
        InputError: bad options or inputs (before anything is written).
    """
    check_segment_options(tile_size, overlap, mpp, image_mpp, simplify, batch_size)
    transform = SegmentTransform(segmenter, tile_size=tile_size, overlap=overlap, mpp=mpp, image_mpp=image_mpp,
                                 simplify=simplify)
    written, report = run_segment(inputs, out, transform, batch_size=batch_size, resume=resume, overwrite=overwrite,
                                  progress=progress)
    if errors is not None:
        errors.extend(report.failed.items())
    return written

"""The ``histostudio`` command line.

Commands stay thin: they parse arguments, call one library function, and print what
was written and where. Heavy imports (torch, diffusers, the pipelines) happen inside the
commands so that ``histostudio --help`` is instant. Errors the studio raises on purpose
(:class:`~studio.errors.HistostudioError`) are printed as one line and exit with status
2; there is no traceback wall for users (``HISTOSTUDIO_DEBUG=1`` shows it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from studio.errors import HistostudioError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="histostudio",
    help="Generative synthesis and stain translation for computational pathology.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Make, convert and inspect datasets (real samples, tissue phantom, stain pairs).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
experiment_app = typer.Typer(help="Measure what synthetic data buys a nuclei segmenter.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
generate_app = typer.Typer(help="Generate synthetic H&E with the diffusion pipelines.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")


# Options several commands share, spelled once (name, type and help stay identical everywhere).
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps.")]
SchedulerOption = Annotated[str | None, typer.Option(help="dask scheduler address for --executor dask.")]
DatasetFormatOption = Annotated[str, typer.Option("--format", help="pannuke, conic or folder.")]
RedoOption = Annotated[bool, typer.Option("--overwrite", help="Redo everything in an existing output folder.")]
ReplaceOutOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
ReplaceFolderOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")]


# --------------------------------------------------------------------------- info
@app.command()
def info(
    models_dir: Annotated[Path | None, typer.Option(help="Folder of downloaded published models (PixCell, "
                                                         "UNI-2h, SD3.5 VAE); default $HISTOSTUDIO_MODELS.")
                          ] = None,
) -> None:
    """Print versions, compute device (CPU/CUDA, xformers), checkpoints, published models and sample data."""
    from studio import __version__
    from studio.data.samples import SAMPLES
    from studio.info import (
        PACKAGES,
        checkpoints_dir,
        device_report,
        list_checkpoints,
        package_version,
        platform_summary,
        published_models,
    )

    plat = platform_summary()
    console.print(f"[bold]histostudio {__version__}[/]  python {plat['python']}  ({plat['platform']})")

    versions = Table(title="packages", show_header=True, header_style="bold")
    versions.add_column("package")
    versions.add_column("version")
    for name in PACKAGES:
        version = package_version(name)
        versions.add_row(name, version or "[dim]not installed[/]")
    console.print(versions)

    dev = device_report()
    if dev.cuda:
        device = f"CUDA: {', '.join(dev.devices)}"
    elif dev.mps:
        device = "Apple MPS"
    else:
        device = f"CPU only ({dev.threads} torch threads)"
    console.print(f"[bold]device[/]: {device}; xformers: {'yes' if dev.xformers else 'no'}")

    ckpts = list_checkpoints()
    table = Table(title=f"checkpoints in {checkpoints_dir()}", header_style="bold")
    for col in ("name", "kind", "size (MB)"):
        table.add_column(col)
    for ck in ckpts:
        table.add_row(ck.name, ck.kind, f"{ck.size_mb:.1f}")
    if not ckpts:
        table.add_row("[dim]none yet[/]", "", "")
    console.print(table)

    root, published = published_models(models_dir)
    if root is None:
        console.print("[bold]published models[/]: [dim]no models folder (set HISTOSTUDIO_MODELS or pass "
                      "--models-dir)[/]")
    else:
        pub = Table(title=f"published models in {root}", header_style="bold")
        for col in ("name", "kind", "detail", "status", "size (MB)", "source"):
            pub.add_column(col)
        for m in published:
            status = m.status if m.ready else f"[yellow]{m.status}[/]"
            pub.add_row(m.name, m.kind, m.detail, status, f"{m.size_mb:.1f}", m.source)
        if not published:
            pub.add_row("[dim]none found[/]", "", "", "", "", "")
        console.print(pub)

    samples = Table(title="real sample data", header_style="bold")
    for col in ("name", "kind", "available", "source", "licence"):
        samples.add_column(col)
    for s in SAMPLES.values():
        samples.add_row(s.name, s.kind, "yes" if s.available else "[red]missing[/]", s.source, s.license)
    console.print(samples)


# --------------------------------------------------------------------------- data
def _parse_mix(mix: str | None) -> dict[str, float] | None:
    if not mix:
        return None
    out: dict[str, float] = {}
    for part in mix.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise HistostudioError(f"--mix: {part!r} is not name=fraction (e.g. neoplastic=0.5)") from None
    return out


def _summarise(path: Path) -> None:
    import numpy as np

    from studio.data.registry import detect_layout, open_dataset

    layout = detect_layout(path)
    dataset = open_dataset(path, layout)
    counts: dict[int, int] = {}
    sources: dict[str, int] = {}
    shapes = set()
    for i in range(len(dataset)):
        sample = dataset.read(i)
        shapes.add(sample.image.shape)
        sources[str(sample.meta.get("source", "?"))] = sources.get(str(sample.meta.get("source", "?")), 0) + 1
        ids, first = np.unique(sample.inst, return_index=True)
        for cls in sample.cls.ravel()[first[ids > 0]]:
            counts[int(cls)] = counts.get(int(cls), 0) + 1
    names = getattr(dataset, "classes", {}) or {}
    sizes = ", ".join(f"{h}x{w}" for h, w, _ in sorted(shapes))
    console.print(f"[bold]{path}[/] ({layout}): {len(dataset)} tiles of {sizes}")
    table = Table(header_style="bold")
    table.add_column("class")
    table.add_column("nuclei", justify="right")
    for cls in sorted(counts):
        table.add_row(f"{cls} {names.get(cls, '')}", str(counts[cls]))
    console.print(table)
    console.print("sources: " + ", ".join(f"{k} ({v})" for k, v in sorted(sources.items())))


@data_app.command("samples")
def data_samples(
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    format: DatasetFormatOption = "pannuke",
    size: Annotated[int, typer.Option(help="Crop size in pixels.")] = 256,
    stride: Annotated[int | None, typer.Option(help="Crop stride (default: size, no overlap).")] = None,
    overwrite: ReplaceFolderOption = False,
) -> None:
    """Write the shipped real labelled tile (hgsc_nest) as a nuclei dataset."""
    from studio.data.crops import hgsc_nest_crops
    from studio.data.registry import write_dataset

    crops = hgsc_nest_crops(size, stride)
    write_dataset(out, crops, format, overwrite=overwrite)
    console.print(f"wrote {len(crops)} real crops ({format}) to {out}/")
    _summarise(out)


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    n: Annotated[int, typer.Option("--n", help="Number of tiles.")] = 16,
    format: DatasetFormatOption = "folder",
    size: Annotated[int, typer.Option(help="Tile size in pixels.")] = 256,
    tissue: Annotated[str | None, typer.Option(help="Preset (mixed, tumor, glandular, stroma, inflamed, "
                                                    "necrotic); default cycles through all.")] = None,
    mix: Annotated[str | None, typer.Option(help="Class mix, e.g. neoplastic=0.5,inflammatory=0.5.")] = None,
    stain_variation: Annotated[float, typer.Option(help="Random per-tile stain strength (0 = reference H&E).")
                               ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the first tile (tile i uses seed+i).")] = 0,
    overwrite: ReplaceFolderOption = False,
) -> None:
    """Write procedural tissue-phantom tiles with exact labels as a nuclei dataset."""
    from studio.data.phantom_dataset import phantom_samples
    from studio.data.registry import write_dataset

    samples = phantom_samples(n, seed=seed, size=size, tissue=tissue, class_mix=_parse_mix(mix),
                              stain_variation=stain_variation)
    write_dataset(out, samples, format, overwrite=overwrite)
    console.print(f"wrote {n} phantom tiles ({format}) to {out}/")
    _summarise(out)


@data_app.command("inspect")
def data_inspect(path: Annotated[Path, typer.Argument(help="A PanNuke, CoNIC or folder-layout dataset.")]) -> None:
    """Check a dataset (layout, shapes, labels) and count its nuclei per class."""
    _summarise(path)


@data_app.command("stain-pairs")
def data_stain_pairs(
    out: Annotated[Path, typer.Option(help="Output folder: source/, target/, reference/ PNGs + manifest.csv.")],
    n: Annotated[int, typer.Option("--n", help="Number of pairs.")] = 256,
    size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 256,
    split: Annotated[str, typer.Option(help="Which band of the real samples to crop: train or heldout.")] = "train",
    real_target: Annotated[float, typer.Option(help="Share of pairs whose target is the untouched real crop.")
                           ] = 0.3,
    tone_prob: Annotated[float, typer.Option(help="Share of sources that also get a scanner-like tone change.")
                         ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed (crops and stains).")] = 0,
    overwrite: ReplaceOutOption = False,
) -> None:
    """Many-to-one stain-translation pairs from real tiles (re-rendered stains and tones) with provenance."""
    from studio.data.splits import regions
    from studio.data.stain_pairs import make_pairs, write_pairs

    if split not in ("train", "heldout"):
        raise HistostudioError(f"--split {split!r}: use train or heldout")
    r = regions(split)
    pairs = make_pairs(list(r.values()), n, size, seed=seed, real_target=real_target, tone_prob=tone_prob,
                       names=list(r))
    write_pairs(out, pairs, overwrite=overwrite)
    real = sum(p.meta["target"] == "real" for p in pairs)
    console.print(f"wrote {len(pairs)} stain pairs ({real} with real-pixel targets) from {', '.join(r)} "
                  f"[{split}]: {out}/ (source/, target/, reference/, manifest.csv)")


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every demo output and the contact sheet.")] = Path(
        "demo_output"),
    seed: Annotated[int, typer.Option(help="Random seed for everything stochastic.")] = 0,
) -> None:
    """Run the studio's main jobs end to end on shipped data and write a visual summary."""
    from studio.demo import run_demo

    written = run_demo(out, seed=seed, console=console)
    console.print(f"[bold green]demo finished[/]: {len(written)} outputs under {out}/")
    for label, path in written:
        console.print(f"  wrote {label}: {path}")


# --------------------------------------------------------------------------- normalize
def _check_device(device: str) -> str:
    """The ``--device`` value resolved (auto -> cuda or cpu); a device this machine lacks is a one-line error."""
    from studio.devices import resolve_device

    return resolve_device(device)


def _normalize_device(method: str, device: str) -> str | None:
    """normalize's device: classical normalizers are not models, so ``auto`` keeps them on the CPU
    (None: their exact LUT path). A named device is checked and resolved here. A model method
    (stainfuser) keeps ``auto`` unresolved: the transform's spec then carries ``auto`` and each
    Dask worker picks its own GPU, instead of inheriting this client's CPU."""
    from studio.stain import NORMALIZERS

    if device.strip().lower() == "auto":
        return None if method.lower() in NORMALIZERS else "auto"
    return _check_device(device)


def _finish_job(report) -> None:
    """The end of every slide job: skipped units, notes, manifest, one summary line; exit 1 on failures."""
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} finished unit(s) (--resume): {', '.join(report.skipped)}")
    for note in report.notes:
        console.print(f"[yellow]note[/] {note}", soft_wrap=True)
    console.print(f"wrote manifest: {report.manifest}")
    console.print(f"[bold]{report.summary()}[/]")
    if not report.ok:
        for line in report.failure_lines():
            err_console.print(f"[red]failed[/] {line}", soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def normalize(
    inputs: Annotated[list[str], typer.Argument(help="Slides, images, folders of tiles, globs or a CSV manifest "
                                                     "(column 'path').", show_default=False)],
    method: Annotated[str, typer.Option(help="Tile transform: macenko, reinhard, vahadane (or a plugin).")
                      ] = "macenko",
    reference: Annotated[str | None, typer.Option(
        help="Target stain: an image, folder, slide, saved profile .json, or a sample name "
             "(e.g. tiatoolbox_target). Default: the method's published reference.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (slides -> <name>.tif pyramids; tiles keep their names).")
                   ] = Path("normalized"),
    fit: Annotated[str, typer.Option(help="'slide': one source profile per slide or tile folder (consistent "
                                          "tiles); 'tile': every tile fitted on its own.")] = "slide",
    mpp: Annotated[float | None, typer.Option(help="Working resolution for slides in microns/pixel "
                                                   "(default: the slide's full resolution).")] = None,
    tile_size: Annotated[int, typer.Option(help="Processing tile size in pixels.")] = 512,
    compression: Annotated[str, typer.Option(help="Output slide tiles: jpeg, deflate or none.")] = "jpeg",
    quality: Annotated[int, typer.Option(help="JPEG quality for output slides.")] = 90,
    batch_size: Annotated[int, typer.Option(help="Tiles per transform call.")] = 16,
    workers: Annotated[int, typer.Option(help="Threads for decoding/encoding images.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps. auto: CUDA when present for model "
                                             "methods (stainfuser); classical ones stay on the CPU unless named.")
                      ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for sampling the tiles a profile is fitted on.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Skip units (and files) a previous run finished.")
                      ] = False,
    overwrite: RedoOption = False,
    executor: Annotated[str, typer.Option(help="local, or dask (one task per slide).")] = "local",
    scheduler: SchedulerOption = None,
    save_profile: Annotated[Path | None, typer.Option(help="Also write the target stain profile JSON here.")
                            ] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="stainfuser weights: a StainFuserPipeline folder (default: the shipped one), or the published "
             "StainFuser state dict (.safetensors/.pth file, or its folder with the sd21b_*_config.json files).")
                          ] = None,
) -> None:
    """Normalize the stain of a batch of slides and tiles to one target."""
    from studio.jobs import JobOptions, expand_inputs, run_job
    from studio.progress import RichReporter
    from studio.transforms import create_tile_transform

    opts = JobOptions(fit=fit, tile_size=tile_size, mpp=mpp, compression=compression, quality=quality,
                      seed=seed, batch_size=batch_size, workers=workers)
    opts.validate()
    units = expand_inputs(inputs, out)
    if checkpoint is not None and method.lower() != "stainfuser":
        raise HistostudioError(f"--checkpoint: only the stainfuser method loads weights, not {method}")
    model_options = {"checkpoint": checkpoint} if checkpoint is not None else {}
    transform = create_tile_transform(method, reference=reference, device=_normalize_device(method, device),
                                      seed=seed, workers=workers, **model_options)
    if save_profile is not None:
        target = getattr(getattr(transform, "normalizer", None), "target", None)
        if target is None:
            raise HistostudioError(f"--save-profile: the {method} method has no stain profile to save")
        target.save(save_profile)
        console.print(f"wrote target stain profile: {save_profile}")
    console.print(f"normalizing {len(units)} unit(s) with [bold]{transform.name}[/] -> {out}/")
    with RichReporter(console, len(units)) as reporter:
        report = run_job(units, transform, out, opts, resume=resume, overwrite=overwrite, executor=executor,
                         scheduler=scheduler, reporter=reporter)
    _finish_job(report)


# --------------------------------------------------------------------------- segment
@app.command()
def translate(
    inputs: Annotated[list[str], typer.Argument(help="H&E slides, images, folders, globs or a CSV manifest.",
                                                show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (slides -> <name>.tif pyramids; tiles keep their names), "
                                           "plus dab_readout.json.")],
    stain: Annotated[str, typer.Option(help="her2, ki67, er or pr.")] = "her2",
    model: Annotated[str, typer.Option(help="fast (feed-forward), diffusion (few-step, seeded) or pixcell "
                                            "(published PixCell-1024 + staining LoRA and flow MLP).")] = "fast",
    checkpoint: Annotated[str | None, typer.Option(help="VirtualIHCPipeline folder, or for --model pixcell the "
                                                        "pixcell-virtual-staining folder (default: the shipped "
                                                        "checkpoints/virtual-ihc-<stain>).")] = None,
    steps: Annotated[int | None, typer.Option(help="Diffusion steps (default: 6; 20 for --model pixcell, "
                                                   "as the release samples).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the diffusion noise.")] = 0,
    tile_size: Annotated[int, typer.Option(help="Processing tile size for slides.")] = 512,
    halo: Annotated[int, typer.Option(help="Context pixels around each slide tile; overlaps are cross-faded.")] = 32,
    mpp: Annotated[float | None, typer.Option(help="Working resolution for slides in microns/pixel "
                                                   "(default: native).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 4,
    device: DeviceOption = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Skip units a previous run finished.")] = False,
    overwrite: RedoOption = False,
    executor: Annotated[str, typer.Option(help="local, or dask (one task per slide or tile folder).")] = "local",
    scheduler: SchedulerOption = None,
) -> None:
    """Virtual IHC: translate H&E tiles, folders and whole slides into an IHC stain, with a DAB read-out."""
    from pipelines.translate_job import translate_spec
    from studio.jobs import JobOptions, expand_inputs, run_job
    from studio.progress import RichReporter

    _check_device(device)  # workers resolve it where they run; a missing GPU is refused here, before any work
    spec = translate_spec(stain, checkpoint, model=model, steps=steps, seed=seed, halo=halo, device=device)
    units = expand_inputs(inputs, out)
    opts = JobOptions(fit="slide", tile_size=tile_size, mpp=mpp, compression="jpeg", quality=90, seed=seed,
                      batch_size=batch_size)
    opts.validate()
    console.print(f"translating {len(units)} unit(s) to virtual [bold]{spec.kwargs['stain']}[/] ({model}) -> {out}/")
    with RichReporter(console, len(units)) as reporter:
        report = run_job(units, spec, out, opts, command="translate", resume=resume, overwrite=overwrite,
                         executor=executor, scheduler=scheduler, reporter=reporter)
    readout = _write_dab_readout(units, report, out)
    console.print(f"wrote DAB read-out: {readout}")
    _finish_job(report)


def _write_dab_readout(units, report, out: Path) -> Path:
    """DAB-positive %, pixel H-score per output image (slides: on a 2048 px thumbnail)."""
    import json

    from studio.dab import dab_heatmap, dab_readout
    from studio.io import atomic_write_text, read_image, write_image
    from studio.slides import open_slide

    rows = {}
    for unit in units:
        if unit.id not in report.done and unit.id not in report.skipped:
            continue
        for f in unit.output_files():
            if not f.exists():
                continue
            if unit.kind == "slide":
                with open_slide(f) as slide:
                    image = slide.thumbnail(2048)
                write_image(f.with_name(f"{f.stem}_dab_heatmap.png"), dab_heatmap(image))
            else:
                image = read_image(f)
            rows[str(f.relative_to(out))] = {k: round(v, 4) for k, v in dab_readout(image).items()}
    return atomic_write_text(out / "dab_readout.json", json.dumps(rows, indent=2) + "\n")


@app.command()
def segment(
    inputs: Annotated[list[str], typer.Argument(help="Tiles, folders, globs or whole slides.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder: instance/class maps, GeoJSON, HoVer-Net JSON, summary.")
                   ] = Path("nuclei"),
    checkpoint: Annotated[str | None, typer.Option(help="Segmenter folder (default: the shipped one).")] = None,
    tile_size: Annotated[int, typer.Option(help="Sliding-window size in pixels.")] = 256,
    overlap: Annotated[int, typer.Option(help="Window overlap in pixels (nuclei on borders come out whole).")
                       ] = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    image_mpp: Annotated[float | None, typer.Option(help="Microns/pixel of plain images when not the model's "
                                                         "(e.g. 1.0 for 10x): resampled for the model, maps "
                                                         "returned on the image's grid.")] = None,
    mpp: Annotated[float | None, typer.Option(help="Working resolution for slides, microns/pixel "
                                                   "(default: the segmenter's).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average predictions over the 8 rotations x flips "
                                                    "(8x slower, steadier).")] = False,
    device: DeviceOption = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs a previous run finished.")] = False,
    overwrite: RedoOption = False,
    executor: Annotated[str, typer.Option(help="local, or dask (one task per image or slide).")] = "local",
    scheduler: SchedulerOption = None,
) -> None:
    """Segment and classify nuclei (HoVer-Net-style) in tiles, folders and whole slides."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from pipelines.segment_job import run_segment, segment_spec

    _check_device(device)  # workers resolve it where they run; a missing GPU is refused here, before any work
    spec = segment_spec(checkpoint or _default_checkpoint("nuclei-segmenter"), device=device, tta=tta,
                        tile_size=tile_size, overlap=overlap, mpp=mpp, image_mpp=image_mpp, batch_size=batch_size)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console) as progress:
        task = progress.add_task("segmenting", total=None)

        def on_event(event: dict) -> None:
            if event["event"] == "start":
                progress.update(task, description=f"{event['input']} ({event['index'] + 1}/{event['count']})",
                                completed=0, total=None)
            elif event["event"] == "windows":
                progress.update(task, completed=event["done"], total=event["total"])
            elif event["event"] == "done":
                console.print(f"[green]done[/] {event['input']}: {event['n_nuclei']} nuclei "
                              f"({event['seconds']:.1f} s)")

        written, report = run_segment(inputs, out, spec, batch_size=batch_size, resume=resume, overwrite=overwrite,
                                      executor=executor, scheduler=scheduler, progress=on_event)
    for label, path in written:
        console.print(f"wrote {label}: {path}")
    _finish_job(report)


@experiment_app.command("augment")
def experiment_augment(
    real: Annotated[str, typer.Option(help="Real dataset folder, or hgsc_nest (the shipped labelled tile).")],
    synthetic: Annotated[str, typer.Option(help="Synthetic dataset folder, or phantom.")],
    out: Annotated[Path, typer.Option(help="Output folder: results.json, results.md, results.png.")],
    seeds: Annotated[int, typer.Option(help="Training seeds per variant (K).")] = 3,
    stain_augment: Annotated[bool, typer.Option("--stain-augment", help="Add a real + stain-augmentation variant.")
                             ] = False,
    tta_normalize: Annotated[str | None, typer.Option(help="Add a variant normalizing held-out tiles with METHOD.")
                             ] = None,
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 100,
    synthetic_ratio: Annotated[float, typer.Option(help="Share of synthetic samples in a batch.")] = 0.3,
    scarce_class: Annotated[str | None, typer.Option(help="Make this class scarce in the real training set.")
                            ] = None,
    scarce_keep: Annotated[float, typer.Option(help="Fraction of the scarce class's nuclei kept.")] = 0.2,
    heldout: Annotated[str | None, typer.Option(help="Held-out fraction or dataset folder (default: the "
                                                     "dataset's own split).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing experiment in --out.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Train the segmenter with and without synthetic data (K seeds, identical splits); report PQ/mPQ+."""
    from training.experiment import experiment_device, run_augment_experiment

    device = experiment_device(device)  # a missing GPU is refused here, before any data is read or written
    def on_event(event: dict) -> None:
        if event.get("event") == "run_done":
            console.print(f"trained {event.get('variant')} seed {event.get('seed')}")

    result = run_augment_experiment(real, synthetic, out, seeds=seeds, stain_augment=stain_augment,
                                    tta_normalize=tta_normalize, steps=steps, synthetic_ratio=synthetic_ratio,
                                    scarce_class=scarce_class, scarce_keep=scarce_keep, heldout=heldout,
                                    overwrite=overwrite, progress=on_event, device=device)
    for name in ("results.json", "results.md", "results.png"):
        console.print(f"wrote {name}: {out / name}")
    console.print((out / "results.md").read_text() if (out / "results.md").is_file() else result)


# --------------------------------------------------------------------------- app
@app.command("app")
def app_command(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 to share on your network).")
                    ] = "127.0.0.1",
    checkpoints: Annotated[Path | None, typer.Option(help="Checkpoint folder (sets HISTOSTUDIO_CHECKPOINTS).")
                           ] = None,
    headless: Annotated[bool, typer.Option("--headless", help="Do not open a browser.")] = False,
) -> None:
    """Open the studio in the browser (Streamlit): normalize, generate, virtual IHC."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("streamlit") is None:
        raise HistostudioError("the app needs Streamlit: pip install 'histostudio[app]'")
    from studio.app import APP_SCRIPT  # inside the package, so it works when installed

    env = dict(os.environ)
    if checkpoints is not None:
        env["HISTOSTUDIO_CHECKPOINTS"] = str(checkpoints.resolve())
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.port", str(port),
           "--server.address", host, "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    if headless:
        cmd += ["--server.headless", "true"]
    console.print(f"serving the studio at http://{host}:{port} (Ctrl+C stops it)")
    raise typer.Exit(subprocess.call(cmd, env=env))


# --------------------------------------------------------------------------- embed / generate
def _default_checkpoint(name: str) -> str:
    from studio.info import checkpoints_dir

    return str(checkpoints_dir() / name)


@app.command()
def embed(
    inputs: Annotated[list[str], typer.Argument(help="Images or sample names to embed.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output .safetensors file (embeddings (B, N, D) + metadata).")],
    encoder: Annotated[str, typer.Option(help="builtin, a local model folder, or timm:ARCH:WEIGHTS.")] = "builtin",
    grid: Annotated[str | None, typer.Option(help="Token grid ROWSxCOLS (default: one global token).")] = None,
    size: Annotated[int, typer.Option(help="Images are centre-cropped and resized to SIZE x SIZE first.")] = 256,
    device: DeviceOption = "auto",
) -> None:
    """Embed tiles with an SSL encoder into an embeddings file for `generate embedding`."""
    from pipelines.generation import embed_to_file, parse_grid

    path, count = embed_to_file(inputs, out, encoder, parse_grid(grid), size, _check_device(device))
    console.print(f"wrote {count} embeddings ({grid or 'global'}) to {path}")


@generate_app.command("embedding")
def generate_embedding(
    out: Annotated[Path, typer.Option(help="Output folder (PNGs, contact sheet, manifest).")],
    from_: Annotated[str | None, typer.Option("--from", help="Source tile or region: an image path or a sample "
                                                             "name.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="A .safetensors embeddings file instead of --from.")
                          ] = None,
    label: Annotated[str | None, typer.Option(help="No source: sample embeddings of this label (e.g. skin, "
                                                   "inflammatory-rich) from the checkpoint's embedding sampler.")
                     ] = None,
    n: Annotated[int, typer.Option("--n", help="Images per source / per embedding.")] = 4,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 2.0,
    large: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT: one large image from the source region's "
                                                   "embedding grid (seamless, shared latent canvas).")] = None,
    grid: Annotated[str | None, typer.Option(help="Embedding grid for --large (default 4x4).")] = None,
    size: Annotated[int, typer.Option(help="Tile size for variations.")] = 256,
    checkpoint: Annotated[str | None, typer.Option(help="Pipeline folder (default: the shipped demo).")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder (auto: the one the checkpoint was trained with).")
                       ] = "auto",
    scheduler: Annotated[str, typer.Option(help="ddim (default: clipped x0, reliable for the shipped model), dpm or "
                                                "euler (for v-prediction models).")] = "ddim",
    seed: Annotated[int, typer.Option(help="Seed of the first image (image i uses seed+i).")] = 0,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bf16 or fp16 (GPU).")] = "float32",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (worth it for many images).")
                       ] = False,
) -> None:
    """Generate H&E conditioned on SSL embeddings: variations of a tile, or large images."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.generation import (
        GenerationSettings,
        parse_grid,
        parse_size,
        run_from_embeddings,
        run_large,
        run_sampled,
        run_variations,
    )

    if sum(x is not None for x in (from_, embeddings, label)) != 1:
        raise HistostudioError("give exactly one of --from TILE, --embeddings FILE and --label LABEL")
    if n < 1 or steps < 1:
        raise HistostudioError("--n and --steps must be at least 1")
    settings = GenerationSettings(checkpoint=checkpoint or _default_checkpoint("embedding-ldm"), encoder=encoder,
                                  steps=steps, guidance=guidance, seed=seed, scheduler=scheduler,
                                  device=_check_device(device),
                                  dtype=dtype, compile=compile)
    with Progress(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("sampling", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if embeddings is not None:
            written = run_from_embeddings(embeddings, n, out, settings, size=size, step=step)
        elif label is not None:
            written = run_sampled(label, n, out, settings, size=size, step=step)
        elif large:
            written = run_large(from_, parse_size(large), parse_grid(grid) or (4, 4), out, settings, n=n,
                                step=step)
        else:
            written = run_variations(from_, n, out, settings, size=size, step=step)
    for label, path in written:
        console.print(f"wrote {label}: {path}")


@generate_app.command("rare")
def generate_rare(
    labels: Annotated[str, typer.Option(help="Base label maps: a PanNuke/CoNIC/folder dataset, 'hgsc_nest' (the "
                                             "shipped labelled tile) or 'phantom' (parametric layouts).")],
    classes: Annotated[str, typer.Option(help="Rare classes to add, comma-separated (e.g. dead,inflammatory).")],
    count: Annotated[int, typer.Option(help="Patches to write.")],
    out: Annotated[Path, typer.Option(help="Output dataset folder (written all-or-nothing).")],
    format: DatasetFormatOption = "pannuke",
    per_patch: Annotated[int, typer.Option(help="Nuclei of each requested class in every patch (exact).")] = 4,
    size: Annotated[int, typer.Option(help="Patch side in pixels.")] = 256,
    checkpoint: Annotated[str | None, typer.Option(help="MaskToImagePipeline folder (default: the shipped "
                                                        "demo).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance on the mask.")] = 2.0,
    min_agreement: Annotated[float, typer.Option(help="Quality filter: share of nuclei whose hematoxylin must "
                                                      "stand out from their surroundings.")] = 0.6,
    max_attempts: Annotated[float, typer.Option(help="At most this many generated samples per requested one.")
                            ] = 3.0,
    tissue: Annotated[str, typer.Option(help="Phantom tissue preset (with --labels phantom), or 'home': the tissue "
                                             "the classes live in (connective -> stroma, inflammatory -> inflamed, "
                                             "...), where the generator draws them best.")] = "tumor",
    seed: Annotated[int, typer.Option(help="Seed (layouts and noise).")] = 0,
    overwrite: ReplaceOutOption = False,
    device: DeviceOption = "auto",
    reference: Annotated[Path | None, typer.Option(help="PixCell ControlNet only: an H&E tile whose UNI-2h token "
                                                        "sets the tiles' style (default: the learned null "
                                                        "embedding).")] = None,
    uni2h: Annotated[Path | None, typer.Option(help="UNI-2h folder for --reference (default: found in "
                                                    "$HISTOSTUDIO_MODELS or beside --checkpoint).")] = None,
) -> None:
    """Generate rare-class nuclei patches as a ready-to-train dataset (labels = conditioning maps)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipelines.rare_generation import RareRequest
    from pipelines.rare_generation import generate_rare as run

    req = RareRequest(labels=labels, classes=classes, count=count, out=str(out), format=format,
                      per_patch=per_patch, size=size, checkpoint=checkpoint or _default_checkpoint("mask-ldm"),
                      seed=seed, steps=steps, guidance_scale=guidance, min_agreement=min_agreement,
                      max_attempts=max_attempts, tissue=tissue, overwrite=overwrite, device=_check_device(device),
                      reference=str(reference) if reference else None, uni2h=str(uni2h) if uni2h else None)
    with Progress(TextColumn("[bold]accepted"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("generate", total=count)
        info = run(req, on_step=lambda done, total: progress.update(task, completed=done, total=total),
                   log=console.print)
    console.print(f"wrote {format} dataset: {out} ({info['accepted']} patches; "
                  f"{', '.join(f'{k}: {v}' for k, v in info['written_counts'].items())} nuclei)")
    console.print(f"wrote provenance: {out / 'provenance.json'}")
    console.print(f"wrote preview: {out / 'preview.png'}")


# --------------------------------------------------------------------------- convert
@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="A torch .pth / .bin / .pt file holding a dict of tensors.",
                                               show_default=False)],
    out: Annotated[Path, typer.Option(help="Output .safetensors file (written atomically).")],
    overwrite: ReplaceOutOption = False,
) -> None:
    """Convert a published .pth/.bin checkpoint to .safetensors, unpickling tensors only (never objects)."""
    from studio.convert import convert_checkpoint

    done = convert_checkpoint(checkpoint, out, overwrite=overwrite)
    nested = f" (from '{done.nested_under}')" if done.nested_under else ""
    console.print(f"wrote {done.tensors} tensors{nested} to {done.path} ({done.bytes / 2**20:.1f} MB)")
    if done.ignored:
        console.print(f"skipped non-weight entries: {', '.join(done.ignored)}")


def main() -> None:
    """Console-script entry point: run the app, turn studio errors into one clean line."""
    try:
        app()
    except HistostudioError as exc:
        if os.environ.get("HISTOSTUDIO_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()

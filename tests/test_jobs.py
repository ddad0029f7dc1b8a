"""The slide-batch runner: inputs, outputs, manifest, resume, bad slides, seams, the bad-input battery
(Dask: tests/test_dask_jobs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.data.samples import load_sample
from studio.errors import InputError, OutputError
from studio.io import read_image, to_tensor, to_uint8, write_image
from studio.jobs import JobOptions, Manifest, expand_inputs, run_job
from studio.stain.augment import known_shift, restain
from studio.transforms import create_tile_transform

torch.set_num_threads(1)


def restained(image: np.ndarray, shift: str) -> np.ndarray:
    matrix, scale, offset = known_shift(shift, 1)
    return to_uint8(restain(to_tensor(image), matrix, scale, offset))[0]


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lab_a") / "lab_a"
    folder.mkdir()
    image = restained(np.ascontiguousarray(load_sample("hgsc_nest")[:768, :768]), "lab-a")
    for i, (y, x) in enumerate([(y, x) for y in range(0, 768, 256) for x in range(0, 768, 256)]):
        write_image(folder / f"tile_{i:02d}.png", image[y:y + 256, x:x + 256])
    write_image(folder / "tile_jpeg.jpg", image[100:356, 100:356])
    return folder


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    from studio.slides import write_pyramid

    image = restained(np.ascontiguousarray(load_sample("tiatoolbox_target")), "lab-b")
    path = tmp_path_factory.mktemp("slides") / "lab_b_slide.tif"

    def tiles():
        for y in range(0, 1000, 256):
            for x in range(0, 1000, 256):
                yield image[y:y + 256, x:x + 256]

    write_pyramid(path, tiles(), 1000, 1000, tile_size=256, mpp=0.5, compression="deflate", min_level_size=256)
    return path


def macenko():
    return create_tile_transform("macenko", reference="tiatoolbox_target")


# ------------------------------------------------------------------ inputs
def test_expand_inputs_folders_globs_csv_and_errors(tile_folder, slide_file, tmp_path):
    units = expand_inputs([tile_folder, slide_file], tmp_path / "out")
    kinds = {u.id: u.kind for u in units}
    assert kinds == {"lab_a": "tiles", "lab_b_slide": "slide"}
    tiles = next(u for u in units if u.kind == "tiles")
    assert len(tiles.inputs) == 10 and tiles.output.endswith("lab_a")
    globbed = expand_inputs([str(tile_folder / "tile_0*.png")], tmp_path / "out")
    assert len(globbed) == 1 and len(globbed[0].inputs) == 9
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text(f"path\n{slide_file}\n{tile_folder / 'tile_00.png'}\n")
    assert {u.kind for u in expand_inputs([csv_path], tmp_path / "out")} == {"slide", "tiles"}
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([tmp_path / "missing.svs"], tmp_path / "out")
    with pytest.raises(InputError, match="glob matched no"):
        expand_inputs([str(tmp_path / "*.ndpi")], tmp_path / "out")


# ------------------------------------------------------------------ tile folders
def test_tile_folder_same_names_formats_and_closer_to_truth(tile_folder, tmp_path):
    out = tmp_path / "out"
    transform = create_tile_transform("reinhard", reference="tiatoolbox_target")
    report = run_job(expand_inputs([tile_folder], out), transform, out, JobOptions())
    assert report.ok and report.done == ["lab_a"]
    written = sorted(p.name for p in (out / "lab_a").iterdir())
    assert written == sorted(p.name for p in tile_folder.iterdir())
    a = read_image(tile_folder / "tile_04.png")
    b = read_image(out / "lab_a" / "tile_04.png")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 2
    entry = json.loads((out / "manifest.json").read_text())["units"]["lab_a"]
    assert entry["status"] == "done" and entry["profile"]["method"] == "reinhard" and entry["written"] == 10


def test_folder_with_a_corrupt_tile_records_it_and_exits_failed(tile_folder, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("tile_00.png", "tile_01.png"):
        (folder / name).write_bytes((tile_folder / name).read_bytes())
    good = (tile_folder / "tile_02.png").read_bytes()
    (folder / "tile_02.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    out = tmp_path / "out"
    report = run_job(expand_inputs([folder], out), macenko(), out, JobOptions())
    assert not report.ok
    entry = json.loads((out / "manifest.json").read_text())["units"]["mixed"]
    assert entry["status"] == "failed" and "tile_02.png" in entry["failed_files"]
    assert "truncated" in entry["failed_files"]["tile_02.png"]
    assert sorted(p.name for p in (out / "mixed").iterdir()) == ["tile_00.png", "tile_01.png"]


# ------------------------------------------------------------------ slides
def test_slide_job_writes_a_pyramid_both_readers_open(slide_file, tmp_path):
    out = tmp_path / "out"
    report = run_job(expand_inputs([slide_file], out), macenko(), out, JobOptions(tile_size=256))
    assert report.ok, report.failed
    result = out / "lab_b_slide.tif"
    import tiffslide

    with tiffslide.TiffSlide(result) as s:
        assert s.dimensions == (1000, 1000) and s.level_count >= 2
        assert abs(float(s.properties["tiffslide.mpp-x"]) - 0.5) < 1e-3
        for level in range(s.level_count):
            region = np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))
            assert region.mean() < 250  # real content at every level
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(result)) as s:
        assert s.level_count >= 2 and s.dimensions == (1000, 1000)


def test_slide_job_pixels_and_profile_are_the_estimate_then_the_table(slide_file, tmp_path):
    """Tiles reach the table as the job's list of decoded arrays, never stacked: the
    written pixels (uncompressed) must still be the sampled estimate's table applied to the
    stacked slide, and the manifest must hold that estimate. An estimate that fails fails
    its slide with its own message."""
    import tifffile

    from studio.jobs import sample_tissue_tiles
    from studio.slides import open_slide

    transform, opts = macenko(), JobOptions(tile_size=256, compression="none")
    with open_slide(slide_file) as slide:
        source = transform.estimate(sample_tissue_tiles(slide, count=opts.fit_tiles, seed=opts.seed))
        level0 = np.asarray(slide.read_region((0, 0), 0, (1000, 1000)))[..., :3]
    out = tmp_path / "out"
    assert run_job(expand_inputs([slide_file], out), transform, out, opts).ok
    written = tifffile.imread(out / "lab_b_slide.tif", series=0, level=0)
    np.testing.assert_array_equal(written, transform.apply(level0[None], source)[0])
    entry = json.loads((out / "manifest.json").read_text())["units"]["lab_b_slide"]
    assert entry["profile"] == json.loads(json.dumps(source.to_dict()))

    def broken_estimate(tiles):
        raise InputError("estimate", "no stain found in the sampled tiles")

    failing = macenko()
    failing.estimate = broken_estimate
    report = run_job(expand_inputs([slide_file], tmp_path / "failed"), failing, tmp_path / "failed", opts)
    assert list(report.failed) == ["lab_b_slide"] and "no stain found" in report.failed["lab_b_slide"]
    assert not (tmp_path / "failed" / "lab_b_slide.tif").exists()


def test_slide_seams_no_larger_than_inside_tiles(slide_file, tmp_path):
    """Adjacent tiles of a normalized slide show no seam: the jump across tile borders is
    no larger than between neighbouring pixel columns inside tiles."""
    import tifffile

    out = tmp_path / "out"
    run_job(expand_inputs([slide_file], out), macenko(), out, JobOptions(tile_size=256, compression="deflate"))
    image = tifffile.imread(out / "lab_b_slide.tif", series=0, level=0).astype(np.float32)
    diffs = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))  # (W-1,) mean jump between columns x, x+1
    borders = diffs[255::256][:3]
    inside = np.delete(diffs, np.arange(255, diffs.size, 256))
    assert borders.mean() <= np.percentile(inside, 75), (borders, np.median(inside))


def test_bad_slide_is_recorded_and_the_batch_goes_on(slide_file, tile_folder, tmp_path):
    broken = tmp_path / "broken.tif"
    data = slide_file.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated TIFF
    out = tmp_path / "out"
    report = run_job(expand_inputs([broken, slide_file], out), macenko(), out, JobOptions(tile_size=256))
    assert report.done == ["lab_b_slide"] and list(report.failed) == ["broken"]
    entry = json.loads((out / "manifest.json").read_text())["units"]["broken"]
    assert entry["status"] == "failed" and "broken.tif" in entry["error"]
    assert not (out / "broken.tif").exists()


def test_cli_exit_status_and_messages(slide_file, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00not really a tiff")
    runner = CliRunner()
    result = runner.invoke(app, ["normalize", str(broken), "--out", str(tmp_path / "o1")])
    assert result.exit_code == 1 and "1 failed" in result.output
    result = runner.invoke(app, ["normalize", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0 and "no such file" in str(result.exception or result.output)


# ------------------------------------------------------------------ resume
def test_interrupted_run_resumes_without_redoing_or_losing(tile_folder, slide_file, tmp_path):
    out = tmp_path / "out"
    units = expand_inputs([tile_folder, slide_file], out)
    opts = JobOptions(tile_size=256)

    class Crash(Exception):
        pass

    def crash_after_first(unit, entry):
        raise Crash  # the process "dies" right after the first unit is recorded

    with pytest.raises(Crash):
        run_job(units, macenko(), out, opts, on_unit_done=crash_after_first)
    first = Manifest.load(out)
    assert [k for k, v in first.units.items() if v["status"] == "done"] == ["lab_b_slide"]
    stamp = os.stat(out / "lab_b_slide.tif").st_mtime_ns
    (out / ".leftover.png.abc.tmp").write_bytes(b"partial")  # an interrupted atomic write

    with pytest.raises(InputError, match="--resume"):
        run_job(units, macenko(), out, opts)
    report = run_job(units, macenko(), out, opts, resume=True)
    assert report.skipped == ["lab_b_slide"] and report.done == ["lab_a"]
    assert os.stat(out / "lab_b_slide.tif").st_mtime_ns == stamp  # nothing done twice
    assert not (out / ".leftover.png.abc.tmp").exists()
    assert len(list((out / "lab_a").iterdir())) == 10  # nothing lost

    with pytest.raises(InputError, match="different"):
        run_job(units, create_tile_transform("reinhard"), out, opts, resume=True)


def test_unwritable_output_is_a_clear_error(tile_folder, tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable"):
        run_job(expand_inputs([tile_folder], blocker / "out"), macenko(), blocker / "out", JobOptions())


# ------------------------------------------------------------------ battery: cleanup, counts, notes
SLOW_JOB = """
import sys, time
from studio.jobs import JobOptions, expand_inputs, run_job
from studio.transforms import create_tile_transform


class Slow:  # the reinhard transform, a tile at a time, slowly: a slide write to interrupt
    def __init__(self, inner):
        self.inner, self.name, self.pixelwise = inner, inner.name, True

    def estimate(self, tiles):
        return self.inner.estimate(tiles)

    def apply(self, tiles, source):
        time.sleep(0.25)
        return self.inner.apply(tiles, source)

    def describe(self):
        return self.inner.describe()


slide, out = sys.argv[1:3]
run_job(expand_inputs([slide], out), Slow(create_tile_transform("reinhard", reference="tiatoolbox_target")), out,
        JobOptions(tile_size=256, batch_size=1, fit="tile"))
"""


def test_resume_removes_what_a_kill_9_during_a_slide_write_left(slide_file, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_JOB, str(slide_file), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spill: list[Path] = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not spill:
            spill = [p for p in out.glob(".lab_b_slide.tif.*.levels") if any(p.iterdir())]
            time.sleep(0.02)
        time.sleep(0.3)  # a tile or so into the pyramid
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert spill and spill[0].is_dir(), "the slide write was not caught"  # what a kill leaves behind
    assert list(out.glob(".lab_b_slide.tif.*.tmp")) and not (out / "lab_b_slide.tif").exists()
    report = run_job(expand_inputs([slide_file], out), create_tile_transform("reinhard", reference="tiatoolbox_target"),
                     out, JobOptions(tile_size=256, fit="tile"), resume=True)
    assert report.done == ["lab_b_slide"]
    assert sorted(p.name for p in out.iterdir()) == ["lab_b_slide.tif", "manifest.json"]  # no spill, no tmp


def test_a_tile_folder_reports_files_written_and_failed(tile_folder, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("tile_00.png", "tile_01.png", "tile_02.png"):
        (folder / name).write_bytes((tile_folder / name).read_bytes())
    for k in range(4):
        (folder / f"bad_{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * k)
    out = tmp_path / "out"
    report = run_job(expand_inputs([folder], out), macenko(), out, JobOptions())
    assert report.failed and report.unit_files == {"mixed": (3, 4)}
    assert report.summary() == "0 done, 1 failed (input files: 3 written, 4 failed)"
    assert "4 of 7 images failed and 3 were written" in report.failed["mixed"]
    result = CliRunner().invoke(app, ["normalize", str(folder), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "input files: 3 written, 4 failed" in result.output
    # --overwrite of a tile-set run (whose entry counts its files) redoes it cleanly
    report = run_job(expand_inputs([folder], out), macenko(), out, JobOptions(), overwrite=True)
    assert report.unit_files == {"mixed": (3, 4)}


def test_rgba_and_16_bit_tiles_are_recorded_in_the_manifest_and_noted(tile_folder, tmp_path):
    import tifffile
    from PIL import Image
    from typer.testing import CliRunner

    from studio.cli import app

    tile = read_image(tile_folder / "tile_04.png")
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.dstack([tile, np.full(tile.shape[:2], 128, np.uint8)]), "RGBA").save(folder / "alpha.png")
    tifffile.imwrite(folder / "deep.tif", tile.astype(np.uint16) * 257, photometric="rgb")
    write_image(folder / "plain.png", tile)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["normalize", str(folder), "--out", str(out), "--method", "reinhard"])
    assert result.exit_code == 0, result.output
    entry = Manifest.load(out).units["odd"]
    assert entry["converted"] == {"alpha.png": "RGBA composited over white", "deep.tif": "16-bit scaled to 8-bit"}
    note = [line for line in result.output.splitlines() if line.startswith("note odd:")]
    assert len(note) == 1 and "1 of 3 file(s) RGBA composited over white" in note[0]
    assert "1 of 3 file(s) 16-bit scaled to 8-bit" in note[0]


def test_translate_passes_blank_tiles_through_and_names_unreadable_ones(tmp_path):
    from typer.testing import CliRunner

    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline
    from studio.cli import app
    from studio.dab import dab_readout

    torch.manual_seed(0)
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), stain="her2").save_pretrained(tmp_path / "vihc")
    black = np.zeros((128, 128, 3), np.uint8)
    tissue = np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128])
    write_image(tmp_path / "in" / "black.png", black)
    write_image(tmp_path / "in" / "he.png", tissue)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "vihc"), "--stain", "her2"]
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "in"), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_image(out / "in" / "black.png"), black)  # nothing invented on black
    assert dab_readout(read_image(out / "in" / "black.png"))["dab_positive_percent"] == 0
    assert np.abs(read_image(out / "in" / "he.png").astype(int) - tissue).mean() > 1  # tissue is translated
    assert Manifest.load(out).units["in"]["blank_files"] == 1
    # a folder holding one unreadable tile: the error names it, and no stain profile
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "bad"), "--out", str(tmp_path / "o2"), *args])
    assert result.exit_code == 1
    error = Manifest.load(tmp_path / "o2").units["bad"]["error"]
    assert "t.png" in error and "stain profile" not in error and "stain profile" not in result.output


def test_a_png_above_pillows_limit_is_normalized_as_a_tiled_slide(tmp_path, monkeypatch):
    """The issue-22 battery: such a PNG was refused with "open it as a slide" and nothing let
    a user do that. The slide jobs now read it as a one-level slide (a pyramidal TIFF comes
    out); a plain read still refuses it, saying what reads it."""
    from PIL import Image
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.slides import is_slide_path, open_slide

    image = np.ascontiguousarray(load_sample("tiatoolbox_target")[:512, :640])
    src = tmp_path / "big.png"
    write_image(src, image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 512 x 640 = 327,680 px: "too large"
    with pytest.raises(InputError, match="read it as a tiled slide"):
        read_image(src)
    assert is_slide_path(src)
    slide = open_slide(src)
    assert slide.dimensions == (640, 512)
    result = CliRunner().invoke(app, ["normalize", str(src), "--method", "reinhard", "--reference",
                                      "tiatoolbox_target", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = open_slide(tmp_path / "out" / "big.tif")
    assert out.dimensions == (640, 512)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # the raised limit was for that one read only


class _SmallDevice:
    """A tile transform on a device that holds at most ``room`` tiles at once (a GPU with
    less memory than --batch-size needs): larger calls raise torch's out-of-memory error."""

    name = "small-device"
    pixelwise = True

    def __init__(self, room: int):
        self.room, self.calls = room, []

    def estimate(self, tiles):
        return None

    def apply(self, tiles, source=None):
        self.calls.append(len(tiles))
        if len(tiles) > self.room:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 255 - tiles

    def describe(self):
        return {"method": self.name}


def test_a_batch_too_large_for_the_device_is_halved_and_the_size_kept(tmp_path):
    from studio.jobs import apply_fitted

    tiles = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    small = _SmallDevice(room=3)
    out = apply_fitted(small, tiles, None)
    np.testing.assert_array_equal(out, 255 - tiles)  # the same result as one call
    assert small.fitted_batch_size == 2 and small.calls == [8, 4, 2, 2, 2, 2]
    small.calls.clear()
    apply_fitted(small, tiles, None)
    assert small.calls == [2, 2, 2, 2]  # later batches start at the size that fitted

    class Broken(_SmallDevice):
        def apply(self, tiles, source=None):
            raise RuntimeError("a real bug, not memory")

    with pytest.raises(RuntimeError, match="a real bug"):
        apply_fitted(Broken(1), tiles, None)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not even one tile fits: the error, not a loop
        apply_fitted(_SmallDevice(room=0), tiles, None)

    # through the job: a tile folder at --batch-size 8 on the small device, recorded in the manifest
    folder = tmp_path / "tiles"
    for i, tile in enumerate(tiles):
        write_image(folder / f"t{i}.png", tile)
    units = expand_inputs([folder], tmp_path / "out")
    report = run_job(units, _SmallDevice(room=3), tmp_path / "out", JobOptions(batch_size=8))
    assert report.ok
    assert Manifest.load(tmp_path / "out").units["tiles"]["fitted_batch_size"] == 2

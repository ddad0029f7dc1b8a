"""Pipelined slide and tile-folder IO (issue #22): reading, transforming and encoding overlap
in thread pools, yet the files written are byte for byte those of a run with every step done
serially, in order, and failures are reported exactly as before.

The serial reference replaces the pools with an executor that runs each task at once, in
submission order; the pipelined run gets randomly delayed encodes and reads, so tasks
finish out of order."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

import studio.jobs as J
import studio.slides as S
from studio.data.samples import load_sample
from studio.errors import InputError
from studio.io import write_image
from studio.jobs import JobOptions, Manifest, expand_inputs, run_job
from studio.transforms import create_tile_transform

torch.set_num_threads(1)


class InlineExecutor:
    """Runs every task when it is submitted: the serial, in-order reference."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def map(self, fn, *iterables):
        return [fn(*args) for args in zip(*iterables, strict=True)]

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _serial(monkeypatch) -> None:
    monkeypatch.setattr(S, "ThreadPoolExecutor", InlineExecutor)
    monkeypatch.setattr(J, "ThreadPoolExecutor", InlineExecutor)


def _jitter(monkeypatch) -> None:
    """Random small delays in encodes and reads so pool tasks complete out of order."""
    rng = random.Random(0)
    lock = threading.Lock()

    def delay() -> None:
        with lock:
            d = rng.random() * 0.004
        time.sleep(d)

    real_call = S._TileEncoder.__call__
    monkeypatch.setattr(S._TileEncoder, "__call__", lambda self, tile: (delay(), real_call(self, tile))[1])
    real_read = S.read_tile
    monkeypatch.setattr(S, "read_tile", lambda *a: (delay(), real_read(*a))[1])
    real_write = J._write_like_input
    monkeypatch.setattr(J, "_write_like_input", lambda *a: (delay(), real_write(*a))[1])


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    return S.write_mosaic_slide(tmp_path_factory.mktemp("slide") / "small.tif", 1000, 700, seed=3, tile_size=128)


@pytest.fixture(scope="module")
def transform():
    return create_tile_transform("macenko", reference="tiatoolbox_target")


def _slide_job(slide: Path, out: Path, transform, **opts) -> bytes:
    report = run_job(expand_inputs([slide], out), transform, out,
                     JobOptions(tile_size=128, batch_size=3, fit_tiles=8, **opts), overwrite=True)
    assert report.ok, report.failed
    return (out / "small.tif").read_bytes()


def _file_segments(path: Path) -> list[list[bytes]]:
    """The raw (encoded) tile bytes of every page of a TIFF, in file order."""
    import tifffile

    with tifffile.TiffFile(path) as tf, open(path, "rb") as fh:
        out = []
        for page in tf.pages:
            tiles = []
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(offset)
                tiles.append(fh.read(count))
            out.append(tiles)
    return out


def _serial_segments(image: np.ndarray, ts: int, compression: str, quality: int = 90) -> list[list[bytes]]:
    """What the pyramid's tiles must be, built one tile at a time with no pool: each level
    edge-padded to whole tiles and encoded tile by tile in row-major order, the next level
    the 2x2 average of this one (edge-padded to even)."""
    encode = S._TileEncoder(compression, quality)
    levels = []
    level = image
    for w, h in S.pyramid_level_sizes(image.shape[1], image.shape[0]):
        assert level.shape[:2] == (h, w)
        rows, cols = -(-h // ts), -(-w // ts)
        padded = np.pad(level, ((0, rows * ts - h), (0, cols * ts - w), (0, 0)), mode="edge")
        levels.append([encode(padded[r * ts:(r + 1) * ts, c * ts:(c + 1) * ts])
                       for r in range(rows) for c in range(cols)])
        level = S._halve(np.pad(level, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    return levels


@pytest.mark.parametrize("compression", ["jpeg", "deflate"])
def test_pipelined_slide_job_is_byte_identical_to_serial(small_slide, transform, tmp_path, monkeypatch, compression):
    with monkeypatch.context() as m:
        _serial(m)
        serial = _slide_job(small_slide, tmp_path / "serial", transform, compression=compression)
    with monkeypatch.context() as m:
        _jitter(m)
        piped = _slide_job(small_slide, tmp_path / "piped", transform, compression=compression)
    assert piped == serial
    # and the tiles are, in order, those of a pyramid built tile by tile from the serially
    # read and transformed slide
    with S.open_slide(small_slide) as slide:
        source = transform.estimate(J.sample_tissue_tiles(slide, count=8, seed=0))
        original = slide.read_level(0, 0, 0, 1000, 700)
    expected = _serial_segments(transform.apply(original[None], source)[0], 128, compression)
    assert _file_segments(tmp_path / "piped" / "small.tif") == expected
    with S.open_slide(tmp_path / "piped" / "small.tif") as out:  # a real pyramid, every level there
        assert out.level_count == len(S.pyramid_level_sizes(1000, 700))
        assert out.read_level(0, 0, 0, 1000, 700).std() > 10


def test_read_tiles_pool_keeps_order_bounds_the_window_and_ends(small_slide, monkeypatch):
    with S.open_slide(small_slide) as slide:
        grid = S.tile_grid(slide, 128)
        expected = [S.read_tile(slide, grid, t) for t in grid.tiles]
        _jitter(monkeypatch)
        got = [a for arrays, _ in S.read_tiles(slide, grid, batch_size=4, readers=3) for a in arrays]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        started = []
        real = S.read_tile
        monkeypatch.setattr(S, "read_tile", lambda *a: started.append(1) or real(*a))
        gen = S.read_tiles(slide, grid, batch_size=2, prefetch=1, readers=3)
        next(gen)
        time.sleep(0.2)
        assert len(started) == 2 * 3  # the batch held, one ahead, one being assembled: bounded
        gen.close()
        deadline = time.monotonic() + 10
        while any(t.name.startswith("histostudio-read-tiles") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "reader threads still alive after close()"
            time.sleep(0.01)
        with pytest.raises(InputError, match="readers"):
            S.read_tiles(slide, grid, readers=0)


def test_a_bad_tile_in_a_slide_fails_that_slide_as_before(small_slide, transform, tmp_path, monkeypatch):
    real = S.read_tile

    def flaky(slide, grid, tile):
        if tile.size == (128, 128) and tile.index == 9:
            raise InputError(slide.path, "cannot read level 0 at tile 9: corrupt or truncated slide data")
        return real(slide, grid, tile)

    errors = []
    for name, setup in (("serial", _serial), ("piped", _jitter)):
        with monkeypatch.context() as m:
            setup(m)
            m.setattr(S, "read_tile", flaky)
            out = tmp_path / name
            report = run_job(expand_inputs([small_slide], out), transform, out,
                             JobOptions(tile_size=128, batch_size=3, fit_tiles=8), overwrite=True)
        assert not report.ok
        entry = Manifest.load(out).units["small"]
        assert entry["status"] == "failed" and "corrupt or truncated" in entry["error"]
        assert not (out / "small.tif").exists() and not list(out.glob(".small.tif*"))  # atomic, spill removed
        errors.append(entry["error"])
    assert errors[0] == errors[1]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiles") / "tiles"
    folder.mkdir()
    image = load_sample("hgsc_nest")
    for i in range(11):
        y, x = 97 * i % 600, 53 * i % 700
        write_image(folder / f"t{i:02d}.png", np.ascontiguousarray(image[y:y + 96, x:x + 128]))
    return folder


def _folder_job(folder: Path, out: Path, transform, fit: str) -> tuple[dict, dict[str, bytes]]:
    run_job(expand_inputs([folder], out), transform, out, JobOptions(fit=fit, batch_size=3, fit_tiles=6),
            overwrite=True)
    entry = Manifest.load(out).units
    entry = {k: {f: v for f, v in e.items() if f not in ("seconds", "megapixels_per_second", "inputs", "output")}
             for k, e in entry.items()}
    return entry, {p.name: p.read_bytes() for p in sorted((out / folder.name).glob("*"))}


@pytest.mark.parametrize("fit", ["slide", "tile"])
def test_pipelined_tile_folder_is_byte_identical_to_serial(png_folder, transform, tmp_path, monkeypatch, fit):
    with monkeypatch.context() as m:
        _serial(m)
        serial = _folder_job(png_folder, tmp_path / "serial", transform, fit)
    with monkeypatch.context() as m:
        _jitter(m)
        piped = _folder_job(png_folder, tmp_path / "piped", transform, fit)
    assert len(serial[1]) == 11 and piped == serial


def test_bad_files_in_a_folder_are_reported_as_before(png_folder, transform, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(png_folder.glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "t04.png").write_bytes(b"not a png")           # second chunk
    (folder / "t09.png").write_bytes((folder / "t09.png").read_bytes()[:200])  # truncated, fourth chunk
    results = []
    for name, setup in (("serial", _serial), ("piped", _jitter)):
        with monkeypatch.context() as m:
            setup(m)
            results.append(_folder_job(folder, tmp_path / name, transform, "slide"))
    assert results[0] == results[1]
    entry, files = results[1]
    unit = next(iter(entry.values()))
    assert unit["status"] == "failed" and unit["written"] == 9 and len(files) == 9
    assert list(unit["failed_files"]) == ["t04.png", "t09.png"]  # in file order
    assert unit["error"].startswith("2 of 11 images failed and 9 were written (first failure: ")
    assert "t04.png" in unit["error"]

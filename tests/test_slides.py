"""Whole-slide IO: readers (tiffslide, OpenSlide, images), tissue mask, tile grids, the
prefetching tile reader, and the streaming pyramid writer (read back by both readers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from studio import slides as S
from studio.data.samples import SAMPLES, load_sample
from studio.errors import InputError
from studio.io import write_image

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MPP_TOL = S.MPP_TOLERANCE
CMU = SAMPLES["cmu_small_region"].path

try:
    import openslide  # noqa: F401

    HAVE_OPENSLIDE = True
except Exception:  # ImportError, or OSError without the shared library
    HAVE_OPENSLIDE = False

BACKENDS = ["tiffslide", pytest.param("openslide", marks=pytest.mark.skipif(not HAVE_OPENSLIDE,
                                                                             reason="OpenSlide not installed"))]


# ----------------------------------------------------------------------------- helpers
def reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Independent reference of what write_pyramid promises: each level is the previous one
    edge-padded to even size and 2x2 box-averaged, rounded half up, size ceil(n / 2)."""
    out = [image]
    for _ in range(levels - 1):
        a = out[-1].astype(np.float64)
        h, w = a.shape[:2]
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        mean = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4.0
        out.append(np.floor(mean + 0.5).astype(np.uint8))
    return out


def tiles_of(image: np.ndarray, tile: int):
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            yield image[y:y + tile, x:x + tile]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def mosaic_image() -> np.ndarray:
    """A real-tissue mosaic (glass + H&E) of odd size, rendered in one piece."""
    return S._Mosaic(1001, 699, seed=3, tissue_fraction=0.6).render(0, 0, 1001, 699)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, mosaic_image) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pyramids")
    out = {}
    for comp in ("jpeg", "deflate", "none"):
        out[comp] = S.write_pyramid(folder / f"p_{comp}.tif", tiles_of(mosaic_image, 128), 1001, 699,
                                    tile_size=128, mpp=0.25, compression=comp, quality=92, min_level_size=128)
    return out


@pytest.fixture(scope="module")
def cmu():
    with S.open_slide(CMU) as slide:
        yield slide


# ----------------------------------------------------------------------------- writer
def test_pyramid_layout_is_main_ifd_chain_with_reduced_flags(pyramids):
    """The layout both readers need: all levels tiled, in the main IFD chain, level 0 then
    NewSubfileType=1 levels of ceil(n/2) size; no SubIFDs; tifffile sees one pyramid."""
    with tifffile.TiffFile(pyramids["jpeg"]) as tf:
        pages = list(tf.pages)
        assert [p.shape[:2] for p in pages] == [(699, 1001), (350, 501), (175, 251), (88, 126)]
        assert all(p.is_tiled and p.tilewidth == 128 and p.tilelength == 128 for p in pages)
        assert [p.subfiletype for p in pages] == [0, 1, 1, 1]
        assert all(p.subifds is None for p in pages)
        assert len(tf.series) == 1 and len(tf.series[0].levels) == 4
        assert pages[0].compression == 7 and pages[0].photometric == 6  # JPEG, YCbCr
        desc = pages[0].description
        assert desc.startswith("histostudio.slides.write_pyramid") and "Aperio" not in desc
    with tifffile.TiffFile(pyramids["deflate"]) as tf:
        assert tf.pages[0].compression == 8 and tf.pages[0].predictor == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("comp", ["deflate", "none", "jpeg"])
def test_pyramid_round_trip_every_level(pyramids, mosaic_image, backend, comp):
    ref = reference_pyramid(mosaic_image, 4)
    with S.open_slide(pyramids[comp], backend=backend) as slide:
        assert slide.backend == backend
        assert slide.level_count == 4
        assert slide.level_dimensions == [(r.shape[1], r.shape[0]) for r in ref]
        assert slide.level_downsamples[0] == 1.0
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=2e-3)
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        for k, r in enumerate(ref):
            got = slide.read_region((0, 0), k, slide.level_dimensions[k])
            assert got.dtype == np.uint8 and got.shape == r.shape
            if comp == "jpeg":
                # JPEG 4:2:0 at q92; reduced levels of this dense texture are the hardest case
                assert psnr(got, r) > 30, (k, psnr(got, r))
                assert np.abs(got.astype(int) - r).mean() < (2.5 if k == 0 else 5.0)
            else:
                np.testing.assert_array_equal(got, r, err_msg=f"level {k}")
        # an offset region at level 2 (location in level-0 pixels). Level 2 is 251 px for
        # 1001, a downsample of 3.99: OpenSlide places the region at the exact sub-pixel
        # position 148 / 3.99 = 37.1 and interpolates; tiffslide truncates to pixel 37.
        got = slide.read_region((4 * 37, 4 * 21), 2, (90, 60))
        want = ref[2][21:81, 37:127]
        if comp == "jpeg" or backend == "openslide":
            assert psnr(got, want) > 28
        else:
            np.testing.assert_array_equal(got, want)


def test_native_readers_see_every_level_and_mpp(pyramids):
    """Straight through the libraries (no studio wrapper): what QuPath/other tools see."""
    import tiffslide

    with tiffslide.TiffSlide(pyramids["jpeg"]) as ts:
        assert ts.level_count == 4
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
    if HAVE_OPENSLIDE:
        import openslide

        with openslide.OpenSlide(str(pyramids["jpeg"])) as osr:
            assert osr.level_count == 4
            assert osr.properties["openslide.vendor"] == "generic-tiff"
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
            assert osr.level_dimensions[3] == (126, 88)


def test_small_image_single_level_no_mpp_and_full_size_edge_tiles(tmp_path):
    image = np.ascontiguousarray(load_sample("tiatoolbox_target")[:200, :300])

    def padded_tiles():  # edge tiles handed over full size (e.g. from a model): excess ignored
        for tile in tiles_of(image, 128):
            full = np.zeros((128, 128, 3), np.uint8)
            full[:tile.shape[0], :tile.shape[1]] = tile
            yield full

    path = S.write_pyramid(tmp_path / "small.tif", padded_tiles(), 300, 200, tile_size=128, compression="deflate")
    assert S.is_slide_path(path)
    with S.open_slide(path) as slide:
        assert slide.level_count == 1 and slide.mpp is None
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (300, 200)), image)


def test_writer_failures_leave_nothing(tmp_path):
    image = np.ascontiguousarray(load_sample("hgsc_nest")[:512, :512])
    target = tmp_path / "out.tif"

    def failing():
        for i, tile in enumerate(tiles_of(image, 128)):
            if i == 9:
                raise RuntimeError("model crashed")
            yield tile

    with pytest.raises(RuntimeError, match="model crashed"):
        S.write_pyramid(target, failing(), 512, 512, tile_size=128, min_level_size=64)
    assert list(tmp_path.iterdir()) == []  # no output, no temp file, no spill folder

    with pytest.raises(InputError, match="ended after 15 of 16"):
        S.write_pyramid(target, list(tiles_of(image, 128))[:15], 512, 512, tile_size=128)
    with pytest.raises(InputError, match="more than the 16"):
        S.write_pyramid(target, list(tiles_of(image, 128)) * 2, 512, 512, tile_size=128)
    with pytest.raises(InputError, match="tile 0"):
        S.write_pyramid(target, (t.astype(np.float32) for t in tiles_of(image, 128)), 512, 512, tile_size=128)
    assert list(tmp_path.iterdir()) == []

    # an existing output survives a failed rewrite untouched
    S.write_pyramid(target, tiles_of(image, 128), 512, 512, tile_size=128)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        S.write_pyramid(target, failing(), 512, 512, tile_size=128)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


@pytest.mark.parametrize("kwargs, match", [
    ({"tile_size": 100}, "multiple of 16"),
    ({"compression": "lzw"}, "unknown compression"),
    ({"quality": 0}, "quality"),
    ({"mpp": -1.0}, "mpp"),
])
def test_writer_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        S.write_pyramid(tmp_path / "x.tif", iter([]), 64, 64, **kwargs)


# ----------------------------------------------------------------------------- readers
@pytest.mark.parametrize("backend", BACKENDS)
def test_cmu_svs_both_backends(backend):
    ref = tifffile.imread(CMU, series=0, level=0)
    with S.open_slide(CMU, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        np.testing.assert_array_equal(slide.read_region((300, 700), 0, (500, 400)), ref[700:1100, 300:800])
        # partly outside the slide: white padding, in-slide part unchanged
        region = slide.read_region((-10, 2940), 0, (40, 60))
        assert (region[:, :10] == 255).all() and (region[27:] == 255).all()
        np.testing.assert_array_equal(region[:27, 10:], ref[2940:, :30])
        assert (slide.read_region((5000, 5000), 0, (8, 8)) == 255).all()
        with pytest.raises(InputError, match="no level 1"):
            slide.read_region((0, 0), 1, (8, 8))


def test_auto_backend_and_thumbnail(cmu, pyramids, mosaic_image):
    assert cmu.backend == "tiffslide"
    thumb = cmu.thumbnail(512)
    assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == 512 and thumb.shape[1] == round(2220 * 512 / 2967)
    with S.open_slide(pyramids["deflate"]) as slide:
        thumb = slide.thumbnail(300)  # from level 1 (501 px wide), area-averaged
        assert thumb.shape == (209, 300, 3)
        from PIL import Image

        ref = np.asarray(Image.fromarray(mosaic_image).resize((300, 209), Image.Resampling.BOX))
        assert psnr(thumb, ref) > 30  # pyramid level + box vs one box resize of level 0


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_plain_images_open_as_one_level_slides(tmp_path, suffix):
    image = np.ascontiguousarray(load_sample("hgsc_nest")[:300, :400])
    path = write_image(tmp_path / f"tile{suffix}", image)
    assert not S.is_slide_path(path)
    with S.open_slide(path) as slide:
        assert slide.backend == "image" and slide.level_count == 1
        assert slide.dimensions == (400, 300) and slide.mpp is None
        got = slide.read_region((0, 0), 0, (400, 300))
        if suffix == ".jpg":
            assert psnr(got, image) > 30
        else:
            np.testing.assert_array_equal(got, image)
        got[:] = 0  # a copy: the slide's pixels are not shared
        assert slide.read_region((0, 0), 0, (4, 4)).any()


def test_is_slide_path(tmp_path, pyramids):
    assert S.is_slide_path(CMU) and S.is_slide_path(pyramids["jpeg"])
    assert S.is_slide_path(tmp_path / "x.mrxs") and S.is_slide_path("whatever.ndpi")
    assert not S.is_slide_path(tmp_path / "x.png") and not S.is_slide_path(tmp_path / "missing.tif")
    big = tmp_path / "strip.tif"
    tifffile.imwrite(big, np.full((8, 5000, 3), 200, np.uint8), photometric="rgb")  # plain but > 4096 px
    assert S.is_slide_path(big)
    assert set(S.SLIDE_SUFFIXES) >= {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif"}


def test_bad_inputs_name_the_file(tmp_path, pyramids):
    missing = tmp_path / "nope.svs"
    with pytest.raises(InputError, match="nope.svs: no such file"):
        S.open_slide(missing)
    truncated = tmp_path / "cut.tif"
    data = pyramids["jpeg"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.tif.*truncated"):
        S.open_slide(truncated)
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(InputError, match=r"notes\.svs.*not a TIFF"):
        S.open_slide(text)
    with pytest.raises(InputError, match=r"p_jpeg\.tif.*unknown slide backend 'bioformats'"):
        S.open_slide(pyramids["jpeg"], backend="bioformats")
    with pytest.raises(InputError, match="is a folder"):
        S.open_slide(tmp_path)
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="unknown slide format"):
        S.open_slide(odd)
    assert not S.is_slide_path(text.with_suffix(".txt"))
    if HAVE_OPENSLIDE:
        mrxs = tmp_path / "scan.mrxs"
        mrxs.write_text("[GENERAL]\n")
        with pytest.raises(InputError, match=r"scan\.mrxs: cannot be opened with openslide"):
            S.open_slide(mrxs)
        with pytest.raises(InputError, match=r"notes\.svs"):
            S.open_slide(text, backend="openslide")


def test_missing_backend_is_an_input_error(tmp_path, monkeypatch):
    mrxs = tmp_path / "scan.mrxs"
    mrxs.write_text("[GENERAL]\n")
    monkeypatch.setattr(S, "_import_ok", lambda module: False)
    with pytest.raises(InputError, match=r"scan\.mrxs: needs the openslide backend, which is not installed"):
        S.open_slide(mrxs)
    with pytest.raises(InputError, match=r"cmu_small_region\.svs: needs the tiffslide backend"):
        S.open_slide(CMU)


# ----------------------------------------------------------------------------- tissue
def test_tissue_mask_cmu(cmu):
    tm = S.tissue_mask(cmu)
    assert tm.mask.dtype == bool and max(tm.mask.shape) == 2048
    assert tm.downsample == pytest.approx(2967 / 2048, rel=1e-3)
    assert 0.1 < tm.fraction < 0.9
    for corner in (tm.mask[:40, :40], tm.mask[:40, -40:], tm.mask[-40:, :40]):
        assert not corner.any()
    assert S.tissue_mask(cmu) is tm  # cached per slide


def test_tissue_mask_excludes_pen_and_keeps_pale_tissue(tmp_path):
    canvas = np.full((600, 900, 3), 244, np.uint8)
    canvas[100:500, 100:500] = load_sample("tiatoolbox_target")[:400, :400]
    canvas[250:330, 560:880] = (236, 200, 222)    # pale eosin-only stroma (red OD ~0.08)
    canvas[40:60, 520:880] = (25, 25, 30)         # black pen
    canvas[520:545, 520:880] = (60, 160, 90)      # green pen
    canvas[420:440, 560:880] = (30, 60, 170)      # blue pen
    path = write_image(tmp_path / "marked.png", canvas)
    with S.open_slide(path) as slide:
        tm = S.tissue_mask(slide, max_size=900)
    m = tm.mask
    assert tm.downsample == 1.0
    assert m[110:490, 110:490].mean() > 0.95
    assert m[255:325, 565:875].mean() > 0.95
    assert not m[40:60, 520:880].any() and not m[520:545, 520:880].any() and not m[420:440, 560:880].any()
    assert not m[:30].any() and not m[:, 885:].any()


# ----------------------------------------------------------------------------- grids
def _coverage(grid: S.TileGrid) -> np.ndarray:
    count = np.zeros((grid.height, grid.width), np.int16)
    for t in grid.tiles:
        w, h = t.size
        count[t.y:t.y + h, t.x:t.x + w] += 1
    return count


def test_tile_grid_covers_once_row_major(cmu):
    grid = S.tile_grid(cmu, 256)
    assert (grid.width, grid.height, grid.scale, grid.level) == (2220, 2967, 1.0, 0)
    assert (_coverage(grid) == 1).all()
    assert [t.index for t in grid.tiles] == list(range(len(grid.tiles))) == list(range(9 * 12))
    assert [(t.row, t.col) for t in grid.tiles] == [(r, c) for r in range(12) for c in range(9)]
    assert grid.tiles[8].size == (2220 - 8 * 256, 256) and grid.tiles[-1].size == (2220 - 8 * 256, 2967 - 11 * 256)
    tissue = grid.tissue_tiles(0.5)
    assert 0 < len(tissue) < len(grid.tiles) and grid.tiles[0].tissue == 0.0
    assert grid.tissue_tiles(0.0) == grid.tiles


def test_tile_grid_at_mpp_one_is_half_size_and_seamless(cmu):
    grid = S.tile_grid(cmu, 256, mpp=1.0)
    assert grid.scale == pytest.approx(1.0 / 0.499) and grid.level == 0 and grid.mpp == pytest.approx(1.0)
    assert abs(grid.width - 2220 / 2) <= 0.005 * 2220 and abs(grid.height - 2967 / 2) <= 0.005 * 2967
    assert (_coverage(grid) == 1).all()
    from PIL import Image

    full = Image.fromarray(tifffile.imread(CMU, series=0, level=0))
    s = grid.scale
    for tile in (grid.tiles[0], grid.tiles[7], grid.tiles[-1]):
        got = S.read_tile(cmu, grid, tile)
        w, h = tile.size
        assert got.shape == (h, w, 3)
        # area average of the tile's exact level-0 footprint, from the whole image in memory
        box = (tile.x * s, tile.y * s, min((tile.x + w) * s, 2220), min((tile.y + h) * s, 2967))
        want = np.asarray(full.resize((w, h), Image.Resampling.BOX, box=box))
        assert np.abs(got.astype(int) - want).max() <= 1
    # seamless: four tiles side by side == one read of their union
    a, b = grid.tiles[0], grid.tiles[1]
    c, d = grid.tiles[grid.cols], grid.tiles[grid.cols + 1]
    rows = [np.concatenate([S.read_tile(cmu, grid, t) for t in pair], axis=1) for pair in ((a, b), (c, d))]
    quad = np.concatenate(rows, axis=0)
    union = S.Tile(index=-1, row=0, col=0, x=0, y=0, size=(512, 512), tissue=0.0)
    np.testing.assert_array_equal(quad, S.read_tile(cmu, grid, union))


def test_tile_grid_resolution_requests(cmu, pyramids, tmp_path):
    assert S.tile_grid(cmu, 256, magnification=20).scale == 1.0  # 0.5 um/px ~ 0.499: native
    with pytest.raises(InputError, match="finer than the scan"):
        S.tile_grid(cmu, 256, mpp=0.25)
    with pytest.raises(InputError, match="finer than the scan"):
        S.tile_grid(cmu, 256, magnification=40)
    with pytest.raises(InputError, match="not both"):
        S.tile_grid(cmu, 256, mpp=1.0, magnification=10)
    png = write_image(tmp_path / "t.png", np.ascontiguousarray(load_sample("skin")[:64, :64]))
    with S.open_slide(png) as image_slide, pytest.raises(InputError, match=r"t\.png.*no microns-per-pixel"):
        S.tile_grid(image_slide, 32, mpp=0.5)
    with S.open_slide(pyramids["deflate"]) as slide:
        grid = S.tile_grid(slide, 128, mpp=0.5)  # exactly level 1 (2 x 0.25)
        # 501 = ceil(1001 / 2): the level's downsample is 1.998, within tolerance of 2
        assert (grid.level, grid.scale, grid.width, grid.height) == (1, slide.level_downsamples[1], 501, 350)
        assert grid.mpp == pytest.approx(0.5, rel=MPP_TOL)
        level1 = slide.read_region((0, 0), 1, (501, 350))
        t = grid.tiles[5]
        np.testing.assert_array_equal(S.read_tile(slide, grid, t), level1[t.y:t.y + 128, t.x:t.x + 128])
        grid = S.tile_grid(slide, 128, mpp=0.75)  # between levels 1 and 2: read level 1, resample
        assert grid.level == 1 and (grid.width, grid.height) == (334, 233)
        assert (_coverage(grid) == 1).all()


# ----------------------------------------------------------------------------- read_tiles
def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("histostudio-read-tiles")]


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_read_tiles_order_content_and_prefetch(pyramids, monkeypatch):
    with S.open_slide(pyramids["deflate"]) as slide:
        grid = S.tile_grid(slide, 128)
        order = list(reversed(grid.tiles))[:13]
        seen_tiles, seen_arrays = [], []
        for arrays, tiles in S.read_tiles(slide, grid, order, batch_size=4):
            assert len(arrays) == len(tiles) <= 4
            seen_tiles += tiles
            seen_arrays += arrays
        assert seen_tiles == order
        for tile, arr in zip(order, seen_arrays, strict=True):
            np.testing.assert_array_equal(arr, S.read_tile(slide, grid, tile))
        assert _wait_for(lambda: not _reader_threads())

        # prefetch: while the consumer sits on batch 1, the reader fills the queue ahead
        reads = []
        real = S.read_tile
        monkeypatch.setattr(S, "read_tile", lambda *a: reads.append(1) or real(*a))
        gen = S.read_tiles(slide, grid, batch_size=2, prefetch=2)
        next(gen)
        assert _wait_for(lambda: len(reads) >= 2 * 4)  # batch 1 + 2 queued + 1 waiting to be queued
        time.sleep(0.05)
        assert len(reads) == 8  # and no further: the queue is bounded
        gen.close()  # stopping early ends the thread
        assert _wait_for(lambda: not _reader_threads())


def test_read_tiles_reader_error_surfaces_and_thread_ends(pyramids, monkeypatch):
    with S.open_slide(pyramids["jpeg"]) as slide:
        grid = S.tile_grid(slide, 128)
        real = S.read_tile

        def flaky(slide_, grid_, tile):
            if tile.index == 5:
                raise InputError(slide_.path, "cannot read level 0: corrupt tile")
            return real(slide_, grid_, tile)

        monkeypatch.setattr(S, "read_tile", flaky)
        got = []
        with pytest.raises(InputError, match="corrupt tile"):
            for arrays, _ in S.read_tiles(slide, grid, batch_size=2):
                got += arrays
        assert len(got) == 4
        assert _wait_for(lambda: not _reader_threads())
        for bad in ({"batch_size": 0}, {"prefetch": 0}):
            with pytest.raises(InputError):
                S.read_tiles(slide, grid, **bad)

        # consumer abandons the generator mid-way (break + garbage collection)
        monkeypatch.setattr(S, "read_tile", real)
        for _ in S.read_tiles(slide, grid, batch_size=1, prefetch=1):
            break
        assert _wait_for(lambda: not _reader_threads())


# ----------------------------------------------------------------------------- mosaic
def test_mosaic_deterministic_real_tissue_and_tile_size_independent(tmp_path):
    a = list(S.mosaic_tiles(700, 500, seed=5, tile_size=256))
    b = list(S.mosaic_tiles(700, 500, seed=5, tile_size=256))
    c = list(S.mosaic_tiles(700, 500, seed=6, tile_size=256))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    whole = S._Mosaic(700, 500, 5, 0.6).render(0, 0, 700, 500)
    for t, (x, y) in zip(S.mosaic_tiles(700, 500, seed=5, tile_size=128), S._grid_positions(700, 500, 128),
                         strict=True):
        np.testing.assert_array_equal(t, whole[y:y + t.shape[0], x:x + t.shape[1]])

    path = S.write_mosaic_slide(tmp_path / "m.tif", 2048, 1536, seed=1, mpp=0.5, tissue_fraction=0.5)
    with S.open_slide(path) as slide:
        assert slide.level_dimensions == [(2048, 1536), (1024, 768), (512, 384), (256, 192)]
        assert slide.mpp == pytest.approx(0.5)
        tm = S.tissue_mask(slide, max_size=512)
        assert 0.3 < tm.fraction < 0.65
        grid = S.tile_grid(slide, 256, mask=tm)
        assert len(grid.tissue_tiles(0.9)) > 5 and len(grid.tissue_tiles(0.0)) == 48


def _rss_growth_mb(size: int) -> dict:
    """Write a size x size mosaic in a fresh process: peak RSS during the write minus RSS
    before it, in MB.

    The peak is the kernel's high-water mark of this process's memory (``VmHWM``), reset
    just before the write (``/proc/self/clear_refs``). ``getrusage().ru_maxrss`` is not
    usable here: Linux carries the *parent's* high-water mark across fork + exec, so a
    child of a 450 MB pytest process reports at least 450 MB.
    """
    code = textwrap.dedent(f"""
        import json, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from studio import slides

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1e3  # kB -> MB

        folder = Path(tempfile.mkdtemp())
        slides.write_mosaic_slide(folder / "warm.tif", 1024, 1024)
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        slides.write_mosaic_slide(folder / "big.tif", {size}, {size})
        peak = status("VmHWM")
        with slides.open_slide(folder / "big.tif") as s:
            levels = s.level_count
        print(json.dumps({{"growth": peak - before, "levels": levels, "before": before, "peak": peak}}))
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_writer_memory_does_not_grow_with_slide_size():
    """12000 x 12000 is 432 MB of raw pixels; streaming keeps the growth to a few strips."""
    result = _rss_growth_mb(12000)
    assert result["levels"] == 6
    assert result["growth"] < 80, result  # < 20% of the image; measured ~30 MB (O(width x tile))

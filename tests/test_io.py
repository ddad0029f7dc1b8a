"""The IO boundary: every bad image gives one clear error naming the file; writes are atomic."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from studio.data.samples import load_sample
from studio.errors import InputError, OutputError
from studio.io import atomic_path, read_image, save_npy, to_tensor, to_uint8, write_image


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128])


def test_png_round_trip_is_exact_and_writable(tmp_path, real):
    path = write_image(tmp_path / "a.png", real)
    back = read_image(path)
    assert back.dtype == np.uint8 and np.array_equal(back, real) and back.flags.writeable
    # the fast encoder settings (SUB filter, RLE) are still a standard PNG: Pillow reads the same pixels
    with Image.open(path) as img:
        assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), real)


def test_truncated_and_corrupt_images_name_the_file(tmp_path, real):
    good = write_image(tmp_path / "good.png", real).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=r"cut\.png: corrupt or truncated image"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(InputError, match=r"noise\.png: is not a readable image"):
        read_image(tmp_path / "noise.png")
    tifffile.imwrite(tmp_path / "t.tif", real)
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"cut\.tif: corrupt or truncated TIFF"):
        read_image(tmp_path / "cut.tif")
    with pytest.raises(InputError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_channel_and_depth_variants(tmp_path, real):
    rgba = np.dstack([real, np.full(real.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white glass
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == real.shape and (out[:10, :10] == 255).all() and np.array_equal(out[20:, 20:], real[20:, 20:])

    sixteen = real.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "sixteen.tif", sixteen)
    assert np.array_equal(read_image(tmp_path / "sixteen.tif"), real)

    gray = real.mean(axis=2).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    with pytest.raises(InputError, match=r"gray\.png: is a grayscale image"):
        read_image(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png", allow_gray=True).shape == real.shape
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((8, 8, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(InputError, match=r"five\.tif: has shape"):
        read_image(tmp_path / "five.tif")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, real, monkeypatch):
    target = tmp_path / "out.png"
    write_image(target, real)
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)  # JPEG, WebP, BMP
    monkeypatch.setattr(Path, "write_bytes", disk_full)  # RGB PNG (libpng through imagecodecs)
    with pytest.raises(OutputError, match="disk full"):
        write_image(target, real[::2])
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary left
    monkeypatch.undo()

    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.npy") as tmp:
            tmp.write_bytes(b"half")
            raise KeyError("interrupted")
    assert not (tmp_path / "x.npy").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_npy_refuses_objects_and_tensor_conversions(tmp_path, real):
    save_npy(tmp_path / "a.npy", real)
    assert np.array_equal(np.load(tmp_path / "a.npy"), real)
    t = to_tensor(load_sample("hgsc_nest")[:16, :16])  # read-only sample: no warning, a copy
    assert t.shape == (1, 3, 16, 16) and t.dtype.is_floating_point and float(t.max()) <= 1.0
    assert t.is_contiguous()  # NCHW, not a channels-last view
    assert np.array_equal(to_uint8(t)[0], load_sample("hgsc_nest")[:16, :16])
    with pytest.raises(InputError, match="expected"):
        to_tensor(np.zeros((4, 4)))


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """The temp-then-rename path must not leave outputs readable by their owner only."""
    import os

    from studio.io import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    write_image(tmp_path / "tile.png", np.zeros((8, 8, 3), np.uint8))
    expected = os.stat(plain).st_mode & 0o777
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == expected
    assert os.stat(tmp_path / "tile.png").st_mode & 0o777 == expected


def test_atomic_folders_get_the_mode_a_plain_mkdir_would(tmp_path):
    """Datasets are written into a mkdtemp folder (0700) and renamed: others must still read them."""
    import os

    from studio.data.base import atomic_folder

    (tmp_path / "plain").mkdir()
    with atomic_folder(tmp_path / "dataset") as tmp:
        (tmp / "x.txt").write_text("x")
    assert os.stat(tmp_path / "dataset").st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777

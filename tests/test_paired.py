"""Paired H&E/IHC layouts (BCI, MIST): round trips on real tiles, unmatched names, failed writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from studio.data.base import collate
from studio.data.paired import BCIDataset, MISTDataset, PairedSample, write_bci, write_mist
from studio.data.samples import load_sample
from studio.errors import InputError, OutputError

torch.set_num_threads(1)
SIZE = 96


@pytest.fixture(scope="module")
def pairs() -> list[PairedSample]:
    """Five real pairs: H&E crops of hgsc_nest with IHC crops of the skimage IHC sample."""
    he, ihc = load_sample("hgsc_nest"), load_sample("ihc")
    out = []
    for k in range(5):
        y = x = k * SIZE
        window = (slice(y, y + SIZE), slice(x, x + SIZE))
        out.append(PairedSample(np.array(he[window]), np.array(ihc[window]), {"name": f"pair_{k:02d}"}))
    return out


def test_bci_round_trip(tmp_path, pairs):
    root = write_bci(tmp_path / "BCI", {"train": pairs[:3], "test": pairs[3:]}, source="real")
    assert sorted(os.listdir(root)) == ["HE", "IHC", "manifest.csv"]
    assert sorted(os.listdir(root / "HE" / "train")) == ["pair_00.png", "pair_01.png", "pair_02.png"]
    assert sorted(os.listdir(root / "IHC" / "test")) == ["pair_03.png", "pair_04.png"]
    train, test = BCIDataset(root, "train"), BCIDataset(root, "test")
    assert train.names == ["pair_00", "pair_01", "pair_02"] and test.names == ["pair_03", "pair_04"]
    for ds, expected in ((train, pairs[:3]), (test, pairs[3:])):
        for i, want in enumerate(expected):
            got = ds.read(i)
            assert got.he.dtype == got.ihc.dtype == np.uint8
            assert np.array_equal(got.he, want.he) and np.array_equal(got.ihc, want.ihc)
            assert got.meta["name"] == want.meta["name"] and got.meta["source"] == "real"
            assert got.meta["split"] == ds.base_meta["split"] and got.meta["stain"] == "HER2"
    he, ihc, meta = train.read(1)
    assert np.array_equal(he, pairs[1].he) and np.array_equal(ihc, pairs[1].ihc) and meta["index"] == 1
    rewritten = write_bci(tmp_path / "copy", {"test": [train.read(i) for i in range(len(train))]})
    assert "he_path" not in (rewritten / "manifest.csv").read_text()
    assert [p.meta["split"] for p in map(BCIDataset(rewritten, "test").read, range(3))] == ["test"] * 3
    item = train[0]
    assert item["he"].shape == item["ihc"].shape == (3, SIZE, SIZE) and item["he"].dtype == torch.float32
    batch = next(iter(DataLoader(train, batch_size=3, collate_fn=collate)))
    assert batch["he"].shape == (3, 3, SIZE, SIZE) and [m["name"] for m in batch["meta"]] == train.names


def test_mist_round_trip_png_exact_and_jpeg_close(tmp_path, pairs):
    splits = {"train": pairs[:3], "val": pairs[3:]}
    write_mist(tmp_path / "MIST", "Ki67", splits, source="synthetic", suffix=".png")
    write_mist(tmp_path / "MIST", "HER2", {"train": pairs[:2]}, source="real")  # JPEG, as released
    base = tmp_path / "MIST" / "Ki67" / "TrainValAB"
    assert sorted(os.listdir(base)) == ["manifest.csv", "trainA", "trainB", "valA", "valB"]
    ki67 = MISTDataset(tmp_path / "MIST", "ki67", "val")  # stain folder matched case-insensitively
    assert ki67.names == ["pair_03", "pair_04"]
    for i, want in enumerate(pairs[3:]):
        got = ki67.read(i)
        assert np.array_equal(got.he, want.he) and np.array_equal(got.ihc, want.ihc)
        assert got.meta["source"] == "synthetic"
        assert got.meta["stain"] == "Ki67" and got.meta["split"] == "val"
    her2 = MISTDataset(tmp_path / "MIST", "HER2", "train")
    her2_a = tmp_path / "MIST" / "HER2" / "TrainValAB" / "trainA"
    assert sorted(os.listdir(her2_a)) == ["pair_00.jpg", "pair_01.jpg"]
    for i, want in enumerate(pairs[:2]):
        got = her2.read(i)
        for a, b in ((got.he, want.he), (got.ihc, want.ihc)):
            mse = np.mean((a.astype(np.float64) - b) ** 2)
            assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 30  # JPEG q95: lossy but close
    with pytest.raises(InputError, match=r"no MIST stain folder.*found \['HER2', 'Ki67'\]"):
        MISTDataset(tmp_path / "MIST", "PR", "train")


def test_unmatched_names_are_reported(tmp_path, pairs):
    root = write_bci(tmp_path / "BCI", {"train": pairs}, source="real")
    (root / "IHC" / "train" / "pair_01.png").unlink()
    (root / "HE" / "train" / "pair_04.png").rename(root / "HE" / "train" / "pair_99.png")
    with pytest.raises(InputError, match=r"unmatched names: 2 H&E image\(s\).*pair_01, pair_99.*"
                                         r"1 IHC image\(s\).*pair_04.*strict=False"):
        BCIDataset(root, "train")
    with pytest.warns(UserWarning, match="unmatched names skipped"):
        ds = BCIDataset(root, "train", strict=False)
    assert ds.names == ["pair_00", "pair_02", "pair_03"]
    assert np.array_equal(ds.read(1).ihc, pairs[2].ihc)


def test_pair_size_mismatch_and_bad_split(tmp_path, pairs):
    root = write_bci(tmp_path / "BCI", {"train": pairs[:2]}, source="real")
    Image.fromarray(pairs[0].ihc[:50]).save(root / "IHC" / "train" / "pair_00.png")
    with pytest.raises(InputError, match=r"pair_00\.png: is 50x96 but its H&E partner pair_00\.png is 96x96"):
        BCIDataset(root, "train").read(0)
    with pytest.raises(InputError, match="BCI splits are train, test"):
        BCIDataset(root, "val")
    with pytest.raises(InputError, match=r"H&E is 96x96 but IHC is 50x96"):
        write_bci(tmp_path / "other", {"train": [(pairs[0].he, pairs[0].ihc[:50])]}, source="real")
    with pytest.raises(InputError, match="no 'source'"):
        write_bci(tmp_path / "other", {"train": [(pairs[0].he, pairs[0].ihc)]})
    assert sorted(os.listdir(tmp_path)) == ["BCI"]


def test_failed_pair_write_leaves_nothing(tmp_path, pairs, monkeypatch):
    real_save, real_write_bytes = Image.Image.save, Path.write_bytes
    calls = {"n": 0}

    def flaky(real):
        def write(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, *args, **kwargs)
        return write

    monkeypatch.setattr(Image.Image, "save", flaky(real_save))  # JPEG and other Pillow writes
    monkeypatch.setattr(Path, "write_bytes", flaky(real_write_bytes))  # RGB PNG (libpng through imagecodecs)
    with pytest.raises(OutputError, match="disk full"):
        write_bci(tmp_path / "BCI", {"train": pairs[:3]}, source="real")
    assert os.listdir(tmp_path) == []
    calls["n"] = -100  # no failure: one stain written
    write_mist(tmp_path / "MIST", "HER2", {"train": pairs[:3]}, source="real")
    calls["n"] = 0  # the second stain fails half-way and leaves the first untouched
    with pytest.raises(OutputError, match="disk full"):
        write_mist(tmp_path / "MIST", "ER", {"train": pairs[:3]}, source="real")
    assert os.listdir(tmp_path / "MIST") == ["HER2"]
    assert len(MISTDataset(tmp_path / "MIST", "HER2")) == 3

"""Nuclei dataset layouts: crops of the real labelled tile, write/read round trips, bad input."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from studio.data.base import (
    ArrayNucleiDataset,
    ConcatNucleiDataset,
    NucleiSample,
    collate,
    validate_labels,
)
from studio.data.conic import (
    CONIC_CLASSES,
    COUNT_COLUMNS,
    CoNICDataset,
    conic_counts,
    pannuke_to_conic,
    write_conic,
)
from studio.data.crops import crop_grid, hgsc_nest_crops, hgsc_nest_dataset, relabel_contiguous
from studio.data.folder import FolderDataset, write_folder
from studio.data.pannuke import PanNukeDataset, labels_to_masks, masks_to_labels, write_pannuke
from studio.data.registry import detect_layout, open_dataset
from studio.data.samples import PANNUKE_CLASSES, load_hgsc_nest_labels
from studio.errors import InputError, OutputError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tile():
    return load_hgsc_nest_labels()


@pytest.fixture(scope="module")
def crops():
    """Six real 256x256 crops from the middle of the tile (several classes present)."""
    all_crops = hgsc_nest_crops(256)
    chosen = all_crops[6:12]
    classes = set(np.unique(np.concatenate([c.cls.ravel() for c in chosen])).tolist())
    assert {1, 2, 3} <= classes, classes  # the round trips below exercise every tile class
    return chosen


def assert_same(a: NucleiSample, b: NucleiSample) -> None:
    assert a.image.dtype == b.image.dtype == np.uint8
    assert a.inst.dtype == b.inst.dtype == np.int32
    assert a.cls.dtype == b.cls.dtype == np.uint8
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.inst, b.inst)
    assert np.array_equal(a.cls, b.cls)


def assert_memmapped(arr: np.ndarray) -> None:
    assert isinstance(arr, np.memmap) or isinstance(getattr(arr, "base", None), np.memmap)


def listing(path):
    return sorted(os.listdir(path))


# --------------------------------------------------------------------------- crops
def test_crop_counts_for_grid_strides(tile):
    image, inst, cls = tile
    assert image.shape == (1500, 1500, 3)
    assert len(crop_grid(image, inst, cls, 256)) == 25  # origins 0..1024 step 256 -> 5 x 5
    assert len(crop_grid(image, inst, cls, 256, 128)) == 100  # 0..1152 step 128 -> 10 x 10
    assert len(crop_grid(image, inst, cls, 256, 200)) == 49  # 0..1200 step 200 -> 7 x 7
    assert len(crop_grid(image, inst, cls, 256, cover_edges=True)) == 36  # + a row/col at 1244
    origins = {(c.meta["y"], c.meta["x"]) for c in crop_grid(image, inst, cls, 256, cover_edges=True)}
    assert (1244, 1244) in origins and (1024, 0) in origins


def test_crop_ids_contiguous_and_classes_inside_instances(tile):
    image, inst, cls = tile
    for crop in crop_grid(image, inst, cls, 256, 192):
        y, x = crop.meta["y"], crop.meta["x"]
        ids = np.unique(crop.inst)
        assert ids[0] == 0 and np.array_equal(ids, np.arange(ids.size)), "ids must be 0..n"
        assert not (crop.cls[crop.inst == 0]).any(), "class pixels outside instances"
        assert (crop.cls[crop.inst > 0] > 0).all()
        validate_labels(crop.inst, crop.cls, crop.image.shape, 5, crop.meta["name"])
        # Relabelling is a bijection of the window's original ids (border nuclei kept).
        orig = inst[y : y + 256, x : x + 256]
        pairs = np.unique(orig.astype(np.int64) * 100_000 + crop.inst)
        assert pairs.size == ids.size == np.unique(orig).size
        assert np.array_equal(crop.image, image[y : y + 256, x : x + 256])
        assert np.array_equal(crop.cls, cls[y : y + 256, x : x + 256])
    # A nucleus crossing the border stays in both crops, clipped.
    left = crop_grid(image, inst, cls, 256, region=(512, 513, 0, 1))[0]
    right = crop_grid(image, inst, cls, 256, region=(512, 513, 256, 257))[0]
    crossing = np.intersect1d(inst[512:768, 255], inst[512:768, 256])
    crossing = crossing[crossing > 0]
    assert crossing.size > 0
    for nucleus in crossing:
        in_left = inst[512:768, 0:256] == nucleus
        in_right = inst[512:768, 256:512] == nucleus
        assert (left.inst[in_left] > 0).all() and (right.inst[in_right] > 0).all()
        assert np.unique(left.inst[in_left]).size == 1 and np.unique(right.inst[in_right]).size == 1


def test_relabel_without_background():
    inst = np.array([[7, 7], [9, 9]], dtype=np.int32)
    assert np.array_equal(relabel_contiguous(inst), [[1, 1], [2, 2]])


def test_region_selection_splits_by_origin():
    top = hgsc_nest_dataset(region=(0, 512, 0, 1500))
    bottom = hgsc_nest_dataset(region=(512, 1500, 0, 1500))
    assert len(top) == 10 and len(bottom) == 15
    assert all(top.read(i).meta["y"] < 512 for i in range(len(top)))
    assert all(bottom.read(i).meta["y"] >= 512 for i in range(len(bottom)))
    names = {top.read(i).meta["name"] for i in range(len(top))} | {
        bottom.read(i).meta["name"] for i in range(len(bottom))
    }
    assert len(names) == 25
    box = hgsc_nest_dataset(region=(256, 257, 512, 769))
    origins = [(box.read(i).meta["y"], box.read(i).meta["x"]) for i in range(len(box))]
    assert origins == [(256, 512), (256, 768)]
    with pytest.raises(InputError, match="holds no crop"):
        hgsc_nest_dataset(region=(1400, 1500, 0, 1500))


def test_min_tissue_drops_glass(tile):
    image, inst, cls = tile
    glass = np.array(image)
    glass[:256, :256] = 245  # bright empty glass
    inst2 = np.array(inst)
    inst2[:256, :256] = 0
    cls2 = np.array(cls)
    cls2[:256, :256] = 0
    kept = crop_grid(glass, inst2, cls2, 256, min_tissue=0.5)
    origins = {(c.meta["y"], c.meta["x"]) for c in kept}
    assert (0, 0) not in origins and (0, 256) in origins


def test_hgsc_dataset_meta_and_classes():
    ds = hgsc_nest_dataset()
    s = ds.read(0)
    assert ds.classes == PANNUKE_CLASSES and ds.num_classes == 5
    assert s.meta["source"] == "real" and s.meta["tissue"] == "Ovarian"
    assert (s.meta["y"], s.meta["x"]) == (0, 0)
    assert s.meta["index"] == 0 and ds.read(-1).meta["index"] == 24
    with pytest.raises(IndexError):
        ds.read(25)


# --------------------------------------------------------------------------- PanNuke
def test_pannuke_round_trip_bit_identical(tmp_path, crops):
    out = write_pannuke(tmp_path / "fold1", crops)
    assert listing(out) == ["images.npy", "manifest.csv", "masks.npy", "types.npy"]
    assert listing(tmp_path) == ["fold1"]  # no temporary folder left behind
    ds = PanNukeDataset(out)
    assert len(ds) == len(crops)
    assert_memmapped(ds.images)
    assert_memmapped(ds.masks)
    assert ds.images.dtype == np.uint8 and ds.masks.dtype == np.float64
    assert ds.types.dtype.kind == "U" and list(ds.types) == ["Ovarian"] * len(crops)
    for i, crop in enumerate(crops):
        got = ds.read(i)
        assert_same(got, crop)
        assert got.meta["name"] == crop.meta["name"]
        assert got.meta["source"] == "real" and got.meta["tissue"] == "Ovarian"
        assert (got.meta["y"], got.meta["x"]) == (crop.meta["y"], crop.meta["x"])
        masks = np.asarray(ds.masks[i])
        # Channel 5 is background: 1 off nuclei, 0 on nuclei; channel c-1 holds class c.
        assert np.array_equal(masks[..., 5], (crop.inst == 0).astype(np.float64))
        for code in range(1, 6):
            assert np.array_equal(masks[..., code - 1], np.where(crop.cls == code, crop.inst, 0))
    # DataLoader workers get the dataset pickled: the memory maps are reopened, not copied.
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000
    assert_same(clone.read(2), crops[2])
    assert detect_layout(out) == "pannuke"
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 256, 256)
    assert item["inst"].dtype == torch.int64 and item["cls"].dtype == torch.int64
    assert float(item["image"].max()) <= 1.0


def test_pannuke_release_dtypes_and_nested_layout(tmp_path, crops):
    """The official download: float64 images, nested images/fold1 + masks/fold1 folders."""
    flat = write_pannuke(tmp_path / "flat", crops[:2], mask_dtype=np.int32)
    assert np.load(flat / "masks.npy", mmap_mode="r").dtype == np.int32
    nested = tmp_path / "Fold 1"
    (nested / "images" / "fold1").mkdir(parents=True)
    (nested / "masks" / "fold1").mkdir(parents=True)
    images = np.load(flat / "images.npy").astype(np.float64)
    np.save(nested / "images" / "fold1" / "images.npy", images)
    shutil.copy(flat / "types.npy", nested / "images" / "fold1" / "types.npy")
    np.save(nested / "masks" / "fold1" / "masks.npy", np.load(flat / "masks.npy").astype(np.float64))
    assert detect_layout(nested) == "pannuke"
    ds = open_dataset(nested)
    assert isinstance(ds, PanNukeDataset) and len(ds) == 2
    assert ds.images.dtype == np.float64
    for i in range(2):
        assert_same(ds.read(i), crops[i])
        assert ds.read(i).meta["source"] == "real" and ds.read(i).meta["name"].startswith("Fold_1_")


def test_pannuke_conversion_keeps_ids_and_repairs_release_quirks(tile):
    _, inst, cls = tile
    win_inst, win_cls = np.array(inst[300:556, 300:556]), np.array(cls[300:556, 300:556])
    assert win_inst.max() > 256  # original, non-contiguous tile ids
    masks = labels_to_masks(win_inst, win_cls)
    back_inst, back_cls = masks_to_labels(masks)
    assert np.array_equal(back_inst, win_inst) and np.array_equal(back_cls, win_cls)
    # Same id in two channels (seen in re-packaged PanNuke): the later channel gets a new id.
    quirky = np.zeros((8, 8, 6))
    quirky[:2, :2, 0] = 3
    quirky[5:, 5:, 1] = 3
    q_inst, q_cls = masks_to_labels(quirky)
    assert set(np.unique(q_inst)) == {0, 3, 4}
    assert q_cls[0, 0] == 1 and q_cls[6, 6] == 2 and q_inst[6, 6] == 4
    with pytest.raises(InputError, match="class 0"):
        labels_to_masks(np.array([[1]]), np.array([[0]]))


# --------------------------------------------------------------------------- CoNIC
def counts_like_the_challenge(inst, cls):
    """Independent re-implementation of CoNIC's counting (central 224x224, per class)."""
    ci, cc = inst[16:240, 16:240], cls[16:240, 16:240]
    return [len(np.setdiff1d(np.unique(ci * (cc == c)), [0])) for c in range(1, 7)]


def test_conic_round_trip_and_counts(tmp_path, crops):
    conic = [NucleiSample(c.image, c.inst, pannuke_to_conic(c.cls), c.meta) for c in crops]
    out = write_conic(tmp_path / "conic", conic)
    assert listing(out) == ["counts.csv", "images.npy", "labels.npy", "manifest.csv", "patch_info.csv"]
    assert detect_layout(out) == "conic"
    ds = CoNICDataset(out)
    assert ds.classes == CONIC_CLASSES
    assert_memmapped(ds.images)
    assert_memmapped(ds.labels)
    assert ds.labels.dtype == np.uint16 and ds.labels.shape == (len(crops), 256, 256, 2)
    with open(out / "counts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COUNT_COLUMNS
    for i, sample in enumerate(conic):
        got = ds.read(i)
        assert_same(got, sample)
        assert got.meta["name"] == sample.meta["name"] and got.meta["source"] == "real"
        lab = np.asarray(ds.labels[i])
        expected = counts_like_the_challenge(lab[..., 0], lab[..., 1])
        assert [int(rows[i][c]) for c in COUNT_COLUMNS] == expected
        assert conic_counts(got.inst, got.cls).tolist() == expected
    assert sum(sum(counts_like_the_challenge(s.inst, s.cls)) for s in conic) > 20


def test_conic_counts_that_do_not_match_labels(tmp_path, crops):
    conic = [NucleiSample(c.image, c.inst, pannuke_to_conic(c.cls), c.meta) for c in crops[:2]]
    out = write_conic(tmp_path / "conic", conic)
    text = (out / "counts.csv").read_text().splitlines()
    first = [int(v) for v in text[1].split(",")]
    first[0] += 1
    text[1] = ",".join(map(str, first))
    (out / "counts.csv").write_text("\n".join(text) + "\n")
    ds = CoNICDataset(out)
    with pytest.raises(InputError, match=r"counts\.csv.*do not match"):
        ds.read(0)
    ds.read(1)
    assert CoNICDataset(out, verify_counts=False).read(0).meta["index"] == 0
    (out / "counts.csv").write_text("neutrophil,epithelial\n1,2\n3,4\n")
    with pytest.raises(InputError, match=r"counts\.csv.*lacks column"):
        CoNICDataset(out)


def test_conic_class_outside_range(tmp_path, crops):
    conic = [NucleiSample(c.image, c.inst, pannuke_to_conic(c.cls), c.meta) for c in crops[:2]]
    out = write_conic(tmp_path / "conic", conic)
    labels = np.load(out / "labels.npy")
    labels[1, ..., 1][labels[1, ..., 0] == labels[1, ..., 0].max()] = 9
    np.save(out / "labels.npy", labels)
    ds = CoNICDataset(out, verify_counts=False)
    with pytest.raises(InputError, match=r"labels\.npy\[1\].*class 9 outside the range 0\.\.6"):
        ds.read(1)


# --------------------------------------------------------------------------- folder
def test_folder_round_trip(tmp_path, crops):
    out = write_folder(tmp_path / "tiles", crops)
    assert listing(out) == ["classes.json", "images", "labels", "manifest.csv"]
    assert listing(out / "labels") == sorted(f"{c.meta['name']}.npy" for c in crops)
    ds = FolderDataset(out)
    assert ds.classes == PANNUKE_CLASSES
    by_name = {c.meta["name"]: c for c in crops}
    assert ds.names == sorted(by_name)
    for i in range(len(ds)):
        got = ds.read(i)
        want = by_name[got.meta["name"]]
        assert_same(got, want)
        assert got.meta["source"] == "real" and got.meta["tissue"] == "Ovarian"
        assert (got.meta["y"], got.meta["x"]) == (want.meta["y"], want.meta["x"])  # ints again
        lab = np.load(out / "labels" / f"{got.meta['name']}.npy")
        assert lab.dtype == np.int32 and lab.shape == (256, 256, 2)


def test_folder_tif_labels_and_synthetic_source(tmp_path, crops):
    synthetic = [NucleiSample(c.image, c.inst, c.cls, {"name": f"phantom_{i}", "seed": i})
                 for i, c in enumerate(crops[:2])]
    out = write_folder(tmp_path / "tiles", synthetic, source="synthetic", label_format="tif")
    ds = open_dataset(out)
    assert isinstance(ds, FolderDataset)
    for i in range(2):
        got = ds.read(i)
        assert_same(got, synthetic[i])
        assert got.meta["source"] == "synthetic" and got.meta["seed"] == i


def test_folder_missing_label_and_shape_mismatch(tmp_path, crops):
    out = write_folder(tmp_path / "tiles", crops[:3])
    victim = crops[1].meta["name"]
    (out / "labels" / f"{victim}.npy").unlink()
    with pytest.raises(InputError, match=rf"labels.*no labels for 1 image.*{victim}\.npy"):
        FolderDataset(out)
    small = np.zeros((100, 120, 2), dtype=np.int32)
    np.save(out / "labels" / f"{victim}.npy", small)
    ds = FolderDataset(out)
    with pytest.raises(InputError, match=rf"{victim}\.npy: labels are 100x120 but image .* is 256x256"):
        ds.read(1)


def test_folder_class_outside_table(tmp_path, crops):
    out = write_folder(tmp_path / "tiles", crops[:1])
    (out / "classes.json").write_text('{"1": "neoplastic", "2": "inflammatory"}')
    name = crops[0].meta["name"]
    with pytest.raises(InputError, match=rf"{name}\.npy: class 3 outside the range 0\.\.2"):
        FolderDataset(out).read(0)


# --------------------------------------------------------------------------- bad input
@pytest.fixture()
def fold(tmp_path, crops):
    return write_pannuke(tmp_path / "fold", crops[:3])


def test_truncated_images_npy(fold):
    path = fold / "images.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"images\.npy: is truncated: \d+ bytes on disk"):
        PanNukeDataset(fold)


def test_corrupt_npy_header(fold):
    path = fold / "masks.npy"
    good = path.read_bytes()
    path.write_bytes(b"not a numpy file" + good[16:])
    with pytest.raises(InputError, match=r"masks\.npy: is not a valid \.npy file"):
        PanNukeDataset(fold)
    header_end = good.index(b"\n")
    garbled = good[:12] + b"{'descr': ?!" + good[24:header_end] + good[header_end:]
    path.write_bytes(garbled)
    with pytest.raises(InputError, match=r"masks\.npy: is not a valid \.npy file"):
        PanNukeDataset(fold)


def test_masks_with_wrong_channels_or_shape(fold):
    masks = np.load(fold / "masks.npy")
    np.save(fold / "masks.npy", masks[..., :5])
    with pytest.raises(InputError, match=r"masks\.npy: has 5 channels; PanNuke masks have 6"):
        PanNukeDataset(fold)
    np.save(fold / "masks.npy", masks[..., 0])
    with pytest.raises(InputError, match=r"masks\.npy: has shape \(3, 256, 256\); expected \(N, H, W, 6\)"):
        PanNukeDataset(fold)
    np.save(fold / "masks.npy", masks[:, :128])
    with pytest.raises(InputError, match=r"masks\.npy: tiles are 128x256 but images are 256x256"):
        PanNukeDataset(fold)


def test_sample_count_mismatch(fold):
    np.save(fold / "masks.npy", np.load(fold / "masks.npy")[:2])
    with pytest.raises(InputError, match=r"masks\.npy: has 2 samples but images\.npy has 3"):
        PanNukeDataset(fold)


def test_pickled_object_npy_is_refused(fold):
    np.save(fold / "types.npy", np.array(["Ovarian", 1, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"types\.npy: holds pickled Python objects"):
        PanNukeDataset(fold)


def test_non_integer_mask_ids(fold):
    masks = np.load(fold / "masks.npy")
    masks[0, 0, 0, 0] = 1.5
    np.save(fold / "masks.npy", masks)
    with pytest.raises(InputError, match=r"masks\.npy\[0\]: mask holds non-integer instance ids"):
        PanNukeDataset(fold).read(0)


def test_no_layout_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"no known dataset layout; looked for images\.npy.*found notes"):
        open_dataset(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        detect_layout(tmp_path / "missing")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "images.npy", np.zeros((1, 4, 4, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros((1, 4, 4, 2), np.uint16))
    with pytest.raises(InputError, match=r"matches several layouts \['conic', 'folder'\]"):
        detect_layout(tmp_path)
    assert isinstance(open_dataset(tmp_path, layout="conic"), CoNICDataset)


def test_failed_write_leaves_nothing(tmp_path, crops, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # images.npy written, masks.npy fails: disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", flaky_save)
    for writer in (write_pannuke, write_conic):
        calls["n"] = 0
        with pytest.raises(OutputError, match="disk full"):
            writer(tmp_path / "out", crops[:2])
        assert listing(tmp_path) == []  # neither the dataset nor a temporary folder remains
    monkeypatch.undo()
    # Invalid labels found half-way: nothing is written either.
    bad = NucleiSample(crops[1].image, crops[1].inst, crops[1].cls.copy(), dict(crops[1].meta))
    nucleus = bad.inst == bad.inst.max()
    bad.cls[np.argwhere(nucleus)[0][0], np.argwhere(nucleus)[0][1]] = 1 if bad.cls[nucleus][0] != 1 else 2
    with pytest.raises(InputError, match="several classes"):
        write_folder(tmp_path / "out", [crops[0], bad])
    assert listing(tmp_path) == []


def test_existing_target_needs_overwrite(tmp_path, crops):
    out = write_pannuke(tmp_path / "fold", crops[:1])
    with pytest.raises(OutputError, match="already exists"):
        write_pannuke(out, crops[:2])
    write_pannuke(out, crops[:2], overwrite=True)
    assert len(PanNukeDataset(out)) == 2 and listing(tmp_path) == ["fold"]


def test_writers_need_a_source(tmp_path, crops):
    anonymous = [NucleiSample(c.image, c.inst, c.cls, {"name": "x"}) for c in crops[:1]]
    with pytest.raises(InputError, match="no 'source'"):
        write_pannuke(tmp_path / "fold", anonymous)
    write_pannuke(tmp_path / "fold", anonymous, source="synthetic")
    assert PanNukeDataset(tmp_path / "fold").read(0).meta["source"] == "synthetic"


def test_validate_labels_rules():
    img = (4, 4, 3)
    inst = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]], dtype=np.int64)
    cls = np.where(inst == 1, 1, np.where(inst == 2, 3, 0))
    out_inst, out_cls = validate_labels(inst, cls, img, 5, "t")
    assert out_inst.dtype == np.int32 and out_cls.dtype == np.uint8
    with pytest.raises(InputError, match="t: instance 1 has pixels of several classes"):
        bad = cls.copy()
        bad[1, 1] = 2
        validate_labels(inst, bad, img, 5, "t")
    with pytest.raises(InputError, match="background pixel"):
        bad = cls.copy()
        bad[3, 3] = 1
        validate_labels(inst, bad, img, 5, "t")
    with pytest.raises(InputError, match="negative id"):
        validate_labels(-inst, cls, img, 5, "t")
    with pytest.raises(InputError, match="class 3 outside the range 0..2"):
        validate_labels(inst, cls, img, 2, "t")
    with pytest.raises(InputError, match="is 4x4 but the image is 5x4"):
        validate_labels(inst, cls, (5, 4, 3), 5, "t")
    with pytest.raises(InputError, match="expected integers"):
        validate_labels(inst.astype(np.float32), cls, img, 5, "t")


# --------------------------------------------------------------------------- torch
def test_dataloader_batches_with_meta():
    real = hgsc_nest_dataset(region=(0, 512, 0, 1500))
    loader = DataLoader(real, batch_size=4, shuffle=False, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 256, 256) and batch["image"].dtype == torch.float32
    assert batch["inst"].shape == (4, 256, 256) and batch["inst"].dtype == torch.int64
    assert batch["cls"].shape == (4, 256, 256) and batch["cls"].dtype == torch.int64
    assert [m["index"] for m in batch["meta"]] == [0, 1, 2, 3]
    assert all(m["source"] == "real" for m in batch["meta"])
    assert sum(len(b["meta"]) for b in loader) == len(real) == 10


def test_concat_keeps_source_and_mixes_by_proportion():
    real = hgsc_nest_dataset(region=(0, 512, 0, 1500))
    fake = ArrayNucleiDataset(
        [NucleiSample(255 - s.image, s.inst, s.cls, {"name": f"phantom_{i}"})
         for i, s in enumerate(hgsc_nest_crops(256)[:3])],
        PANNUKE_CLASSES, name="phantoms", source="synthetic",
    )
    mixed = ConcatNucleiDataset([real, fake])
    assert len(mixed) == 13 and mixed.read(10).meta["source"] == "synthetic"
    assert mixed.sources().count("synthetic") == 3
    batch = collate([mixed[8], mixed[9], mixed[10], mixed[12]])
    assert [m["source"] for m in batch["meta"]] == ["real", "real", "synthetic", "synthetic"]
    weights = mixed.sampling_weights([0.5, 0.5])
    assert torch.isclose(weights[:10].sum(), torch.tensor(0.5, dtype=torch.float64))
    sampler = WeightedRandomSampler(weights, 400, generator=torch.Generator().manual_seed(0))
    share = np.mean([i >= 10 for i in sampler])
    assert 0.4 < share < 0.6  # 3 synthetic tiles drawn as often as 10 real ones
    conic_like = ArrayNucleiDataset([], CONIC_CLASSES)
    with pytest.raises(InputError, match="class table"):
        ConcatNucleiDataset([real, conic_like])
    with pytest.raises(InputError, match="no 'source'"):
        ArrayNucleiDataset([NucleiSample(fake.read(0).image, fake.read(0).inst, fake.read(0).cls, {})],
                           PANNUKE_CLASSES)


def test_collate_refuses_mixed_sizes():
    a = hgsc_nest_dataset(size=128, region=(0, 1, 0, 1))[0]
    b = hgsc_nest_dataset(size=256, region=(0, 1, 0, 1))[0]
    with pytest.raises(InputError, match="differ in shape"):
        collate([a, b])

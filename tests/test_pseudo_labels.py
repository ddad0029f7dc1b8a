"""Self-training pieces: the teacher's agreement filter, its precision on phantoms with known
truth, the ignore channel through the folder layout and the loss, and the new augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.data.base import NucleiSample
from studio.errors import InputError
from studio.metrics import best_match
from training.pseudo_labels import (
    PseudoLabelConfig,
    dihedral,
    filter_confident,
    pseudo_label,
    pseudo_label_precision,
    pseudo_tiles,
    undo_dihedral,
)


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def label_map(shape, discs):
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(discs, start=1):
        inst[disc(shape, cy, cx, r)] = i
    return inst


def test_best_iou_matches_by_overlap():
    ref = label_map((40, 40), [(10, 10, 4), (30, 30, 4)])
    other = label_map((40, 40), [(30, 31, 4), (10, 25, 3)])  # id 1 overlaps ref 2; nothing near ref 1
    iou, match = best_match(ref, other)
    assert iou[0] == 0.0
    assert 0.6 < iou[1] < 1.0 and match[1] == 1
    same, _ = best_match(ref, ref)
    np.testing.assert_allclose(same, 1.0)
    gappy = np.where(ref == 2, 5, ref)  # ids need not be contiguous: absent ids read 0
    iou, match = best_match(gappy, other)
    assert iou.shape == (5,) and iou[4] > 0.6 and match[4] == 1
    assert not iou[1:4].any()


def test_dihedral_round_trip():
    a = np.arange(12).reshape(3, 4)
    for k in range(4):
        for flip in (False, True):
            np.testing.assert_array_equal(undo_dihedral(dihedral(a, k, flip), k, flip), a)


def test_filter_keeps_agreed_nuclei_and_marks_the_rest_unknown():
    shape = (48, 48)
    steady, flicker = (12, 12, 5), (34, 34, 5)
    ref = label_map(shape, [steady, flicker])
    cls_ref = np.where(ref > 0, 1, 0).astype(np.uint8)
    views = [("plain", ref, cls_ref)]
    for j in range(9):
        inst = label_map(shape, [steady] if j < 7 else [steady, flicker])  # flicker: 2 of 9 views
        views.append((f"v{j}", inst, np.where(inst > 0, 3, 0).astype(np.uint8)))
    out = filter_confident(views, PseudoLabelConfig(min_agreement=0.8), num_classes=5)
    assert out.stats["candidates"] == 2 and out.stats["kept"] == 1
    assert int(out.inst.max()) == 1 and out.inst[12, 12] == 1
    assert out.cls[12, 12] == 3  # majority class over the views (9 votes for 3, 1 for 1)
    assert out.ignore[34, 34] and out.inst[34, 34] == 0  # rejected nucleus: unknown, not background
    assert not out.ignore[2, 45]  # no view saw a nucleus there: confident background
    assert not out.ignore[out.inst > 0].any()
    assert out.agreement == {1: 1.0}


def test_kept_pseudo_labels_are_more_precise_than_all_candidates_on_phantoms():
    """Phantom tiles with exact truth, degraded as a scanner would: the agreement filter keeps
    nuclei that are right more often than the teacher's raw output is (reported)."""
    from pipelines.segmenter import NucleiSegmenter
    from studio.data.phantom_dataset import phantom_samples
    from studio.info import checkpoints_dir
    from studio.scanner import scanner_degrade

    seg = NucleiSegmenter.from_pretrained(checkpoints_dir() / "nuclei-segmenter")  # the shipped local folder
    kept = cand = kept_ok = cand_ok = 0
    for s in phantom_samples(2, seed=800_000, size=256, tissue="crowded"):
        image = scanner_degrade(s.image, np.random.default_rng(0), blur=1.5, noise=6, quality=50)
        labels = pseudo_label(seg, image, PseudoLabelConfig(stain_views=1, scales=(0.9,)))
        candidates, _, _ = seg.segment(image)
        p = pseudo_label_precision(labels, s.inst, candidates)
        kept, cand = kept + p["kept"], cand + p["candidates"]
        kept_ok += round(p["precision_kept"] * p["kept"])
        cand_ok += round(p["precision_candidates"] * p["candidates"])
        assert labels.ignore.mean() < 0.2
    precision_kept, precision_candidates = kept_ok / kept, cand_ok / cand
    print(f"pseudo-label precision kept {precision_kept:.3f} ({kept}) "
          f"vs candidates {precision_candidates:.3f} ({cand})")
    assert precision_kept >= precision_candidates
    assert precision_kept >= 0.95
    assert kept >= 0.8 * cand


def test_pseudo_label_refuses_bad_input():
    class Fake:
        mpp, num_classes = 0.5, 5

        def segment(self, image, **kw):  # pragma: no cover - never reached
            raise AssertionError
    with pytest.raises(InputError, match="uint8"):
        pseudo_label(Fake(), np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="min_agreement"):
        pseudo_label(Fake(), np.zeros((8, 8, 3), np.uint8), PseudoLabelConfig(min_agreement=0))


def test_ignore_channel_round_trips_through_the_folder_layout(tmp_path):
    from studio.data.folder import FolderDataset, write_folder
    from training.pseudo_labels import PseudoLabels

    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)
    inst = label_map((64, 64), [(20, 20, 6)])
    ignore = disc((64, 64), 45, 45, 6)
    labels = PseudoLabels(inst, np.where(inst > 0, 2, 0).astype(np.uint8), ignore)
    tiles = pseudo_tiles("img", image, labels, tile=64, stride=64, min_tissue=0.0, provenance={"teacher": "t"})
    write_folder(tmp_path / "pl", tiles)
    back = FolderDataset(tmp_path / "pl").read(0)
    assert back.meta["source"] == "pseudo" and back.meta["teacher"] == "t"
    np.testing.assert_array_equal(back.ignore, ignore)
    np.testing.assert_array_equal(back.inst, inst)
    plain = NucleiSample(image, inst, labels.cls, {"source": "real"})
    write_folder(tmp_path / "plain", [plain])
    assert FolderDataset(tmp_path / "plain").read(0).ignore is None


def test_loss_leaves_unknown_pixels_out():
    from pipelines.segmenter import HoVerNetLite
    from studio.nuclei import hv_targets
    from training.segmenter import SegmenterConfig, hovernet_loss

    torch.manual_seed(0)
    model = HoVerNetLite(num_classes=5, widths=(8, 16, 32), depth=1)
    x = torch.rand(2, 3, 32, 32)
    inst = np.stack([label_map((32, 32), [(8, 8, 4)]), label_map((32, 32), [(24, 24, 5)])])
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, 16:, 16:] = False

    def batch(inst):
        return {"np": torch.from_numpy((inst > 0).astype(np.int64)),
                "hv": torch.from_numpy(np.stack([hv_targets(i) for i in inst])),
                "tp": torch.from_numpy((inst > 0).astype(np.int64) * 2), "valid": valid}

    cfg = SegmenterConfig()
    out = model(x)
    a, _ = hovernet_loss(out, batch(inst), cfg)
    changed = inst.copy()
    changed[1][16:, 16:] = 0  # the second nucleus sits in the unknown square: erase it from the labels
    b, _ = hovernet_loss(out, batch(changed), cfg)
    assert torch.allclose(a, b, atol=1e-5)
    plain, _ = hovernet_loss(out, {k: v for k, v in batch(inst).items() if k != "valid"}, cfg)
    everything = dict(batch(inst), valid=torch.ones_like(valid))
    c, _ = hovernet_loss(out, everything, cfg)
    assert torch.allclose(plain, c, atol=1e-5)  # all-valid mask == the unmasked loss


def test_sampler_scale_jitter_and_degradation_are_deterministic_and_keep_labels_valid():
    from studio.data.base import ArrayNucleiDataset
    from studio.data.phantom_dataset import phantom_samples
    from studio.data.samples import PANNUKE_CLASSES
    from training.segmenter import BatchSampler

    data = ArrayNucleiDataset(phantom_samples(2, seed=5, size=256), PANNUKE_CLASSES, name="phantom")
    p = np.full(len(data), 1 / len(data))
    sampler = BatchSampler(data, p, 96, seed=3, scale_jitter=(0.4, 0.6), degrade=1.0, mpp=0.5)
    a, b = sampler.batch(0, 4), sampler.batch(0, 4)
    torch.testing.assert_close(a["image"], b["image"])
    assert a["image"].shape == (4, 3, 96, 96) and a["np"].shape == (4, 96, 96)
    assert set(np.unique(a["tp"].numpy())) <= set(range(6))
    assert ((a["tp"] > 0) <= (a["np"] > 0)).all()
    plain = BatchSampler(data, p, 96, seed=3).batch(0, 4)
    assert not torch.equal(plain["image"], a["image"])
    with pytest.raises(InputError, match="scale_jitter"):
        BatchSampler(data, p, 96, scale_jitter=(0.6, 0.4))
    with pytest.raises(InputError, match="degrade"):
        BatchSampler(data, p, 96, degrade=2.0)

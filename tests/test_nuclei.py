"""HV targets, HoVer-Net post-processing, the classical baseline and label validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.data.crops import hgsc_nest_dataset
from studio.data.phantom import make_phantom
from studio.errors import InputError
from studio.metrics import multi_pq_plus, pair_instances, panoptic_quality
from studio.nuclei import (
    PostprocessConfig,
    hovernet_postprocess,
    hv_targets,
    instance_types,
    relabel_sequential,
    sobel_kernel,
    threshold_watershed_baseline,
    validate_label_maps,
)

torch.set_num_threads(1)


def disk(shape, cy, cx, r):
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def perfect_maps(inst, cls, num_classes=5):
    tp = np.stack([(cls == c) for c in range(num_classes + 1)]).astype(np.float32)
    return (inst > 0).astype(np.float32), hv_targets(inst), tp


@pytest.fixture(scope="module")
def hgsc_crop():
    # a 256x256 crop of the shipped real labels with many touching nuclei
    s = hgsc_nest_dataset(256, 256, region=(0, 1, 0, 1)).read(0)
    return s.image, relabel_sequential(s.inst), s.cls


# --------------------------------------------------------------------------- HV targets
def test_hv_targets_on_a_disk():
    inst = disk((41, 41), 20, 20, 9).astype(np.int32) * 7
    hv = hv_targets(inst)
    assert hv.shape == (2, 41, 41) and hv.dtype == np.float32
    assert hv.min() == -1.0 and hv.max() == 1.0
    assert np.all(hv[:, inst == 0] == 0)
    h, v = hv
    # horizontal: negative left of the centre, positive right, 0 on the centre column
    assert np.all(h[20, 11:20] < 0) and np.all(h[20, 21:30] > 0) and np.all(h[:, 20] == 0)
    assert h[20, 11] == -1.0 and h[20, 29] == 1.0
    # vertical: the same along y, and antisymmetric about the centre
    assert np.all(v[11:20, 20] < 0) and np.all(v[21:30, 20] > 0)
    np.testing.assert_allclose(v, -v[::-1], atol=1e-6)
    np.testing.assert_allclose(h, v.T, atol=1e-6)


def test_hv_targets_are_per_instance():
    a = disk((30, 60), 15, 15, 8)
    b = disk((30, 60), 15, 45, 5)
    inst = a * 3 + b * 9
    hv = hv_targets(inst.astype(np.int32))
    for m in (a, b):  # each nucleus spans the full range on its own
        assert hv[0][m].min() == -1.0 and hv[0][m].max() == 1.0
    with pytest.raises(InputError, match="integer"):
        hv_targets(inst.astype(np.float32))


def test_sobel_kernel_matches_opencv():
    smooth, deriv = sobel_kernel(5)
    np.testing.assert_array_equal(smooth, [1, 4, 6, 4, 1])
    np.testing.assert_array_equal(deriv, [-1, -2, 0, 2, 1])
    with pytest.raises(InputError):
        sobel_kernel(4)


# --------------------------------------------------------------------------- post-processing
def test_postprocess_recovers_real_nuclei_from_perfect_maps(hgsc_crop):
    _, inst, cls = hgsc_crop
    np_prob, hv, tp = perfect_maps(inst, cls)
    pred, pred_cls = hovernet_postprocess(np_prob, hv, tp, PostprocessConfig.for_mpp(0.5))
    assert pred.dtype == np.int32 and pred_cls.dtype == np.uint8
    n = int(pred.max())
    assert set(np.unique(pred)) == set(range(n + 1))  # contiguous ids
    pq = panoptic_quality(inst, pred)
    assert pq["pq"] > 0.9, pq
    # every matched nucleus gets its true class
    pairs = pair_instances(inst, pred).pairs
    true_cls = {int(i): int(cls[inst == i][0]) for i in pairs[:, 0]}
    pred_of = {int(p): int(pred_cls[pred == p][0]) for p in pairs[:, 1]}
    assert all(true_cls[t] == pred_of[p] for t, p in pairs)
    mpq = multi_pq_plus([inst], [cls], [pred], [pred_cls], 5)
    present = [c - 1 for c in np.unique(cls) if c]
    assert np.all(mpq["pq"][present] > 0.85), mpq["pq"]


def test_postprocess_separates_touching_nuclei():
    shape = (40, 70)
    a, b = disk(shape, 20, 24, 11), disk(shape, 20, 44, 11)
    assert (a & b).any()  # they overlap: one connected foreground blob
    yy, xx = np.indices(shape)
    inst = np.where(a | b, np.where(xx < 34, 1, 2), 0).astype(np.int32)
    np_prob, hv, _ = perfect_maps(inst, np.zeros_like(inst))
    pred, pred_cls = hovernet_postprocess(np_prob, hv)
    assert pred.max() == 2 and not pred_cls.any()
    assert panoptic_quality(inst, pred)["pq"] > 0.9
    # the split runs where the HV maps flip sign, between the two centres
    assert set(np.unique(pred[20, 28:40])) == {1, 2}


def test_postprocess_edge_cases_and_errors():
    empty, cls = hovernet_postprocess(np.zeros((20, 20)), np.zeros((2, 20, 20)))
    assert empty.shape == (20, 20) and not empty.any() and not cls.any()
    with pytest.raises(InputError, match="hv"):
        hovernet_postprocess(np.zeros((20, 20)), np.zeros((2, 20, 21)))
    with pytest.raises(InputError, match="np_threshold"):
        hovernet_postprocess(np.zeros((20, 20)), np.zeros((2, 20, 20)), np_threshold=1.5)
    with pytest.raises(InputError, match="unknown options"):
        hovernet_postprocess(np.zeros((20, 20)), np.zeros((2, 20, 20)), threshold=0.5)


def test_instance_types_majority_vote():
    inst = np.zeros((4, 6), np.int32)
    inst[:, :3], inst[:, 3:] = 1, 2
    tp = np.zeros((3, 4, 6), np.float32)
    tp[0] = 1.0  # background everywhere ...
    tp[2, :1, :3] = 2.0  # ... except 3 of nucleus 1's 12 pixels vote class 2
    ids, types, probs = instance_types(inst, tp)
    assert ids.tolist() == [1, 2]
    assert types.tolist() == [2, 0]  # background wins only where nothing else voted
    np.testing.assert_allclose(probs, [0.25, 1.0])


# --------------------------------------------------------------------------- baseline
def test_baseline_on_phantom_tiles():
    # Measured (256 px, seeds 0-5, default preset): PQ 0.82-0.89, counts within 2 of the
    # truth. Bounds: PQ > 0.6, count within 20 %.
    for seed in (0, 1):
        tile = make_phantom(256, seed)
        inst, cls = threshold_watershed_baseline(tile.image)
        assert inst.dtype == np.int32 and not cls.any()
        n_true, n_pred = tile.layout.n_nuclei, int(inst.max())
        assert abs(n_pred - n_true) <= 0.2 * n_true, (n_pred, n_true)
        assert panoptic_quality(tile.instance_map, inst)["pq"] > 0.6


def test_baseline_on_real_pixels(hgsc_crop):
    # Measured on this real crop: PQ ~0.45 (a crowded carcinoma nest); bound 0.3.
    image, inst, _ = hgsc_crop
    pred, _ = threshold_watershed_baseline(image)
    assert panoptic_quality(inst, pred)["pq"] > 0.3
    blank, _ = threshold_watershed_baseline(np.full((64, 64, 3), 240, np.uint8))
    assert not blank.any()
    with pytest.raises(InputError, match="uint8"):
        threshold_watershed_baseline(np.zeros((64, 64), np.uint8))


# --------------------------------------------------------------------------- validation
def test_validate_label_maps():
    inst = np.zeros((8, 8), np.int64)
    inst[:2, :2], inst[4:, 4:] = 1, 5
    cls = np.where(inst > 0, 2, 0)
    with pytest.raises(InputError, match="not contiguous.*remap"):
        validate_label_maps(inst, cls, (8, 8, 3), 5, "truth.npy")
    fixed, c = validate_label_maps(inst, cls, (8, 8, 3), 5, "truth.npy", remap=True)
    assert fixed.dtype == np.int32 and c.dtype == np.uint8 and set(np.unique(fixed)) == {0, 1, 2}
    with pytest.raises(InputError, match=r"truth.npy: class 7 outside the range 0..5"):
        validate_label_maps(fixed, np.where(fixed > 0, 7, 0), (8, 8, 3), 5, "truth.npy")
    with pytest.raises(InputError, match="8x8 but the image is 8x9"):
        validate_label_maps(fixed, c, (8, 9, 3), 5, "truth.npy")


def test_unmarked_small_nuclei_are_rescued_at_20x():
    """A small nucleus (an apoptotic body, ~6 px across at 0.5 um/px) whose marker the energy
    threshold and the 3x3 opening erase is dropped by the reference post-processing and kept,
    as exactly one instance, when unmarked objects are rescued (the 20x default); where every
    object keeps a marker (touching nuclei) both give the same instances."""
    def run(inst, config):
        return hovernet_postprocess((inst > 0).astype(np.float32), hv_targets(inst), config=config)[0]

    reference_cfg, rescue_cfg = PostprocessConfig(marker_open=3), PostprocessConfig.for_mpp(0.5)
    assert rescue_cfg.rescue_unmarked and not PostprocessConfig.for_mpp(0.25).rescue_unmarked
    small = disk((64, 96), 30, 20, 3)
    alone = small.astype(np.int32)
    assert run(alone, reference_cfg).max() == 0  # lost: the reference rule
    rescued = run(alone, rescue_cfg)
    assert rescued.max() == 1 and (rescued[small] == 1).all() and (rescued[~small] == 0).all()
    faint = hovernet_postprocess(small * np.float32(0.6), hv_targets(alone), config=rescue_cfg)[0]
    assert faint.max() == 0  # a blob the network is unsure of (mean NP 0.6 < 0.7) stays out

    crowd = np.zeros((64, 96), np.int32)
    crowd[disk((64, 96), 32, 55, 12)] = 1
    crowd[disk((64, 96), 32, 78, 12) & (crowd == 0)] = 2
    crowd[small] = 3
    reference = run(crowd, reference_cfg)
    assert reference.max() == 3
    np.testing.assert_array_equal(run(crowd, rescue_cfg), reference)

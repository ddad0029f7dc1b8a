"""Tests of the classifier two-sample tests (studio.two_sample) and the held-out halves they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.data.splits import heldout_halves
from studio.errors import InputError
from studio.io import to_tensor, to_uint8
from studio.two_sample import (
    _splits,
    cnn_c2st,
    crops_of,
    feature_c2st,
    feature_names,
    grouped_folds,
    texture_features,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def halves():
    return heldout_halves(128)


def test_same_distribution_scores_near_chance_and_a_shift_is_found():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 6)), rng.normal(size=(80, 6))
    null = feature_c2st(a, b)
    assert abs(null.auc_mean - 0.5) < 0.12
    assert len(null.aucs) == 5 and null.auc_std > 0  # several seeds, a spread
    shifted = feature_c2st(a, b + np.r_[3.0, np.zeros(5)])  # AUC Phi(3 / sqrt 2) = 0.98
    assert shifted.auc_mean > 0.93


def test_a_group_never_lies_on_both_sides_of_a_split():
    groups_a = np.repeat(np.arange(6), 4)
    groups_b = np.repeat(np.arange(6), 3)  # the same blocks, as held-out halves share them
    joint = np.r_[groups_a, groups_b]
    for train, test in _splits(len(groups_a), len(groups_b), groups_a, groups_b, folds=2, seed=3):
        assert not set(joint[train]) & set(joint[test])
        assert len(train) + len(test) == len(joint)


def test_shared_groups_keep_neighbour_leakage_out_of_the_null():
    """A and B tiles of one block share that block's look; splitting the block across
    train / test would teach 'this block is A' and score far below chance."""
    rng = np.random.default_rng(1)
    blocks = rng.normal(scale=3.0, size=(12, 4))
    ga, gb = np.repeat(np.arange(12), 3), np.repeat(np.arange(12), 3)
    a = blocks[ga] + rng.normal(size=(36, 4))
    b = blocks[gb] + rng.normal(size=(36, 4))
    grouped = feature_c2st(a, b, ga, gb, seeds=range(10))
    assert abs(grouped.auc_mean - 0.5) < 0.15


def test_strata_deal_every_stratum_over_the_folds():
    groups = np.arange(12)
    strata = np.r_[np.zeros(4), np.ones(8)]
    fold = grouped_folds(groups, 2, np.random.default_rng(0), strata)
    assert sorted(np.bincount(fold[strata == 0])) == [2, 2]
    assert sorted(np.bincount(fold[strata == 1])) == [4, 4]


def test_heldout_halves_are_disjoint_and_balanced(halves):
    assert len(halves.a) >= 30 and len(halves.b) >= 30
    assert abs(len(halves.a) - len(halves.b)) <= 4
    assert set(halves.sources_a) == set(halves.sources_b)
    flat_a = {t.tobytes() for t in halves.a}
    assert not any(t.tobytes() in flat_a for t in halves.b)
    assert set(halves.groups_a) & set(halves.groups_b)  # neighbouring blocks shared: the split must keep them whole


def test_fixed_features_tell_blurred_real_tissue_from_real_but_not_real_from_real(halves):
    from bench.generation import blur

    fa, fb = texture_features(halves.a), texture_features(halves.b)
    assert fa.shape == (len(halves.a), len(feature_names()))
    kw = {"groups_a": halves.groups_a, "groups_b": halves.groups_b, "strata_a": halves.sources_a,
          "strata_b": halves.sources_b}
    floor = feature_c2st(fa, fb, **kw)
    blurred = feature_c2st(fa, texture_features(to_uint8(blur(to_tensor(halves.b)))), **kw)
    assert floor.auc_mean < 0.65
    assert blurred.auc_mean > 0.95


def test_cnn_tells_tissue_from_colour_noise(halves):
    from bench.generation import colour_noise

    a, _ = crops_of(halves.a[:16], 64)
    noise, _ = crops_of(to_uint8(colour_noise(to_tensor(halves.b[:16]), 0)), 64)
    found = cnn_c2st(a[::2], noise[::2], seeds=(0,), epochs=20)
    assert found.auc_mean > 0.9
    assert found.n_a == len(a[::2])


def test_bad_input_is_refused_in_one_line():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="at least"):
        feature_c2st(rng.normal(size=(3, 2)), rng.normal(size=(10, 2)))
    with pytest.raises(InputError, match="equal width"):
        feature_c2st(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))
    with pytest.raises(InputError, match="entries for"):
        feature_c2st(rng.normal(size=(10, 2)), rng.normal(size=(10, 2)), np.arange(9), np.arange(10))
    with pytest.raises(InputError, match="both sets"):
        feature_c2st(rng.normal(size=(10, 2)), rng.normal(size=(10, 2)), np.arange(10), None)
    with pytest.raises(InputError, match="uint8"):
        texture_features(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(InputError, match="one tile size"):
        cnn_c2st(np.zeros((8, 32, 32, 3), np.uint8), np.zeros((8, 16, 16, 3), np.uint8))

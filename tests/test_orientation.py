"""Tests of the orientation probe (studio.orientation) on stripes of known direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import InputError
from studio.orientation import angular_error_deg, dominant_orientation, encoder_embed, orientation_probe

torch.set_num_threads(1)


def stripes(phi: float, n: int = 64, period: float = 8.0, seed: int = 0) -> np.ndarray:
    """Intensity varying along direction ``phi``: the stripes themselves run at ``phi + 90`` degrees."""
    y, x = np.mgrid[0:n, 0:n].astype(float)
    v = 0.5 + 0.4 * np.sin(2 * np.pi * (x * np.cos(phi) + y * np.sin(phi)) / period)
    v = v + np.random.default_rng(seed).normal(0, 0.05, v.shape)
    return (np.clip(np.stack([v, 0.8 * v, v], -1), 0, 1) * 255).astype(np.uint8)


def _set(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([stripes(p, seed=seed * 1000 + i) for i, p in enumerate(rng.uniform(0, np.pi, n))])


def test_structure_tensor_truth_on_stripes():
    phis = np.linspace(0, np.pi, 12, endpoint=False)
    theta, coherence = dominant_orientation(np.stack([stripes(p) for p in phis]))
    assert angular_error_deg(theta, np.mod(phis + np.pi / 2, np.pi)).max() < 2.0
    assert (coherence > 0.8).all()


def test_angular_error_wraps_at_180_degrees():
    assert angular_error_deg(np.radians(179.0), np.radians(1.0)) == pytest.approx(2.0)
    assert angular_error_deg(np.radians(90.0), 0.0) == pytest.approx(90.0)


def _oriented(patches: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.feature import structure_tensor

    return np.stack([[c.mean() for c in structure_tensor(rgb2gray(p), sigma=2, order="rc")] for p in patches])


def _invariant(patches: np.ndarray) -> np.ndarray:
    """Features that a 90-degree rotation leaves unchanged (mean, contrast, sum of both axes' edges)."""
    f = patches.astype(float).mean(-1)
    edges = np.abs(np.diff(f, axis=1)).mean((1, 2)) + np.abs(np.diff(f, axis=2)).mean((1, 2))
    return np.stack([f.mean((1, 2)), f.std((1, 2)), edges], 1)


def test_probe_reads_direction_from_oriented_features_and_fails_on_invariant_ones():
    train, test = _set(60, 1), _set(30, 2)
    good = orientation_probe(_oriented, train, test)
    assert good.mean_error_deg < 5 and good.rotation_pairs_error_deg < 5 and good.r2 > 0.9
    blind = orientation_probe(_invariant, train, test)
    assert blind.rotation_pairs_error_deg > 40  # a token that does not turn cannot follow a turned patch


def test_encoder_embed_feeds_the_probe():
    from pipelines.encoders import BuiltinEncoder, PatchEncoder

    torch.manual_seed(0)
    encoder = BuiltinEncoder(PatchEncoder(embed_dim=8, channels=(4, 4, 4, 4, 4)).eval(), identity="tiny")
    found = orientation_probe(encoder_embed(encoder), _set(20, 3), _set(10, 4))
    assert 0 <= found.mean_error_deg <= 90 and found.n_test == 10


def test_too_few_oriented_patches_is_refused():
    flat = np.full((6, 32, 32, 3), 128, dtype=np.uint8)
    with pytest.raises(InputError, match="oriented patches"):
        orientation_probe(_invariant, flat, flat)

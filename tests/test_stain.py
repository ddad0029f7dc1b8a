"""The classical stain engine: parity with torchstain, exactness of its batched pieces,
ground-truth improvement, robustness on bad tiles, profiles and augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studio.color import tissue_mask
from studio.data.samples import bad_tiles, load_sample
from studio.errors import InputError
from studio.io import to_tensor, to_uint8
from studio.metrics import ciede2000
from studio.stain import NORMALIZERS, StainProfile, get_normalizer
from studio.stain.augment import StainAugment, known_shift, restain
from studio.stain.stats import masked_percentile
from studio.stain.vahadane import nn_lasso_2

torch.set_num_threads(1)
METHODS = sorted(NORMALIZERS)


def grid_tiles(image: np.ndarray, size: int = 256, stride: int = 256, limit: int | None = None) -> np.ndarray:
    h, w, _ = image.shape
    tiles = [image[y:y + size, x:x + size] for y in range(0, h - size + 1, stride)
             for x in range(0, w - size + 1, stride)]
    return np.stack(tiles[:limit])


@pytest.fixture(scope="module")
def hgsc_tiles() -> np.ndarray:
    return grid_tiles(load_sample("hgsc_nest"), limit=12)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.ascontiguousarray(load_sample("tiatoolbox_target")[:512, :512])


# ------------------------------------------------------------------ exact building blocks
def test_masked_percentile_matches_kthvalue_rule():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 1000, generator=gen)
    mask = torch.rand(5, 1000, generator=gen) > torch.linspace(0.1, 0.9, 5).unsqueeze(1)
    for q in (1.0, 37.0, 50.0, 99.0):
        got = masked_percentile(values, mask, q)
        for i in range(5):
            v = values[i][mask[i]]
            k = 1 + round(0.01 * q * (v.numel() - 1))  # torchstain's rule
            assert got[i].item() == v.kthvalue(k).values.item()
    empty = masked_percentile(values[:1], torch.zeros(1, 1000, dtype=torch.bool), 99.0)
    assert torch.isnan(empty).all()


def test_nn_lasso_2_is_the_exact_optimum():
    gen = torch.Generator().manual_seed(1)
    matrix = torch.rand(1, 3, 2, generator=gen) + 0.1
    matrix = matrix / matrix.norm(dim=1, keepdim=True)
    od = torch.rand(1, 3, 200, generator=gen) * 2 - 0.3
    lam = 0.1
    h = nn_lasso_2(matrix, od, lam)
    assert (h >= 0).all()

    def objective(hh: torch.Tensor) -> torch.Tensor:
        return 0.5 * (od - matrix @ hh).square().sum(dim=1) + lam * hh.sum(dim=1)

    best = objective(h)
    # Brute force over a fine non-negative grid around the solution cannot do better.
    grid = torch.linspace(0, 3, 301)
    g0, g1 = torch.meshgrid(grid, grid, indexing="ij")
    cand = torch.stack((g0.reshape(-1), g1.reshape(-1)))  # (2, G)
    for j in range(0, 200, 20):
        x = od[0, :, j:j + 1]
        obj = 0.5 * (x - matrix[0] @ cand).square().sum(dim=0) + lam * cand.sum(dim=0)
        assert best[0, j] <= obj.min() + 1e-6


# ------------------------------------------------------------------ parity
def test_macenko_matches_torchstain(hgsc_tiles, reference):
    torchstain = pytest.importorskip("torchstain")
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    theirs.fit(torch.from_numpy(reference.copy()).permute(2, 0, 1))
    ours = get_normalizer("macenko", keep_residual=False)
    profile = ours.fit(reference)
    np.testing.assert_allclose(np.array(profile.stain_matrix), theirs.HERef.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.array(profile.max_concentrations), theirs.maxCRef.numpy(), rtol=2e-3)
    out = to_uint8(ours.transform(hgsc_tiles)).astype(np.int16)
    expected = np.stack([theirs.normalize(torch.from_numpy(t.copy()).permute(2, 0, 1), stains=False)[0].numpy()
                         for t in hgsc_tiles]).astype(np.int16)
    diff = np.abs(out - expected)
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99.9) <= 1
    assert diff.max() <= 3


def test_batched_equals_one_by_one(hgsc_tiles, reference):
    for name in METHODS:
        norm = get_normalizer(name)
        norm.fit(reference)
        batched = norm.transform(hgsc_tiles[:4])
        single = torch.cat([norm.transform(hgsc_tiles[i]) for i in range(4)])
        torch.testing.assert_close(batched, single, atol=2e-5, rtol=0)


def test_chunking_does_not_change_results(hgsc_tiles, reference):
    whole = get_normalizer("macenko", chunk_pixels=1 << 24)
    chunked = get_normalizer("macenko", chunk_pixels=256 * 256)
    for n in (whole, chunked):
        n.fit(reference)
    torch.testing.assert_close(whole.transform(hgsc_tiles), chunked.transform(hgsc_tiles), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ lookup table
@pytest.mark.parametrize("name", METHODS)
def test_lut_is_bit_identical_to_float_path(name, hgsc_tiles, reference):
    norm = get_normalizer(name)
    norm.fit(reference)
    source = norm.estimate(hgsc_tiles)
    via_float = to_uint8(norm.transform(hgsc_tiles[:3], source=source))
    via_lut = norm.transform_uint8(hgsc_tiles[:3], source=source, workers=2)
    assert via_lut.dtype == np.uint8 and via_lut.shape == hgsc_tiles[:3].shape
    # Identical colours in, identical arithmetic: at most a rounding flip at x.5.
    assert np.abs(via_lut.astype(int) - via_float.astype(int)).max() <= 1
    assert (via_lut != via_float).mean() < 1e-3


# ------------------------------------------------------------------ ground truth
@pytest.mark.parametrize("shift", ["lab-a", "faded"])
def test_normalization_moves_restained_real_tiles_toward_truth(shift):
    """Real tiles re-stained by a known HED shift; reference: another region of the same
    image. Reinhard (the robust method) must beat the input; every method must stay finite
    and keep the output within a sane distance."""
    image = load_sample("tiatoolbox_target")
    truth = to_tensor(grid_tiles(image[:, :500], limit=6))
    matrix, scale, shift_t = known_shift(shift, truth.shape[0])
    shifted = restain(truth, matrix, scale, shift_t)
    tissue = tissue_mask(truth, min_od=0.05)
    before = ciede2000(shifted, truth, tissue).nanmean().item()
    errors = {}
    for name in METHODS:
        norm = get_normalizer(name)
        norm.fit(np.ascontiguousarray(image[:, 500:]))
        out = norm.transform(shifted, source=norm.estimate(shifted))
        assert torch.isfinite(out).all()
        errors[name] = ciede2000(out, truth, tissue).nanmean().item()
    assert errors["reinhard"] < 0.5 * before, (before, errors)
    assert min(errors.values()) < before
    assert max(errors.values()) < before + 3.0, (before, errors)


# ------------------------------------------------------------------ robustness
@pytest.mark.parametrize("name", METHODS)
def test_bad_tiles_never_nan_and_blank_tiles_stay_blank(name, reference):
    norm = get_normalizer(name)
    norm.fit(reference)
    tiles = bad_tiles()
    batch = np.stack(list(tiles.values()))
    out = norm.transform(batch)
    assert torch.isfinite(out).all()
    result = dict(zip(tiles, to_uint8(out), strict=True))
    # Glass stays glass: no colour cast on white or near-empty tiles.
    assert np.abs(result["white"].astype(int) - 255).max() <= 2
    assert np.abs(result["near_empty"][:90].astype(int) - 245).max() <= 12
    # Black stays dark.
    assert result["black"].mean() < 15
    # A single-stain tile falls back instead of being pushed to the reference's mix.
    delta = np.abs(result["eosin_only"].astype(int) - tiles["eosin_only"].astype(int)).mean()
    assert delta < 25, delta


def test_estimate_on_blank_input_falls_back_and_fit_refuses():
    norm = get_normalizer("macenko")
    profile = norm.estimate(np.full((64, 64, 3), 255, np.uint8))
    assert profile.fallback
    with pytest.raises(InputError, match="too little usable tissue"):
        norm.fit(np.full((64, 64, 3), 255, np.uint8), source="white.png")


def test_wrong_inputs_give_clear_errors():
    norm = get_normalizer("reinhard")
    with pytest.raises(InputError, match="expected"):
        norm.transform(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="unknown stain method"):
        get_normalizer("spams")
    with pytest.raises(InputError, match="macenko profile"):
        norm.transform(np.zeros((8, 8, 3), np.uint8), source=get_normalizer("macenko").target)


# ------------------------------------------------------------------ profiles
def test_profile_json_round_trip(tmp_path, reference):
    for name in METHODS:
        norm = get_normalizer(name)
        profile = norm.fit(reference, source="tiatoolbox target")
        path = profile.save(tmp_path / f"{name}.json")
        again = StainProfile.load(path)
        assert again == profile
        fresh = get_normalizer(name)
        fresh.set_target(again)
        tile = reference[:64, :64]
        torch.testing.assert_close(fresh.transform(tile), norm.transform(tile))
    assert set(json.loads((tmp_path / "macenko.json").read_text())) >= {"stain_matrix", "max_concentrations"}


def test_profile_load_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: is not valid JSON"):
        StainProfile.load(bad)
    bad.write_text(json.dumps({"method": "macenko", "stain_matrix": [[1, 2]]}))
    with pytest.raises(InputError, match="stain_matrix must be 3 rows"):
        StainProfile.load(bad)
    with pytest.raises(InputError, match="no such stain profile"):
        StainProfile.load(tmp_path / "missing.json")


def test_slide_level_profile_gives_one_mapping_for_all_tiles(hgsc_tiles, reference):
    norm = get_normalizer("macenko")
    norm.fit(reference)
    source = norm.estimate(hgsc_tiles)
    assert not source.fallback and source.tissue_pixels > 100_000
    assert set(source.concentration_percentiles) == {"p1", "p50", "p99"}
    # The same pixel value maps to the same output wherever it occurs.
    a = norm.transform(hgsc_tiles[:2], source=source)
    swapped = norm.transform(hgsc_tiles[1::-1], source=source)
    torch.testing.assert_close(a, swapped.flip(0))


# ------------------------------------------------------------------ augmentation
def test_stain_augment_is_seeded_and_keeps_glass(hgsc_tiles):
    tiles = to_tensor(hgsc_tiles[:4])
    tiles[:, :, :8, :8] = 1.0  # a patch of glass
    aug = StainAugment(angle_deg=5, scale=0.3, shift=0.05)
    a = aug(tiles, torch.Generator().manual_seed(3))
    b = aug(tiles, torch.Generator().manual_seed(3))
    c = aug(tiles, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().mean() > 0.005
    assert (a - tiles).abs().mean() > 0.005
    assert (a[:, :, :8, :8] > 0.98).all()
    assert StainAugment(p=0.0)(tiles).equal(tiles)
    with pytest.raises(InputError):
        StainAugment(scale=1.5)

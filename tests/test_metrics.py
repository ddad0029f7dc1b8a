"""Tests of studio.metrics against hand computations, scikit-image, torchmetrics and real tiles."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.linalg import sqrtm
from scipy.optimize import linear_sum_assignment
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.segmentation import expand_labels

from studio import metrics
from studio.color import rgb_to_lab
from studio.data.samples import load_hgsc_nest_labels, load_sample
from studio.errors import InputError
from studio.io import to_tensor

torch.set_num_threads(1)


# --------------------------------------------------------------------------- real image pairs
def _crop(name: str, y: int, x: int, size: int = 256) -> np.ndarray:
    return np.array(load_sample(name)[y : y + size, x : x + size])


def _jpeg(image: np.ndarray, quality: int = 40) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


@pytest.fixture(scope="module")
def real_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) batches of 3: hgsc crop vs its JPEG-40 copy, its blur, and a tiatoolbox crop."""
    nest = _crop("hgsc_nest", 300, 400)
    blurred = gaussian(nest.astype(np.float64) / 255.0, sigma=1.0, channel_axis=-1)
    target = to_tensor(np.stack([nest, nest, nest]))
    pred = torch.cat([
        to_tensor(_jpeg(nest)),
        torch.from_numpy(blurred.astype(np.float32)).permute(2, 0, 1)[None],
        to_tensor(_crop("tiatoolbox_target", 100, 100)),
    ])
    return pred, target


def _hwc64(tiles: torch.Tensor, i: int) -> np.ndarray:
    return tiles[i].permute(1, 2, 0).double().numpy()


# --------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_matches_skimage_on_real_tiles(real_pairs):
    pred, target = real_pairs
    ours = metrics.psnr(pred, target)
    assert ours.shape == (3,)
    for i in range(3):
        ref = peak_signal_noise_ratio(_hwc64(target, i), _hwc64(pred, i), data_range=1.0)
        assert abs(float(ours[i]) - ref) < 1e-4
    # JPEG-40 and a 1-px blur keep the tile recognisable; an unrelated tile does not.
    assert ours[0] > 25 and ours[1] > 20 and ours[2] < 15


def test_psnr_identical_is_inf_and_data_range_scales():
    tile = to_tensor(_crop("skin", 0, 0, 64))
    assert torch.isinf(metrics.psnr(tile, tile)).all()
    noisy = (tile + 0.05 * torch.randn(tile.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    # Same pixels on a 0..255 scale with data_range 255: same PSNR.
    assert float(metrics.psnr(noisy * 255, tile * 255, data_range=255.0)) == pytest.approx(
        float(metrics.psnr(noisy, tile)), abs=1e-4)


def test_ssim_matches_skimage_on_real_tiles(real_pairs):
    """Both average the SSIM map over the valid region (5-px border left out): agree to float32 noise."""
    pred, target = real_pairs
    ours = metrics.ssim(pred, target)
    assert ours.shape == (3,)
    refs = []
    for i in range(3):
        ref = structural_similarity(_hwc64(target, i), _hwc64(pred, i), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=-1)
        refs.append(ref)
        # 1e-4 rather than 1e-3: with the same border convention the only difference left is
        # float32 vs float64 arithmetic (measured 1.4e-5).
        assert abs(float(ours[i]) - ref) < 1e-4
    assert refs[0] > 0.85 and refs[1] > 0.85 and refs[2] < 0.3
    assert torch.allclose(metrics.ssim(target, target), torch.ones(3), atol=1e-5)


def test_ssim_border_convention_is_the_documented_difference(real_pairs):
    """torchmetrics' own mean includes the reflect-padded border: off by ~1e-3 on unrelated tiles."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = real_pairs
    ref = structural_similarity(_hwc64(target, 2), _hwc64(pred, 2), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    full = structural_similarity_index_measure(pred[2:], target[2:], sigma=1.5, kernel_size=11,
                                               data_range=1.0, reduction="none")
    assert abs(float(full[0]) - ref) > 5e-4
    assert abs(float(metrics.ssim(pred[2:], target[2:])[0]) - ref) < 1e-4


# --------------------------------------------------------------------------- CIEDE2000
def test_ciede2000_sharma_reference_pairs():
    """Pairs 1, 7, 17, 25 of Sharma, Wu & Dalal (2005) Table 1."""
    lab_a = [(50.0, 2.6772, -79.7751), (50.0, 0.0, 0.0), (50.0, 2.5, 0.0), (60.2574, -34.0099, 36.2677)]
    lab_b = [(50.0, 0.0, -82.7485), (50.0, -1.0, 2.0), (73.0, 25.0, -18.0), (60.4626, -34.1751, 39.4387)]
    expected = [2.0425, 2.3669, 27.1492, 1.2644]

    def image(values):
        return torch.tensor(values, dtype=torch.float64).T.reshape(1, 3, 1, 4)

    got = metrics.delta_e_ciede2000(image(lab_a), image(lab_b)).flatten()
    assert np.allclose(got.numpy(), expected, atol=1e-4)


def test_ciede2000_formula_matches_skimage_on_the_same_lab(real_pairs):
    pred, target = real_pairs
    lab_p = rgb_to_lab(pred.double())
    lab_t = rgb_to_lab(target.double())
    ours = metrics.delta_e_ciede2000(lab_t, lab_p)
    for i in range(3):
        ref = deltaE_ciede2000(lab_t[i].permute(1, 2, 0).numpy(), lab_p[i].permute(1, 2, 0).numpy())
        assert np.abs(ours[i].numpy() - ref).max() < 1e-9


def test_ciede2000_end_to_end_matches_skimage_rgb2lab(real_pairs):
    """float32 kornia LAB vs skimage's float64 rgb2lab (same D65 matrices): per-pixel within 1e-3."""
    pred, target = real_pairs
    delta = metrics.ciede2000_map(pred, target)
    means = metrics.ciede2000(pred, target)
    assert delta.shape == (3, 256, 256) and means.shape == (3,)
    for i in range(3):
        ref = deltaE_ciede2000(rgb2lab(_hwc64(target, i)), rgb2lab(_hwc64(pred, i)))
        assert np.abs(delta[i].double().numpy() - ref).max() < 1e-3
        assert abs(float(means[i]) - ref.mean()) < 1e-4
    assert means[0] < 5 and means[2] > 10  # JPEG barely moves colours; another slide's stain does


def test_ciede2000_identical_is_zero_and_mask_selects_pixels(real_pairs):
    pred, target = real_pairs
    assert torch.equal(metrics.ciede2000(target, target), torch.zeros(3))
    mask = torch.zeros(3, 1, 256, 256, dtype=torch.bool)
    mask[0, :, :128] = True
    mask[1] = True  # image 2 keeps an all-false mask
    got = metrics.ciede2000(pred, target, mask=mask)
    full = metrics.ciede2000_map(pred, target)
    assert float(got[0]) == pytest.approx(float(full[0, :128].mean()), rel=1e-5)
    assert float(got[1]) == pytest.approx(float(full[1].mean()), rel=1e-5)
    assert torch.isnan(got[2])


# --------------------------------------------------------------------------- Fréchet / KID
def _with_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose *sample* mean and (N-1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, mean.size))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 16))
    assert metrics.frechet_distance(feats, feats) < 1e-9
    assert metrics.frechet_distance(torch.from_numpy(feats).float(), feats) < 1e-4


def test_frechet_two_gaussians_closed_form():
    rng = np.random.default_rng(1)
    # Diagonal: d² = |Δμ|² + Σ (√σa - √σb)² = 1 + (1-2)² + (2-1)² + 0 = 3.
    a = _with_moments(rng, 500, np.zeros(3), np.diag([1.0, 4.0, 9.0]))
    b = _with_moments(rng, 400, np.array([1.0, 0.0, 0.0]), np.diag([4.0, 1.0, 9.0]))
    assert metrics.frechet_distance(a, b) == pytest.approx(3.0, abs=1e-9)
    # Full covariances: against scipy's general matrix square root.
    q = rng.standard_normal((5, 5))
    cov_a = q @ q.T + 0.5 * np.eye(5)
    r = rng.standard_normal((5, 5))
    cov_b = r @ r.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(sqrtm(cov_a @ cov_b)))
    got = metrics.frechet_distance(_with_moments(rng, 600, mu_a, cov_a), _with_moments(rng, 700, mu_b, cov_b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_agrees_with_torchmetrics_fid_on_raw_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    rng = np.random.default_rng(2)
    a = rng.standard_normal((200, 8))
    b = 0.7 * rng.standard_normal((250, 8)) + 0.3
    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(torch.from_numpy(a), real=True)
    fid.update(torch.from_numpy(b), real=False)
    assert metrics.frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=1e-6)


def _mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = x.shape[0]
    return ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2 * k_xy.mean()


def test_kid_full_subset_equals_hand_unbiased_mmd_and_is_seeded():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((60, 10))
    b = rng.standard_normal((60, 10)) + 0.5
    mean, std = metrics.kernel_inception_distance(a, b, subsets=1, subset_size=60)
    assert mean == pytest.approx(_mmd_unbiased(a, b), rel=1e-9) and std == 0.0
    assert metrics.kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=7) == \
        metrics.kernel_inception_distance(a, b, subsets=5, subset_size=30, seed=7)


def test_kid_identical_near_zero_and_shifted_positive():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((400, 16))
    same_mean, same_std = metrics.kernel_inception_distance(a, a, subsets=20, subset_size=100)
    shifted_mean, shifted_std = metrics.kernel_inception_distance(a, a + 1.0, subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05 and same_std < 0.1
    assert shifted_mean > 1.0 and shifted_mean > 10 * shifted_std
    with pytest.raises(InputError, match="subset_size"):
        metrics.kernel_inception_distance(a[:50], a, subset_size=100)


def test_feature_sets_must_share_width():
    with pytest.raises(InputError, match=r"\(10, 4\).*\(10, 3\)"):
        metrics.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


# --------------------------------------------------------------------------- encoders
class _TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x).mean(dim=(2, 3)))


class _Tokens(torch.nn.Module):
    """Patchify 8x8 and project: (B, 3, H, W) -> (B, N, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Conv2d(3, 5, 8, stride=8)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def test_encoder_features_pooled_encoder_batches_and_eval_mode():
    tiles = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = _TinyCNN().train()
    feats = metrics.encoder_features(model, tiles, batch_size=2)
    assert feats.shape == (5, 6) and feats.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        expected = model(tiles)
    assert torch.allclose(feats, expected, atol=1e-6)  # dropout was off: eval mode was used
    model.train()
    metrics.encoder_features(model, tiles)
    assert model.training  # and the caller's mode came back
    # An iterable of batches and single tiles gives the same rows in the same order.
    from_iter = metrics.encoder_features(model, [tiles[:3], tiles[3], tiles[4:]], batch_size=2)
    assert torch.allclose(from_iter, feats, atol=1e-6)


def test_encoder_features_token_encoder_is_mean_pooled_and_uint8_accepted():
    image = _crop("hgsc_nest", 0, 0, 32)
    model = _Tokens()
    feats = metrics.encoder_features(model, image[None])  # uint8 (1, H, W, 3)
    with torch.no_grad():
        expected = model(to_tensor(image)).mean(dim=1)
    assert feats.shape == (1, 5) and torch.allclose(feats, expected, atol=1e-6)
    # A plain function works too.
    plain = metrics.encoder_features(lambda x: x.mean(dim=(2, 3)), to_tensor(image))
    assert torch.allclose(plain, to_tensor(image).mean(dim=(2, 3)))


def test_encoder_features_rejects_bad_outputs_and_inputs():
    tiles = torch.rand(2, 3, 8, 8)
    with pytest.raises(InputError, match="encoder"):
        metrics.encoder_features(lambda x: x, tiles)  # (B, 3, H, W) is not a feature vector
    with pytest.raises(InputError, match=r"tiles\[0\]: shape \(1, 2, 8, 8\)"):
        metrics.encoder_features(lambda x: x.mean(dim=(2, 3)), torch.rand(1, 2, 8, 8))
    with pytest.raises(InputError, match="empty"):
        metrics.encoder_features(lambda x: x.mean(dim=(2, 3)), [])


def test_inception_extractor_needs_local_file_and_torch_fidelity(tmp_path, monkeypatch):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(InputError, match="pt_inception.pth: no such weights file"):
        metrics.inception_feature_extractor(missing)
    missing.write_bytes(b"not really weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    with pytest.raises(InputError, match="torch-fidelity: is not installed"):
        metrics.inception_feature_extractor(missing)
    with pytest.raises(InputError, match="feature"):
        metrics.inception_feature_extractor(missing, feature=1000)


# --------------------------------------------------------------------------- panoptic quality
def _canvas(*boxes: tuple[int, int, int, int, int], shape=(20, 20)) -> np.ndarray:
    """Instance map with rectangles (id, y0, y1, x0, x1), later boxes drawn on top."""
    out = np.zeros(shape, dtype=np.int32)
    for inst_id, y0, y1, x0, x1 in boxes:
        out[y0:y1, x0:x1] = inst_id
    return out


def test_pq_identical_maps_is_exactly_one():
    inst = _canvas((1, 0, 4, 0, 4), (2, 6, 10, 6, 12), (5, 12, 18, 1, 5))
    result = metrics.panoptic_quality(inst, inst)
    assert (result["dq"], result["sq"], result["pq"]) == (1.0, 1.0, 1.0)
    assert (result["tp"], result["fp"], result["fn"], result["sum_iou"]) == (3, 0, 0, 3.0)


CASES = {
    # two true nuclei (4x5 = 20 px, 4x3 = 12 px) predicted as one 4x8 blob: IoU 20/32 with the
    # bigger one (a match), the smaller one is missed.
    "merge": (_canvas((1, 0, 4, 0, 5), (2, 0, 4, 5, 8)), _canvas((1, 0, 4, 0, 8)), 1, 0, 1, 20 / 32),
    # one true 4x8 nucleus predicted as two pieces of 20 and 12 px: IoU 20/32, one extra piece.
    "split": (_canvas((1, 0, 4, 0, 8)), _canvas((1, 0, 4, 0, 5), (2, 0, 4, 5, 8)), 1, 1, 0, 20 / 32),
    "missed": (_canvas((1, 0, 4, 0, 4), (2, 10, 14, 10, 14)), _canvas((1, 0, 4, 0, 4)), 1, 0, 1, 1.0),
    "false_positive": (_canvas((1, 0, 4, 0, 4)), _canvas((1, 0, 4, 0, 4), (2, 10, 14, 10, 14)), 1, 1, 0, 1.0),
    # 10x10 squares shifted by 2 columns: intersection 10*8 = 80, union 200 - 80 = 120.
    "shift_2px": (_canvas((1, 0, 10, 0, 10)), _canvas((1, 0, 10, 2, 12)), 1, 0, 0, 80 / 120),
    # shifted by (1, 1): intersection 9*9 = 81, union 200 - 81 = 119.
    "shift_diagonal": (_canvas((1, 0, 10, 0, 10)), _canvas((1, 1, 11, 1, 11)), 1, 0, 0, 81 / 119),
    # shifted by 5: IoU 50/150 = 1/3, no match: one FN and one FP.
    "shift_5px": (_canvas((1, 0, 10, 0, 10)), _canvas((1, 0, 10, 5, 15)), 0, 1, 1, 0.0),
    # equal halves: IoU exactly 0.5 is NOT a match (strictly greater is required).
    "half_half": (_canvas((1, 0, 4, 0, 4), (2, 0, 4, 4, 8)), _canvas((1, 0, 4, 0, 8)), 0, 1, 2, 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pq_hand_computed_cases(case):
    true, pred, tp, fp, fn, sum_iou = CASES[case]
    result = metrics.panoptic_quality(true, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum_iou / tp if tp else 0.0
    assert result["sum_iou"] == pytest.approx(sum_iou, abs=1e-12)
    assert result["dq"] == pytest.approx(dq, abs=1e-9)
    assert result["sq"] == pytest.approx(sq, abs=1e-9)
    assert result["pq"] == pytest.approx(dq * sq, abs=1e-9)


def test_pq_merge_values_spelled_out():
    true, pred, *_ = CASES["merge"]
    result = metrics.panoptic_quality(true, pred)
    assert result["dq"] == pytest.approx(2 / 3, abs=1e-12)
    assert result["sq"] == pytest.approx(0.625, abs=1e-12)
    assert result["pq"] == pytest.approx(5 / 12, abs=1e-12)


def test_pq_empty_images_follow_conic_by_default():
    empty = np.zeros((8, 8), dtype=np.int32)
    assert metrics.panoptic_quality(empty, empty)["pq"] == 0.0  # CoNIC: 0 / (0 + 1e-6)
    assert metrics.panoptic_quality(empty, empty, empty_pq=1.0)["pq"] == 1.0
    one = _canvas((1, 0, 3, 0, 3), shape=(8, 8))
    assert metrics.panoptic_quality(one, empty, empty_pq=1.0)["pq"] == 0.0  # a miss is a miss


def test_pair_instances_keeps_original_ids_and_lists_unmatched():
    true = _canvas((7, 0, 4, 0, 4), (3, 10, 14, 10, 14), (9, 0, 3, 15, 18))
    pred = _canvas((42, 0, 4, 0, 4), (5, 10, 14, 11, 15), (8, 16, 19, 0, 3))
    pairs = metrics.pair_instances(true, pred)
    assert pairs.pairs.tolist() == [[3, 5], [7, 42]]
    assert pairs.iou == pytest.approx([12 / 20, 1.0])
    assert pairs.unmatched_true.tolist() == [9] and pairs.unmatched_pred.tolist() == [8]


def test_pair_instances_below_half_uses_one_to_one_assignment():
    true, pred, *_ = CASES["half_half"]  # both true halves overlap the blob at IoU 0.5
    pairs = metrics.pair_instances(true, pred, match_iou=0.3)
    assert len(pairs.pairs) == 1 and pairs.iou.tolist() == [0.5]
    assert len(pairs.unmatched_true) == 1 and len(pairs.unmatched_pred) == 0


def test_remap_label_contiguous_and_by_size():
    inst = _canvas((9, 0, 2, 0, 2), (4, 5, 10, 5, 10), (30, 12, 15, 12, 15))
    remapped = metrics.remap_label(inst)
    assert remapped.dtype == np.int32 and sorted(np.unique(remapped)) == [0, 1, 2, 3]
    assert remapped[0, 0] == 2 and remapped[5, 5] == 1 and remapped[12, 12] == 3  # old id order 4 < 9 < 30
    by_size = metrics.remap_label(inst, by_size=True)
    assert by_size[5, 5] == 1 and by_size[12, 12] == 2 and by_size[0, 0] == 3  # 25, 9, 4 px
    assert metrics.panoptic_quality(inst, remapped)["pq"] == 1.0


def test_mpq_plus_sums_over_images_not_averages():
    # Class 1: image A has one nucleus matched at IoU 80/120; image B has three nuclei, none predicted.
    # Class 2: one nucleus in image B, never predicted -> pq 0.
    true_a = _canvas((1, 0, 10, 0, 10))
    pred_a = _canvas((1, 0, 10, 2, 12))
    true_b = _canvas((1, 0, 4, 0, 4), (2, 6, 10, 0, 4), (3, 12, 16, 0, 4), (4, 12, 16, 12, 16))
    pred_b = np.zeros_like(true_b)
    cls_true_b = np.where(true_b == 4, 2, (true_b > 0).astype(np.int32))
    result = metrics.multi_pq_plus(
        [true_a, true_b], [(true_a > 0).astype(np.int32), cls_true_b],
        [pred_a, pred_b], [(pred_a > 0).astype(np.int32), np.zeros_like(pred_b)], num_classes=2,
    )
    # Summed: TP 1, FP 0, FN 3, sumIoU 2/3 -> dq = 1 / (1 + 1.5) = 0.4, sq = 2/3, pq = 4/15.
    assert result["tp"].tolist() == [1, 0] and result["fp"].tolist() == [0, 0]
    assert result["fn"].tolist() == [3, 1]
    assert result["dq"][0] == pytest.approx(0.4, abs=1e-12)
    assert result["sq"][0] == pytest.approx(2 / 3, abs=1e-12)
    assert result["pq"][0] == pytest.approx(4 / 15, abs=1e-12)
    assert result["pq"][1] == 0.0
    assert result["mpq_plus"] == pytest.approx(2 / 15, abs=1e-12)
    # Averaging per image would have given class 1 (2/3 + 0) / 2 = 1/3, not 4/15.
    class1_b = np.where(cls_true_b == 1, true_b, 0)
    per_image = [metrics.panoptic_quality(t, p)["pq"] for t, p in ((true_a, pred_a), (class1_b, pred_b))]
    assert np.mean(per_image) == pytest.approx(1 / 3) and abs(np.mean(per_image) - result["pq"][0]) > 0.05


def test_mpq_plus_restricts_pixelwise_and_handles_absent_class():
    # A predicted nucleus whose right half is labelled class 2: class 1 sees only the left half.
    true = _canvas((1, 0, 4, 0, 8))
    true_cls = (true > 0).astype(np.int32)
    pred_cls = true_cls.copy()
    pred_cls[:, 6:8] = 2
    result = metrics.multi_pq_plus(true[None], true_cls[None], true[None], pred_cls[None], num_classes=3)
    assert result["sum_iou"][0] == pytest.approx(24 / 32)  # left 24 px vs 32 px truth
    assert result["fp"][1] == 1 and result["tp"][1] == 0
    assert result["pq"][2] == 0.0  # class 3 absent everywhere: CoNIC's 0, counted in the mean
    nan_mode = metrics.multi_pq_plus(true[None], true_cls[None], true[None], pred_cls[None], num_classes=3,
                                     empty_pq=float("nan"))
    assert np.isnan(nan_mode["pq"][2])
    assert nan_mode["mpq_plus"] == pytest.approx((0.75 + 0.0) / 2)


def test_binary_pq_dataset_is_the_mean_of_per_image_pq():
    trues = [CASES[k][0] for k in ("merge", "split", "shift_2px")]
    preds = [CASES[k][1] for k in ("merge", "split", "shift_2px")]
    result = metrics.binary_pq_dataset(trues, preds)
    assert result["per_image"] == pytest.approx([5 / 12, 5 / 12, 2 / 3], abs=1e-12)
    assert result["pq"] == pytest.approx((5 / 12 + 5 / 12 + 2 / 3) / 3, abs=1e-12)
    empty = np.zeros((20, 20), dtype=np.int32)
    assert metrics.binary_pq_dataset([trues[2], empty], [preds[2], empty])["pq"] == pytest.approx(1 / 3)
    skip = metrics.binary_pq_dataset(np.stack([trues[2], empty]), np.stack([preds[2], empty]),
                                     empty_pq=float("nan"))
    assert skip["pq"] == pytest.approx(2 / 3)


def test_real_labelled_tile_identity_and_one_pixel_dilation():
    _, inst, _ = load_hgsc_nest_labels()
    crop = np.array(inst[600:856, 600:856])
    assert len(np.unique(crop)) - 1 == 44
    same = metrics.panoptic_quality(crop, crop)
    assert (same["pq"], same["dq"], same["sq"], same["tp"]) == (1.0, 1.0, 1.0, 44)
    grown = metrics.panoptic_quality(crop, expand_labels(crop, distance=1))
    assert grown["dq"] == 1.0 and grown["tp"] == 44
    assert 0.6 < grown["sq"] < 0.95 and grown["pq"] == grown["sq"]


# --------------------------------------------------------------------------- counts
def test_class_counts_majority_vote():
    inst = _canvas((1, 0, 4, 0, 4), (2, 6, 10, 0, 4), (3, 12, 16, 0, 4), (4, 0, 4, 10, 14))
    cls = np.zeros_like(inst)
    cls[inst == 1] = 2
    cls[0, 0:3] = 1  # instance 1: 13 px of class 2, 3 px of class 1 -> class 2
    cls[inst == 2] = 0
    cls[6, 0] = 3  # instance 2: one class-3 pixel, the rest background -> class 3
    # instance 3 stays all background -> not counted
    cls[0:2, 10:14] = 1  # instance 4: 8 px class 1, 8 px class 2 -> tie, smaller class 1
    cls[2:4, 10:14] = 2
    assert metrics.class_counts(inst, cls, num_classes=3).tolist() == [1, 1, 1]


def test_counts_r2_hand_computed():
    true = np.array([[1, 0, 5], [2, 0, 5], [3, 0, 5]])
    pred = np.array([[1, 0, 5], [2, 0, 6], [4, 0, 5]])
    result = metrics.counts_r2(true, pred)
    # col 0: SS_res = 1, SS_tot = 2 -> 0.5; col 1 constant, exact -> 1; col 2 constant, wrong -> 0
    assert result["per_class"].tolist() == [0.5, 1.0, 0.0]
    assert result["r2"] == pytest.approx(0.5)
    assert np.isnan(metrics.counts_r2(true[:1], pred[:1])["r2"])


def test_counts_r2_matches_sklearn():
    r2_score = pytest.importorskip("sklearn.metrics").r2_score
    rng = np.random.default_rng(5)
    true = rng.integers(0, 30, (12, 4))
    pred = true + rng.integers(-3, 4, (12, 4))
    true[:, 3] = 7
    expected = [r2_score(true[:, c], pred[:, c]) for c in range(4)]
    assert metrics.counts_r2(true, pred)["per_class"] == pytest.approx(expected)


# --------------------------------------------------------------------------- dice, centroids, detection
def test_dice_and_centroids():
    a = _canvas((1, 0, 4, 0, 4))
    b = _canvas((3, 0, 4, 2, 6))
    assert metrics.dice(a, b) == pytest.approx(2 * 8 / 32)
    assert metrics.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    ids, centroids = metrics.instance_centroids(_canvas((5, 0, 4, 0, 4), (2, 10, 11, 6, 9)))
    assert ids.tolist() == [2, 5]
    assert centroids.tolist() == [[10.0, 7.0], [1.5, 1.5]]
    ids, centroids = metrics.instance_centroids(np.zeros((4, 4), dtype=np.int32))
    assert ids.shape == (0,) and centroids.shape == (0, 2)


def test_detection_f1_radius_and_one_to_one():
    true = np.array([[10.0, 10.0], [50.0, 50.0]])
    pred = np.array([[10.0, 17.0], [50.0, 59.0], [90.0, 90.0]])  # 7 px (hit), 9 px (miss), far (FP)
    result = metrics.detection_f1(true, pred, radius=8.0)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 2, 1)
    assert result["precision"] == pytest.approx(1 / 3) and result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(2 * 1 / (2 + 2 + 1))
    # Two predictions beside one nucleus: only one may claim it.
    near = metrics.detection_f1([[20.0, 20.0]], [[20.0, 22.0], [21.0, 20.0]], radius=8.0)
    assert (near["tp"], near["fp"], near["fn"]) == (1, 1, 0)
    empty = metrics.detection_f1(np.zeros((0, 2)), [], radius=8.0)
    assert empty["f1"] == 1.0 and empty["tp"] == 0


def test_detection_f1_maximises_hits_where_min_total_distance_loses_one():
    true = np.array([[1.0, 5.0], [9.0, 8.0], [8.0, 0.0]])
    pred = np.array([[0.0, 2.0], [0.0, 13.0], [10.0, 12.0]])
    # HoVer-Net pair_coordinates: minimum total distance first, far pairs dropped after.
    dist = np.linalg.norm(true[:, None] - pred[None], axis=-1)
    rows, cols = linear_sum_assignment(dist)
    assert int((dist[rows, cols] <= 8.0).sum()) == 1
    result = metrics.detection_f1(true, pred, radius=8.0)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)


def test_detection_f1_componentwise_matching_equals_dense_assignment():
    rng = np.random.default_rng(6)
    for _ in range(5):
        true = rng.uniform(0, 120, (80, 2))
        pred = np.concatenate([true[:60] + rng.normal(0, 4, (60, 2)), rng.uniform(0, 120, (25, 2))])
        dist = np.linalg.norm(true[:, None] - pred[None], axis=-1)
        cost = np.where(dist <= 8.0, dist, 1e6)
        rows, cols = linear_sum_assignment(cost)
        expected = int((dist[rows, cols] <= 8.0).sum())
        result = metrics.detection_f1(true, pred, radius=8.0)
        assert result["tp"] == expected and result["fp"] == 85 - expected and result["fn"] == 80 - expected


# --------------------------------------------------------------------------- bad input
def test_mismatched_shapes_name_both_shapes():
    message = r"pred_inst: shape \(10, 12\) differs from true_inst shape \(10, 10\)"
    with pytest.raises(InputError, match=message):
        metrics.panoptic_quality(np.zeros((10, 10), np.int32), np.zeros((10, 12), np.int32))
    with pytest.raises(InputError, match=r"\(1, 3, 16, 16\).*\(1, 3, 16, 20\)"):
        metrics.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20))
    with pytest.raises(InputError, match=r"\(1, 3, 8, 8\).*\(1, 3, 8, 9\)"):
        metrics.ciede2000(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    message = r"true_classes\[0\]: shape \(4, 5\) differs from true_insts\[0\] shape \(4, 4\)"
    with pytest.raises(InputError, match=message):
        metrics.multi_pq_plus([np.zeros((4, 4), int)], [np.zeros((4, 5), int)], [np.zeros((4, 4), int)],
                              [np.zeros((4, 4), int)], num_classes=2)
    message = r"pred_counts: shape \(3, 2\) differs from true_counts shape \(3, 3\)"
    with pytest.raises(InputError, match=message):
        metrics.counts_r2(np.zeros((3, 3)), np.zeros((3, 2)))


def test_label_maps_must_be_non_negative_integers():
    good = np.zeros((4, 4), np.int32)
    with pytest.raises(InputError, match="true_inst: dtype float64"):
        metrics.panoptic_quality(good.astype(np.float64), good)
    with pytest.raises(InputError, match="pred_inst: has negative label -1"):
        metrics.panoptic_quality(good, good - 1)
    with pytest.raises(InputError, match="num_classes is 2"):
        metrics.class_counts(good, good + 3, num_classes=2)
    with pytest.raises(InputError, match="pred_insts: has 1 images but true_insts has 2"):
        metrics.binary_pq_dataset([good, good], [good])


def test_mask_fidelity_per_class_recall_and_f1():
    from studio.metrics import mask_fidelity

    true = np.zeros((40, 40), np.int32)
    cls = np.zeros((40, 40), np.uint8)
    true[2:8, 2:8], cls[2:8, 2:8] = 1, 4  # dead, found and classified right
    true[2:8, 20:26], cls[2:8, 20:26] = 2, 4  # dead, found but called inflammatory
    true[20:26, 2:8], cls[20:26, 2:8] = 3, 2  # inflammatory, missed
    pred = np.zeros_like(true)
    pred_cls = np.zeros_like(cls)
    pred[3:8, 2:8], pred_cls[3:8, 2:8] = 1, 4
    pred[2:8, 21:26], pred_cls[2:8, 21:26] = 2, 2
    pred[30:36, 30:36], pred_cls[30:36, 30:36] = 3, 2  # spurious
    m = mask_fidelity(true, cls, pred, pred_cls, num_classes=5)
    assert m["n_true"] == 3 and m["n_pred"] == 3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["per_class"][4]["recall"] == 1.0 and m["per_class"][2]["recall"] == 0.0
    assert m["per_class"][4]["f1"] == pytest.approx(2 / 3)  # tp 1, fn 1, fp 0
    assert m["per_class"][2]["f1"] == 0.0
    assert np.isnan(m["per_class"][1]["recall"])
    assert 0 < m["dice"] < 1
    assert mask_fidelity(true, cls, true)["f1"] == 1.0


def test_detection_confusion_counts_typing_misses_and_false_detections():
    """The same maps as above as a confusion matrix: rows true class (0 = false detection),
    columns predicted class (0 = missed); matrices of tiles add up."""
    from studio.metrics import detection_confusion

    true = np.zeros((40, 40), np.int32)
    cls = np.zeros((40, 40), np.uint8)
    true[2:8, 2:8], cls[2:8, 2:8] = 1, 4
    true[2:8, 20:26], cls[2:8, 20:26] = 2, 4
    true[20:26, 2:8], cls[20:26, 2:8] = 3, 2
    pred = np.zeros_like(true)
    pred_cls = np.zeros_like(cls)
    pred[3:8, 2:8], pred_cls[3:8, 2:8] = 1, 4
    pred[2:8, 21:26], pred_cls[2:8, 21:26] = 2, 2
    pred[30:36, 30:36], pred_cls[30:36, 30:36] = 3, 2
    m = detection_confusion(true, cls, pred, pred_cls, num_classes=5)
    expected = np.zeros((6, 6), np.int64)
    expected[4, 4] = 1  # dead found, typed dead
    expected[4, 2] = 1  # dead found, called inflammatory
    expected[2, 0] = 1  # inflammatory missed
    expected[0, 2] = 1  # a false detection called inflammatory
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(m + m, detection_confusion(np.hstack([true, true + (true > 0) * 3]),
                                                             np.hstack([cls, cls]),
                                                             np.hstack([pred, pred + (pred > 0) * 3]),
                                                             np.hstack([pred_cls, pred_cls])))


def test_seam_ratio_sees_a_tile_offset_and_ignores_masked_glass():
    from studio.metrics import seam_ratio

    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (512, 512, 3)).astype(np.float32)
    assert seam_ratio(image, 128) == pytest.approx(1.0, abs=0.02)  # no seams in noise
    shifted = image.copy()
    shifted[:, 128:256] += 40  # one tile column brighter: two visible vertical seams
    assert seam_ratio(shifted, 128) > 1.08
    glass = np.zeros((512, 512), bool)  # nothing is tissue: no border pair to measure
    with pytest.raises(InputError, match="no tile border"):
        seam_ratio(shifted, 128, mask=glass)
    with pytest.raises(InputError, match="period"):
        seam_ratio(image, 1)

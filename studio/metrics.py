"""Evaluation metrics: image quality, feature-distribution distances, nuclei instance metrics.

Three families, one module, so that every report in the studio scores the same way:

* **Image quality** (paired, batched torch, one value per image ``(B,)``): :func:`psnr`,
  :func:`ssim` (torchmetrics), :func:`ciede2000` / :func:`ciede2000_map` (CIEDE2000 colour
  difference on kornia's CIELAB, optionally restricted to a tissue mask).
* **Distribution distances** (unpaired sets of tiles) in the feature space of *any* encoder:
  :func:`encoder_features`, :func:`frechet_distance`, :func:`kernel_inception_distance`, and
  :func:`inception_feature_extractor` for the classic FID Inception when its weights are on disk.
* **Nuclei instance metrics** with the CoNIC 2022 challenge definitions
  (``TissueImageAnalytics/CoNIC``: ``compute_stats.py``, ``metrics/stats_utils.py``,
  ``misc/utils.py``): :func:`remap_label`, :func:`pair_instances`, :func:`panoptic_quality`,
  :func:`binary_pq_dataset` (CoNIC "PQ"), :func:`multi_pq_plus` (CoNIC "mPQ+"),
  :func:`class_counts`, :func:`counts_r2` (CoNIC multi-class R²), plus :func:`dice`,
  :func:`instance_centroids` and :func:`detection_f1`.

Conventions: tiles are float RGB tensors ``(B, 3, H, W)`` in [0, 1] (see :mod:`studio.color`);
label maps are integer numpy arrays ``(H, W)`` with 0 = background (torch CPU tensors are
accepted and converted). Bad input raises :class:`~studio.errors.InputError` naming the
argument and, for shape problems, both shapes.

Where this module departs from the CoNIC reference code, on purpose:

* no ``1e-6`` in denominators: the reference computes ``dq = TP / (TP + FP/2 + FN/2 + 1e-6)``
  and ``sq = sumIoU / (TP + 1e-6)``, so perfect predictions score 0.999999. Here the ratios
  are exact (identical maps give exactly 1) and the only case the epsilon really decided,
  "nothing to match" (TP = FP = FN = 0), is explicit: it scores ``empty_pq``, default 0.0,
  which is what the reference's epsilon yields (0 / 1e-6 = 0). Pass ``empty_pq=1.0`` to
  count an empty image predicted empty as perfect, or ``float("nan")`` to leave such
  images (or classes) out of the averages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import poly_mmd

from studio.color import rgb_to_lab
from studio.errors import InputError, WeightsError
from studio.io import to_tensor

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
# Half the Gaussian window (int(3.5 * sigma + 0.5) = 5 px): SSIM values this close to the
# border are computed from padding, not image, and are left out of the mean.
SSIM_BORDER = 5
INCEPTION_FEATURE_SIZES = (64, 192, 768, 2048)


# =========================================================================== image quality
def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU first."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_image_pair(
    pred: torch.Tensor, target: torch.Tensor, *, rgb: bool = False, min_side: int = 1
) -> None:
    """Both tiles are float ``(B, C, H, W)`` tensors of one shape, or an InputError says why."""
    for name, tiles in (("pred", pred), ("target", target)):
        if not isinstance(tiles, torch.Tensor):
            raise InputError(name, f"is a {type(tiles).__name__}; expected a float tensor (B, C, H, W) "
                                   "(studio.io.to_tensor converts uint8 images)")
        if tiles.ndim != 4:
            raise InputError(name, f"shape {tuple(tiles.shape)}; expected (B, C, H, W)")
        if not tiles.is_floating_point():
            raise InputError(name, f"dtype {tiles.dtype}; expected float tiles in [0, 1]")
    if pred.shape != target.shape:
        raise InputError("pred", f"shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if rgb and pred.shape[1] != 3:
        raise InputError("pred", f"shape {tuple(pred.shape)}; expected 3 RGB channels (B, 3, H, W)")
    if min(pred.shape[-2:]) < min_side:
        raise InputError("pred", f"shape {tuple(pred.shape)}; tiles must be at least {min_side} px a side")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(data_range² / MSE)``.

    The MSE is taken over channels and pixels of each image and computed in float64 (via
    torchmetrics), so values agree with float64 references to ~1e-6 dB.

    Args:
        pred, target: ``(B, C, H, W)`` float tiles (``[0, 1]`` for the default ``data_range``).
        data_range: max - min of the pixel scale (1.0 for [0, 1] tiles, 255 for 8-bit values).

    Returns:
        ``(B,)`` in ``pred``'s dtype; ``+inf`` for an image identical to its target.
    """
    _check_image_pair(pred, target)
    value = peak_signal_noise_ratio(
        pred.double(), target.double(), data_range=float(data_range), reduction="none", dim=(1, 2, 3)
    )
    return value.to(pred.dtype)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004; Gaussian window 11 px, sigma 1.5).

    The SSIM map comes from torchmetrics' ``structural_similarity_index_measure``; its mean
    is taken over the *valid* region only, i.e. without the 5-px border where the window
    reaches into padding. That is the convention of Wang et al.'s reference code and of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``, which this matches to ~1e-5 in float32. torchmetrics'
    own reduction (1.9) averages the full map including the reflect-padded border, which
    moved real 256x256 H&E scores by up to 1.3e-3 (0.1572 vs 0.1585 for two unrelated tiles).

    Args:
        pred, target: ``(B, C, H, W)`` float tiles, H and W >= 11.
        data_range: max - min of the pixel scale (1.0 for [0, 1] tiles).

    Returns:
        ``(B,)`` mean SSIM over channels and valid pixels, in [-1, 1].
    """
    _check_image_pair(pred, target, min_side=SSIM_KERNEL_SIZE)
    _, ssim_map = structural_similarity_index_measure(
        pred, target, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL_SIZE,
        reduction="none", data_range=float(data_range), return_full_image=True,
    )
    b = SSIM_BORDER
    return ssim_map[..., b:-b, b:-b].mean(dim=(1, 2, 3))


def delta_e_ciede2000(
    lab_a: torch.Tensor, lab_b: torch.Tensor, kl: float = 1.0, kc: float = 1.0, kh: float = 1.0
) -> torch.Tensor:
    """CIEDE2000 colour difference between two CIELAB images (Sharma, Wu & Dalal 2005).

    Implemented in torch (runs on the tiles' device, batched) with the same branch choices
    as ``skimage.color.deltaE_ciede2000``: hue angles in [0, 2π), hue difference and mean
    hue per Sharma's equations, and where one colour is achromatic (C'₁C'₂ = 0) the hue
    difference is 0 and the mean hue is h'₁ + h'₂.

    Args:
        lab_a, lab_b: ``(B, 3, H, W)`` CIELAB (L in [0, 100]).
        kl, kc, kh: parametric weights of lightness, chroma and hue (1 for reference conditions).

    Returns:
        ``(B, H, W)`` ΔE₀₀ (about 1 = just noticeable difference).
    """
    l1, a1, b1 = lab_a.unbind(dim=1)
    l2, a2, b2 = lab_b.unbind(dim=1)
    two_pi = 2.0 * math.pi
    pow25_7 = 25.0**7

    # Stretch a* by how chromatic the pair is on average; then work in the primed L'C'h'.
    c_bar = 0.5 * (torch.hypot(a1, b1) + torch.hypot(a2, b2))
    c7 = c_bar.pow(7)
    g = 0.5 * (1.0 - torch.sqrt(c7 / (c7 + pow25_7)))
    a1p, a2p = a1 * (1.0 + g), a2 * (1.0 + g)
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), two_pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), two_pi)

    achromatic = (c1p * c2p) == 0
    h_diff = h2p - h1p
    dh = torch.where(h_diff < -math.pi, h_diff + two_pi, h_diff)
    dh = torch.where(h_diff > math.pi, h_diff - two_pi, dh)
    dh = torch.where(achromatic, torch.zeros_like(dh), dh)
    d_hue = 2.0 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2.0)

    h_sum = h1p + h2p
    wrapped = torch.where(h_sum < two_pi, h_sum + two_pi, h_sum - two_pi)
    h_bar = torch.where(h_diff.abs() > math.pi, wrapped, h_sum)
    h_bar = torch.where(achromatic, h_sum, 0.5 * h_bar)

    l_bar = 0.5 * (l1 + l2)
    l50 = (l_bar - 50.0).pow(2)
    s_l = 1.0 + 0.015 * l50 / torch.sqrt(20.0 + l50)
    cp_bar = 0.5 * (c1p + c2p)
    s_c = 1.0 + 0.045 * cp_bar
    t = (1.0 - 0.17 * torch.cos(h_bar - math.radians(30.0))
         + 0.24 * torch.cos(2.0 * h_bar)
         + 0.32 * torch.cos(3.0 * h_bar + math.radians(6.0))
         - 0.20 * torch.cos(4.0 * h_bar - math.radians(63.0)))
    s_h = 1.0 + 0.015 * cp_bar * t
    cp7 = cp_bar.pow(7)
    r_c = 2.0 * torch.sqrt(cp7 / (cp7 + pow25_7))
    d_theta = math.radians(30.0) * torch.exp(-(((torch.rad2deg(h_bar) - 275.0) / 25.0) ** 2))
    r_t = -torch.sin(2.0 * d_theta) * r_c

    l_term = (l2 - l1) / (kl * s_l)
    c_term = (c2p - c1p) / (kc * s_c)
    h_term = d_hue / (kh * s_h)
    de2 = l_term.pow(2) + c_term.pow(2) + h_term.pow(2) + r_t * c_term * h_term
    return torch.sqrt(de2.clamp_min(0.0))


def ciede2000_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel CIEDE2000 between two RGB tiles ``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W)``.

    Both tiles go through :func:`studio.color.rgb_to_lab` (kornia, D65, sRGB companding;
    within 6e-5 of ``skimage.color.rgb2lab`` in float32), then :func:`delta_e_ciede2000`.
    """
    _check_image_pair(pred, target, rgb=True)
    return delta_e_ciede2000(rgb_to_lab(pred), rgb_to_lab(target))


def ciede2000(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CIEDE2000 per image: how far colours moved (stain transfer, generation).

    Args:
        pred, target: ``(B, 3, H, W)`` RGB tiles in [0, 1].
        mask: optional boolean ``(B, 1, H, W)`` (or ``(B, H, W)``) of pixels to average over,
            e.g. :func:`studio.color.tissue_mask` of the target so that glass does not dilute
            the score.

    Returns:
        ``(B,)`` mean ΔE₀₀; NaN for an image whose mask selects no pixel (there is nothing
        to compare, and 0 would read as "perfect").
    """
    delta = ciede2000_map(pred, target)
    if mask is None:
        return delta.mean(dim=(1, 2))
    if not isinstance(mask, torch.Tensor):
        raise InputError("mask", f"is a {type(mask).__name__}; expected a boolean tensor (B, 1, H, W)")
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != tuple(delta.shape):
        raise InputError("mask", f"shape {tuple(mask.shape)} does not fit pred shape {tuple(pred.shape)}; "
                                 "expected (B, 1, H, W)")
    mask = mask.to(device=delta.device, dtype=torch.bool)
    total = torch.where(mask, delta, torch.zeros_like(delta)).sum(dim=(1, 2))
    count = mask.sum(dim=(1, 2)).to(delta.dtype)
    return total / count  # 0 / 0 = NaN for an empty mask, by design


# =========================================================================== seams
def seam_ratio(image: Any, period: int, mask: Any | None = None) -> float:
    """Gradient energy across tile borders / inside tiles (1.0 = invisible seams).

    Why this and not a visual check: a tiled transform that disagrees with itself at tile
    borders (colour offsets, noise that does not continue) raises the mean absolute
    luminance step between the last column of one tile and the first of the next above the
    step between neighbouring columns elsewhere. Borders lie every ``period`` px from the
    origin, on both axes; the column pairs next to a border are left out of "inside" so a
    cross-fade band does not count against itself. ``mask`` (H, W) restricts both means to
    pixel pairs inside it (tissue), so blank glass does not dilute the ratio.
    """
    img = _to_numpy(image)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise InputError("image", f"shape {img.shape}; expected (H, W, C)")
    if period < 2 or period >= max(img.shape[:2]):
        raise InputError("period", f"{period}; expected 2 <= period < image size {img.shape[:2]}")
    lum = img[..., :3].astype(np.float32).mean(axis=2)
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    if keep is not None and keep.shape != lum.shape:
        raise InputError("mask", f"shape {keep.shape} does not fit image {lum.shape}")
    ratios = []
    for axis in (1, 0):
        grad = np.abs(np.diff(lum, axis=axis))
        valid = np.ones_like(grad, dtype=bool) if keep is None else (
            keep[:, 1:] & keep[:, :-1] if axis == 1 else keep[1:] & keep[:-1])
        idx = np.arange(grad.shape[axis])
        border = (idx + 1) % period == 0  # the step between pixel k*period-1 and k*period
        near = border | np.roll(border, 1) | np.roll(border, -1)
        sel_b = np.expand_dims(border, 1 - axis) & valid
        sel_i = np.expand_dims(~near, 1 - axis) & valid
        if sel_b.any() and sel_i.any():
            ratios.append(grad[sel_b].mean() / max(grad[sel_i].mean(), 1e-6))
    if not ratios:
        raise InputError("image", "no tile border falls inside the (masked) image")
    return float(np.mean(ratios))


# =========================================================================== feature distances
def _as_tile_batches(tiles: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield float ``(b, 3, H, W)`` chunks of at most ``batch_size`` from a tensor, array or iterable."""
    if isinstance(tiles, (torch.Tensor, np.ndarray)):
        items: Iterable[Any] = [tiles]
    else:
        items = tiles
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8:
                raise InputError(f"tiles[{i}]", f"numpy dtype {item.dtype}; pass uint8 (H, W, 3) images "
                                                "or float tensors (B, 3, H, W)")
            item = to_tensor(item)
        if not isinstance(item, torch.Tensor):
            raise InputError(f"tiles[{i}]", f"is a {type(item).__name__}; expected tensors (B, 3, H, W)")
        if item.ndim == 3:
            item = item.unsqueeze(0)
        if item.ndim != 4 or item.shape[1] != 3:
            raise InputError(f"tiles[{i}]", f"shape {tuple(item.shape)}; expected (B, 3, H, W) or (3, H, W)")
        if not item.is_floating_point():
            raise InputError(f"tiles[{i}]", f"dtype {item.dtype}; expected float tiles in [0, 1]")
        yield from item.split(batch_size)


def _module_device_dtype(encoder: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, Any]:
    if isinstance(encoder, torch.nn.Module):
        for param in encoder.parameters():
            return param.device, (param.dtype if param.is_floating_point() else None)
    return None, None


def encoder_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    tiles: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    batch_size: int = 32,
) -> torch.Tensor:
    """Embed tiles with any encoder, for :func:`frechet_distance` / :func:`kernel_inception_distance`.

    FID's Inception-v3 saw no histology and its weights cannot be fetched here, so the
    distribution distances take features from whatever encoder the user trusts (a
    pathology foundation model, a DINO ViT, :func:`inception_feature_extractor`, ...).

    Args:
        encoder: callable or ``nn.Module`` mapping float ``(b, 3, H, W)`` to ``(b, D)``
            features or ``(b, N, D)`` tokens (mean-pooled over N). A module is run in eval
            mode (its previous mode is restored) under ``torch.no_grad``, on the device and
            float dtype of its first parameter.
        tiles: one float tensor ``(N, 3, H, W)`` in [0, 1], a uint8 ``(N, H, W, 3)`` array,
            or an iterable of such batches / single ``(3, H, W)`` tiles (e.g. a DataLoader
            yielding tensors).
        batch_size: at most this many tiles go through the encoder at once.

    Returns:
        ``(N, D)`` float32 features on the CPU.
    """
    if int(batch_size) < 1:
        raise InputError("batch_size", f"is {batch_size}; expected a positive integer")
    device, dtype = _module_device_dtype(encoder)
    was_training = isinstance(encoder, torch.nn.Module) and encoder.training
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in _as_tile_batches(tiles, int(batch_size)):
                x = batch.to(device=batch.device if device is None else device, dtype=dtype or batch.dtype)
                feats = encoder(x)
                if not isinstance(feats, torch.Tensor):
                    raise InputError("encoder", f"returned a {type(feats).__name__}; wrap it so that it "
                                                "returns a tensor, e.g. lambda x: model(x).pooler_output")
                if feats.ndim == 3:
                    feats = feats.mean(dim=1)
                if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                    raise InputError("encoder", f"returned shape {tuple(feats.shape)} for input "
                                                f"{tuple(x.shape)}; expected (B, D) or (B, N, D) tokens")
                out.append(feats.detach().float().cpu())
    finally:
        if was_training:
            encoder.train()
    if not out:
        raise InputError("tiles", "is empty; no tiles to embed")
    return torch.cat(out)


def _as_feature_matrix(feats: Any, name: str, min_rows: int = 2) -> np.ndarray:
    arr = np.asarray(_to_numpy(feats), dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(name, f"shape {arr.shape}; expected (N, D) features")
    if arr.shape[0] < min_rows:
        raise InputError(name, f"has {arr.shape[0]} samples; at least {min_rows} are needed")
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or infinite values")
    return arr


def _check_same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError("feats_b", f"shape {b.shape}: feature size differs from feats_a shape {a.shape}")


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID in any feature space).

    ``d² = |μa - μb|² + Tr(Σa + Σb - 2 (Σa Σb)^½)`` with unbiased (N-1) covariances, as in
    pytorch-fid and torchmetrics.

    Written here in closed form rather than through torchmetrics because its
    ``FrechetInceptionDistance`` only accepts images pushed through its own feature module
    (raw features need a fake identity "network" with a ``num_features`` attribute), keeps
    covariances as raw second-moment sums (``Σxxᵀ - nμμᵀ`` cancels badly when features have
    large means), and takes ``sqrt(eigvals(Σa Σb))`` of a *non-symmetric* product, where
    round-off yields complex or negative eigenvalues. Here everything is float64 and the
    trace term uses the symmetric PSD matrix ``Σa^½ Σb Σa^½`` (same eigenvalues as Σa Σb):
    ``eigh`` on symmetric matrices is stable and tiny negative eigenvalues are clipped to 0.

    Args:
        feats_a, feats_b: ``(Na, D)`` and ``(Nb, D)`` features (tensors or arrays), N >= 2.

    Returns:
        the squared distance d² (the number reported as "FID"), clipped at 0 against round-off.
    """
    a = _as_feature_matrix(feats_a, "feats_a")
    b = _as_feature_matrix(feats_b, "feats_b")
    _check_same_width(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    middle = 0.5 * (middle + middle.T)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    d2 = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(d2, 0.0)


def kernel_inception_distance(
    feats_a: torch.Tensor | np.ndarray,
    feats_b: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) between two feature sets.

    The unbiased MMD² with the polynomial kernel ``k(x, y) = (γ xᵀy + coef)^degree``
    (γ = 1/D by default), averaged over random subsets. The per-subset estimator is
    torchmetrics' ``poly_mmd`` (run in float64); the subset sampling is done here with a
    seeded generator (torchmetrics' metric uses the global RNG), each subset drawn without
    replacement from each set. Unbiased means it can be slightly negative for close sets.

    Args:
        feats_a, feats_b: ``(Na, D)`` and ``(Nb, D)`` features.
        subsets: number of random subsets (torchmetrics' default 100).
        subset_size: samples per subset; default ``min(1000, Na, Nb)`` (1000 as in the paper).
        seed: seed of the subset sampling (same seed, same answer).
        degree, gamma, coef: polynomial kernel parameters.

    Returns:
        ``(mean, std)`` over subsets (population std, as torchmetrics).
    """
    a = torch.from_numpy(_as_feature_matrix(feats_a, "feats_a"))
    b = torch.from_numpy(_as_feature_matrix(feats_b, "feats_b"))
    _check_same_width(a.numpy(), b.numpy())
    n_a, n_b = a.shape[0], b.shape[0]
    if subset_size is None:
        subset_size = min(1000, n_a, n_b)
    if not 2 <= int(subset_size) <= min(n_a, n_b):
        raise InputError("subset_size", f"is {subset_size}; expected 2 <= subset_size <= min(Na, Nb) = "
                                        f"{min(n_a, n_b)} (feats_a {tuple(a.shape)}, "
                                        f"feats_b {tuple(b.shape)})")
    if int(subsets) < 1:
        raise InputError("subsets", f"is {subsets}; expected a positive integer")
    generator = torch.Generator().manual_seed(int(seed))
    scores = []
    for _ in range(int(subsets)):
        sub_a = a[torch.randperm(n_a, generator=generator)[:subset_size]]
        sub_b = b[torch.randperm(n_b, generator=generator)[:subset_size]]
        scores.append(poly_mmd(sub_a, sub_b, degree=degree, gamma=gamma, coef=coef))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


class _UInt8Tiles(torch.nn.Module):
    """Feed studio tiles (float [0, 1]) to a network that expects uint8 images (torch-fidelity)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.net(tiles.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8))


def inception_feature_extractor(weights_path: str | Path, feature: int = 2048) -> torch.nn.Module:
    """The FID Inception-v3 (torchmetrics / torch-fidelity port of the TF graph), from a local file.

    Nothing is downloaded: the user provides torch-fidelity's weights file
    (``pt_inception-2015-12-05-6726825d.pth``) and installs the optional ``torch-fidelity``
    package. The returned module takes studio tiles ``(B, 3, H, W)`` float in [0, 1]
    (converted to uint8 and resized to 299 inside) and returns ``(B, feature)``; pass it to
    :func:`encoder_features`.

    Raises:
        InputError: the weights file is missing, torch-fidelity is not installed, or
            ``feature`` is not one of 64, 192, 768, 2048.
        WeightsError: the file exists but does not load as these Inception weights.
    """
    path = Path(weights_path)
    if feature not in INCEPTION_FEATURE_SIZES:
        raise InputError("feature", f"is {feature}; choose one of {INCEPTION_FEATURE_SIZES}")
    if not path.is_file():
        raise InputError(path, "no such weights file; download torch-fidelity's "
                               "pt_inception-2015-12-05-6726825d.pth yourself and pass its path "
                               "(the studio never downloads weights)")
    try:
        import torch_fidelity  # noqa: F401  (only to test that it is installed)
    except ImportError as exc:
        raise InputError("torch-fidelity", "is not installed; FID's Inception network comes from this "
                                           "optional package (pip install torch-fidelity), or use "
                                           "encoder_features with another encoder") from exc
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(feature)], feature_extractor_weights_path=str(path)
        )
    except Exception as exc:  # unpickling / state-dict mismatch
        raise WeightsError(path, f"does not load as the FID Inception-v3 weights ({exc})") from exc
    return _UInt8Tiles(net).eval()


# =========================================================================== nuclei: helpers
def _as_label_map(labels: Any, name: str) -> np.ndarray:
    """A 2-D non-negative integer label map (0 = background), or an InputError naming ``name``."""
    arr = _to_numpy(labels)
    if arr.ndim != 2:
        raise InputError(name, f"shape {arr.shape}; expected a 2-D (H, W) label map")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(name, f"dtype {arr.dtype}; expected integer labels (0 = background)")
    if arr.size and arr.min() < 0:
        raise InputError(name, f"has negative label {arr.min()}; labels must be >= 0 (0 = background)")
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise InputError(name_b, f"shape {b.shape} differs from {name_a} shape {a.shape}")


def _as_map_list(maps: Any, name: str) -> list[Any]:
    """``(N, H, W)`` array/tensor or a sequence of ``(H, W)`` maps -> list of per-image maps."""
    if isinstance(maps, (np.ndarray, torch.Tensor)):
        if maps.ndim == 2:
            raise InputError(name, f"shape {tuple(maps.shape)} is one image; pass (N, H, W) or a list")
        return list(maps)
    if isinstance(maps, Sequence):
        return list(maps)
    raise InputError(name, f"is a {type(maps).__name__}; expected (N, H, W) or a list of (H, W) maps")


def _check_lengths(**named: list[Any]) -> None:
    (first_name, first), *rest = named.items()
    for name, items in rest:
        if len(items) != len(first):
            raise InputError(name, f"has {len(items)} images but {first_name} has {len(first)}")


def remap_label(inst: np.ndarray, by_size: bool = False) -> np.ndarray:
    """Relabel instances to contiguous ids 1..n, keeping 0 as background (CoNIC ``remap_label``).

    Args:
        inst: ``(H, W)`` integer instance map.
        by_size: number larger instances first (ties keep id order) instead of by old id.

    Returns:
        ``(H, W)`` int32 map; instance order follows the old ids unless ``by_size``.
    """
    inst = _as_label_map(inst, "inst")
    ids, inverse, counts = np.unique(inst, return_inverse=True, return_counts=True)
    new_of_old = np.zeros(ids.size, dtype=np.int32)
    nonzero = np.flatnonzero(ids != 0)
    order = nonzero[np.argsort(-counts[nonzero], kind="stable")] if by_size else nonzero
    new_of_old[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return new_of_old[inverse.reshape(inst.shape)]


class InstancePairs(NamedTuple):
    """Result of :func:`pair_instances`; ids are the ids of the input maps."""

    pairs: np.ndarray  # (k, 2) int64: (true_id, pred_id) per match, sorted by true_id
    unmatched_true: np.ndarray  # (m,) ids of true instances without a match (false negatives)
    unmatched_pred: np.ndarray  # (n,) ids of predicted instances without a match (false positives)
    iou: np.ndarray  # (k,) float64 IoU of each matched pair


def _overlaps(
    true: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Instance ids and the IoU of every overlapping (true, pred) pair, from one pass over pixels."""
    t = true.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    true_ids, true_area = np.unique(t[t > 0], return_counts=True)
    pred_ids, pred_area = np.unique(p[p > 0], return_counts=True)
    both = (t > 0) & (p > 0)
    stride = int(p.max(initial=0)) + 1
    keys, inter = np.unique(t[both] * stride + p[both], return_counts=True)
    ti = np.searchsorted(true_ids, keys // stride)
    pi = np.searchsorted(pred_ids, keys % stride)
    iou = inter / (true_area[ti] + pred_area[pi] - inter)
    return true_ids, pred_ids, ti, pi, iou


def best_match(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each reference id ``1..max``: the best IoU with any instance of ``other``, and that
    instance's id (0 and 0 where none overlaps, or the id is absent).

    Unlike :func:`pair_instances` this is not a one-to-one pairing: it asks, per nucleus,
    "does another segmentation see it, and how well" (agreement across views, recall of a
    kept subset), from the same one-pass overlap table.
    """
    ref = _as_label_map(reference, "reference")
    oth = _as_label_map(other, "other")
    _check_same_shape(ref, oth, "reference", "other")
    n = int(ref.max(initial=0))
    best = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)
    true_ids, pred_ids, ti, pi, iou = _overlaps(ref, oth)
    if iou.size:
        order = np.lexsort((iou, ti))  # per reference nucleus, its best overlap last
        ti, pi, iou = ti[order], pi[order], iou[order]
        last = np.r_[ti[1:] != ti[:-1], True]
        best[true_ids[ti[last]]] = iou[last]
        match[true_ids[ti[last]]] = pred_ids[pi[last]]
    return best[1:], match[1:]


def pair_instances(true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5) -> InstancePairs:
    """Match true and predicted nuclei one-to-one by IoU (CoNIC / HoVer-Net ``get_pq`` pairing).

    With ``match_iou >= 0.5`` a pair matches when IoU > ``match_iou`` (strictly): in a map
    without overlapping instances, each nucleus has at most one partner above 0.5, so the
    pairing is unique and maximal without any assignment solver. Below 0.5, pairs are
    chosen by maximum-total-IoU assignment (``linear_sum_assignment``) and then kept when
    IoU > ``match_iou``, as in the reference.

    Args:
        true_inst, pred_inst: ``(H, W)`` integer instance maps of one image (ids need not be
            contiguous).
        match_iou: IoU threshold in [0, 1).
    """
    true = _as_label_map(true_inst, "true_inst")
    pred = _as_label_map(pred_inst, "pred_inst")
    _check_same_shape(true, pred, "true_inst", "pred_inst")
    if not 0.0 <= match_iou < 1.0:
        raise InputError("match_iou", f"is {match_iou}; expected 0 <= match_iou < 1")
    true_ids, pred_ids, ti, pi, iou = _overlaps(true, pred)
    if match_iou >= 0.5:
        keep = iou > match_iou
        ti, pi, iou = ti[keep], pi[keep], iou[keep]
    elif iou.size:
        dense = np.zeros((true_ids.size, pred_ids.size))
        dense[ti, pi] = iou
        rows, cols = linear_sum_assignment(-dense)
        keep = dense[rows, cols] > match_iou
        ti, pi, iou = rows[keep], cols[keep], dense[rows[keep], cols[keep]]
    order = np.argsort(ti, kind="stable")
    ti, pi, iou = ti[order], pi[order], iou[order]
    pairs = np.stack([true_ids[ti], pred_ids[pi]], axis=1).astype(np.int64).reshape(-1, 2)
    return InstancePairs(
        pairs=pairs,
        unmatched_true=np.setdiff1d(true_ids, true_ids[ti]).astype(np.int64),
        unmatched_pred=np.setdiff1d(pred_ids, pred_ids[pi]).astype(np.int64),
        iou=iou.astype(np.float64),
    )


def _pq_from_counts(tp: float, fp: float, fn: float, sum_iou: float, empty_pq: float) -> dict[str, float]:
    """dq = TP / (TP + FP/2 + FN/2), sq = sumIoU / TP (0 when TP = 0), pq = dq * sq."""
    if tp + fp + fn == 0:
        return {"dq": empty_pq, "sq": empty_pq, "pq": empty_pq}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum_iou / tp if tp > 0 else 0.0
    return {"dq": float(dq), "sq": float(sq), "pq": float(dq * sq)}


def _pq_counts(true: np.ndarray, pred: np.ndarray, match_iou: float) -> tuple[int, int, int, float]:
    result = pair_instances(true, pred, match_iou)
    return len(result.pairs), len(result.unmatched_pred), len(result.unmatched_true), float(result.iou.sum())


def panoptic_quality(
    true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5, empty_pq: float = 0.0
) -> dict[str, float]:
    """Binary panoptic quality of one image (Kirillov et al.; CoNIC ``get_pq``).

    ``dq = TP / (TP + FP/2 + FN/2)`` (detection F1), ``sq = sumIoU / TP`` (mean IoU of
    matched pairs, 0 when TP = 0), ``pq = dq * sq``; matching as in :func:`pair_instances`.

    Args:
        true_inst, pred_inst: ``(H, W)`` integer instance maps, 0 = background.
        match_iou: IoU a pair must exceed to count as a true positive.
        empty_pq: dq, sq and pq when neither map has a nucleus. Default 0.0 reproduces the
            CoNIC reference (its ``+1e-6`` denominators give 0 / 1e-6 = 0); 1.0 counts
            "nothing there, nothing predicted" as perfect; NaN marks it undefined.

    Returns:
        ``dict(dq, sq, pq, tp, fp, fn, sum_iou)``.
    """
    tp, fp, fn, sum_iou = _pq_counts(true_inst, pred_inst, match_iou)
    ratios = _pq_from_counts(tp, fp, fn, sum_iou, empty_pq)
    return {**ratios, "tp": tp, "fp": fp, "fn": fn, "sum_iou": sum_iou}


def _nan_aware_mean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def binary_pq_dataset(
    true_insts: Sequence[np.ndarray] | np.ndarray,
    pred_insts: Sequence[np.ndarray] | np.ndarray,
    match_iou: float = 0.5,
    empty_pq: float = 0.0,
) -> dict[str, Any]:
    """CoNIC "PQ": binary panoptic quality per image, then averaged over images.

    Args:
        true_insts, pred_insts: ``(N, H, W)`` or lists of ``(H, W)`` instance maps.
        match_iou, empty_pq: as in :func:`panoptic_quality`; images scored NaN (``empty_pq=nan``)
            are left out of the means.

    Returns:
        ``dict(pq, dq, sq)`` means over images and ``per_image`` ``(N,)`` pq values.
    """
    trues = _as_map_list(true_insts, "true_insts")
    preds = _as_map_list(pred_insts, "pred_insts")
    _check_lengths(true_insts=trues, pred_insts=preds)
    if not trues:
        raise InputError("true_insts", "is empty; no images to score")
    rows = []
    for i, (t, p) in enumerate(zip(trues, preds, strict=True)):
        true = _as_label_map(t, f"true_insts[{i}]")
        pred = _as_label_map(p, f"pred_insts[{i}]")
        _check_same_shape(true, pred, f"true_insts[{i}]", f"pred_insts[{i}]")
        rows.append(panoptic_quality(true, pred, match_iou, empty_pq))
    table = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in ("pq", "dq", "sq")}
    return {**{key: _nan_aware_mean(values) for key, values in table.items()}, "per_image": table["pq"]}


def _check_class_map(cls: Any, name: str, inst: np.ndarray, inst_name: str, num_classes: int) -> np.ndarray:
    arr = _as_label_map(cls, name)
    _check_same_shape(inst, arr, inst_name, name)
    if arr.size and arr.max() > num_classes:
        raise InputError(name, f"has class {arr.max()} but num_classes is {num_classes} "
                               "(classes are 1..num_classes, 0 = background)")
    return arr


def multi_pq_plus(
    true_insts: Sequence[np.ndarray] | np.ndarray,
    true_classes: Sequence[np.ndarray] | np.ndarray,
    pred_insts: Sequence[np.ndarray] | np.ndarray,
    pred_classes: Sequence[np.ndarray] | np.ndarray,
    num_classes: int,
    match_iou: float = 0.5,
    empty_pq: float = 0.0,
) -> dict[str, Any]:
    """CoNIC multi-class panoptic quality mPQ+: statistics summed over the dataset per class.

    For each class c in 1..num_classes and each image, both instance maps are restricted
    *pixel-wise* to pixels of class c (``inst * (cls == c)``, as the reference does: a
    nucleus whose pixels carry two classes is split between them) and matched at
    IoU > ``match_iou``; TP, FP, FN and sumIoU are **summed over all images** before
    ``dq_c``, ``sq_c``, ``pq_c`` are computed, so a class that is rare or absent in some
    images does not drag those images' scores to 0 or 1. mPQ+ is the mean of ``pq_c``.
    A class present in the truth but never predicted has TP = 0, hence pq 0.

    Args:
        true_insts, pred_insts: ``(N, H, W)`` or lists of ``(H, W)`` integer instance maps.
        true_classes, pred_classes: same shapes, per-pixel class 0..num_classes (0 = background).
        num_classes: number of nucleus classes (CoNIC: 6).
        match_iou: IoU a pair must exceed.
        empty_pq: pq (and dq, sq) of a class with TP = FP = FN = 0 over the whole dataset.
            Default 0.0, like the reference's epsilon, and it counts in the mean; NaN
            leaves such classes out of mPQ+.

    Returns:
        dict with ``mpq_plus`` (float), ``classes`` ``(C,)`` = 1..C, and per-class ``(C,)``
        arrays ``pq``, ``dq``, ``sq``, ``tp``, ``fp``, ``fn``, ``sum_iou``.
    """
    if int(num_classes) < 1:
        raise InputError("num_classes", f"is {num_classes}; expected at least 1")
    lists = {
        "true_insts": _as_map_list(true_insts, "true_insts"),
        "true_classes": _as_map_list(true_classes, "true_classes"),
        "pred_insts": _as_map_list(pred_insts, "pred_insts"),
        "pred_classes": _as_map_list(pred_classes, "pred_classes"),
    }
    _check_lengths(**lists)
    if not lists["true_insts"]:
        raise InputError("true_insts", "is empty; no images to score")
    counts = np.zeros((num_classes, 4), dtype=np.float64)  # tp, fp, fn, sum_iou
    for i in range(len(lists["true_insts"])):
        true = _as_label_map(lists["true_insts"][i], f"true_insts[{i}]")
        pred = _as_label_map(lists["pred_insts"][i], f"pred_insts[{i}]")
        _check_same_shape(true, pred, f"true_insts[{i}]", f"pred_insts[{i}]")
        true_cls = _check_class_map(lists["true_classes"][i], f"true_classes[{i}]", true, f"true_insts[{i}]",
                                    num_classes)
        pred_cls = _check_class_map(lists["pred_classes"][i], f"pred_classes[{i}]", pred, f"pred_insts[{i}]",
                                    num_classes)
        for c in range(1, num_classes + 1):
            counts[c - 1] += _pq_counts(np.where(true_cls == c, true, 0), np.where(pred_cls == c, pred, 0),
                                        match_iou)
    per_class = [_pq_from_counts(*row, empty_pq=empty_pq) for row in counts]
    pq = np.array([row["pq"] for row in per_class])
    return {
        "mpq_plus": _nan_aware_mean(pq),
        "classes": np.arange(1, num_classes + 1),
        "pq": pq,
        "dq": np.array([row["dq"] for row in per_class]),
        "sq": np.array([row["sq"] for row in per_class]),
        "tp": counts[:, 0].astype(np.int64),
        "fp": counts[:, 1].astype(np.int64),
        "fn": counts[:, 2].astype(np.int64),
        "sum_iou": counts[:, 3].copy(),
    }


def class_counts(inst: np.ndarray, cls: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of nuclei of each class in one image (the CoNIC counting task's per-image row).

    An instance's class is the majority class of its pixels, ignoring class-0 pixels
    (HoVer-Net's rule: background only wins when nothing else is there); ties go to the
    smaller class id. Instances whose pixels are all class 0 are not counted.

    Args:
        inst: ``(H, W)`` integer instance map.
        cls: ``(H, W)`` per-pixel class 0..num_classes.
        num_classes: C.

    Returns:
        ``(C,)`` int64 counts for classes 1..C.
    """
    if int(num_classes) < 1:
        raise InputError("num_classes", f"is {num_classes}; expected at least 1")
    inst = _as_label_map(inst, "inst")
    cls = _check_class_map(cls, "cls", inst, "inst", num_classes)
    ids, inverse = np.unique(inst, return_inverse=True)
    width = num_classes + 1
    votes = np.bincount(inverse.ravel() * width + cls.ravel().astype(np.int64), minlength=ids.size * width)
    votes = votes.reshape(ids.size, width)[ids != 0]
    votes[:, 0] = 0
    classified = votes.sum(axis=1) > 0
    winners = votes[classified].argmax(axis=1)
    return np.bincount(winners, minlength=width)[1:].astype(np.int64)


def counts_r2(true_counts: np.ndarray, pred_counts: np.ndarray) -> dict[str, Any]:
    """Coefficient of determination per class and its mean (CoNIC multi-class R²).

    Per column, ``R² = 1 - SS_res / SS_tot`` with ``SS_res = Σ(y - ŷ)²`` and
    ``SS_tot = Σ(y - ȳ)²``, exactly ``sklearn.metrics.r2_score`` (default
    ``force_finite=True``): a constant true column (SS_tot = 0) scores 1.0 when predicted
    exactly and 0.0 otherwise, instead of ±inf/NaN; with fewer than two images R² is
    undefined and NaN is returned (sklearn warns and returns NaN too).

    Args:
        true_counts, pred_counts: ``(N, C)`` nuclei counts per image (rows) and class (columns),
            e.g. stacked :func:`class_counts`.

    Returns:
        ``dict(r2=mean over classes, per_class=(C,) float64)``.
    """
    y = np.asarray(true_counts, dtype=np.float64)
    y_hat = np.asarray(pred_counts, dtype=np.float64)
    if y.ndim != 2:
        raise InputError("true_counts", f"shape {y.shape}; expected (N images, C classes)")
    if y_hat.shape != y.shape:
        raise InputError("pred_counts", f"shape {y_hat.shape} differs from true_counts shape {y.shape}")
    if y.shape[0] < 2:
        per_class = np.full(y.shape[1], np.nan)
    else:
        ss_res = ((y - y_hat) ** 2).sum(axis=0)
        ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        constant = ss_tot == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class = np.where(constant, np.where(ss_res == 0, 1.0, 0.0), 1.0 - ss_res / ss_tot)
    return {"r2": float(per_class.mean()) if per_class.size else float("nan"), "per_class": per_class}


# =========================================================================== overlap and detection
def dice(true_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """Binary Dice ``2|A∩B| / (|A| + |B|)``; any non-zero value is foreground.

    Returns 1.0 when both masks are empty (they agree perfectly; 0/0 otherwise).
    """
    a = _to_numpy(true_mask) != 0
    b = _to_numpy(pred_mask) != 0
    _check_same_shape(a, b, "true_mask", "pred_mask")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def instance_centroids(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass of every instance, for :func:`detection_f1`.

    Returns:
        ``ids`` ``(n,)`` int64 in increasing order and ``(n, 2)`` float64 ``(y, x)`` centroids
        in pixels (pixel centres at integer coordinates).
    """
    inst = _as_label_map(inst, "inst")
    ids, inverse, counts = np.unique(inst, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    yy, xx = np.indices(inst.shape)
    ys = np.bincount(inverse, weights=yy.ravel(), minlength=ids.size) / counts
    xs = np.bincount(inverse, weights=xx.ravel(), minlength=ids.size) / counts
    keep = ids != 0
    return ids[keep].astype(np.int64), np.stack([ys[keep], xs[keep]], axis=1).reshape(-1, 2)


def _as_points(points: Any, name: str) -> np.ndarray:
    arr = np.asarray(_to_numpy(points), dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(name, f"shape {arr.shape}; expected (n, 2) (y, x) points")
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or infinite coordinates")
    return arr


def _match_points(true: np.ndarray, pred: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a maximum one-to-one matching of points within ``radius`` (then least total distance).

    Only in-radius pairs are listed (KD-tree), the bipartite graph they form is split into
    connected components, and each component is solved exactly with ``linear_sum_assignment``
    on a cost where a missing edge costs more than any set of real ones. Components are
    independent, so this is optimal overall while staying small for thousands of nuclei.
    """
    if len(true) == 0 or len(pred) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    neighbours = cKDTree(true).query_ball_tree(cKDTree(pred), r=radius)
    rows = np.repeat(np.arange(len(true)), [len(n) for n in neighbours])
    cols = np.array([j for n in neighbours for j in n], dtype=np.int64)
    dist = np.linalg.norm(true[rows] - pred[cols], axis=1) if rows.size else np.zeros(0)
    keep = dist <= radius
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n_nodes = len(true) + len(pred)
    graph = coo_matrix((np.ones(rows.size), (rows, len(true) + cols)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    edge_component = component[rows]
    matched_true, matched_pred = [], []
    for comp in np.unique(edge_component):
        sel = edge_component == comp
        true_ids, r_local = np.unique(rows[sel], return_inverse=True)
        pred_ids, c_local = np.unique(cols[sel], return_inverse=True)
        missing = radius * (min(true_ids.size, pred_ids.size) + 1) + 1.0
        cost = np.full((true_ids.size, pred_ids.size), missing)
        cost[r_local, c_local] = dist[sel]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] <= radius
        matched_true.append(true_ids[r[ok]])
        matched_pred.append(pred_ids[c[ok]])
    return np.concatenate(matched_true), np.concatenate(matched_pred)


def detection_f1(
    true_centroids: np.ndarray, pred_centroids: np.ndarray, radius: float = 8.0
) -> dict[str, float]:
    """Detection F1 of nucleus centroids with optimal one-to-one matching within ``radius``.

    A prediction is a hit when it is matched to a true point at distance <= ``radius``
    (pixels); each point is used at most once. The matching maximises the number of hits
    (then minimises total distance among maximal matchings) with ``linear_sum_assignment``
    on a cost where out-of-radius pairs cost more than any set of in-radius ones. (HoVer-Net's
    ``pair_coordinates`` minimises total distance first and drops far pairs afterwards,
    which can lose hits.)

    Args:
        true_centroids, pred_centroids: ``(n, 2)`` and ``(m, 2)`` point coordinates.
        radius: match distance in pixels (e.g. 8 px ~ 4 µm at 0.5 µm/px).

    Returns:
        ``dict(f1, precision, recall, tp, fp, fn)``; a ratio with a 0 denominator is 0.0,
        except that two empty sets score 1.0 for all three (nothing to find, nothing found).
    """
    true = _as_points(true_centroids, "true_centroids")
    pred = _as_points(pred_centroids, "pred_centroids")
    if not radius > 0:
        raise InputError("radius", f"is {radius}; expected a positive distance in pixels")
    tp = len(_match_points(true, pred, float(radius))[0])
    fp, fn = len(pred) - tp, len(true) - tp
    if len(true) == 0 and len(pred) == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall),
            "tp": tp, "fp": fp, "fn": fn}


def _matched_nuclei(true_inst: np.ndarray, true_cls: np.ndarray, pred_inst: np.ndarray,
                    pred_cls: np.ndarray | None, radius: float) -> dict[str, Any]:
    """Nuclei of two label maps matched one-to-one by centroid within ``radius``, with the
    class of every nucleus (``pred_class`` None without ``pred_cls``)."""
    true_inst = _as_label_map(true_inst, "true_inst")
    pred_inst = _as_label_map(pred_inst, "pred_inst")
    _check_same_shape(true_inst, pred_inst, "true_inst", "pred_inst")
    t_ids, t_pts = instance_centroids(true_inst)
    p_ids, p_pts = instance_centroids(pred_inst)
    mt, mp = _match_points(t_pts, p_pts, float(radius))

    def class_of(inst: np.ndarray, cls: np.ndarray, ids: np.ndarray) -> np.ndarray:
        lut = np.zeros(int(inst.max(initial=0)) + 1, dtype=np.int64)
        fg = inst > 0
        lut[inst[fg]] = np.asarray(cls)[fg]
        return lut[ids]

    return {"true_inst": true_inst, "pred_inst": pred_inst, "true_points": t_pts, "pred_points": p_pts,
            "true_matched": mt, "pred_matched": mp, "true_class": class_of(true_inst, true_cls, t_ids),
            "pred_class": class_of(pred_inst, pred_cls, p_ids) if pred_cls is not None else None}


def mask_fidelity(
    true_inst: np.ndarray,
    true_cls: np.ndarray,
    pred_inst: np.ndarray,
    pred_cls: np.ndarray | None = None,
    num_classes: int = 5,
    radius: float = 8.0,
) -> dict[str, Any]:
    """How well nuclei found in a generated image match the label map it was drawn to.

    Object level: nuclei centroids matched one-to-one within ``radius`` px
    (:func:`detection_f1`); pixel level: foreground Dice. Per class ``c`` (codes
    ``1..num_classes``): the share of the map's class-``c`` nuclei that were found
    (``recall``); and, when the detector also classifies (``pred_cls``), class-aware F1
    (a hit must be matched *and* predicted as ``c``). Classes absent from the map get NaN.

    Returns:
        ``dict(f1, precision, recall, dice, n_true, n_pred, per_class={c: {n, recall, f1}})``.
    """
    m = _matched_nuclei(true_inst, true_cls, pred_inst, pred_cls, radius)
    t_class, p_class, mt, mp = m["true_class"], m["pred_class"], m["true_matched"], m["pred_matched"]
    det = detection_f1(m["true_points"], m["pred_points"], radius)
    true_inst, pred_inst = m["true_inst"], m["pred_inst"]
    per_class: dict[int, dict[str, float]] = {}
    for c in range(1, num_classes + 1):
        n = int((t_class == c).sum())
        hits = int((t_class[mt] == c).sum())
        row = {"n": n, "recall": hits / n if n else float("nan")}
        if p_class is not None:
            tp = int(((t_class[mt] == c) & (p_class[mp] == c)).sum())
            fp, fn = int((p_class == c).sum()) - tp, n - tp
            row["f1"] = 2 * tp / (2 * tp + fp + fn) if n else float("nan")
        per_class[c] = row
    return {"f1": det["f1"], "precision": det["precision"], "recall": det["recall"],
            "dice": dice(true_inst > 0, pred_inst > 0), "n_true": len(t_class), "n_pred": len(m["pred_points"]),
            "per_class": per_class}


def detection_confusion(
    true_inst: np.ndarray,
    true_cls: np.ndarray,
    pred_inst: np.ndarray,
    pred_cls: np.ndarray,
    num_classes: int = 5,
    radius: float = 8.0,
) -> np.ndarray:
    """Class confusion of nuclei matched one-to-one by centroid within ``radius`` px.

    Returns an ``(K + 1, K + 1)`` int64 matrix: ``[t, p]`` counts true class ``t`` nuclei
    matched to a nucleus predicted as ``p`` (codes ``1..K``); row 0 holds unmatched
    predictions (false detections, by predicted class), column 0 unmatched true nuclei
    (missed, by true class). Matrices of many tiles add up, so pooled recall
    (``1 - M[t, 0] / M[t].sum()``) and typing accuracy among detected nuclei
    (``M[t, t] / M[t, 1:].sum()``) come from one sum.
    """
    m = _matched_nuclei(true_inst, true_cls, pred_inst, pred_cls, radius)
    mt, mp = m["true_matched"], m["pred_matched"]
    t_class, p_class = (np.clip(m[k], 0, num_classes) for k in ("true_class", "pred_class"))
    out = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    np.add.at(out, (t_class[mt], p_class[mp]), 1)
    missed = np.setdiff1d(np.arange(len(t_class)), mt)
    false = np.setdiff1d(np.arange(len(p_class)), mp)
    np.add.at(out, (t_class[missed], 0), 1)
    np.add.at(out, (0, p_class[false]), 1)
    return out


__all__ = [
    "InstancePairs",
    "detection_confusion",
    "binary_pq_dataset",
    "ciede2000",
    "ciede2000_map",
    "class_counts",
    "counts_r2",
    "delta_e_ciede2000",
    "detection_f1",
    "dice",
    "encoder_features",
    "frechet_distance",
    "inception_feature_extractor",
    "instance_centroids",
    "kernel_inception_distance",
    "mask_fidelity",
    "multi_pq_plus",
    "pair_instances",
    "panoptic_quality",
    "psnr",
    "remap_label",
    "ssim",
]

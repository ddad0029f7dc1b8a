"""Colour conventions the whole studio shares."""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import rgb2hed, rgb2lab

from studio.color import (
    RUIFROK_HED,
    hed_to_rgb,
    lab_to_rgb,
    od_to_rgb,
    rgb_to_hed,
    rgb_to_lab,
    rgb_to_od,
    stain_concentrations,
    tissue_mask,
    transfer_colour,
)
from studio.data.samples import load_sample
from studio.io import to_tensor


def test_od_round_trip_and_beer_lambert():
    rgb = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(od_to_rgb(rgb_to_od(rgb)), rgb, atol=1e-6, rtol=0)
    white = torch.ones(1, 3, 2, 2)
    assert rgb_to_od(white).abs().max() < 0.005  # glass absorbs nothing
    assert torch.isfinite(rgb_to_od(torch.zeros(1, 3, 2, 2))).all()  # black stays finite


def test_hed_matches_scikit_image_up_to_its_log_convention():
    real = load_sample("hgsc_nest")[:64, :64]
    # skimage: OD = -ln(max(rgb, 1e-6)) scaled by 1/-ln(1e-6), negatives clamped to 0.
    t = to_tensor(real).double().clamp_min(1e-6)
    ours = stain_concentrations(-torch.log(t), RUIFROK_HED.double())[0].permute(1, 2, 0).numpy()
    ours = np.maximum(ours / -np.log(1e-6), 0)
    np.testing.assert_allclose(ours, rgb2hed(real), atol=2e-3)
    # With the studio's own convention (offset 1/255) HED inverts exactly.
    t = to_tensor(real)
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(t)), t, atol=2e-3, rtol=0)
    assert torch.allclose(RUIFROK_HED.norm(dim=0), torch.ones(3))


def test_lab_matches_scikit_image_on_real_pixels():
    real = load_sample("tiatoolbox_target")[:64, :64]
    ours = rgb_to_lab(to_tensor(real))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, rgb2lab(real), atol=2e-3)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(to_tensor(real))), to_tensor(real), atol=1e-4, rtol=0)


def test_tissue_mask_separates_glass_from_tissue():
    slide = to_tensor(np.ascontiguousarray(load_sample("cmu_small_region")[::4, ::4]))
    mask = tissue_mask(slide)[0, 0]
    h, w = mask.shape
    assert mask[: h // 10, : w // 10].float().mean() < 0.05  # glass in the corner
    assert 0.1 < mask.float().mean() < 0.6
    # Black is not tissue (max_od), nor is white.
    extremes = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    assert not tissue_mask(extremes).any()


def test_transfer_colour_restores_sharp_structure_in_the_new_colours():
    """A real tile under a known stain shift, then blurred (what a small VAE does to a
    model's output): transferring the blurred image's colours onto the sharp original
    recovers the sharp shifted tile far better than the blurred one, and an identical
    colour image changes nothing."""
    from kornia.filters import gaussian_blur2d

    from studio.data.stain_pairs import apply_known_shift
    from studio.metrics import ciede2000, ssim

    tile = to_tensor(np.ascontiguousarray(load_sample("tiatoolbox_target")[:128, :128]))
    shifted = apply_known_shift(tile, "lab-a")
    blurred = gaussian_blur2d(shifted, (9, 9), (2.0, 2.0))
    out = transfer_colour(tile, blurred)
    assert out.shape == tile.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert float(ssim(out, shifted)) > 0.93 > float(ssim(blurred, shifted)) + 0.15  # measured 0.937 vs 0.720
    assert float(ciede2000(out, shifted).mean()) < 0.8 * float(ciede2000(blurred, shifted).mean())  # 2.52 vs 3.41
    torch.testing.assert_close(transfer_colour(tile, tile), tile, atol=2e-2, rtol=0)


def test_transfer_colour_change_carries_only_what_the_model_changed():
    """A model refining a classical estimate: an unchanged (decoded) output returns the
    estimate's own pixels, whatever the decoder did to both; a real change comes through."""
    from kornia.filters import gaussian_blur2d

    from studio.color import transfer_colour_change
    from studio.data.stain_pairs import apply_known_shift
    from studio.metrics import ciede2000

    source = to_tensor(np.ascontiguousarray(load_sample("tiatoolbox_target")[:128, :128]))
    estimate = apply_known_shift(source, "lab-a")
    decoded = gaussian_blur2d(estimate, (9, 9), (2.0, 2.0))  # what a small VAE does to it
    torch.testing.assert_close(transfer_colour_change(source, estimate, decoded, decoded), estimate,
                               atol=1 / 255 + 1e-6, rtol=0)  # OD clamps at glass-white: at most 1 grey level
    better = apply_known_shift(source, "lab-b")  # the model moved the colours to another stain
    out = transfer_colour_change(source, estimate, decoded, gaussian_blur2d(better, (9, 9), (2.0, 2.0)))
    assert float(ciede2000(out, better).mean()) < 0.5 * float(ciede2000(estimate, better).mean())

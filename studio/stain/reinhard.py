"""Reinhard et al. (2001) colour transfer in CIELAB, tissue-masked and batched.

Per channel, ``lab' = (lab - mean_s) / std_s * std_t + mean_t`` with the statistics taken
over tissue pixels only (glass would otherwise dominate the mean and tint the tissue),
and the result is blended back to the original by a soft tissue weight so that glass
stays glass and tissue edges show no halo. LAB conversions are kornia's.

Reinhard assumes source and reference have a similar mix of stains; a tile with one stain
only (all stroma, all nuclei) would be pushed toward the reference mix and get a colour
cast, so per-tile estimates whose hematoxylin/eosin balance is extreme fall back.
"""

from __future__ import annotations

from typing import Any

import torch

from studio.color import RUIFROK_HED, lab_to_rgb, rgb_to_lab
from studio.stain.base import Params, StainNormalizer
from studio.stain.profile import StainProfile

# LAB statistics of the tissue in tiatoolbox's target image (the studio's default H&E
# reference), measured with this module: a neutral, widely used target.
DEFAULT_LAB_MEAN = (58.79, 27.27, -16.84)
DEFAULT_LAB_STD = (15.85, 9.74, 7.62)


def masked_mean_std(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of ``(B, C, N)`` values over ``(B, N)`` mask -> ``(B, C)`` each."""
    w = mask.unsqueeze(1).to(values.dtype)
    n = count.to(values.dtype).clamp_min(1.0).unsqueeze(1)
    mean = (values * w).sum(dim=2) / n
    var = ((values - mean.unsqueeze(2)).square_() * w).sum(dim=2) / n
    return mean, var.clamp_min(0.0).sqrt()


def hematoxylin_fraction(od: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Share of tissue pixels where hematoxylin outweighs eosin (Ruifrok deconvolution), ``(B,)``."""
    conc = torch.linalg.pinv(RUIFROK_HED[:, :2].to(od)) @ od  # (B, 2, N)
    h_dominant = (conc[:, 0] > conc[:, 1]) & mask
    return h_dominant.sum(dim=1).to(od.dtype) / count.to(od.dtype).clamp_min(1.0)


class ReinhardNormalizer(StainNormalizer):
    """Tissue-masked Reinhard colour transfer.

    Args:
        beta: a pixel is tissue when its strongest channel absorbs at least this optical
            density (glass and faint background fall out).
        black_od: pixels whose every channel is above this are ignored (black ink).
        min_stain_fraction: per-tile estimates where fewer than this share of tissue
            pixels are hematoxylin- (or eosin-) dominated are single-stain and fall back.
        background, min_tissue_pixels, max_fit_pixels, seed, device: see the base class.
    """

    name = "reinhard"

    def __init__(self, *, beta: float = 0.15, black_od: float = 4.0, min_stain_fraction: float = 0.03,
                 **kwargs: Any):
        self.beta = float(beta)
        self.black_od = float(black_od)
        self.min_stain_fraction = float(min_stain_fraction)
        super().__init__(**kwargs)

    def _hyperparams(self) -> dict[str, Any]:
        return {**super()._hyperparams(), "beta": self.beta, "black_od": self.black_od,
                "min_stain_fraction": self.min_stain_fraction}

    def default_target(self) -> StainProfile:
        return StainProfile(method=self.name, lab_mean=list(DEFAULT_LAB_MEAN), lab_std=list(DEFAULT_LAB_STD),
                            background=self.background, source="tiatoolbox target_image.png tissue (default)",
                            params=self._hyperparams())

    def _estimation_mask(self, od: torch.Tensor) -> torch.Tensor:
        return (od.amax(dim=1) >= self.beta) & (od.amin(dim=1) <= self.black_od)

    def _estimate(self, od: torch.Tensor, mask: torch.Tensor, rgb: torch.Tensor, pooled: bool = False
                  ) -> tuple[Params, torch.Tensor]:
        count = mask.sum(dim=1)
        lab = rgb_to_lab(rgb.unsqueeze(-1)).squeeze(-1)  # (B, 3, N)
        mean, std = masked_mean_std(lab, mask, count)
        h_frac = hematoxylin_fraction(od, mask, count)
        ok = (count >= 2) & torch.isfinite(mean).all(dim=1) & (std > 1e-3).all(dim=1)
        if not pooled:
            # A single tile of one stain would be pushed to the reference's stain mix. The
            # check classifies pixels with the fixed Ruifrok vectors, which unusual stains
            # can fool, so a pooled (slide) estimate, where one stain is rare, skips it.
            ok &= (h_frac >= self.min_stain_fraction) & (h_frac <= 1.0 - self.min_stain_fraction)
        return {"mean": mean, "std": std}, ok

    def _apply(self, tiles: torch.Tensor, source: Params, target: Params, od: torch.Tensor | None = None
               ) -> torch.Tensor:
        b, _, h, w = tiles.shape
        lab = rgb_to_lab(tiles)
        scale = (target["std"] / source["std"].clamp_min(1e-3)).reshape(-1, 3, 1, 1)
        shift = target["mean"].reshape(-1, 3, 1, 1) - source["mean"].reshape(-1, 3, 1, 1) * scale
        moved = lab_to_rgb(lab * scale + shift)
        if od is None:
            od = self.od(tiles.reshape(b, 3, h * w))
        # Soft tissue weight: 0 on glass, 1 from `beta` up, linear between beta/3 and beta.
        strongest = od.amax(dim=1).reshape(b, 1, h, w)
        weight = ((strongest - self.beta / 3) / (self.beta * 2 / 3)).clamp_(0.0, 1.0)
        return torch.lerp(tiles, moved, weight)

    def _params_from_profile(self, profile: StainProfile, device: torch.device) -> Params:
        mean, std = profile.lab_stats(device)
        return {"mean": mean.unsqueeze(0), "std": std.unsqueeze(0)}

    def _profile_from_params(self, params: Params, index: int, tissue_pixels: int, source: str) -> StainProfile:
        return StainProfile(lab_mean=params["mean"][index].tolist(), lab_std=params["std"][index].tolist(),
                            **self._base_profile_fields(tissue_pixels, source))

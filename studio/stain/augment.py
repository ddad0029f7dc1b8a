"""Stain-space augmentation and controlled re-staining.

Training segmenters and generators on tiles whose stains vary the way real labs vary is
the cheap half of stain robustness (Tellez et al. 2018, "HED jitter"). Here a tile is
deconvolved into hematoxylin, eosin and residual (DAB channel) concentrations with the
Ruifrok vectors, then:

* each stain vector is rotated by a small random angle (a different dye lot or scanner),
* each concentration is scaled and shifted (staining time, section thickness),

and the tile is recomposed through Beer-Lambert. Shifts are weighted by tissue density so
glass stays glass. The same machinery with fixed parameters, :func:`restain`, produces
tiles with a *known* stain shift: the ground truth for normalization benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.color import RUIFROK_HED, compose_rgb, normalize_stain_matrix, rgb_to_od, stain_concentrations
from studio.errors import InputError


def rotate_vectors(matrix: torch.Tensor, angles_deg: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Rotate each stain vector (column) of ``(B, 3, k)`` about its own random axis.

    Args:
        matrix: ``(B, 3, k)`` unit stain vectors.
        angles_deg: ``(B, k)`` rotation angles in degrees.
        axes: ``(B, 3, k)`` rotation axes (need not be unit or orthogonal; the part
            orthogonal to each vector is used, so the rotation is by exactly the angle).
    """
    axes = axes - (axes * matrix).sum(dim=1, keepdim=True) * matrix  # orthogonal to v
    axes = axes / axes.norm(dim=1, keepdim=True).clamp_min(1e-8)
    theta = torch.deg2rad(angles_deg).unsqueeze(1)
    rotated = matrix * torch.cos(theta) + axes * torch.sin(theta)  # v stays unit: rotate in the (v, u) plane
    return normalize_stain_matrix(rotated.abs())  # OD vectors stay physical (non-negative)


def restain(
    tiles: torch.Tensor,
    matrix: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    source_matrix: torch.Tensor = RUIFROK_HED,
) -> torch.Tensor:
    """Re-render ``(B, 3, H, W)`` tiles with new stain vectors and concentration changes.

    Args:
        tiles: float RGB in [0, 1].
        matrix: ``(3, 3)`` or ``(B, 3, 3)`` new stain vectors (H, E, residual columns).
        scale: ``(B, 3)`` multiplicative change of each stain's concentration.
        shift: ``(B, 3)`` additive change (optical-density units), weighted by tissue density.
        source_matrix: the vectors the tiles are deconvolved with (Ruifrok H, E, DAB).
    """
    od = rgb_to_od(tiles)
    conc = stain_concentrations(od, source_matrix)  # (B, 3, H, W)
    conc = conc * scale[:, :, None, None]
    if shift is not None:
        density = od.sum(dim=1, keepdim=True).clamp(0.0, 1.0)  # 0 on glass, 1 in tissue
        conc = conc + shift[:, :, None, None] * density
    return compose_rgb(conc, matrix)


@dataclass
class StainAugment:
    """Random stain perturbation for training (HED jitter + stain-vector rotation).

    Args:
        angle_deg: maximum rotation of each stain vector, degrees (uniform in [-a, a]).
        scale: concentrations are multiplied by a factor uniform in [1 - s, 1 + s].
        shift: and shifted by uniform [-t, t] optical density (times tissue density).
        p: probability that a tile is augmented at all.

    Call with ``(B, 3, H, W)`` float tiles and a seeded ``torch.Generator`` for
    reproducible augmentation.
    """

    angle_deg: float = 4.0
    scale: float = 0.25
    shift: float = 0.05
    p: float = 1.0

    def __post_init__(self) -> None:
        if self.angle_deg < 0 or not 0 <= self.scale < 1 or self.shift < 0 or not 0 <= self.p <= 1:
            raise InputError("StainAugment", f"invalid parameters {self}")

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw the per-tile parameters (exposed so callers can log or reuse them)."""
        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator) * 2 - 1

        angles = uniform(batch, 3) * self.angle_deg
        axes = torch.randn(batch, 3, 3, generator=generator)
        scale = 1 + uniform(batch, 3) * self.scale
        shift = uniform(batch, 3) * self.shift
        apply = torch.rand(batch, generator=generator) < self.p
        return {"angles": angles, "axes": axes, "scale": scale, "shift": shift, "apply": apply}

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise InputError("tiles", f"shape {tuple(tiles.shape)}; expected (B, 3, H, W)")
        b = tiles.shape[0]
        draw = self.sample(b, generator)
        base = RUIFROK_HED.to(tiles).unsqueeze(0).expand(b, 3, 3)
        matrix = rotate_vectors(base, draw["angles"].to(tiles), draw["axes"].to(tiles))
        out = restain(tiles, matrix, draw["scale"].to(tiles), draw["shift"].to(tiles))
        keep = ~draw["apply"].to(tiles.device)
        if keep.any():
            out[keep] = tiles[keep]
        return out


def known_shift(kind: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Named, reproducible stain shifts for benchmarks: (matrix (B,3,3), scale, shift).

    ``"lab-a"``: bluer hematoxylin, paler eosin (a different H&E protocol);
    ``"lab-b"``: stronger, purpler eosin and lighter hematoxylin;
    ``"faded"``: everything at 60 % (an old, faded slide).
    """
    angles = {"lab-a": (8.0, -6.0, 0.0), "lab-b": (-6.0, 9.0, 0.0), "faded": (0.0, 0.0, 0.0)}
    scales = {"lab-a": (1.25, 0.7, 1.0), "lab-b": (0.8, 1.4, 1.0), "faded": (0.6, 0.6, 1.0)}
    if kind not in angles:
        raise InputError(kind, f"unknown shift; choose one of {', '.join(angles)}")
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    axes = torch.randn(1, 3, 3, generator=gen).expand(batch, 3, 3)
    matrix = rotate_vectors(RUIFROK_HED.unsqueeze(0).expand(batch, 3, 3),
                            torch.tensor([angles[kind]]).expand(batch, 3), axes)
    scale = torch.tensor([scales[kind]]).expand(batch, 3)
    return matrix, scale, torch.zeros(batch, 3)


_ = math.pi  # angles are documented in degrees; math kept for callers converting units

"""The two numbers under every normalized tile (plain functions, no Streamlit).

* **Structure kept**: :func:`structure_ssim`, SSIM (``studio.metrics.ssim``) between the
  CIELAB lightness of the source tile and of the output. Lightness, not RGB, because a
  stain normalizer is *meant* to change colour; what it must not change is the tissue's
  structure (nuclei, membranes, edges). 1 = identical structure.
* **Colour match**: :func:`tissue_colour_delta_e`, mean CIEDE2000 (``studio.metrics``)
  between the tissue colours of a tile and of the reference. The images are unpaired, so
  their tissue pixels (``studio.color.tissue_mask``) are matched by lightness quantile:
  darkest fifth against darkest fifth (hematoxylin-rich nuclei) ... lightest against
  lightest (eosin-rich stroma), and the five ΔE00 are averaged. Lower = closer to the
  reference stain; under ~2-3 is hard to tell apart by eye.
"""

from __future__ import annotations

import numpy as np
import torch

from studio.color import rgb_to_lab, tissue_mask
from studio.io import to_tensor
from studio.metrics import delta_e_ciede2000, ssim

QUANTILE_BINS = 5
MAX_PIXELS = 200_000  # tissue pixels sampled per image for the colour statistics


def structure_ssim(source: np.ndarray, output: np.ndarray) -> float:
    """SSIM of CIELAB lightness between two uint8 RGB images of one shape."""
    with torch.no_grad():
        a = rgb_to_lab(to_tensor(source))[:, :1] / 100.0
        b = rgb_to_lab(to_tensor(output))[:, :1] / 100.0
        return float(ssim(b, a)[0])


def tissue_colours(image: np.ndarray, bins: int = QUANTILE_BINS, seed: int = 0) -> np.ndarray | None:
    """Mean CIELAB of the tissue pixels in each lightness quantile, ``(bins, 3)`` darkest
    first; None when the image holds (almost) no tissue."""
    with torch.no_grad():
        rgb = to_tensor(image)
        mask = tissue_mask(rgb)[0, 0]
        if int(mask.sum()) < bins * 10:
            return None
        lab = rgb_to_lab(rgb)[0].permute(1, 2, 0)[mask]  # (N, 3)
    if lab.shape[0] > MAX_PIXELS:
        pick = np.random.default_rng(seed).choice(lab.shape[0], MAX_PIXELS, replace=False)
        lab = lab[torch.from_numpy(np.sort(pick))]
    order = torch.argsort(lab[:, 0])
    return torch.stack([chunk.mean(dim=0) for chunk in lab[order].tensor_split(bins)]).numpy()


def colour_distance(colours_a: np.ndarray | None, colours_b: np.ndarray | None) -> float:
    """Mean CIEDE2000 between two :func:`tissue_colours` results (NaN if one has no tissue)."""
    if colours_a is None or colours_b is None:
        return float("nan")
    a = torch.from_numpy(np.asarray(colours_a, np.float32)).T[None, :, :, None]  # (1, 3, bins, 1)
    b = torch.from_numpy(np.asarray(colours_b, np.float32)).T[None, :, :, None]
    return float(delta_e_ciede2000(a, b).mean())


def tissue_colour_delta_e(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean CIEDE2000 between the tissue colours of ``image`` and ``reference`` (uint8 RGB,
    any sizes), matched by lightness quantile; NaN when either holds no tissue."""
    return colour_distance(tissue_colours(image), tissue_colours(reference))

"""DAB read-out of an IHC image (real or virtual): heat map, DAB-positive fraction, H-score.

DAB (3,3'-diaminobenzidine, brown) is separated from hematoxylin by colour
deconvolution with the Ruifrok & Johnston vectors (``skimage.color.rgb2hed``); its channel
is an optical density (0 = no DAB). On scikit-image's real H-DAB sample about a quarter of
the tissue exceeds the default threshold (0.10); on the shipped H&E samples, where the
"DAB" channel is only leakage of hematoxylin and eosin, under 0.2 %.

Used on the *output* of the virtual IHC pipeline (CLI ``translate``, the app) and on
the truth images when evaluating it, so predicted and true DAB are measured alike.

The H-score here is a pixel-level analogue of the pathologist's cell-level score: tissue
pixels binned by DAB optical density into negative, weak (1+), moderate (2+) and strong
(3+), ``H = 1 x %1+ + 2 x %2+ + 3 x %3+`` (0-300).
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.10  # DAB optical density above which a tissue pixel counts as positive
HEATMAP_MAX = 0.30  # DAB OD shown at the top of the colour scale (fixed: maps are comparable)
HSCORE_BINS = (0.10, 0.20, 0.35)  # DAB OD lower edges of 1+, 2+, 3+
# Anchors of the heat-map colour scale (dark blue -> purple -> orange -> light yellow),
# close to matplotlib's "inferno" without needing matplotlib.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    from studio.errors import InputError

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError("ihc image", f"shape {arr.shape} dtype {arr.dtype}; expected uint8 RGB (H, W, 3)")
    return arr


def dab_density(ihc_rgb: np.ndarray) -> np.ndarray:
    """DAB optical density per pixel, float32 ``(H, W)``, clipped at 0."""
    from skimage.color import rgb2hed

    hed = rgb2hed(_check_rgb(ihc_rgb))
    return np.clip(hed[..., 2], 0.0, None).astype(np.float32)


def colorize(values: np.ndarray, vmax: float = HEATMAP_MAX) -> np.ndarray:
    """Map ``values`` in [0, vmax] to uint8 RGB with the heat-map scale."""
    t = np.clip(np.asarray(values, np.float64) / vmax, 0.0, 1.0) * (len(_ANCHORS) - 1)
    xs = np.arange(len(_ANCHORS))
    channels = [np.interp(t, xs, _ANCHORS[:, c]) for c in range(3)]
    return (np.stack(channels, axis=-1) + 0.5).astype(np.uint8)


def dab_heatmap(ihc_rgb: np.ndarray, vmax: float = HEATMAP_MAX) -> np.ndarray:
    """Heat map of DAB optical density, uint8 RGB ``(H, W, 3)`` (fixed scale 0..``vmax``)."""
    return colorize(dab_density(ihc_rgb), vmax)


def _tissue(ihc_rgb: np.ndarray) -> np.ndarray:
    import torch

    from studio.color import tissue_mask
    from studio.io import to_tensor

    with torch.no_grad():
        return tissue_mask(to_tensor(ihc_rgb))[0, 0].numpy()


def dab_positive_fraction(ihc_rgb: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction (0..1) of tissue pixels whose DAB optical density exceeds ``threshold``.

    Tissue is ``studio.color.tissue_mask`` (glass and black artefacts excluded); an image
    without tissue gives 0.0.
    """
    arr = _check_rgb(ihc_rgb)
    tissue = _tissue(arr)
    if not tissue.any():
        return 0.0
    return float((dab_density(arr)[tissue] > threshold).mean())


def h_score(ihc_rgb: np.ndarray, bins: tuple[float, float, float] = HSCORE_BINS) -> dict[str, float]:
    """Pixel H-score and the share of tissue in each intensity bin (see the module docstring)."""
    arr = _check_rgb(ihc_rgb)
    tissue = _tissue(arr)
    if not tissue.any():
        return {"h_score": 0.0, "negative": 1.0, "weak": 0.0, "moderate": 0.0, "strong": 0.0}
    d = dab_density(arr)[tissue]
    shares = [float((d < bins[0]).mean()), float(((d >= bins[0]) & (d < bins[1])).mean()),
              float(((d >= bins[1]) & (d < bins[2])).mean()), float((d >= bins[2]).mean())]
    return {"h_score": 100.0 * (shares[1] + 2 * shares[2] + 3 * shares[3]), "negative": shares[0],
            "weak": shares[1], "moderate": shares[2], "strong": shares[3]}


def dab_readout(ihc_rgb: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """All numbers of the read-out for one image: DAB-positive % of tissue and the H-score."""
    return {"dab_positive_percent": 100.0 * dab_positive_fraction(ihc_rgb, threshold), **h_score(ihc_rgb)}

"""The virtual IHC page's image helpers: the DAB read-out (:mod:`studio.dab`) and a wipe composite."""

from __future__ import annotations

import numpy as np

from studio.dab import (  # noqa: F401  (re-exported for the page)
    DEFAULT_THRESHOLD,
    HEATMAP_MAX,
    colorize,
    dab_density,
    dab_heatmap,
    dab_positive_fraction,
    dab_readout,
    h_score,
)


def wipe(left: np.ndarray, right: np.ndarray, position: float) -> np.ndarray:
    """Before/after composite: ``left`` up to ``position`` (0..1 of the width), ``right``
    after it, with a thin white divider. Both uint8 ``(H, W, 3)`` of one shape."""
    if left.shape != right.shape:
        from studio.errors import InputError

        raise InputError("wipe", f"shapes {left.shape} and {right.shape} differ")
    out = np.array(right, copy=True)
    x = int(round(np.clip(position, 0.0, 1.0) * left.shape[1]))
    out[:, :x] = left[:, :x]
    lo, hi = max(0, x - 1), min(left.shape[1], x + 1)
    out[:, lo:hi] = 255
    return out

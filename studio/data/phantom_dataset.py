"""Phantom tiles as a nuclei dataset (exact labels, optional stain variation per tile)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from studio.data.base import NucleiSample
from studio.data.phantom import DEFAULT_CYCLE, TISSUE_PRESETS, make_phantom, random_stain_matrix
from studio.errors import InputError


def phantom_samples(
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    tissue: str | None = None,
    class_mix: Mapping[str | int, float] | None = None,
    stain_variation: float = 1.0,
    mpp: float = 0.5,
) -> list[NucleiSample]:
    """``n`` phantom tiles; tile ``i`` uses seed ``seed + i`` (so a dataset can be grown
    without changing its first tiles). ``tissue=None`` cycles through :data:`DEFAULT_CYCLE`;
    ``stain_variation`` scales a random per-tile stain (0 = the reference H&E)."""
    if n < 1:
        raise InputError("--n", f"{n}; need at least one tile")
    presets = [tissue] if tissue else list(DEFAULT_CYCLE)
    for p in presets:
        if p not in TISSUE_PRESETS:
            raise InputError("--tissue", f"{p!r}; choose one of {', '.join(TISSUE_PRESETS)}")
    samples = []
    for i in range(n):
        tile_seed = seed + i
        preset = presets[i % len(presets)]
        matrix = random_stain_matrix(tile_seed, strength=stain_variation) if stain_variation > 0 else None
        tile = make_phantom(size, tile_seed, stain_matrix=matrix, mpp=mpp, class_mix=class_mix, tissue=preset)
        samples.append(NucleiSample(tile.image, tile.instance_map.astype(np.int32), tile.class_map.astype(np.uint8),
                                    {"name": f"phantom_{tile_seed:06d}", "source": "phantom", "tissue": preset,
                                     "seed": tile_seed}))
    return samples

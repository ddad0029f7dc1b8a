"""The one train / held-out split of the shipped real images.

Every model the studio trains on real pixels (tile autoencoder, SSL encoder, latent
diffusion, segmenter) trains on the *train* region of each image and is evaluated on its
*held-out* region, so "held-out real tiles the model never saw" means the same pixels
everywhere. The held-out region is a band along one edge of each image, about a quarter
of it, chosen so that it contains tissue:

* hgsc_nest, tiatoolbox_target, skin: the right-most quarter of the columns;
* cmu_small_region (tall slide): the bottom quarter of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from studio.data.samples import load_sample
from studio.errors import InputError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Band:
    axis: int  # 0: rows (y), 1: columns (x)
    start: float  # fraction of the axis where the held-out band starts


HELDOUT_BANDS: dict[str, Band] = {
    "hgsc_nest": Band(axis=1, start=0.75),
    "tiatoolbox_target": Band(axis=1, start=0.75),
    "skin": Band(axis=1, start=0.75),
    "cmu_small_region": Band(axis=0, start=0.75),
}


def split_bounds(name: str, split: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of ``split`` in sample ``name``, in pixels."""
    if split not in SPLITS:
        raise InputError(split, f"unknown split; use one of {', '.join(SPLITS)}")
    if name not in HELDOUT_BANDS:
        raise InputError(name, f"has no defined split; samples with one: {', '.join(HELDOUT_BANDS)}")
    h, w = load_sample(name).shape[:2]
    band = HELDOUT_BANDS[name]
    length = (h, w)[band.axis]
    cut = int(round(length * band.start))
    lo, hi = (0, cut) if split == "train" else (cut, length)
    return (lo, hi, 0, w) if band.axis == 0 else (0, h, lo, hi)


def region(name: str, split: str) -> np.ndarray:
    """The uint8 pixels of ``split`` in sample ``name`` (a read-only view)."""
    y0, y1, x0, x1 = split_bounds(name, split)
    return load_sample(name)[y0:y1, x0:x1]


def regions(split: str) -> dict[str, np.ndarray]:
    """``split`` of every real H&E image that has one."""
    return {name: region(name, split) for name in HELDOUT_BANDS}


def tissue_fraction(tile: np.ndarray, white: int = 215) -> float:
    """Share of pixels darker than glass (mean RGB below ``white``)."""
    return float((tile.mean(axis=-1) < white).mean())


def tissue_tiles(split: str, size: int = 256, stride: int | None = None, min_tissue: float = 0.5) -> np.ndarray:
    """Grid tiles ``(N, size, size, 3)`` of ``split`` from every image, tissue-rich ones only."""
    stride = stride or size
    tiles = []
    for image in regions(split).values():
        h, w = image.shape[:2]
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                tile = image[y:y + size, x:x + size]
                if tissue_fraction(tile) >= min_tissue:
                    tiles.append(tile)
    if not tiles:
        raise InputError(split, f"has no {size}x{size} tissue tiles")
    return np.ascontiguousarray(np.stack(tiles))



class HeldoutHalves(NamedTuple):
    """Two disjoint held-out tile sets; ``groups_*`` name the spatial block of each tile."""

    a: np.ndarray
    b: np.ndarray
    groups_a: np.ndarray
    groups_b: np.ndarray
    sources_a: list[str]
    sources_b: list[str]


def heldout_halves(size: int = 128, min_tissue: float = 0.6, block: int = 4) -> HeldoutHalves:
    """Two disjoint sets of held-out tissue tiles from one distribution, for two-sample tests.

    The held-out band of every image is cut into non-overlapping ``size`` tiles, dealt to
    set A and set B like the squares of a checkerboard, so both sets sample every image in
    the same proportion and no pixel lies in both. A is the reference a test compares
    against; B is what "real tissue" scores against A (the floor), and what conditions a
    generator whose output is compared against A: never A itself, so no baseline or sample
    shares the reference's content. Tiles within one ``block`` x ``block`` square of the
    grid share a group id (neighbours are not independent; a test keeps a group on one
    side of its train / test split).

    The default 128 px is the embedding LDM's training crop; at 256 px the held-out bands
    (1.5 MPix in all) hold only 17 tissue tiles, too few for a two-sample test.
    """
    sets: dict[int, list] = {0: [], 1: []}
    groups: dict[int, list] = {0: [], 1: []}
    sources: dict[int, list] = {0: [], 1: []}
    for r, (name, image) in enumerate(regions("heldout").items()):
        h, w = image.shape[:2]
        for i, y in enumerate(range(0, h - size + 1, size)):
            for j, x in enumerate(range(0, w - size + 1, size)):
                tile = image[y:y + size, x:x + size]
                if tissue_fraction(tile) < min_tissue:
                    continue
                side = (i + j) % 2
                sets[side].append(tile)
                groups[side].append(f"{r}:{i // block}:{j // block}")
                sources[side].append(name)
    if min(len(sets[0]), len(sets[1])) < 4:
        raise InputError("heldout", f"has too few {size}x{size} tissue tiles for two halves")
    ids = {g: k for k, g in enumerate(sorted(set(groups[0]) | set(groups[1])))}
    return HeldoutHalves(np.ascontiguousarray(np.stack(sets[0])), np.ascontiguousarray(np.stack(sets[1])),
                         np.array([ids[g] for g in groups[0]]), np.array([ids[g] for g in groups[1]]),
                         sources[0], sources[1])

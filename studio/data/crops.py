"""Cut a large labelled image into fixed-size labelled crops, and the shipped real tile.

:func:`crop_grid` slides a ``size`` window with ``stride`` over an image and its instance
and class maps. Each crop's instance ids are relabelled ``1..n`` (in order of the original
ids), as the PanNuke and CoNIC patches are: a tile's ids mean nothing outside the tile,
and contiguous ids keep per-tile tensors small and tile-local. A nucleus cut by the crop
border stays, clipped, as in PanNuke. Only whole windows are taken (the CoNIC "valid"
extraction), so a border narrower than ``size`` is dropped unless ``cover_edges`` adds a
last window flush with the image edge.

:func:`hgsc_nest_dataset` serves the shipped real labelled tile (1500x1500 H&E, 1,294
nuclei, PanNuke codes) as an :class:`~studio.data.base.ArrayNucleiDataset`: the first real
labelled dataset of the studio. Its ``region`` option keeps crops whose *origin* lies in a
``(y0, y1, x0, x1)`` box (half-open), so train and held-out sets can be split by region;
windows from two boxes still overlap in pixels unless the boxes are ``size`` apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from studio.data.base import ArrayNucleiDataset, NucleiSample, validate_image, validate_labels
from studio.data.samples import PANNUKE_CLASSES, load_hgsc_nest_labels
from studio.errors import InputError

Region = tuple[int, int, int, int]  # y0, y1, x0, x1: origins with y0 <= y < y1, x0 <= x < x1
HGSC_TISSUE = "Ovarian"  # PanNuke's tissue name for ovary (the tile is ovarian HGSC)


def grid_origins(length: int, size: int, stride: int, cover_edges: bool = False) -> list[int]:
    """Window starts along one axis: ``0, stride, ...`` while the window fits."""
    if length < size:
        return []
    starts = list(range(0, length - size + 1, stride))
    if cover_edges and starts[-1] != length - size:
        starts.append(length - size)
    return starts


def relabel_contiguous(inst: np.ndarray) -> np.ndarray:
    """Instance ids -> ``1..n`` in ascending order of the original ids (0 stays 0), int32."""
    inst = np.asarray(inst)
    if inst.size == 0:
        return inst.astype(np.int32)
    top = int(inst.max())
    if top <= 4 * inst.size + 1024:
        # Lookup table over the id range: linear time, no sort (ids of a tile are small).
        present = np.zeros(top + 1, dtype=bool)
        present[inst] = True
        lut = np.cumsum(present, dtype=np.int64) - (1 if present[0] else 0)
        return lut[inst].astype(np.int32)
    uniq, inverse = np.unique(inst, return_inverse=True)
    if uniq[0] != 0:
        inverse = inverse + 1  # no background pixel in this crop
    return inverse.reshape(inst.shape).astype(np.int32)


def tissue_fraction(image: np.ndarray, white: int = 220) -> float:
    """Fraction of pixels darker than bright glass (mean RGB below ``white``)."""
    return float((np.asarray(image).mean(axis=-1) < white).mean())


def in_region(y: int, x: int, region: Region | None) -> bool:
    """Whether origin ``(y, x)`` lies in the half-open box ``(y0, y1, x0, x1)``."""
    if region is None:
        return True
    y0, y1, x0, x1 = region
    return y0 <= y < y1 and x0 <= x < x1


def crop_grid(
    image: np.ndarray,
    inst: np.ndarray,
    cls: np.ndarray,
    size: int = 256,
    stride: int | None = None,
    *,
    min_tissue: float = 0.0,
    region: Region | None = None,
    cover_edges: bool = False,
    num_classes: int = max(PANNUKE_CLASSES),
    meta: Mapping[str, Any] | None = None,
) -> list[NucleiSample]:
    """Labelled ``size x size`` crops on a grid.

    Args:
        image, inst, cls: uint8 (H, W, 3), instance map, class map (validated here).
        size: crop side in pixels.
        stride: step between crops; ``size`` (no overlap) by default.
        min_tissue: drop crops whose :func:`tissue_fraction` is below this.
        region: keep only crops whose origin lies in ``(y0, y1, x0, x1)``.
        cover_edges: add a last row/column of crops flush with the bottom/right edge.
        num_classes: highest valid class code of ``cls``.
        meta: copied into every crop's meta (``source``, ``tissue``, ``name`` of the parent).

    Returns:
        Samples with meta ``name`` (``<parent>_y<Y>_x<X>``), ``parent``, ``y``, ``x``,
        ``size``, ``index`` and the given meta.
    """
    image = validate_image(image, "image")
    inst, cls = validate_labels(inst, cls, image.shape, num_classes, "labels")
    stride = size if stride is None else stride
    if size <= 0 or stride <= 0:
        raise InputError("size/stride", f"size={size}, stride={stride}; both must be positive")
    if region is not None and len(region) != 4:
        raise InputError("region", f"{region}; expected (y0, y1, x0, x1)")
    base = dict(meta or {})
    parent = str(base.pop("name", "tile"))
    h, w = inst.shape
    crops: list[NucleiSample] = []
    for y in grid_origins(h, size, stride, cover_edges):
        for x in grid_origins(w, size, stride, cover_edges):
            if not in_region(y, x, region):
                continue
            img = np.array(image[y : y + size, x : x + size])
            if min_tissue > 0 and tissue_fraction(img) < min_tissue:
                continue
            crop_meta = {**base, "name": f"{parent}_y{y:04d}_x{x:04d}", "parent": parent, "y": y, "x": x,
                         "size": size, "index": len(crops)}
            crops.append(NucleiSample(
                img,
                relabel_contiguous(inst[y : y + size, x : x + size]),
                np.array(cls[y : y + size, x : x + size]),
                crop_meta,
            ))
    return crops


def hgsc_nest_crops(
    size: int = 256,
    stride: int | None = None,
    *,
    region: Region | None = None,
    min_tissue: float = 0.0,
    cover_edges: bool = False,
) -> list[NucleiSample]:
    """Crops of the shipped real tile (PanNuke codes, ``source="real"``, tissue "Ovarian")."""
    image, inst, cls = load_hgsc_nest_labels()
    return crop_grid(image, inst, cls, size, stride, min_tissue=min_tissue, region=region,
                     cover_edges=cover_edges,
                     meta={"name": "hgsc_nest", "source": "real", "tissue": HGSC_TISSUE})


def hgsc_nest_dataset(
    size: int = 256,
    stride: int | None = None,
    *,
    region: Region | None = None,
    min_tissue: float = 0.0,
    cover_edges: bool = False,
) -> ArrayNucleiDataset:
    """The shipped real labelled tile as a dataset of crops (see :func:`crop_grid`)."""
    crops = hgsc_nest_crops(size, stride, region=region, min_tissue=min_tissue, cover_edges=cover_edges)
    if not crops:
        raise InputError("region", f"{region} holds no crop origins of the 1500x1500 tile at size {size}")
    return ArrayNucleiDataset(crops, PANNUKE_CLASSES, name="hgsc_nest")


def split_regions(regions: Sequence[Region], **kwargs: Any) -> list[ArrayNucleiDataset]:
    """One hgsc_nest dataset per region, e.g. ``[train_box, heldout_box]``."""
    return [hgsc_nest_dataset(region=r, **kwargs) for r in regions]

"""Paired H&E -> IHC training data with known truth (virtual staining).

Real consecutive-section pairs (BCI, MIST: :mod:`studio.data.paired`) are never pixel-
aligned and their "truth" is another piece of tissue. The studio makes pairs where the
IHC truth is known exactly -- which cells express the marker -- and then misregisters
them the way real pairs are misregistered, so a translator can be trained and *evaluated*
on the marker, not on alignment luck.

Two sources, one output (:class:`IHCPair`):

* **phantom pairs** (:func:`phantom_pair`): a phantom layout rendered as H&E and as H-DAB
  IHC (:func:`studio.data.phantom.render_ihc`: membranous HER2-like or nuclear Ki67-like
  DAB on marker-positive cells; counterstain and DAB colours calibrated on scikit-image's
  real IHC image);
* **real H&E pairs** (:func:`real_pair`): the labelled real tile (hgsc_nest) as the H&E
  side; its IHC twin is rendered from the tile itself -- the hematoxylin of the H&E
  (colour deconvolution) becomes a lighter counterstain, and DAB goes where the marker
  rule puts it: HER2-like membranes (a band at the border of each positive cell's
  territory, :func:`skimage.segmentation.expand_labels`) or Ki67-like nuclei. Default
  rules: a share of neoplastic nuclei positive, inflammatory and connective negative.

Misregistration (:func:`misregister`, applied to the IHC side): a translation, a small
rotation, a smooth elastic deformation (a few pixels), and a section-to-section change of
staining strength. ``aligned=True`` skips it (for the aligned evaluation). The truth
marker map travels with the pair, warped exactly like the IHC image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from studio.errors import InputError

STAINS: dict[str, str] = {"her2": "membrane", "ki67": "nuclear", "er": "nuclear", "pr": "nuclear"}
# Share of neoplastic (and epithelial) nuclei positive per stain, inflammatory / connective negative.
DEFAULT_POSITIVE: dict[str, float] = {"her2": 0.7, "ki67": 0.35, "er": 0.6, "pr": 0.5}
DAB_LEVEL = {"membrane": 1.4, "cytoplasm": 0.12, "nuclear": 0.9}
MARKER_THRESHOLD = 0.3  # DAB concentration that counts as marker-bearing in the truth mask
COUNTERSTAIN = 0.45  # IHC hematoxylin relative to the H&E's
IHC_SEEDS_HELD_OUT = 9_000_000  # phantom pairs from here on are never drawn for training


@dataclass
class IHCPair:
    """One H&E tile and its IHC twin: uint8 ``(H, W, 3)`` each, plus ``marker`` (bool
    ``(H, W)``: DAB-bearing pixels of the truth, warped with the IHC) and provenance."""

    he: np.ndarray
    ihc: np.ndarray
    marker: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def check_stain(stain: str) -> str:
    key = str(stain).lower()
    if key not in STAINS:
        raise InputError("--stain", f"unknown stain {stain!r}; choose from {', '.join(STAINS)}")
    return key


# --------------------------------------------------------------------------- misregistration
def misregister(images: list[np.ndarray], rng: np.random.Generator, *, shift: float = 6.0, rotate_deg: float = 2.0,
                elastic: float = 3.0, elastic_scale: float = 32.0) -> tuple[list[np.ndarray], dict[str, float]]:
    """Warp every array in ``images`` with one random transform (consecutive-section-like).

    A translation up to ``shift`` px, a rotation up to ``rotate_deg`` about the centre, and a
    smooth displacement field of amplitude ~``elastic`` px varying over ``elastic_scale`` px.
    uint8 / float images use linear interpolation with edge replication; bool masks nearest.
    """
    h, w = images[0].shape[:2]
    dy, dx = rng.uniform(-shift, shift, 2)
    angle = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = math.cos(angle), math.sin(angle)
    src_y = cy + (yy - cy) * c - (xx - cx) * s + dy
    src_x = cx + (yy - cy) * s + (xx - cx) * c + dx
    if elastic > 0:
        gh, gw = max(2, int(h / elastic_scale) + 2), max(2, int(w / elastic_scale) + 2)
        field_y = ndi.zoom(rng.standard_normal((gh, gw)).astype(np.float32), (h / gh, w / gw), order=3)[:h, :w]
        field_x = ndi.zoom(rng.standard_normal((gh, gw)).astype(np.float32), (h / gh, w / gw), order=3)[:h, :w]
        src_y += elastic * field_y
        src_x += elastic * field_x
    out = []
    for img in images:
        order = 0 if img.dtype == bool else 1
        if img.ndim == 2:
            warped = ndi.map_coordinates(img, [src_y, src_x], order=order, mode="nearest")
        else:
            warped = np.stack([ndi.map_coordinates(img[..., k], [src_y, src_x], order=order, mode="nearest")
                               for k in range(img.shape[-1])], axis=-1)
        out.append(warped.astype(img.dtype))
    return out, {"shift_y": float(dy), "shift_x": float(dx), "rotate_deg": math.degrees(angle),
                 "elastic_px": float(elastic)}


# --------------------------------------------------------------------------- rendering from real H&E
def _render_ihc(hematoxylin: np.ndarray, dab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert H-DAB render with the calibrated IHC colours (+ camera noise)."""
    from studio.color import compose_rgb
    from studio.data.phantom import IHC_MATRIX

    conc = torch.from_numpy(np.stack([hematoxylin, dab]).astype(np.float32))[None]
    rgb = compose_rgb(conc, IHC_MATRIX)[0].permute(1, 2, 0).numpy()
    rgb = rgb + rng.standard_normal(rgb.shape).astype(np.float32) / 255.0
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def marker_from_labels(inst: np.ndarray, cls: np.ndarray, stain: str, rng: np.random.Generator,
                       positive: dict[int, float] | None = None, cell_px: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """DAB concentration and marker mask from a labelled tile.

    Each nucleus is positive with the probability of its class (``positive``: PanNuke code
    -> probability; default neoplastic / epithelial at :data:`DEFAULT_POSITIVE`, others 0).
    Membranous stains put DAB on the outer band of the cell territory (the nucleus grown by
    ``cell_px`` without crossing its neighbours) plus a faint cytoplasmic blush; nuclear
    stains put it in the nucleus.
    """
    from skimage.segmentation import expand_labels, find_boundaries

    stain = check_stain(stain)
    if positive is None:
        p = DEFAULT_POSITIVE[stain]
        positive = {1: p, 5: p}
    ids = np.unique(inst[inst > 0])
    fg = inst > 0
    lut_cls = np.zeros(int(inst.max(initial=0)) + 1, dtype=np.int64)
    lut_cls[inst[fg]] = cls[fg]
    prob = np.array([positive.get(int(lut_cls[i]), 0.0) for i in ids])
    strength = np.zeros(int(inst.max(initial=0)) + 1, dtype=np.float32)
    strength[ids] = (rng.random(len(ids)) < prob) * rng.uniform(0.7, 1.25, len(ids))
    if STAINS[stain] == "membrane":
        cells = expand_labels(inst, cell_px)
        per_cell = strength[cells]
        band = find_boundaries(cells, mode="inner") & (cells > 0) & ~fg
        band = ndi.binary_dilation(band, iterations=2) & (cells > 0) & ~fg
        dab = per_cell * (DAB_LEVEL["membrane"] * band + DAB_LEVEL["cytoplasm"] * ((cells > 0) & ~band & ~fg))
    else:
        dab = strength[inst] * DAB_LEVEL["nuclear"]
    dab = ndi.gaussian_filter(dab.astype(np.float32), 0.7)
    return dab, dab > MARKER_THRESHOLD


def real_pair(he: np.ndarray, inst: np.ndarray, cls: np.ndarray, stain: str, *, seed: int, aligned: bool = False,
              positive: dict[int, float] | None = None) -> IHCPair:
    """Real H&E tile + its rendered IHC twin (see the module docstring)."""
    from studio.color import hematoxylin_od
    from studio.io import to_tensor

    rng = np.random.default_rng([seed, 0x1CC])
    h = hematoxylin_od(to_tensor(np.ascontiguousarray(he)))[0, 0].numpy()
    dab, marker = marker_from_labels(inst, cls, stain, rng, positive)
    ihc = _render_ihc(COUNTERSTAIN * h * rng.uniform(0.85, 1.15), dab * rng.uniform(0.85, 1.15), rng)
    meta: dict[str, Any] = {"stain": stain, "source": "real-he", "seed": seed, "aligned": aligned}
    if not aligned:
        (ihc, marker), warp = misregister([ihc, marker], rng)
        meta.update(warp)
    return IHCPair(np.ascontiguousarray(he), ihc, marker, meta)


def phantom_pair(size: int, stain: str, *, seed: int, aligned: bool = False, tissue: str = "tumor",
                 positive: dict[str, float] | None = None) -> IHCPair:
    """A phantom layout as H&E and as IHC of ``stain`` (misregistered unless ``aligned``)."""
    from studio.data.phantom import concentration_maps, render_he, render_ihc, sample_layout

    stain = check_stain(stain)
    layout = sample_layout(size, seed=seed, tissue=tissue)
    if positive is None:
        p = DEFAULT_POSITIVE[stain]
        positive = {"neoplastic": p, "epithelial": p}
    he = render_he(layout, seed=seed)
    ihc = render_ihc(layout, positive, STAINS[stain], seed=seed)
    dab = concentration_maps(layout, seed=seed, stain="ihc", marker_positive=positive, pattern=STAINS[stain],
                             noise=0.0)[2]
    marker = dab > MARKER_THRESHOLD
    meta: dict[str, Any] = {"stain": stain, "source": "phantom", "seed": seed, "tissue": tissue, "aligned": aligned}
    if not aligned:
        rng = np.random.default_rng([seed, 0x1CD])
        (ihc, marker), warp = misregister([ihc, marker], rng)
        meta.update(warp)
    return IHCPair(he, ihc, marker, meta)


def hgsc_pairs(size: int, stain: str, *, split: str = "train", seed: int = 0, stride: int | None = None,
               aligned: bool = False) -> list[IHCPair]:
    """Pairs from crops of the real labelled tile's ``split`` band (train / held-out)."""
    from studio.data.crops import hgsc_nest_crops
    from studio.data.splits import split_bounds

    y0, y1, x0, x1 = split_bounds("hgsc_nest", split)
    region = (y0, y1 - size + 1, x0, x1 - size + 1)
    crops = hgsc_nest_crops(size, stride or size // 2, region=region)
    return [real_pair(c.image, c.inst, c.cls, stain, seed=seed * 100_003 + i, aligned=aligned)
            for i, c in enumerate(crops)]


def phantom_pairs(n: int, size: int, stain: str, *, seed: int = 0, aligned: bool = False) -> list[IHCPair]:
    """``n`` phantom pairs with seeds ``seed .. seed + n - 1`` over a mix of tissue presets."""
    tissues = ("tumor", "glandular", "inflamed", "mixed", "stroma")
    return [phantom_pair(size, stain, seed=seed + i, aligned=aligned, tissue=tissues[i % len(tissues)])
            for i in range(n)]

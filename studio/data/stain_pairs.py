"""Stain-translation training pairs with known truth (the studio's SPI-2M analogue).

StainFuser learned stain normalization from *many-to-one* pairs: the same tissue in many
stains, each mapped to one target stain. Real re-stained serial sections are rare and never
pixel-aligned, so the pairs here are made from real tiles by re-rendering them in optical
density (OD) space, where the physics of staining is linear:

* **stain re-rendering** (:func:`random_restain`): deconvolve the tile (Ruifrok H, E,
  residual), rotate each stain vector by a few degrees (another dye lot / scanner), scale
  and shift concentrations (staining time, section thickness), recompose (Beer-Lambert);
* **scanner-like tone changes** (:func:`tone_shift`): per-channel gamma and white-balance
  gains, an S-shaped contrast curve, desaturation, illumination fall-off -- changes that
  are *not* stain changes, so a normalizer that only models stain vectors cannot undo them
  (the held-out "outside the family" shifts of ``bench/stain_quality.py``).

A pair is ``(source, target, reference)``: source and target are two renders of the same
crop (the target may be the untouched real tile: then the truth is real pixels), and the
reference is *another* crop of the same image rendered like the target (a reference tile
of the target stain, never the truth itself). ``histostudio data stain-pairs`` writes such
pairs as a dataset (``source/``, ``target/``, ``reference/`` PNGs and ``manifest.csv`` with
every render parameter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import InputError


@dataclass
class StainPair:
    source: np.ndarray
    target: np.ndarray
    reference: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    # The reference crop rendered in the *source's* stain (``make_pairs(source_context=True)``):
    # a second view of the source "slide", for slide-level source statistics.
    source_context: np.ndarray | None = None


# --------------------------------------------------------------------------- renders
def random_restain(tiles: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Re-render ``(B, 3, H, W)`` float tiles in a random stain (one draw for the batch)."""
    from studio.color import RUIFROK_HED
    from studio.stain.augment import restain, rotate_vectors

    b = tiles.shape[0]
    angles = (torch.rand(1, 3, generator=gen) * 2 - 1) * 8.0 * strength
    angles[:, 2] = 0.0
    axes = torch.randn(1, 3, 3, generator=gen)
    scale = torch.exp((torch.rand(1, 3, generator=gen) * 2 - 1) * 0.45 * strength)
    shift = (torch.rand(1, 3, generator=gen) * 2 - 1) * 0.05 * strength
    matrix = rotate_vectors(RUIFROK_HED.unsqueeze(0), angles, axes)
    out = restain(tiles, matrix.expand(b, 3, 3), scale.expand(b, 3), shift.expand(b, 3))
    return out.clamp(0, 1), {"angles_deg": angles[0].tolist(), "scale": scale[0].tolist(), "shift": shift[0].tolist()}


def tone_shift(tiles: torch.Tensor, gamma: Sequence[float] = (1.0, 1.0, 1.0), gains: Sequence[float] = (1.0, 1.0, 1.0),
               contrast: float = 0.0, saturation: float = 1.0, vignette: float = 0.0) -> torch.Tensor:
    """Scanner-like tone changes of ``(B, 3, H, W)`` tiles in [0, 1] (not stain changes).

    ``gamma`` / ``gains`` per RGB channel; ``contrast`` > 0 an S-curve, < 0 its inverse;
    ``saturation`` < 1 mixes toward grey; ``vignette`` darkens the corners by that fraction.
    """
    x = tiles.clamp(0, 1)
    g = torch.tensor(gamma, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.tensor(gains, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x ** g * k).clamp(0, 1)
    if contrast:
        s = x + contrast * x * (1 - x) * (2 * x - 1) * 2
        x = s.clamp(0, 1)
    if saturation != 1.0:
        grey = x.mean(dim=1, keepdim=True)
        x = grey + saturation * (x - grey)
    if vignette:
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        x = x * (1 - vignette * ((yy ** 2 + xx ** 2) / 2)).to(x)
    return x.clamp(0, 1)


def random_tone(tiles: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> tuple[torch.Tensor, dict]:
    def u(lo: float, hi: float, n: int = 1) -> list[float]:
        return (lo + (hi - lo) * torch.rand(n, generator=gen)).tolist()

    params = {"gamma": [1 + (v - 1) * strength for v in u(0.8, 1.25, 3)],
              "gains": [1 + (v - 1) * strength for v in u(0.92, 1.06, 3)],
              "contrast": u(-0.3, 0.3)[0] * strength, "saturation": 1 + (u(0.7, 1.15)[0] - 1) * strength,
              "vignette": u(0.0, 0.1)[0] * strength}
    return tone_shift(tiles, **params), params


# Held-out shifts for benchmarks: in the training family, and outside it.
KNOWN_SHIFTS: dict[str, dict[str, Any]] = {
    "lab-a": {"kind": "stain", "name": "lab-a"},
    "lab-b": {"kind": "stain", "name": "lab-b"},
    "faded": {"kind": "stain", "name": "faded"},
    "scanner-tone": {"kind": "tone", "gamma": (1.35, 1.15, 0.85), "gains": (1.0, 0.95, 1.05), "contrast": 0.45},
    "desaturated": {"kind": "tone", "saturation": 0.45, "gamma": (0.85, 0.85, 0.85)},
}


def apply_known_shift(tiles: torch.Tensor, name: str) -> torch.Tensor:
    """One of :data:`KNOWN_SHIFTS` applied to float tiles (deterministic)."""
    from studio.stain.augment import known_shift, restain

    if name not in KNOWN_SHIFTS:
        raise InputError(name, f"unknown shift; choose from {', '.join(KNOWN_SHIFTS)}")
    spec = dict(KNOWN_SHIFTS[name])
    if spec.pop("kind") == "stain":
        matrix, scale, shift = known_shift(spec["name"], len(tiles))
        return restain(tiles, matrix, scale, shift).clamp(0, 1)
    return tone_shift(tiles, **spec)


# --------------------------------------------------------------------------- pairs
def make_pairs(images: Sequence[np.ndarray], n: int, size: int, *, seed: int = 0, real_target: float = 0.3,
               tone_prob: float = 0.5, names: Sequence[str] | None = None,
               source_context: bool = False) -> list[StainPair]:
    """``n`` pairs from random tissue crops of ``images`` (uint8 RGB), see the module docstring.

    ``real_target``: share of pairs whose target is the untouched real crop; otherwise the
    target is another random stain. ``tone_prob``: share of sources that also get a
    scanner-like tone change. ``source_context``: also render the reference crop in the
    source's stain and tone (``pair.source_context``); the pairs themselves are unchanged
    (the same random draws: a stain or tone is one draw per batch of tiles).
    """
    from studio.data.splits import tissue_fraction
    from studio.io import to_tensor, to_uint8

    if n < 1:
        raise InputError("--n", f"{n}; ask for at least one pair")
    images = [np.ascontiguousarray(im) for im in images if min(im.shape[:2]) >= size]
    if not images:
        raise InputError("images", f"none is at least {size}x{size}")
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        k = int(rng.integers(len(images)))
        image = images[k]
        crops = []
        for _ in range(2):  # the crop and a reference crop of the same image
            for _try in range(30):
                y, x = int(rng.integers(0, image.shape[0] - size + 1)), int(rng.integers(0, image.shape[1] - size + 1))
                crop = image[y:y + size, x:x + size]
                if tissue_fraction(crop) >= 0.5:
                    break
            crops.append((crop, y, x))
        tiles = to_tensor(np.stack([crops[0][0], crops[1][0]]))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        meta: dict[str, Any] = {"name": f"pair_{i:06d}", "image": names[k], "y": crops[0][1], "x": crops[0][2],
                                "reference_y": crops[1][1], "reference_x": crops[1][2]}
        if rng.random() < real_target:
            target_pair, meta["target"] = tiles, "real"
        else:
            target_pair, params = random_restain(tiles, gen)
            meta["target"] = f"restain {params}"
        source, params = random_restain(tiles if source_context else tiles[:1], gen)
        meta["source"] = f"restain {params}"
        if rng.random() < tone_prob:
            source, tone = random_tone(source, gen)
            meta["source"] += f"; tone {tone}"
        source = to_uint8(source)
        pairs.append(StainPair(source[0], to_uint8(target_pair[:1])[0], to_uint8(target_pair[1:])[0], meta,
                               source[1] if source_context else None))
    return pairs


def write_pairs(out: str | Path, pairs: Sequence[StainPair], *, overwrite: bool = False) -> Path:
    """``source/``, ``target/``, ``reference/`` PNGs (same names) + ``manifest.csv``, all-or-nothing."""
    from studio.data.base import atomic_folder, write_manifest
    from studio.io import write_image

    names = [p.meta["name"] for p in pairs]
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for p in pairs:
            for side in ("source", "target", "reference"):
                write_image(tmp / side / f"{p.meta['name']}.png", getattr(p, side))
        write_manifest(tmp / "manifest.csv", [{k: v for k, v in p.meta.items() if k != "name"} for p in pairs],
                       names)
    return Path(out)


def read_pairs(folder: str | Path) -> list[StainPair]:
    """The dataset :func:`write_pairs` wrote."""
    from studio.data.base import read_manifest
    from studio.io import read_image

    folder = Path(folder)
    if not (folder / "source").is_dir() or not (folder / "target").is_dir():
        raise InputError(folder, "is not a stain-pair dataset (needs source/ and target/)")
    metas = read_manifest(folder / "manifest.csv") if (folder / "manifest.csv").is_file() else []
    by_name = {str(m.get("name")): m for m in metas}
    pairs = []
    for src in sorted((folder / "source").glob("*.png")):
        tgt, ref = folder / "target" / src.name, folder / "reference" / src.name
        if not tgt.is_file():
            raise InputError(src, "has no target of the same name")
        pairs.append(StainPair(read_image(src), read_image(tgt), read_image(ref) if ref.is_file() else read_image(tgt),
                               dict(by_name.get(src.stem, {"name": src.stem}))))
    return pairs

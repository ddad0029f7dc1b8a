"""Nucleus instance segmentation and classification: a HoVer-Net-style network and the
sliding-window inference that turns it into instance and class maps of any size.

:class:`HoVerNetLite` follows HoVer-Net (Graham et al. 2019, Med. Image Anal. 58) in
shape, at a size that runs on a CPU: one residual encoder (pre-activation residual
blocks, GroupNorm, 3-4 resolution levels) and three U-Net decoders with skip connections,
one per output branch:

* **NP** (nuclear pixels): 2 logits, background / nucleus;
* **HV**: 2 channels, the horizontal and vertical distance of a pixel to its nucleus'
  centre of mass, normalised per nucleus to [-1, 1] (``tanh`` output);
* **TP** (nucleus type): ``num_classes + 1`` logits (0 = background); absent when
  ``num_classes == 0``.

It is a diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``from_pretrained`` reads
a local folder (nothing is downloaded, pickles are never loaded).

:class:`NucleiSegmenter` wraps a model for inference. ``segment(image)`` handles any image
size by overlapping windows whose NP/HV/TP outputs are **blended** (each window weighted
by a ramp that falls towards its borders, where the network sees padding instead of
context), then HoVer-Net's post-processing (:func:`studio.nuclei.hovernet_postprocess`)
runs on the blended maps. The maps are never held for the whole image: windows are run a
row at a time and post-processed in horizontal bands (see :func:`segment_windows`), so
the same code serves a 600x700 tile and a whole slide with a bounded memory of
``~4 x (4 + K) bytes x width x (band_rows + tile_size + 2 x margin)``.

Band merging: a band is post-processed once every row of it has all its window
contributions. Nuclei whose centroid lies within ``margin`` rows of the band's lower edge
are deferred to the next band, which re-processes from ``margin`` rows above that line, so
every nucleus is segmented once in a band where it is whole; a nucleus of the next band
that overlaps already committed pixels by more than half its area is a duplicate and is
dropped, one touching the band's top edge is a fragment of one committed before. Ids
are global and contiguous in commit order (top to bottom).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from studio.errors import InputError
from studio.nuclei import PostprocessConfig, hovernet_instances, instance_types

PANNUKE_NAMES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")


# =========================================================================== network
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = math.gcd(channels, groups)
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) x 2 plus a (strided 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Decoder(nn.Module):
    """U-Net decoder: from the deepest feature map up, upsample x2, concatenate the
    encoder's skip, residual block; then GN, SiLU and a 1x1 convolution to ``out``."""

    def __init__(self, widths: Sequence[int], out_channels: int, groups: int, depth: int):
        super().__init__()
        self.ups = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            blocks = [ResBlock(widths[i] + widths[i - 1], widths[i - 1], groups)]
            blocks += [ResBlock(widths[i - 1], widths[i - 1], groups) for _ in range(depth - 1)]
            self.ups.append(nn.Sequential(*blocks))
        self.norm = _norm(widths[0], groups)
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(F.silu(self.norm(x)))


@dataclass
class SegmenterOutput:
    """Raw outputs of :class:`HoVerNetLite` (all ``(B, C, H, W)`` at the input's size).

    Attributes:
        np_logits: ``(B, 2, H, W)`` background / nucleus logits.
        hv: ``(B, 2, H, W)`` horizontal, vertical maps in [-1, 1].
        tp_logits: ``(B, K + 1, H, W)`` type logits, or None without a type branch.
    """

    np_logits: torch.Tensor
    hv: torch.Tensor
    tp_logits: torch.Tensor | None = None


class HoVerNetLite(ModelMixin, ConfigMixin):
    """HoVer-Net-style encoder + three decoders (NP, HV, TP); see the module docstring.

    Args:
        num_classes: nucleus classes K (TP has K + 1 logits); 0 drops the TP branch.
        widths: channels per resolution level (3 or 4 levels; level i is at 1 / 2**i).
        depth: residual blocks per encoder level and per decoder stage.
        decoder_scale: decoder channels = ``widths * decoder_scale`` (the three decoders
            triple their cost, so they are narrower than the encoder by default).
        groups: GroupNorm groups (reduced to a divisor of the channels where needed).
        mean, std: per-channel normalisation of the [0, 1] RGB input.
        mpp: microns per pixel of the training data (inference works at this resolution).
        class_names: names of classes 1..K, stored with the weights for exports (default:
            PanNuke's names when K = 5, else "class 1", ...).
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 5,
        widths: tuple[int, ...] = (24, 48, 96, 192),
        depth: int = 1,
        decoder_scale: float = 0.5,
        groups: int = 8,
        mean: tuple[float, ...] = (0.70, 0.52, 0.70),
        std: tuple[float, ...] = (0.17, 0.20, 0.15),
        mpp: float = 0.5,
        class_names: tuple[str, ...] | None = None,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not 3 <= len(widths) <= 5 or min(widths) < 4:
            raise InputError("widths", f"{widths}; expected 3 to 5 levels of at least 4 channels")
        if num_classes < 0 or depth < 1 or decoder_scale <= 0:
            raise InputError("HoVerNetLite", f"num_classes={num_classes}, depth={depth}, "
                                             f"decoder_scale={decoder_scale}; need >= 0, >= 1, > 0")
        if class_names is None:
            class_names = PANNUKE_NAMES if num_classes == 5 else tuple(f"class {i}" for i in range(1, num_classes + 1))
            self.register_to_config(class_names=tuple(class_names))
        if len(class_names) != num_classes:
            raise InputError("class_names", f"has {len(class_names)} names for {num_classes} classes")
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, w in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            blocks = [ResBlock(cin, w, groups, stride=1 if i == 0 else 2)]
            blocks += [ResBlock(w, w, groups) for _ in range(depth - 1)]
            self.levels.append(nn.Sequential(*blocks))
        dec = [max(groups, int(round(w * decoder_scale / groups)) * groups) for w in widths]
        self.bridges = nn.ModuleList(nn.Conv2d(w, d, 1) if w != d else nn.Identity()
                                     for w, d in zip(widths, dec, strict=True))
        self.np_head = Decoder(dec, 2, groups, depth)
        self.hv_head = Decoder(dec, 2, groups, depth)
        self.tp_head = Decoder(dec, num_classes + 1, groups, depth) if num_classes else None
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def multiple(self) -> int:
        """Input sides are padded to a multiple of this (2 ** (levels - 1))."""
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, tiles: torch.Tensor) -> SegmenterOutput:
        """``(B, 3, H, W)`` float RGB in [0, 1] -> :class:`SegmenterOutput` at ``(H, W)``.

        Any size works: sides are reflect-padded up to a multiple of :attr:`multiple` and
        the outputs cropped back.
        """
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise InputError("tiles", f"shape {tuple(tiles.shape)}; expected (B, 3, H, W) float in [0, 1]")
        h, w = tiles.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        x = (tiles - self.pixel_mean) / self.pixel_std
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        feats = []
        x = self.stem(x)
        for level, bridge in zip(self.levels, self.bridges, strict=True):
            x = level(x)
            feats.append(bridge(x))
        np_logits = self.np_head(feats)[..., :h, :w]
        hv = torch.tanh(self.hv_head(feats)[..., :h, :w])
        tp = self.tp_head(feats)[..., :h, :w] if self.tp_head is not None else None
        return SegmenterOutput(np_logits=np_logits, hv=hv, tp_logits=tp)

    @torch.no_grad()
    def pooled_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` image descriptors: the deepest encoder level (through its bridge),
        global-average-pooled.

        Why: realism measured in the feature space of the encoder a generator is conditioned
        on rewards guidance (pushing samples towards their own condition), not realism; a
        network trained for another task on real nuclei -- as FID uses an ImageNet
        classifier -- gives a feature space the generator was never steered toward.
        """
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise InputError("tiles", f"shape {tuple(tiles.shape)}; expected (B, 3, H, W) float in [0, 1]")
        x = self.stem((tiles - self.pixel_mean) / self.pixel_std)
        for level in self.levels:
            x = level(x)
        return self.bridges[-1](x).mean(dim=(2, 3))


# =========================================================================== windows
def window_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: every ``tile - overlap`` pixels, the last flush with
    the end (a single window when the axis is shorter than ``tile``)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_weights(h: int, w: int, overlap: int) -> np.ndarray:
    """``(h, w)`` float32 weights: 1 in the middle, a linear ramp down to ~0 over
    ``overlap / 2`` pixels at each border (never 0, so a lone window still counts)."""
    ramp = max(1, overlap // 2)

    def axis(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        d = np.minimum(i, n - 1 - i)
        return np.clip((d + 0.5) / ramp, 0.02, 1.0)

    return np.outer(axis(h), axis(w)).astype(np.float32)


@dataclass
class Box:
    """A window in image pixels: top-left ``(x, y)`` and size ``(w, h)``."""

    x: int
    y: int
    w: int
    h: int


@dataclass
class Nucleus:
    """One committed nucleus of :func:`segment_windows`.

    Attributes:
        id: global id (1, 2, ... in commit order).
        type: class code (0 = unknown / no type branch).
        type_prob: share of the nucleus' pixels that voted for ``type``.
        y, x: top-left of ``mask`` in image pixels.
        mask: bool ``(h, w)`` pixels of the nucleus inside its bounding box.
    """

    id: int
    type: int
    type_prob: float
    y: int
    x: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


MapsFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ReadFn = Callable[[list[Box]], Iterable[tuple[list[np.ndarray], list[Box]]]]


@dataclass
class _Band:
    """Blended maps of image rows ``[top, top + rows)`` (all columns)."""

    channels: int
    width: int
    top: int = 0
    acc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))
    weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    done: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))

    def __post_init__(self) -> None:
        self.acc = np.zeros((self.channels, 0, self.width), np.float32)
        self.weight = np.zeros((0, self.width), np.float32)
        self.done = np.zeros((0, self.width), np.int32)

    @property
    def bottom(self) -> int:
        return self.top + self.weight.shape[0]

    def extend_to(self, bottom: int) -> None:
        extra = bottom - self.bottom
        if extra > 0:
            self.acc = np.concatenate([self.acc, np.zeros((self.channels, extra, self.width), np.float32)], axis=1)
            self.weight = np.concatenate([self.weight, np.zeros((extra, self.width), np.float32)])
            self.done = np.concatenate([self.done, np.zeros((extra, self.width), np.int32)])

    def drop_above(self, row: int) -> None:
        k = max(0, min(row, self.bottom) - self.top)
        if k:
            self.acc = np.ascontiguousarray(self.acc[:, k:])
            self.weight = np.ascontiguousarray(self.weight[k:])
            self.done = np.ascontiguousarray(self.done[k:])
            self.top += k


def segment_windows(
    maps_fn: MapsFn,
    read_windows: ReadFn,
    height: int,
    width: int,
    *,
    num_classes: int,
    tile_size: int = 256,
    overlap: int = 64,
    margin: int = 48,
    band_rows: int = 512,
    postprocess: PostprocessConfig | None = None,
    keep_window: Callable[[Box], bool] | None = None,
    on_windows: Callable[[int, int], None] | None = None,
) -> Iterator[Nucleus]:
    """Stream nuclei out of a ``height x width`` image seen through overlapping windows.

    Args:
        maps_fn: float tiles ``(B, 3, h, w)`` -> dict of ``np`` ``(B, h, w)`` nucleus
            probability, ``hv`` ``(B, 2, h, w)`` and (when ``num_classes``) ``tp``
            ``(B, K + 1, h, w)`` probabilities (e.g. :meth:`NucleiSegmenter.predict`).
        read_windows: list of boxes -> iterable of ``(uint8 arrays, boxes)`` batches, in any
            batching but in the given order (e.g. a slide's prefetching tile reader).
        tile_size, overlap: window side and overlap in pixels.
        margin: rows of context kept above and below a band line (must exceed the radius of
            the largest nucleus; default 48 px = 24 um at 0.5 um/px).
        band_rows: post-process once at least this many new rows are final.
        postprocess: HoVer-Net thresholds.
        keep_window: windows for which it returns False are not run (their pixels count
            as background unless another window covers them), e.g. glass on a slide.
        on_windows: progress callback ``(windows done, windows total)``.

    Yields:
        :class:`Nucleus` objects in commit order (ids 1, 2, ...).
    """
    if tile_size < 16 or not 0 <= overlap < tile_size:
        raise InputError("tile_size/overlap", f"{tile_size}/{overlap}; need tile_size >= 16 and "
                                              "0 <= overlap < tile_size")
    if margin < 1 or band_rows < 1:
        raise InputError("margin/band_rows", f"{margin}/{band_rows}; both must be positive")
    cfg = postprocess or PostprocessConfig()
    ys = window_origins(height, tile_size, overlap)
    xs = window_origins(width, tile_size, overlap)
    th, tw = min(tile_size, height), min(tile_size, width)
    weights = blend_weights(th, tw, overlap)
    channels = 3 + (num_classes + 1 if num_classes else 0)
    band = _Band(channels, width)
    rows = [[Box(x, y, tw, th) for x in xs] for y in ys]
    total = sum(len(r) for r in rows)
    done_windows = 0
    p0 = 0  # first row of the next post-processed region
    next_id = 1
    for r, row in enumerate(rows):
        y = ys[r]
        band.extend_to(y + th)
        wanted = [b for b in row if keep_window is None or keep_window(b)]
        if wanted:
            for arrays, boxes in read_windows(wanted):
                tiles = torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrays])).permute(0, 3, 1, 2)
                maps = maps_fn(tiles.float().div_(255.0))
                stack = [maps["np"][:, None], maps["hv"]] + ([maps["tp"]] if num_classes else [])
                out = torch.cat(stack, dim=1).float().cpu().numpy()
                for k, b in enumerate(boxes):
                    ry = b.y - band.top
                    band.acc[:, ry:ry + b.h, b.x:b.x + b.w] += out[k] * weights
                    band.weight[ry:ry + b.h, b.x:b.x + b.w] += weights
                done_windows += len(boxes)
                if on_windows is not None:
                    on_windows(done_windows, total)
        done_windows += len(row) - len(wanted)
        last = r + 1 == len(rows)
        final = height if last else ys[r + 1]
        if not last and final - p0 < band_rows + 2 * margin:
            continue
        commit_below = height if last else final - margin
        for nucleus in _commit_band(band, p0, final, commit_below, num_classes, cfg, next_id):
            next_id += 1
            yield nucleus
        if not last:
            p0 = max(0, commit_below - margin)
            band.drop_above(p0)
    if on_windows is not None:
        on_windows(total, total)


def _commit_band(band: _Band, p0: int, p1: int, commit_below: int, num_classes: int, cfg: PostprocessConfig,
                 first_id: int) -> Iterator[Nucleus]:
    """Post-process rows ``[p0, p1)`` of the band and commit nuclei whose centroid row is
    below ``commit_below`` (see the module docstring for the merging rules)."""
    a, b = p0 - band.top, p1 - band.top
    weight = band.weight[a:b]
    covered = weight > 0
    maps = band.acc[:, a:b] / np.where(covered, weight, 1.0)[None]
    np_prob = np.where(covered, maps[0], 0.0)
    inst = hovernet_instances(np_prob, maps[1:3], cfg)
    n = int(inst.max(initial=0))
    if n == 0:
        return
    if num_classes:
        ids, types, probs = instance_types(inst, maps[3:])
    else:
        ids, types, probs = np.arange(1, n + 1), np.zeros(n, np.uint8), np.ones(n)
    rows = np.indices(inst.shape)[0]
    area = np.bincount(inst.ravel(), minlength=n + 1).astype(np.float64)
    cy = np.bincount(inst.ravel(), weights=rows.ravel(), minlength=n + 1) / np.maximum(area, 1) + p0
    done = band.done[a:b]
    clash = np.bincount(inst[done > 0], minlength=n + 1)
    top_touch = np.zeros(n + 1, dtype=bool)
    if p0 > 0:
        top_touch[np.unique(inst[0])] = True
    slices = _find_objects(inst, n)
    next_id = first_id
    for k, i in enumerate(ids):
        i = int(i)
        if cy[i] >= commit_below or top_touch[i] or clash[i] * 2 > area[i]:
            continue
        sl = slices[i - 1]
        mask = (inst[sl] == i) & (done[sl] == 0)
        if mask.sum() < cfg.min_size:
            continue
        done[sl][mask] = next_id
        yield Nucleus(id=next_id, type=int(types[k]), type_prob=float(probs[k]), y=p0 + sl[0].start,
                      x=sl[1].start, mask=mask)
        next_id += 1


def _find_objects(inst: np.ndarray, n: int) -> list[tuple[slice, slice]]:
    import scipy.ndimage as ndi

    return ndi.find_objects(inst, max_label=n)


# =========================================================================== test-time augmentation
# (k, flip): rot90 by k quarter turns (torch.rot90 over (H, W)), then a left-right flip.
_DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))
_FLIPS = ((0, False), (0, True), (2, True), (2, False))  # identity, left-right, up-down, both (= rot180)
TTA_TRANSFORMS: dict[Any, tuple[tuple[int, bool], ...]] = {
    False: ((0, False),), None: ((0, False),), True: _DIHEDRAL, "dihedral": _DIHEDRAL, "flips": _FLIPS,
}


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two (H, W) axes by ``k`` quarter turns, then flip left-right."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return x.flip(-1) if flip else x


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`_dihedral` for maps of scalars (NP, TP)."""
    x = x.flip(-1) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1)) if k % 4 else x


def _undo_dihedral_hv(hv: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`_dihedral` for ``(B, 2, H, W)`` HV maps (channel 0 = x offset, 1 = y offset).

    The HV maps are vector fields: a left-right flip negates the x offset, and one quarter
    turn of the image (torch.rot90, k=1) maps offsets ``(h, v)`` to ``(v, -h)``; undoing
    it maps them to ``(-v, h)``. Moving only the pixels would point every offset wrong.
    """
    if flip:
        hv = torch.stack([-hv[:, 0], hv[:, 1]], dim=1).flip(-1)
    for _ in range(k % 4):
        hv = torch.rot90(torch.stack([-hv[:, 1], hv[:, 0]], dim=1), -1, dims=(-2, -1))
    return hv


# =========================================================================== inference wrapper
class NucleiSegmenter:
    """Inference with a :class:`HoVerNetLite`: raw maps for tiles, labels for any image.

    Args:
        model: the network (put in eval mode).
        device: where it runs (default: the model's device).
        tta: test-time augmentation of :meth:`predict` (so of :meth:`segment`): ``True`` or
            ``"dihedral"`` averages the NP/HV/TP maps over the 8 rotations x flips of each
            tile (8x the network time), ``"flips"`` over identity + 3 flips (4x), ``False``
            none. HV maps are mapped back with their vectors rotated, not only their pixels.
        postprocess: HoVer-Net thresholds; default :meth:`PostprocessConfig.for_mpp` of the
            model's training resolution.
    """

    def __init__(self, model: HoVerNetLite, device: str | torch.device | None = None, *, tta: bool = False,
                 postprocess: PostprocessConfig | None = None):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        if tta not in TTA_TRANSFORMS:
            raise InputError("tta", f"{tta!r}; use False, True / 'dihedral' (8 transforms) or 'flips' (4)")
        self.tta = tta
        self.num_classes = int(model.config.num_classes)
        self.class_names = {i + 1: str(n) for i, n in enumerate(model.config.class_names)} if self.num_classes \
            else {}
        self.mpp = float(model.config.mpp) if model.config.mpp else None
        self.postprocess = postprocess or PostprocessConfig.for_mpp(self.mpp)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        **kwargs: Any) -> NucleiSegmenter:
        """Load a ``save_pretrained`` folder (config.json + safetensors only).

        Raises:
            WeightsError: missing folder, no config.json, no safetensors (``.bin``/``.pt`` are
                refused, never unpickled), or weights that do not fit the config.
        """
        from pipelines.encoders import load_model_folder

        model = load_model_folder(HoVerNetLite, Path(folder))
        return cls(model, device=device, **kwargs)

    # ------------------------------------------------------------------ raw maps
    def _forward(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        from studio.devices import autocast_context

        with autocast_context(self.device):  # bf16/fp16 on CUDA, a no-op (exact fp32) on the CPU
            out = self.model(tiles)
        maps = {"np": out.np_logits.float().softmax(dim=1)[:, 1], "hv": out.hv.float()}
        if out.tp_logits is not None:
            maps["tp"] = out.tp_logits.float().softmax(dim=1)
        return maps

    @torch.no_grad()
    def predict(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw maps of float tiles ``(B, 3, H, W)`` in [0, 1].

        Returns:
            ``np`` ``(B, H, W)`` nucleus probability, ``hv`` ``(B, 2, H, W)`` in [-1, 1],
            and ``tp`` ``(B, K + 1, H, W)`` type probabilities when the model has a TP
            branch; on the CPU, float32.
        """
        if not isinstance(tiles, torch.Tensor) or tiles.ndim != 4 or tiles.shape[1] != 3:
            shape = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
            raise InputError("tiles", f"{shape}; expected a float tensor (B, 3, H, W) in [0, 1]")
        if not tiles.is_floating_point():
            raise InputError("tiles", f"dtype {tiles.dtype}; expected float in [0, 1] (use studio.io.to_tensor)")
        x = tiles.to(self.device, torch.float32)
        maps = self._forward(x)
        transforms = TTA_TRANSFORMS[self.tta]
        for k, flip in transforms[1:]:
            m = self._forward(_dihedral(x, k, flip))
            maps["np"] += _undo_dihedral(m["np"], k, flip)
            maps["hv"] += _undo_dihedral_hv(m["hv"], k, flip)
            if "tp" in maps:
                maps["tp"] += _undo_dihedral(m["tp"], k, flip)
        if len(transforms) > 1:
            maps = {name: v / len(transforms) for name, v in maps.items()}
        return {k: v.float().cpu() for k, v in maps.items()}

    # ------------------------------------------------------------------ labels
    def segment(self, image: np.ndarray, *, tile_size: int = 256, overlap: int = 64, batch_size: int = 4,
                margin: int = 48, band_rows: int = 512, image_mpp: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Instance and class maps of a uint8 ``(H, W, 3)`` image of any size.

        Overlapping ``tile_size`` windows (``overlap`` pixels shared), blended, then
        post-processed in bands (see :func:`segment_windows`). ``image_mpp``: the image's
        microns per pixel when it differs from the model's (e.g. a 10x image, ~1 um/px):
        the image is resampled to the model's resolution and the maps back to the image's
        pixel grid (nuclei that shrink below a pixel are dropped).

        Returns:
            ``inst`` int32 ``(H, W)`` (contiguous ids), ``cls`` uint8 ``(H, W)`` and ``info``:
            ``n_nuclei``, ``class_counts`` ({class code: count}), ``type_prob`` ({id: p}),
            ``windows``, ``seconds``.
        """
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError("image", f"shape {arr.shape} dtype {arr.dtype}; expected uint8 (H, W, 3) RGB")
        if image_mpp is not None and self.mpp and abs(image_mpp / self.mpp - 1) > 0.05:
            return self._segment_rescaled(arr, float(image_mpp), tile_size=tile_size, overlap=overlap,
                                          batch_size=batch_size, margin=margin, band_rows=band_rows,
                                          progress=progress)
        if batch_size < 1:
            raise InputError("batch_size", f"{batch_size}; must be positive")
        h, w = arr.shape[:2]
        start = time.time()
        inst = np.zeros((h, w), dtype=np.int32)
        cls = np.zeros((h, w), dtype=np.uint8)
        type_prob: dict[int, float] = {}
        counter = [0]

        def read(boxes: list[Box]) -> Iterator[tuple[list[np.ndarray], list[Box]]]:
            for i in range(0, len(boxes), batch_size):
                chunk = boxes[i:i + batch_size]
                yield [arr[b.y:b.y + b.h, b.x:b.x + b.w] for b in chunk], chunk

        def on_windows(done: int, total: int) -> None:
            counter[0] = total
            if progress is not None:
                progress(done, total)

        for nuc in segment_windows(self.predict, read, h, w, num_classes=self.num_classes, tile_size=tile_size,
                                   overlap=overlap, margin=margin, band_rows=band_rows,
                                   postprocess=self.postprocess, on_windows=on_windows):
            mh, mw = nuc.mask.shape
            inst[nuc.y:nuc.y + mh, nuc.x:nuc.x + mw][nuc.mask] = nuc.id
            cls[nuc.y:nuc.y + mh, nuc.x:nuc.x + mw][nuc.mask] = nuc.type
            type_prob[nuc.id] = nuc.type_prob
        counts = np.bincount(_types_of(inst, cls), minlength=self.num_classes + 1)
        info = {"n_nuclei": int(inst.max(initial=0)),
                "class_counts": {int(c): int(counts[c]) for c in range(len(counts))},
                "type_prob": type_prob, "windows": counter[0], "seconds": round(time.time() - start, 3)}
        return inst, cls, info


    def _segment_rescaled(self, arr: np.ndarray, image_mpp: float, **kwargs: Any
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from PIL import Image

        from studio.nuclei import relabel_sequential

        if not 0.05 <= image_mpp <= 20:
            raise InputError("image_mpp", f"{image_mpp}; expected microns per pixel between 0.05 and 20")
        h, w = arr.shape[:2]
        factor = image_mpp / self.mpp
        size = (max(16, round(w * factor)), max(16, round(h * factor)))
        resample = Image.Resampling.BICUBIC if factor > 1 else Image.Resampling.BOX
        work = np.asarray(Image.fromarray(arr).resize(size, resample))
        inst, cls, info = self.segment(work, **kwargs)
        inst = np.asarray(Image.fromarray(inst).resize((w, h), Image.Resampling.NEAREST), dtype=np.int32)
        cls = np.asarray(Image.fromarray(cls).resize((w, h), Image.Resampling.NEAREST), dtype=np.uint8)
        kept = np.unique(inst[inst > 0])
        inst = relabel_sequential(inst)
        old_to_new = dict(zip(kept.tolist(), range(1, len(kept) + 1), strict=True))
        info["type_prob"] = {old_to_new[k]: v for k, v in info["type_prob"].items() if k in old_to_new}
        counts = np.bincount(_types_of(inst, cls), minlength=self.num_classes + 1)
        info.update(n_nuclei=int(inst.max(initial=0)),
                    class_counts={int(c): int(counts[c]) for c in range(len(counts))},
                    image_mpp=image_mpp, working_mpp=self.mpp)
        return inst, cls, info


def _types_of(inst: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Class of each instance 1..n (instances are single-class by construction)."""
    n = int(inst.max(initial=0))
    out = np.zeros(n + 1, dtype=np.int64)
    fg = inst > 0
    out[inst[fg]] = cls[fg]
    return out[1:]

"""The shared shape of every classical stain normalizer: ``fit`` a target, ``estimate`` a
source, ``transform`` a batch.

Two ways to transform, because they answer different needs:

* **per tile** (``transform(batch)``): every tile's stain statistics are estimated from
  the tile itself, batched — the same work torchstain does one tile at a time;
* **per slide** (``transform(batch, source=profile)``): the source profile was estimated
  once from many tissue tiles of a slide (:meth:`StainNormalizer.estimate`), so every tile
  of the slide gets the same colour mapping and adjacent tiles cannot disagree. For
  Macenko this collapses to one 3x3 matrix in optical-density space.

Robustness is part of the contract: a tile with too little tissue (white, black, near
empty) or only one stain (degenerate stain estimate) never yields NaN or a colour cast;
it uses the ``fallback`` profile (the slide's, when known) or else the target itself,
which leaves the tile's colours as they are.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from studio.color import channel_min, ink_regions, rgb_to_od
from studio.errors import InputError
from studio.io import to_tensor, to_uint8
from studio.stain.lut import ColorLUT
from studio.stain.profile import StainProfile

Params = dict[str, torch.Tensor]
ReferenceLike = torch.Tensor | np.ndarray | Sequence[np.ndarray] | Sequence[torch.Tensor]


def as_pixel_sets(images: ReferenceLike, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Accept tiles in any everyday form; return a list of float ``(3, N)`` pixel sets in [0, 1].

    Forms: float tensor ``(B,3,H,W)``/``(3,H,W)`` in [0, 1]; uint8 array ``(H,W,3)`` or
    ``(B,H,W,3)``; a list of such arrays/tensors of different sizes.
    """
    if isinstance(images, (list, tuple)):
        out: list[torch.Tensor] = []
        for item in images:
            out.extend(as_pixel_sets(item, device))
        return out
    return [t.reshape(3, -1) for t in as_batch(images, device)]


def as_batches(images: ReferenceLike, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The forms of :func:`as_pixel_sets` as a list of ``(B, 3, H, W)`` batches (spatial
    layout kept), in the same pixel order."""
    if isinstance(images, (list, tuple)):
        out: list[torch.Tensor] = []
        for item in images:
            out.extend(as_batches(item, device))
        return out
    return [as_batch(images, device)]


def as_batch(images: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """A batch ``(B, 3, H, W)`` float32 in [0, 1] from a tensor or a uint8 array."""
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError("tiles", f"array of shape {images.shape}; expected (H, W, 3) or (B, H, W, 3) RGB")
        if arr.dtype != np.uint8:
            raise InputError("tiles", f"array dtype {arr.dtype}; expected uint8 RGB")
        return to_tensor(arr, device)
    if not isinstance(images, torch.Tensor):
        raise InputError("tiles", f"got {type(images).__name__}; expected a tensor or a uint8 array")
    t = images
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 3:
        raise InputError("tiles", f"tensor of shape {tuple(images.shape)}; expected (B, 3, H, W) RGB")
    if t.dtype == torch.uint8:
        return t.to(device).float().div_(255.0)
    if not t.is_floating_point():
        raise InputError("tiles", f"tensor dtype {t.dtype}; expected float in [0, 1] or uint8")
    return t.to(device=device, dtype=torch.float32)


class StainNormalizer(ABC):
    """Base class: subclasses implement :meth:`_estimate`, :meth:`_apply` and the profile
    conversions; this class owns input handling, pooling, fallbacks and batching."""

    name: ClassVar[str]
    #: Whether ``transform`` maps each pixel independently (no spatial context): such
    #: transforms need no overlap or seam blending in the slide job.
    pixelwise: ClassVar[bool] = True

    def __init__(
        self,
        *,
        background: float = 240.0 / 255.0,
        min_tissue_pixels: int = 256,
        max_fit_pixels: int = 1 << 20,
        chunk_pixels: int = 1 << 19,
        estimate_stride: int = 1,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if not 0.0 < background <= 1.0:
            raise InputError("background", f"{background} must be in (0, 1]")
        self.background = float(background)
        self.min_tissue_pixels = int(min_tissue_pixels)
        self.max_fit_pixels = int(max_fit_pixels)
        self.chunk_pixels = int(chunk_pixels)
        if estimate_stride < 1:
            raise InputError("estimate_stride", f"{estimate_stride}; must be >= 1")
        self.estimate_stride = int(estimate_stride)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None
        self.target: StainProfile = self.default_target()
        self._lut_cache: dict[str, ColorLUT] = {}

    # ------------------------------------------------------------------ subclass API
    @abstractmethod
    def default_target(self) -> StainProfile:
        """The method's published reference, used until :meth:`fit` is called."""

    @abstractmethod
    def _estimation_mask(self, od: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: the pixels the estimate rests on, from OD ``(B, 3, N)``."""

    @abstractmethod
    def _estimate(
        self, od: torch.Tensor, mask: torch.Tensor, rgb: torch.Tensor, pooled: bool = False
    ) -> tuple[Params, torch.Tensor]:
        """Estimate per-row parameters from ``(B, 3, N)`` pixels; return (params, ok (B,) bool).

        ``pooled`` marks one estimate over a whole pool (a slide's sampled tiles, a
        reference): it adds the descriptive extras a saved profile carries (percentiles)
        and skips guards that only make sense for single tiles.

        Methods whose :meth:`_ink` returns a mask also take ``ignore=``: ``(B, N)`` bool,
        the pixels to leave out of every statistic (already removed from ``mask``)."""

    @abstractmethod
    def _apply(self, tiles: torch.Tensor, source: Params, target: Params, od: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` tiles from per-tile ``source`` params to ``target`` params
        (``od``: the tiles' optical density ``(B, 3, H*W)`` when already computed)."""

    @abstractmethod
    def _params_from_profile(self, profile: StainProfile, device: torch.device) -> Params:
        """Params with a leading batch dimension of 1."""

    @abstractmethod
    def _profile_from_params(self, params: Params, index: int, tissue_pixels: int, source: str) -> StainProfile:
        """Profile of row ``index`` of ``params``."""

    def _ink(self, tiles: torch.Tensor, od: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(B, H, W)`` bool: pixels of RGB tiles ``(B, 3, H, W)`` (optical density ``od``
        when already computed) that no estimate may use (marker ink), or None when the
        method keeps every pixel (the default)."""
        return None

    def _hyperparams(self) -> dict[str, Any]:
        return {"background": self.background}

    # ------------------------------------------------------------------ public API
    def od(self, rgb: torch.Tensor) -> torch.Tensor:
        """Optical density against this normalizer's background (torchstain's ``Io``)."""
        return rgb_to_od(rgb, background=self.background)

    def fit(self, reference: ReferenceLike, source: str = "reference") -> StainProfile:
        """Estimate the target profile from reference tiles (pooled) and keep it."""
        profile = self.estimate(reference, source=source)
        if profile.fallback:
            raise InputError(source, "holds too little usable tissue (or a single stain) to fit a reference")
        self.target = profile
        return profile

    def set_target(self, profile: StainProfile) -> None:
        """Use a saved profile as the target (``StainProfile.load(path)``)."""
        if profile.method != self.name:
            raise InputError(profile.source or "profile",
                             f"is a {profile.method} profile; the {self.name} normalizer needs its own")
        self.target = profile

    def estimate(self, images: ReferenceLike, source: str = "tiles") -> StainProfile:
        """One profile pooled over the tissue pixels of all ``images`` (e.g. tiles sampled
        from a whole slide). Falls back (``profile.fallback``) to the target when the pool
        holds too little tissue or only one stain."""
        batches = as_batches(images, self.device)
        if not batches or not sum(b.shape[0] for b in batches):
            raise InputError(source, "no images to estimate a stain profile from")
        # (3, M) in tile order; ink is found per tile, where strokes are still connected.
        pixels = torch.cat([b.transpose(0, 1).reshape(3, -1) for b in batches], dim=1)
        inks = [self._ink(b) for b in batches]
        ink = None if all(i is None for i in inks) else torch.cat(
            [i.reshape(-1) if i is not None else torch.zeros(b[:, 0].numel(), dtype=torch.bool, device=b.device)
             for i, b in zip(inks, batches, strict=True)])
        if pixels.shape[1] > self.max_fit_pixels:
            # A uniform subsample keeps the pool's tissue/glass mix (and thus its statistics).
            # Drawn with replacement: a full permutation of a slide's pooled pixels costs more
            # than the whole estimate (0.23 s for 4 M), and 1 M draws estimate percentiles as well.
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            pick = torch.randint(pixels.shape[1], (self.max_fit_pixels,), generator=gen).to(pixels.device)
            pixels = pixels[:, pick]
            ink = ink[pick] if ink is not None else None
        pixels = pixels.unsqueeze(0)
        od = self.od(pixels)
        mask = self._estimation_mask(od)
        extra: dict[str, torch.Tensor] = {}
        if ink is not None:
            ink = ink.unsqueeze(0)
            mask &= ~ink
            extra["ignore"] = ink
        n_tissue = int(mask.sum())
        if n_tissue < self.min_tissue_pixels:
            return self._fallback_profile(source, n_tissue)
        params, ok = self._estimate(od, mask, pixels, pooled=True, **extra)
        if not bool(ok[0]):
            return self._fallback_profile(source, n_tissue)
        return self._profile_from_params(params, 0, n_tissue, source)

    def transform(
        self,
        tiles: torch.Tensor | np.ndarray,
        source: StainProfile | None = None,
        fallback: StainProfile | None = None,
    ) -> torch.Tensor:
        """Normalize a batch to the target.

        Args:
            tiles: ``(B, 3, H, W)`` float in [0, 1] (or uint8 forms, see :func:`as_batch`).
            source: a slide-level source profile: every tile gets the same mapping.
                ``None`` estimates each tile's own statistics (per-tile mode).
            fallback: per-tile mode only: the profile used for tiles whose own estimate is
                unusable (defaults to the target, i.e. such tiles are left as they are).

        Returns:
            ``(B, 3, H, W)`` float32 in [0, 1].
        """
        batch = as_batch(tiles, self.device)
        if source is not None and source.method != self.name:
            raise InputError(source.source or "source profile", f"is a {source.method} profile; expected {self.name}")
        # On CPU, work through the batch in cache-sized chunks: every step is a pass over
        # memory, and 8 tiles of 256x256 (~6 MB of float OD) stay in cache where 64 do not
        # (measured: 440 vs 250 tiles/s for per-tile Macenko on 2 cores).
        b, _, h, w = batch.shape
        per_chunk = b if batch.is_cuda else max(1, self.chunk_pixels // (h * w))
        if per_chunk >= b:
            return self._transform_chunk(batch, source, fallback)
        out = torch.empty_like(batch)
        for start in range(0, b, per_chunk):
            out[start:start + per_chunk] = self._transform_chunk(batch[start:start + per_chunk], source, fallback)
        return out

    __call__ = transform

    def _transform_chunk(self, batch: torch.Tensor, source: StainProfile | None, fallback: StainProfile | None
                         ) -> torch.Tensor:
        device = batch.device
        target = self._params_from_profile(self.target, device)
        if source is not None:
            src = self._params_from_profile(source, device)
        else:
            b = batch.shape[0]
            flat = batch.reshape(b, 3, -1)
            od = self.od(flat)
            ink = self._ink(batch, od.reshape(batch.shape))  # (B, H, W) or None
            if self.estimate_stride > 1:
                # Per-tile statistics from every s-th pixel in both directions: s^2 times
                # less estimation work, the transform itself still sees every pixel.
                s = self.estimate_stride
                est_rgb = batch[:, :, ::s, ::s].reshape(b, 3, -1)
                est_od = od.reshape(batch.shape)[:, :, ::s, ::s].reshape(b, 3, -1)
                min_pixels = max(2, self.min_tissue_pixels // (s * s))
                est_ink = ink[:, ::s, ::s].reshape(b, -1) if ink is not None else None
            else:
                est_rgb, est_od, min_pixels = flat, od, self.min_tissue_pixels
                est_ink = ink.reshape(b, -1) if ink is not None else None
            mask = self._estimation_mask(est_od)
            extra: dict[str, torch.Tensor] = {}
            if est_ink is not None:
                mask &= ~est_ink
                extra["ignore"] = est_ink
            params, ok = self._estimate(est_od, mask, est_rgb, **extra)
            ok = ok & (mask.sum(dim=1) >= min_pixels)
            backup = self._params_from_profile(fallback, device) if fallback is not None else target
            src = {k: torch.where(_expand_like(ok, v), v, backup[k].expand_as(v))
                   for k, v in params.items() if k in backup}
            return self._apply(batch, src, target, od=od)
        return self._apply(batch, src, target)

    def lut(self, source: StainProfile) -> ColorLUT:
        """The exact uint8 lookup table of ``transform(., source=source)`` (cached): the
        fast path for slides and tile folders whose source profile is fixed."""
        if not self.pixelwise:
            raise InputError(self.name, "is not a per-pixel transform; it has no lookup table")
        key = json.dumps([source.to_dict(), self.target.to_dict()], sort_keys=True)
        if key not in self._lut_cache:
            self._lut_cache.clear()  # one slide at a time: 64 MiB per table
            od_map = self.od_linear_map(source)
            self._lut_cache[key] = (ColorLUT.from_od_map(od_map, background=self.background) if od_map is not None
                                    else ColorLUT.from_transform(lambda t: self.transform(t, source=source)))
        return self._lut_cache[key]

    def od_linear_map(self, source: StainProfile) -> torch.Tensor | None:
        """The ``(3, 3)`` matrix ``M`` when ``transform(., source=source)`` is exactly
        ``od_to_rgb(M @ od(rgb))`` (its lookup table then factorises per channel), else None."""
        return None

    def transform_uint8(self, images: np.ndarray | Sequence[np.ndarray], source: StainProfile | None = None,
                        fallback: StainProfile | None = None, workers: int = 1) -> np.ndarray:
        """uint8 ``(B, H, W, 3)`` (or a list of same-shaped tiles, taken as their stack) in,
        uint8 ``(B, H, W, 3)`` out: the lookup table when ``source`` is fixed, else the
        batched per-tile float path."""
        if source is not None and self.pixelwise:
            return self.lut(source).apply(images, workers=workers)
        arr = np.asarray(images)
        return to_uint8(self.transform(arr, fallback=fallback)).reshape(arr.shape)

    # ------------------------------------------------------------------ helpers
    def _fallback_profile(self, source: str, n_tissue: int) -> StainProfile:
        profile = StainProfile(**{**self.target.to_dict(), "fallback": True, "tissue_pixels": n_tissue,
                                  "source": f"{source} (fallback: too little tissue or one stain; "
                                            f"target statistics used)"})
        return profile

    def _base_profile_fields(self, tissue_pixels: int, source: str) -> dict[str, Any]:
        return {"method": self.name, "background": self.background, "tissue_pixels": tissue_pixels,
                "source": source, "params": self._hyperparams()}


def _expand_like(ok: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return ok.reshape(ok.shape + (1,) * (value.ndim - 1))


PERCENTILES = (1.0, 50.0, 99.0)


class StainMatrixNormalizer(StainNormalizer):
    """Shared profile handling of the methods that estimate a stain matrix and robust
    concentration maxima (Macenko, Vahadane): params ``matrix`` (B, 3, 2), ``max_c``
    (B, 2) and, for pooled estimates, ``percentiles`` (B, 2 stains, 3 percentiles)."""

    #: Glass threshold and black limit (OD, every channel); subclasses set them in ``__init__``.
    beta: float
    black_od: float
    #: Leave marker ink (:func:`studio.color.ink_regions`) out of every estimate.
    exclude_ink: bool = True

    def _estimation_mask(self, od: torch.Tensor) -> torch.Tensor:
        """Tissue pixels: every channel between ``beta`` (glass) and ``black_od`` (the base
        class then removes :meth:`_ink`)."""
        lowest = channel_min(od)
        return (lowest >= self.beta) & (lowest <= self.black_od)

    def _ink(self, tiles: torch.Tensor, od: torch.Tensor | None = None) -> torch.Tensor | None:
        """Marker ink (:func:`studio.color.ink_regions`), left out of the stain matrix and the
        concentration maxima.

        Why: the stain matrix comes from the extreme directions (Macenko) or the dominant
        directions (Vahadane) of the tissue's optical density. Green and blue pen lie
        beyond hematoxylin there, so a stroke over 5 % of a tile becomes the
        "hematoxylin" vector. Its high "concentrations" also set the 99th percentile, and
        real nuclei lose their colour (measured on a real tile: non-ink pixels moved by 43
        grey levels). Ink pixels are still transformed: only the fit ignores them."""
        if not self.exclude_ink:
            return None
        return ink_regions(self.od(tiles) if od is None else od)

    def _params_from_profile(self, profile: StainProfile, device: torch.device) -> Params:
        return {"matrix": profile.matrix(device).unsqueeze(0), "max_c": profile.max_conc(device).unsqueeze(0)}

    def _profile_from_params(self, params: Params, index: int, tissue_pixels: int, source: str) -> StainProfile:
        percentiles = {}
        if "percentiles" in params:
            p = params["percentiles"][index]  # (2 stains, 3 percentiles)
            percentiles = {f"p{q:g}": p[:, j].tolist() for j, q in enumerate(PERCENTILES)}
        return StainProfile(stain_matrix=params["matrix"][index].tolist(),
                            max_concentrations=params["max_c"][index].tolist(),
                            concentration_percentiles=percentiles, **self._base_profile_fields(tissue_pixels, source))

    @staticmethod
    def concentration_percentiles(conc: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | None
                                  ) -> torch.Tensor:
        """``(B, 2, N)`` concentrations -> ``(B, 2, 3)`` percentiles (PERCENTILES) over ``mask``."""
        from studio.stain.stats import masked_percentile

        return torch.stack([torch.stack([masked_percentile(conc[:, i], mask, q, count) for q in PERCENTILES], dim=1)
                            for i in range(conc.shape[1])], dim=1)

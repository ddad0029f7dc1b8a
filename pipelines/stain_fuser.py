"""``StainFuserPipeline``: diffusion stain normalization (after StainFuser), per tile and per slide.

A conditional latent diffusion model renders a source tile in a target stain:

* **structure** enters by latent concatenation: the UNet (diffusers ``UNet2DModel``) sees
  the noisy target latent next to the source tile's latent (same tile VAE);
* **style** enters through the reference: :func:`reference_statistics` of the reference
  tiles (tissue optical-density mean and covariance -- the stain vectors and strengths --
  plus CIELAB mean and spread) go through :class:`ReferenceEncoder` to a vector added to
  the timestep embedding (``class_embed_type="identity"``);
* **deterministic, few-step**: sampling starts from the *source latent* noised to
  ``strength`` (not from pure noise: the structure is already there), then DDIM with
  ``eta = 0`` for at most 10 steps. The noise is a fixed function of the seed and of the
  tile's position on the slide (:func:`positional_noise`), so overlapping tiles share it
  and agree; blank tiles are passed through untouched (nothing is hallucinated on glass);
* **structure kept exactly**: by default only the *colour* of the decoded output is used,
  transferred onto the source pixels by a guided filter in optical density
  (:func:`studio.color.transfer_colour`), because the small tile VAE blurs nuclei edges
  (``detail="model"`` returns the decoded image as it is).

The same network trained with L1 and no noise is the **one-step regressor**
(``config.mode = "regressor"``): the baseline the diffusion model has to beat.

**Classical prior** (``config.prior = "reinhard"``): the source is first moved to the
reference's CIELAB tissue statistics (the studio's tissue-masked Reinhard, fitted on the
reference tiles), its latent is concatenated as a third input, sampling
starts from it (not from the source), and the regressor predicts a residual on it. The
network then learns only what a global colour transfer cannot do (non-linear tone curves,
per-stain shifts) instead of re-learning colour transfer from scratch; on a whole slide
the prior uses the slide's pooled source statistics (the transform's ``estimate``), so it is
one mapping per slide and adds no seams.

Registered as the tile transform ``stainfuser`` (entry point), so ``histostudio normalize
--method stainfuser --reference REF`` runs it over slide batches with halo cross-fading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

from pipelines.loading import LocalPipeline
from pipelines.outputs import format_images
from studio.devices import autocast_context
from studio.errors import InputError, WeightsError

N_STATS = 15
MIN_TISSUE = 0.05  # tiles with less tissue pass through unchanged


def reference_statistics(tiles: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float tiles -> ``(15,)`` stain statistics of their pooled tissue pixels:
    OD mean (3), OD covariance upper triangle (6), CIELAB mean (3) and std (3) (LAB scaled to ~unit).

    Raises:
        InputError: the tiles hold (almost) no tissue -- a reference must show stained tissue.
    """
    from studio.color import rgb_to_lab, rgb_to_od, tissue_mask

    tiles = tiles.float().clamp(0, 1)
    mask = tissue_mask(tiles)[:, 0]
    if mask.float().mean() < 0.02 or int(mask.sum()) < 256:
        raise InputError("reference", "holds no tissue (blank, glass or background): give tiles of stained tissue "
                                      "in the target stain")
    od = rgb_to_od(tiles).permute(1, 0, 2, 3)[:, mask]  # (3, M)
    lab = rgb_to_lab(tiles).permute(1, 0, 2, 3)[:, mask] / torch.tensor([[50.0], [50.0], [50.0]])
    mean = od.mean(1)
    cov = torch.cov(od)
    iu = torch.triu_indices(3, 3)
    return torch.cat([mean, cov[iu[0], iu[1]] * 4, lab.mean(1), lab.std(1) * 2])


PRIORS = ("none", "reinhard")


def unet_in_channels(prior: str, latent_channels: int) -> int:
    """The denoiser's input: noisy latent + source latent (+ the prior's latent)."""
    return (3 if prior != "none" else 2) * latent_channels


def reference_lab_profile(stats: torch.Tensor):
    """The CIELAB tissue mean and std held in a :func:`reference_statistics` vector, as a
    Reinhard :class:`~studio.stain.profile.StainProfile` (the prior's target when only the
    vector is known; :func:`reinhard_target` on the reference tiles is the exact one)."""
    from studio.stain.profile import StainProfile

    stats = stats.detach().float().cpu()
    return StainProfile(method="reinhard", lab_mean=(stats[9:12] * 50).tolist(), lab_std=(stats[12:15] * 25).tolist(),
                        source="reference statistics")


def reinhard_target(reference: torch.Tensor | np.ndarray | list):
    """The prior's target: :class:`~studio.stain.reinhard.ReinhardNormalizer` fitted on the
    reference tiles (its tissue rule and background), i.e. exactly the classical Reinhard's."""
    from studio.stain.reinhard import ReinhardNormalizer

    if isinstance(reference, torch.Tensor):
        reference = list(reference if reference.ndim == 4 else reference[None])
    elif isinstance(reference, np.ndarray) and reference.ndim == 3:
        reference = [reference]
    return ReinhardNormalizer().fit(list(reference), source="reference")


def reinhard_prior(tiles: torch.Tensor, target, source=None) -> torch.Tensor:
    """``(B, 3, H, W)`` tiles moved to ``target`` by tissue-masked Reinhard
    (:class:`~studio.stain.reinhard.ReinhardNormalizer`, the classical method itself).

    Args:
        target: a Reinhard :class:`~studio.stain.profile.StainProfile` (see
            :func:`reinhard_target`), or one per tile.
        source: a slide-level Reinhard profile of the source (one mapping for every tile:
            no per-tile colour jumps); None estimates each tile's own statistics (tiles
            without usable tissue are left as they are).
    """
    from studio.stain.reinhard import ReinhardNormalizer

    tiles = tiles.float()
    norm = ReinhardNormalizer(device=tiles.device)
    if not isinstance(target, (list, tuple)):
        norm.set_target(target)
        return norm.transform(tiles, source=source)
    out = torch.empty_like(tiles)
    for i, profile in enumerate(target):
        norm.set_target(profile)
        out[i:i + 1] = norm.transform(tiles[i:i + 1], source=source)
    return out


class ReferenceEncoder(ModelMixin, ConfigMixin):
    """Reference statistics -> the vector added to the UNet's timestep embedding."""

    @register_to_config
    def __init__(self, n_stats: int = N_STATS, embed_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_stats, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.net(stats)


def positional_noise(shape: tuple[int, int, int], origin: tuple[int, int], seed: int, block: int = 8) -> torch.Tensor:
    """Gaussian noise ``(C, h, w)`` that is a fixed function of (seed, absolute latent position).

    The latent plane is cut into ``block`` x ``block`` cells, each drawn from its own
    generator keyed by (seed, cell row, cell column); any window is assembled from the cells
    it covers, so two overlapping windows see identical noise where they overlap.
    """
    c, h, w = shape
    y0, x0 = origin
    by0, bx0 = y0 // block, x0 // block
    by1, bx1 = (y0 + h - 1) // block, (x0 + w - 1) // block
    canvas = np.empty((c, (by1 - by0 + 1) * block, (bx1 - bx0 + 1) * block), dtype=np.float32)
    for by in range(by0, by1 + 1):
        for bx in range(bx0, bx1 + 1):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, by + 2**31, bx + 2**31])
            canvas[:, (by - by0) * block:(by - by0 + 1) * block, (bx - bx0) * block:(bx - bx0 + 1) * block] = \
                rng.standard_normal((c, block, block), dtype=np.float32)
    oy, ox = y0 - by0 * block, x0 - bx0 * block
    return torch.from_numpy(canvas[:, oy:oy + h, ox:ox + w].copy())


def check_sampling_options(output_type: str, strength: float, detail: str, num_inference_steps: int) -> None:
    """The options both StainFuser pipelines (the studio's and the released weights') take."""
    if output_type not in ("pil", "np", "pt"):
        raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
    if not 0 < strength <= 1:
        raise InputError("strength", f"{strength}; use 0 < strength <= 1")
    if detail not in ("source", "model"):
        raise InputError("detail", f"{detail!r}; use source or model")
    if num_inference_steps < 1:
        raise InputError("num_inference_steps", "at least 1")


@dataclass
class StainFuserPipelineOutput(BaseOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor
    passed_through: list[bool]


class StainFuserPipeline(LocalPipeline, DiffusionPipeline):
    r"""Render source tiles in the stain of a reference.

    Components:
        vae ([`AutoencoderKL`]): the tile autoencoder.
        unet ([`UNet2DModel`]): ``in_channels = 2 x latent``, ``class_embed_type="identity"``.
        reference_encoder ([`ReferenceEncoder`]): reference statistics -> timestep-embedding offset.
        scheduler ([`SchedulerMixin`]): DDIM (deterministic with ``eta = 0``).
        mode: "diffusion" or "regressor" (one step, no noise).
        prior: "none" or "reinhard" (a classical estimate as third input and starting
            point; the UNet then takes ``3 x latent`` channels).
    """

    model_cpu_offload_seq = "reference_encoder->vae->unet"
    required_components = ("vae", "unet", "reference_encoder", "scheduler")

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, reference_encoder: ReferenceEncoder,
                 scheduler: KarrasDiffusionSchedulers | SchedulerMixin, mode: str = "diffusion", prior: str = "none"):
        super().__init__()
        if mode not in ("diffusion", "regressor"):
            raise InputError("mode", f"{mode!r}; diffusion or regressor")
        if prior not in PRIORS:
            raise InputError("prior", f"{prior!r}; one of {', '.join(PRIORS)}")
        inputs = unet_in_channels(prior, vae.config.latent_channels)
        if unet.config.in_channels != inputs:
            raise WeightsError("unet", f"takes {unet.config.in_channels} input channels; prior={prior!r} with a "
                                       f"{vae.config.latent_channels}-channel VAE needs {inputs}")
        self.register_modules(vae=vae, unet=unet, reference_encoder=reference_encoder, scheduler=scheduler)
        self.register_to_config(mode=mode, prior=prior)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] -> scaled latents (posterior mean), in the tiles' dtype."""
        with autocast_context(self.device):
            latents = self.vae.encode(tiles * 2 - 1).latent_dist.mode()
        return latents.to(tiles.dtype) * self.vae.config.scaling_factor

    def _unet(self, sample: torch.Tensor, t, style: torch.Tensor) -> torch.Tensor:
        """One UNet prediction, returned in the sample's dtype."""
        with autocast_context(self.device):
            return self.unet(sample, t, class_labels=style).sample.to(sample.dtype)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device):
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    @property
    def prior(self) -> str:
        return getattr(self.config, "prior", "none")

    def style(self, reference: torch.Tensor | np.ndarray | list) -> torch.Tensor:
        """The style vector ``(1, D)`` of reference tiles (uint8 arrays, float tensors) or of
        precomputed :func:`reference_statistics` ``(15,)``."""
        stats = self.reference_stats(reference)
        return self.reference_encoder(stats.to(self.device, self.unet.dtype)[None])

    @staticmethod
    def reference_stats(reference: torch.Tensor | np.ndarray | list) -> torch.Tensor:
        """:func:`reference_statistics` ``(15,)`` of reference tiles (passed through when given)."""
        from studio.io import to_tensor

        if isinstance(reference, torch.Tensor) and reference.ndim == 1:
            stats = reference
        else:
            if isinstance(reference, list):
                reference = np.stack([np.asarray(r) for r in reference]) if all(
                    np.asarray(r).shape == np.asarray(reference[0]).shape for r in reference) else reference
            if isinstance(reference, list):  # different sizes: pool statistics tile by tile
                stats = torch.stack([reference_statistics(to_tensor(np.asarray(r))) for r in reference]).mean(0)
            else:
                t = reference if isinstance(reference, torch.Tensor) else to_tensor(np.asarray(reference))
                stats = reference_statistics(t if t.ndim == 4 else t[None])
        return stats.float()

    @torch.no_grad()
    def __call__(self, images, reference, num_inference_steps: int = 6, strength: float = 0.6, seed: int = 0,
                 origins: list[tuple[int, int]] | None = None, detail: str = "source", output_type: str = "pil",
                 return_dict: bool = True,
                 prior_target=None, prior_source=None) -> StainFuserPipelineOutput | tuple:
        r"""Normalize ``images`` (uint8 ``(B, H, W, 3)`` / ``(H, W, 3)`` or float ``(B, 3, H, W)``).

        Args:
            reference: tiles in the target stain (or their :func:`reference_statistics`).
            num_inference_steps: DDIM steps over the full schedule (at most 10 are run:
                ``strength x steps``).
            strength: how far the source latent is noised before denoising (0..1).
            seed, origins: the noise is :func:`positional_noise` at each tile's top-left pixel
                (``origins``; default (0, 0)), so overlapping slide tiles share it.
            detail: ``"source"`` (default) keeps the source's pixels and takes only their
                colour from the model (:func:`studio.color.transfer_colour`: the tile VAE
                would otherwise blur nuclei edges; a prior model's *change* to the classical
                estimate is carried onto that estimate's pixels,
                :func:`studio.color.transfer_colour_change`); ``"model"`` returns the decoded output.
            prior_target: with ``prior="reinhard"``, the prior's target profile
                (:func:`reinhard_target`); None fits it on ``reference`` when that holds
                tiles, or reads it from the statistics vector (approximate).
            prior_source: a slide-level Reinhard profile of the source (one prior mapping
                for all tiles); None uses each tile's own statistics.
        """
        from studio.color import tissue_mask, transfer_colour, transfer_colour_change
        from studio.io import to_tensor

        check_sampling_options(output_type, strength, detail, num_inference_steps)
        x = images if isinstance(images, torch.Tensor) else to_tensor(np.asarray(images))
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError("images", f"shape {tuple(x.shape)}; expected RGB tiles")
        b, _, h, w = x.shape
        m = self.size_multiple
        if h % m or w % m:
            raise InputError("images", f"{h}x{w} tiles; sides must be multiples of {m} (pad or resize)")
        x = x.to(self.device, self.unet.dtype)
        tissue = tissue_mask(x.float())[:, 0].float().mean(dim=(1, 2))
        blank = (tissue < MIN_TISSUE).tolist()
        stats = self.reference_stats(reference)
        style = self.style(stats).expand(b, -1)
        src = self._encode(x)
        cond, start_latent = src, src
        if self.prior == "reinhard":
            if prior_target is None:
                is_stats = isinstance(reference, torch.Tensor) and reference.ndim == 1
                prior_target = reference_lab_profile(reference) if is_stats else reinhard_target(reference)
            prior = reinhard_prior(x.float(), prior_target, prior_source).to(x.dtype)
            start_latent = self._encode(prior)
            cond = torch.cat([src, start_latent], 1)
        if self.config.mode == "regressor":
            t0 = torch.zeros(b, device=self.device, dtype=torch.long)
            latents = self._unet(torch.cat([start_latent, cond], 1), t0, style)
            if self.prior != "none":
                latents = start_latent + latents  # a residual on the classical estimate
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            start = max(1, min(10, int(round(num_inference_steps * strength))))
            timesteps = self.scheduler.timesteps[num_inference_steps - start:]
            f = self.latent_factor
            origins = origins or [(0, 0)] * b
            noise = torch.stack([positional_noise(tuple(src.shape[1:]), (oy // f, ox // f), seed)
                                 for oy, ox in origins]).to(src)
            latents = self.scheduler.add_noise(start_latent, noise, timesteps[:1].repeat(b))
            for t in timesteps:
                eps = self._unet(torch.cat([latents, cond], 1), t, style)
                latents = self.scheduler.step(eps, t, latents, eta=0.0).prev_sample
        out = self._decode(latents)
        if detail == "source" and self.prior != "none":
            # The model's change to the classical estimate, carried onto its pixels: the
            # decoder's errors are common to both decodes and cancel.
            out = transfer_colour_change(x.float(), prior.float(), self._decode(start_latent), out)
        elif detail == "source":
            out = transfer_colour(x.float(), out)
        for i, is_blank in enumerate(blank):
            if is_blank:
                out[i] = x[i].float()
        if any(blank):
            warnings.warn(f"{sum(blank)} of {b} tile(s) hold no tissue and were passed through unchanged",
                          stacklevel=2)
        result: Any = format_images(out, output_type)
        if not return_dict:
            return (result, blank)
        return StainFuserPipelineOutput(images=result, passed_through=blank)


# --------------------------------------------------------------------------- tile transform
class StainFuserTransform:
    """The pipeline as a slide-job tile transform: windows with a halo, shared positional noise."""

    pixelwise = False
    positional = True

    def __init__(self, pipe: StainFuserPipeline, reference_stats: torch.Tensor, *, steps: int = 6,
                 strength: float = 0.6, seed: int = 0, halo: int = 32, reference: str = "", checkpoint: str = "",
                 detail: str = "source", prior_target=None):
        self.pipe, self.stats, self.steps, self.strength, self.seed, self.halo = (pipe, reference_stats, steps,
                                                                                  strength, seed, halo)
        self.detail = detail
        self.reference, self.checkpoint = reference, checkpoint
        self.prior_target = prior_target  # the Reinhard prior's target (prior models), fitted on the reference

    name = "stainfuser"

    def estimate(self, tiles):
        """A slide-level Reinhard source profile for a ``prior="reinhard"`` model (one prior
        mapping for the whole slide: no per-tile colour jumps); None otherwise, or when the
        sampled tiles hold too little tissue (then each tile uses its own statistics)."""
        if self.pipe.prior != "reinhard":
            return None
        from studio.stain.reinhard import ReinhardNormalizer

        profile = ReinhardNormalizer().estimate([np.asarray(t) for t in tiles], source="slide sample")
        return None if profile.fallback else profile

    def apply(self, tiles: np.ndarray, source=None, origins: list[tuple[int, int]] | None = None) -> np.ndarray:
        m = self.pipe.size_multiple
        b, h, w, _ = tiles.shape
        ph, pw = (-h) % m, (-w) % m
        padded = np.pad(tiles, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > max(ph, pw)
                        else "edge") if ph or pw else tiles
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.pipe(padded, self.stats, num_inference_steps=self.steps, strength=self.strength,
                            seed=self.seed, origins=origins, detail=self.detail, output_type="np",
                            prior_target=self.prior_target, prior_source=source).images
        return (out[:, :h, :w] * 255 + 0.5).astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        return {"method": "stainfuser", "mode": self.pipe.config.mode, "prior": self.pipe.prior,
                "checkpoint": self.checkpoint,
                "reference": self.reference, "steps": self.steps, "strength": self.strength, "seed": self.seed,
                "halo": self.halo, "detail": self.detail}


def create_tile_transform(reference: str | Path | None = None, device: str | None = "auto", seed: int = 0,
                          checkpoint: str | Path | None = None, steps: int | None = None,
                          strength: float | None = None, halo: int = 32, detail: str | None = None,
                          **_: Any) -> StainFuserTransform:
    """Entry point ``histostudio.tile_transforms: stainfuser`` (see :mod:`studio.transforms`).

    ``device`` is resolved here, on the machine that runs the transform (a Dask worker resolves
    ``auto`` to its own GPU), through :func:`studio.devices.resolve_device`; None means ``auto``.
    A ``checkpoint`` that is a state-dict file (or a folder without ``model_index.json``) is the
    published StainFuser release (:mod:`pipelines.stainfuser_published`: 20 PNDM steps from noise,
    the decoded output); a pipeline folder is the studio's own model (6 DDIM steps, strength 0.6,
    the source's pixels). None for steps/strength/detail means that back-end's default.
    """
    from studio.devices import enable_fast_attention, resolve_device
    from studio.info import checkpoints_dir
    from studio.io import to_tensor
    from studio.transforms import load_reference_images

    if reference is None:
        raise InputError("--reference", "stainfuser needs a reference in the target stain (image, folder, slide "
                                        "or sample name)")
    from pipelines.stainfuser_published import create_published_transform, is_published_checkpoint

    if is_published_checkpoint(checkpoint):
        return create_published_transform(checkpoint, reference, device=device, seed=seed, steps=steps,
                                          strength=strength, halo=halo, detail=detail)
    steps = 6 if steps is None else steps
    strength = 0.6 if strength is None else strength
    detail = detail or "source"
    folder = Path(checkpoint) if checkpoint else checkpoints_dir() / "stain-fuser"
    if not folder.exists():
        raise WeightsError(folder, "no such pipeline folder: train the diffusion normalizer with python -m "
                                   "training.stain_fuser --config training/recipes/stain_fuser.yaml")
    device = resolve_device(device)  # before any loading: a missing GPU is a one-line error, not a traceback
    pipe = StainFuserPipeline.from_pretrained(folder).to(device)
    enable_fast_attention(pipe, device)  # xformers when installed on CUDA, else torch SDPA
    images = load_reference_images(reference)
    stats = torch.stack([reference_statistics(to_tensor(np.ascontiguousarray(im))) for im in images]).mean(0)
    prior_target = reinhard_target(images) if pipe.prior == "reinhard" else None
    return StainFuserTransform(pipe, stats, steps=steps, strength=strength, seed=seed, halo=halo,
                               reference=str(reference), checkpoint=str(folder), detail=detail,
                               prior_target=prior_target)

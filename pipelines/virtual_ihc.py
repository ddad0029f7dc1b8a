"""``VirtualIHCPipeline``: predict an IHC stain (HER2, Ki67, ER, PR) from H&E.

After PixCell's virtual staining and ASP (MIST): two translators behind one pipeline,
chosen per call with ``model=``:

* ``"fast"`` -- :class:`IHCGenerator`, a feed-forward U-Net (pix2pix-style), trained with
  L1 + PatchGAN + ASP's adaptive supervised PatchNCE (robust to the misalignment of
  consecutive-section pairs; ``training/virtual_ihc.py``). One forward pass per tile.
* ``"diffusion"`` -- a conditional latent diffusion translator: a diffusers
  ``UNet2DModel`` denoises the IHC latent with the H&E latent concatenated to its input
  (both from the same tile VAE), few-step (DPM-Solver++, 4-10 steps), seeded.

  With ``config.diffusion_prior = "fast"`` the diffusion translator *refines the fast
  translator's output*: the fast IHC latent is a third input, sampling starts from it noised
  to ``strength``, and the UNet predicts a residual on it (x0 = prior + UNet, its last layer
  zero-initialised), so an untrained refiner returns the fast model's image and training can
  only move it where the denoising loss says. With ``detail="prior"`` only the refiner's
  *change* is carried onto the fast image's pixels (the tile VAE's own blur cancels).
  Why: a latent denoiser trained from scratch on 2 CPU cores learned IHC colours but not
  which cells are positive; the fast model already knows that (DAB-area r 0.85).

  With ``config.diffusion_prior = "residual"`` the diffusion translator *generates the
  correction to the fast translator* (residual diffusion, after ResShift / SR3-style residual
  models): the variable diffused is ``(IHC latent - fast latent) / residual_scale``, sampled
  from noise (v-prediction, any DDIM-family scheduler) with the H&E and fast latents as the
  condition, and the output is the fast latent plus the sampled residual. Why: a refiner
  that predicts the clean latent from a noised fast latent returns the *mean* over which
  membranes are positive -- faded DAB at every noised start; a sampler of the residual draws
  one outcome, and its mean is zero, so a weak residual model still keeps the fast model's DAB.
  ``strength < 1`` starts from a zero residual noised to that level (trust the fast model more).

A pipeline folder holds one stain (``config.stain``); either translator may be absent
(``None`` in ``model_index.json``), and asking for a missing one is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from pipelines.loading import LocalPipeline
from pipelines.outputs import format_images
from studio.devices import autocast_context
from studio.errors import InputError, WeightsError

MODELS = ("fast", "diffusion")
DIFFUSION_PRIORS = ("none", "fast", "residual")
PRIOR_PREDICTION = {"fast": "sample", "residual": "v_prediction"}  # what each prior's UNet predicts


def diffusion_in_channels(prior: str, latent_channels: int) -> int:
    """The diffusion translator's UNet input: noisy IHC latent (or residual) + H&E latent (+ fast-prior latent)."""
    return (2 if prior == "none" else 3) * latent_channels


# --------------------------------------------------------------------------- fast generator
class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(min(groups, cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.GroupNorm(min(groups, cout), cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class IHCGenerator(ModelMixin, ConfigMixin):
    """H&E -> IHC U-Net (RGB in [0, 1] -> RGB in [0, 1]).

    The encoder's feature maps (:meth:`encode`) double as the patch features of the
    PatchNCE loss, as in CUT/ASP. Output = sigmoid of a residual on the input in optical
    density would tie it to the H&E colours; a plain decoder is used instead so that
    counterstain and DAB are free to differ from hematoxylin and eosin.
    """

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 192)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pools = nn.ModuleList()
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(widths[max(0, i - 1)] if i else widths[0], w))
            self.pools.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
        self.mid = _ResBlock(widths[-1], widths[-1])
        self.up = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(_ResBlock(widths[i] + widths[i - 1], widths[i - 1]))
        self.head = nn.Sequential(nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1))

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps, finest first (the skip connections)."""
        feats = []
        h = self.stem(x * 2 - 1)
        for block, pool in zip(self.down, self.pools, strict=True):
            h = block(h)
            feats.append(h)
            h = pool(h)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        h = self.mid(feats[-1])
        for block, skip in zip(self.up, reversed(feats[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return torch.sigmoid(self.head(h))


# --------------------------------------------------------------------------- pipeline
@dataclass
class VirtualIHCPipelineOutput(BaseOutput):
    """Predicted IHC images (PIL list, ``(B, H, W, 3)`` float numpy in [0, 1], or tensor)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


class VirtualIHCPipeline(LocalPipeline, DiffusionPipeline):
    r"""H&E -> IHC for one stain, with a fast and/or a diffusion translator.

    Components (any may be ``None`` except what the requested ``model`` needs):
        generator ([`IHCGenerator`]): the fast translator.
        vae ([`AutoencoderKL`]), unet ([`UNet2DModel`], ``in_channels = 2 x latent``),
        scheduler ([`SchedulerMixin`]): the diffusion translator.
        stain: "her2", "ki67", "er" or "pr".
    """

    _optional_components = ["generator", "vae", "unet", "scheduler"]
    model_cpu_offload_seq = "generator->vae->unet"

    def __init__(self, generator: IHCGenerator | None = None, vae: AutoencoderKL | None = None,
                 unet: UNet2DModel | None = None, scheduler: KarrasDiffusionSchedulers | SchedulerMixin | None = None,
                 stain: str = "her2", diffusion_prior: str = "none", diffusion_strength: float = 0.6,
                 residual_scale: float = 1.0):
        super().__init__()
        from studio.data.ihc_pairs import check_stain

        if diffusion_prior not in DIFFUSION_PRIORS:
            raise InputError("diffusion_prior", f"{diffusion_prior!r}; one of {', '.join(DIFFUSION_PRIORS)}")
        if unet is not None and vae is not None:
            want = diffusion_in_channels(diffusion_prior, vae.config.latent_channels)
            if unet.config.in_channels != want:
                raise WeightsError("unet", f"takes {unet.config.in_channels} input channels; diffusion_prior="
                                           f"{diffusion_prior!r} with a {vae.config.latent_channels}-channel VAE "
                                           f"needs {want}")
            want_prediction = PRIOR_PREDICTION.get(diffusion_prior)
            if want_prediction and scheduler is not None \
                    and scheduler.config.get("prediction_type") != want_prediction:
                raise WeightsError("scheduler", f"a {diffusion_prior!r}-prior translator's UNet predicts "
                                                f"{want_prediction}; its scheduler has prediction_type="
                                                f"{scheduler.config.get('prediction_type')!r}")
        if not residual_scale > 0:
            raise InputError("residual_scale", f"{residual_scale}; must be > 0")
        self.register_modules(generator=generator, vae=vae, unet=unet, scheduler=scheduler)
        self.register_to_config(stain=check_stain(stain), diffusion_prior=diffusion_prior,
                                diffusion_strength=float(diffusion_strength), residual_scale=float(residual_scale))

    @property
    def models(self) -> list[str]:
        """The translators this folder holds."""
        have = []
        if self.generator is not None:
            have.append("fast")
        if self.unet is not None and self.vae is not None and self.scheduler is not None \
                and (self.diffusion_prior == "none" or self.generator is not None):
            have.append("diffusion")
        return have

    @property
    def diffusion_prior(self) -> str:
        return getattr(self.config, "diffusion_prior", "none")

    def _factor(self, model: str) -> int:
        if model == "fast":
            return self.generator.factor
        f = 2 ** (len(self.vae.config.block_out_channels) - 1) * 2 ** (len(self.unet.config.block_out_channels) - 1)
        return f if self.diffusion_prior == "none" else max(f, self.generator.factor)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] -> scaled latents (posterior mean: the condition is deterministic)."""
        with autocast_context(self.device):
            latents = self.vae.encode(tiles * 2 - 1).latent_dist.mode()
        return latents.to(self.vae.dtype) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device):
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((image.to(self.vae.dtype) + 1) / 2).clamp(0, 1)

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        """The fast translator's image of H&E tiles ``x``."""
        with autocast_context(self.device):
            return self.generator(x.to(self.generator.dtype)).to(self.generator.dtype)

    def _unet(self, sample: torch.Tensor, t) -> torch.Tensor:
        """One UNet prediction, returned in the latents' dtype."""
        with autocast_context(self.device):
            return self.unet(sample, t).sample.to(sample.dtype)

    @staticmethod
    def as_batch(images) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` / ``(B, H, W, 3)`` arrays, PIL images, or float ``(B, 3, H, W)`` in [0, 1]."""
        from studio.io import to_tensor

        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images[None]
            if batch.shape[1] != 3:
                raise InputError("images", f"tensor of shape {tuple(images.shape)}; expected (B, 3, H, W)")
            return batch.float()
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, list):
            images = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images])
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError("images", f"shape {arr.shape} dtype {arr.dtype}; expected uint8 RGB (H, W, 3) tiles")
        return to_tensor(arr)

    @torch.no_grad()
    def __call__(self, images, model: str = "fast", num_inference_steps: int = 6,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, progress: bool = False, strength: float | None = None,
                 detail: str = "prior", check_input: bool = True) -> VirtualIHCPipelineOutput | tuple:
        r"""Translate H&E tiles to this pipeline's IHC stain.

        Args:
            images: H&E tiles (see :meth:`as_batch`); sides padded (reflect) to the model's
                multiple and cropped back.
            model: "fast" or "diffusion" (see :attr:`models`).
            num_inference_steps: diffusion steps (few-step sampler; ignored by "fast").
            generator: seeds the diffusion noise (same seed, same output).
            output_type: "pil", "np" (float ``(B, H, W, 3)`` in [0, 1]) or "pt".
            strength: fast-prior refiners: how far the fast latent is noised before
                denoising; residual translators: the noise level sampling starts from
                (1 = pure noise). 0..1; ``strength x steps`` steps run; default: the trained value.
            detail: fast-prior and residual translators: "prior" carries the diffusion
                model's change onto the fast image's pixels, "model" decodes its latent as is.
            check_input: refuse tiles that look like IHC rather than H&E (no eosin in the
                tissue; :func:`studio.stain.kind.check_he`).
        """
        if model not in MODELS:
            raise InputError("model", f"{model!r}; choose fast or diffusion")
        if detail not in ("prior", "model"):
            raise InputError("detail", f"{detail!r}; use prior or model")
        strength = float(self.config.get("diffusion_strength", 0.6) if strength is None else strength)
        if not 0 < strength <= 1:
            raise InputError("strength", f"{strength}; use 0 < strength <= 1")
        if model not in self.models:
            raise InputError("model", f"this {self.config.stain} checkpoint has no {model} translator "
                                      f"(it has: {', '.join(self.models) or 'none'})")
        if output_type not in ("pil", "np", "pt"):
            raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
        x = self.as_batch(images).to(self.device)
        if check_input:
            from studio.stain.kind import check_he

            check_he(x.cpu())
        h, w = x.shape[-2:]
        f = self._factor(model)
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        if model == "fast":
            out = self._fast(x)
        elif self.diffusion_prior == "fast":
            out = self._refine(x, num_inference_steps, strength, generator, detail, progress)
        elif self.diffusion_prior == "residual":
            out = self._residual(x, num_inference_steps, strength, generator, detail, progress)
        else:
            cond = self.encode(x.to(self.vae.dtype))
            latents = randn_tensor(cond.shape, generator=generator, device=self.device, dtype=cond.dtype)
            latents = latents * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            steps = self.scheduler.timesteps
            for t in self.progress_bar(steps) if progress else steps:
                model_in = self.scheduler.scale_model_input(latents, t)
                noise = self._unet(torch.cat([model_in, cond], dim=1), t)
                latents = self.scheduler.step(noise, t, latents).prev_sample
            out = self.decode(latents)
        out = out[..., :h, :w].float().clamp(0, 1)
        result: list[Image.Image] | np.ndarray | torch.Tensor = format_images(out, output_type)
        if not return_dict:
            return (result,)
        return VirtualIHCPipelineOutput(images=result)

    def _prior_start(self, x: torch.Tensor, steps: int, strength: float, generator):
        """What both fast-prior translators start from: the fast image, the H&E and fast
        latents, the last ``strength x steps`` timesteps (at least one) and seeded noise."""
        prior = self._fast(x).float().clamp(0, 1)
        cond = self.encode(x.to(self.vae.dtype))
        prior_latent = self.encode(prior.to(self.vae.dtype))
        self.scheduler.set_timesteps(steps, device=self.device)
        run = max(1, min(steps, int(round(steps * strength))))
        timesteps = self.scheduler.timesteps[steps - run:]
        noise = randn_tensor(prior_latent.shape, generator=generator, device=self.device, dtype=prior_latent.dtype)
        return prior, cond, prior_latent, timesteps, noise

    def _refine(self, x: torch.Tensor, steps: int, strength: float, generator, detail: str,
                progress: bool) -> torch.Tensor:
        """The fast-prior refiner: start from the fast image's latent noised to ``strength``;
        each step's clean-latent estimate is that latent plus the UNet's residual."""
        prior, cond, prior_latent, timesteps, noise = self._prior_start(x, steps, strength, generator)
        latents = self.scheduler.add_noise(prior_latent, noise, timesteps[:1].repeat(len(x)))
        for t in self.progress_bar(timesteps) if progress else timesteps:
            residual = self._unet(torch.cat([latents, cond, prior_latent], dim=1), t)
            latents = self.scheduler.step(prior_latent + residual, t, latents).prev_sample
        return self._finish(prior, prior_latent, latents, detail)

    def _residual(self, x: torch.Tensor, steps: int, strength: float, generator, detail: str,
                  progress: bool) -> torch.Tensor:
        """Residual diffusion: sample ``(IHC latent - fast latent) / residual_scale`` from noise
        (or from a zero residual noised to ``strength``), conditioned on the H&E and fast latents."""
        prior, cond, prior_latent, timesteps, noise = self._prior_start(x, steps, strength, generator)
        # a zero residual noised to the first timestep (strength 1: the scheduler's pure noise)
        residual = noise * self.scheduler.init_noise_sigma if len(timesteps) == steps else \
            self.scheduler.add_noise(torch.zeros_like(noise), noise, timesteps[:1].repeat(len(x)))
        for t in self.progress_bar(timesteps) if progress else timesteps:
            model_in = self.scheduler.scale_model_input(residual, t)
            pred = self._unet(torch.cat([model_in, cond, prior_latent], dim=1), t)
            residual = self.scheduler.step(pred, t, residual).prev_sample
        latents = prior_latent + residual * float(self.config.get("residual_scale", 1.0))
        return self._finish(prior, prior_latent, latents, detail)

    def _finish(self, prior: torch.Tensor, prior_latent: torch.Tensor, latents: torch.Tensor,
                detail: str) -> torch.Tensor:
        """Decode the diffusion latent; with ``detail="prior"`` carry only its change from the
        fast latent onto the fast image's pixels (the tile VAE's own blur cancels)."""
        refined = self.decode(latents)
        if detail == "model":
            return refined
        from studio.color import transfer_colour_change

        return transfer_colour_change(prior, prior, self.decode(prior_latent), refined, radius=4)


# --------------------------------------------------------------------------- checkpoints
CHECKPOINT_PREFIX = "virtual-ihc-"  # checkpoints/virtual-ihc-her2, virtual-ihc-ki67, ...


def virtual_ihc_checkpoints(root) -> dict[str, Path]:
    """Stain -> pipeline folder for every ``virtual-ihc-<stain>`` folder under ``root``."""
    import json

    from studio.data.ihc_pairs import STAINS

    found = {}
    root = Path(root)
    for stain in STAINS:
        folder = root / f"{CHECKPOINT_PREFIX}{stain}"
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError):
            continue
        if index.get("_class_name") == "VirtualIHCPipeline":
            found[stain] = folder
    return found


def load_virtual_ihc(stain: str, root, device: str = "cpu") -> VirtualIHCPipeline:
    """The shipped (or user-trained) pipeline of ``stain`` under the checkpoints folder ``root``."""
    from studio.data.ihc_pairs import check_stain

    stain = check_stain(stain)
    folders = virtual_ihc_checkpoints(root)
    if stain not in folders:
        have = ", ".join(folders) or "none"
        raise WeightsError(f"{root}/{CHECKPOINT_PREFIX}{stain}", f"no virtual IHC checkpoint for {stain} (have: "
                                                                  f"{have}); train one with python -m "
                                                                  f"training.virtual_ihc --config "
                                                                  f"training/recipes/virtual_ihc_{stain}.yaml")
    from studio.devices import enable_fast_attention

    pipe = VirtualIHCPipeline.from_pretrained(folders[stain]).to(device)
    enable_fast_attention(pipe, device)  # xformers when installed on CUDA, else torch SDPA
    return pipe


# --------------------------------------------------------------------------- slide job
class VirtualIHCTransform:
    """The pipeline as a tile transform for the slide job (``histostudio translate``):
    not pixelwise, so slides are processed in windows with a ``halo`` of context whose
    overlaps are cross-faded (:mod:`studio.blending`)."""

    pixelwise = False
    command = "translate"

    def __init__(self, pipe: VirtualIHCPipeline, model: str = "fast", *, steps: int = 6, seed: int = 0,
                 halo: int = 32, checkpoint: str = ""):
        if model not in pipe.models:
            raise InputError("--model", f"the {pipe.config.stain} checkpoint has no {model} translator "
                                        f"(it has: {', '.join(pipe.models) or 'none'})")
        self.pipe, self.model, self.steps, self.seed, self.halo = pipe, model, steps, seed, halo
        self.checkpoint = checkpoint

    @property
    def name(self) -> str:
        return f"virtual-{self.pipe.config.stain}-{self.model}"

    def estimate(self, tiles):
        """No source state; refuses a slide (or tile set) whose sampled tissue is not H&E."""
        from studio.stain.kind import check_he_sample

        check_he_sample(list(tiles))
        return None

    def check(self, image: np.ndarray, name: str) -> None:
        """Refuse an input that looks like IHC rather than H&E (per file, before batching;
        slides are judged once, on their sampled tissue, in :meth:`estimate`, not per window)."""
        from studio.io import to_tensor
        from studio.stain.kind import check_he

        check_he(to_tensor(image[None]), what=name)

    def apply(self, tiles: np.ndarray, source=None) -> np.ndarray:
        out = self.pipe(tiles, model=self.model, num_inference_steps=self.steps, check_input=False,
                        generator=torch.Generator().manual_seed(self.seed), output_type="np").images
        return (out * 255 + 0.5).astype(np.uint8)

    def describe(self) -> dict:
        return {"stain": self.pipe.config.stain, "model": self.model, "checkpoint": self.checkpoint,
                "steps": self.steps if self.model == "diffusion" else None, "seed": self.seed, "halo": self.halo}

"""``MaskToImagePipeline``: H&E patches drawn to a nuclei instance/class map.

After PixCell's mask-guided ControlNet and DiffMix (label-conditioned diffusion that makes
class-balancing patches): a diffusers :class:`~diffusers.ControlNetModel`, copied from the
embedding-conditioned base UNet's encoder and trained with the base frozen, reads a
*control map* at pixel resolution and adds its residuals to the base UNet. The control
map of a label map is

* one channel per class (one-hot of the class map: where nuclei of class ``c`` are), and
* one instance-boundary channel (pixels on the inner outline of each instance), which
  separates touching nuclei so the image can show them as separate objects.

Classifier-free guidance is on the mask: the unconditional branch sees an all-zero control
map (trained with mask dropout), so ``guidance_scale`` > 1 pushes the image towards the
layout. An SSL embedding (global or a token grid) optionally sets style and tissue context
through the base model's own conditioning; without one, the learned null embedding is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.conditioning import EmbeddingConditioner
from pipelines.loading import LocalPipeline
from pipelines.outputs import format_images
from studio.errors import InputError


@dataclass
class MaskToImagePipelineOutput(BaseOutput):
    """Generated images (PIL list, ``(B, H, W, 3)`` float numpy in [0, 1], or a
    ``(B, 3, H, W)`` tensor) and the control maps they were drawn to."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    control: torch.Tensor


def control_map(inst: np.ndarray, cls: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 ``(num_classes + 1, H, W)``: one-hot classes 1..C, then the instance boundaries.

    Raises:
        InputError: maps of different shapes, negative ids, or a class outside ``1..num_classes``.
    """
    from skimage.segmentation import find_boundaries

    inst = np.asarray(inst)
    cls = np.asarray(cls)
    if inst.ndim != 2 or inst.shape != cls.shape:
        raise InputError("mask", f"instance map {inst.shape} and class map {cls.shape} must be 2-D and the same size")
    if inst.size and inst.min() < 0:
        raise InputError("mask", "instance ids must be >= 0")
    codes = np.unique(cls[inst > 0]) if inst.size else np.zeros(0, int)
    bad = [int(c) for c in codes if not 1 <= c <= num_classes]
    if bad:
        raise InputError("mask", f"class code(s) {bad} outside the model's classes 1..{num_classes}")
    out = np.zeros((num_classes + 1, *inst.shape), dtype=np.float32)
    fg = inst > 0
    for c in range(1, num_classes + 1):
        out[c - 1] = fg & (cls == c)
    out[num_classes] = find_boundaries(inst, mode="inner") & fg
    return out


class MaskToImagePipeline(LocalPipeline, DiffusionPipeline):
    r"""Generate H&E patches whose nuclei follow a given instance/class map.

    Components:
        vae ([`AutoencoderKL`]), unet ([`UNet2DConditionModel`]), conditioner
            ([`EmbeddingConditioner`]): the embedding-conditioned base model (frozen while the
            ControlNet trains; the same weights as ``EmbeddingToImagePipeline``).
        controlnet ([`ControlNetModel`]): reads the control map (``num_classes + 1``
            channels at pixel resolution, see :func:`control_map`).
        scheduler ([`SchedulerMixin`]): any diffusers scheduler.
        class_names: the class of each one-hot channel, in code order (code 1 first).
    """

    model_cpu_offload_seq = "conditioner->controlnet->unet->vae"
    required_components = ("vae", "unet", "conditioner", "controlnet", "scheduler")

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, conditioner: EmbeddingConditioner,
                 controlnet: ControlNetModel, scheduler: KarrasDiffusionSchedulers | SchedulerMixin,
                 class_names: str | Sequence[str] | None = None):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, conditioner=conditioner, controlnet=controlnet,
                              scheduler=scheduler)
        n = int(controlnet.config.conditioning_channels) - 1
        if isinstance(class_names, str):
            class_names = [c.strip() for c in class_names.split(",")]
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(1, n + 1)]
        if len(names) != n:
            raise InputError("class_names", f"{len(names)} names for a ControlNet with {n} class channels")
        # One comma-separated string in model_index.json (a list there would read as a component).
        self.register_to_config(class_names=",".join(names))

    # ------------------------------------------------------------------ helpers
    @property
    def classes(self) -> dict[int, str]:
        """PanNuke-style class table of the one-hot channels: code -> name."""
        return {i + 1: n for i, n in enumerate(self.config.class_names.split(","))}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_compatible(self) -> None:
        latent, extra = self.vae.config.latent_channels, self.conditioner.config.map_channels
        if self.unet.config.in_channels != latent + extra:
            raise InputError("pipeline", f"unet takes {self.unet.config.in_channels} input channels, but the VAE "
                                         f"gives {latent} latent + {extra} map channels")
        if self.controlnet.config.in_channels != self.unet.config.in_channels:
            raise InputError("pipeline", "controlnet and unet disagree on input channels (a ControlNet of "
                                         "another base model?)")
        if tuple(self.controlnet.config.block_out_channels) != tuple(self.unet.config.block_out_channels):
            raise InputError("pipeline", "controlnet and unet have different block widths (another base model?)")
        steps = len(self.controlnet.config.conditioning_embedding_out_channels) - 1
        if 2 ** steps != self.latent_factor:
            raise InputError("pipeline", f"the ControlNet's mask embedding downsamples by {2 ** steps}, the VAE by "
                                         f"{self.latent_factor}")

    def prepare_control(self, masks: torch.Tensor | np.ndarray | Sequence[tuple[np.ndarray, np.ndarray]]
                        ) -> torch.Tensor:
        """Control maps ``(B, C+1, H, W)`` from a tensor of them or ``(inst, cls)`` pairs."""
        if isinstance(masks, (torch.Tensor, np.ndarray)) and np.ndim(masks) == 4:
            control = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks).float()
        else:
            if not isinstance(masks, Sequence) or not masks:
                raise InputError("masks", "give (instance map, class map) pairs or a (B, C+1, H, W) tensor")
            control = torch.from_numpy(np.stack([control_map(i, c, self.num_classes) for i, c in masks]))
        if control.shape[1] != self.num_classes + 1:
            raise InputError("masks", f"{control.shape[1]} control channels; this model takes "
                                      f"{self.num_classes + 1} ({self.num_classes} classes + boundaries)")
        return control

    def encode(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(tiles.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((image + 1) / 2).clamp(0, 1)

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, spatial: torch.Tensor, states: torch.Tensor,
                      control: torch.Tensor, scale: float) -> torch.Tensor:
        sample = torch.cat([latents, spatial], dim=1)
        down, mid = self.controlnet(sample, t, encoder_hidden_states=states, controlnet_cond=control,
                                    conditioning_scale=scale, return_dict=False)
        return self.unet(sample, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        masks: torch.Tensor | np.ndarray | Sequence[tuple[np.ndarray, np.ndarray]],
        embeddings: torch.Tensor | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        controlnet_conditioning_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
    ) -> MaskToImagePipelineOutput | tuple:
        r"""Generate one image per label map.

        Args:
            masks: ``(inst, cls)`` pairs (instance ids, class codes of :attr:`classes`), or
                control maps ``(B, C+1, H, W)`` from :func:`control_map`; H and W multiples of
                the VAE factor.
            embeddings: optional ``(B, N, D)`` (or ``(1, N, D)``, shared) SSL tokens setting
                style / tissue context; the null embedding when omitted.
            guidance_scale: classifier-free guidance on the mask (1 disables the mask-free branch).
            controlnet_conditioning_scale: weight of the ControlNet residuals (0 = base model only).
            generator: torch generator(s): the same seed and mask give the same image.
            output_type: "pil", "np" (float ``(B, H, W, 3)`` in [0, 1]) or "pt".

        Examples:
            >>> from pipelines.mask_to_image import MaskToImagePipeline
            >>> from studio.info import checkpoints_dir
            >>> pipe = MaskToImagePipeline.from_pretrained(checkpoints_dir() / "mask-ldm")  # a local folder
            >>> image = pipe([(inst, cls)], generator=torch.manual_seed(0)).images[0]
        """
        self.check_compatible()
        if output_type not in ("pil", "np", "pt"):
            raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
        control = self.prepare_control(masks).to(self.device, self.unet.dtype)
        batch, _, height, width = control.shape
        factor = self.latent_factor
        if height % factor or width % factor:
            raise InputError("masks", f"{height}x{width} must be multiples of {factor}")
        h, w = height // factor, width // factor
        grid = self.conditioner.grid_for(height, width)
        if embeddings is None:
            tokens = self.conditioner.null_embedding.to(self.device, self.unet.dtype).expand(batch, 1, -1)
        else:
            tokens = embeddings.to(self.device, self.unet.dtype)
            if tokens.ndim == 3 and tokens.shape[0] == 1 and batch > 1:
                tokens = tokens.expand(batch, -1, -1)
            if tokens.ndim != 3 or tokens.shape[0] != batch:
                raise InputError("embeddings", f"shape {tuple(tokens.shape)}; expected ({batch}, tokens, dim)")
        states, spatial = self.conditioner(tokens, grid, (h, w))
        do_cfg = guidance_scale != 1.0
        if do_cfg:
            states, spatial = torch.cat([states, states]), torch.cat([spatial, spatial])
            control_in = torch.cat([torch.zeros_like(control), control])
        else:
            control_in = control

        shape = (batch, self.vae.config.latent_channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        for t in self.progress_bar(timesteps) if progress else timesteps:
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = self.predict_noise(model_in, t, spatial, states, control_in, controlnet_conditioning_scale)
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample

        images = self.decode(latents)
        out: list[Image.Image] | np.ndarray | torch.Tensor = format_images(images, output_type)
        if not return_dict:
            return (out, control)
        return MaskToImagePipelineOutput(images=out, control=control.cpu())


def controlnet_from_base(unet: UNet2DConditionModel, num_classes: int, latent_factor: int) -> ControlNetModel:
    """A ControlNet initialised from the base UNet's encoder (diffusers' ``from_unet``), its
    mask embedding sized to the VAE's factor (one stride-2 stage per halving)."""
    steps = int(round(np.log2(latent_factor)))
    widths = tuple(16 * 2 ** i for i in range(steps + 1))
    return ControlNetModel.from_unet(unet, conditioning_channels=num_classes + 1,
                                     conditioning_embedding_out_channels=widths)

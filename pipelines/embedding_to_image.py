"""``EmbeddingToImagePipeline``: H&E tiles and large images from SSL embeddings.

After PixCell (tiles generated from UNI embeddings) and Graikos et al. (a latent diffusion
model guided by self-supervised embeddings; large images from a grid of embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.conditioning import EmbeddingConditioner
from pipelines.loading import LocalPipeline
from pipelines.outputs import format_images
from studio.errors import InputError


@dataclass
class EmbeddingToImagePipelineOutput(BaseOutput):
    """Generated images (PIL list, ``(B, H, W, 3)`` float numpy in [0, 1], or a
    ``(B, 3, H, W)`` tensor) and the token grid each was conditioned on."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    grid: tuple[int, int]


class EmbeddingToImagePipeline(LocalPipeline, DiffusionPipeline):
    r"""Generate H&E images conditioned on SSL embedding tokens.

    Components:
        vae ([`AutoencoderKL`]): the tile autoencoder (latents <-> RGB); any diffusers VAE
            folder works, e.g. an SD or SD3 VAE a user downloaded separately.
        unet ([`UNet2DConditionModel`]): denoiser; its input is the noisy latent
            concatenated with the conditioner's spatial map, its cross-attention attends to
            the embedding tokens.
        conditioner ([`EmbeddingConditioner`]): tokens -> cross-attention states and spatial
            map; holds the learned null embedding used for classifier-free guidance.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler (DDIM, DPM-Solver++, Euler).

    Conditioning: ``embeddings`` of shape ``(B, N, D)``: one global token (``N = 1``) or a
    row-major grid of local tokens, one per ``conditioner.config.token_pixels`` square of
    the output (16 tokens for a 256x256 tile). Images larger than ``window`` latent pixels
    are denoised MultiDiffusion-style: overlapping windows on one shared latent canvas,
    their noise predictions blended before every scheduler step, so the result is one
    seamless image rather than pasted tiles.
    """

    model_cpu_offload_seq = "conditioner->unet->vae"
    required_components = ("vae", "unet", "conditioner", "scheduler")

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, conditioner: EmbeddingConditioner,
                 scheduler: KarrasDiffusionSchedulers | SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, conditioner=conditioner, scheduler=scheduler)

    # ------------------------------------------------------------------ helpers
    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_compatible(self) -> None:
        """The components must agree on latent channels and widths (clear error if not)."""
        latent = self.vae.config.latent_channels
        extra = self.conditioner.config.map_channels
        if self.unet.config.in_channels != latent + extra:
            raise InputError("pipeline", f"unet takes {self.unet.config.in_channels} input channels, but the VAE "
                                         f"gives {latent} latent + {extra} map channels")
        if self.unet.config.cross_attention_dim != self.conditioner.config.cross_attention_dim:
            raise InputError("pipeline", "unet and conditioner disagree on cross_attention_dim")
        if self.latent_factor != self.conditioner.config.latent_factor:
            raise InputError("pipeline", f"the VAE downsamples by {self.latent_factor}, the conditioner expects "
                                         f"{self.conditioner.config.latent_factor}")

    def encode(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float RGB tiles in [0, 1] -> scaled latents (``scaling_factor`` applied)."""
        dist = self.vae.encode(tiles.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float RGB in [0, 1]."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((image + 1) / 2).clamp(0, 1)

    @staticmethod
    def window_weights(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A smooth (raised-cosine, never zero) blending weight over a square window."""
        ramp = torch.hann_window(size + 2, periodic=False, device=device, dtype=dtype)[1:-1]
        return (ramp[:, None] * ramp[None, :]).clamp_min(1e-3)

    @staticmethod
    def window_starts(length: int, window: int, stride: int) -> list[int]:
        if length <= window:
            return [0]
        starts = list(range(0, length - window, stride))
        return starts + [length - window]

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, spatial: torch.Tensor, states: torch.Tensor,
                      grid: tuple[int, int], window: int, stride: int) -> torch.Tensor:
        """Noise prediction over the whole canvas; windowed (MultiDiffusion) when large."""
        b, _, h, w = latents.shape
        if h <= window and w <= window:
            return self.unet(torch.cat([latents, spatial], dim=1), t, encoder_hidden_states=states).sample
        gh, gw = grid
        cell_h, cell_w = h / gh, w / gw  # latent pixels per token (any grid density)
        total = torch.zeros_like(latents)
        weight = torch.zeros(1, 1, h, w, device=latents.device, dtype=latents.dtype)
        ramp = self.window_weights(window, latents.device, latents.dtype)
        for y in self.window_starts(h, window, stride):
            for x in self.window_starts(w, window, stride):
                # The tokens whose cells the window overlaps attend with it.
                rows = range(min(int(y // cell_h), gh - 1), min(int((y + window - 1) // cell_h), gh - 1) + 1)
                cols = range(min(int(x // cell_w), gw - 1), min(int((x + window - 1) // cell_w), gw - 1) + 1)
                if states.shape[1] == 1:
                    local = states
                else:
                    idx = torch.tensor([r * gw + c for r in rows for c in cols], device=states.device)
                    local = states.index_select(1, idx)
                box = (slice(None), slice(None), slice(y, y + window), slice(x, x + window))
                pred = self.unet(torch.cat([latents[box], spatial[box]], 1), t, encoder_hidden_states=local).sample
                total[:, :, y:y + window, x:x + window] += pred * ramp
                weight[:, :, y:y + window, x:x + window] += ramp
        return total / weight

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        embeddings: torch.Tensor,
        height: int = 256,
        width: int = 256,
        grid: tuple[int, int] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        window: int | None = None,
        overlap: float = 0.5,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> EmbeddingToImagePipelineOutput | tuple:
        r"""Generate one image per row of ``embeddings``.

        Args:
            embeddings: ``(B, N, D)`` tokens from an encoder (``N = 1`` global, or a
                row-major grid: by default one token per ``conditioner.config.token_pixels``
                square, see ``conditioner.grid_for``).
            grid: the token grid when it is coarser or finer than the default, e.g.
                ``(4, 4)`` global tile embeddings for a 1024x1024 image (Graikos et al.).
            height, width: output size in pixels (multiples of the VAE factor; any size:
                beyond ``window`` the image is denoised in overlapping windows).
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance weight (1 disables the null branch).
            generator: torch generator(s) for reproducible noise.
            latents: start from these instead of fresh noise.
            window: window side in latent pixels for large images (default: the UNet's
                ``sample_size`` x 2); ``overlap``: fraction of the window shared by neighbours.
            output_type: "pil", "np" (float ``(B, H, W, 3)`` in [0, 1]) or "pt".
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": ...})`` after each
                step (diffusers' convention; e.g. a progress bar).

        Examples:
            >>> from pipelines.encoders import load_encoder
            >>> from pipelines.embedding_to_image import EmbeddingToImagePipeline
            >>> from studio.info import checkpoints_dir
            >>> pipe = EmbeddingToImagePipeline.from_pretrained(checkpoints_dir() / "embedding-ldm")  # a local folder
            >>> encoder = load_encoder("builtin")
            >>> tokens = encoder.embed(tile, grid=pipe.conditioner.grid_for(256, 256))  # tile: (1,3,256,256)
            >>> image = pipe(tokens, num_inference_steps=20, generator=torch.manual_seed(0)).images[0]
        """
        self.check_compatible()
        factor = self.latent_factor
        if height % factor or width % factor:
            raise InputError("height/width", f"{height}x{width} must be multiples of {factor}")
        if output_type not in ("pil", "np", "pt"):
            raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
        grid = tuple(grid) if grid is not None else self.conditioner.grid_for(height, width)
        tokens = embeddings.to(self.device, self.unet.dtype)
        self.conditioner.check(tokens, grid)
        batch = tokens.shape[0]
        h, w = height // factor, width // factor
        window = window or 2 * int(self.unet.config.sample_size)
        stride = max(1, int(window * (1 - overlap)))
        do_cfg = guidance_scale != 1.0

        # 1. condition: cross-attention states and spatial map (plus the null branch)
        states, spatial = self.conditioner(tokens, grid, (h, w))
        if do_cfg:
            null_states, null_spatial = self.conditioner(self.conditioner.null_like(tokens), grid, (h, w))
            states, spatial = torch.cat([null_states, states]), torch.cat([null_spatial, spatial])

        # 2. initial noise
        shape = (batch, self.vae.config.latent_channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)

        # 3. denoising loop: predict noise (guided), step the scheduler
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = self.predict_noise(model_in, t, spatial, states, grid, window, stride)
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        # 4. decode
        images = self.decode(latents)
        out: list[Image.Image] | np.ndarray | torch.Tensor = format_images(images, output_type)
        if not return_dict:
            return (out, grid)
        return EmbeddingToImagePipelineOutput(images=out, grid=grid)

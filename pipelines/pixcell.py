"""PixCell (StonyBrook-CVLab) from its published folder: no remote code, no network.

PixCell's own route is ``DiffusionPipeline.from_pretrained(..., custom_pipeline=...,
trust_remote_code=True)``, which runs Python fetched from the hub. The studio instead
rebuilds the model from diffusers' own PixArt blocks and loads the published
``transformer/config.json`` and ``diffusion_pytorch_model.safetensors`` by parameter name.
The ``.py`` files in the release folder are never imported.

What PixCell adds to :class:`~diffusers.PixArtTransformer2DModel` (and all this file adds):

* ``caption_projection`` (:class:`PixCellUNIProjection`): diffusers' PixArt caption MLP
  (``linear_1`` 1536 -> 1152, GELU(tanh), ``linear_2``) plus a buffer
  ``uncond_embedding`` ``(caption_num_tokens, 1536)``: the learned null embedding that
  classifier-free guidance runs against;
* ``y_pos_embed`` (:class:`UNIPosEmbed`, PixCell-1024 only): a 2D sin-cos position
  embedding of the 4x4 grid of UNI tokens, added before the projection (the buffer
  ``y_pos_embed.y_pos_embed`` is part of the published state dict);
* config key ``caption_num_tokens``: 1 (PixCell-256) or 16 (PixCell-1024).

:class:`PixCellPipeline` samples it with the SD3.5 VAE (16 latent channels;
``latents = (z - shift) * scaling``, 0.0609 and 1.5305 from the VAE's config), DPM-Solver
(the published scheduler config), DDIM or Euler, and classifier-free guidance against the
learned null embedding. The output has ``2 x in_channels`` channels (learned sigma); the
epsilon prediction is the first half. Images larger than the native size are denoised on
one shared latent canvas: native-size windows, each conditioned on the UNI tokens of the
256 px crops it covers, their predictions blended before every scheduler step (averaging
epsilon at a shared ``x_t`` is averaging the x0 predictions, as PixCell's 4K sampler does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_sincos_pos_embed_from_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from pipelines.embedding_to_image import EmbeddingToImagePipeline, EmbeddingToImagePipelineOutput
from pipelines.outputs import format_images
from pipelines.uni2h import check_state_shapes, find_weights, safetensors_shapes
from studio.errors import InputError, WeightsError
from studio.published import SD35_VAE_SOURCE, find_published, find_sd35_vae, is_pixcell, models_dir

PIXCELL_SOURCE = "Hugging Face StonyBrook-CVLab/PixCell-256 or PixCell-1024"


# --------------------------------------------------------------------------- model
def uni_grid_pos_embed(dim: int, num_tokens: int, base_size: int, interpolation_scale: float = 2.0
                       ) -> torch.Tensor:
    """PixCell's position embedding of a square grid of UNI tokens: ``(1, num_tokens, dim)``.

    The positions of a ``g x g`` grid are ``i / (g / base_size) / interpolation_scale`` as in
    PixArt's patch embedding, shifted by a phase ``base_size // num_tokens``; the first half
    of the channels encodes the column, the second the row (diffusers' 2D sin-cos layout).
    """
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"caption_num_tokens {num_tokens} is not a square grid")
    pos = torch.arange(g, dtype=torch.float32) / (g / base_size) / interpolation_scale + base_size // num_tokens
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    grid = torch.stack([cols, rows]).reshape(2, 1, g, g)
    return get_2d_sincos_pos_embed_from_grid(dim, grid, output_type="pt").float().unsqueeze(0)


class UNIPosEmbed(nn.Module):
    """Adds :func:`uni_grid_pos_embed` to a grid of UNI tokens (buffer ``y_pos_embed``)."""

    def __init__(self, dim: int, num_tokens: int, base_size: int, interpolation_scale: float = 2.0):
        super().__init__()
        self.register_buffer("y_pos_embed", uni_grid_pos_embed(dim, num_tokens, base_size, interpolation_scale))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens + self.y_pos_embed).to(tokens.dtype)


class PixCellUNIProjection(PixArtAlphaTextProjection):
    """PixArt's caption projection holding PixCell's learned null embedding ``uncond_embedding``."""

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int = 1):
        super().__init__(in_features=in_features, hidden_size=hidden_size, act_fn="gelu_tanh")
        self.register_buffer("uncond_embedding", torch.randn(num_tokens, in_features) / in_features**0.5)


class PixCellTransformer2DModel(PixArtTransformer2DModel):
    r"""PixArt-Sigma's DiT conditioned on UNI-2h tokens, with PixCell's published parameter names.

    Takes every :class:`~diffusers.PixArtTransformer2DModel` config key plus
    ``caption_num_tokens`` (UNI tokens per image). ``forward`` adds the token-grid position
    embedding, then runs PixArt's forward unchanged.
    """

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 16,
                 out_channels: int | None = 32, num_layers: int = 28, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = 1152, attention_bias: bool = True,
                 sample_size: int = 32, patch_size: int = 2, activation_fn: str = "gelu-approximate",
                 num_embeds_ada_norm: int | None = 1000, upcast_attention: bool = False,
                 norm_type: str = "ada_norm_single", norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: float | None = None, use_additional_conditions: bool | None = False,
                 caption_channels: int | None = 1536, caption_num_tokens: int = 1,
                 attention_type: str | None = "default"):
        super().__init__(num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
                         in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
                         norm_num_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                         attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
                         activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm,
                         upcast_attention=upcast_attention, norm_type=norm_type,
                         norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                         interpolation_scale=interpolation_scale, use_additional_conditions=use_additional_conditions,
                         caption_channels=caption_channels, attention_type=attention_type)
        if caption_channels is None:
            raise ValueError("PixCell needs caption_channels (the UNI embedding width)")
        self.caption_projection = PixCellUNIProjection(caption_channels, self.inner_dim, caption_num_tokens)
        self.y_pos_embed = None if caption_num_tokens == 1 else UNIPosEmbed(
            caption_channels, caption_num_tokens, base_size=sample_size // patch_size, interpolation_scale=2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, **kwargs: Any):
        """PixArt's forward on ``(B, C, h, w)`` latents and ``(B, caption_num_tokens, 1536)`` UNI tokens."""
        if self.y_pos_embed is not None and encoder_hidden_states is not None:
            encoder_hidden_states = self.y_pos_embed(encoder_hidden_states)
        return super().forward(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                               **kwargs)


def load_pixcell_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> PixCellTransformer2DModel:
    """The published ``transformer/`` folder, every parameter name and shape checked against its config.

    Raises:
        WeightsError: no config, a config of another class, a config whose dimensions
            disagree with the weights, missing/extra parameters, a truncated file.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(folder, f"has no config.json (download transformer/ from {PIXCELL_SOURCE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(config_path, f"is not valid JSON ({exc})") from exc
    name = config.get("_class_name")
    if name != "PixCellTransformer2DModel":
        raise WeightsError(config_path, f"describes a {name} model, not PixCellTransformer2DModel")
    weights = find_weights(folder, f"download diffusion_pytorch_model.safetensors from {PIXCELL_SOURCE}")
    found = safetensors_shapes(weights)
    try:
        with init_empty_weights():
            model = PixCellTransformer2DModel.from_config(config)
    except (ValueError, TypeError, NotImplementedError, ZeroDivisionError) as exc:
        raise WeightsError(config_path, f"is not a usable PixCell config ({exc})") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_shapes(weights, found, expected, "PixCellTransformer2DModel")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise WeightsError(weights, f"cannot be read ({exc}); download it again") from exc
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- folder pieces
def is_pixcell_folder(folder: str | Path) -> bool:
    return is_pixcell(Path(folder))


def _search_roots(folder: Path) -> list[Path]:
    roots = [r for r in (models_dir(), folder.parent) if r is not None]
    return list(dict.fromkeys(Path(r).resolve() for r in roots))


def resolve_vae(folder: Path, vae: str | Path | None = None) -> Path:
    """Where the SD3.5 VAE weights are: ``vae`` if given, ``<folder>/vae`` when the user put the
    weights there, else an SD3.5 VAE folder in the models folder or beside ``folder``."""
    if vae is not None:
        return Path(vae)
    own = folder / "vae"
    if any(own.glob("*.safetensors")):
        return own
    found = find_sd35_vae(_search_roots(folder))
    if found is not None:
        return found
    raise WeightsError(own, f"holds only a config (PixCell does not ship the SD3.5 VAE): download "
                            f"vae/config.json and vae/diffusion_pytorch_model.safetensors from Hugging Face "
                            f"{SD35_VAE_SOURCE} into {own} or into a folder beside it (e.g. "
                            f"{folder.parent / 'sd3.5-vae'})")


def make_scheduler(folder: Path, kind: str = "dpm"):
    """The published scheduler config as DPM-Solver++ (``dpm``), DDIM (``ddim``) or Euler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config_dir = folder / "scheduler"
    if not (config_dir / "scheduler_config.json").is_file():
        raise WeightsError(config_dir, f"has no scheduler_config.json (download scheduler/ from {PIXCELL_SOURCE})")
    config = DPMSolverMultistepScheduler.load_config(str(config_dir))
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(config)
    if kind == "ddim":  # PixCell's 4K sampler: steps 999, 949, ..., no x0 clipping
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False,
                                         timestep_spacing="trailing")
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise InputError("--scheduler", f"{kind!r}; PixCell runs with dpm, ddim or euler")


class UNITokenLayout:
    """What the studio's generation jobs ask of a conditioner, answered for PixCell: the
    token width (``config.embed_dim``) and the UNI grid of an image, one token per
    ``token_pixels`` crop (256 px for both releases: 256 / 1 and 1024 / 4)."""

    def __init__(self, embed_dim: int, num_tokens: int, native_size: int):
        pixels = native_size // max(1, math.isqrt(num_tokens))
        self.config = SimpleNamespace(embed_dim=embed_dim, token_pixels=pixels, num_tokens=num_tokens)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        tp = self.config.token_pixels
        return max(1, round(height / tp)), max(1, round(width / tp))


# --------------------------------------------------------------------------- pipeline
class PixCellPipeline(DiffusionPipeline):
    r"""Generate H&E from UNI-2h embeddings with the published PixCell weights.

    Components:
        transformer ([`PixCellTransformer2DModel`]): the DiT; ``caption_num_tokens`` UNI tokens
            per native-size image (1 for PixCell-256, a 4x4 grid for PixCell-1024).
        vae ([`AutoencoderKL`]): the SD3.5 VAE (16 latent channels, /8); its config's
            ``scaling_factor`` and ``shift_factor`` map latents in and out.
        scheduler ([`SchedulerMixin`]): DPM-Solver++ from the published config, DDIM or Euler.
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: PixCellTransformer2DModel, vae: AutoencoderKL, scheduler: Any):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, folder: str | Path, vae: str | Path | None = None, scheduler: str = "dpm",
                        dtype: torch.dtype = torch.float32, **_ignored: Any) -> PixCellPipeline:
        """Load a published PixCell folder (local only; the folder's ``.py`` files are never run).

        Args:
            folder: ``PixCell-256`` or ``PixCell-1024`` as downloaded.
            vae: the SD3.5 VAE folder (default: ``folder/vae`` if it holds weights, else one
                found in ``$HISTOSTUDIO_MODELS`` or beside ``folder``).
            scheduler: ``dpm`` (published), ``ddim`` or ``euler``.
            dtype: transformer dtype (the VAE stays float32: SD3.5's decoder overflows in fp16).
        """
        from pipelines.encoders import load_model_folder

        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(folder, f"no such PixCell folder (download it from {PIXCELL_SOURCE})")
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise WeightsError(folder, "has no model_index.json (not a PixCell folder)")
        if not is_pixcell(folder):
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                index = {}
            kind = index.get("_class_name", "unknown") if isinstance(index, dict) else "unknown"
            raise WeightsError(folder, f"is a {kind} folder, not PixCell (model_index.json lists no "
                                       "PixCellTransformer2DModel)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if "controlnet" in index:
            raise WeightsError(folder, "is PixCell's cell ControlNet (it draws H&E from nuclei masks): run it with "
                                       "histostudio generate rare --checkpoint FOLDER; for embedding-conditioned "
                                       "generation use PixCell-256 or PixCell-1024")
        transformer = load_pixcell_transformer(folder / "transformer", dtype)
        vae_model = load_model_folder(AutoencoderKL, resolve_vae(folder, vae))
        if vae_model.config.latent_channels != transformer.config.in_channels:
            raise WeightsError(resolve_vae(folder, vae), f"gives {vae_model.config.latent_channels} latent "
                                                         f"channels; PixCell takes {transformer.config.in_channels}"
                                                         " (the SD3.5 VAE has 16)")
        return cls(transformer=transformer, vae=vae_model.eval(), scheduler=make_scheduler(folder, scheduler))

    # ------------------------------------------------------------------ geometry
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def window(self) -> int:
        """Native latent side (the transformer's ``sample_size``)."""
        return int(self.transformer.config.sample_size)

    @property
    def native_size(self) -> int:
        return self.window * self.vae_factor

    @property
    def tokens_per_image(self) -> int:
        return int(self.transformer.config.caption_num_tokens)

    @property
    def conditioner(self) -> UNITokenLayout:
        return UNITokenLayout(int(self.transformer.config.caption_channels), self.tokens_per_image,
                              self.native_size)

    def check_compatible(self) -> None:
        if self.vae.config.latent_channels != self.transformer.config.in_channels:
            raise InputError("pipeline", "VAE latent channels and transformer in_channels disagree")

    # ------------------------------------------------------------------ latents
    def encode(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float RGB in [0, 1] -> PixCell latents ``(z - shift) * scaling``."""
        cfg = self.vae.config
        z = self.vae.encode(tiles.to(self.vae.device, self.vae.dtype) * 2 - 1).latent_dist.sample(generator)
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """PixCell latents -> float RGB in [0, 1] (``z = latents / scaling + shift``)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def null_tokens(self, batch: int) -> torch.Tensor:
        """The learned unconditional embedding, ``(batch, caption_num_tokens, D)``."""
        null = self.transformer.caption_projection.uncond_embedding
        return null.unsqueeze(0).expand(batch, -1, -1)

    # ------------------------------------------------------------------ windows
    def plan_windows(self, tokens: torch.Tensor, h: int, w: int, grid: tuple[int, int] | None, overlap: float,
                     size: tuple[int, int]) -> list[tuple[int, int, torch.Tensor]]:
        """``(y, x, window_tokens)`` for every native-size window of an ``h x w`` latent canvas."""
        n_model, batch, n = self.tokens_per_image, tokens.shape[0], tokens.shape[1]
        win = self.window
        if h <= win and w <= win:
            if n != n_model:
                raise InputError("embeddings", f"{n} UNI tokens; this PixCell model takes {n_model} per "
                                               f"{self.native_size} px image")
            return [(0, 0, tokens)]
        k = math.isqrt(n_model)
        cell = win // k  # latent pixels per UNI token
        if n == 1 and n_model == 1:
            gh = gw = 1
        else:
            if h % cell or w % cell:
                raise InputError("height/width", f"{size[1]}x{size[0]}: large PixCell images must be multiples of "
                                                 f"{cell * self.vae_factor} px (one UNI token per crop)")
            need = (h // cell, w // cell)
            if n != need[0] * need[1] or (grid is not None and tuple(grid) != need):
                given = f"{grid[0]}x{grid[1]}" if grid is not None else f"{n} tokens"
                raise InputError("--grid", f"{given}: a {size[1]}x{size[0]} image needs a {need[0]}x{need[1]} "
                                           f"UNI grid (one token per {cell * self.vae_factor} px crop); pass "
                                           f"--grid {need[0]}x{need[1]}")
            gh, gw = need
        step = max(1, int(round(win * (1 - overlap))))
        if n_model > 1:
            step = max(cell, step // cell * cell)  # windows start on token cells
        starts = EmbeddingToImagePipeline.window_starts
        plan = []
        for y in starts(h, win, step):
            for x in starts(w, win, step):
                if gh * gw == 1:
                    local = tokens
                elif n_model > 1:
                    rows, cols = range(y // cell, y // cell + k), range(x // cell, x // cell + k)
                    idx = torch.tensor([r * gw + c for r in rows for c in cols], device=tokens.device)
                    local = tokens.index_select(1, idx)
                else:  # one token per window: area-weighted mean of the cells it covers
                    wy = torch.tensor([max(0, min(y + win, (r + 1) * cell) - max(y, r * cell)) for r in range(gh)])
                    wx = torch.tensor([max(0, min(x + win, (c + 1) * cell) - max(x, c * cell)) for c in range(gw)])
                    weight = (wy[:, None] * wx[None, :]).flatten().to(tokens.device, tokens.dtype)
                    local = torch.einsum("n,bnd->bd", weight / weight.sum(), tokens).unsqueeze(1)
                plan.append((y, x, local.expand(batch, -1, -1)))
        return plan

    def guided_noise(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, guidance: float) -> torch.Tensor:
        """Epsilon for one window, guided against the learned null embedding."""
        dtype = self.transformer.dtype
        batch = x.shape[0]
        do_cfg = guidance != 1.0
        states = torch.cat([self.null_tokens(batch), tokens]) if do_cfg else tokens
        model_in = torch.cat([x, x]) if do_cfg else x
        timestep = t.reshape(1).to(x.device).expand(model_in.shape[0])
        out = self.transformer(model_in.to(dtype), encoder_hidden_states=states.to(dtype), timestep=timestep,
                               return_dict=False)[0]
        eps = out[:, : self.transformer.config.in_channels].float()  # learned sigma: epsilon first
        if do_cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        return eps

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, plan: list, guidance: float) -> torch.Tensor:
        if len(plan) == 1:
            return self.guided_noise(latents, t, plan[0][2], guidance)
        win = self.window
        total = torch.zeros_like(latents, dtype=torch.float32)
        weight = torch.zeros(1, 1, *latents.shape[-2:], device=latents.device)
        ramp = EmbeddingToImagePipeline.window_weights(win, latents.device, torch.float32)
        for y, x, local in plan:
            box = (slice(None), slice(None), slice(y, y + win), slice(x, x + win))
            total[box] += self.guided_noise(latents[box], t, local, guidance) * ramp
            weight[box] += ramp
        return (total / weight).to(latents.dtype)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        embeddings: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
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
        r"""One image per row of ``embeddings`` (UNI-2h tokens ``(B, N, 1536)``).

        Args:
            embeddings: at the native size, ``caption_num_tokens`` tokens (1, or a row-major
                4x4 grid of 256 px crops); for larger images, one token per 256 px crop of the
                output (``grid`` rows x cols), or a single token for PixCell-256.
            height, width: output pixels (default: native, 256 or 1024; multiples of 16).
            grid: the token grid of a large image (checked against height and width).
            guidance_scale: classifier-free guidance against the learned null embedding
                (PixCell's cards use 1.5-2; 1 disables the null branch).
            window: must be the native latent size when given (kept for the studio's
                generation jobs, which pass it through); ``overlap``: share of a window its
                neighbour covers (0.5: PixCell-1024 windows move by 512 px).
            output_type: ``pil``, ``np`` (float ``(B, H, W, 3)`` in [0, 1]) or ``pt``.

        Examples:
            >>> from pipelines.pixcell import PixCellPipeline
            >>> from pipelines.uni2h import UNI2hEncoder
            >>> pipe = PixCellPipeline.from_pretrained("/models/PixCell-256", vae="/models/sd3.5-vae")
            >>> uni = UNI2hEncoder.from_folder("/models/UNI2-h")
            >>> tokens = uni.embed(tile)  # tile: (1, 3, 256, 256) float in [0, 1]
            >>> image = pipe(tokens, num_inference_steps=20, guidance_scale=2.0).images[0]
        """
        if output_type not in ("pil", "np", "pt"):
            raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
        if window is not None and window != self.window:
            raise InputError("window", f"{window}: PixCell windows are its native {self.window} latent pixels")
        height, width = height or self.native_size, width or self.native_size
        multiple = self.vae_factor * int(self.transformer.config.patch_size)
        if height % multiple or width % multiple:
            raise InputError("height/width", f"{height}x{width} must be multiples of {multiple}")
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.transformer.config.caption_channels:
            raise InputError("embeddings", f"shape {tuple(embeddings.shape)}; PixCell takes UNI-2h tokens "
                                           f"(B, N, {self.transformer.config.caption_channels})")
        tokens = embeddings.to(self.transformer.device, torch.float32)
        batch, h, w = tokens.shape[0], height // self.vae_factor, width // self.vae_factor

        # 1. windows of the latent canvas and the UNI tokens each is conditioned on
        plan = self.plan_windows(tokens, h, w, grid, overlap, (height, width))

        # 2. initial noise
        shape = (batch, int(self.transformer.config.in_channels), h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.transformer.device, dtype=torch.float32)
        latents = latents.to(self.transformer.device, torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.transformer.device)

        # 3. denoising loop: predict guided epsilon over the canvas, step the scheduler
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            model_in = self.scheduler.scale_model_input(latents, t)
            noise = self.predict_noise(model_in, t, plan, guidance_scale)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        # 4. decode (large canvases with the VAE's own overlapping tiles)
        if len(plan) > 1:
            self.vae.enable_tiling()
        try:
            images = self.decode(latents)
        finally:
            self.vae.disable_tiling()
        out: list[Image.Image] | np.ndarray | torch.Tensor = format_images(images, output_type)
        used = tuple(grid) if grid is not None else (math.isqrt(tokens.shape[1]),) * 2
        if not return_dict:
            return (out, used)
        return EmbeddingToImagePipelineOutput(images=out, grid=used)


# --------------------------------------------------------------------------- studio jobs
def load_pixcell_pipeline(settings: Any) -> PixCellPipeline:
    """The PixCell back-end of ``generate embedding`` (``settings``: a ``GenerationSettings``)."""
    dtypes = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if settings.dtype not in dtypes:
        raise InputError("--dtype", f"{settings.dtype!r}; use float32, bf16 or fp16")
    pipe = PixCellPipeline.from_pretrained(settings.checkpoint, vae=(settings.extra or {}).get("vae"),
                                           scheduler=settings.scheduler, dtype=dtypes[settings.dtype])
    pipe.to(settings.device)
    if settings.compile:
        pipe.transformer = torch.compile(pipe.transformer, dynamic=False)
    return pipe


def uni2h_spec_for(checkpoint: str | Path) -> str:
    """``--encoder auto`` for PixCell: a ready UNI-2h folder in the models folder or beside the checkpoint."""
    waiting = None
    for root in _search_roots(Path(checkpoint)):
        for model in find_published(root):
            if model.kind == "uni2h":
                if model.ready:
                    return f"uni2h:{model.path}"
                waiting = waiting or model
    if waiting is not None:
        raise WeightsError(waiting.path, f"UNI-2h found but not ready: {waiting.status}")
    raise InputError("--encoder", "PixCell is conditioned on UNI-2h: pass --encoder uni2h:/path/to/UNI2-h (config.json "
                                  "+ model.safetensors converted from pytorch_model.bin of Hugging Face "
                                  "MahmoodLab/UNI2-h, gated) or put it in $HISTOSTUDIO_MODELS")

"""PixCell-256-Cell-ControlNet (StonyBrook-CVLab) from its published folder: no remote code.

The release is a diffusers folder whose ``model_index.json`` names a
``PixCellControlNetPipeline``::

    PixCell-256-Cell-ControlNet/
      model_index.json
      controlnet/    config.json, diffusion_pytorch_model.safetensors (class PixCellControlNet)
      transformer/   config.json, diffusion_pytorch_model.safetensors (the frozen PixCell-256 base;
                     class PixCellTransformer2DModelControlNet, same parameters as PixCellTransformer2DModel)
      scheduler/     scheduler_config.json (DPMSolverMultistepScheduler)
      vae/           config.json (+ the SD3.5 VAE weights, or get them from Stability AI)

Upstream loads it with ``custom_pipeline=...`` and ``trust_remote_code=True``; the studio
rebuilds it from diffusers blocks and loads the safetensors by parameter name instead.

What the ControlNet is (:class:`PixCellControlNet`):

* ``transformer.*``: a full copy of the base PixCell transformer (its patch embedding,
  ``adaln_single`` timestep embedding, UNI ``caption_projection`` and blocks): the ControlNet
  is conditioned on the same UNI token by cross-attention;
* ``cond_pos_embed``: a zero-initialised :class:`~diffusers.models.embeddings.PatchEmbed` of
  the *SD3.5-VAE latents of the mask rendered as an RGB image*, added to the copy's patch
  embedding of the noisy latents;
* ``controlnet_blocks.N``: zero-initialised ``Linear(inner_dim, inner_dim)``, one per copied
  block; the first ``n_blocks`` copied blocks run, and output ``N``, times
  ``conditioning_scale``, is added to the base transformer's hidden states after base block
  ``N`` (:func:`controlled_forward`). Zero initialisation means an untrained ControlNet leaves
  the base model's prediction exactly unchanged.

Names inferred, not read: the published ``controlnet/config.json`` and the final upstream
module could not be fetched here. ``transformer`` / ``cond_pos_embed`` / ``n_blocks`` are the
names of the upstream ``PixCellControlNet`` code that is public; ``controlnet_blocks`` is
diffusers' name for per-block zero linears (PixArt / SD3 ControlNets). The loader checks
every name and shape against the folder and says which one differs, so a mismatch with the
real release is a one-line error, never silent.

The mask (:func:`render_mask_rgb`): nuclei white (255, 255, 255) on black, one binary mask
replicated to three channels, encoded by the SD3.5 VAE exactly like an H&E tile (``[-1, 1]``
input, ``(z - shift) * scaling``). This is the layout of the release's ``test_mask.png``
(a 2.5 kB binary PNG beside ``test_image.png``); class labels do not enter the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from pipelines.mask_to_image import MaskToImagePipelineOutput
from pipelines.outputs import format_images
from pipelines.pixcell import PixCellPipeline, PixCellTransformer2DModel, make_scheduler, resolve_vae
from pipelines.uni2h import check_state_shapes, find_weights, safetensors_shapes
from studio.errors import InputError, WeightsError
from studio.published import find_published, models_dir

CONTROLNET_SOURCE = "Hugging Face StonyBrook-CVLab/PixCell-256-Cell-ControlNet"
BASE_SOURCE = "Hugging Face StonyBrook-CVLab/PixCell-256"
TRANSFORMER_CLASSES = ("PixCellTransformer2DModel", "PixCellTransformer2DModelControlNet")
CONTROLNET_CLASSES = ("PixCellControlNet",)
# The base transformer's config keys the ControlNet copy must share with it (residual widths).
SHARED_DIMS = ("num_attention_heads", "attention_head_dim", "in_channels", "patch_size", "caption_channels",
               "caption_num_tokens")


# --------------------------------------------------------------------------- mask
def render_mask_rgb(inst: np.ndarray) -> np.ndarray:
    """float32 ``(3, H, W)`` in [0, 1]: nuclei (``inst > 0``) white, background black.

    Raises:
        InputError: a map that is not 2-D or has negative ids.
    """
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise InputError("mask", f"instance map of shape {inst.shape}; expected (H, W)")
    if inst.size and inst.min() < 0:
        raise InputError("mask", "instance ids must be >= 0")
    fg = (inst > 0).astype(np.float32)
    return np.repeat(fg[None], 3, axis=0)


# --------------------------------------------------------------------------- model
def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PixCellControlNet(ModelMixin, ConfigMixin):
    r"""PixCell's ControlNet: a copy of the base transformer plus a zero-initialised mask
    patch embedding (``cond_pos_embed``) and per-block zero linears (``controlnet_blocks``).

    Takes every :class:`PixCellTransformer2DModel` config key (those of the base it copies)
    plus ``n_blocks``: how many copied blocks run and feed a residual (default: all).
    ``forward`` returns one residual ``(B, tokens, inner_dim)`` per run block.
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
                 attention_type: str | None = "default", n_blocks: int | None = None):
        super().__init__()
        self.transformer = PixCellTransformer2DModel(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=num_layers, dropout=dropout, norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim, attention_bias=attention_bias, sample_size=sample_size,
            patch_size=patch_size, activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention, norm_type=norm_type, norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps, interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions, caption_channels=caption_channels,
            caption_num_tokens=caption_num_tokens, attention_type=attention_type)
        blocks = num_layers if n_blocks is None else int(n_blocks)
        if not 1 <= blocks <= num_layers:
            raise ValueError(f"n_blocks {n_blocks} must be between 1 and num_layers {num_layers}")
        inner = self.transformer.inner_dim
        scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.cond_pos_embed = _zero(PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                               in_channels=in_channels, embed_dim=inner,
                                               interpolation_scale=scale))
        self.controlnet_blocks = nn.ModuleList([_zero(nn.Linear(inner, inner)) for _ in range(blocks)])

    @property
    def n_blocks(self) -> int:
        return len(self.controlnet_blocks)

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                encoder_hidden_states: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Residuals for the base blocks from noisy latents, mask latents and UNI tokens."""
        tf = self.transformer
        batch = hidden_states.shape[0]
        x = tf.pos_embed(hidden_states) + self.cond_pos_embed(controlnet_cond.to(hidden_states.dtype))
        t, _ = tf.adaln_single(timestep, None, batch_size=batch, hidden_dtype=x.dtype)
        y = encoder_hidden_states if tf.y_pos_embed is None else tf.y_pos_embed(encoder_hidden_states)
        y = tf.caption_projection(y).view(batch, -1, x.shape[-1])
        out = []
        for block, zero_linear in zip(tf.transformer_blocks, self.controlnet_blocks, strict=False):
            x = block(x, encoder_hidden_states=y, timestep=t)
            out.append(zero_linear(x))
        return tuple(out)


def controlled_forward(transformer: PixCellTransformer2DModel, hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                       residuals: Sequence[torch.Tensor] = (), conditioning_scale: float = 1.0) -> torch.Tensor:
    """The base transformer's forward with ``residuals[i] * conditioning_scale`` added after block ``i``.

    Step for step :meth:`diffusers.PixArtTransformer2DModel.forward` (same modules, same
    order); with no residuals it returns exactly what ``transformer(...)`` returns.
    """
    tf = transformer
    batch = hidden_states.shape[0]
    p = tf.config.patch_size
    height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
    x = tf.pos_embed(hidden_states)
    t, embedded_t = tf.adaln_single(timestep, None, batch_size=batch, hidden_dtype=x.dtype)
    y = encoder_hidden_states if tf.y_pos_embed is None else tf.y_pos_embed(encoder_hidden_states)
    y = tf.caption_projection(y).view(batch, -1, x.shape[-1])
    for i, block in enumerate(tf.transformer_blocks):
        x = block(x, encoder_hidden_states=y, timestep=t)
        if i < len(residuals):
            x = x + residuals[i].to(x.dtype) * conditioning_scale
    shift, scale = (tf.scale_shift_table[None] + embedded_t[:, None].to(tf.scale_shift_table.device)).chunk(2, dim=1)
    x = tf.norm_out(x) * (1 + scale.to(x.device)) + shift.to(x.device)
    x = tf.proj_out(x).squeeze(1)
    x = x.reshape(-1, height, width, p, p, tf.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, tf.out_channels, height * p, width * p)


# --------------------------------------------------------------------------- loading
def read_config(folder: Path, classes: tuple[str, ...], hint: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(folder, f"has no config.json ({hint})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(path, f"is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("_class_name") not in classes:
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise WeightsError(path, f"describes a {name} model, not {' or '.join(classes)}")
    return config


def load_checked(folder: Path, model_cls: type, config: dict[str, Any], what: str, hint: str,
                  dtype: torch.dtype) -> Any:
    """Build ``model_cls`` from ``config`` (empty weights), check the folder's safetensors by
    name and shape (one line naming the first difference), then load it."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    weights = find_weights(folder, hint)
    found = safetensors_shapes(weights)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights():
            model = model_cls.from_config(kwargs)
    except (ValueError, TypeError, NotImplementedError, ZeroDivisionError) as exc:
        raise WeightsError(folder / "config.json", f"is not a usable {what} config ({exc})") from exc
    check_state_shapes(weights, found, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what)
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise WeightsError(weights, f"cannot be read ({exc}); download it again") from exc
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def resolve_base(folder: Path, base: str | Path | None = None) -> Path:
    """The base transformer folder: ``base`` (a PixCell-256 folder or its ``transformer/``),
    the release's own ``transformer/`` when it holds weights, else a PixCell-256 found in
    ``$HISTOSTUDIO_MODELS`` or beside the ControlNet folder."""
    if base is not None:
        base = Path(base)
        return base / "transformer" if (base / "transformer").is_dir() else base
    own = folder / "transformer"
    if _has_weights(own):
        return own
    roots = list(dict.fromkeys(Path(r).resolve() for r in (models_dir(), folder.parent) if r is not None))
    for root in roots:
        for model in find_published(root):
            if model.kind == "pixcell" and _has_weights(model.path / "transformer"):
                config = json.loads((model.path / "transformer" / "config.json").read_text(encoding="utf-8"))
                if int(config.get("caption_num_tokens", 1)) == 1:
                    return model.path / "transformer"
    raise WeightsError(own, f"has no base PixCell weights: download transformer/diffusion_pytorch_model.safetensors "
                            f"from {CONTROLNET_SOURCE} (or put PixCell-256 from {BASE_SOURCE} beside it)")


def load_pixcell_controlnet(folder: str | Path, base_config: dict[str, Any] | None = None,
                            dtype: torch.dtype = torch.float32) -> PixCellControlNet:
    """The published ``controlnet/`` folder, names and shapes checked; its dimensions must
    match ``base_config`` (the base transformer's) so its residuals fit the base blocks."""
    folder = Path(folder)
    hint = f"download controlnet/ from {CONTROLNET_SOURCE}"
    config = read_config(folder, CONTROLNET_CLASSES, hint)
    if base_config is not None:
        for key in SHARED_DIMS + ("num_layers",):
            if key == "num_layers":
                blocks = config.get("n_blocks") or config.get("num_layers")
                if blocks is not None and int(blocks) > int(base_config.get("num_layers", 0)):
                    raise WeightsError(folder / "config.json", f"n_blocks {blocks} exceeds the base transformer's "
                                                               f"{base_config.get('num_layers')} layers")
            elif key in config and key in base_config and config[key] != base_config[key]:
                raise WeightsError(folder / "config.json", f"'{key}' is {config[key]} but the base transformer's "
                                                           f"is {base_config[key]} (ControlNet of another base?)")
    return load_checked(folder, PixCellControlNet, config, "PixCellControlNet", hint, dtype)


def is_controlnet_folder(folder: str | Path) -> bool:
    """PixCell's ControlNet release: ``model_index.json`` lists a ``controlnet`` and a PixCell
    transformer (or a ``PixCellControlNet``); the studio's own mask model has a UNet instead."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict) or "controlnet" not in index:
        return False
    entries = [index.get("controlnet"), index.get("transformer")]
    names = {e[1] for e in entries if isinstance(e, list) and len(e) == 2}
    return bool(names & set(CONTROLNET_CLASSES + TRANSFORMER_CLASSES))


# --------------------------------------------------------------------------- pipeline
class PixCellControlNetPipeline(PixCellPipeline):
    r"""Generate H&E tiles whose nuclei follow a cell mask, with the published PixCell ControlNet.

    Components:
        transformer ([`PixCellTransformer2DModel`]): the frozen PixCell-256 base.
        controlnet ([`PixCellControlNet`]): reads the SD3.5-VAE latents of the mask rendered
            as RGB (:func:`render_mask_rgb`) and adds per-block residuals to the base.
        vae ([`AutoencoderKL`]): the SD3.5 VAE (``(z - shift) * scaling``).
        scheduler ([`SchedulerMixin`]): DPM-Solver++ from the published config, DDIM or Euler.

    The UNI token: a reference H&E tile's UNI-2h embedding when one is given (the style and
    tissue the mask is drawn in), else the learned null embedding. Guidance is classifier-free
    against the null embedding (the ControlNet runs in both branches: the mask is structure,
    not the guided condition); with no reference both branches are the same, so it is skipped.
    Drop-in for :class:`~pipelines.mask_to_image.MaskToImagePipeline` in ``generate rare``:
    same call (``(inst, cls)`` pairs) and output; classes select which nuclei the layouts
    hold, the model sees only where nuclei are.
    """

    model_cpu_offload_seq = "controlnet->transformer->vae"

    def __init__(self, transformer: PixCellTransformer2DModel, controlnet: PixCellControlNet, vae: AutoencoderKL,
                 scheduler: Any):
        DiffusionPipeline.__init__(self)
        self.register_modules(transformer=transformer, controlnet=controlnet, vae=vae, scheduler=scheduler)
        self.reference_tokens: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, vae: str | Path | None = None, base: str | Path | None = None,
                        scheduler: str = "dpm", dtype: torch.dtype = torch.float32,
                        **_ignored: Any) -> PixCellControlNetPipeline:
        """Load ``PixCell-256-Cell-ControlNet`` as downloaded (local only; its ``.py`` files never run).

        Args:
            folder: the release folder.
            vae: the SD3.5 VAE folder (default: ``folder/vae`` if it holds weights, else one
                found in ``$HISTOSTUDIO_MODELS`` or beside ``folder``).
            base: the base transformer (default: ``folder/transformer``, else a PixCell-256 found
                beside it).
        """
        from pipelines.encoders import load_model_folder

        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(folder, f"no such folder (download it from {CONTROLNET_SOURCE})")
        if not is_controlnet_folder(folder):
            raise WeightsError(folder, "is not a PixCell ControlNet folder (model_index.json lists no controlnet)")
        base_dir = resolve_base(folder, base)
        base_hint = f"download transformer/ from {CONTROLNET_SOURCE}"
        base_config = read_config(base_dir, TRANSFORMER_CLASSES, base_hint)
        transformer = load_checked(base_dir, PixCellTransformer2DModel, base_config, "PixCellTransformer2DModel",
                                    base_hint, dtype)
        controlnet = load_pixcell_controlnet(folder / "controlnet", base_config, dtype)
        vae_dir = resolve_vae(folder, vae)
        vae_model = load_model_folder(AutoencoderKL, vae_dir)
        if vae_model.config.latent_channels != transformer.config.in_channels:
            raise WeightsError(vae_dir, f"gives {vae_model.config.latent_channels} latent channels; PixCell takes "
                                        f"{transformer.config.in_channels} (the SD3.5 VAE has 16)")
        sched_root = folder if (folder / "scheduler").is_dir() else base_dir.parent
        return cls(transformer=transformer, controlnet=controlnet, vae=vae_model.eval(),
                   scheduler=make_scheduler(sched_root, scheduler))

    # ------------------------------------------------------------------ studio interface
    @property
    def classes(self) -> dict[int, str]:
        """PanNuke's table: the layouts' class codes (the model itself is class-agnostic)."""
        from studio.data.samples import PANNUKE_CLASSES

        return dict(PANNUKE_CLASSES)

    def set_reference(self, tokens: torch.Tensor | None) -> None:
        """The UNI token ``(1, 1, D)`` every tile is drawn with (None: the learned null embedding)."""
        if tokens is not None:
            d = int(self.transformer.config.caption_channels)
            if tokens.ndim != 3 or tokens.shape[1:] != (self.tokens_per_image, d):
                raise InputError("--reference", f"UNI tokens of shape {tuple(tokens.shape)}; expected "
                                                f"(1, {self.tokens_per_image}, {d})")
        self.reference_tokens = tokens

    def guided_noise_controlled(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, tokens: torch.Tensor,
                                guidance: float, conditioning_scale: float) -> torch.Tensor:
        """Epsilon with ControlNet residuals, guided against the learned null embedding."""
        dtype = self.transformer.dtype
        batch = x.shape[0]
        null = self.null_tokens(batch)
        do_cfg = guidance != 1.0 and not torch.equal(tokens, null.to(tokens))
        states = torch.cat([null, tokens]) if do_cfg else tokens
        model_in = torch.cat([x, x]) if do_cfg else x
        cond_in = torch.cat([cond, cond]) if do_cfg else cond
        timestep = t.reshape(1).to(x.device).expand(model_in.shape[0])
        residuals = self.controlnet(model_in.to(dtype), cond_in.to(dtype), states.to(dtype), timestep)
        out = controlled_forward(self.transformer, model_in.to(dtype), states.to(dtype), timestep, residuals,
                                 conditioning_scale)
        eps = out[:, : self.transformer.config.in_channels].float()  # learned sigma: epsilon first
        if do_cfg:
            uncond, c = eps.chunk(2)
            eps = uncond + guidance * (c - uncond)
        return eps

    @torch.no_grad()
    def __call__(
        self,
        masks: Sequence[tuple[np.ndarray, np.ndarray]] | torch.Tensor,
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
        r"""One tile per mask.

        Args:
            masks: ``(inst, cls)`` pairs (instance ids; classes are ignored by the model), or
                rendered masks ``(B, 3, H, W)`` in [0, 1]. Sides: multiples of 16 px (256 native).
            embeddings: UNI-2h tokens ``(B or 1, 1, 1536)``; default :meth:`set_reference`'s,
                else the learned null embedding.
            guidance_scale: classifier-free guidance against the null embedding (1: off).
            controlnet_conditioning_scale: multiplies every ControlNet residual (0: the base model).
            output_type: ``pil``, ``np`` (float ``(B, H, W, 3)`` in [0, 1]) or ``pt``.

        Examples:
            >>> from pipelines.pixcell_controlnet import PixCellControlNetPipeline
            >>> pipe = PixCellControlNetPipeline.from_pretrained("/models/PixCell-256-Cell-ControlNet")
            >>> tile = pipe([(inst, cls)], num_inference_steps=20).images[0]
        """
        if output_type not in ("pil", "np", "pt"):
            raise InputError("output_type", f"{output_type!r}; use pil, np or pt")
        if isinstance(masks, torch.Tensor):
            control = masks.float()
        else:
            control = torch.from_numpy(np.stack([render_mask_rgb(inst) for inst, _cls in masks]))
        if control.ndim != 4 or control.shape[1] != 3:
            raise InputError("mask", f"rendered masks of shape {tuple(control.shape)}; expected (B, 3, H, W)")
        batch, _, height, width = control.shape
        multiple = self.vae_factor * int(self.transformer.config.patch_size)
        if height % multiple or width % multiple:
            raise InputError("--size", f"{height}x{width}: PixCell tiles are multiples of {multiple} px")
        device = self.transformer.device
        tokens = embeddings if embeddings is not None else self.reference_tokens
        tokens = self.null_tokens(batch) if tokens is None else tokens.to(device, torch.float32).expand(batch, -1, -1)

        # 1. the mask as the VAE sees an image: its latents, with the VAE's shift and scaling
        cond = self.encode(control.to(device), generator=None if isinstance(generator, list) else generator)
        cond = cond.to(device, torch.float32)

        # 2. initial noise
        shape = (batch, int(self.transformer.config.in_channels), height // self.vae_factor, width // self.vae_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. denoising loop: ControlNet residuals + base epsilon, guided; scheduler step
        timesteps = self.scheduler.timesteps
        for t in self.progress_bar(timesteps) if progress else timesteps:
            model_in = self.scheduler.scale_model_input(latents, t)
            noise = self.guided_noise_controlled(model_in, t, cond, tokens, guidance_scale,
                                                 controlnet_conditioning_scale)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample

        # 4. decode
        images = self.decode(latents)
        out: list[Image.Image] | np.ndarray | torch.Tensor = format_images(images, output_type)
        if not return_dict:
            return (out, control)
        return MaskToImagePipelineOutput(images=out, control=control)


# --------------------------------------------------------------------------- studio jobs
def reference_tokens(reference: str | Path, checkpoint: str | Path, uni2h: str | Path | None = None,
                     device: str = "cpu") -> torch.Tensor:
    """The UNI-2h token ``(1, 1, D)`` of a reference H&E tile (UNI-2h from ``uni2h``, else found
    in ``$HISTOSTUDIO_MODELS`` or beside the checkpoint)."""
    from pipelines.pixcell import uni2h_spec_for
    from pipelines.uni2h import UNI2hEncoder
    from studio.io import read_image, to_tensor

    path = Path(reference)
    if not path.is_file():
        raise InputError("--reference", f"{path}: no such image (an H&E tile whose style the tiles take)")
    folder = Path(uni2h) if uni2h is not None else Path(uni2h_spec_for(checkpoint).split(":", 1)[1])
    encoder = UNI2hEncoder.from_folder(folder, device=device)
    return encoder.embed(to_tensor(read_image(path)))

"""The published StainFuser weights (Jewsbury et al., GitHub R-J96/stainFuser, HF ``R-J/StainFuser``,
Apache-2.0) as a ``normalize --method stainfuser --checkpoint FILE`` back-end.

The release is not a diffusers folder but one state dict (``.safetensors`` or a torch
``.pth``, keys possibly prefixed ``module.`` by DataParallel) of the upstream wrapper's
modules, with the architecture in the repository's JSON configs (``src/configs/``):

* ``encoder.*``          the SD2.1-base VAE (``AutoencoderKL``, 4 latent channels, scaling 0.18215);
* ``noise_predictor.*``  the SD2.1-base UNet (``UNet2DConditionModel``: 320/640/1280/1280, head
  dims 5/10/20/20, cross-attention 1024, linear projection) plus ``encoder_projector``, a
  ``Linear(4, 1024)`` that lifts the style tokens into its cross-attention;
* ``conditioner.*``      a ``ControlNetModel`` built from the UNet's config (pixel-space condition,
  3 channels, embedding 16/32/96/256) plus its own ``encoder_projector`` ``Linear(4, 1024)``;
* ``noise_scheduler``    PNDM (scaled_linear 0.00085-0.012, skip_prk_steps, steps_offset 1,
  epsilon): no parameters, only its config.

Sampling, as the release runs it: the **source** tile in [0, 1] is the ControlNet's condition;
the **style** is the reference tile's VAE latent (the reference encoded from [0, 1], as the
release's inference dataset feeds it) flattened to ``(N, h*w, 4)`` tokens and projected per
network; no classifier-free guidance; 20 PNDM steps from pure noise; the decoder's output is
in [-1, 1] (the training targets were normalized so). The studio adds its slide machinery:
the noise is :func:`pipelines.stain_fuser.positional_noise`, so overlapping slide tiles share
it, the slide job adds halos and cross-fades seams, and glass tiles pass through untouched.

The parameter names are mapped explicitly (:func:`key_map`) and every shape is checked
against the configs before anything is loaded; a ``.pth`` is read only with
``torch.load(weights_only=True)`` and must be a plain tensor dict.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, PNDMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

from pipelines.outputs import format_images
from studio.devices import autocast_context
from studio.errors import InputError, WeightsError

# --------------------------------------------------------------------------- published configs
# src/configs/sd21b_unet_config.json of the release (diffusers 0.26.3 keys).
SD21B_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": None,
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None, "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 1024, "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None, "sample_size": 64, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}
# src/configs/sd21b_vae_config.json
SD21B_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# src/configs/sd21b_scheduler_config.json
SD21B_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}
CONFIG_FILES = {"unet": "sd21b_unet_config.json", "vae": "sd21b_vae_config.json",
                "scheduler": "sd21b_scheduler_config.json"}
# The release builds its ControlNet with ControlNetModel's defaults for these (not in any JSON).
CONTROLNET_CONDITIONING_CHANNELS = 3
CONTROLNET_EMBEDDING_CHANNELS = (16, 32, 96, 256)
STYLE_CHANNELS = 4  # the VAE latent channels the style tokens carry
# The UNet config keys the release passes on to its ControlNet (the rest take ControlNetModel's defaults).
CONTROLNET_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                        "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                        "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
                        "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
                        "resnet_time_scale_shift", "projection_class_embeddings_input_dim")
PUBLISHED_MODULES = ("encoder", "conditioner", "noise_predictor")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
DEFAULT_STEPS = 20
SOURCE = "Hugging Face R-J/StainFuser (Apache-2.0)"


# --------------------------------------------------------------------------- models
class StyleProjection(ModelMixin, ConfigMixin):
    """The release's two ``encoder_projector`` layers: style tokens ``(N, L, 4)`` -> cross-attention
    states, one Linear for the UNet (``noise_predictor``) and one for the ControlNet (``conditioner``)."""

    @register_to_config
    def __init__(self, in_features: int = STYLE_CHANNELS, cross_attention_dim: int = 1024):
        super().__init__()
        self.unet = nn.Linear(in_features, cross_attention_dim)
        self.controlnet = nn.Linear(in_features, cross_attention_dim)


def build_models(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> dict[str, nn.Module]:
    """Randomly initialised ``vae``, ``unet``, ``controlnet`` and ``style_projection`` in the release's shapes."""
    with warnings.catch_warnings():  # the release's configs carry keys of other diffusers versions
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        controlnet = ControlNetModel(**{k: unet.config[k] for k in CONTROLNET_FROM_UNET},
                                     conditioning_channels=CONTROLNET_CONDITIONING_CHANNELS,
                                     conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)
    projection = StyleProjection(vae.config.latent_channels, unet.config.cross_attention_dim)
    return {"vae": vae, "unet": unet, "controlnet": controlnet, "style_projection": projection}


def key_map(models: dict[str, nn.Module]) -> dict[str, str]:
    """``{published parameter name: studio parameter name}`` for every tensor the models hold.

    ``encoder.X`` -> ``vae.X``; ``noise_predictor.X`` -> ``unet.X``; ``conditioner.X`` ->
    ``controlnet.X``; ``noise_predictor.encoder_projector.*`` / ``conditioner.encoder_projector.*``
    -> ``style_projection.unet.*`` / ``style_projection.controlnet.*``.
    """
    prefixes = {"vae": "encoder", "unet": "noise_predictor", "controlnet": "conditioner"}
    mapping = {}
    for component, published in prefixes.items():
        for name in models[component].state_dict():
            mapping[f"{published}.{name}"] = f"{component}.{name}"
    for network, published in (("unet", "noise_predictor"), ("controlnet", "conditioner")):
        for name in ("weight", "bias"):
            mapping[f"{published}.encoder_projector.{name}"] = f"style_projection.{network}.{name}"
    return mapping


# --------------------------------------------------------------------------- reading the release
def find_weights(checkpoint: str | Path) -> Path:
    """The state-dict file of ``checkpoint`` (the file itself, or the one weights file in a folder)."""
    path = Path(checkpoint)
    if not path.exists():
        raise WeightsError(path, f"no such StainFuser checkpoint (download it from {SOURCE})")
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise WeightsError(path, "is not a StainFuser state dict (.safetensors or .pth)")
        return path
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    safetensors = [p for p in found if p.suffix.lower() == ".safetensors"]
    chosen = safetensors or found
    if not chosen:
        raise WeightsError(path, f"holds no StainFuser weights (.safetensors or .pth from {SOURCE})")
    if len(chosen) > 1:
        raise WeightsError(path, f"holds several weight files ({', '.join(p.name for p in chosen)}); pass one "
                                 "with --checkpoint FILE")
    return chosen[0]


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors header, read without loading tensors; a one-line
    :class:`WeightsError` when the file is truncated or not safetensors."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length <= 0 or 8 + length > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise WeightsError(path, f"is truncated or not a safetensors file ({exc}); download it again") from exc
    if ends and 8 + length + max(ends) > size:
        raise WeightsError(path, f"is truncated ({size} bytes, its header needs {8 + length + max(ends)}); "
                                 "download it again")
    return [k for k in header if k != "__metadata__"]


def strip_prefix(keys: list[str]) -> str:
    """``"module."`` when every key carries DataParallel's prefix, else ``""``."""
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


def is_stainfuser_keys(keys: list[str]) -> bool:
    prefix = strip_prefix(keys)
    heads = {k[len(prefix):].split(".", 1)[0] for k in keys}
    return set(PUBLISHED_MODULES) <= heads


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The published tensors, ``module.`` stripped: safetensors directly, a ``.pth`` only through
    ``torch.load(weights_only=True)`` and :func:`studio.convert.tensor_dict` (plain tensor dicts)."""
    from studio.convert import read_tensor_file

    if path.suffix.lower() == ".safetensors":
        safetensors_keys(path)  # the header first: a file of another kind is named as such
    tensors = read_tensor_file(path, "from Hugging Face R-J/StainFuser")
    prefix = strip_prefix(list(tensors))
    return {k[len(prefix):]: v for k, v in tensors.items()}


def read_configs(checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """The release's JSON configs beside the weights (``sd21b_*_config.json``, also under
    ``configs/``), falling back to the published SD2.1-base values for any that is absent."""
    root = Path(checkpoint)
    root = root if root.is_dir() else root.parent
    defaults = {"unet": SD21B_UNET_CONFIG, "vae": SD21B_VAE_CONFIG, "scheduler": SD21B_SCHEDULER_CONFIG}
    configs = {}
    for part, name in CONFIG_FILES.items():
        candidates = [root / name, root / "configs" / name, root / "src" / "configs" / name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            configs[part] = dict(defaults[part])
            continue
        try:
            data = json.loads(found.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightsError(found, f"is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise WeightsError(found, "is not a JSON object (a diffusers config)")
        configs[part] = data
    return configs


def load_published(checkpoint: str | Path) -> dict[str, Any]:
    """Build the four components from the configs and load the release's tensors into them.

    Raises:
        WeightsError: wrong file type, truncated file, a pickle with objects, a state dict of
            another model, or a parameter whose shape disagrees with the configs (the first one named).
    """
    weights = find_weights(checkpoint)
    configs = read_configs(checkpoint)
    if weights.suffix.lower() == ".safetensors" and not is_stainfuser_keys(safetensors_keys(weights)):
        raise WeightsError(weights, f"is not a StainFuser state dict (no {', '.join(PUBLISHED_MODULES)} modules)")
    tensors = read_state_dict(weights)
    if not is_stainfuser_keys(list(tensors)):
        raise WeightsError(weights, f"is not a StainFuser state dict (no {', '.join(PUBLISHED_MODULES)} modules)")
    try:
        models = build_models(configs["unet"], configs["vae"])
    except Exception as exc:  # a config diffusers cannot build
        raise WeightsError(weights, f"its configs do not build an SD2.1-style UNet/VAE ({exc})") from exc
    mapping = key_map(models)
    expected = {k: v for m, mod in models.items() for k, v in ((f"{m}.{n}", t) for n, t in mod.state_dict().items())}
    ready: dict[str, dict[str, torch.Tensor]] = {m: {} for m in models}
    for published, studio_name in mapping.items():
        if published not in tensors:
            raise WeightsError(weights, f"lacks '{published}' (a different or partial StainFuser checkpoint)")
        value, want = tensors[published], expected[studio_name]
        if tuple(value.shape) != tuple(want.shape):
            raise WeightsError(weights, f"'{published}' has shape {tuple(value.shape)} but the configs give "
                                        f"{tuple(want.shape)}: weights and configs disagree")
        component, _, name = studio_name.partition(".")
        ready[component][name] = value.to(want.dtype)
    extra = sorted(set(tensors) - set(mapping))
    if extra:
        raise WeightsError(weights, f"holds '{extra[0]}' (and {len(extra) - 1} more) that the configs do not "
                                    "build: weights and configs disagree")
    for name, model in models.items():
        model.load_state_dict(ready[name], strict=True)
        model.eval()
    scheduler = PNDMScheduler.from_config(configs["scheduler"])
    return {**models, "scheduler": scheduler, "weights": weights}


# --------------------------------------------------------------------------- pipeline
@dataclass
class PublishedStainFuserOutput(BaseOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor
    passed_through: list[bool]


class PublishedStainFuserPipeline(DiffusionPipeline):
    r"""Source tiles rendered in the stain of a reference, with the released StainFuser weights.

    Components:
        vae ([`AutoencoderKL`]): the SD2.1-base VAE (release module ``encoder``).
        unet ([`UNet2DConditionModel`]): the noise predictor (``noise_predictor``).
        controlnet ([`ControlNetModel`]): the source tile's pixel-space condition (``conditioner``).
        style_projection ([`StyleProjection`]): the two ``encoder_projector`` Linear(4 -> 1024) layers.
        scheduler ([`PNDMScheduler`]): the release's scheduler config (epsilon, 20 steps).

    Example::

        >>> parts = load_published("/models/StainFuser/stainfuser.safetensors")
        >>> pipe = PublishedStainFuserPipeline(**{k: v for k, v in parts.items() if k != "weights"})
        >>> style = pipe.style_tokens(reference_uint8)
        >>> out = pipe(source_uint8, style, num_inference_steps=20, seed=0).images[0]
    """

    model_cpu_offload_seq = "style_projection->controlnet->unet->vae"
    # what StainFuserTransform reads: no classical prior, recorded as mode "published"
    prior = "none"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, controlnet: ControlNetModel,
                 style_projection: StyleProjection, scheduler: PNDMScheduler, mode: str = "published"):
        super().__init__()
        if mode != "published":
            raise InputError("mode", f"{mode!r}; the released StainFuser samples as published")
        self.register_modules(vae=vae, unet=unet, controlnet=controlnet, style_projection=style_projection,
                              scheduler=scheduler)
        self.register_to_config(mode="published")

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def reference_size(self) -> int:
        """The training tile side (512 px for the release): the style tokens are taken at this size."""
        return int(self.unet.config.sample_size) * self.latent_factor

    @torch.no_grad()
    def style_tokens(self, reference: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The reference tile's scaled VAE latent as ``(1, h*w, 4)`` tokens: one RGB tile (uint8 HWC or
        float CHW in [0, 1]), resized to :attr:`reference_size` and encoded from [0, 1] as the release does."""
        from studio.io import to_tensor

        x = reference if isinstance(reference, torch.Tensor) else to_tensor(np.ascontiguousarray(reference))
        x = (x if x.ndim == 4 else x[None])[:1].float()
        if x.shape[1] != 3:
            raise InputError("reference", f"shape {tuple(x.shape)}; expected an RGB tile")
        side = self.reference_size
        if x.shape[-2:] != (side, side):
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                align_corners=False)
        x = x.clamp(0, 1).to(self.device, self.vae.dtype)
        with autocast_context(self.device):
            latent = self.vae.encode(x).latent_dist.mode()
        latent = latent.float() * self.vae.config.scaling_factor
        return latent.flatten(2).transpose(1, 2)  # (1, h*w, C)

    def _predict(self, latents: torch.Tensor, t, tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """One noise prediction: ControlNet on the source tile, then the UNet with its residuals."""
        dtype = self.unet.dtype
        with autocast_context(self.device):
            down, mid = self.controlnet(latents.to(dtype), t,
                                        encoder_hidden_states=self.style_projection.controlnet(tokens.to(dtype)),
                                        controlnet_cond=source.to(dtype), return_dict=False)
            eps = self.unet(latents.to(dtype), t, encoder_hidden_states=self.style_projection.unet(tokens.to(dtype)),
                            down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return eps.to(latents.dtype)

    @torch.no_grad()
    def __call__(self, images, reference, num_inference_steps: int = DEFAULT_STEPS, strength: float = 1.0,
                 seed: int = 0, origins: list[tuple[int, int]] | None = None, detail: str = "model",
                 output_type: str = "pil", return_dict: bool = True, **_: Any) -> PublishedStainFuserOutput | tuple:
        r"""Normalize ``images`` (uint8 ``(B, H, W, 3)`` / ``(H, W, 3)`` or float ``(B, 3, H, W)``).

        Steps: (1) the source in [0, 1] is the ControlNet condition; (2) the noise is
        :func:`~pipelines.stain_fuser.positional_noise` at each tile's ``origins`` (shared by
        overlapping slide tiles); (3) PNDM predicts and steps ``num_inference_steps`` times, no CFG;
        (4) the VAE decodes from [-1, 1]; glass tiles are passed through.

        Args:
            reference: :meth:`style_tokens` ``(1, L, 4)`` (or one reference tile, encoded here).
            strength: 1.0 (the release: start from pure noise); below 1 starts from the source latent
                noised that far (fewer steps, closer to the source).
            detail: ``"model"`` (the decoded output, the release's result) or ``"source"`` (its colour
                carried onto the source pixels, :func:`studio.color.transfer_colour`).
        """
        from pipelines.stain_fuser import MIN_TISSUE, check_sampling_options, positional_noise
        from studio.color import tissue_mask, transfer_colour
        from studio.io import to_tensor

        check_sampling_options(output_type, strength, detail, num_inference_steps)
        x = images if isinstance(images, torch.Tensor) else to_tensor(np.asarray(images))
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError("images", f"shape {tuple(x.shape)}; expected RGB tiles")
        b, _, h, w = x.shape
        m = self.size_multiple
        if h % m or w % m:
            raise InputError("images", f"{h}x{w} tiles; sides must be multiples of {m} (pad or resize)")
        x = x.float().clamp(0, 1).to(self.device)
        blank = (tissue_mask(x)[:, 0].float().mean(dim=(1, 2)) < MIN_TISSUE).tolist()
        tokens = reference if isinstance(reference, torch.Tensor) and reference.ndim == 3 \
            else self.style_tokens(reference)
        tokens = tokens.to(self.device, torch.float32).expand(b, -1, -1)

        # 1. timesteps and starting latents (positional noise: overlapping tiles agree)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        f = self.latent_factor
        shape = (self.unet.config.in_channels, h // f, w // f)
        origins = origins or [(0, 0)] * b
        noise = torch.stack([positional_noise(shape, (oy // f, ox // f), seed) for oy, ox in origins]).to(x)
        if strength < 1:
            keep = max(1, int(round(len(timesteps) * strength)))
            timesteps = timesteps[len(timesteps) - keep:]
            with autocast_context(self.device):
                start = self.vae.encode((x * 2 - 1).to(self.vae.dtype)).latent_dist.mode().float()
            latents = self.scheduler.add_noise(start * self.vae.config.scaling_factor, noise, timesteps[:1].repeat(b))
        else:
            latents = noise * self.scheduler.init_noise_sigma
        # 2. denoise: predict (ControlNet + UNet), step
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(latents, t)
            eps = self._predict(model_input, t, tokens, x)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        # 3. decode
        with autocast_context(self.device):
            image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        out = ((image.float() + 1) / 2).clamp(0, 1)
        if detail == "source":
            out = transfer_colour(x, out)
        for i, is_blank in enumerate(blank):
            if is_blank:
                out[i] = x[i]
        result: Any = format_images(out, output_type)
        if not return_dict:
            return (result, blank)
        return PublishedStainFuserOutput(images=result, passed_through=blank)


# --------------------------------------------------------------------------- the back-end
def is_published_checkpoint(checkpoint: str | Path | None) -> bool:
    """Whether ``checkpoint`` is meant for this back-end: a weights-file name (even a missing one),
    an existing file, or a folder that is not a diffusers pipeline (no ``model_index.json``); the
    loader then checks that it is StainFuser's."""
    if not checkpoint:
        return False
    path = Path(checkpoint)
    return path.suffix.lower() in WEIGHT_SUFFIXES or path.is_file() or (
        path.is_dir() and not (path / "model_index.json").is_file())


def create_published_transform(checkpoint: str | Path, reference: str | Path, device: str | None = "auto",
                               seed: int = 0, steps: int | None = None, strength: float | None = None,
                               halo: int = 32, detail: str | None = None):
    """The released weights as the slide job's ``stainfuser`` tile transform
    (:class:`~pipelines.stain_fuser.StainFuserTransform`: halos, blending, shared noise)."""
    from pipelines.stain_fuser import StainFuserTransform
    from studio.devices import enable_fast_attention, resolve_device
    from studio.transforms import load_reference_images

    device = resolve_device(device)
    parts = load_published(checkpoint)
    weights = parts.pop("weights")
    pipe = PublishedStainFuserPipeline(**parts).to(device)
    enable_fast_attention(pipe, device)
    images = load_reference_images(reference)
    tokens = pipe.style_tokens(images[0])
    return StainFuserTransform(pipe, tokens, steps=steps or DEFAULT_STEPS,
                               strength=1.0 if strength is None else strength, seed=seed, halo=halo,
                               reference=str(reference), checkpoint=str(Path(weights).absolute()),
                               detail=detail or "model")

"""PixCell virtual staining (H&E -> IHC) from the ``pixcell-virtual-staining`` release, offline.

The release (Hugging Face StonyBrook-CVLab/pixcell-virtual-staining: MIST HER2/ER/PR/Ki67 and
HER2Match) adds two small models per stain to PixCell-1024:

* ``ckpts/mlp/<name>_mlp.pth`` -- a rectified-flow MLP (:class:`FlowMLP`) that moves each of
  the 16 H&E UNI-2h tokens of a 1024 px tile to the token of the IHC tile it would be;
  trained with ``x_t = t * ihc + (1 - t) * he`` and target ``ihc - he``, timestep ``999 t``,
  and integrated here with Euler steps from t=0 (H&E) to t=1 (IHC);
* ``ckpts/lora/<name>_lora.pth`` -- a rank-4 LoRA (alpha 4) on the cross-attention
  projections (``attn2.to_q/to_k/to_v/to_out.0``) of PixCell-1024, trained on IHC tiles
  conditioned on their own UNI tokens.

So a tile is stained by: UNI-2h tokens of its 4x4 grid of crops -> flow MLP -> PixCell-1024
with the LoRA merged, conditioned on the flowed (IHC) tokens -> IHC tile.

Why the LoRA is merged by hand: ``peft`` is not a dependency, and diffusers has no LoRA
loader for PixArt transformers. A LoRA is ``W + (alpha / r) B A`` on named ``nn.Linear``
layers, so :func:`merge_lora` adds exactly that, by the parameter names peft writes
(``<module>.lora_A[.default].weight``, ``<module>.lora_B[.default].weight``); a B of zeros
leaves the base model unchanged. The release's ``.pth`` files are read only with
``torch.load(weights_only=True)`` (the restricted unpickler of :mod:`studio.convert`) and must
hold plain tensors; ``histostudio convert`` turns them into ``.safetensors``, which are
preferred when both exist. The LoRA file of the release may be a whole transformer state
dict (peft names: ``...to_q.base_layer.weight`` beside ``lora_A``/``lora_B``); only the LoRA
pairs are used, the base weights come from the PixCell-1024 folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from studio.errors import InputError, WeightsError

RELEASE = "Hugging Face StonyBrook-CVLab/pixcell-virtual-staining"
PIXCELL_1024_SOURCE = "Hugging Face StonyBrook-CVLab/PixCell-1024"
UNI2H_SOURCE = "Hugging Face MahmoodLab/UNI2-h (gated; convert pytorch_model.bin with histostudio convert)"
# --stain -> the release's file stem (MIST). HER2Match: pass its LoRA file as --checkpoint.
STAIN_FILES = {"her2": "mist_her2", "ki67": "mist_ki67", "er": "mist_er", "pr": "mist_pr"}
RELEASE_STEMS = (*STAIN_FILES.values(), "her2match")
LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LORA_ALPHA = 4.0  # the release's LoraConfig(r=4, lora_alpha=4): scale alpha / r = 1
FLOW_STEPS = 100  # Euler steps of the release's inference scripts
GUIDANCE = 1.2  # the release's inference guidance against the learned null embedding

_LORA_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
                       r"(?:\.(?P<adapter>[\w-]+))?\.weight$")


# --------------------------------------------------------------------------- flow MLP
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(N, dim)`` of (fractional) timesteps: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class FlowResBlock(nn.Module):
    """Pre-norm residual MLP block with an additive timestep embedding (the release's ``ResBlock``).

    ``in_layers`` LayerNorm -> SiLU -> Linear(channels, mid); ``emb_layers`` SiLU -> Linear(emb, mid);
    ``out_layers`` LayerNorm -> SiLU -> Dropout -> Linear(mid, channels), zero-initialised.
    """

    def __init__(self, channels: int, mid_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(channels), nn.SiLU(), nn.Linear(channels, mid_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, mid_channels))
        self.out_layers = nn.Sequential(nn.LayerNorm(mid_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Linear(mid_channels, channels))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb))


class FlowMLP(ModelMixin, ConfigMixin):
    r"""The release's flow-matching MLP (``SimpleMLP``): UNI token ``x_t`` and time -> velocity.

    Parameter names as published: ``time_embed.{0,2}``, ``input_proj``,
    ``res_blocks.{i}.{in_layers.{0,2}, emb_layers.1, out_layers.{0,3}}``, ``out.{0,2}``. The
    timestep is ``999 t`` for ``t`` in [0, 1], embedded sinusoidally at ``model_channels``.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1536, time_embed_dim: int = 1024, model_channels: int = 1024,
                 bottleneck_channels: int = 1024, out_channels: int = 1536, num_res_blocks: int = 6,
                 dropout: float = 0.0):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(FlowResBlock(model_channels, bottleneck_channels, time_embed_dim, dropout)
                                        for _ in range(num_res_blocks))
        self.out = nn.Sequential(nn.LayerNorm(model_channels, eps=1e-6), nn.SiLU(),
                                 nn.Linear(model_channels, out_channels))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity ``(N, out_channels)`` at tokens ``x`` ``(N, in_channels)``, timesteps ``(N,)`` in [0, 999]."""
        emb = self.time_embed(timestep_embedding(timesteps, int(self.config.model_channels)).to(x.dtype))
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)

    @torch.no_grad()
    def integrate(self, tokens: torch.Tensor, steps: int = FLOW_STEPS) -> torch.Tensor:
        """H&E tokens ``(..., D)`` -> IHC tokens: ``steps`` Euler steps of size ``1 / steps`` at
        ``t = linspace(1e-3, 1 - 1e-3, steps)`` (as the release samples it). Deterministic."""
        if steps < 1:
            raise InputError("flow steps", f"{steps}; must be at least 1")
        shape = tokens.shape
        param = next(self.parameters())
        x = tokens.reshape(-1, shape[-1]).to(param.device, torch.float32)
        dt = 1.0 / steps
        for t in torch.linspace(1e-3, 1.0 - 1e-3, steps).tolist():
            timestep = torch.full((x.shape[0],), 999.0 * t, device=x.device)
            x = x + dt * self(x.to(param.dtype), timestep).float()
        return x.reshape(shape)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str | Path) -> FlowMLP:
        """Build the MLP its weights describe (sizes read from the shapes), every name and shape checked."""
        need = ("input_proj.weight", "time_embed.0.weight", "res_blocks.0.in_layers.2.weight", "out.2.weight")
        missing = [k for k in need if k not in state]
        if missing:
            raise WeightsError(source, f"is not the release's flow MLP (no {missing[0]}); download "
                                       f"ckpts/mlp/<stain>_mlp.pth from {RELEASE}")
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("res_blocks."))
        model_channels, in_channels = state["input_proj.weight"].shape
        config = {"in_channels": int(in_channels), "model_channels": int(model_channels),
                  "time_embed_dim": int(state["time_embed.0.weight"].shape[0]),
                  "bottleneck_channels": int(state["res_blocks.0.in_layers.2.weight"].shape[0]),
                  "out_channels": int(state["out.2.weight"].shape[0]), "num_res_blocks": blocks}
        model = cls(**config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        for key in sorted(set(expected) | set(found)):
            if expected.get(key) != found.get(key):
                what = "missing" if key not in found else ("unexpected" if key not in expected else
                                                           f"shape {found[key]}, expected {expected[key]}")
                raise WeightsError(source, f"flow MLP parameter {key}: {what}")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()


# --------------------------------------------------------------------------- LoRA
def lora_pairs(state: dict[str, torch.Tensor], source: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A (r, in), B (out, r))}`` from peft-named keys; only the cross-attention targets."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match["module"], {})[match["ab"]] = value
    if not found:
        raise WeightsError(source, f"holds no LoRA weights (no '*.lora_A.weight' keys); download "
                                   f"ckpts/lora/<stain>_lora.pth from {RELEASE}")
    pairs = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise WeightsError(source, f"LoRA of {module} has only lora_{next(iter(ab))}; the file is incomplete")
        if not module.endswith(LORA_TARGETS):
            raise WeightsError(source, f"has a LoRA on {module}; PixCell virtual staining adapts only "
                                       f"{', '.join(LORA_TARGETS)}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise WeightsError(source, f"LoRA of {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                       "do not share a rank")
        pairs[module] = (a, b)
    return pairs


@torch.no_grad()
def merge_lora(transformer: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str | Path,
               alpha: float = LORA_ALPHA) -> int:
    """Add ``(alpha / r) B @ A`` to each targeted Linear's weight in place; returns the layers merged."""
    for module_path, (a, b) in pairs.items():
        try:
            layer = transformer.get_submodule(module_path)
        except AttributeError:
            raise WeightsError(source, f"LoRA targets {module_path}, which this PixCell transformer lacks (a LoRA "
                                       "for another model or depth?)") from None
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
            shape = tuple(layer.weight.shape) if isinstance(layer, nn.Linear) else type(layer).__name__
            raise WeightsError(source, f"LoRA of {module_path} is {b.shape[0]}x{a.shape[1]} but the layer is "
                                       f"{shape}; it was trained for another PixCell")
        delta = (alpha / a.shape[0]) * (b.float() @ a.float())
        layer.weight.add_(delta.to(layer.weight.dtype))
    return len(pairs)


# --------------------------------------------------------------------------- files
def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a ``.pth`` read once with ``torch.load(weights_only=True)`` that must
    hold a plain tensor dict (optionally under ``model_state_dict`` / ``state_dict`` / ``model``)."""
    from studio.convert import read_tensor_file

    return read_tensor_file(path, f"from {RELEASE}")


def _weights_file(stem: Path) -> Path | None:
    for suffix in (".safetensors", ".pth"):
        if stem.with_suffix(suffix).is_file():
            return stem.with_suffix(suffix)
    return None


def staining_files(checkpoint: str | Path, stain: str) -> tuple[Path, Path]:
    """The ``(lora, flow MLP)`` files of ``stain``: in the release folder ``checkpoint``
    (``ckpts/lora/mist_<stain>_lora.*`` and ``ckpts/mlp/mist_<stain>_mlp.*``, or both beside each
    other), or ``checkpoint`` is a LoRA file and the MLP is its ``_mlp`` sibling (HER2Match)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        if not checkpoint.stem.endswith("_lora"):
            raise InputError("--checkpoint", f"{checkpoint}: a PixCell staining file must be a *_lora file "
                                             f"or the release folder of {RELEASE}")
        name = checkpoint.stem[: -len("_lora")]
        lora = checkpoint
        dirs = [checkpoint.parent, checkpoint.parent.parent / "mlp"]
    else:
        if not checkpoint.is_dir():
            raise WeightsError(checkpoint, f"no such folder; download {RELEASE} (ckpts/lora and ckpts/mlp)")
        name = STAIN_FILES[stain]
        dirs = [checkpoint / "ckpts" / "lora", checkpoint / "lora", checkpoint]
        lora = next((f for d in dirs if (f := _weights_file(d / f"{name}_lora"))), None)
        if lora is None:
            raise WeightsError(checkpoint / "ckpts" / "lora" / f"{name}_lora.pth",
                               f"missing: the {stain} LoRA; download it from {RELEASE}")
        dirs = [checkpoint / "ckpts" / "mlp", checkpoint / "mlp", checkpoint]
    mlp = next((f for d in dirs if (f := _weights_file(d / f"{name}_mlp"))), None)
    if mlp is None:
        where = dirs[1] if checkpoint.is_file() else dirs[0]
        raise WeightsError(where / f"{name}_mlp.pth", f"missing: the {name} flow MLP; download it from {RELEASE}")
    return lora, mlp


def _search_roots(checkpoint: Path) -> list[Path]:
    from studio.published import models_dir

    base = checkpoint.parent if checkpoint.is_file() else checkpoint
    release = next((p for p in (base, *base.parents) if (p / "ckpts").is_dir()), base)
    roots = [r for r in (models_dir(), release.parent) if r is not None]
    return list(dict.fromkeys(Path(r).resolve() for r in roots))


def find_published_piece(checkpoint: str | Path, kind: str) -> Path:
    """The ready PixCell-1024 (``kind="pixcell"``) or UNI-2h (``"uni2h"``) folder in
    ``$HISTOSTUDIO_MODELS`` or beside the staining release; one line naming the download if absent."""
    from studio.published import find_published

    roots = _search_roots(Path(checkpoint))
    waiting = None
    for root in roots:
        for model in find_published(root):
            if model.kind != kind or (kind == "pixcell" and "16 UNI tokens" not in model.detail):
                continue
            if model.ready or model.status.startswith("needs the SD3.5 VAE"):  # resolve_vae names that download
                return model.path
            waiting = waiting or model
    if waiting is not None:
        raise WeightsError(waiting.path, f"found but not ready: {waiting.status}")
    what, source = (("PixCell-1024", PIXCELL_1024_SOURCE) if kind == "pixcell" else ("UNI-2h", UNI2H_SOURCE))
    place = " or ".join(str(r) for r in roots)
    raise WeightsError(Path(checkpoint), f"PixCell virtual staining needs {what}: download it from {source} "
                                         f"into {place} (or set $HISTOSTUDIO_MODELS)")


def check_release(checkpoint: str | Path, stain: str) -> dict[str, Path]:
    """Every file ``--model pixcell`` needs, found without loading weights (so a missing piece
    is refused before a job writes anything): LoRA, flow MLP, PixCell-1024, its SD3.5 VAE, UNI-2h."""
    from pipelines.pixcell import resolve_vae

    lora, mlp = staining_files(checkpoint, stain)
    pixcell = find_published_piece(checkpoint, "pixcell")
    return {"lora": lora, "flow": mlp, "pixcell": pixcell, "vae": resolve_vae(pixcell),
            "uni2h": find_published_piece(checkpoint, "uni2h")}


# --------------------------------------------------------------------------- pipeline
class PixCellStainingPipeline:
    r"""H&E tile -> IHC tile with PixCell-1024, its staining LoRA and flow MLP.

    Components:
        pixcell ([`~pipelines.pixcell.PixCellPipeline`]): PixCell-1024 (LoRA merged) + SD3.5 VAE + scheduler.
        encoder ([`~pipelines.uni2h.UNI2hEncoder`]): UNI-2h, one token per crop of a 4x4 grid.
        flow ([`FlowMLP`]): H&E token -> IHC token.

    Examples:
        >>> pipe = PixCellStainingPipeline.from_release("/models/pixcell-virtual-staining", "her2")
        >>> ihc = pipe(tiles, num_inference_steps=20, generator=torch.Generator().manual_seed(0))  # (B,3,H,W)
    """

    def __init__(self, pixcell: Any, encoder: Any, flow: FlowMLP, stain: str, files: dict[str, str]):
        self.pixcell, self.encoder, self.flow, self.stain, self.files = pixcell, encoder, flow, stain, files

    @classmethod
    def from_release(cls, checkpoint: str | Path, stain: str, device: str | torch.device = "cpu",
                     pixcell: str | Path | None = None, uni2h: str | Path | None = None) -> PixCellStainingPipeline:
        """Load every piece from local folders (no network); every missing piece is one error naming it."""
        from pipelines.pixcell import PixCellPipeline
        from pipelines.uni2h import UNI2hEncoder

        lora_file, mlp_file = staining_files(checkpoint, stain)
        lora = lora_pairs(read_tensors(lora_file), lora_file)
        flow = FlowMLP.from_state_dict(read_tensors(mlp_file), mlp_file)
        pixcell_dir = Path(pixcell) if pixcell else find_published_piece(checkpoint, "pixcell")
        uni_dir = Path(uni2h) if uni2h else find_published_piece(checkpoint, "uni2h")
        pipe = PixCellPipeline.from_pretrained(pixcell_dir)
        tokens = int(pipe.transformer.config.caption_num_tokens)
        if tokens != 16:
            raise WeightsError(pixcell_dir, f"takes {tokens} UNI token(s); the staining LoRA is for PixCell-1024 "
                                            f"(16 tokens): download {PIXCELL_1024_SOURCE}")
        merge_lora(pipe.transformer, lora, lora_file)
        encoder = UNI2hEncoder.from_folder(uni_dir, device=device)
        width = int(pipe.transformer.config.caption_channels)
        if encoder.dim != width or flow.config.in_channels != width or flow.config.out_channels != width:
            raise WeightsError(mlp_file, f"flow MLP {flow.config.in_channels}->{flow.config.out_channels}, UNI-2h "
                                         f"{encoder.dim}, PixCell {width}: the widths must agree")
        pipe.to(device)
        files = {"lora": str(lora_file), "flow": str(mlp_file), "pixcell": str(pixcell_dir), "uni2h": str(uni_dir)}
        return cls(pipe, encoder, flow.to(device), stain, files)

    @property
    def native_size(self) -> int:
        return int(self.pixcell.native_size)

    @property
    def token_pixels(self) -> int:
        """Pixels per UNI token (256 for PixCell-1024: a 4x4 grid of crops)."""
        return self.native_size // 4

    def canvas_for(self, height: int, width: int) -> tuple[int, int] | None:
        """The canvas a ``height x width`` input is reflect-padded to, keeping its magnification:
        whole 256 px token cells, at least the native 1024 px; None when the input is under half of
        that in either side (too small to pad: it is resized to the native size instead)."""
        tp = self.token_pixels
        ch, cw = (max(self.native_size, -(-side // tp) * tp) for side in (height, width))
        return (ch, cw) if 2 * height > ch and 2 * width > cw else None

    @torch.no_grad()
    def ihc_tokens(self, tiles: torch.Tensor, grid: tuple[int, int] = (4, 4), flow_steps: int = FLOW_STEPS,
                   match_norm: bool = True) -> torch.Tensor:
        """UNI-2h tokens of the ``grid`` of crops of ``tiles``, moved by the flow MLP to IHC tokens.

        ``match_norm`` rescales each tile's flowed tokens to the mean norm of its H&E tokens, as the
        release's inference scripts do (the flow's Euler end point drifts in scale)."""
        he = self.encoder.embed(tiles, grid=grid)
        ihc = self.flow.integrate(he, flow_steps).cpu()
        if match_norm:
            ihc = ihc * (he.norm(dim=-1).mean(-1, keepdim=True) / (ihc.norm(dim=-1).mean(-1, keepdim=True) + 1e-6)
                         )[..., None]
        return ihc

    @torch.no_grad()
    def __call__(self, tiles: torch.Tensor, num_inference_steps: int = 20, guidance_scale: float = GUIDANCE,
                 generator: torch.Generator | None = None, flow_steps: int = FLOW_STEPS) -> torch.Tensor:
        """Float RGB ``(B, 3, H, W)`` in [0, 1] -> IHC ``(B, 3, H, W)``.

        1. fit the input to whole 256 px token cells: reflect-pad it (magnification kept) to at
           least 1024 px, or -- a tile under half that -- resize it to 1024 px;
        2. UNI-2h tokens of each 256 px crop -> flow MLP (Euler) -> IHC tokens;
        3. sample PixCell-1024 + LoRA on them (CFG against the learned null embedding); canvases
           larger than 1024 px run PixCell's one-canvas mode (overlapping 1024 px windows);
        4. crop (or resize) back to ``H x W``.
        """
        h, w = tiles.shape[-2:]
        x = tiles.float()
        canvas = self.canvas_for(h, w)
        if canvas is None:
            size = (self.native_size, self.native_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        else:
            size = canvas
            x = F.pad(x, (0, canvas[1] - w, 0, canvas[0] - h), mode="reflect") if canvas != (h, w) else x
        grid = (size[0] // self.token_pixels, size[1] // self.token_pixels)
        tokens = self.ihc_tokens(x, grid, flow_steps)
        out = self.pixcell(tokens, height=size[0], width=size[1], grid=grid, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, generator=generator, output_type="pt",
                           progress=False).images.float().cpu()
        if canvas is None:
            out = F.interpolate(out, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return out[..., :h, :w].clamp(0, 1)


# --------------------------------------------------------------------------- slide job
class PixCellStainingTransform:
    """:class:`PixCellStainingPipeline` as the translate job's tile transform (seeded per batch)."""

    pixelwise = False
    command = "translate"
    skip_blank = True  # glass / black / featureless tiles are copied through, as for the shipped models

    def __init__(self, pipe: PixCellStainingPipeline, *, steps: int = 20, seed: int = 0, halo: int = 32,
                 checkpoint: str = "", flow_steps: int = FLOW_STEPS, guidance: float = GUIDANCE):
        self.pipe, self.steps, self.seed, self.halo, self.checkpoint = pipe, steps, seed, halo, checkpoint
        self.flow_steps, self.guidance = flow_steps, guidance

    @property
    def name(self) -> str:
        return f"virtual-{self.pipe.stain}-pixcell"

    def estimate(self, tiles):
        from studio.stain.kind import check_he_sample

        check_he_sample(list(tiles))
        return None

    def check(self, image: np.ndarray, name: str) -> None:
        from studio.io import to_tensor
        from studio.stain.kind import check_he

        check_he(to_tensor(image[None]), what=name)

    def apply(self, tiles: np.ndarray, source=None) -> np.ndarray:
        from studio.io import to_tensor, to_uint8

        out = self.pipe(to_tensor(tiles), num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=torch.Generator().manual_seed(self.seed), flow_steps=self.flow_steps)
        return to_uint8(out)

    def describe(self) -> dict:
        return {"stain": self.pipe.stain, "model": "pixcell", "checkpoint": self.checkpoint, "steps": self.steps,
                "flow_steps": self.flow_steps, "guidance": self.guidance, "seed": self.seed, "halo": self.halo,
                **{f"{k}_file": v for k, v in self.pipe.files.items()}}


def create_pixcell_staining_transform(stain: str, checkpoint: str, steps: int = 20, seed: int = 0, halo: int = 32,
                                      device: str | None = "cpu") -> PixCellStainingTransform:
    """What a translate worker builds from the spec (``--model pixcell``)."""
    from pipelines.segment_job import resolve_device

    pipe = PixCellStainingPipeline.from_release(checkpoint, stain, device=resolve_device(device))
    return PixCellStainingTransform(pipe, steps=steps, seed=seed, halo=halo, checkpoint=str(checkpoint))

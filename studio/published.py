"""Published models a user downloaded (PixCell, UNI-2h, the SD3.5 VAE), found in a models folder.

The studio never downloads weights. A user puts the released folders under one models
folder (``$HISTOSTUDIO_MODELS`` or ``--models-dir``), e.g.::

    /models/PixCell-256/      model_index.json, scheduler/, transformer/, vae/ (config only)
    /models/PixCell-1024/
    /models/UNI2-h/           config.json, model.safetensors (converted from pytorch_model.bin)
    /models/sd3.5-vae/        config.json, diffusion_pytorch_model.safetensors

and ``histostudio info`` lists what it found and what is still missing. Folders are
recognised by their published layout (configs and class names), never by their names,
and nothing here imports torch or the pipelines: it only reads JSON and file sizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "HISTOSTUDIO_MODELS"
SD35_VAE_SOURCE = "stabilityai/stable-diffusion-3.5-large (subfolder vae/; gated, Stability AI Community License)"
# vae/config.json of stabilityai/stable-diffusion-3.5-large: what PixCell decodes with. The
# shapes (16 latent channels, /8) are what a random-weight stand-in needs for timing and tests.
SD35_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.31.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}
SOURCES = {
    "pixcell": "StonyBrook-CVLab/PixCell-256 or PixCell-1024 (HF card: Apache-2.0; GitHub LICENSE: CC-BY-NC-4.0)",
    "pixcell-controlnet": "StonyBrook-CVLab/PixCell-256-Cell-ControlNet",
    "uni2h": "MahmoodLab/UNI2-h (gated, CC-BY-NC-ND 4.0)",
    "sd35-vae": SD35_VAE_SOURCE,
    "pixcell-staining": "StonyBrook-CVLab/pixcell-virtual-staining (LoRA + flow MLP per stain, for PixCell-1024)",
    "stainfuser": "R-J/StainFuser (Apache-2.0; configs from GitHub R-J96/stainFuser src/configs/)",
}
PIXCELL_CLASSES = ("PixCellTransformer2DModel", "PixCellTransformer2DModelControlNet")
STAINFUSER_MODULES = ("encoder", "conditioner", "noise_predictor")
STAINFUSER_CONFIG = "sd21b_unet_config.json"


@dataclass
class PublishedModel:
    """One recognised folder: what it is, whether it can run, where it came from."""

    name: str
    kind: str  # "pixcell", "pixcell-controlnet", "uni2h", "sd35-vae" or "stainfuser"
    path: Path
    status: str  # "ready", or the missing piece in words
    detail: str
    size_mb: float

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def source(self) -> str:
        return SOURCES[self.kind]


def models_dir(explicit: str | Path | None = None) -> Path | None:
    """The models folder: ``explicit`` (``--models-dir``), else ``$HISTOSTUDIO_MODELS``, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV)
    return Path(env) if env else None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def is_sd35_vae(folder: Path) -> bool:
    """An ``AutoencoderKL`` config with SD3's 16 latent channels (weights checked separately)."""
    data = _json(folder / "config.json")
    return bool(data) and data.get("_class_name") == "AutoencoderKL" and data.get("latent_channels") == 16


def is_pixcell(folder: Path) -> bool:
    """A diffusers folder whose transformer is PixCell's (by the class name the release records)."""
    index = _json(folder / "model_index.json")
    if not index:
        return False
    entry = index.get("transformer")
    return isinstance(entry, list) and len(entry) == 2 and entry[1] in PIXCELL_CLASSES


def is_timm_vit(folder: Path) -> bool:
    """A timm hub config (``architecture`` vit_*), as UNI-2h's release has."""
    data = _json(folder / "config.json")
    return bool(data) and str(data.get("architecture", "")).startswith("vit_") and "_class_name" not in data


def find_sd35_vae(roots: list[Path]) -> Path | None:
    """The first SD3.5 VAE folder with weights directly under any of ``roots`` (``x/vae`` counts)."""
    for root in roots:
        if not Path(root).is_dir():
            continue
        for child in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if is_pixcell(child):  # PixCell's own vae/ is a config without weights
                continue
            for folder in (child, child / "vae"):
                if is_sd35_vae(folder) and _has_weights(folder):
                    return folder
    return None


def _pixcell(folder: Path, roots: list[Path]) -> PublishedModel:
    index = _json(folder / "model_index.json") or {}
    kind = "pixcell-controlnet" if "controlnet" in index else "pixcell"
    config = _json(folder / "transformer" / "config.json") or {}
    tokens = int(config.get("caption_num_tokens", 1))
    pixels = int(config.get("sample_size", 32)) * 8
    detail = f"{pixels} px, {tokens} UNI token{'s' if tokens > 1 else ''}"
    if not _has_weights(folder / "transformer"):
        status = "transformer/diffusion_pytorch_model.safetensors missing"
    elif _has_weights(folder / "vae") or find_sd35_vae(roots):
        status = "ready"
    else:
        status = "needs the SD3.5 VAE (vae/ holds only a config)"
    if kind == "pixcell-controlnet":  # generate rare --checkpoint; the base may sit beside it as PixCell-256
        detail += ", cell-mask ControlNet (generate rare)"
        base_beside = any(is_pixcell(c) and "controlnet" not in (_json(c / "model_index.json") or {})
                          and _has_weights(c / "transformer")
                          for r in roots if Path(r).is_dir() for c in Path(r).iterdir() if c.is_dir())
        if not _has_weights(folder / "controlnet"):
            status = "controlnet/diffusion_pytorch_model.safetensors missing"
        elif status.startswith("transformer/") and base_beside:
            status = "ready" if _has_weights(folder / "vae") or find_sd35_vae(roots) else \
                "needs the SD3.5 VAE (vae/ holds only a config)"
    return PublishedModel(folder.name, kind, folder, status, detail, _size_mb(folder))


def _uni2h(folder: Path) -> PublishedModel:
    data = _json(folder / "config.json") or {}
    args = data.get("model_args", {}) or {}
    detail = f"timm {data.get('architecture')}, dim {args.get('embed_dim', data.get('num_features', '?'))}"
    if _has_weights(folder):
        status = "ready"
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        status = "convert pytorch_model.bin: histostudio convert (see README)"
    else:
        status = "no weights"
    return PublishedModel(folder.name, "uni2h", folder, status, detail, _size_mb(folder))


def _pixcell_staining(folder: Path) -> PublishedModel:
    """The virtual-staining release: ``ckpts/lora/<name>_lora.*`` + ``ckpts/mlp/<name>_mlp.*`` per stain."""
    def stems(sub: str, tail: str) -> set[str]:
        files = [*(folder / "ckpts" / sub).glob(f"*{tail}.pth"), *(folder / "ckpts" / sub).glob(f"*{tail}.safetensors")]
        return {f.stem[: -len(tail)] for f in files}

    both = sorted(stems("lora", "_lora") & stems("mlp", "_mlp"))
    status = "ready" if both else "no stain with both ckpts/lora/<name>_lora and ckpts/mlp/<name>_mlp"
    detail = f"stains: {', '.join(both) or 'none'} (needs PixCell-1024 and UNI-2h)"
    return PublishedModel(folder.name, "pixcell-staining", folder, status, detail, _size_mb(folder))


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header (no torch); [] when it cannot be read."""
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= path.stat().st_size - 8:
                return []
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def _is_stainfuser_file(path: Path) -> bool:
    heads = {k.removeprefix("module.").split(".", 1)[0] for k in _safetensors_keys(path)}
    return set(STAINFUSER_MODULES) <= heads


def _stainfuser(path: Path) -> PublishedModel | None:
    """The published StainFuser state dict: a file, or a folder holding it (and the release's
    ``sd21b_*_config.json``); a ``.pth`` counts only beside those configs or when named directly
    (it is read with ``torch.load(weights_only=True)`` at load time)."""
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    tensors = [f for f in files if f.suffix == ".safetensors" and _is_stainfuser_file(f)]
    configs = (folder / STAINFUSER_CONFIG).is_file()
    pickles = [f for f in files if f.suffix in (".pth", ".pt")] if configs or path.is_file() else []
    if not tensors and not pickles and not (configs and path.is_dir()):
        return None
    chosen = (tensors or pickles)[:1]
    status = "ready" if chosen else "no weights (.safetensors or .pth)"
    detail = f"SD2.1-base UNet + ControlNet, {chosen[0].name if chosen else 'no weights'}, " + (
        "release configs" if configs else "built-in SD2.1-base configs")
    return PublishedModel(path.name, "stainfuser", path, status, detail, sum(f.stat().st_size for f in files) / 2**20)


def classify(folder: Path, roots: list[Path] | None = None) -> PublishedModel | None:
    """What published model ``folder`` holds, or None."""
    folder = Path(folder)
    roots = roots if roots is not None else [folder.parent]
    if is_pixcell(folder):
        return _pixcell(folder, roots)
    if is_sd35_vae(folder):
        data = _json(folder / "config.json") or {}
        status = "ready" if _has_weights(folder) else "config only (weights missing)"
        detail = f"scaling {data.get('scaling_factor')}, shift {data.get('shift_factor')}"
        return PublishedModel(folder.name, "sd35-vae", folder, status, detail, _size_mb(folder))
    if (folder / "vae").is_dir() and not (folder / "model_index.json").is_file() and is_sd35_vae(folder / "vae"):
        found = classify(folder / "vae", roots)  # e.g. stable-diffusion-3.5-large/vae downloaded alone
        if found:
            found.name = f"{folder.name}/vae"
        return found
    if (folder / "ckpts" / "lora").is_dir():
        return _pixcell_staining(folder)
    if is_timm_vit(folder):
        return _uni2h(folder)
    if folder.is_file() or (folder.is_dir() and not (folder / "model_index.json").is_file()):
        return _stainfuser(folder)
    return None


def find_published(root: str | Path | None) -> list[PublishedModel]:
    """Every recognised model folder directly under ``root`` (or one level deeper, e.g. ``org/name``)."""
    if root is None:
        return []
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[PublishedModel] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model = classify(child, [root])
        if model is None:
            model_list = [classify(g, [root, child]) for g in sorted(child.iterdir()) if g.is_dir()]
            found.extend(m for m in model_list if m is not None)
        else:
            found.append(model)
    return found

"""Self-supervised (SSL) tile encoders behind one interface: ``embed(tiles) -> (B, N, D)``.

Generation in this studio is conditioned on what a foundation model "sees" in a tile
(PixCell conditions on UNI tokens, Graikos et al. on HIPT/iBOT embeddings). Any encoder
works if it maps float RGB tiles ``(B, 3, H, W)`` in [0, 1] to tokens:

* ``grid=None``: one global embedding per tile, ``N = 1``;
* ``grid=(gh, gw)``: a row-major grid of local embeddings, ``N = gh * gw`` (PixCell-1024
  uses 16 tokens per image; a 4x4 grid turns generation into structured decoding).

Back-ends, all loaded from local files (nothing is downloaded):

* **built-in** (:class:`PatchEncoder`): a small CNN the studio trains itself with SimCLR on
  real tissue (``training/ssl_encoder.py``); it embeds 64x64-pixel patches, so a tile's
  grid tokens are the embeddings of its patches and the global token is their mean.
* **transformers** (:class:`TransformersEncoder`): any Hugging Face vision model folder,
  e.g. Phikon (a ViT-B/16 trained with iBOT on TCGA) downloaded separately; CLS token for
  the global embedding, patch tokens average-pooled onto the grid.
* **UNI-2h** (:class:`pipelines.uni2h.UNI2hEncoder`, ``uni2h:FOLDER``): MahmoodLab's
  release rebuilt in plain torch under timm's parameter names, what PixCell is conditioned on.
* **timm** (:class:`TimmEncoder`, optional): UNI, Virchow and other timm architectures by
  name plus a local weights file. timm imports torchvision; install both only with a
  matching (e.g. CUDA) torch build.

:class:`EmbeddingCache` stores embeddings on disk keyed by a hash of the tile's pixels and
the encoder's identity, so re-embedding a dataset is free.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from studio.errors import InputError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class Encoder(Protocol):
    """What pipelines need from an encoder."""

    dim: int
    identity: str  # changes whenever the weights change (keys the embedding cache)

    def embed(self, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, N, D)`` float32."""


def check_tiles(tiles: torch.Tensor) -> torch.Tensor:
    if not isinstance(tiles, torch.Tensor) or tiles.ndim != 4 or tiles.shape[1] != 3:
        shape = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
        raise InputError("tiles", f"{shape}; expected a float tensor (B, 3, H, W) in [0, 1]")
    if not tiles.is_floating_point():
        raise InputError("tiles", f"dtype {tiles.dtype}; expected float in [0, 1] (use studio.io.to_tensor)")
    return tiles


def pool_to_grid(tokens: torch.Tensor, hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``(B, h*w, D)`` on an ``hw`` grid -> ``(B, gh*gw, D)`` by area pooling."""
    b, n, d = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, d, hw[0], hw[1])
    pooled = F.adaptive_avg_pool2d(maps, grid)
    return pooled.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- built-in
class PatchEncoder(ModelMixin, ConfigMixin):
    """A small CNN embedding 64x64 H&E patches (about 0.4 M parameters).

    Five stride-2 stages (64 -> 2 pixels), global average pooling, a linear layer to
    ``embed_dim``; trained with SimCLR's contrastive loss so that two augmentations of the
    same patch (stain jitter, flips, rotations, blur) land close together.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 64, channels: tuple[int, ...] = (32, 48, 64, 96, 128), patch_size: int = 64,
                 mean: tuple[float, ...] = (0.70, 0.52, 0.70), std: tuple[float, ...] = (0.17, 0.2, 0.15)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, embed_dim)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, 3, p, p)`` in [0, 1] -> ``(B, embed_dim)``."""
        x = (patches - self.pixel_mean) / self.pixel_std
        return self.head(self.features(x).mean(dim=(2, 3)))


class BuiltinEncoder:
    """The studio's own :class:`PatchEncoder` as an :class:`Encoder`.

    A tile is cut into ``patch_size`` patches (the tile is resized first when its sides
    are not a multiple of it); grid tokens pool the patch embeddings onto the requested
    grid, the global token is their mean.
    """

    def __init__(self, model: PatchEncoder, identity: str, device: str | torch.device | None = None):
        self.model = model.eval().to(device or "cpu")
        self.identity = identity
        self.dim = int(model.config.embed_dim)
        self.patch = int(model.config.patch_size)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None) -> BuiltinEncoder:
        folder = Path(folder)
        model = load_model_folder(PatchEncoder, folder)
        return cls(model, identity=f"builtin:{weights_digest(folder)}", device=device)

    @torch.no_grad()
    def patch_tokens(self, tiles: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One token per ``stride`` pixels (default: per patch, no overlap). A finer
        ``stride`` embeds a ``patch_size`` window centred on every ``stride`` cell (the tile
        reflect-padded by half the difference), so each token still sees a whole patch."""
        tiles = check_tiles(tiles).to(next(self.model.parameters()).device, torch.float32)
        b, _, h, w = tiles.shape
        step = stride or self.patch
        if step > self.patch or self.patch % step:
            raise InputError("token stride", f"{step} px; use a divisor of the encoder's {self.patch} px patch")
        ph, pw = max(1, round(h / step)), max(1, round(w / step))
        if (h, w) != (ph * step, pw * step):
            tiles = F.interpolate(tiles, size=(ph * step, pw * step), mode="area")
        pad = (self.patch - step) // 2
        if pad:
            tiles = F.pad(tiles, (pad, pad, pad, pad), mode="reflect")
        patches = tiles.unfold(2, self.patch, step).unfold(3, self.patch, step)  # B,3,ph,pw,p,p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ph * pw, 3, self.patch, self.patch)
        tokens = torch.cat([self.model(patches[i:i + 256]) for i in range(0, len(patches), 256)])
        return tokens.reshape(b, ph * pw, self.dim), (ph, pw)

    def embed(self, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Global token (``grid=None``) or tokens on ``grid``. A grid finer than one token
        per patch (e.g. one per 32 px, ``token_pixels: 32``) is computed from overlapping
        windows at that pitch (:meth:`patch_tokens`), not by repeating coarse tokens."""
        stride = None
        if grid is not None:
            h, w = tiles.shape[-2:]
            native = (max(1, round(h / self.patch)), max(1, round(w / self.patch)))
            if grid[0] > native[0] or grid[1] > native[1]:
                pitch = min(h // grid[0], w // grid[1])
                stride = max(d for d in range(1, self.patch + 1) if self.patch % d == 0 and d <= max(1, pitch))
        tokens, hw = self.patch_tokens(tiles, stride)
        if grid is None:
            return tokens.mean(dim=1, keepdim=True)
        return pool_to_grid(tokens, hw, grid) if tuple(grid) != hw else tokens


# --------------------------------------------------------------------------- transformers
class TransformersEncoder:
    """A Hugging Face vision backbone from a local folder (``AutoModel``, no download).

    Tiles are resized to the model's ``image_size`` and normalised with the folder's
    ``preprocessor_config.json`` mean/std (ImageNet's when absent). Global embedding: the
    CLS token (``pooler_output`` when the model has one); grid: patch tokens pooled.
    """

    def __init__(self, folder: str | Path, device: str | torch.device | None = None):
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as exc:
            raise InputError("transformers encoder", "needs the 'encoders' extra (pip install transformers)") from exc
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsError(folder, "is not a transformers model folder (no config.json)")
        if not any(folder.glob("*.safetensors")):
            raise WeightsError(folder, "holds no .safetensors weights (only safetensors are loaded, never pickles)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        except Exception as exc:
            raise WeightsError(folder, f"cannot load the transformers model ({type(exc).__name__}: {exc})") from exc
        self.model.to(device or "cpu")
        size = getattr(config, "image_size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.patch = getattr(config, "patch_size", 16)
        self.dim = int(getattr(config, "hidden_size", 0) or getattr(config, "embed_dim", 0))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            spec = json.loads(pre.read_text())
            mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.identity = f"transformers:{weights_digest(folder)}"

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        tiles = check_tiles(tiles)
        device = next(self.model.parameters()).device
        x = F.interpolate(tiles.float(), size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).to(device)
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state  # (B, 1 + P (+ registers), D)
        hp, wp = self.image_size[0] // self.patch, self.image_size[1] // self.patch
        patches = hidden[:, -hp * wp:]
        if grid is None:
            pooled = getattr(out, "pooler_output", None)
            glob = pooled if pooled is not None and pooled.ndim == 2 else hidden[:, 0]
            return glob.unsqueeze(1).float()
        return pool_to_grid(patches, (hp, wp), grid).float()


# --------------------------------------------------------------------------- timm
class TimmEncoder:
    """A timm architecture by name with weights from a local file (UNI, Virchow, ...)."""

    def __init__(self, architecture: str, weights: str | Path, device: str | torch.device | None = None,
                 **create_kwargs):
        try:
            import timm
        except ImportError as exc:
            raise InputError("timm encoder", "needs timm (and torchvision) installed with a matching torch") from exc
        weights = Path(weights)
        state = load_state_dict(weights)
        try:
            self.model = timm.create_model(architecture, pretrained=False, num_classes=0, **create_kwargs)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except Exception as exc:
            raise WeightsError(weights, f"does not fit timm '{architecture}' ({exc})") from exc
        if missing:
            raise WeightsError(weights, f"lacks {len(missing)} parameters of '{architecture}', e.g. {missing[:3]}")
        self.model.eval().to(device or "cpu")
        cfg = self.model.pretrained_cfg
        self.image_size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        self.mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1)
        self.dim = int(self.model.num_features)
        self.prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        self.identity = f"timm:{architecture}:{file_digest(weights)}"

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        tiles = check_tiles(tiles)
        x = F.interpolate(tiles.float(), size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).device)
        feats = self.model.forward_features(x)
        if grid is None:
            return self.model.forward_head(feats, pre_logits=True).unsqueeze(1).float()
        patches = feats[:, self.prefix:]
        side = int(math.isqrt(patches.shape[1]))
        return pool_to_grid(patches, (side, side), grid).float()


# --------------------------------------------------------------------------- loading
def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def weights_digest(folder: Path) -> str:
    """Identity of a model folder: its weights and its configuration, not where it was saved
    from (diffusers' ``_name_or_path`` is dropped, so exporting a model elsewhere keeps it)."""
    parts = [file_digest(f) for f in sorted(folder.glob("*.safetensors"))]
    for config in sorted(folder.glob("config.json")):
        data = json.loads(config.read_text())
        data.pop("_name_or_path", None)
        parts.append(hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest())
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` (or, for third-party checkpoints, a tensors-only torch
    file opened with ``weights_only=True``: never an arbitrary unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(path, f"is not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(path, f"cannot be read as a tensors-only checkpoint ({type(exc).__name__}); "
                                 "convert it to .safetensors") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_model_folder(cls: type[ModelMixin], folder: Path) -> ModelMixin:
    """``cls.from_pretrained`` on a local diffusers-layout folder, with errors that say what
    is wrong (missing folder, no config, non-safetensors weights, mismatched shapes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(folder, "no such model folder")
    if not (folder / "config.json").is_file():
        raise WeightsError(folder, "has no config.json (not a diffusers model folder)")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        others = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        hint = f" (found {', '.join(others)}: pickled formats are not loaded)" if others else ""
        raise WeightsError(folder, f"has no .safetensors weights{hint}")
    try:
        from pipelines.loading import dtype_kwargs

        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False,
                                   **dtype_kwargs(torch.float32))
    except Exception as exc:
        from pipelines.loading import loading_failure

        raise WeightsError(folder, f"cannot load {cls.__name__} ({loading_failure(exc)})") from exc


def load_encoder(spec: str | Path, device: str | torch.device | None = None) -> Encoder:
    """An encoder from a spec string.

    * a folder with a :class:`PatchEncoder` config -> built-in encoder;
    * a folder with a Hugging Face ``config.json`` (``model_type``) -> transformers;
    * ``timm:ARCHITECTURE:WEIGHTS_FILE`` -> timm;
    * ``uni2h:FOLDER`` (or a folder with UNI-2h's timm ``config.json``) -> UNI-2h in plain
      torch (:mod:`pipelines.uni2h`, no timm);
    * ``builtin`` -> the shipped demo encoder (``checkpoints/ssl-encoder``).
    """
    text = str(spec)
    if text == "builtin":
        from studio.info import checkpoints_dir

        return BuiltinEncoder.from_pretrained(checkpoints_dir() / "ssl-encoder", device=device)
    if text.startswith("timm:"):
        _, arch, weights = text.split(":", 2)
        return TimmEncoder(arch, weights, device=device)
    if text.startswith("uni2h:"):
        from pipelines.uni2h import UNI2hEncoder

        return UNI2hEncoder.from_folder(text[len("uni2h:"):], device=device)
    folder = Path(text)
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError(folder, "is not an encoder folder (no config.json); use a folder, 'builtin' or "
                                   "'timm:ARCH:WEIGHTS'")
    data = json.loads(config.read_text())
    if data.get("_class_name") == "PatchEncoder":
        return BuiltinEncoder.from_pretrained(folder, device=device)
    if "model_type" in data:
        return TransformersEncoder(folder, device=device)
    if str(data.get("architecture", "")).startswith("vit_"):  # a timm hub config, as UNI-2h's release has
        from pipelines.uni2h import UNI2hEncoder

        return UNI2hEncoder.from_folder(folder, device=device)
    raise WeightsError(config, "is neither a PatchEncoder nor a transformers config")


# --------------------------------------------------------------------------- cache
class EmbeddingCache:
    """On-disk embeddings keyed by (encoder identity, grid, tile pixels).

    One ``.npy`` per tile under ``folder/<encoder>/<grid>/<hash[:2]>/<hash>.npy``; writes are
    atomic, so concurrent runs never read half a file.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, encoder: Encoder, grid: tuple[int, int] | None, tile: np.ndarray) -> Path:
        digest = hashlib.sha256(np.ascontiguousarray(tile).tobytes() + str(tile.shape).encode()).hexdigest()
        enc = encoder.identity.replace(":", "_").replace("/", "_")
        g = "global" if grid is None else f"{grid[0]}x{grid[1]}"
        return self.folder / enc / g / digest[:2] / f"{digest}.npy"

    def embed(self, encoder: Encoder, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Embeddings of ``tiles``, computing only those not cached yet."""
        from studio.io import load_npy, save_npy, to_uint8

        keys = [self._path(encoder, grid, t) for t in to_uint8(check_tiles(tiles))]
        out: list[torch.Tensor | None] = [None] * len(keys)
        missing = []
        for i, path in enumerate(keys):
            if path.is_file():
                out[i] = torch.from_numpy(np.array(load_npy(path, mmap=False)))
            else:
                missing.append(i)
        if missing:
            fresh = encoder.embed(tiles[missing], grid).cpu()
            for j, i in enumerate(missing):
                save_npy(keys[i], fresh[j].numpy())
                out[i] = fresh[j]
        return torch.stack(out)  # type: ignore[arg-type]

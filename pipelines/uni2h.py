"""UNI-2h (MahmoodLab) in plain torch, loading the published timm weights by name.

PixCell is conditioned on UNI-2h embeddings, so the studio needs UNI-2h itself. The
release is a timm ``VisionTransformer``; timm imports torchvision, which cannot sit beside
the CPU torch wheel the studio installs. This file builds the same network from torch
modules whose attribute names *are* timm's parameter names, so the published state dict
loads with ``strict=True`` and nothing is renamed:

* ``patch_embed.proj``: Conv2d(3, D, 14, stride 14) with bias;
* ``pos_embed`` ``(1, P, D)``: patches only (timm's ``no_embed_class``), added *before*
  ``cls_token`` ``(1, 1, D)`` and the 8 ``reg_token`` ``(1, 8, D)`` are prepended;
* ``blocks.N``: pre-norm ``norm1`` -> ``attn.qkv`` (Linear(D, 3D), bias) -> attention
  (head dim 64) -> ``attn.proj`` -> ``ls1.gamma``; ``norm2`` -> packed SwiGLU ``mlp.fc1``
  (Linear(D, 2H)), halves ``x1, x2`` -> ``SiLU(x1) * x2`` (timm's ``gate_last=False``) ->
  ``mlp.fc2`` (Linear(H, D)) -> ``ls2.gamma``; LayerNorms with eps 1e-6;
* ``norm``: the final LayerNorm; the embedding is its CLS token (timm ``global_pool='token'``,
  ``num_classes=0``).

Preprocessing follows the release: resize to 224 px, ImageNet mean/std. One embedding per
256 px crop is what PixCell was trained on; :meth:`UNI2hEncoder.embed` with a grid cuts the
tile into that many crops (row-major), as PixCell's feature extraction does.

Weights come from a local folder holding the release's ``config.json`` and
``model.safetensors``. The release ships ``pytorch_model.bin`` (a pickle); the studio never
unpickles it at load time: ``histostudio convert UNI2-h/pytorch_model.bin --out
UNI2-h/model.safetensors`` does that once, tensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What MahmoodLab's model card passes to timm.create_model (the release's config.json may
# omit them, since the card passes them explicitly).
PUBLISHED_ARGS: dict[str, Any] = {
    "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, "mlp_layer": "timm.layers.SwiGLUPacked",
    "act_layer": "torch.nn.SiLU", "reg_tokens": 8, "dynamic_img_size": True,
}
DOWNLOAD_HINT = ("download config.json and pytorch_model.bin from Hugging Face MahmoodLab/UNI2-h (gated, "
                 "CC-BY-NC-ND 4.0), then run histostudio convert on the .bin")


@dataclass(frozen=True)
class UNI2hConfig:
    """The architecture numbers (timm's ``model_args`` names) of a UNI-2h-style ViT."""

    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 2.66667 * 2
    reg_tokens: int = 8
    init_values: float = 1e-5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def mlp_hidden(self) -> int:
        """``fc1`` output width (both SwiGLU halves), as timm computes it: ``int(D * ratio)``."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @classmethod
    def from_json(cls, path: Path) -> UNI2hConfig:
        """Read a timm ``config.json`` (``model_args`` + ``pretrained_cfg``, or the kwargs at top level).

        Raises:
            WeightsError: unreadable JSON, or a configuration that is not a UNI-2h-style ViT
                (another MLP, no register tokens, a class-token position embedding, ...).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(path, f"is not readable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise WeightsError(path, "is not a timm model config (expected a JSON object)")
        if "_class_name" in data or "model_type" in data:
            kind = data.get("_class_name") or data.get("model_type")
            raise WeightsError(path, f"describes a {kind} model, not UNI-2h (a timm ViT config)")
        arch = str(data.get("architecture", "vit_giant_patch14_224"))
        if not arch.startswith("vit_"):
            raise WeightsError(path, f"describes timm '{arch}', not UNI-2h (a ViT)")
        args = {**PUBLISHED_ARGS, **data.get("model_args", {}),
                **{k: v for k, v in data.items() if k in PUBLISHED_ARGS}}
        mlp, act = str(args.get("mlp_layer")), str(args.get("act_layer"))
        if not mlp.endswith("SwiGLUPacked") or not act.endswith("SiLU"):
            raise WeightsError(path, f"mlp_layer {mlp} / act_layer {act}: UNI-2h uses SwiGLUPacked with SiLU")
        if not args.get("no_embed_class", False) or int(args.get("reg_tokens", 0)) < 1:
            raise WeightsError(path, "needs no_embed_class true and register tokens (UNI-2h's layout)")
        pre = data.get("pretrained_cfg", {}) or {}
        size = args.get("img_size", 224)
        config = cls(img_size=int(size[0] if isinstance(size, (list, tuple)) else size),
                     patch_size=int(args["patch_size"]), embed_dim=int(args["embed_dim"]), depth=int(args["depth"]),
                     num_heads=int(args["num_heads"]), mlp_ratio=float(args["mlp_ratio"]),
                     reg_tokens=int(args["reg_tokens"]), init_values=float(args.get("init_values") or 1e-5),
                     mean=tuple(pre.get("mean", IMAGENET_MEAN)), std=tuple(pre.get("std", IMAGENET_STD)))
        if config.embed_dim % config.num_heads or config.mlp_hidden % 2 or config.img_size % config.patch_size:
            raise WeightsError(path, f"inconsistent sizes (embed_dim {config.embed_dim}, num_heads "
                                     f"{config.num_heads}, hidden {config.mlp_hidden}, img_size {config.img_size})")
        return config

    def to_json(self) -> dict[str, Any]:
        """The config.json this architecture is published with (timm's hub format)."""
        args = {**PUBLISHED_ARGS, "img_size": self.img_size, "patch_size": self.patch_size, "depth": self.depth,
                "num_heads": self.num_heads, "init_values": self.init_values, "embed_dim": self.embed_dim,
                "mlp_ratio": self.mlp_ratio, "reg_tokens": self.reg_tokens}
        return {"architecture": "vit_giant_patch14_224", "num_classes": 0, "num_features": self.embed_dim,
                "global_pool": "token", "model_args": args,
                "pretrained_cfg": {"tag": "uni2-h", "custom_load": False, "input_size": [3, self.img_size,
                                                                                       self.img_size],
                                   "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
                                   "crop_mode": "center", "mean": list(self.mean), "std": list(self.std),
                                   "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
                                   "classifier": "head", "license": "cc-by-nc-nd-4.0"}}


def published_shapes(config: UNI2hConfig) -> dict[str, tuple[int, ...]]:
    """The explicit key map: every timm parameter name of UNI-2h and its shape.

    The loader checks a weights file against this list before loading, so a file from
    another model (or a config that disagrees with its weights) fails with a named key.
    """
    d, h, p = config.embed_dim, config.mlp_hidden, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d), "reg_token": (1, config.reg_tokens, d), "pos_embed": (1, config.grid ** 2, d),
        "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
    }
    for i in range(config.depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                   b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                   b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "ls1.gamma": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,),
                   b + "mlp.fc2.weight": (d, h // 2), b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    return shapes


# --------------------------------------------------------------------------- network
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, D), row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PackedSwiGLU(nn.Module):
    """timm's ``SwiGLUPacked``: one ``fc1`` for both halves, ``SiLU(first) * second``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, config: UNI2hConfig):
        super().__init__()
        d = config.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, config.num_heads)
        self.ls1 = LayerScale(d, config.init_values)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = PackedSwiGLU(d, config.mlp_hidden)
        self.ls2 = LayerScale(d, config.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class UNI2h(nn.Module):
    """The UNI-2h ViT: ``(B, 3, S, S)`` normalised pixels -> ``(B, D)`` CLS embeddings."""

    def __init__(self, config: UNI2hConfig | None = None):
        super().__init__()
        self.config = config = config or UNI2hConfig()
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, d))
        self.pos_embed = nn.Parameter(torch.randn(1, config.grid ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: ``(B, 1 + reg_tokens + P, D)`` (CLS, registers, patches)."""
        x = self.patch_embed(x)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input gives {x.shape[1]} patches; resize tiles to {self.config.img_size} px first")
        x = x + self.pos_embed
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


# --------------------------------------------------------------------------- loading
def is_uni2h_folder(folder: str | Path) -> bool:
    """A folder whose config.json is a timm ViT config with UNI-2h's layout."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        UNI2hConfig.from_json(config)
    except WeightsError:
        return False
    return True


def check_state_shapes(path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                       what: str) -> None:
    """Compare a weights file's names and shapes with a model's; one line naming the first difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing and len(missing) == len(expected):
        raise WeightsError(path, f"holds none of {what}'s parameters (e.g. '{missing[0]}' is absent; it has "
                                 f"'{next(iter(found), '')}'): weights of another model?")
    if missing:
        raise WeightsError(path, f"lacks {len(missing)} parameters of {what}, e.g. '{missing[0]}'")
    if unexpected:
        raise WeightsError(path, f"has {len(unexpected)} parameters {what} does not have, e.g. '{unexpected[0]}' "
                                 "(weights of another model?)")
    wrong = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise WeightsError(path, f"'{k}' is {tuple(found[k])} but the config implies {tuple(expected[k])} "
                                 f"({len(wrong)} shapes disagree: config and weights are from different models)")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header (no tensor is read); truncation is caught here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise WeightsError(path, f"is truncated or not a safetensors file ({exc}); download or convert it "
                                 "again") from exc


def find_weights(folder: Path, hint: str) -> Path:
    """The single ``.safetensors`` weights file of a folder; pickles get the convert command."""
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) == 1:
        return weights[0]
    if len(weights) > 1:
        names = ", ".join(p.name for p in weights)
        raise WeightsError(folder, f"holds several .safetensors files ({names}); keep one")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        src = pickles[0]
        raise WeightsError(folder, f"holds {src.name}, a pickle the studio does not unpickle; convert it once: "
                                   f"histostudio convert {src} --out {folder / 'model.safetensors'}")
    raise WeightsError(folder, f"has no weights; {hint}")


def load_uni2h(folder: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> UNI2h:
    """UNI-2h from a local folder (``config.json`` + one ``.safetensors``), every name checked."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(folder, f"no such UNI-2h folder; {DOWNLOAD_HINT}")
    if not (folder / "config.json").is_file():
        raise WeightsError(folder, f"has no config.json; {DOWNLOAD_HINT}")
    config = UNI2hConfig.from_json(folder / "config.json")
    weights = find_weights(folder, DOWNLOAD_HINT)
    check_state_shapes(weights, safetensors_shapes(weights), published_shapes(config), "UNI-2h")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise WeightsError(weights, f"cannot be read ({exc}); download or convert it again") from exc
    with init_empty_weights():
        model = UNI2h(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().to(device or "cpu")


class UNI2hEncoder:
    """UNI-2h as a studio :class:`~pipelines.encoders.Encoder` (``--encoder uni2h:/models/UNI2-h``).

    ``grid=None``: the whole tile resized to 224 px -> one CLS embedding ``(B, 1, D)``.
    ``grid=(gh, gw)``: the tile cut into ``gh x gw`` crops (row-major), each resized to
    224 px and embedded: PixCell-1024's 16 tokens are a 4x4 grid of 256 px crops.
    """

    batch = 32  # crops per forward pass (memory stays flat on large regions)

    def __init__(self, model: UNI2h, identity: str):
        self.model = model
        self.identity = identity
        self.dim = int(model.config.embed_dim)
        self.mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.config.std).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device | None = None) -> UNI2hEncoder:
        from pipelines.encoders import weights_digest

        model = load_uni2h(folder, device=device)
        return cls(model, identity=f"uni2h:{weights_digest(Path(folder))}")

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 1] -> resized to the model's size, ImageNet-normalised."""
        size = self.model.config.img_size
        x = crops.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        from pipelines.encoders import check_tiles

        tiles = check_tiles(tiles)
        b, _, h, w = tiles.shape
        gh, gw = (1, 1) if grid is None else (int(grid[0]), int(grid[1]))
        if h < gh or w < gw:
            raise ValueError(f"a {h}x{w} tile cannot be cut into a {gh}x{gw} grid")
        ys = [round(i * h / gh) for i in range(gh + 1)]
        xs = [round(j * w / gw) for j in range(gw + 1)]
        pairs = [(t, i, j) for i in range(gh) for j in range(gw) for t in range(b)]  # (tile, row, col)
        param = next(self.model.parameters())
        out = torch.empty(b, gh * gw, self.dim)
        for start in range(0, len(pairs), self.batch):  # crops of all tiles and cells, batched
            chunk = pairs[start:start + self.batch]
            x = torch.cat([self.preprocess(tiles[t:t + 1, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]])
                           for t, i, j in chunk])
            emb = self.model(x.to(param.device, param.dtype)).float().cpu()
            for (t, i, j), e in zip(chunk, emb, strict=True):
                out[t, i * gw + j] = e
        return out  # (B, gh*gw, D), row-major

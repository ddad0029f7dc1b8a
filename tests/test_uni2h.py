"""UNI-2h in plain torch: timm's published names and shapes, the key-map round trip, one tile embedded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories_published import tiny_uni2h_config, write_uni2h
from safetensors.torch import load_file

from pipelines.encoders import EmbeddingCache, load_encoder
from pipelines.uni2h import UNI2h, UNI2hConfig, UNI2hEncoder, load_uni2h, published_shapes
from studio.convert import convert_checkpoint
from studio.data.samples import load_sample
from studio.errors import WeightsError
from studio.io import to_tensor

torch.set_num_threads(1)

# The published UNI-2h state dict (timm VisionTransformer, MahmoodLab's kwargs), written out
# from the release's facts: dim 1536, 24 blocks, qkv (4608, 1536), packed SwiGLU fc1 (8192,
# 1536) / fc2 (1536, 4096), pos_embed over 16x16 patches only, 8 register tokens.
PUBLISHED_TOP = {"cls_token": (1, 1, 1536), "reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536),
                 "patch_embed.proj.weight": (1536, 3, 14, 14), "patch_embed.proj.bias": (1536,),
                 "norm.weight": (1536,), "norm.bias": (1536,)}
PUBLISHED_BLOCK = {"norm1.weight": (1536,), "norm1.bias": (1536,), "attn.qkv.weight": (4608, 1536),
                   "attn.qkv.bias": (4608,), "attn.proj.weight": (1536, 1536), "attn.proj.bias": (1536,),
                   "ls1.gamma": (1536,), "norm2.weight": (1536,), "norm2.bias": (1536,),
                   "mlp.fc1.weight": (8192, 1536), "mlp.fc1.bias": (8192,), "mlp.fc2.weight": (1536, 4096),
                   "mlp.fc2.bias": (1536,), "ls2.gamma": (1536,)}


def test_full_size_names_and_shapes_are_the_published_ones():
    with torch.device("meta"):
        model = UNI2h(UNI2hConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = dict(PUBLISHED_TOP)
    for i in range(24):
        expected |= {f"blocks.{i}.{k}": v for k, v in PUBLISHED_BLOCK.items()}
    assert shapes == expected == published_shapes(UNI2hConfig())
    assert 681.0e6 < sum(v.numel() for v in model.parameters()) < 681.5e6  # UNI-2h: 681 M parameters


def test_config_without_model_args_is_the_published_architecture(tmp_path):
    # MahmoodLab's card passes the kwargs to timm, so the release's config.json may carry only
    # architecture + pretrained_cfg; the published kwargs fill in.
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_giant_patch14_224", "num_classes": 0,
                                                      "global_pool": "token", "pretrained_cfg": {}}))
    config = UNI2hConfig.from_json(tmp_path / "config.json")
    assert config == UNI2hConfig() and config.mlp_hidden == 8192 and config.grid == 16


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's ViT forward written from the published formulas, straight from the state dict."""
    w = state
    tokens = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=14)
    tokens = tokens.flatten(2).transpose(1, 2) + w["pos_embed"]  # position embedding on patches only
    b, _, d = tokens.shape
    h = torch.cat([w["cls_token"].expand(b, -1, -1), w["reg_token"].expand(b, -1, -1), tokens], dim=1)
    depth = 1 + max(int(m.group(1)) for k in w if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        q, k, v = (y @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]).split(d, dim=-1)
        split = [t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v)]
        att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ split[2]
        att = att.transpose(1, 2).reshape(b, -1, d) @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = h + w[p + "ls1.gamma"] * att
        y = F.layer_norm(h, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        hidden = y @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]
        half = hidden.shape[-1] // 2
        gated = F.silu(hidden[..., :half]) * hidden[..., half:]  # SiLU on the first half (gate_last=False)
        h = h + w[p + "ls2.gamma"] * (gated @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"])
    return F.layer_norm(h, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6)[:, 0]


def test_key_map_round_trip_from_the_released_pickle(tmp_path):
    folder = write_uni2h(tmp_path / "UNI2-h", fmt="bin")
    original = torch.load(folder / "pytorch_model.bin", weights_only=True)
    with pytest.raises(WeightsError, match="histostudio convert .*pytorch_model.bin"):
        load_uni2h(folder)
    convert_checkpoint(folder / "pytorch_model.bin", folder / "model.safetensors")
    model = load_uni2h(folder)
    state = model.state_dict()
    assert list(state) == list(original)  # same names, same order as timm's
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert set(load_file(str(folder / "model.safetensors"))) == set(published_shapes(model.config))

    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(original, x, heads=model.config.num_heads)
    assert ours.shape == (2, 48) and torch.allclose(ours, ref, atol=1e-5)
    # The check is sensitive to the gate order: SiLU on the second half gives another network.
    swapped = dict(original)
    for i in range(model.config.depth):
        w, b = original[f"blocks.{i}.mlp.fc1.weight"], original[f"blocks.{i}.mlp.fc1.bias"]
        swapped[f"blocks.{i}.mlp.fc1.weight"] = torch.cat(w.chunk(2)[::-1])
        swapped[f"blocks.{i}.mlp.fc1.bias"] = torch.cat(b.chunk(2)[::-1])
    assert not torch.allclose(reference_forward(swapped, x, model.config.num_heads), ref, atol=1e-3)


def test_encoder_embeds_one_tile_with_its_preprocessing(tmp_path):
    folder = write_uni2h(tmp_path / "UNI2-h")
    tile = to_tensor(np.ascontiguousarray(load_sample("skin")[:256, :256]))
    enc = load_encoder(f"uni2h:{folder}")
    assert isinstance(enc, UNI2hEncoder) and enc.dim == 48 and enc.identity.startswith("uni2h:")
    assert load_encoder(folder).identity == enc.identity  # the folder alone is recognised too
    glob = enc.embed(tile)
    assert glob.shape == (1, 1, 48) and torch.isfinite(glob).all()
    # Resize to the model's size, ImageNet mean/std, CLS token of the final norm.
    x = F.interpolate(tile, size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        direct = enc.model((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert torch.allclose(glob[:, 0], direct, atol=1e-6)
    # A grid embeds crops row-major (PixCell-1024's 4x4 grid of 256 px crops).
    grid = enc.embed(tile, grid=(2, 2))
    assert grid.shape == (1, 4, 48)
    assert torch.allclose(grid[:, 1], enc.embed(tile[:, :, :128, 128:])[:, 0], atol=1e-6)
    assert not torch.allclose(grid[:, 0], grid[:, 3])
    cached = EmbeddingCache(tmp_path / "cache")
    assert torch.allclose(cached.embed(enc, tile, grid=(2, 2)), grid)
    assert torch.allclose(cached.embed(enc, tile, grid=(2, 2)), grid)  # second call: from disk


def test_bad_folders_fail_with_one_line(tmp_path):
    folder = write_uni2h(tmp_path / "UNI2-h")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["depth"] = 3  # the config claims a block the weights lack
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="lacks 14 parameters of UNI-2h, e.g. 'blocks.2.norm1.weight'") as err:
        load_uni2h(folder)
    config["model_args"] |= {"depth": 2, "embed_dim": 96, "num_heads": 2}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="'cls_token' is \\(1, 1, 48\\) but the config implies \\(1, 1, 96\\)"):
        load_uni2h(folder)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match="AutoencoderKL model, not UNI-2h"):
        load_uni2h(tmp_path / "vae")
    with pytest.raises(WeightsError, match="MahmoodLab/UNI2-h"):
        load_uni2h(tmp_path / "nowhere")
    assert "\n" not in str(err.value)


def test_tiny_config_round_trips_through_config_json(tmp_path):
    config = tiny_uni2h_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    assert UNI2hConfig.from_json(tmp_path / "config.json") == config

"""SSL encoders: one interface over the built-in CNN, transformers folders and timm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import tiny_encoder

from pipelines.encoders import (
    BuiltinEncoder,
    EmbeddingCache,
    PatchEncoder,
    TransformersEncoder,
    load_encoder,
    load_model_folder,
)
from studio.data.samples import load_sample
from studio.errors import InputError, WeightsError
from studio.io import to_tensor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    image = load_sample("tiatoolbox_target")
    return to_tensor(np.stack([image[:256, :256], image[300:556, 300:556]]))


@pytest.fixture(scope="module")
def builtin_folder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "patch-encoder")


def test_builtin_encoder_grid_and_global_tokens(builtin_folder, tiles):
    enc = load_encoder(builtin_folder)
    assert isinstance(enc, BuiltinEncoder) and enc.dim == 16 and enc.identity.startswith("builtin:")
    grid = enc.embed(tiles, grid=(4, 4))
    glob = enc.embed(tiles)
    assert grid.shape == (2, 16, 16) and glob.shape == (2, 1, 16)
    torch.testing.assert_close(glob[:, 0], grid.mean(dim=1), atol=1e-5, rtol=1e-5)
    # A token describes its own patch: the top-left token only depends on the top-left 64 px.
    edited = tiles.clone()
    edited[:, :, 128:, 128:] = 1.0
    again = enc.embed(edited, grid=(4, 4))
    torch.testing.assert_close(again[:, 0], grid[:, 0])
    assert (again[:, 15] - grid[:, 15]).abs().max() > 1e-3
    # Coarser grids pool the patch tokens.
    assert enc.embed(tiles, grid=(2, 2)).shape == (2, 4, 16)


def test_transformers_backend_on_a_small_random_vit_folder(tmp_path, tiles):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(config).save_pretrained(folder, safe_serialization=True)
    enc = load_encoder(folder)
    assert isinstance(enc, TransformersEncoder) and enc.dim == 32
    assert enc.embed(tiles).shape == (2, 1, 32)
    assert enc.embed(tiles, grid=(4, 4)).shape == (2, 16, 32)
    assert enc.embed(tiles, grid=(2, 2)).shape == (2, 4, 32)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="no .safetensors weights"):
        load_encoder(folder)


def test_timm_backend_skips_without_timm():
    timm = pytest.importorskip("timm")  # needs torchvision: absent beside the CPU torch
    assert timm is not None


def test_cache_returns_identical_embeddings_without_recomputing(builtin_folder, tiles, tmp_path):
    enc = load_encoder(builtin_folder)
    calls = []
    original = enc.embed

    def counting(t, grid=None):
        calls.append(len(t))
        return original(t, grid)

    enc.embed = counting  # type: ignore[method-assign]
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.embed(enc, tiles, grid=(4, 4))
    second = cache.embed(enc, tiles, grid=(4, 4))
    torch.testing.assert_close(first, second)
    assert calls == [2]
    cache.embed(enc, torch.cat([tiles, tiles.flip(3)]), grid=(4, 4))
    assert calls == [2, 2]  # only the two new tiles were embedded
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4


def test_bad_encoder_inputs_and_folders(builtin_folder, tmp_path):
    enc = load_encoder(builtin_folder)
    with pytest.raises(InputError, match="expected a float tensor"):
        enc.embed(torch.zeros(3, 64, 64))
    with pytest.raises(InputError, match="dtype"):
        enc.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(WeightsError, match="no such model folder"):
        load_model_folder(PatchEncoder, tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((builtin_folder / "config.json").read_text())
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="pickled formats are not loaded"):
        load_encoder(bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(WeightsError, match="cannot load PatchEncoder"):
        load_encoder(bad)
    with pytest.raises(WeightsError, match="no config.json"):
        load_encoder(tmp_path)


def test_builtin_encoder_gives_a_finer_token_grid_from_overlapping_windows():
    """One token per 32 px (issue 19): each token embeds the 64 px window centred on its
    cell, so cells differ where the tissue does (not coarse tokens repeated), and a centre
    cell's token equals that window embedded directly."""
    from torch import nn

    from pipelines.encoders import BuiltinEncoder, PatchEncoder

    encoder = BuiltinEncoder(PatchEncoder(embed_dim=8, channels=(4, 4, 4, 4, 4)).eval(), identity="tiny")
    identity = nn.Conv2d(3, 3, 1)
    nn.init.eye_(identity.weight[:, :, 0, 0])
    nn.init.zeros_(identity.bias)
    encoder.model = nn.Sequential(identity, nn.AdaptiveAvgPool2d(1), nn.Flatten()).requires_grad_(False)
    # a window's mean colour: easy to check
    encoder.dim = 3
    tile = torch.zeros(1, 3, 128, 128)
    tile[..., 48:] = 1.0  # an edge inside the second coarse column's first half
    fine = encoder.embed(tile, grid=(4, 4))
    assert fine.shape == (1, 16, 3)
    assert torch.allclose(fine[0, 5], tile[:, :, 16:80, 16:80].mean(dim=(2, 3))[0])  # window of cell (1, 1)
    row = fine[0, :4, 0]
    assert row[0] < row[1] < row[2] == row[3] == 1.0  # the edge is resolved at 32 px
    coarse = encoder.embed(tile, grid=(2, 2))[0, :2, 0]
    assert coarse[0] == tile[0, 0, :64, :64].mean() and coarse[1] == 1.0
    with pytest.raises(InputError, match="divisor"):
        encoder.patch_tokens(tile, stride=48)


def test_a_config_that_disagrees_with_its_weights_is_one_line_naming_the_parameter(tmp_path):
    """The issue-22 battery: 17 lines of size mismatch and diffusers' ignore_mismatched_sizes
    advice became one line naming the folder and the first mismatched parameter."""
    import json

    from pipelines.encoders import PatchEncoder, load_model_folder
    from pipelines.loading import loading_failure

    folder = tmp_path / "enc"
    PatchEncoder(embed_dim=8, channels=(4, 4, 4, 4, 4)).save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["embed_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as info:
        load_model_folder(PatchEncoder, folder)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(folder) in message
    assert "config.json disagrees with the weights" in message and "ignore_mismatched_sizes" not in message
    torch_text = RuntimeError("Error(s) in loading state_dict for Net:\n\tsize mismatch for head.weight: copying a "
                              "param with shape torch.Size([8, 4]) from checkpoint, the shape in current model is "
                              "torch.Size([16, 4]).\n\tsize mismatch for head.bias: copying a param with shape "
                              "torch.Size([8]) from checkpoint, the shape in current model is torch.Size([16]).")
    assert loading_failure(torch_text) == ("config.json disagrees with the weights: head.weight is [8, 4] in the file, "
                                           "[16, 4] in the config (and 1 more)")

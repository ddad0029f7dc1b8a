"""PixCell-256-Cell-ControlNet from its published layout: names and shapes, zero-init, tiny runs
on CPU, the path through ``generate rare``, and one-line errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from factories_controlnet import PIXCELL_CONTROLNET_CONFIG, tiny_controlnet_config, write_pixcell_controlnet
from factories_published import TINY_UNI_DIM, write_pixcell, write_sd35_vae, write_uni2h
from PIL import Image
from safetensors import safe_open
from test_pixcell import published_pixcell_shapes
from typer.testing import CliRunner

from pipelines.pixcell_controlnet import (
    PixCellControlNet,
    PixCellControlNetPipeline,
    controlled_forward,
    render_mask_rgb,
)
from studio.cli import app, main
from studio.errors import WeightsError

torch.set_num_threads(1)
runner = CliRunner()


def published_controlnet_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The ControlNet's names: the base transformer's under ``transformer.``, the mask patch
    embedding ``cond_pos_embed.proj`` and ``n_blocks`` Linear(inner, inner) ``controlnet_blocks``."""
    d, p = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["patch_size"]
    shapes = {f"transformer.{k}": v for k, v in published_pixcell_shapes(cfg).items()}
    shapes |= {"cond_pos_embed.proj.weight": (d, cfg["in_channels"], p, p), "cond_pos_embed.proj.bias": (d,)}
    for i in range(cfg["n_blocks"]):
        shapes |= {f"controlnet_blocks.{i}.weight": (d, d), f"controlnet_blocks.{i}.bias": (d,)}
    return shapes


def _kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: the ControlNet release, the SD3.5 VAE and UNI-2h beside it."""
    root = tmp_path_factory.mktemp("models")
    return {"controlnet": write_pixcell_controlnet(root / "PixCell-256-Cell-ControlNet"),
            "vae": write_sd35_vae(root / "sd3.5-vae"), "uni2h": write_uni2h(root / "UNI2-h")}


def _mask(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    for i in range(1, 5):
        y, x = rng.integers(4, size - 12, 2)
        inst[y:y + 8, x:x + 8] = i
    return inst


def test_full_size_names_and_shapes_are_the_published_ones():
    with init_empty_weights():
        net = PixCellControlNet.from_config(_kwargs(PIXCELL_CONTROLNET_CONFIG))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == published_controlnet_shapes(PIXCELL_CONTROLNET_CONFIG)
    assert got["controlnet_blocks.26.weight"] == (1152, 1152) and "controlnet_blocks.27.weight" not in got
    assert got["cond_pos_embed.proj.weight"] == (1152, 16, 2, 2)  # patch embedding of 16-channel SD3.5 latents


def test_tiny_folder_has_the_published_layout_and_names(models):
    folder = models["controlnet"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixCellControlNetPipeline" and index["controlnet"][1] == "PixCellControlNet"
    with safe_open(str(folder / "controlnet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        names = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert names == published_controlnet_shapes(tiny_controlnet_config())
    assert set(json.loads((folder / "controlnet" / "config.json").read_text())) == set(PIXCELL_CONTROLNET_CONFIG)


def test_render_mask_rgb_is_white_nuclei_on_black():
    inst = _mask()
    rgb = render_mask_rgb(inst)
    assert rgb.shape == (3, *inst.shape) and set(np.unique(rgb)) == {0.0, 1.0}
    assert np.array_equal(rgb[0] == 1, inst > 0) and np.array_equal(rgb[0], rgb[2])


def test_zero_initialised_controlnet_leaves_the_base_unchanged(tmp_path, models):
    folder = write_pixcell_controlnet(tmp_path / "PixCell-256-Cell-ControlNet", zero=True)
    pipe = PixCellControlNetPipeline.from_pretrained(folder, vae=models["vae"])
    torch.manual_seed(0)
    x, cond = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    tokens, t = torch.randn(2, 1, TINY_UNI_DIM), torch.tensor([500, 500])
    with torch.no_grad():
        base = pipe.transformer(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0]
        residuals = pipe.controlnet(x, cond, tokens, t)
        assert len(residuals) == pipe.controlnet.n_blocks and all(bool((r == 0).all()) for r in residuals)
        assert torch.equal(controlled_forward(pipe.transformer, x, tokens, t), base)
        assert torch.allclose(controlled_forward(pipe.transformer, x, tokens, t, residuals, 1.0), base, atol=0)
        # trained (non-zero) outputs do change the prediction, scaled by the conditioning scale
        trained = PixCellControlNetPipeline.from_pretrained(models["controlnet"], vae=models["vae"])
        res = trained.controlnet(x, cond, tokens, t)
        moved = controlled_forward(trained.transformer, x, tokens, t, res, 1.0)
        base2 = trained.transformer(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0]
        assert (moved - base2).abs().max() > 1e-3
        assert torch.allclose(controlled_forward(trained.transformer, x, tokens, t, res, 0.0), base2, atol=1e-6)


def test_load_and_one_tile_at_two_steps(models):
    pipe = PixCellControlNetPipeline.from_pretrained(models["controlnet"])  # VAE found beside it
    kw = {"num_inference_steps": 2, "output_type": "pt", "progress": False}
    masks = [(_mask(0), np.ones((64, 64), np.uint8))]
    a = pipe(masks, generator=torch.Generator().manual_seed(1), **kw)
    assert a.images.shape == (1, 3, 64, 64) and a.control.shape == (1, 3, 64, 64)
    assert torch.isfinite(a.images).all() and 0 <= a.images.min() and a.images.max() <= 1
    b = pipe([(_mask(1), masks[0][1])], generator=torch.Generator().manual_seed(1), **kw)
    assert (a.images - b.images).abs().max() > 1e-4  # same noise, another mask: another tile
    ref = torch.randn(1, 1, TINY_UNI_DIM)
    c = pipe(masks, embeddings=ref, guidance_scale=2.0, generator=torch.Generator().manual_seed(1), **kw)
    assert (a.images - c.images).abs().max() > 1e-4  # the UNI token and guidance act
    native = pipe([(_mask(0, 256), np.ones((256, 256), np.uint8))],  # PixCell-256's native size, as PIL
                  generator=torch.Generator().manual_seed(1), num_inference_steps=2, progress=False)
    assert native.images[0].size == (256, 256)


def test_generate_rare_through_the_controlnet_writes_exact_counts(tmp_path, models, monkeypatch):
    from studio.data.registry import open_dataset

    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(models["controlnet"].parent))
    ref = tmp_path / "reference.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ref)
    out = tmp_path / "rare"
    result = runner.invoke(app, ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead,inflammatory",
                                 "--count", "3", "--per-patch", "2", "--size", "64", "--steps", "2",
                                 "--min-agreement", "0", "--checkpoint", str(models["controlnet"]),
                                 "--reference", str(ref), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = open_dataset(out)
    assert len(data) == 3
    counts: dict[int, int] = {}
    for i in range(len(data)):
        s = data.read(i)
        ids, first = np.unique(s.inst[s.inst > 0], return_index=True)
        for code in s.cls[s.inst > 0][first].tolist():
            counts[code] = counts.get(code, 0) + 1
    assert counts[4] == 6 and counts[2] >= 6  # dead: exactly 2 per patch; inflammatory: at least the 6 added
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["backend"]["kind"] == "pixcell-controlnet" and prov["backend"]["uni_token"] == "reference"
    assert prov["written_counts"]["dead"] == 6 and prov["requested_counts"] == {"dead": 6, "inflammatory": 6}
    assert {"controlnet", "transformer"} <= set(prov["checkpoint_digest"])
    assert (out / "preview.png").is_file()


def test_info_lists_the_controlnet_as_ready(tmp_path, models):
    from studio.published import find_published

    found = {m.kind: m for m in find_published(models["controlnet"].parent)}
    assert found["pixcell-controlnet"].ready and "ControlNet" in found["pixcell-controlnet"].detail
    result = runner.invoke(app, ["info", "--models-dir", str(models["controlnet"].parent)])
    assert result.exit_code == 0, result.output
    row = next(ln for ln in result.output.splitlines() if "PixCell-256" in ln)  # the table wraps long names
    assert "pixcell-co" in row and "ready" in row and "cell-mask" in result.output
    # no weights in controlnet/: not ready, and says which file is missing
    bare = write_pixcell_controlnet(tmp_path / "PixCell-256-Cell-ControlNet")
    (bare / "controlnet" / "diffusion_pytorch_model.safetensors").unlink()
    write_sd35_vae(tmp_path / "sd3.5-vae")
    status = {m.kind: m for m in find_published(tmp_path)}["pixcell-controlnet"].status
    assert status == "controlnet/diffusion_pytorch_model.safetensors missing"


def _one_line_exit_2(args, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["histostudio", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_base_and_missing_vae_name_the_download(tmp_path, models, monkeypatch, capsys):
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)
    folder = write_pixcell_controlnet(tmp_path / "PixCell-256-Cell-ControlNet", transformer=False)
    out = tmp_path / "rare"
    args = ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead", "--count", "1", "--size", "64",
            "--steps", "1", "--checkpoint", str(folder), "--out", str(out)]
    line = _one_line_exit_2(args, monkeypatch, capsys)
    assert "StonyBrook-CVLab/PixCell-256-Cell-ControlNet" in line and "transformer/" in line
    assert "PixCell-256" in line and not out.exists()
    write_pixcell(tmp_path / "PixCell-256")  # the base downloaded beside it instead: still no VAE
    line = _one_line_exit_2(args, monkeypatch, capsys)
    assert "stabilityai/stable-diffusion-3.5-large" in line and "diffusion_pytorch_model.safetensors" in line
    write_sd35_vae(tmp_path / "sd3.5-vae")
    pipe = PixCellControlNetPipeline.from_pretrained(folder)
    assert pipe.transformer.config.caption_num_tokens == 1 and not out.exists()


def test_config_dimensions_disagreeing_with_weights(tmp_path, models):
    folder = write_pixcell_controlnet(tmp_path / "PixCell-256-Cell-ControlNet")
    config_path = folder / "controlnet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "cross_attention_dim": 12}))
    with pytest.raises(WeightsError) as err:
        PixCellControlNetPipeline.from_pretrained(folder, vae=models["vae"])
    message = str(err.value)
    assert "\n" not in message and str(folder / "controlnet") in message
    assert "'transformer.transformer_blocks.0.attn2.to_k.weight' is (16, 16) but the config implies (16, 12)" in message
    config_path.write_text(json.dumps({**config, "attention_head_dim": 4}))  # another base's ControlNet
    with pytest.raises(WeightsError, match="'attention_head_dim' is 4 but the base transformer's is 8"):
        PixCellControlNetPipeline.from_pretrained(folder, vae=models["vae"])
    weights = folder / "controlnet" / "diffusion_pytorch_model.safetensors"
    config_path.write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:-500])  # an interrupted download
    with pytest.raises(WeightsError, match="truncated"):
        PixCellControlNetPipeline.from_pretrained(folder, vae=models["vae"])


def test_other_folder_types_are_refused(tmp_path, models):
    base = write_pixcell(tmp_path / "PixCell-256")
    with pytest.raises(WeightsError, match="not a PixCell ControlNet folder"):
        PixCellControlNetPipeline.from_pretrained(base, vae=models["vae"])


def test_the_studios_mask_model_is_not_taken_for_the_controlnet(tmp_path, monkeypatch, capsys):
    from factories import tiny_mask_checkpoint

    from pipelines.pixcell_controlnet import is_controlnet_folder

    ckpt = tiny_mask_checkpoint(tmp_path / "mask-ldm")  # lists a controlnet too, beside a UNet
    assert not is_controlnet_folder(ckpt)
    ref = tmp_path / "reference.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(ref)
    out = tmp_path / "rare"
    line = _one_line_exit_2(["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead", "--count", "1",
                             "--size", "64", "--steps", "1", "--checkpoint", str(ckpt), "--reference", str(ref),
                             "--out", str(out)], monkeypatch, capsys)
    assert "--reference" in line and "PixCell" in line and not out.exists()


def test_the_controlnet_given_to_embedding_generation_points_to_generate_rare(models):
    from pipelines.pixcell import PixCellPipeline
    from studio.errors import WeightsError

    with pytest.raises(WeightsError, match="histostudio generate rare --checkpoint"):
        PixCellPipeline.from_pretrained(models["controlnet"])

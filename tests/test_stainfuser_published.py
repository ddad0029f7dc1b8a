"""The published StainFuser state dict (R-J/StainFuser) as ``normalize --method stainfuser --checkpoint``.

The real weights cannot be fetched here: the tiny checkpoints come from
:mod:`factories_stainfuser`, which rebuilds the release's wrapper module (its parameter
names) at toy sizes; the full-size names and shapes are checked on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from factories_stainfuser import (
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    stainfuser_state_dict,
    write_configs,
    write_stainfuser,
)
from typer.testing import CliRunner

from pipelines.stain_fuser import StainFuserTransform
from pipelines.stainfuser_published import (
    SD21B_UNET_CONFIG,
    SD21B_VAE_CONFIG,
    PublishedStainFuserPipeline,
    build_models,
    key_map,
    load_published,
)
from studio.cli import app
from studio.data.samples import load_sample
from studio.errors import WeightsError
from studio.io import read_image, write_image

runner = CliRunner()


def _tile(name: str, size: int = 64) -> np.ndarray:
    return np.ascontiguousarray(load_sample(name)[:size, :size])


def _pipe(checkpoint) -> PublishedStainFuserPipeline:
    parts = load_published(checkpoint)
    parts.pop("weights")
    return PublishedStainFuserPipeline(**parts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_stainfuser(tmp_path_factory.mktemp("models") / "StainFuser")


def test_full_size_names_and_shapes_match_the_release():
    """SD2.1-base at full size (on the meta device: no memory): the release's names and shapes."""
    with torch.device("meta"):
        models = build_models(SD21B_UNET_CONFIG, SD21B_VAE_CONFIG)
    mapping = key_map(models)
    shapes = {pub: tuple(dict(models[s.split(".", 1)[0]].state_dict())[s.split(".", 1)[1]].shape)
              for pub, s in mapping.items()}
    assert shapes["noise_predictor.encoder_projector.weight"] == (1024, 4)
    assert shapes["conditioner.encoder_projector.weight"] == (1024, 4)
    assert shapes["noise_predictor.conv_in.weight"] == (320, 4, 3, 3)
    assert shapes["noise_predictor.down_blocks.0.attentions.0.proj_in.weight"] == (320, 320)  # linear projection
    assert shapes["noise_predictor.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["noise_predictor.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == (1280, 1280)
    assert shapes["conditioner.controlnet_cond_embedding.conv_in.weight"] == (16, 3, 3, 3)  # pixel-space RGB
    assert shapes["conditioner.controlnet_cond_embedding.conv_out.weight"] == (320, 256, 3, 3)
    assert shapes["conditioner.controlnet_mid_block.weight"] == (1280, 1280, 1, 1)
    assert shapes["encoder.encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.quant_conv.weight"] == (8, 8, 1, 1)  # 4 latent channels (mean + logvar)
    assert not any(k.startswith("noise_scheduler") for k in mapping)
    counts = {m: sum(p.numel() for p in mod.parameters()) for m, mod in models.items()}
    assert counts["unet"] == 865_910_724  # SD2.x UNet
    assert counts["vae"] == 83_653_863  # SD VAE
    assert models["unet"].config.attention_head_dim == [5, 10, 20, 20]
    assert models["vae"].config.scaling_factor == 0.18215


def test_key_map_covers_the_release_wrapper_exactly():
    """The explicit map equals the names of the release's wrapper module (built independently)."""
    tensors = stainfuser_state_dict()
    models = build_models(TINY_UNET_CONFIG, TINY_VAE_CONFIG)
    assert set(key_map(models)) == set(tensors)


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("safetensors", "module."), ("pth", "module.")])
def test_load_and_normalize_one_tile_at_two_steps(tmp_path, fmt, prefix):
    weights = write_stainfuser(tmp_path / "sf", fmt=fmt, prefix=prefix)
    pipe = _pipe(weights)
    reference = stainfuser_state_dict(prefix="")  # the loaded values are the file's
    assert torch.equal(pipe.style_projection.unet.weight, reference["noise_predictor.encoder_projector.weight"])
    mid = reference["conditioner.controlnet_mid_block.weight"]
    assert torch.equal(pipe.controlnet.controlnet_mid_block.weight, mid)
    tokens = pipe.style_tokens(_tile("hgsc_nest", 96))
    assert tokens.shape == (1, 64, 4)  # the 8x8 latent of the reference at the training size
    out = pipe(_tile("skin"), tokens, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all() and out.passed_through == [False]
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.skip_prk_steps


def test_seeded_output_is_deterministic(checkpoint):
    pipe = _pipe(checkpoint)
    tokens = pipe.style_tokens(_tile("hgsc_nest"))
    runs = [pipe(_tile("skin"), tokens, num_inference_steps=2, seed=s, output_type="np").images for s in (3, 3, 4)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_the_transform_carries_the_path_not_the_weights(checkpoint):
    from studio.jobs import spec_of
    from studio.transforms import create_tile_transform as by_name

    transform = by_name("stainfuser", reference="tiatoolbox_target", checkpoint=str(checkpoint.parent), device="cpu",
                        halo=8)
    assert isinstance(transform, StainFuserTransform) and isinstance(transform.pipe, PublishedStainFuserPipeline)
    described = transform.describe()
    assert described["mode"] == "published" and described["steps"] == 20 and described["checkpoint"] == str(checkpoint)
    spec = spec_of(transform)
    assert spec.kwargs["checkpoint"] == str(checkpoint.parent) and json.loads(spec.key())  # JSON, no tensors
    rebuilt = spec.build()
    assert isinstance(rebuilt.pipe, PublishedStainFuserPipeline)


def test_normalize_cli_tile_folder_and_slide(tmp_path, checkpoint):
    """The full path: the slide job's halo windows, positional noise and blending around the published model."""
    from studio.slides import open_slide, write_pyramid

    write_image(tmp_path / "tiles" / "a.png", _tile("skin"))
    write_image(tmp_path / "tiles" / "b.png", _tile("hgsc_nest"))
    write_image(tmp_path / "ref.png", _tile("hgsc_nest", 128))
    region = np.ascontiguousarray(load_sample("hgsc_nest")[:96, :160])
    slide = write_pyramid(tmp_path / "s.tif", iter([region]), 160, 96, tile_size=512, mpp=0.5, compression="deflate")
    out = tmp_path / "out"
    result = runner.invoke(app, ["normalize", str(tmp_path / "tiles"), str(slide), "--out", str(out), "--method",
                                 "stainfuser", "--checkpoint", str(checkpoint), "--reference",
                                 str(tmp_path / "ref.png"), "--tile-size", "64", "--device", "cpu",
                                 "--compression", "deflate"])
    assert result.exit_code == 0, result.output
    assert read_image(out / "tiles" / "a.png").shape == (64, 64, 3)
    assert not np.array_equal(read_image(out / "tiles" / "a.png"), _tile("skin"))  # the model's output
    with open_slide(out / "s.tif") as s:
        assert s.dimensions == (160, 96)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["method"] == "stainfuser"
    assert manifest["run"]["transform"]["mode"] == "published"
    assert manifest["run"]["transform"]["checkpoint"] == str(checkpoint.absolute())
    assert manifest["run"]["transform"]["halo"] == 32 and manifest["run"]["transform"]["steps"] == 20


@dataclass
class NotATensor:
    value: int = 1


def _bad_inputs(tmp_path):
    cases = {}
    png = tmp_path / "wrong" / "weights.png"
    write_image(png, _tile("skin"))
    cases["wrong file type"] = (png, "is not a StainFuser state dict")
    good = write_stainfuser(tmp_path / "truncated")
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (good, "truncated")
    other = tmp_path / "other" / "model.safetensors"
    other.parent.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.proj.weight": torch.zeros(2, 2)}, str(other))
    cases["another model"] = (other, "is not a StainFuser state dict")
    mismatch = write_stainfuser(tmp_path / "mismatch")
    write_configs(mismatch.parent, unet={**TINY_UNET_CONFIG, "cross_attention_dim": 32})
    cases["mismatched shapes"] = (mismatch, r"'noise_predictor\.[^']+' has shape \(\d+, 24\) but the configs give")
    pickled = tmp_path / "pickle" / "stainfuser.pth"
    pickled.parent.mkdir()
    torch.save({"noise_predictor.conv_in.weight": torch.zeros(1), "config": NotATensor()}, pickled)
    cases["pickle with an object"] = (pickled, "refused: .*Python object")
    cases["missing file"] = (tmp_path / "absent.safetensors", "no such StainFuser checkpoint")
    return cases


def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path):
    write_image(tmp_path / "tiles" / "a.png", _tile("skin"))
    for what, (path, message) in _bad_inputs(tmp_path).items():
        with pytest.raises(WeightsError, match=message):
            load_published(path)
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        result = runner.invoke(app, ["normalize", str(tmp_path / "tiles"), "--out", str(out), "--method",
                                     "stainfuser", "--checkpoint", str(path), "--reference", "tiatoolbox_target",
                                     "--device", "cpu"])
        assert isinstance(result.exception, WeightsError), (what, result.output, result.exception)
        assert "\n" not in str(result.exception) and str(path) in str(result.exception), what
        assert not out.exists(), what


def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    write_image(tmp_path / "tiles" / "a.png", _tile("skin"))
    pickled = tmp_path / "stainfuser.pth"
    torch.save({"noise_predictor.conv_in.weight": torch.zeros(1), "config": NotATensor()}, pickled)
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "normalize", str(tmp_path / "tiles"), "--out",
                           str(tmp_path / "out"), "--method", "stainfuser", "--checkpoint", str(pickled),
                           "--reference", "tiatoolbox_target", "--device", "cpu"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_is_refused_for_classical_methods(tmp_path, checkpoint):
    write_image(tmp_path / "tiles" / "a.png", _tile("skin"))
    result = runner.invoke(app, ["normalize", str(tmp_path / "tiles"), "--out", str(tmp_path / "o"), "--method",
                                 "macenko", "--checkpoint", str(checkpoint)])
    assert "only the stainfuser method" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_info_lists_a_stainfuser_folder(tmp_path):
    from studio.published import classify, find_published

    write_stainfuser(tmp_path / "StainFuser", prefix="module.")
    write_stainfuser(tmp_path / "org" / "StainFuser-pth", fmt="pth")
    found = {m.name: m for m in find_published(tmp_path)}
    assert found["StainFuser"].kind == "stainfuser" and found["StainFuser"].ready
    assert "release configs" in found["StainFuser"].detail and "R-J/StainFuser" in found["StainFuser"].source
    assert found["StainFuser-pth"].ready
    assert classify(tmp_path / "StainFuser" / "stainfuser.safetensors").kind == "stainfuser"
    (tmp_path / "empty").mkdir()
    assert classify(tmp_path / "empty") is None
    result = runner.invoke(app, ["info", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0 and "StainFuser" in result.output, result.output


def test_stain_quality_bench_gains_a_row_for_the_released_weights(checkpoint, tmp_path, monkeypatch):
    from bench.stain_quality import published, published_checkpoint

    run = published(checkpoint, [_tile("hgsc_nest"), _tile("tiatoolbox_target")], steps=2, device="cpu",
                    workdir=tmp_path)
    src = np.stack([_tile("skin"), _tile("hgsc_nest")])
    out = run(src)
    assert out.shape == src.shape and out.dtype == np.uint8 and not np.array_equal(out, src)
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(checkpoint.parent.parent))
    assert published_checkpoint(None) == checkpoint.parent
    assert published_checkpoint(str(checkpoint)) == checkpoint

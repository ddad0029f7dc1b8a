"""Published models found in a models folder, and ``histostudio info`` listing them."""

from __future__ import annotations

import json

import pytest
from factories_published import write_pixcell, write_sd35_vae, write_uni2h
from typer.testing import CliRunner

import studio.cli
from studio.cli import app
from studio.convert import convert_checkpoint
from studio.published import find_published, models_dir

runner = CliRunner()


@pytest.fixture()
def wide_console(monkeypatch):
    monkeypatch.setattr(studio.cli.console, "width", 400)  # keep table cells on one line


def test_models_folder_is_recognised_by_layout_not_by_name(tmp_path):
    write_pixcell(tmp_path / "my-pixcell")  # any name: recognised by model_index.json + transformer class
    write_uni2h(tmp_path / "uni", fmt="bin")
    write_pixcell(tmp_path / "StonyBrook-CVLab" / "PixCell-1024", tokens=16)  # org/name as the hub lays it out
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    found = {m.name: m for m in find_published(tmp_path)}
    assert set(found) == {"my-pixcell", "uni", "PixCell-1024"}
    assert found["my-pixcell"].kind == "pixcell" and found["my-pixcell"].detail == "256 px, 1 UNI token"
    assert found["PixCell-1024"].detail == "256 px, 16 UNI tokens"  # (tiny: 32x32 latents)
    assert found["my-pixcell"].status.startswith("needs the SD3.5 VAE")
    assert found["uni"].kind == "uni2h" and "histostudio convert" in found["uni"].status

    convert_checkpoint(tmp_path / "uni" / "pytorch_model.bin", tmp_path / "uni" / "model.safetensors")
    write_sd35_vae(tmp_path / "stable-diffusion-3.5-large" / "vae")  # the vae/ subfolder downloaded alone
    found = {m.name: m for m in find_published(tmp_path)}
    assert found["uni"].ready and found["my-pixcell"].ready
    vae = found["stable-diffusion-3.5-large/vae"]
    assert vae.kind == "sd35-vae" and vae.ready and vae.detail == "scaling 1.5305, shift 0.0609"
    assert "stabilityai/stable-diffusion-3.5-large" in vae.source and "MahmoodLab/UNI2-h" in found["uni"].source


def test_info_lists_published_models(tmp_path, monkeypatch, wide_console):
    write_pixcell(tmp_path / "PixCell-256")
    write_uni2h(tmp_path / "UNI2-h")
    write_sd35_vae(tmp_path / "sd3.5-vae")
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)
    result = runner.invoke(app, ["info", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"published models in {tmp_path}" in result.output
    for name, kind in (("PixCell-256", "pixcell"), ("UNI2-h", "uni2h"), ("sd3.5-vae", "sd35-vae")):
        line = next(x for x in result.output.splitlines() if f" {name} " in x)
        assert kind in line and "ready" in line

    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(tmp_path))
    assert models_dir() == tmp_path
    assert "PixCell-256" in runner.invoke(app, ["info"]).output
    monkeypatch.delenv("HISTOSTUDIO_MODELS")
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "set HISTOSTUDIO_MODELS or pass --models-dir" in result.output

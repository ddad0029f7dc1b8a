"""The command line as users meet it: help, info, data commands, clean errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from studio.cli import app

runner = CliRunner()


def test_help_lists_every_command_with_one_line():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "demo", "normalize", "data"):
        assert command in result.output
    data = runner.invoke(app, ["data", "--help"])
    for command in ("samples", "phantom", "inspect"):
        assert command in data.output


def test_info_reports_device_samples_and_checkpoints():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for text in ("torch", "device", "CPU", "hgsc_nest", "cmu_small_region", "checkpoints"):
        assert text in result.output


def test_data_samples_and_phantom_write_readable_datasets(tmp_path):
    from studio.data.registry import open_dataset

    result = runner.invoke(app, ["data", "samples", "--out", str(tmp_path / "real"), "--format", "conic"])
    assert result.exit_code == 0, result.output
    assert "wrote 25 real crops" in result.output and "lymphocyte" in result.output
    result = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "ph"), "--n", "3", "--seed", "5",
                                 "--format", "pannuke"])
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "ph")
    assert len(ds) == 3 and ds.read(0).meta["source"] == "phantom"
    again = tmp_path / "ph2"
    runner.invoke(app, ["data", "phantom", "--out", str(again), "--n", "3", "--seed", "5", "--format", "pannuke"])
    assert np.array_equal(open_dataset(again).read(2).image, ds.read(2).image)  # --seed is deterministic


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "data", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "nope: no such folder" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "images.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "x" / "labels.npy").write_bytes(b"nothing")
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "data", "inspect", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "images.npy" in proc.stderr and "Traceback" not in proc.stderr


def test_app_command_starts_streamlit_on_the_packaged_script(monkeypatch):
    import subprocess as sp

    from studio.app import APP_SCRIPT

    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    result = runner.invoke(app, ["app", "--port", "8765", "--headless"])
    assert result.exit_code == 0
    cmd, env = calls[0]
    assert str(APP_SCRIPT) in cmd and "8765" in cmd and "--server.headless" in cmd
    assert APP_SCRIPT.is_file()


def test_segment_command_writes_maps_geojson_and_fails_on_bad_input(tmp_path):
    import torch

    from pipelines.segmenter import HoVerNetLite
    from studio.data.samples import load_sample
    from studio.io import write_image

    torch.manual_seed(0)
    HoVerNetLite(widths=(8, 16, 16, 16)).save_pretrained(tmp_path / "seg")
    write_image(tmp_path / "tile.png", np.ascontiguousarray(load_sample("hgsc_nest")[:200, :300]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = runner.invoke(app, ["segment", str(tmp_path / "tile.png"), "--out", str(tmp_path / "o"),
                                 "--checkpoint", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o" / "tile_inst.npy").shape == (200, 300)
    assert (tmp_path / "o" / "tile.geojson").is_file() and (tmp_path / "o" / "summary.csv").is_file()
    result = runner.invoke(app, ["segment", str(tmp_path / "tile.png"), str(tmp_path / "broken.png"),
                                 "--out", str(tmp_path / "o2"), "--checkpoint", str(tmp_path / "seg")])
    assert result.exit_code == 1 and "broken" in result.output


def test_demo_generation_steps_with_tiny_checkpoints(tmp_path, monkeypatch):
    """Steps 7 and 8 of the demo run on whatever checkpoints are installed (tiny ones here)."""
    import torch
    from factories import tiny_mask_checkpoint

    import studio.demo
    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline
    from studio.demo import step_rare, step_virtual_ihc

    monkeypatch.setattr(studio.demo, "RARE_STEPS", 2)

    ckpts = tmp_path / "ckpts"
    tiny_mask_checkpoint(ckpts / "mask-ldm")
    torch.manual_seed(0)
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), stain="her2").save_pretrained(
        ckpts / "virtual-ihc-her2")
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(ckpts))
    rows, summary = [], {}
    written = step_virtual_ihc(tmp_path / "out", rows, summary, seed=0)
    assert written[0][1].is_file() and "her2" in summary["virtual_ihc"]
    assert rows[0][0].startswith("8. virtual IHC") and len(rows[0][1]) == 3
    step_rare(tmp_path / "out", rows, summary, seed=0)  # an untrained model: patches, or the filter says why
    assert rows[1][0].startswith("7. rare-class patches")
    assert "written_counts" in summary["rare"] or "mask-agreement filter" in summary["rare"]["error"]

"""--device auto everywhere: one resolver, tested with CUDA absent; the CUDA path runs where a GPU is."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from studio.cli import app, main
from studio.devices import resolve_device
from studio.errors import InputError

runner = CliRunner()
MODEL_COMMANDS = [("normalize",), ("translate",), ("segment",), ("embed",), ("generate", "embedding")]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def tiny_segmenter(tmp_path):
    from pipelines.segmenter import HoVerNetLite
    from studio.data.samples import load_sample
    from studio.io import write_image

    torch.manual_seed(0)
    HoVerNetLite(widths=(8, 16, 16, 16)).save_pretrained(tmp_path / "seg")
    write_image(tmp_path / "tile.png", np.ascontiguousarray(load_sample("hgsc_nest")[:96, :128]))
    return tmp_path / "seg", tmp_path / "tile.png"


def test_auto_is_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match="cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_cuda_without_cuda_and_bad_spellings_are_one_line_errors(no_cuda):
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(InputError) as err:
            resolve_device(spec)
        message = str(err.value)
        assert message.startswith("--device: ") and "CUDA is not available" in message
        assert "--device cpu" in message and "\n" not in message
    with pytest.raises(InputError, match="'gpu' is not a device; use auto, cpu, cuda"):
        resolve_device("gpu")


def test_every_model_command_defaults_to_auto():
    group = typer.main.get_command(app)
    for path in MODEL_COMMANDS:
        command = group
        for name in path:
            command = command.commands[name]
        (option,) = [p for p in command.params if p.name == "device"]
        assert option.default == "auto", path


def test_normalize_auto_keeps_classical_on_cpu_and_resolves_model_methods(no_cuda):
    from studio.cli import _normalize_device

    assert _normalize_device("macenko", "auto") is None
    assert _normalize_device("stainfuser", "auto") == "cpu"
    with pytest.raises(InputError, match="CUDA is not available"):
        _normalize_device("reinhard", "cuda")


def test_segment_default_device_runs_on_cpu_without_cuda(no_cuda, tiny_segmenter, tmp_path):
    seg, tile = tiny_segmenter
    result = runner.invoke(app, ["segment", str(tile), "--out", str(tmp_path / "o"), "--checkpoint", str(seg)])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o" / "tile_inst.npy").shape == (96, 128)


def test_segment_device_cuda_without_cuda_is_refused_before_any_work(no_cuda, tiny_segmenter, tmp_path,
                                                                       monkeypatch, capsys):
    seg, tile = tiny_segmenter
    args = ["segment", str(tile), "--out", str(tmp_path / "o"), "--checkpoint", str(seg), "--device", "cuda"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, InputError) and "--device" in str(result.exception)
    assert not (tmp_path / "o").exists()
    # The console script turns it into one line on stderr and exit status 2.
    monkeypatch.setattr(sys, "argv", ["histostudio", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--device" in lines[0] and "use --device auto or --device cpu" in lines[0]


def test_translate_and_embed_refuse_cuda_without_cuda(no_cuda, tmp_path):
    for args in (["translate", "tile.png", "--out", str(tmp_path / "t"), "--device", "cuda"],
                 ["embed", "hgsc_nest", "--out", str(tmp_path / "e.safetensors"), "--device", "cuda:0"]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, InputError), (args, result.output)
        assert str(result.exception).startswith("--device: cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_segment_on_cuda_matches_cpu(tiny_segmenter, tmp_path):
    """On a GPU: auto picks CUDA, the tiny segmenter runs there, and its maps match the CPU's."""
    from pipelines.segmenter import NucleiSegmenter
    from studio.io import read_image, to_tensor

    seg, tile = tiny_segmenter
    assert resolve_device("auto") == "cuda"
    tiles = to_tensor(read_image(tile))  # (1, 3, H, W)
    on_cpu = NucleiSegmenter.from_pretrained(seg, device="cpu").predict(tiles)
    on_gpu = NucleiSegmenter.from_pretrained(seg, device=resolve_device("auto"))
    assert on_gpu.device.type == "cuda"
    got = on_gpu.predict(tiles)
    for key, ref in on_cpu.items():
        assert torch.allclose(got[key].float().cpu(), ref, atol=1e-3), key
    result = runner.invoke(app, ["segment", str(tile), "--out", str(tmp_path / "g"), "--checkpoint", str(seg),
                                 "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "g" / "tile_inst.npy").shape == (96, 128)

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
MODEL_COMMANDS = [("normalize",), ("translate",), ("segment",), ("embed",), ("generate", "embedding"),
                  ("generate", "rare"), ("experiment", "augment")]


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
    assert _normalize_device("stainfuser", "auto") == "auto"  # resolved where the model is built (each worker)
    with pytest.raises(InputError, match="CUDA is not available"):
        _normalize_device("reinhard", "cuda")


def test_stainfuser_spec_carries_auto_so_workers_resolve_their_own_device(no_cuda):
    from studio.cli import _normalize_device
    from studio.transforms import create_tile_transform

    transform = create_tile_transform("stainfuser", reference="hgsc_nest",
                                      device=_normalize_device("stainfuser", "auto"))
    assert transform.spec.kwargs["device"] == "auto"  # what a Dask worker rebuilds it with
    assert transform.pipe.device.type == "cpu"  # resolved here, where it was built: no CUDA


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


def _one_line_exit_2(args, monkeypatch, capsys) -> str:
    """Run the console script as a user would; return its single stderr line (exit status 2)."""
    monkeypatch.setattr(sys, "argv", ["histostudio", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_generate_rare_device_cuda_without_cuda_is_one_line_before_loading(no_cuda, tmp_path, monkeypatch, capsys):
    from pipelines.mask_to_image import MaskToImagePipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr(MaskToImagePipeline, "from_pretrained", never)
    out = tmp_path / "rare"
    args = ["generate", "rare", "--labels", "phantom", "--classes", "dead", "--count", "1", "--size", "64",
            "--checkpoint", str(tmp_path), "--out", str(out), "--device", "cuda"]
    line = _one_line_exit_2(args, monkeypatch, capsys)
    assert "--device" in line and "CUDA is not available" in line and "--device cpu" in line
    assert not out.exists()


def test_generate_rare_auto_runs_on_cpu_and_records_the_device(no_cuda, tmp_path):
    from factories import tiny_mask_checkpoint

    ckpt = tiny_mask_checkpoint(tmp_path / "mask")
    out = tmp_path / "rare"
    result = runner.invoke(app, ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead", "--count", "1",
                                 "--per-patch", "1", "--size", "64", "--steps", "1", "--min-agreement", "0",
                                 "--checkpoint", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    import json

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["device"] == prov["request"]["device"] == "cpu"  # auto, resolved on this CUDA-less machine


def test_experiment_device_cuda_without_cuda_is_one_line_and_writes_nothing(no_cuda, tmp_path, monkeypatch,
                                                                            capsys):
    out = tmp_path / "exp"
    line = _one_line_exit_2(["experiment", "augment", "--real", "hgsc_nest", "--synthetic", "phantom", "--out",
                             str(out), "--device", "cuda"], monkeypatch, capsys)
    assert line.count("--device") >= 1 and "CUDA is not available" in line
    assert not out.exists()


def test_experiment_device_resolution(no_cuda, monkeypatch):
    from training.experiment import experiment_device

    assert experiment_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert experiment_device("auto") == "cuda" and experiment_device("cuda:0") == "cuda"
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        experiment_device("cuda:1")


def test_experiment_cpu_training_keeps_accelerate_off_the_gpu(monkeypatch, tmp_path):
    """--device cpu on a GPU machine: accelerate's own switch is set for the run, then restored."""
    import os

    import training.experiment as experiment
    import training.segmenter as segmenter

    seen = {}

    def fake_train(cfg):
        seen["flag"] = os.environ.get("ACCELERATE_USE_CPU")
        return tmp_path

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(segmenter, "train", fake_train)
    cfg = type("Cfg", (), {"output_dir": str(tmp_path)})()
    experiment._train_run(cfg, "cpu")
    assert seen["flag"] == "1" and "ACCELERATE_USE_CPU" not in os.environ
    experiment._train_run(cfg, "cuda")
    assert seen["flag"] is None


def test_stainfuser_transform_resolves_its_device_where_it_runs(no_cuda):
    from pipelines.stain_fuser import create_tile_transform

    transform = create_tile_transform(reference="hgsc_nest", device="auto")
    assert transform.pipe.device.type == "cpu"
    assert create_tile_transform(reference="hgsc_nest", device=None).pipe.device.type == "cpu"
    with pytest.raises(InputError, match="--device: cuda: CUDA is not available"):
        create_tile_transform(reference="hgsc_nest", device="cuda")


# --------------------------------------------------------------------------- the CUDA policy, off a GPU
@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the autocast object is built, never entered
def test_inference_precision_policy(no_cuda, monkeypatch):
    import contextlib

    from studio.devices import autocast_context, inference_dtype

    assert inference_dtype("cpu") == torch.float32 and inference_dtype(torch.device("cpu")) == torch.float32
    assert isinstance(autocast_context("cpu"), contextlib.nullcontext)  # the CPU path is untouched fp32
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert inference_dtype("cuda") == torch.bfloat16 and inference_dtype("cuda:1") == torch.bfloat16
    ctx = autocast_context("cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"
    assert isinstance(autocast_context("cuda", enabled=False), contextlib.nullcontext)  # half weights: no autocast
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))  # T4, V100: no bf16
    assert inference_dtype("cuda") == torch.float16
    monkeypatch.setenv("HISTOSTUDIO_AUTOCAST", "0")
    assert inference_dtype("cuda") == torch.float32 and isinstance(autocast_context("cuda"), contextlib.nullcontext)


def test_fast_attention_prefers_xformers_and_falls_back_to_sdpa(monkeypatch):
    import importlib.util

    from studio.devices import enable_fast_attention

    class Model:
        def __init__(self, fails: bool = False):
            self.fails, self.calls = fails, []

        def enable_xformers_memory_efficient_attention(self):
            self.calls.append("enable")
            if self.fails:
                raise ModuleNotFoundError("xformers built for another torch")

        def disable_xformers_memory_efficient_attention(self):
            self.calls.append("disable")

    model = Model()
    assert enable_fast_attention(model, "cpu") == "sdpa" and model.calls == []  # nothing changes off CUDA
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers"
                        else real_find_spec(name, *a))
    assert enable_fast_attention(model, "cuda") == "sdpa" and model.calls == []  # not installed: torch SDPA
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers"
                        else real_find_spec(name, *a))
    assert enable_fast_attention(model, "cuda:0") == "xformers" and model.calls == ["enable"]
    broken = Model(fails=True)
    assert enable_fast_attention(broken, "cuda") == "sdpa" and broken.calls == ["enable", "disable"]

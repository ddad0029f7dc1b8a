"""training.pixcell_controlnet on tiny published-layout folders: a few CPU steps, the
published output layout, exact resume, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factories_published import write_pixcell, write_sd35_vae, write_uni2h
from safetensors.torch import load_file

from studio.errors import InputError, WeightsError

CROP = 128


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"base": write_pixcell(root / "PixCell-256"), "vae": write_sd35_vae(root / "sd3.5-vae"),
            "uni2h": write_uni2h(root / "UNI2-h")}


def recipe(folder: Path, models: dict[str, Path], **overrides) -> Path:
    cfg = {"output_dir": str(folder / "run"), "base": str(models["base"]), "vae": str(models["vae"]),
           "uni2h": str(models["uni2h"]),
           "sources": [{"name": "phantom", "n": 4, "seed": 5, "size": CROP}], "crop_size": CROP, "batch_size": 2,
           "stain_jitter": False, "max_steps": 4, "learning_rate": 1e-3, "warmup_steps": 1, "uni_dropout": 0.5,
           "checkpoint_every": 2, "log_every": 1, "threads": 1, "validate_every": 4, "validation_tiles": 2,
           "use_ema": True, "ema_decay": 0.9,
           "validation_steps": 2, **overrides}
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(path: Path, *extra: str) -> Path:
    from training.pixcell_controlnet import main

    return main(["--config", str(path), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models):
    """One uninterrupted 4-step run, with the in-memory base transformer and VAE captured."""
    import pipelines.encoders
    import training.pixcell_controlnet as tpc

    captured: dict = {}
    load_base, load_folder = tpc.load_base, pipelines.encoders.load_model_folder

    def spy_base(cfg):
        out = load_base(cfg)
        captured["base"] = out[0]
        return out

    def spy_folder(cls, folder, *a, **k):
        model = load_folder(cls, folder, *a, **k)
        captured.setdefault("vae", model)
        return model

    mp = pytest.MonkeyPatch()
    mp.setattr(tpc, "load_base", spy_base)
    mp.setattr(pipelines.encoders, "load_model_folder", spy_folder)
    try:
        folder = tmp_path_factory.mktemp("uninterrupted")
        final = train(recipe(folder, models))
    finally:
        mp.undo()
    return final, captured


def test_trains_only_the_controlnet(trained, models):
    from pipelines.pixcell_controlnet import PixCellControlNet

    final, captured = trained
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(losses)) and all(r["vlb"] > 0 for r in rows if "loss" in r)
    val = [r for r in rows if "val_f1" in r]
    assert [r["step"] for r in val] == [4] and 0 <= val[0]["val_dice"] <= 1
    assert (final.parent / "validation" / "step_000004.png").is_file()

    base_file = models["base"] / "transformer" / "diffusion_pytorch_model.safetensors"
    base_state = load_file(str(base_file))
    for name, value in captured["base"].state_dict().items():  # the frozen base, after training
        assert torch.equal(value, base_state[name]), name
    vae_state = load_file(str(models["vae"] / "diffusion_pytorch_model.safetensors"))
    for name, value in captured["vae"].state_dict().items():
        assert torch.equal(value, vae_state[name]), name

    net = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((final / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "PixCellControlNet" and config["n_blocks"] == 2
    fresh = PixCellControlNet.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    assert set(net) == set(fresh.state_dict())
    # trained: zero-init parts left zero, copied blocks moved away from the base
    assert net["cond_pos_embed.proj.weight"].abs().sum() > 0
    assert all(net[f"controlnet_blocks.{i}.weight"].abs().sum() > 0 for i in range(2))
    moved = [k for k in net if k.startswith("transformer.transformer_blocks.")
             and not torch.equal(net[k], base_state[k.removeprefix("transformer.")])]
    assert moved
    # frozen parts of the copy: exactly the base
    for k in ("transformer.pos_embed.proj.weight", "transformer.adaln_single.linear.weight",
              "transformer.caption_projection.linear_1.weight", "transformer.proj_out.weight",
              "transformer.caption_projection.uncond_embedding"):
        assert torch.equal(net[k], base_state[k.removeprefix("transformer.")]), k


def test_final_is_the_published_layout_and_generates(trained):
    from pipelines.pixcell_controlnet import PixCellControlNetPipeline, is_controlnet_folder
    from studio.data.phantom_dataset import phantom_samples

    final, _ = trained
    assert is_controlnet_folder(final)
    for rel in ("model_index.json", "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
                "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "vae/config.json"):
        assert (final / rel).is_file(), rel
    assert not [p for p in final.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth", ".py")]
    pipe = PixCellControlNetPipeline.from_pretrained(final)
    sample = phantom_samples(1, seed=9, size=CROP)[0]
    out = pipe([(sample.inst, sample.cls)], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", progress=False)
    assert out.images.shape == (1, CROP, CROP, 3) and np.isfinite(out.images).all()
    # the trained ControlNet steers the base: scale 0 (base alone) gives another tile
    base_only = pipe([(sample.inst, sample.cls)], num_inference_steps=2, controlnet_conditioning_scale=0.0,
                     generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    assert np.abs(out.images - base_only.images).max() > 1e-4


def test_resume_latest_matches_uninterrupted(tmp_path, trained, models, monkeypatch):
    import training.pixcell_controlnet as tpc

    final, _ = trained
    path = recipe(tmp_path, models)
    calls = {"n": 0}
    encode = tpc.encode_batch

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the job is killed after checkpoint_2
        return encode(*a, **k)

    monkeypatch.setattr(tpc, "encode_batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(path)
    monkeypatch.setattr(tpc, "encode_batch", encode)
    run = tmp_path / "run"
    assert json.loads((run / "checkpoints" / "checkpoint_2" / "step.json").read_text()) == {"step": 2}
    assert not (run / "final").exists()
    resumed = train(path, "--resume", "latest")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4]  # steps 1-2 before the kill, 3-4 after: none repeated
    a = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "controlnet" / "diffusion_pytorch_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_missing_base_is_one_line(tmp_path, models):
    with pytest.raises(WeightsError) as err:
        train(recipe(tmp_path, models, base=str(tmp_path / "nowhere")))
    assert "nowhere" in str(err.value) and "PixCell-256" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    # as a user runs it: python -m ... exits 2 with that one line
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "training.pixcell_controlnet", "--config",
                           str(recipe(tmp_path, models)), "--base", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "nowhere" in proc.stderr and not (tmp_path / "run").exists()


def test_dataset_without_nuclei_is_one_line(tmp_path, models):
    from studio.data.base import NucleiSample
    from studio.data.registry import write_dataset

    rng = np.random.default_rng(0)
    empty = [NucleiSample(image=rng.integers(0, 255, (CROP, CROP, 3), dtype=np.uint8),
                          inst=np.zeros((CROP, CROP), np.int32), cls=np.zeros((CROP, CROP), np.uint8),
                          meta={"source": "real", "name": f"empty{i}"})
             for i in range(2)]
    data = write_dataset(tmp_path / "empty", empty, "pannuke")
    with pytest.raises(InputError) as err:
        train(recipe(tmp_path, models, sources=[{"path": str(data)}]))
    assert "no tile holds a labelled nucleus" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_final_runs_through_generate_rare(tmp_path, trained, monkeypatch):
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.data.registry import open_dataset

    final, _ = trained
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)
    out = tmp_path / "rare"
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead", "--count", "1",
                                      "--per-patch", "1", "--size", "64", "--steps", "2", "--min-agreement", "0",
                                      "--checkpoint", str(final), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(open_dataset(out)) == 1
    assert json.loads((out / "provenance.json").read_text())["backend"]["kind"] == "pixcell-controlnet"


def test_recipe_is_a_valid_config():
    from training.pixcell_controlnet import PixCellControlNetConfig
    from training.utils import load_config

    cfg = load_config(PixCellControlNetConfig, Path("training/recipes/pixcell_controlnet.yaml"))
    assert cfg.mixed_precision == "bf16" and cfg.crop_size == 256 and 0 < cfg.uni_dropout < 1


def test_init_from_a_released_controlnet(tmp_path, models):
    from factories_controlnet import write_pixcell_controlnet

    release = write_pixcell_controlnet(tmp_path / "PixCell-256-Cell-ControlNet", seed=3)
    start = load_file(str(release / "controlnet" / "diffusion_pytorch_model.safetensors"))
    final = train(recipe(tmp_path, models, init_from=str(release), max_steps=1, learning_rate=1e-6, use_ema=False,
                         validate_every=0))
    after = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    key = "controlnet_blocks.0.weight"  # random in the release: continued, not re-zeroed
    assert start[key].abs().sum() > 0 and not torch.equal(after[key], start[key])
    torch.testing.assert_close(after[key], start[key], atol=1e-4, rtol=0)
    with pytest.raises(WeightsError, match="init_from"):
        train(recipe(tmp_path / "b", models, init_from=str(tmp_path / "missing")))


def test_bf16_with_gradient_accumulation(tmp_path, models):
    """The GPU recipe's settings (bf16 autocast, frozen parts in bf16, accumulation, EMA, validation), on CPU."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a process-wide singleton
    try:
        final = train(recipe(tmp_path, models, mixed_precision="bf16", gradient_accumulation_steps=2, max_steps=2,
                             validate_every=2))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows
                                                                      if "loss" in r)
    assert any("val_f1" in r for r in rows)
    net = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in net.values()) and net["cond_pos_embed.proj.weight"].abs().sum() > 0


def test_fresh_controlnet_starts_as_the_base(tmp_path, models):
    from pipelines.pixcell_controlnet import controlled_forward
    from training.pixcell_controlnet import PixCellControlNetConfig, fresh_controlnet, load_base, trainable_parameters

    base, config, _ = load_base(PixCellControlNetConfig(base=str(models["base"])))
    net = fresh_controlnet(base, config, None)
    assert net.n_blocks == config["num_layers"]
    x, cond = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    tokens, t = torch.randn(2, 1, config["caption_channels"]), torch.tensor([10, 900])
    with torch.no_grad():
        residuals = net(x, cond, tokens, t)
        assert all(torch.count_nonzero(r) == 0 for r in residuals)
        assert torch.equal(controlled_forward(base, x, tokens, t, residuals), base(x, tokens, t).sample)
    trained = {id(p) for p in trainable_parameters(net)}
    names = [n for n, p in net.named_parameters() if id(p) in trained]
    prefixes = ("transformer.transformer_blocks.", "cond_pos_embed.", "controlnet_blocks.")
    assert all(n.startswith(prefixes) for n in names)
    assert "cond_pos_embed.proj.weight" in names and "transformer.proj_out.weight" not in names

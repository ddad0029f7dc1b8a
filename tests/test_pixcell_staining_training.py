"""Training PixCell virtual staining (flow MLP + attn2 LoRA) on tiny published-layout folders, on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factories_staining import write_staining_models_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipelines.pixcell_staining import LORA_TARGETS, PixCellStainingPipeline, lora_pairs, merge_lora
from studio.errors import HistostudioError, InputError, WeightsError
from training.pixcell_staining import LoRALinear, add_lora, lora_state, main

TINY_FLOW = {"time_embed_dim": 32, "model_channels": 32, "bottleneck_channels": 24, "num_res_blocks": 2}


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_staining_models_dir(tmp_path_factory.mktemp("staining") / "models")


def tiny_recipe(folder: Path, models: dict[str, Path], **overrides) -> Path:
    cfg = {"output_dir": str(folder / "run"), "pixcell": str(models["pixcell"]), "uni2h": str(models["uni2h"]),
           "phantom_pairs": 2, "real_pairs": False, "orientations": 2, "cache_latents": True, "max_steps": 3,
           "warmup_steps": 1, "flow": TINY_FLOW, "flow_batch_size": 16, "lora_batch_size": 1,
           "checkpoint_every": 2, "log_every": 1, "threads": 1, "val_pairs": 1, "val_flow_steps": 2, **overrides}
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """One tiny run of 3 steps (checkpoints at 2 and 3), the base weights' hashes before it."""
    folder = tmp_path_factory.mktemp("run")
    base_file = models["pixcell"] / "transformer" / "diffusion_pytorch_model.safetensors"
    before = sha(base_file)
    final = main(["--config", str(tiny_recipe(folder, models))])
    return {"final": final, "folder": folder, "base_before": before, "base_file": base_file}


# --------------------------------------------------------------------------- LoRA wrapper
def test_lora_wrapper_starts_as_the_base_and_trains_only_a_and_b(models):
    from pipelines.pixcell import load_pixcell_transformer

    base = load_pixcell_transformer(models["pixcell"] / "transformer")
    model = load_pixcell_transformer(models["pixcell"] / "transformer")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    paths = add_lora(model.requires_grad_(False), rank=4)
    assert len(paths) == 4 * base.config.num_layers and all(p.endswith(LORA_TARGETS) for p in paths)
    assert all(isinstance(model.get_submodule(p), LoRALinear) for p in paths)
    assert not any(isinstance(model.get_submodule(p), LoRALinear) for p in
                   (n for n, _ in model.named_modules() if ".attn1." in n))
    torch.manual_seed(0)
    x, tokens, t = torch.randn(2, 16, 32, 32), torch.randn(2, 16, 48), torch.tensor([10, 500])
    with torch.no_grad():
        ref = base(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0]
        assert torch.equal(model(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0], ref)
    trainable = [p for n, p in model.named_parameters() if ".lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        loss = model(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0][:, :16].pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    for key, value in frozen.items():  # every base weight bit-identical, under peft's base_layer name
        moved = key if key in state else key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(state[moved], value), key
    lora = lora_state(model)
    assert set(lora) == {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"}
    assert all(lora[f"{p}.lora_B.weight"].abs().sum() > 0 for p in paths)  # B moved off zero
    # merging the saved pairs the way the pipeline does reproduces the trained wrapper's output
    merge_lora(base, lora_pairs(lora, "trained"), "trained")
    with torch.no_grad():
        merged = base(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0]
        wrapped = model(x, encoder_hidden_states=tokens, timestep=t, return_dict=False)[0]
    assert torch.allclose(merged, wrapped, atol=1e-4)


# --------------------------------------------------------------------------- end to end
def test_tiny_run_writes_the_release_layout_with_finite_losses(trained, models):
    final = trained["final"]
    rows = [json.loads(line) for line in (trained["folder"] / "run" / "metrics.jsonl").read_text().splitlines()]
    train, val = [r for r in rows if "flow_loss" in r], [r for r in rows if "val_cos" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in val] == [2, 3]
    assert all(np.isfinite(r["flow_loss"]) and np.isfinite(r["lora_loss"]) for r in train)
    assert all(-1 <= r["val_cos"] <= 1 and -1 <= r["val_cos_he"] <= 1 and r["val_mse"] >= 0 for r in val)
    lora = load_file(str(final / "ckpts" / "lora" / "mist_her2_lora.safetensors"))
    mlp = load_file(str(final / "ckpts" / "mlp" / "mist_her2_mlp.safetensors"))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora) and len(lora) == 2 * 4 * 2
    assert {tuple(v.shape) for k, v in lora.items() if ".lora_A." in k} == {(4, 16)}  # rank 4 on 16-wide attn
    assert all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # trained off the zero init
    assert mlp["out.2.weight"].abs().sum() > 0  # the zero-initialised head learned
    assert mlp["input_proj.weight"].shape == (32, 48)
    assert sha(trained["base_file"]) == trained["base_before"]  # the base on disk untouched
    ckpt = trained["folder"] / "run" / "checkpoints" / "checkpoint_3"
    saved = {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "model_1.safetensors"))}
    assert set(saved) == set(lora) | set(mlp)  # checkpoints hold the trained weights only, never the base
    assert not list(ckpt.glob("custom_checkpoint_*"))


def test_the_trained_release_runs_through_translate(trained, models, tmp_path, monkeypatch):
    from studio.cli import app
    from studio.data.samples import load_sample
    from studio.io import read_image, write_image

    final = trained["final"]
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(models["pixcell"].parent))
    pipe = PixCellStainingPipeline.from_release(final, "her2")
    mlp = load_file(str(final / "ckpts" / "mlp" / "mist_her2_mlp.safetensors"))
    assert all(torch.equal(pipe.flow.state_dict()[k], v) for k, v in mlp.items())
    tile = np.ascontiguousarray(load_sample("hgsc_nest")[:96, :96])
    write_image(tmp_path / "tiles" / "t0.png", tile)
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "tiles"), "--stain", "her2", "--model", "pixcell",
                                      "--checkpoint", str(final), "--steps", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, (result.output, result.exception)
    ihc = read_image(tmp_path / "out" / "tiles" / "t0.png")
    assert ihc.shape == tile.shape and not np.array_equal(ihc, tile)
    run = json.loads((tmp_path / "out" / "manifest.json").read_text())["run"]
    assert run["transform"]["lora_file"].endswith("mist_her2_lora.safetensors")


def test_resume_latest_continues_at_the_checkpoint_step(models, tmp_path, capsys):
    import shutil

    recipe = tiny_recipe(tmp_path, models, max_steps=3)
    main(["--config", str(recipe)])
    ckpts = tmp_path / "run" / "checkpoints"
    at2 = {**load_file(str(ckpts / "checkpoint_2" / "model.safetensors")),
           **load_file(str(ckpts / "checkpoint_2" / "model_1.safetensors"))}
    straight = {**load_file(str(ckpts / "checkpoint_3" / "model.safetensors")),
                **load_file(str(ckpts / "checkpoint_3" / "model_1.safetensors"))}
    shutil.rmtree(ckpts / "checkpoint_3")  # as if the run had died after step 2
    capsys.readouterr()
    main(["--config", str(recipe), "--resume", "latest"])
    assert "at step 2" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "flow_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # the resumed run trained step 3 only
    resumed = {**load_file(str(ckpts / "checkpoint_3" / "model.safetensors")),
               **load_file(str(ckpts / "checkpoint_3" / "model_1.safetensors"))}
    assert set(resumed) == set(straight) and any(not torch.equal(resumed[k], at2[k]) for k in at2)
    # optimizer, schedule and batches restored: the resumed step 3 is the uninterrupted step 3
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)
    assert rows[2]["flow_loss"] == pytest.approx(rows[3]["flow_loss"], rel=1e-5)


def test_gpu_settings_run_on_cpu(models, tmp_path, fresh_accelerate_state):
    """bf16 mixed precision (frozen base in bf16), gradient checkpointing, VAE encoding per batch."""
    from safetensors import safe_open

    from studio.data.samples import load_sample
    from studio.io import write_image

    mist = tmp_path / "MIST" / "HER2" / "TrainValAB"  # a real-layout MIST folder, 300 px pairs cropped to 256
    for name, (y, x) in {"p0": (0, 0), "p1": (300, 300)}.items():
        tile = np.ascontiguousarray(load_sample("hgsc_nest")[y:y + 300, x:x + 300])
        write_image(mist / "trainA" / f"{name}.png", tile)
        write_image(mist / "trainB" / f"{name}.png", 255 - tile)
    final = main(["--config", str(tiny_recipe(tmp_path, models, mixed_precision="bf16", cache_latents=False,
                                              gradient_checkpointing=True, phantom_pairs=0, orientations=1,
                                              mist=str(tmp_path / "MIST"), max_steps=2))])
    path = final / "ckpts" / "lora" / "mist_her2_lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["trained_by"].startswith("histostudio")
        lora = {k: f.get_tensor(k) for k in f.keys()}
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # gradients reached checkpointed blocks


def test_the_flow_mlp_learns_to_move_held_out_he_tokens_towards_ihc(models, tmp_path):
    main(["--config", str(tiny_recipe(tmp_path, models, max_steps=80, checkpoint_every=80, phantom_pairs=3,
                                      orientations=4, flow_learning_rate=1e-3, lora_learning_rate=1e-3,
                                      warmup_steps=5, val_pairs=2, val_flow_steps=10, log_every=20))])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in rows if "val_mse" in r)
    assert val["val_mse"] < 0.7 * val["val_mse_he"]  # held-out pairs (seeds never trained on)
    losses = [r["flow_loss"] for r in rows if "flow_loss" in r]
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- bad input
def test_unpaired_data_is_one_line(models, tmp_path):
    from studio.data.samples import load_sample
    from studio.io import write_image

    mist = tmp_path / "MIST" / "HER2" / "TrainValAB"
    tile = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :256])
    write_image(mist / "trainA" / "a.png", tile)
    write_image(mist / "trainB" / "b.png", tile)
    with pytest.raises(InputError) as err:
        main(["--config", str(tiny_recipe(tmp_path, models, phantom_pairs=0, mist=str(tmp_path / "MIST")))])
    assert "\n" not in str(err.value) and "no IHC partner" in str(err.value)
    assert not (tmp_path / "run" / "final").exists()


def test_pairs_smaller_than_the_native_tile_are_one_line(models, tmp_path):
    from studio.data.samples import load_sample
    from studio.io import write_image

    mist = tmp_path / "MIST" / "HER2" / "TrainValAB"
    tile = np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128])
    write_image(mist / "trainA" / "a.png", tile)
    write_image(mist / "trainB" / "a.png", tile)
    with pytest.raises(InputError, match="smaller than PixCell's native 256 px"):
        main(["--config", str(tiny_recipe(tmp_path, models, phantom_pairs=0, mist=str(tmp_path / "MIST")))])


def test_missing_base_models_are_one_line(models, tmp_path):
    with pytest.raises(WeightsError, match="PixCell-1024") as err:
        main(["--config", str(tiny_recipe(tmp_path, models, pixcell=str(tmp_path / "PixCell-1024")))])
    assert "\n" not in str(err.value) and "StonyBrook-CVLab" in str(err.value)
    with pytest.raises(HistostudioError) as err:
        main(["--config", str(tiny_recipe(tmp_path, models, uni2h=str(tmp_path / "UNI2-h")))])
    assert "\n" not in str(err.value) and "UNI2-h" in str(err.value)
    with pytest.raises(InputError, match="unknown keys"):
        main(["--config", str(tiny_recipe(tmp_path, models, lora_alpha=8))])
    assert not (tmp_path / "run" / "final").exists()


def test_recipe_loads_with_gpu_settings():
    from training.pixcell_staining import PixCellStainingConfig
    from training.utils import load_config

    cfg = load_config(PixCellStainingConfig, Path(__file__).parents[1] / "training" / "recipes"
                      / "pixcell_staining_her2.yaml")
    assert cfg.mixed_precision == "bf16" and cfg.lora_rank == 4 and cfg.flow["num_res_blocks"] == 6
    assert cfg.pixcell.endswith("PixCell-1024") and cfg.uni2h.endswith("UNI2-h")


def test_the_script_prints_a_bad_recipe_as_one_line(models, tmp_path):
    import subprocess
    import sys

    recipe = tiny_recipe(tmp_path, models, pixcell=str(tmp_path / "PixCell-1024"))
    run = subprocess.run([sys.executable, "-m", "training.pixcell_staining", "--config", str(recipe)],
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("error: ") and "PixCell-1024" in run.stderr

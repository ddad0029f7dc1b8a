"""PixCell virtual staining (``translate --model pixcell``): flow MLP, LoRA merge, release files, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from factories_staining import TINY_FLOW, flow_state, lora_state, write_staining_models_dir, write_staining_release
from typer.testing import CliRunner

from pipelines.pixcell_staining import (
    FlowMLP,
    PixCellStainingPipeline,
    lora_pairs,
    merge_lora,
    read_tensors,
    staining_files,
    timestep_embedding,
)
from studio.cli import app
from studio.data.samples import load_sample
from studio.errors import HistostudioError, InputError, WeightsError
from studio.io import read_image, write_image


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)


@pytest.fixture
def models(tmp_path):
    return write_staining_models_dir(tmp_path / "models")


def he_tile(y: int = 0, x: int = 0, size: int = 96) -> np.ndarray:
    return np.ascontiguousarray(load_sample("hgsc_nest")[y:y + size, x:x + size])


# --------------------------------------------------------------------------- flow MLP
def test_flow_mlp_has_the_published_names_and_shapes():
    from accelerate import init_empty_weights

    with init_empty_weights():  # the release's size: 1536 -> 1536, width 1024, 6 residual blocks
        model = FlowMLP()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 10 + 6 * 10
    assert shapes["input_proj.weight"] == (1024, 1536)
    assert shapes["time_embed.0.weight"] == (1024, 1024) and shapes["time_embed.2.weight"] == (1024, 1024)
    assert shapes["res_blocks.5.in_layers.0.weight"] == (1024,)
    assert shapes["res_blocks.0.in_layers.2.weight"] == (1024, 1024)
    assert shapes["res_blocks.3.emb_layers.1.weight"] == (1024, 1024)
    assert shapes["res_blocks.0.out_layers.0.weight"] == (1024,) and shapes["res_blocks.0.out_layers.3.bias"] == (1024,)
    assert shapes["out.0.weight"] == (1024,) and shapes["out.2.weight"] == (1536, 1024)
    assert "res_blocks.6.in_layers.0.weight" not in shapes


def test_flow_mlp_sizes_are_read_from_the_weights():
    state = flow_state()
    model = FlowMLP.from_state_dict(state, "mlp.pth")
    assert {k: model.config[k] for k in TINY_FLOW} == TINY_FLOW
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    bad = dict(state)
    bad["res_blocks.2.emb_layers.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="res_blocks.2.emb_layers.1.weight: shape"):
        FlowMLP.from_state_dict(bad, "mlp.pth")
    with pytest.raises(WeightsError, match="not the release's flow MLP"):
        FlowMLP.from_state_dict({"weight": torch.zeros(2)}, "mlp.pth")


def test_timestep_embedding_is_cosines_then_sines():
    emb = timestep_embedding(torch.tensor([0.0, 999.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-np.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(999 * freqs), torch.sin(999 * freqs)]), atol=1e-5)


def test_flow_euler_integration_is_deterministic_and_follows_the_schedule():
    model = FlowMLP.from_state_dict(flow_state(), "mlp.pth")
    tokens = torch.randn(2, 16, TINY_FLOW["in_channels"], generator=torch.Generator().manual_seed(1))
    a, b = model.integrate(tokens, steps=5), model.integrate(tokens, steps=5)
    assert a.shape == tokens.shape and torch.equal(a, b) and not torch.allclose(a, tokens)
    x = tokens.reshape(-1, tokens.shape[-1])  # the release's Euler: t in linspace(1e-3, 1 - 1e-3), dt = 1/steps
    with torch.no_grad():
        for t in torch.linspace(1e-3, 1 - 1e-3, 5):
            x = x + 0.2 * model(x, torch.full((x.shape[0],), 999.0 * float(t)))
    assert torch.allclose(a.reshape(x.shape), x, atol=1e-5)
    still = FlowMLP(**TINY_FLOW)  # zero-initialised output layer: no velocity, tokens stay put
    assert torch.equal(still.integrate(tokens, steps=3), tokens)


# --------------------------------------------------------------------------- LoRA
def _tiny_transformer(models):
    from pipelines.pixcell import load_pixcell_transformer

    return load_pixcell_transformer(models["pixcell"] / "transformer")


def test_lora_with_zero_b_leaves_the_base_model_unchanged(models):
    base, adapted = _tiny_transformer(models), _tiny_transformer(models)
    pairs = lora_pairs(lora_state(zero_b=True), "lora.pth")
    assert len(pairs) == 4 * base.config.num_layers
    assert merge_lora(adapted, pairs, "lora.pth") == len(pairs)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), adapted.state_dict().values(),
                                                  strict=True))
    x = torch.randn(1, 16, 32, 32)
    tokens = torch.randn(1, 16, base.config.caption_channels)
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(base(x, encoder_hidden_states=tokens, timestep=t).sample,
                           adapted(x, encoder_hidden_states=tokens, timestep=t).sample)


def test_lora_adds_b_times_a_to_the_cross_attention_only(models):
    base, adapted = _tiny_transformer(models), _tiny_transformer(models)
    state = lora_state(seed=3)
    merge_lora(adapted, lora_pairs(state, "lora.pth"), "lora.pth")
    before, after = base.state_dict(), adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"transformer_blocks.{i}.attn2.{m}.weight" for i in range(base.config.num_layers)
                       for m in ("to_q", "to_k", "to_v", "to_out.0")}
    key = "transformer_blocks.1.attn2.to_v"
    delta = state[f"{key}.lora_B.default.weight"] @ state[f"{key}.lora_A.default.weight"]  # alpha / r = 4 / 4
    assert torch.allclose(after[f"{key}.weight"] - before[f"{key}.weight"], delta, atol=1e-6)


def test_lora_key_variants_and_refusals():
    state = lora_state()
    plain = {k.replace(".default", ""): v for k, v in state.items()}
    prefixed = {f"base_model.model.{k}": v for k, v in state.items()}
    full = lora_state(with_base=True)  # a whole transformer state dict after add_adapter
    ref = lora_pairs(state, "x")
    for variant in (plain, prefixed, full):
        got = lora_pairs(variant, "x")
        assert got.keys() == ref.keys() and all(torch.equal(got[k][1], ref[k][1]) for k in ref)
    on_self_attention = {k.replace("attn2", "attn1"): v for k, v in state.items()}
    with pytest.raises(WeightsError, match="adapts only attn2"):
        lora_pairs(on_self_attention, "x")
    with pytest.raises(WeightsError, match="holds no LoRA weights"):
        lora_pairs(flow_state(), "x")
    only_a = {k: v for k, v in state.items() if "lora_A" in k}
    with pytest.raises(WeightsError, match="has only lora_A"):
        lora_pairs(only_a, "x")


# --------------------------------------------------------------------------- release files
def test_release_files_per_stain_and_safetensors_preferred(tmp_path):
    release = write_staining_release(tmp_path / "rel", names=("mist_her2", "mist_ki67", "her2match"))
    lora, mlp = staining_files(release, "ki67")
    assert lora.name == "mist_ki67_lora.pth" and mlp.name == "mist_ki67_mlp.pth"
    lora, mlp = staining_files(release / "ckpts" / "lora" / "her2match_lora.pth", "her2")  # HER2Match by file
    assert mlp == release / "ckpts" / "mlp" / "her2match_mlp.pth"
    from studio.convert import convert_checkpoint

    convert_checkpoint(lora, lora.with_suffix(".safetensors"))
    assert staining_files(release / "ckpts" / "lora" / "her2match_lora.safetensors", "her2")[0].suffix == \
        ".safetensors"
    assert all(torch.equal(read_tensors(lora)[k], v)
               for k, v in read_tensors(lora.with_suffix(".safetensors")).items())
    with pytest.raises(WeightsError, match="mist_er_lora.pth: missing: the er LoRA"):
        staining_files(release, "er")


def test_pipeline_is_deterministic_with_a_seed(models):
    pipe = PixCellStainingPipeline.from_release(models["staining"], "her2")
    assert pipe.files["pixcell"].endswith("PixCell-1024") and pipe.files["uni2h"].endswith("UNI2-h")
    x = torch.from_numpy(he_tile()).permute(2, 0, 1)[None].float() / 255
    a = pipe(x, num_inference_steps=2, generator=torch.Generator().manual_seed(0), flow_steps=4)
    b = pipe(x, num_inference_steps=2, generator=torch.Generator().manual_seed(0), flow_steps=4)
    c = pipe(x, num_inference_steps=2, generator=torch.Generator().manual_seed(1), flow_steps=4)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    he = pipe.encoder.embed(torch.nn.functional.interpolate(x, size=(256, 256)), grid=(4, 4))
    ihc = pipe.ihc_tokens(torch.nn.functional.interpolate(x, size=(256, 256)), flow_steps=4)
    assert ihc.shape == he.shape == (1, 16, 48) and not torch.allclose(ihc, he)


# --------------------------------------------------------------------------- CLI
def test_translate_pixcell_writes_ihc_tiles_a_slide_and_the_dab_readout(tmp_path, models):
    from studio.slides import open_slide, write_pyramid

    tiles = tmp_path / "tiles"
    write_image(tiles / "t0.png", he_tile())
    write_image(tiles / "t1.png", he_tile(300, 300))
    slide = write_pyramid(tmp_path / "slide.tif", iter([np.ascontiguousarray(load_sample("hgsc_nest")[:160, :200])]),
                          200, 160, tile_size=512, mpp=0.5, compression="deflate")
    args = ["translate", str(tiles), str(slide), "--stain", "her2", "--model", "pixcell", "--checkpoint",
            str(models["staining"]), "--steps", "2", "--tile-size", "128", "--halo", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, (result.output, result.exception)
    out = tmp_path / "out"
    ihc = read_image(out / "tiles" / "t0.png")
    assert ihc.shape == (96, 96, 3) and not np.array_equal(ihc, he_tile())
    with open_slide(out / "slide.tif") as s:
        assert s.dimensions == (200, 160)
    readout = json.loads((out / "dab_readout.json").read_text())
    assert {"tiles/t0.png", "tiles/t1.png", "slide.tif"} <= set(readout) and "h_score" in readout["tiles/t0.png"]
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["command"] == "translate" and run["transform"]["model"] == "pixcell"
    assert run["transform"]["lora_file"].endswith("mist_her2_lora.pth")
    again = CliRunner().invoke(app, [*args[:2], "--stain", "her2", "--model", "pixcell", "--checkpoint",
                                     str(models["staining"]), "--steps", "2", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and np.array_equal(read_image(tmp_path / "again" / "tiles" / "t0.png"), ihc)


def _break(models, what):
    if what == "mlp":
        (models["staining"] / "ckpts" / "mlp" / "mist_her2_mlp.pth").unlink()
    elif what in ("uni2h", "vae"):
        shutil.rmtree(models[what])


@pytest.mark.parametrize("what, stain, message", [
    ("mlp", "her2", "mist_her2_mlp.pth: missing: the mist_her2 flow MLP; download it from Hugging Face "
                    "StonyBrook-CVLab/pixcell-virtual-staining"),
    ("lora", "pr", "mist_pr_lora.pth: missing: the pr LoRA; download it from Hugging Face"),
    ("uni2h", "her2", "needs UNI-2h: download it from Hugging Face MahmoodLab/UNI2-h"),
    ("vae", "her2", "holds only a config (PixCell does not ship the SD3.5 VAE): download vae/config.json"),
])
def test_translate_pixcell_missing_pieces_are_one_line_and_write_nothing(tmp_path, models, what, stain, message):
    _break(models, what)
    write_image(tmp_path / "in" / "t.png", he_tile())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "in"), "--out", str(out), "--stain", stain,
                                      "--model", "pixcell", "--checkpoint", str(models["staining"])])
    assert isinstance(result.exception, HistostudioError), (result.output, result.exception)
    assert message in str(result.exception) and "\n" not in str(result.exception)  # main() prints it, exit 2
    assert not out.exists()


class NotATensor:
    def __init__(self):
        self.payload = "code"


def test_a_pth_holding_an_object_is_refused(tmp_path, models):
    lora = models["staining"] / "ckpts" / "lora" / "mist_her2_lora.pth"
    torch.save({**lora_state(), "config": NotATensor()}, lora)
    with pytest.raises(WeightsError, match="refused: it holds a Python object .*NotATensor.*histostudio convert"):
        read_tensors(lora)
    torch.save({"weights": lora_state(), "step": 3}, lora)  # a dict of a dict: not a plain tensor dict
    with pytest.raises(WeightsError, match="entry 'weights' is a dict, not a tensor"):
        read_tensors(lora)
    write_image(tmp_path / "in" / "t.png", he_tile())
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                      "--model", "pixcell", "--checkpoint", str(models["staining"])])
    assert isinstance(result.exception, WeightsError) and "entry 'weights' is a dict" in str(result.exception)
    assert not list((tmp_path / "out").rglob("*.png"))


def test_translate_pixcell_needs_a_release(tmp_path):
    from pipelines.translate_job import translate_spec

    with pytest.raises(InputError, match="needs the staining release: download Hugging Face "
                                         "StonyBrook-CVLab/pixcell-virtual-staining"):
        translate_spec("her2", None, model="pixcell")
    with pytest.raises(InputError, match="no such file or folder"):
        translate_spec("her2", tmp_path / "nowhere", model="pixcell")


def test_info_lists_the_staining_release(tmp_path, models):
    from studio.published import find_published

    found = {m.kind: m for m in find_published(models["staining"].parent)}
    assert found["pixcell-staining"].ready and "mist_her2" in found["pixcell-staining"].detail
    assert "pixcell-virtual-staining" in found["pixcell-staining"].source


def test_lora_targets_match_the_published_pixcell_1024_layers():
    """At the release's size: 28 blocks x attn2 to_q/to_k/to_v/to_out.0, all 1152 x 1152 (rank-4 A/B fit them)."""
    from accelerate import init_empty_weights
    from factories_published import PIXCELL_1024_CONFIG

    from pipelines.pixcell import PixCellTransformer2DModel
    from pipelines.pixcell_staining import LORA_TARGETS

    with init_empty_weights():
        model = PixCellTransformer2DModel.from_config(PIXCELL_1024_CONFIG)
    targets = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(LORA_TARGETS)}
    assert len(targets) == 28 * 4 and set(targets.values()) == {(1152, 1152)}
    assert "transformer_blocks.27.attn2.to_out.0" in targets


def test_inputs_keep_their_magnification_on_padded_or_large_canvases(models):
    pipe = PixCellStainingPipeline.from_release(models["staining"], "her2")
    assert pipe.native_size == 256 and pipe.token_pixels == 64  # tiny geometry (the release: 1024 and 256)
    assert pipe.canvas_for(96, 96) is None  # too small to pad: resized to the native size
    assert pipe.canvas_for(160, 200) == (256, 256)  # reflect-padded, one 4x4 window
    assert pipe.canvas_for(320, 300) == (320, 320)  # a 5x5 token grid on one canvas (overlapping windows)
    x = torch.from_numpy(he_tile(size=320)[:, :300]).permute(2, 0, 1)[None].float() / 255
    a = pipe(x, num_inference_steps=1, generator=torch.Generator().manual_seed(0), flow_steps=2)
    b = pipe(x, num_inference_steps=1, generator=torch.Generator().manual_seed(0), flow_steps=2)
    assert a.shape == x.shape and torch.equal(a, b)
    small = pipe(x[..., :160, :200], num_inference_steps=1, generator=torch.Generator().manual_seed(0), flow_steps=2)
    assert small.shape == (1, 3, 160, 200)

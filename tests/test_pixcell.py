"""PixCell from its published layout: names and shapes, tiny runs on CPU, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from factories_published import (
    PIXCELL_256_CONFIG,
    PIXCELL_1024_CONFIG,
    TINY_UNI_DIM,
    write_models_dir,
    write_pixcell,
    write_sd35_vae,
    write_uni2h,
)
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from pipelines.pixcell import PixCellPipeline, PixCellTransformer2DModel, uni_grid_pos_embed
from studio.cli import app
from studio.errors import InputError, WeightsError

torch.set_num_threads(1)
runner = CliRunner()


def published_pixcell_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """PixCell's parameter names and shapes, written out from the release (PixArt-Sigma blocks,
    ``caption_projection`` with ``uncond_embedding``, ``y_pos_embed`` for more than one token)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    c, n, p = cfg["caption_channels"], cfg["caption_num_tokens"], cfg["patch_size"]
    shapes = {"pos_embed.proj.weight": (d, cfg["in_channels"], p, p), "pos_embed.proj.bias": (d,),
              "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
              "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
              "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
              "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
              "adaln_single.linear.weight": (6 * d, d), "adaln_single.linear.bias": (6 * d,),
              "caption_projection.linear_1.weight": (d, c), "caption_projection.linear_1.bias": (d,),
              "caption_projection.linear_2.weight": (d, d), "caption_projection.linear_2.bias": (d,),
              "caption_projection.uncond_embedding": (n, c), "scale_shift_table": (2, d),
              "proj_out.weight": (p * p * cfg["out_channels"], d), "proj_out.bias": (p * p * cfg["out_channels"],)}
    if n > 1:
        shapes["y_pos_embed.y_pos_embed"] = (1, n, c)
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        shapes[b + "scale_shift_table"] = (6, d)
        for attn, kv in (("attn1", d), ("attn2", cfg["cross_attention_dim"])):
            shapes |= {f"{b}{attn}.to_q.weight": (d, d), f"{b}{attn}.to_k.weight": (d, kv),
                       f"{b}{attn}.to_v.weight": (d, kv), f"{b}{attn}.to_out.0.weight": (d, d)}
            shapes |= {f"{b}{attn}.{m}.bias": (d,) for m in ("to_q", "to_k", "to_v", "to_out.0")}
        shapes |= {b + "ff.net.0.proj.weight": (4 * d, d), b + "ff.net.0.proj.bias": (4 * d,),
                   b + "ff.net.2.weight": (d, 4 * d), b + "ff.net.2.bias": (d,)}
    return shapes


@pytest.mark.parametrize("config", [PIXCELL_256_CONFIG, PIXCELL_1024_CONFIG], ids=["256", "1024"])
def test_full_size_names_shapes_and_file_size_are_the_published_ones(config):
    with init_empty_weights():
        model = PixCellTransformer2DModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == published_pixcell_shapes(config)
    numel = sum(v.numel() for v in model.state_dict().values())
    assert abs(numel * 4 / 1e9 - 2.43) < 0.01  # diffusion_pytorch_model.safetensors: 2.43 GB in fp32
    assert model.inner_dim == 1152 and model.config.out_channels == 2 * model.config.in_channels == 32


def test_uni_grid_position_embedding():
    # Phase 0 (base 8 over 16 tokens) is diffusers' own 2D sin-cos embedding of a 4x4 grid.
    ours = uni_grid_pos_embed(32, 16, base_size=8, interpolation_scale=2)
    assert torch.allclose(ours[0], get_2d_sincos_pos_embed(32, 4, base_size=8, interpolation_scale=2).float())
    # PixCell-1024 (base 64): grid positions 0, 8, 16, 24 shifted by the phase 64 // 16 = 4; the first
    # half of the channels encodes the column (sin then cos), the second half the row.
    pub = uni_grid_pos_embed(1536, 16, base_size=64, interpolation_scale=2)[0]
    assert pub.shape == (16, 1536)
    sin, cos = torch.tensor([4.0, 12.0]).sin(), torch.tensor([4.0, 12.0]).cos()
    assert torch.allclose(pub[1, [0, 384, 768]], torch.stack([sin[1], cos[1], sin[0]]))  # row 0, column 1
    assert torch.allclose(pub[4, [0, 768, 1152]], torch.stack([sin[0], sin[1], cos[1]]))  # row 1, column 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models_dir(tmp_path_factory.mktemp("models"))


def test_published_layout_loads_without_remote_code(models):
    folder = models["pixcell"]
    assert (folder / "transformer" / "pixcell_transformer_2d.py").is_file()  # present, never imported
    assert not list((folder / "vae").glob("*.safetensors"))  # the release's vae/ is a config only
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        names = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert names == published_pixcell_shapes(config) and set(config) == set(PIXCELL_256_CONFIG)
    pipe = PixCellPipeline.from_pretrained(folder)  # SD3.5 VAE found beside it in the models folder
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.vae.config.scaling_factor == 1.5305 and pipe.vae.config.shift_factor == 0.0609
    assert pipe.native_size == 256 and pipe.conditioner.grid_for(256, 256) == (1, 1)


def test_one_tile_at_two_steps_with_guidance(models):
    pipe = PixCellPipeline.from_pretrained(models["pixcell"])
    tokens = torch.randn(1, 1, TINY_UNI_DIM, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        return pipe(tokens, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np",
                    progress=False, **kw).images

    guided = run(guidance_scale=2.0)
    assert guided.shape == (1, 256, 256, 3) and guided.std() > 0.01
    assert (run(guidance_scale=2.0) == guided).all()  # seeded: reproducible
    assert not (run(guidance_scale=1.0) == guided).all()  # the learned null embedding takes part
    # The latents are mapped through the SD3.5 VAE's shift and scale.
    z = torch.randn(1, 16, 8, 8)
    assert torch.allclose(pipe.decode(z), ((pipe.vae.decode(z / 1.5305 + 0.0609).sample + 1) / 2).clamp(0, 1))
    ddim = PixCellPipeline.from_pretrained(models["pixcell"], scheduler="ddim")
    assert ddim(tokens, num_inference_steps=2, output_type="np", progress=False).images.shape == (1, 256, 256, 3)


def test_1024_mode_takes_a_4x4_grid_of_uni_tokens(tmp_path, models):
    folder = write_pixcell(tmp_path / "PixCell-1024", tokens=16)
    pipe = PixCellPipeline.from_pretrained(folder, vae=models["vae"])
    assert pipe.tokens_per_image == 16 and pipe.conditioner.grid_for(*(pipe.native_size,) * 2) == (4, 4)
    assert pipe.transformer.caption_projection.uncond_embedding.shape == (16, TINY_UNI_DIM)
    tokens = torch.randn(1, 16, TINY_UNI_DIM, generator=torch.Generator().manual_seed(0))
    kw = {"num_inference_steps": 2, "output_type": "np", "progress": False, "guidance_scale": 1.5}
    image = pipe(tokens, generator=torch.Generator().manual_seed(0), **kw).images
    assert image.shape == (1, 256, 256, 3)
    # Token positions matter: the same tokens in another grid order give another image.
    flipped = pipe(tokens.flip(1), generator=torch.Generator().manual_seed(0), **kw).images
    assert not (flipped == image).all()
    with pytest.raises(InputError, match="1 UNI tokens; this PixCell model takes 16"):
        pipe(tokens[:, :1], **kw)
    # One canvas twice the native size: an 8x8 grid, windows on 4x4 token cells.
    large = pipe(torch.randn(1, 64, TINY_UNI_DIM), height=512, width=512, grid=(8, 8), **kw)
    assert large.images.shape == (1, 512, 512, 3) and large.grid == (8, 8)
    with pytest.raises(InputError, match="--grid 8x8"):
        pipe(torch.randn(1, 16, TINY_UNI_DIM), height=512, width=512, grid=(4, 4), **kw)


def test_missing_sd35_vae_names_the_download(tmp_path):
    folder = write_pixcell(tmp_path / "PixCell-256")
    with pytest.raises(WeightsError) as err:
        PixCellPipeline.from_pretrained(folder)
    message = str(err.value)
    assert "\n" not in message and "stabilityai/stable-diffusion-3.5-large" in message
    assert "diffusion_pytorch_model.safetensors" in message and str(folder / "vae") in message
    write_sd35_vae(tmp_path / "sd3.5-vae")  # downloaded beside it: found
    assert PixCellPipeline.from_pretrained(folder).vae.config.latent_channels == 16


def test_config_dimensions_disagreeing_with_weights(tmp_path, models):
    folder = write_pixcell(tmp_path / "PixCell-256")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["attention_head_dim"] = 12
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"'.+' is \(\d+.*\) but the config implies .*different models") as err:
        PixCellPipeline.from_pretrained(folder, vae=models["vae"])
    assert "\n" not in str(err.value)
    config |= {"attention_head_dim": 8, "num_layers": 3}
    config_path.write_text(json.dumps(config))
    missing = "lacks 21 parameters of PixCellTransformer2DModel, e.g. 'transformer_blocks.2.scale_shift_table'"
    with pytest.raises(WeightsError, match=missing):
        PixCellPipeline.from_pretrained(folder, vae=models["vae"])


def test_truncated_safetensors(tmp_path, models):
    folder = write_pixcell(tmp_path / "PixCell-256")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    with pytest.raises(WeightsError, match="truncated") as err:
        PixCellPipeline.from_pretrained(folder, vae=models["vae"])
    assert "\n" not in str(err.value) and str(weights) in str(err.value)


def test_folders_of_other_model_types(tmp_path, models):
    from factories import tiny_pipeline

    studio_pipe = tmp_path / "embedding-ldm"
    tiny_pipeline().save_pretrained(studio_pipe)
    with pytest.raises(WeightsError, match="is a EmbeddingToImagePipeline folder, not PixCell"):
        PixCellPipeline.from_pretrained(studio_pipe)
    with pytest.raises(WeightsError, match="no model_index.json"):
        PixCellPipeline.from_pretrained(models["uni2h"])
    folder = write_pixcell(tmp_path / "PixArt")
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(WeightsError, match="PixArtTransformer2DModel model, not PixCellTransformer2DModel"):
        PixCellPipeline.from_pretrained(folder, vae=models["vae"])
    # Weights of another model under PixCell's file name: named, one line.
    other = write_pixcell(tmp_path / "Other")
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.zeros(1)},
              str(other / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match="holds none of PixCellTransformer2DModel's parameters"):
        PixCellPipeline.from_pretrained(other, vae=models["vae"])


def test_generate_embedding_runs_pixcell_with_uni2h(tmp_path, models, monkeypatch):
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(models["pixcell"].parent))
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--checkpoint", str(models["pixcell"]),
                                 "--n", "1", "--steps", "2", "--scheduler", "dpm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder_identity"].startswith("uni2h:") and manifest["grid"] == [1, 1]
    assert (out / "variation_0000.png").is_file()


def test_generate_embedding_without_uni2h_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)
    folder = write_pixcell(tmp_path / "alone" / "PixCell-256")
    write_sd35_vae(tmp_path / "alone" / "sd3.5-vae")
    result = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--checkpoint", str(folder), "--n", "1",
                                 "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "uni2h:/path/to/UNI2-h" in str(result.exception)
    uni = write_uni2h(tmp_path / "elsewhere" / "UNI2-h")
    result = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--checkpoint", str(folder), "--n", "1",
                                 "--steps", "1", "--encoder", f"uni2h:{uni}", "--large", "512x512", "--grid", "2x2",
                                 "--out", str(tmp_path / "large")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "large" / "large_512x512_0000.png") as image:
        assert image.size == (512, 512)
    assert json.loads((tmp_path / "large" / "manifest.json").read_text())["grid"] == [2, 2]

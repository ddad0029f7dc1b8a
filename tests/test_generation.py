"""`histostudio embed` / `generate embedding` end to end on a tiny checkpoint, and the
embedding sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import DIM, tiny_checkpoint, tiny_encoder
from typer.testing import CliRunner

from pipelines.embedding_sampler import EmbeddingSampler, slerp
from pipelines.generation import load_embeddings, parse_size
from studio.cli import app
from studio.errors import InputError
from studio.io import read_image

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "embedding-ldm")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_variations_are_written_with_provenance_and_are_seeded(checkpoint, tmp_path):
    a = invoke("generate", "embedding", "--from", "skin", "--n", 2, "--steps", 2, "--size", 128,
               "--checkpoint", checkpoint, "--out", tmp_path / "a", "--seed", 5)
    assert "wrote contact sheet" in a.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seeds"] == [5, 6] and manifest["grid"] == [2, 2] and manifest["source"] == "skin"
    first = read_image(tmp_path / "a" / "variation_0005.png")
    second = read_image(tmp_path / "a" / "variation_0006.png")
    assert first.shape == (128, 128, 3) and not np.array_equal(first, second)
    invoke("generate", "embedding", "--from", "skin", "--n", 1, "--steps", 2, "--size", 128,
           "--checkpoint", checkpoint, "--out", tmp_path / "b", "--seed", 5)
    assert np.array_equal(first, read_image(tmp_path / "b" / "variation_0005.png"))


def test_large_image_and_embedding_files(checkpoint, tmp_path):
    invoke("generate", "embedding", "--from", "hgsc_nest", "--large", "192x128", "--grid", "2x3", "--n", 1,
           "--steps", 2, "--checkpoint", checkpoint, "--out", tmp_path / "large")
    big = read_image(tmp_path / "large" / "large_192x128_0000.png")
    assert big.shape == (128, 192, 3)
    emb, grid, _ = load_embeddings(tmp_path / "large" / "embeddings.safetensors")
    assert emb.shape == (1, 6, DIM) and grid == (2, 3)

    encoder = json.loads((checkpoint / "encoder.json").read_text())["encoder"]
    invoke("embed", "skin", "tiatoolbox_target", "--out", tmp_path / "e.safetensors", "--encoder", encoder,
           "--grid", "2x2", "--size", 128)
    emb, grid, meta = load_embeddings(tmp_path / "e.safetensors")
    assert emb.shape == (2, 4, DIM) and grid == (2, 2) and json.loads(meta["sources"]) == ["skin",
                                                                                           "tiatoolbox_target"]
    invoke("generate", "embedding", "--embeddings", tmp_path / "e.safetensors", "--n", 1, "--steps", 2,
           "--size", 128, "--checkpoint", checkpoint, "--out", tmp_path / "from_file")
    assert len(list((tmp_path / "from_file").glob("emb*.png"))) == 2


def test_label_sampled_tiles(checkpoint, tmp_path):
    invoke("generate", "embedding", "--label", "tumour", "--n", 2, "--steps", 2, "--size", 128,
           "--checkpoint", checkpoint, "--out", tmp_path / "lab")
    assert len(list((tmp_path / "lab").glob("tumour_*.png"))) == 2
    bad = runner.invoke(app, ["generate", "embedding", "--label", "necrosis", "--size", "128", "--out",
                              str(tmp_path / "x"), "--checkpoint", str(checkpoint)])
    assert "unknown label" in str(bad.exception)


def test_generation_errors_are_clear(checkpoint, tmp_path):
    both = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--embeddings", "x", "--out", "o",
                               "--checkpoint", str(checkpoint)])
    assert both.exit_code != 0 and "exactly one of" in str(both.exception)
    other = tiny_encoder(tmp_path / "enc8", embed_dim=8)
    wrong = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--out", str(tmp_path / "w"),
                                "--checkpoint", str(checkpoint), "--encoder", str(other), "--steps", "1"])
    assert "gives 8-dimensional embeddings" in str(wrong.exception)
    missing = runner.invoke(app, ["generate", "embedding", "--from", "skin", "--out", str(tmp_path / "m"),
                                  "--checkpoint", str(tmp_path / "nothing")])
    assert "no such checkpoint" in str(missing.exception)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        parse_size("1024")


def test_embedding_sampler_fits_labels_and_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    stroma = torch.randn(40, 4, 8, generator=gen) * 0.1 + 1.0
    tumour = torch.randn(40, 4, 8, generator=gen) * 0.1 - 1.0
    sampler = EmbeddingSampler(rank=4).fit(torch.cat([stroma, tumour]), ["stroma"] * 40 + ["tumour"] * 40)
    draws = sampler.sample("tumour", 200, torch.Generator().manual_seed(1))
    assert draws.shape == (200, 4, 8)
    assert abs(draws.mean().item() + 1.0) < 0.05 and abs(draws.std().item() - 0.1) < 0.03
    again = EmbeddingSampler.load(sampler.save(tmp_path / "s"))
    torch.testing.assert_close(again.sample("stroma", 3, torch.Generator().manual_seed(2)),
                               sampler.sample("stroma", 3, torch.Generator().manual_seed(2)))
    with pytest.raises(InputError, match="unknown label"):
        sampler.sample("necrosis", 1)
    a, b = torch.randn(2, 4, 8, generator=gen)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2, atol=1e-5)


def test_default_sampler_clips_latent_x0_and_unclipped_ones_warn(tmp_path):
    """The shipped model is epsilon-prediction on the cosine schedule (alpha_bar(999) ~ 2e-9):
    the default sampler is DDIM with x0 clipped to the latents' range; DPM/Euler warn."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from pipelines.generation import GenerationSettings, load_generation_pipeline
    from pipelines.loading import LATENT_CLIP

    folder = tiny_checkpoint(tmp_path / "ck")
    from pipelines.embedding_to_image import EmbeddingToImagePipeline

    pipe = EmbeddingToImagePipeline.from_pretrained(folder)
    pipe.scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    pipe.save_pretrained(folder)
    loaded = load_generation_pipeline(GenerationSettings(checkpoint=str(folder), encoder="auto"))
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.scheduler.config.clip_sample and loaded.scheduler.config.clip_sample_range == LATENT_CLIP
    loaded.scheduler.set_timesteps(10)
    assert int(loaded.scheduler.timesteps[0]) < 99  # the degenerate last timestep is not sampled
    with pytest.warns(UserWarning, match="only with DDIM"):
        load_generation_pipeline(GenerationSettings(checkpoint=str(folder), encoder="auto", scheduler="dpm"))

"""StainFuser-style normalization: pairs, pipeline, tile transform over slides, training recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.stain_fuser import (
    ReferenceEncoder,
    StainFuserPipeline,
    StainFuserTransform,
    create_tile_transform,
    positional_noise,
    reference_lab_profile,
    reference_statistics,
    reinhard_prior,
    reinhard_target,
)
from studio.cli import app
from studio.data.samples import load_sample
from studio.data.stain_pairs import KNOWN_SHIFTS, apply_known_shift, make_pairs, read_pairs
from studio.errors import HistostudioError, InputError
from studio.io import read_image, to_tensor, write_image


def tiny_fuser(mode: str = "diffusion", prior: str = "none") -> StainFuserPipeline:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    inputs = 12 if prior != "none" else 8
    unet = UNet2DModel(sample_size=16, in_channels=inputs, out_channels=4, block_out_channels=(16, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1, class_embed_type="identity", time_embedding_dim=32)
    return StainFuserPipeline(vae=vae, unet=unet, reference_encoder=ReferenceEncoder(embed_dim=32),
                              scheduler=DDIMScheduler(num_train_timesteps=100), mode=mode, prior=prior)


@pytest.fixture(scope="module")
def fuser_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck") / "stain-fuser"
    tiny_fuser().save_pretrained(folder)
    return folder


def test_pairs_share_structure_and_write_provenance(tmp_path):
    result = CliRunner().invoke(app, ["data", "stain-pairs", "--out", str(tmp_path / "p"), "--n", "6", "--size",
                                      "64", "--real-target", "0.5", "--seed", "2"])
    assert result.exit_code == 0, (result.output, result.exception)
    pairs = read_pairs(tmp_path / "p")
    assert len(pairs) == 6 and pairs[0].source.shape == (64, 64, 3)
    assert all("restain" in p.meta["source"] for p in pairs)
    for p in pairs:  # same tissue: hematoxylin structure agrees although colours differ
        from studio.color import hematoxylin_od

        hs, ht = (hematoxylin_od(to_tensor(x))[0, 0].flatten() for x in (p.source, p.target))
        assert torch.corrcoef(torch.stack([hs, ht]))[0, 1] > 0.7
    real = [p for p in pairs if p.meta["target"] == "real"]
    image = load_sample(real[0].meta["image"]) if real else None
    if real:  # a real target is the untouched crop of the held-in band
        m = real[0].meta
        assert np.array_equal(real[0].target, image[m["y"]:m["y"] + 64, m["x"]:m["x"] + 64])


def test_known_shifts_include_tone_changes_outside_the_stain_family():
    tile = to_tensor(np.ascontiguousarray(load_sample("tiatoolbox_target")[:64, :64]))
    outs = {name: apply_known_shift(tile, name) for name in KNOWN_SHIFTS}
    assert all(o.shape == tile.shape and not torch.equal(o, tile) for o in outs.values())
    grey = outs["desaturated"]
    assert (grey - grey.mean(1, keepdim=True)).abs().mean() < (tile - tile.mean(1, keepdim=True)).abs().mean()


def test_positional_noise_agrees_on_overlaps():
    a = positional_noise((4, 20, 20), (3, 5), seed=7)
    b = positional_noise((4, 20, 20), (13, 15), seed=7)  # overlaps a by 10x10
    assert torch.equal(a[:, 10:, 10:], b[:, :10, :10])
    assert not torch.equal(positional_noise((4, 8, 8), (0, 0), 7), positional_noise((4, 8, 8), (0, 0), 8))


def test_pipeline_modes_blank_passthrough_and_errors(fuser_folder):
    pipe = StainFuserPipeline.from_pretrained(fuser_folder)
    src = np.ascontiguousarray(load_sample("hgsc_nest")[:64, :64])
    ref = np.ascontiguousarray(load_sample("tiatoolbox_target")[:128, :128])
    a = pipe(src, [ref], output_type="np").images
    b = pipe(src, [ref], output_type="np").images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)  # deterministic
    blank = np.full((64, 64, 3), 245, np.uint8)
    with pytest.warns(UserWarning, match="passed through"):
        out = pipe(np.stack([src, blank]), [ref], output_type="np")
    assert out.passed_through == [False, True]
    assert np.abs(out.images[1] * 255 - blank).max() < 1  # nothing hallucinated on glass
    with pytest.raises(InputError, match="no tissue"):
        pipe(src, [blank])
    with pytest.raises(InputError, match="multiples of"):
        pipe(src[:50, :50], [ref])
    regressor = tiny_fuser("regressor")
    assert regressor(src, [ref], output_type="np").images.shape == (1, 64, 64, 3)
    stats = reference_statistics(to_tensor(ref))
    assert stats.shape == (15,) and torch.isfinite(stats).all()


@pytest.mark.parametrize("prior", ["none", "reinhard"])
def test_normalize_method_stainfuser_runs_the_slide_job(tmp_path, fuser_folder, prior):
    """Over a slide batch; a prior model gets its Reinhard target from the reference and one
    source estimate per slide."""
    from studio.slides import open_slide, write_pyramid

    if prior != "none":
        fuser_folder = tmp_path / "prior-fuser"
        tiny_fuser(prior=prior).save_pretrained(fuser_folder)

    region = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :320])
    slide = write_pyramid(tmp_path / "s.tif", iter([region]), 320, 256, tile_size=512, mpp=0.5,
                          compression="deflate")
    write_image(tmp_path / "tiles" / "a.png", np.ascontiguousarray(load_sample("skin")[:64, :64]))
    transform = create_tile_transform(reference="tiatoolbox_target", checkpoint=str(fuser_folder), halo=16)
    assert transform.describe()["reference"] == "tiatoolbox_target" and transform.describe()["prior"] == prior
    assert (transform.prior_target is not None) == (prior != "none")
    from studio.jobs import JobOptions, expand_inputs, run_job

    out = tmp_path / "out"
    report = run_job(expand_inputs([str(slide), str(tmp_path / "tiles")], out), transform, out,
                     JobOptions(tile_size=128, compression="deflate"))
    assert report.ok, report.failed
    with open_slide(out / "s.tif") as s:
        assert s.dimensions == (320, 256)
    assert read_image(out / "tiles" / "a.png").shape == (64, 64, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["method"] == "stainfuser" and manifest["units"]["s"]["halo"] == 16


def test_stainfuser_needs_a_reference_and_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="needs a reference"):
        create_tile_transform(reference=None)
    with pytest.raises(HistostudioError, match="no such pipeline folder: train .* training/recipes/stain_fuser.yaml"):
        create_tile_transform(reference="tiatoolbox_target", checkpoint=str(tmp_path / "nothing"))


@pytest.mark.parametrize("bank_size", [0, 3])
def test_training_recipes_run_and_resume(tmp_path, bank_size):
    """Both recipes, with fresh pairs every step (bank 0) and with a pre-encoded pair bank."""
    import yaml

    from training.stain_fuser import main

    # The prior recipes (a bank by design) run in the bank case only.
    names = ("stain_fuser", "stain_fuser_regressor") + (("stain_fuser_regressor_prior", "stain_fuser_prior")
                                                         if bank_size else ())
    for name in names:
        cfg = yaml.safe_load(open(f"training/recipes/{name}.yaml"))
        cfg.update(output_dir=str(tmp_path / name), crop_size=64, batch_size=2, max_steps=2, validate_every=2,
                   checkpoint_every=1, val_pairs=2, unet_channels=[32, 32, 32], style_dim=64, inference_steps=2,
                   bank_size=bank_size)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        final = main(["--config", str(tmp_path / f"{name}.yaml")])
        loaded = StainFuserPipeline.from_pretrained(final)
        assert loaded.config.mode == cfg["mode"] and loaded.prior == cfg.get("prior", "none")
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert {"val_ciede2000", "val_ssim"} <= set(rows[-1])
    main(["--config", str(tmp_path / "stain_fuser.yaml"), "--resume", "latest", "--max-steps", "3"])
    assert (tmp_path / "stain_fuser" / "checkpoints" / "checkpoint_3").is_dir()


def test_make_pairs_bad_requests():
    with pytest.raises(InputError, match="at least one pair"):
        make_pairs([load_sample("skin")], 0, 64)
    with pytest.raises(InputError, match="none is at least"):
        make_pairs([np.zeros((32, 32, 3), np.uint8)], 2, 64)


def test_pair_bank_holds_the_recipe_pairs_encoded():
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from pipelines.encoders import load_model_folder
    from studio.data.splits import regions
    from studio.stain.reinhard import ReinhardNormalizer
    from training.stain_fuser import PairBank, StainFuserConfig, pair_batch, source_profile

    vae = load_model_folder(AutoencoderKL, "checkpoints/tile-vae").eval()
    train = regions("train")
    cfg = StainFuserConfig(crop_size=64)
    bank = PairBank(vae, list(train.values()), list(train), 3, cfg, "cpu", chunk=2)
    assert len(bank) == 3
    src, tgt, ref = pair_batch(list(train.values()), list(train), 50_000_002, replace(cfg, batch_size=1))
    with torch.no_grad():
        expected = vae.encode(tgt * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(bank.parts["target"][2], expected[0])
    torch.testing.assert_close(bank.parts["stats"][2], reference_statistics(ref[:1]))
    batch = bank.batch(4, torch.Generator().manual_seed(0))
    assert set(batch) == {"source", "target", "stats"}
    assert batch["source"].shape == batch["target"].shape == (4, 4, 16, 16) and batch["stats"].shape == (4, 15)

    prior_cfg = replace(cfg, prior="reinhard")
    with_prior = PairBank(vae, list(train.values()), list(train), 3, prior_cfg, "cpu", chunk=2)
    src2, tgt2, ref2, context = pair_batch(list(train.values()), list(train), 50_000_002,
                                           replace(prior_cfg, batch_size=1))
    # the second view changes nothing about the pair itself
    torch.testing.assert_close(src2, src)
    torch.testing.assert_close(tgt2, tgt)
    torch.testing.assert_close(ref2, ref)
    with torch.no_grad():
        pooled = source_profile(ReinhardNormalizer(), [src[0], context[0]])
        prior = reinhard_prior(src, reinhard_target(ref[0]), pooled)
        expected = vae.encode(prior * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(with_prior.parts["prior"][2], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(with_prior.parts["target"][2], bank.parts["target"][2])


def test_reinhard_prior_is_the_classical_reinhard():
    """The prior is the studio's tissue-masked Reinhard fitted on the reference tiles."""
    from studio.stain import get_normalizer

    tile = to_tensor(np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128]))
    reference = apply_known_shift(to_tensor(np.ascontiguousarray(load_sample("hgsc_nest")[200:328, :128])),
                                  next(iter(KNOWN_SHIFTS)))
    classical = get_normalizer("reinhard")
    classical.fit(list(reference))
    torch.testing.assert_close(reinhard_prior(tile, reinhard_target(reference)), classical.transform(tile))
    two = reinhard_prior(tile.repeat(2, 1, 1, 1), [reinhard_target(reference)] * 2)
    torch.testing.assert_close(two[1], classical.transform(tile)[0])
    # The statistics vector holds the same kind of target (LAB mean / std; another tissue rule).
    approx = reference_lab_profile(reference_statistics(reference))
    assert np.allclose(approx.lab_mean, reinhard_target(reference).lab_mean, atol=8)


def test_prior_regressor_is_a_residual_on_the_classical_estimate():
    """With a zero residual the regressor returns the prior's latent decoded; the slide
    transform hands it one source profile per slide."""
    from diffusers import DDIMScheduler

    pipe = tiny_fuser("regressor", prior="reinhard")
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    tile = np.ascontiguousarray(load_sample("hgsc_nest")[:64, :64])
    stats = reference_statistics(to_tensor(np.ascontiguousarray(load_sample("skin")[:128, :128])))
    skin = np.ascontiguousarray(load_sample("skin")[:128, :128])
    out = pipe(tile, [skin], detail="model", output_type="pt").images
    with torch.no_grad():
        prior = reinhard_prior(to_tensor(tile), reinhard_target([skin]))
        latent = pipe.vae.encode(prior * 2 - 1).latent_dist.mode()
        expected = ((pipe.vae.decode(latent).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert pipe.config.prior == "reinhard"
    transform = StainFuserTransform(pipe, stats, steps=2)
    transform.prior_target = reinhard_target([skin])
    slide = transform.estimate([np.ascontiguousarray(load_sample("hgsc_nest")[y:y + 64, :64]) for y in (0, 64)])
    assert slide is not None and slide.method == "reinhard"
    assert transform.apply(tile[None], slide).shape == (1, 64, 64, 3)
    assert transform.estimate([np.full((64, 64, 3), 250, np.uint8)]) is None  # glass: each tile its own
    with pytest.raises(HistostudioError, match="takes 8 input channels; prior='reinhard'"):
        StainFuserPipeline(vae=pipe.vae, unet=tiny_fuser().unet, reference_encoder=pipe.reference_encoder,
                           scheduler=DDIMScheduler(num_train_timesteps=100), mode="regressor", prior="reinhard")

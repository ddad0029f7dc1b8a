"""Virtual IHC: pair builder, DAB read-out, pipeline, training recipe, ``histostudio translate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline
from studio.cli import app
from studio.dab import dab_positive_fraction, dab_readout, h_score
from studio.data.ihc_pairs import hgsc_pairs, misregister, phantom_pair, phantom_pairs
from studio.data.samples import load_sample
from studio.errors import HistostudioError, InputError, WeightsError
from studio.io import read_image, to_tensor, write_image


def tiny_vihc(folder, stain: str = "her2"):
    torch.manual_seed(0)
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), stain=stain).save_pretrained(folder)
    return folder


def test_phantom_pairs_have_marker_truth_and_misregistration():
    aligned = phantom_pair(128, "her2", seed=3, aligned=True)
    shifted = phantom_pair(128, "her2", seed=3)
    assert np.array_equal(aligned.he, shifted.he)  # the H&E side is untouched
    assert not np.array_equal(aligned.ihc, shifted.ihc)
    assert abs(shifted.meta["shift_x"]) <= 6 and abs(shifted.meta["rotate_deg"]) <= 2
    assert aligned.marker.any()
    # DAB sits where the truth says: positive pixels are much browner than the rest
    from studio.dab import dab_density

    d = dab_density(aligned.ihc)
    assert d[aligned.marker].mean() > 3 * d[~aligned.marker].mean()
    ki67 = phantom_pair(128, "ki67", seed=3, aligned=True)
    assert ki67.marker.sum() != aligned.marker.sum()  # nuclear vs membranous pattern


def test_real_he_pairs_from_the_labelled_tile():
    pairs = hgsc_pairs(256, "her2", split="train", stride=256)
    assert len(pairs) >= 10
    real = load_sample("hgsc_nest")
    assert np.array_equal(pairs[0].he, real[:256, :256])  # real pixels on the H&E side
    positive = [p for p in pairs if p.marker.any()]
    assert positive and len(positive) < len(pairs)  # some crops hold HER2+ neoplastic cells, some none
    assert max(dab_positive_fraction(p.ihc) for p in positive) > 0.02
    assert all(dab_positive_fraction(p.ihc) < 0.01 for p in pairs if not p.marker.any())


def test_misregister_warps_masks_and_images_alike():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 255
    mask = image[..., 0] > 0
    (warped, wmask), info = misregister([image, mask], rng, shift=5, rotate_deg=0, elastic=0)
    assert wmask.dtype == bool and abs(int(wmask.sum()) - 400) < 60
    assert np.array_equal(warped[..., 0] > 127, wmask) or (warped[..., 0] > 127).sum() == pytest.approx(wmask.sum(),
                                                                                                         abs=40)


def test_dab_readout_and_h_score_on_real_images():
    ihc, he = load_sample("ihc"), load_sample("hgsc_nest")
    r = dab_readout(ihc)
    assert 20 < r["dab_positive_percent"] < 35 and r["dab_positive_percent"] < r["h_score"] < 150
    assert h_score(he)["h_score"] < 5  # H&E has next to no DAB
    blank = np.full((32, 32, 3), 250, np.uint8)
    assert h_score(blank)["h_score"] == 0.0


def test_pipeline_fast_and_diffusion_round_trip(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    unet = UNet2DModel(sample_size=16, in_channels=8, out_channels=4, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    pipe = VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), vae=vae, unet=unet,
                              scheduler=DDIMScheduler(num_train_timesteps=100), stain="ki67")
    he = np.ascontiguousarray(load_sample("skin")[:50, :70])  # odd size: padded and cropped back
    fast = pipe(he, output_type="np").images
    assert fast.shape == (1, 50, 70, 3)
    a = pipe(he, model="diffusion", num_inference_steps=2, generator=torch.manual_seed(1), output_type="np").images
    b = pipe(he, model="diffusion", num_inference_steps=2, generator=torch.manual_seed(1), output_type="np").images
    c = pipe(he, model="diffusion", num_inference_steps=2, generator=torch.manual_seed(2), output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    pipe.save_pretrained(tmp_path / "p")
    loaded = VirtualIHCPipeline.from_pretrained(tmp_path / "p")
    assert loaded.models == ["fast", "diffusion"] and loaded.config.stain == "ki67"
    np.testing.assert_allclose(loaded(he, output_type="np").images, fast, atol=1e-5)
    with pytest.raises(InputError, match="fast or diffusion"):
        pipe(he, model="gan")
    with pytest.raises(InputError, match="unknown stain"):
        VirtualIHCPipeline(stain="cd3")
    only_fast = VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)))
    with pytest.raises(InputError, match="no diffusion translator"):
        only_fast(he, model="diffusion")
    with pytest.raises(InputError, match="expected uint8 RGB"):
        pipe(np.zeros((8, 8), np.uint8))


def _tiny_refiner_parts(in_channels: int = 12, prediction_type: str = "sample"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1)
    unet = UNet2DModel(sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    return IHCGenerator(widths=(8, 16)), vae, unet, scheduler


def test_fast_prior_refiner_starts_as_the_fast_model_and_checks_its_parts(tmp_path):
    """An untrained refiner (zero last layer) returns the fast translator's image for any seed:
    the diffusion model can only move away from the fast one where training tells it to."""
    generator, vae, unet, scheduler = _tiny_refiner_parts()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    pipe = VirtualIHCPipeline(generator=generator, vae=vae, unet=unet, scheduler=scheduler,
                              diffusion_prior="fast", diffusion_strength=0.5)
    he = np.ascontiguousarray(load_sample("hgsc_nest")[:64, :64])
    fast = pipe(he, output_type="np").images
    for seed in (0, 1):
        refined = pipe(he, model="diffusion", num_inference_steps=4, generator=torch.manual_seed(seed),
                       output_type="np").images
        np.testing.assert_allclose(refined, fast, atol=2e-3)
    # as decoded: the fast image through the (untrained) VAE, not the prior's pixels
    decoded = pipe(he, model="diffusion", num_inference_steps=4, detail="model", output_type="np").images
    assert np.abs(decoded - fast).mean() > 0.01
    pipe.save_pretrained(tmp_path / "p")
    loaded = VirtualIHCPipeline.from_pretrained(tmp_path / "p")
    assert loaded.models == ["fast", "diffusion"] and loaded.config.diffusion_prior == "fast"
    assert loaded.config.diffusion_strength == 0.5
    np.testing.assert_allclose(loaded(he, model="diffusion", num_inference_steps=4, output_type="np").images,
                               refined, atol=1e-5)
    with pytest.raises(InputError, match="strength"):
        pipe(he, model="diffusion", strength=0.0)
    with pytest.raises(WeightsError, match="needs 12"):
        VirtualIHCPipeline(*_tiny_refiner_parts(in_channels=8)[:3], diffusion_prior="fast")
    with pytest.raises(WeightsError, match="predicts sample"):
        VirtualIHCPipeline(*_tiny_refiner_parts(prediction_type="epsilon"), diffusion_prior="fast")
    with pytest.raises(InputError, match="diffusion_prior"):
        VirtualIHCPipeline(diffusion_prior="gan")
    no_fast = VirtualIHCPipeline(None, vae, unet, scheduler, diffusion_prior="fast")
    assert no_fast.models == []  # a refiner without the model it refines cannot run


def test_training_recipe_runs_and_reports_dab_correlation(tmp_path):
    import yaml

    from training.virtual_ihc import main

    recipe = yaml.safe_load(open("training/recipes/virtual_ihc_her2.yaml"))
    recipe.update(output_dir=str(tmp_path / "run"), phantom_pairs=3, real_pairs=False, pair_size=96, crop_size=64,
                  batch_size=2, max_steps=2, validate_every=2, checkpoint_every=1, val_pairs=3, widths=[8, 16])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    final = main(["--config", str(tmp_path / "r.yaml")])
    assert VirtualIHCPipeline.from_pretrained(final).models == ["fast"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_psnr", "val_ssim", "val_dab_area_corr"} <= set(rows[-1])
    main(["--config", str(tmp_path / "r.yaml"), "--resume", "latest", "--max-steps", "3"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_3").is_dir()


def test_diffusion_recipe_trains_from_cached_latents_and_resumes(tmp_path):
    """The diffusion translator's recipe on the shipped tile VAE: pairs are encoded once in
    8 orientations (the cache holds exactly what the VAE gives for each view) and cropped
    in latent space; training writes a loadable diffusion pipeline and resumes."""
    import yaml
    from diffusers import AutoencoderKL

    from pipelines.encoders import load_model_folder
    from studio.data.ihc_pairs import phantom_pairs
    from studio.io import to_tensor
    from training.virtual_ihc import PairLatentCache, VirtualIHCConfig, main

    pairs = phantom_pairs(2, 96, "her2", seed=5)
    vae = load_model_folder(AutoencoderKL, "checkpoints/tile-vae").eval()
    cache = PairLatentCache(vae, [p.he for p in pairs], [p.ihc for p in pairs], factor=4)
    assert len(cache) == 16
    with torch.no_grad():
        rotated = vae.encode(to_tensor(np.ascontiguousarray(np.rot90(pairs[1].ihc, 1))) * 2 - 1).latent_dist
    torch.testing.assert_close(cache.mean[8 + 2], rotated.mean[0] * vae.config.scaling_factor, atol=1e-5, rtol=0)
    cfg = VirtualIHCConfig(crop_size=64, batch_size=3)
    cond, mean, std = cache.batch(7, cfg)
    assert cond.shape == mean.shape == std.shape == (3, 4, 16, 16) and bool((std > 0).all())
    torch.testing.assert_close(cache.batch(7, cfg)[0], cond)

    recipe = yaml.safe_load(open("training/recipes/virtual_ihc_her2_diffusion.yaml"))
    recipe.update(output_dir=str(tmp_path / "run"), phantom_pairs=2, real_pairs=False, pair_size=96, crop_size=64,
                  batch_size=2, max_steps=2, validate_every=2, checkpoint_every=1, val_pairs=2, unet_channels=[32, 32],
                  inference_steps=2, vae="checkpoints/tile-vae")  # the recipe's H&E + IHC VAE is a run output
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    final = main(["--config", str(tmp_path / "r.yaml")])
    assert VirtualIHCPipeline.from_pretrained(final).models == ["diffusion"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_psnr", "val_dab_area_corr"} <= set(rows[-1])
    main(["--config", str(tmp_path / "r.yaml"), "--resume", "latest", "--max-steps", "3"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_3").is_dir()


def test_residual_translator_adds_a_sampled_residual_to_the_fast_latent(tmp_path):
    """Residual diffusion: the output is the fast latent plus ``residual_scale`` x a residual
    sampled from noise -- seeded, different per seed, and exactly the fast image when the
    residual's scale vanishes (whatever the UNet says)."""
    generator, vae, unet, scheduler = _tiny_refiner_parts(prediction_type="v_prediction")
    he = np.ascontiguousarray(load_sample("hgsc_nest")[:64, :64])
    pipe = VirtualIHCPipeline(generator=generator, vae=vae, unet=unet, scheduler=scheduler,
                              diffusion_prior="residual", diffusion_strength=1.0, residual_scale=0.5)
    fast = pipe(he, output_type="np").images

    def sample(p, seed, **kw):
        return p(he, model="diffusion", num_inference_steps=3, generator=torch.manual_seed(seed),
                 output_type="np", **kw).images

    a, b = sample(pipe, 0), sample(pipe, 1)
    np.testing.assert_array_equal(a, sample(pipe, 0))
    assert np.abs(a - b).mean() > 1e-3 and np.abs(a - fast).mean() > 1e-3
    pipe.save_pretrained(tmp_path / "p")
    loaded = VirtualIHCPipeline.from_pretrained(tmp_path / "p")
    assert loaded.config.diffusion_prior == "residual" and loaded.config.residual_scale == 0.5
    np.testing.assert_allclose(sample(loaded, 0), a, atol=1e-5)
    tiny = VirtualIHCPipeline(generator=generator, vae=vae, unet=unet, scheduler=scheduler,
                              diffusion_prior="residual", residual_scale=1e-9)
    np.testing.assert_allclose(sample(tiny, 0), fast, atol=2e-3)
    with pytest.raises(WeightsError, match="predicts v_prediction"):
        VirtualIHCPipeline(*_tiny_refiner_parts(prediction_type="sample"), diffusion_prior="residual")
    with pytest.raises(InputError, match="residual_scale"):
        VirtualIHCPipeline(diffusion_prior="residual", residual_scale=0.0)


@pytest.mark.parametrize("recipe_name", ["virtual_ihc_her2_refiner", "virtual_ihc_her2_residual"])
def test_prior_recipes_train_on_the_shipped_fast_model_and_save_both(tmp_path, recipe_name):
    import yaml

    from studio.info import checkpoints_dir

    shipped_folder = checkpoints_dir() / "virtual-ihc-her2"  # a local folder, never a hub id
    recipe = yaml.safe_load(open(f"training/recipes/{recipe_name}.yaml"))
    recipe.update(output_dir=str(tmp_path / "run"), phantom_pairs=2, real_pairs=False, pair_size=96, crop_size=64,
                  batch_size=2, max_steps=2, validate_every=2, checkpoint_every=2, val_pairs=2, unet_channels=[32, 32],
                  inference_steps=2, vae=str(checkpoints_dir() / "tile-vae"), prior_checkpoint=str(shipped_folder))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    from training.virtual_ihc import main

    final = main(["--config", str(tmp_path / "r.yaml")])
    pipe = VirtualIHCPipeline.from_pretrained(final)
    shipped = VirtualIHCPipeline.from_pretrained(shipped_folder)
    assert pipe.models == ["fast", "diffusion"] and pipe.config.diffusion_prior == recipe["diffusion_prior"]
    if recipe["diffusion_prior"] == "residual":  # measured on the pairs, not the default 1.0
        assert 0 < pipe.config.residual_scale != 1.0
    assert all(torch.equal(a, b) for a, b in zip(pipe.generator.state_dict().values(),
                                                  shipped.generator.state_dict().values(), strict=True))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_psnr", "val_dab_area_corr"} <= set(rows[-1])


def test_translate_tiles_and_a_slide(tmp_path):
    from studio.slides import open_slide, write_pyramid

    ckpt = tiny_vihc(tmp_path / "ckpt")
    tiles = tmp_path / "tiles"
    for i, (y, x) in enumerate([(0, 0), (300, 300)]):
        write_image(tiles / f"t{i}.png", np.ascontiguousarray(load_sample("hgsc_nest")[y:y + 96, x:x + 96]))
    region = np.ascontiguousarray(load_sample("hgsc_nest")[:300, :400])
    slide = write_pyramid(tmp_path / "slide.tif", iter([region]), 400, 300, tile_size=512, mpp=0.5,
                          compression="deflate")
    out = tmp_path / "out"
    args = ["translate", str(tiles), str(slide), "--stain", "her2", "--checkpoint", str(ckpt), "--out", str(out),
            "--tile-size", "128", "--halo", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert read_image(out / "tiles" / "t0.png").shape == (96, 96, 3)
    with open_slide(out / "slide.tif") as s:
        assert s.dimensions == (400, 300)
    readout = json.loads((out / "dab_readout.json").read_text())
    assert {"tiles/t0.png", "tiles/t1.png", "slide.tif"} <= set(readout)
    assert "h_score" in readout["slide.tif"] and (out / "slide_dab_heatmap.png").is_file()
    assert "wrote DAB read-out" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["command"] == "translate" and manifest["run"]["transform"]["stain"] == "her2"
    assert manifest["units"]["slide"]["halo"] == 16


@pytest.mark.parametrize("extra, message", [
    (["--stain", "cd8"], "unknown stain"),
    (["--stain", "her2", "--model", "diffusion"], "no diffusion translator"),
    (["--stain", "ki67"], "is a her2 model"),
])
def test_translate_bad_requests(tmp_path, extra, message):
    ckpt = tiny_vihc(tmp_path / "ckpt")
    write_image(tmp_path / "t.png", np.ascontiguousarray(load_sample("skin")[:64, :64]))
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "t.png"), "--checkpoint", str(ckpt), "--out",
                                      str(tmp_path / "o"), *extra])
    assert result.exit_code != 0 and isinstance(result.exception, HistostudioError)
    assert message in str(result.exception)


def test_translate_without_a_checkpoint_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(tmp_path))
    write_image(tmp_path / "t.png", np.ascontiguousarray(load_sample("skin")[:64, :64]))
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "t.png"), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, WeightsError)
    assert "training/recipes/virtual_ihc_her2.yaml" in str(result.exception)


def test_aligned_pairs_option_trains_on_unwarped_pairs():
    """``aligned_pairs`` swaps the misregistered pairs for the same pairs without the warp."""
    from studio.data.ihc_pairs import phantom_pairs
    from training.virtual_ihc import VirtualIHCConfig, build_pairs

    cfg = VirtualIHCConfig(phantom_pairs=2, real_pairs=False, pair_size=96, crop_size=64)
    he, ihc = build_pairs(cfg)
    he_a, ihc_a = build_pairs(VirtualIHCConfig(**{**cfg.__dict__, "aligned_pairs": True}))
    expected = phantom_pairs(2, 96, "her2", seed=1000, aligned=True)
    np.testing.assert_array_equal(np.stack(ihc_a), np.stack([p.ihc for p in expected]))
    np.testing.assert_array_equal(np.stack(he_a), np.stack(he))  # the H&E side is the same tissue
    assert not np.array_equal(np.stack(ihc_a), np.stack(ihc))


def test_shipped_her2_checkpoint_holds_a_seeded_residual_diffusion_translator():
    """The shipped HER2 folder carries both translators; the diffusion one (residual on the
    fast model, strength chosen on validation pairs) is seeded and lands near the fast
    model's DAB on real H&E -- the bench measures how near on phantom pairs."""
    from studio.dab import dab_positive_fraction
    from studio.info import checkpoints_dir
    from studio.io import to_uint8

    pipe = VirtualIHCPipeline.from_pretrained(checkpoints_dir() / "virtual-ihc-her2")
    assert pipe.models == ["fast", "diffusion"] and pipe.config.diffusion_prior == "residual"
    assert 0 < pipe.config.diffusion_strength < 1 and pipe.config.residual_scale > 0
    he = np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128])

    def run(model, seed=0):
        return pipe(he, model=model, num_inference_steps=6, generator=torch.manual_seed(seed), output_type="pt").images

    fast, a = run("fast"), run("diffusion")
    torch.testing.assert_close(run("diffusion"), a)
    assert (run("diffusion", seed=1) - a).abs().mean() > 1e-4  # a sampler, not a regressor
    assert 0 < (a - fast).abs().mean() < 0.05
    dab_fast, dab_diff = (dab_positive_fraction(to_uint8(x)[0]) for x in (fast, a))
    assert abs(dab_fast - dab_diff) < 0.05


def test_ihc_images_are_refused_as_he_input(tmp_path):
    """Feeding an IHC image where H&E is needed is a clear error naming the file, from the
    API and from ``translate`` (which still translates the other files)."""
    from studio.stain.kind import check_he, eosin_share

    ihc = np.ascontiguousarray(load_sample("ihc")[:256, :256])
    he = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :256])
    phantom_ihc = phantom_pairs(1, 512, "her2", seed=3)[0].ihc  # pale: 512 px holds enough tissue to judge
    share = eosin_share(to_tensor(np.stack([he, ihc])))
    assert share[0] > 0.5 and share[1] == 0.0
    check_he(to_tensor(he[None]))
    assert eosin_share(torch.ones(1, 3, 256, 256)) == [None]  # a blank tile is not judged
    assert eosin_share(to_tensor(ihc[None, :64, :64])) == [None]  # nor a small one
    for tile in (ihc, phantom_ihc):
        with pytest.raises(InputError, match="looks like an IHC"):
            check_he(to_tensor(tile[None]))
    pipe = VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)))
    with pytest.raises(InputError, match="not H&E"):
        pipe(ihc)
    assert len(pipe(ihc, check_input=False).images) == 1

    ckpt = tiny_vihc(tmp_path / "ckpt")
    write_image(tmp_path / "in" / "ihc.png", ihc)
    write_image(tmp_path / "in" / "he.png", he)
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--out",
                                      str(tmp_path / "o"), "--stain", "her2"])
    assert result.exit_code != 0
    assert (tmp_path / "o" / "in" / "he.png").is_file() and not (tmp_path / "o" / "in" / "ihc.png").exists()
    failed = json.loads((tmp_path / "o" / "manifest.json").read_text())["units"]
    assert any("ihc.png" in str(u.get("failed_files", {})) and "looks like an IHC" in str(u) for u in failed.values())
    # a set of IHC images only: the unit fails saying why, not "no readable image"
    write_image(tmp_path / "only" / "ihc.png", ihc)
    CliRunner().invoke(app, ["translate", str(tmp_path / "only"), "--checkpoint", str(ckpt), "--out",
                             str(tmp_path / "o2"), "--stain", "her2"])
    units = json.loads((tmp_path / "o2" / "manifest.json").read_text())["units"]
    assert "looks like an IHC" in json.dumps(units)


def test_an_ihc_slide_is_reported_not_translated(tmp_path):
    """A whole slide is judged once, on its sampled tissue (not per window): an IHC slide is
    skipped and reported, an H&E slide in the same run is translated."""
    from studio.slides import write_pyramid

    ckpt = tiny_vihc(tmp_path / "ckpt")
    ihc = np.ascontiguousarray(load_sample("ihc"))
    he = np.ascontiguousarray(load_sample("hgsc_nest")[:512, :512])
    for name, image in (("ihc_slide.tif", ihc), ("he_slide.tif", he)):
        h, w = image.shape[:2]
        write_pyramid(tmp_path / name, iter([image]), w, h, tile_size=512, mpp=0.5, compression="deflate")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["translate", str(tmp_path / "ihc_slide.tif"), str(tmp_path / "he_slide.tif"),
                                      "--stain", "her2", "--checkpoint", str(ckpt), "--out", str(out),
                                      "--tile-size", "256", "--halo", "16"])
    assert result.exit_code != 0
    assert (out / "he_slide.tif").is_file() and not (out / "ihc_slide.tif").exists()
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert "looks like an IHC" in json.dumps(units["ihc_slide"])

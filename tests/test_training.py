"""The training recipes run, checkpoint, resume and save loadable models (toy sizes)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

torch.set_num_threads(1)


def recipe(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """VAE, then SSL encoder, then LDM on top of both, a few steps each."""
    from training import ldm, ssl_encoder, vae

    root = tmp_path_factory.mktemp("train")
    vae_dir = vae.main(["--config", str(recipe(root / "vae.yaml", output_dir=str(root / "vae"), crop_size=32,
                                                batch_size=2, max_steps=2, checkpoint_every=1, validate_every=2,
                                                block_out_channels=[8, 8, 8], norm_num_groups=4, warmup_steps=1))])
    enc_dir = ssl_encoder.main(["--config", str(recipe(root / "ssl.yaml", output_dir=str(root / "ssl"),
                                                       batch_size=8, context=72, max_steps=2, validate_every=2,
                                                       checkpoint_every=2, channels=[8, 8, 8, 8, 8],
                                                       embed_dim=8))])
    ldm_cfg = recipe(root / "ldm.yaml", output_dir=str(root / "ldm"), vae=str(vae_dir), encoder=str(enc_dir),
                     crop_size=64, batch_size=2, max_steps=2, validate_every=2, validation_steps=1,
                     checkpoint_every=1, block_out_channels=[32, 32], cross_attention_dim=16,
                     attention_head_dim=8, map_channels=2, warmup_steps=1, bank_size=4)
    ldm_dir = ldm.main(["--config", str(ldm_cfg)])
    return root, vae_dir, enc_dir, ldm_dir, ldm_cfg


def test_recipes_save_loadable_models(trained):
    from diffusers import AutoencoderKL

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.encoders import load_encoder, load_model_folder

    root, vae_dir, enc_dir, ldm_dir, _ = trained
    vae = load_model_folder(AutoencoderKL, vae_dir)
    assert vae.config.scaling_factor != 0.18215  # measured on the data, not the SD default
    assert load_encoder(enc_dir).dim == 8
    pipe = EmbeddingToImagePipeline.from_pretrained(ldm_dir)
    assert json.loads((ldm_dir / "encoder.json").read_text())["embed_dim"] == 8
    assert (root / "vae" / "validation").is_dir() and (root / "ldm" / "metrics.jsonl").is_file()
    out = pipe(torch.zeros(1, 1, 8), height=64, width=64, num_inference_steps=1, progress=False, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_vae_fine_tunes_on_he_and_ihc_from_a_shipped_folder(tmp_path):
    """The H&E + IHC recipe: starts from the shipped tile VAE (its weights, its architecture),
    mixes IHC crops into every batch and validates on held-out IHC too."""
    from diffusers import AutoencoderKL

    from pipelines.encoders import load_model_folder
    from training import vae

    cfg = yaml.safe_load(open("training/recipes/vae_he_ihc.yaml"))
    cfg.update(output_dir=str(tmp_path / "run"), crop_size=32, batch_size=4, max_steps=1, validate_every=1,
               checkpoint_every=1, ihc_phantom_tiles=2)
    final = vae.main(["--config", str(recipe(tmp_path / "r.yaml", **cfg))])
    shipped = load_model_folder(AutoencoderKL, "checkpoints/tile-vae")
    tuned = load_model_folder(AutoencoderKL, final)
    assert tuned.config.block_out_channels == shipped.config.block_out_channels
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_psnr", "val_ihc_psnr", "val_ihc_ssim"} <= set(rows[-1])
    assert rows[-1]["val_psnr"] > 20  # one small step from the shipped weights keeps H&E intact


def test_resume_continues_from_the_newest_checkpoint(trained):
    from training import ldm

    root, *_, ldm_cfg = trained
    assert sorted(p.name for p in (root / "ldm" / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    ldm.main(["--config", str(ldm_cfg), "--resume", "latest", "--max-steps", "3"])
    steps = [json.loads(line).get("step") for line in (root / "ldm" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert sorted(p.name for p in (root / "ldm" / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_3"]


def test_recipe_typos_are_errors(tmp_path):
    from studio.errors import InputError
    from training import vae

    with pytest.raises(InputError, match="unknown keys"):
        vae.main(["--config", str(recipe(tmp_path / "bad.yaml", max_step=3))])


def test_latent_bank_rotates_latents_and_token_grids_together():
    from training.ldm import LatentBank

    bank = LatentBank.__new__(LatentBank)
    bank.dihedral = True
    bank.latents = torch.arange(16.0).reshape(1, 1, 4, 4)
    bank.tokens = torch.arange(4.0).reshape(1, 2, 2, 1)
    for seed in range(8):
        lat, tok = bank.batch(1, torch.Generator().manual_seed(seed))
        # the token of the top-left cell must follow the top-left latent quadrant
        grid = tok.reshape(2, 2)
        quadrant_means = lat[0, 0].reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(2, 2, 4).mean(-1)
        order = torch.argsort(quadrant_means.flatten())
        assert torch.equal(torch.argsort(grid.flatten()), order)


def test_warmup_cosine_schedule_and_ema_swap():
    import torch

    from training.utils import ema_weights, warmup_cosine

    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, floor=0.05) == pytest.approx(0.05)
    from diffusers.training_utils import EMAModel

    model = torch.nn.Linear(2, 2)
    ema = EMAModel(model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = model.weight.detach().clone()
    with ema_weights(ema, model):
        assert not model.training and not torch.equal(model.weight, trained)
    assert model.training and torch.equal(model.weight, trained)


def test_v_prediction_zero_terminal_snr_recipe_trains_and_samples_without_clipping(trained, tmp_path):
    """Issue 19's objective: v-prediction on a zero-terminal-SNR schedule, min-SNR weights,
    a bank that rotates crops before encoding (orientation-keeping encoders)."""
    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.loading import latent_ddim
    from training import ldm

    root, vae_dir, enc_dir, _, _ = trained
    cfg = recipe(tmp_path / "v.yaml", output_dir=str(tmp_path / "v"), vae=str(vae_dir), encoder=str(enc_dir),
                 crop_size=64, batch_size=2, max_steps=2, validate_every=2, validation_steps=2, checkpoint_every=2,
                 block_out_channels=[32, 32], cross_attention_dim=16, attention_head_dim=8, map_channels=2,
                 warmup_steps=1, bank_size=4, prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=5.0,
                 dihedral_bank=False)
    pipe = EmbeddingToImagePipeline.from_pretrained(ldm.main(["--config", str(cfg)]))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    sampler = latent_ddim(pipe.scheduler.config)
    assert not sampler.config.clip_sample and sampler.config.timestep_spacing == "trailing"
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999 and float(sampler.alphas_cumprod[-1]) < 1e-6  # starts from pure noise


def test_min_snr_weights_follow_the_definition():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from training.ldm import LDMConfig, objective

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    pred = torch.zeros_like(latents)
    cfg = LDMConfig(prediction_type="v_prediction", snr_gamma=5.0)
    per = ((sched.get_velocity(latents, noise, t)) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(sched, t)
    expected = (torch.minimum(snr, torch.tensor(5.0)) / (snr + 1) * per).mean()
    assert objective(sched, latents, noise, t, pred, cfg).item() == pytest.approx(expected.item(), rel=1e-5)
    plain = LDMConfig(prediction_type="epsilon")
    plain_loss = objective(sched, latents, noise, t, pred, plain).item()
    assert plain_loss == pytest.approx((noise ** 2).mean().item(), rel=1e-5)


def test_objective_settings_that_cannot_train_are_refused_before_loading(tmp_path):
    from studio.errors import InputError
    from training import ldm

    with pytest.raises(InputError, match="needs prediction_type"):
        ldm.main(["--config", str(recipe(tmp_path / "z.yaml", zero_terminal_snr=True, vae=str(tmp_path / "none")))])
    with pytest.raises(InputError, match="use epsilon or v_prediction"):
        ldm.main(["--config", str(recipe(tmp_path / "p.yaml", prediction_type="sample"))])


def test_orientation_keeping_bank_serves_pairs_as_encoded():
    from training.ldm import LatentBank

    bank = LatentBank.__new__(LatentBank)
    bank.dihedral = False
    bank.latents = torch.arange(16.0).reshape(1, 1, 4, 4)
    bank.tokens = torch.arange(4.0).reshape(1, 2, 2, 1)
    for seed in range(4):
        lat, tok = bank.batch(1, torch.Generator().manual_seed(seed))
        assert torch.equal(lat, bank.latents) and torch.equal(tok.flatten(), bank.tokens.flatten())


def test_ssl_encoder_geometric_setting_keeps_or_drops_orientation():
    from training.ssl_encoder import augment

    windows = torch.rand(4, 3, 72, 72)
    windows[:, :, :, :36] = 0.0  # left half dark: a direction a rotation would move
    keep = augment(windows, 64, torch.Generator().manual_seed(0), geometric="none")
    assert (keep[:, :, :, :20].mean() < keep[:, :, :, -20:].mean()).item()


def test_checkpoints_hold_no_pickle_and_the_ema_round_trips(trained, tmp_path):
    """The issue-22 battery: the EMA was a custom_checkpoint_0.pkl that accelerate unpickles
    with weights_only=False. It is safetensors now; an old checkpoint's pickle is read with
    weights_only=True (tensors and numbers only)."""
    from diffusers.training_utils import EMAModel

    from training.utils import LEGACY_EMA_FILE, load_ema, save_ema

    root, *_ = trained
    checkpoint = max((root / "ldm" / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert (checkpoint / "ema.safetensors").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))

    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model.parameters())
    save_ema(ema, tmp_path)
    fresh = EMAModel(torch.nn.Linear(3, 2).parameters(), decay=0.5)
    load_ema(fresh, tmp_path)
    assert fresh.decay == 0.9 and fresh.optimization_step == ema.optimization_step
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, ema.shadow_params, strict=True))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(ema.state_dict(), legacy / LEGACY_EMA_FILE)
    again = EMAModel(torch.nn.Linear(3, 2).parameters())
    load_ema(again, legacy)
    assert torch.equal(again.shadow_params[0], ema.shadow_params[0])
    torch.save({"shadow_params": [torch.zeros(1)], "evil": object()}, legacy / LEGACY_EMA_FILE)
    from studio.errors import WeightsError

    with pytest.raises(WeightsError, match="refused: weights only"):
        load_ema(again, legacy)


def test_time_budget_checkpoints_writes_final_and_resumes(trained, tmp_path):
    """--max-minutes (lent GPU time): past the budget the run saves a checkpoint at the step it
    reached and a loadable final/, and --resume latest goes on from there."""
    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from training import ldm

    root, vae_dir, enc_dir, _, _ = trained
    cfg = recipe(tmp_path / "t.yaml", output_dir=str(tmp_path / "t"), vae=str(vae_dir), encoder=str(enc_dir),
                 crop_size=64, batch_size=2, max_steps=50, validate_every=100, validation_steps=1,
                 checkpoint_every=100, block_out_channels=[32, 32], cross_attention_dim=16, attention_head_dim=8,
                 map_channels=2, warmup_steps=1, bank_size=4)
    final = ldm.main(["--config", str(cfg), "--max-minutes", "0.00001"])
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stopped"] == "max_minutes" and rows[-1]["step"] == 1
    assert [p.name for p in (tmp_path / "t" / "checkpoints").iterdir()] == ["checkpoint_1"]
    EmbeddingToImagePipeline.from_pretrained(final)
    ldm.main(["--config", str(cfg), "--resume", "latest", "--max-steps", "3"])
    steps = [json.loads(line).get("step") for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps and sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir())[-1] == "checkpoint_3"


def test_gpu_recipe_is_the_issue_19_design_at_30_to_100_m_parameters():
    from pathlib import Path

    from training.ldm import LDMConfig, build_models
    from training.utils import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(LDMConfig, root / "training" / "recipes" / "ldm_gpu.yaml")
    assert cfg.mixed_precision == "bf16" and cfg.crop_size == 256 and cfg.batch_size >= 64
    assert cfg.prediction_type == "v_prediction" and cfg.zero_terminal_snr and not cfg.dihedral_bank

    class VAEStub:  # the tile VAE's geometry: /4, 4 latent channels
        class config:
            block_out_channels = (32, 64, 64)
            latent_channels = 4

    with torch.device("meta"):
        unet, conditioner = build_models(cfg, VAEStub, embed_dim=128)
    assert 30e6 <= sum(p.numel() for p in unet.parameters()) <= 100e6


def test_export_writes_a_checkpoints_ema_weights_as_a_pipeline(trained):
    """--export latest: the newest checkpoint's EMA weights as a loadable pipeline, the run untouched."""
    from safetensors.torch import load_file

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from training import ldm

    root, _, _, ldm_dir, ldm_cfg = trained
    run = root / "ldm"
    before = (run / "metrics.jsonl").read_text()
    folder = ldm.main(["--config", str(ldm_cfg), "--export", "latest"])
    latest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir())  # 3 after the resume test
    assert folder == run / f"export_step_{latest}" and (run / "metrics.jsonl").read_text() == before
    EmbeddingToImagePipeline.from_pretrained(folder)
    exported = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    final = load_file(str(ldm_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the last checkpoint's EMA = final/

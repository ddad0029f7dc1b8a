"""The decoder-only adversarial fine-tune of the tile VAE (toy sizes): the encoder stays
bit-identical, the discriminator is checkpointed and resumes exactly, and the default
options train exactly as before."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

torch.set_num_threads(1)

TINY = {"crop_size": 32, "batch_size": 2, "block_out_channels": [8, 16], "norm_num_groups": 4, "warmup_steps": 1,
        "log_every": 1, "threads": 1}
GAN = {"train_decoder_only": True, "adversarial_weight": 0.5, "adversarial_start": 1, "disc_start": 0,
       "disc_width": 8, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "validate_every": 4}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def recipe(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A tiny autoencoder saved as the starting folder, then 4 decoder-only GAN steps from it."""
    from training import vae

    root = tmp_path_factory.mktemp("vae_gan")
    cfg = vae.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()})
    vae.build_model(cfg).save_pretrained(root / "init", safe_serialization=True)
    config = recipe(root / "gan.yaml", **TINY, **GAN, init_from=str(root / "init"), output_dir=str(root / "run"))
    final = vae.main(["--config", str(config)])
    return root, config, final


def test_decoder_only_keeps_the_encoder_bit_identical(gan_run):
    root, _, final = gan_run
    before, after = load_file(str(root / "init" / WEIGHTS)), load_file(str(final / WEIGHTS))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # same latents, so the same scaling factor
    scale = [json.loads((p / "config.json").read_text())["scaling_factor"] for p in (root / "init", final)]
    assert scale[0] == scale[1]


def test_adversarial_losses_are_logged_and_finite(gan_run):
    root, *_ = gan_run
    rows = [r for r in metrics(root / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "g_loss" not in rows[0] and "d_loss" in rows[0]  # discriminator from step 0, generator term from 1
    for r in rows[1:]:
        assert {"g_loss", "d_weight", "d_loss", "logits_real", "logits_fake"} <= set(r)
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_discriminator_state_is_safetensors_and_resumes_exactly(gan_run, tmp_path):
    """Run 0-4 straight; then drop checkpoint 4, resume from 2 and compare everything."""
    from training import vae

    root, config, final = gan_run
    checkpoint = root / "run" / "checkpoints" / "checkpoint_4"
    disc = load_file(str(checkpoint / "model_1.safetensors"))
    assert any("parametrizations.weight.original" in k for k in disc)  # spectral-norm convs
    assert any(k.endswith("_u") for k in disc)  # its power-iteration vectors, too

    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint_4")
    shutil.rmtree(copy / "final")
    cfg = yaml.safe_load(config.read_text())
    resumed_final = vae.main(["--config", str(recipe(tmp_path / "r.yaml", **{**cfg, "output_dir": str(copy)})),
                              "--resume", "latest"])
    resumed_disc = load_file(str(copy / "checkpoints" / "checkpoint_4" / "model_1.safetensors"))
    assert disc.keys() == resumed_disc.keys() and all(torch.equal(disc[k], resumed_disc[k]) for k in disc)
    a, b = load_file(str(final / WEIGHTS)), load_file(str(resumed_final / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight = [r for r in metrics(root / "run") if r.get("step", 0) > 2 and "loss" in r]
    again = [r for r in metrics(copy) if r.get("step", 0) > 2 and "loss" in r][-2:]
    assert [{k: v for k, v in r.items() if k != "time"} for r in straight] == \
        [{k: v for k, v in r.items() if k != "time"} for r in again]


def test_default_options_train_the_old_objective(tmp_path):
    """No discriminator, whole model trained: the first step's loss is the plain L1 + SSIM + KL
    of the seeded model on the first batch, recomputed here independently."""
    from accelerate.utils import set_seed

    from studio.data.splits import regions
    from studio.stain.augment import StainAugment
    from training import vae
    from training.data import CropSampler

    vae.main(["--config", str(recipe(tmp_path / "d.yaml", **TINY, max_steps=1, validate_every=1, checkpoint_every=1,
                                     output_dir=str(tmp_path / "run")))])
    logged = [r for r in metrics(tmp_path / "run") if "loss" in r][0]
    assert "g_loss" not in logged and "d_loss" not in logged
    assert not any(p.name.startswith("model_1") for p in (tmp_path / "run" / "checkpoints" / "checkpoint_1").iterdir())

    cfg = vae.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()})
    set_seed(cfg.seed)
    model = vae.build_model(cfg).train()
    sampler = CropSampler(list(regions("train").values()), cfg.crop_size, stain=StainAugment(), seed=cfg.seed)
    loss, parts, _ = vae.vae_loss(model, sampler.batch(0, cfg.batch_size), cfg)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert logged["l1"] == pytest.approx(parts["l1"], rel=1e-6)


def test_bad_combinations_are_one_line_errors(tmp_path):
    from studio.errors import InputError
    from training import vae

    with pytest.raises(InputError, match="train_decoder_only needs init_from"):
        vae.main(["--config", str(recipe(tmp_path / "a.yaml", **TINY, train_decoder_only=True))])
    with pytest.raises(InputError, match="disc_start"):
        vae.main(["--config", str(recipe(tmp_path / "b.yaml", **TINY, adversarial_weight=0.5, adversarial_start=10,
                                         disc_start=20))])


def test_adversarial_term_ramps_in_linearly_after_its_start(tmp_path):
    from studio.errors import InputError
    from training import vae

    cfg = vae.VAEConfig(adversarial_weight=3.0, adversarial_start=100, adversarial_ramp=4)
    assert [vae.adversarial_ramp(cfg, s) for s in (0, 99, 100, 101, 102, 103, 500)] == [0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert vae.adversarial_ramp(vae.VAEConfig(adversarial_weight=3.0, adversarial_start=5), 5) == 1.0
    with pytest.raises(InputError, match="adversarial_ramp"):
        vae.main(["--config", str(recipe(tmp_path / "r.yaml", **TINY, adversarial_weight=0.5, adversarial_ramp=-1))])


def test_discriminator_is_a_small_patchgan():
    from training.discriminator import PatchDiscriminator, hinge_d_loss

    disc = PatchDiscriminator()
    assert 100_000 <= sum(p.numel() for p in disc.parameters()) <= 300_000
    logits = disc(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 8, 8)  # one score per patch
    # hinge: no loss once real scores >= 1 and fake scores <= -1
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -3.0)).item() == 0.0

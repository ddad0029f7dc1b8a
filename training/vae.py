"""Train the tile autoencoder: a diffusers ``AutoencoderKL`` for H&E tiles.

    python -m training.vae --config training/recipes/vae.yaml            # start
    python -m training.vae --config training/recipes/vae.yaml --resume latest

In the style of diffusers' training examples: config at the top (a YAML recipe), an
``Accelerator`` for devices / mixed precision / checkpoint state, an EMA of the weights,
validation reconstructions logged during training, ``save_pretrained`` at the end.

Objective: L1 + ``ssim_weight`` * (1 - SSIM) + ``kl_weight`` * KL. No perceptual term: it
needs a downloaded network. Optional adversarial term (``adversarial_weight`` > 0): a small
PatchGAN (``training.discriminator``) with the hinge loss and the SD VAEs' adaptive weight,
which restores the micro-texture (chromatin, fibre edges) the pixel loss averages away.
``train_decoder_only`` fine-tunes ``post_quant_conv`` + decoder of an ``init_from`` folder and
leaves encoder and ``quant_conv`` bit-identical, as Stability's ft-MSE / ft-EMA VAE releases
did: the latents do not change, so every latent model trained on the old encoder stays valid
(and ``scaling_factor`` is kept). Data: random crops of the *train*
regions of the shipped real H&E (``studio.data.splits``) with flips, 90-degree rotations
and stain jitter; validation on fixed 256x256 tiles of the held-out regions.

The autoencoder has no attention in its mid block, so it is fully convolutional: trained
on small crops, it encodes tiles and slides of any size. ``scaling_factor`` (the
diffusers convention: latents are multiplied by it before diffusion) is set at the end
to 1 / std of the training latents.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import structural_similarity_index_measure

from studio.errors import InputError
from training.data import CropSampler
from training.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from training.utils import (
    MetricsLog,
    common_args,
    ema_weights,
    load_config,
    resume_training,
    save_checkpoint,
    warmup_cosine_scheduler,
)


@dataclass
class VAEConfig:
    output_dir: str = "runs/vae"
    seed: int = 0
    crop_size: int = 64
    batch_size: int = 16
    max_steps: int = 6000
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ssim_weight: float = 0.25
    kl_weight: float = 1e-6
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 500
    threads: int = 1
    mixed_precision: str = "no"
    stain_jitter: bool = True
    # model
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    # fine-tuning: start from this AutoencoderKL folder (its architecture wins over the above)
    init_from: str | None = None
    # share of every batch drawn from IHC tiles (phantom HER2/Ki67 IHC + the train part of
    # the real H-DAB sample), for an autoencoder that a latent H&E -> IHC translator can
    # decode through; 0 trains on H&E only
    ihc_fraction: float = 0.0
    ihc_phantom_tiles: int = 96
    # decoder-only fine-tune: freeze encoder + quant_conv (needs init_from); scaling_factor kept
    train_decoder_only: bool = False
    # adversarial term (0: none, no discriminator is built): hinge PatchGAN; the generator term
    # turns on at adversarial_start, the discriminator trains from disc_start (<= adversarial_start)
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    # steps over which the generator term ramps linearly from 0 to its full weight after
    # adversarial_start (0: all at once). At weight 20 a sudden start collapsed the decoder
    # (SSIM 0.90 -> 0.30 within 25 steps, runs/vae_decoder_gan_w20).
    adversarial_ramp: int = 0
    disc_start: int = 0
    disc_learning_rate: float = 1e-4
    disc_width: int = 32
    # scale the generator term by |grad rec| / |grad adv| at the decoder's last layer (SD VAEs)
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    log_every: int = 25


def build_model(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups, mid_block_add_attention=False, sample_size=256,
    )


def vae_loss(model, tiles: torch.Tensor, cfg: VAEConfig) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Pixel loss of one batch, its parts, and the (unclamped) reconstruction in [0, 1]."""
    with torch.no_grad() if cfg.train_decoder_only else contextlib.nullcontext():  # frozen encoder: no graph
        posterior = model.encode(tiles * 2 - 1).latent_dist  # diffusers VAEs take [-1, 1]
    recon = (model.decode(posterior.sample()).sample + 1) / 2
    l1 = F.l1_loss(recon, tiles)
    ssim = structural_similarity_index_measure(recon.clamp(0, 1), tiles, data_range=1.0)
    kl = posterior.kl().mean()
    loss = l1 + cfg.ssim_weight * (1 - ssim) + cfg.kl_weight * kl
    return loss, {"l1": l1.item(), "ssim": ssim.item(), "kl": kl.item()}, recon


def check_config(cfg: VAEConfig, recipe: str | Path | None) -> None:
    """One-line errors for option combinations that cannot train."""
    where = recipe or "config"
    if cfg.train_decoder_only and not cfg.init_from:
        raise InputError(where, "train_decoder_only needs init_from (the autoencoder whose encoder is kept)")
    if cfg.adversarial_weight < 0:
        raise InputError(where, f"adversarial_weight must be >= 0, got {cfg.adversarial_weight}")
    if cfg.adversarial_ramp < 0:
        raise InputError(where, f"adversarial_ramp must be >= 0, got {cfg.adversarial_ramp}")
    if cfg.adversarial_weight > 0 and cfg.disc_start > cfg.adversarial_start:
        raise InputError(where, f"disc_start ({cfg.disc_start}) must be <= adversarial_start "
                                f"({cfg.adversarial_start}): the generator term needs a trained discriminator")


def freeze_encoder(model) -> list[torch.nn.Parameter]:
    """Freeze encoder + ``quant_conv`` (what makes the latents); return the parameters left to train."""
    model.encoder.requires_grad_(False)
    if model.quant_conv is not None:
        model.quant_conv.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def adversarial_step(model, disc, tiles: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor,
                     cfg: VAEConfig, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's hinge term, weighted (adaptive weight at the decoder's ``conv_out``),
    to add to ``rec_loss``; zero before ``adversarial_start``."""
    if step < cfg.adversarial_start:
        return rec_loss.new_zeros(()), {}
    g_loss = hinge_g_loss(disc(recon * 2 - 1))
    weight = adaptive_weight(rec_loss, g_loss, model.decoder.conv_out.weight, cfg.adaptive_weight_max) \
        if cfg.adaptive_weight else g_loss.new_ones(())
    ramp = adversarial_ramp(cfg, step)
    return cfg.adversarial_weight * ramp * weight * g_loss, {"g_loss": g_loss.item(), "d_weight": weight.item(),
                                                             "ramp": ramp}


def adversarial_ramp(cfg: VAEConfig, step: int) -> float:
    """The generator term's share of its full weight at ``step``: 0 before ``adversarial_start``,
    then linear over ``adversarial_ramp`` steps (reaching 1 at the ramp's last step)."""
    if step < cfg.adversarial_start:
        return 0.0
    if cfg.adversarial_ramp <= 0:
        return 1.0
    return min(1.0, (step - cfg.adversarial_start + 1) / cfg.adversarial_ramp)


def discriminator_step(disc, disc_optimizer, accelerator, tiles: torch.Tensor,
                       recon: torch.Tensor) -> dict[str, float]:
    """One hinge update of the discriminator: real crops against the (detached) reconstructions."""
    disc_optimizer.zero_grad()  # drops the grads the generator term left on it
    logits_real, logits_fake = disc(tiles * 2 - 1), disc(recon.detach() * 2 - 1)
    d_loss = hinge_d_loss(logits_real, logits_fake)
    accelerator.backward(d_loss)
    disc_optimizer.step()
    disc_optimizer.zero_grad()
    return {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item()}


@torch.no_grad()
def reconstruct(model, tiles: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction (posterior mode) of float tiles in [0, 1]."""
    latents = model.encode(tiles * 2 - 1).latent_dist.mode()
    return ((model.decode(latents).sample + 1) / 2).clamp(0, 1)


def validate(model, tiles: torch.Tensor, out_png: Path) -> dict[str, float]:
    from studio.io import to_uint8
    from studio.metrics import psnr, ssim
    from studio.report import contact_sheet, save_png

    recon = torch.cat([reconstruct(model, tiles[i:i + 4]) for i in range(0, len(tiles), 4)])
    metrics = {"val_psnr": psnr(recon, tiles).mean().item(), "val_ssim": ssim(recon, tiles).mean().item()}
    originals, recons = to_uint8(tiles), to_uint8(recon)
    save_png(contact_sheet([("held-out real tiles", [(f"tile {i}", t) for i, t in enumerate(originals)]),
                            (f"reconstruction (PSNR {metrics['val_psnr']:.2f} dB)",
                             [(f"tile {i}", t) for i, t in enumerate(recons)])], cell=160), out_png)
    return metrics


def main(argv: list[str] | None = None) -> Path:
    args = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "vae.yaml").parse_args(argv)
    cfg = load_config(VAEConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                               "threads": args.threads})
    check_config(cfg, args.config)
    torch.set_num_threads(cfg.threads)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from pipelines.encoders import load_model_folder
    from studio.data.splits import regions, tissue_tiles
    from studio.io import to_tensor
    from studio.stain.augment import StainAugment

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    model = load_model_folder(AutoencoderKL, Path(cfg.init_from)).train() if cfg.init_from else build_model(cfg)
    trained = freeze_encoder(model) if cfg.train_decoder_only else model.parameters()
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=1e-4)
    scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    disc = disc_optimizer = None
    if cfg.adversarial_weight > 0:  # prepared, so save_state / load_state carry it (model_1.safetensors)
        disc = PatchDiscriminator(width=cfg.disc_width).train()
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.disc_learning_rate, betas=(0.5, 0.9))
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay, model_cls=AutoencoderKL,
                   model_config=accelerator.unwrap_model(model).config)

    start, checkpoint = resume_training(accelerator, out, args.resume)
    if checkpoint is not None:
        ema.load_state_dict(EMAModel.from_pretrained(str(checkpoint / "ema"), model_cls=AutoencoderKL).state_dict())

    sampler = CropSampler(list(regions("train").values()), cfg.crop_size,
                          stain=StainAugment() if cfg.stain_jitter else None, seed=cfg.seed)
    val_tiles = to_tensor(tissue_tiles("heldout", 256, min_tissue=0.6)[::3][:8])
    n_ihc = int(round(cfg.batch_size * cfg.ihc_fraction))
    ihc_sampler = CropSampler(ihc_images(cfg, "train"), cfg.crop_size, min_tissue=0.1, seed=cfg.seed + 1) \
        if n_ihc else None
    val_ihc = to_tensor(np.stack([im[:128, :128] for im in ihc_images(cfg, "heldout")])) if n_ihc else None
    log = MetricsLog(out)
    model.train()
    for step in range(start, cfg.max_steps):
        tiles = sampler.batch(step, cfg.batch_size - n_ihc)
        if ihc_sampler is not None:
            tiles = torch.cat([tiles, ihc_sampler.batch(step, n_ihc)])
        tiles = tiles.to(accelerator.device)
        with accelerator.accumulate(model):
            loss, parts, recon = vae_loss(model, tiles, cfg)
            if disc is not None:
                adv, adv_parts = adversarial_step(accelerator.unwrap_model(model), disc, tiles, recon, loss, cfg, step)
                loss, parts = loss + adv, {**parts, **adv_parts}
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if disc is not None and step >= cfg.disc_start:
                parts.update(discriminator_step(disc, disc_optimizer, accelerator, tiles, recon))
        ema.step(accelerator.unwrap_model(model).parameters())
        done = step + 1
        if done % cfg.log_every == 0:
            log.write(step=done, loss=loss.item(), lr=scheduler.get_last_lr()[0], **parts)
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            unwrapped = accelerator.unwrap_model(model)
            with ema_weights(ema, unwrapped):
                metrics = validate(unwrapped, val_tiles.to(accelerator.device),
                                   out / "validation" / f"step_{done:06d}.png")
                if val_ihc is not None:
                    ihc = validate(unwrapped, val_ihc.to(accelerator.device),
                                   out / "validation" / f"step_{done:06d}_ihc.png")
                    metrics.update({k.replace("val_", "val_ihc_"): v for k, v in ihc.items()})
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints,
                            extra=lambda path: ema.save_pretrained(str(path / "ema")))

    final = out / "final"
    unwrapped = accelerator.unwrap_model(model)
    ema.copy_to(unwrapped.parameters())
    unwrapped.eval()
    if not cfg.train_decoder_only:  # a frozen encoder makes the same latents: its scaling_factor stays
        unwrapped.register_to_config(scaling_factor=latent_scaling_factor(unwrapped, sampler))
    unwrapped.save_pretrained(final, safe_serialization=True)
    accelerator.print(f"wrote {final}")
    return final


def ihc_images(cfg: VAEConfig, split: str) -> list[np.ndarray]:
    """IHC training / held-out images: phantom HER2 and Ki67 IHC tiles (held-out seeds for
    ``heldout``) and the real H-DAB sample cut like the H&E samples (right quarter held out)."""
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs
    from studio.data.samples import load_sample

    n = cfg.ihc_phantom_tiles // 2 if split == "train" else 4
    seed = cfg.seed * 100_000 + 50_000 if split == "train" else IHC_SEEDS_HELD_OUT + 500
    tiles = [p.ihc for stain in ("her2", "ki67") for p in phantom_pairs(n, 256, stain, seed=seed)]
    real = load_sample("ihc")
    cut = int(round(real.shape[1] * 0.75))
    tiles.append(np.ascontiguousarray(real[:, :cut] if split == "train" else real[:256, cut:]))
    return tiles


@torch.no_grad()
def latent_scaling_factor(model, sampler: CropSampler, batches: int = 8) -> float:
    """1 / std of posterior-mode latents over training crops (diffusers' convention)."""
    latents = [model.encode(sampler.batch(10_000_000 + i, 16) * 2 - 1).latent_dist.mode() for i in range(batches)]
    return float(1.0 / torch.cat(latents).std().item())


if __name__ == "__main__":
    main()

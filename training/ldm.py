"""Train the embedding-conditioned latent diffusion model (``EmbeddingToImagePipeline``).

    python -m training.ldm --config training/recipes/ldm.yaml [--resume latest]

In the style of diffusers' ``train_text_to_image.py``: a frozen VAE and a frozen encoder
produce (latent, tokens) pairs; the UNet (and the small conditioner that turns tokens into
cross-attention states and a spatial map) learns to predict the noise; tokens are replaced
by the learned null embedding with probability ``cfg_dropout`` (classifier-free guidance);
EMA weights; resumable ``Accelerator`` checkpoints; validation grids during training.

A quarter of the batches (``global_prob``) are conditioned on one global token (the mean
of the grid) instead of the grid, so the same model serves tile-level embeddings and the
coarse embedding grids of large images.

Data: random ``crop_size`` crops of the *train* regions of the real samples, flips and
90-degree rotations (no stain jitter: generated colours should follow the data). Each crop
is encoded on the fly: latents by the VAE, tokens by the encoder on the conditioner's grid
(one token per ``token_pixels`` square). Validation conditions on held-out crops and
reports how close the generated images' embeddings come to their conditioning.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.data import CropSampler
from training.utils import (
    MetricsLog,
    common_args,
    ema_weights,
    load_config,
    load_ema,
    resume_path,
    resume_training,
    save_checkpoint,
    warmup_cosine_scheduler,
)


@dataclass
class LDMConfig:
    output_dir: str = "runs/ldm"
    vae: str = "checkpoints/tile-vae"
    encoder: str = "checkpoints/ssl-encoder"
    seed: int = 0
    crop_size: int = 128
    batch_size: int = 16
    max_steps: int = 20000
    learning_rate: float = 3e-4
    warmup_steps: int = 500
    cfg_dropout: float = 0.1
    global_prob: float = 0.25  # share of samples conditioned on one (mean) token instead of the grid
    bank_size: int = 4096  # crops encoded once up front (0: encode every batch on the fly)
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 2000
    validation_steps: int = 25
    guidance_scale: float = 2.0
    threads: int = 1
    mixed_precision: str = "no"
    # wall-clock budget (0: none): past it, the run checkpoints, writes final/ and stops early.
    # For lent GPU time; the LR schedule still runs over max_steps, so size max_steps to the device.
    max_minutes: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # objective (issue 19): "epsilon" or "v_prediction"; zero terminal SNR (needs v) removes
    # the sampler's x0 clipping; min-SNR-gamma loss weighting (Hang et al. 2023; 0 = off)
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    snr_gamma: float = 0.0
    # the bank's flips/rotations assume an encoder invariant to them; an orientation-keeping
    # encoder (ssl_encoder geometric: none) needs False: each crop is rotated *before* encoding
    dihedral_bank: bool = True
    # model
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: int = 1  # cross-attention in the lowest N resolutions only (cost: 16x16 attention doubles it)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    cross_attention_dim: int = 128
    map_channels: int = 8
    token_pixels: int = 64


def build_models(cfg: LDMConfig, vae, embed_dim: int):
    from diffusers import UNet2DConditionModel

    from pipelines.conditioning import EmbeddingConditioner

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    conditioner = EmbeddingConditioner(embed_dim=embed_dim, cross_attention_dim=cfg.cross_attention_dim,
                                       map_channels=cfg.map_channels, token_pixels=cfg.token_pixels,
                                       latent_factor=factor)
    n = len(cfg.block_out_channels)
    plain = n - max(1, min(cfg.attention_levels, n - 1))
    unet = UNet2DConditionModel(
        sample_size=cfg.crop_size // factor, in_channels=vae.config.latent_channels + cfg.map_channels,
        out_channels=vae.config.latent_channels, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (n - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (n - plain) + ("UpBlock2D",) * plain,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=32,
    )
    return unet, conditioner


class Denoiser(torch.nn.Module):
    """UNet + conditioner as one trainable module (one optimizer, one EMA, one prepare)."""

    def __init__(self, unet, conditioner):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]):
        states, spatial = self.conditioner(tokens, grid, tuple(noisy.shape[-2:]))
        return self.unet(torch.cat([noisy, spatial], dim=1), t, encoder_hidden_states=states).sample


@torch.no_grad()
def encode_batch(vae, encoder, tiles: torch.Tensor, grid: tuple[int, int], generator: torch.Generator):
    latents = vae.encode(tiles * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
    return latents, encoder.embed(tiles, grid=grid)


class LatentBank:
    """(latent, token grid) pairs encoded once, served with dihedral augmentation.

    Encoding every batch with the VAE and the encoder costs about a fifth of a CPU step.
    Both are convolutional and, with ``dihedral=True``, the encoder was trained to ignore
    rotations and flips, so rotating / flipping a latent together with its token grid gives
    the pair the rotated image would have had: a bank of N crops serves 8N distinct
    training pairs. An orientation-keeping encoder's token of a rotated crop is *not* its
    rotated token grid, so with ``dihedral=False`` each crop is flipped / rotated at random
    before both encoders see it, and served as it is.
    """

    def __init__(self, vae, encoder, sampler: CropSampler, size: int, grid: tuple[int, int], batch: int = 32,
                 dihedral: bool = True):
        from studio.io import to_tensor

        self.dihedral = dihedral
        latents, tokens = [], []
        gen = torch.Generator().manual_seed(12345)
        for i in range(0, size, batch):
            tiles = to_tensor(sampler.crops(50_000_000 + i, min(batch, size - i)))
            if not dihedral:
                tiles = torch.stack([_random_dihedral(t, gen) for t in tiles])
            lat, tok = encode_batch(vae, encoder, tiles, grid, gen)
            latents.append(lat)
            tokens.append(tok)
        self.latents = torch.cat(latents)
        self.tokens = torch.cat(tokens).reshape(-1, grid[0], grid[1], tokens[0].shape[-1])

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.latents), (batch_size,), generator=gen)
        lat, tok = self.latents[idx], self.tokens[idx]  # (B, C, h, w), (B, gh, gw, D)
        if not self.dihedral:
            return lat.contiguous(), tok.reshape(batch_size, -1, tok.shape[-1])
        k = int(torch.randint(0, 4, (1,), generator=gen))
        lat, tok = torch.rot90(lat, k, dims=(2, 3)), torch.rot90(tok, k, dims=(1, 2))
        if torch.rand(1, generator=gen).item() < 0.5:
            lat, tok = lat.flip(3), tok.flip(2)
        return lat.contiguous(), tok.reshape(batch_size, -1, tok.shape[-1])


def _random_dihedral(tile: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One of the eight flips/rotations of a ``(3, H, W)`` tile, at random."""
    tile = torch.rot90(tile, int(torch.randint(0, 4, (1,), generator=gen)), dims=(1, 2))
    return tile.flip(2) if torch.rand(1, generator=gen).item() < 0.5 else tile


def check_objective(cfg: LDMConfig) -> None:
    """Refuse objective settings that cannot train (before any model is built)."""
    from studio.errors import InputError

    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError("prediction_type", f"{cfg.prediction_type!r}; use epsilon or v_prediction")
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise InputError("zero_terminal_snr", "needs prediction_type: v_prediction (epsilon is undefined at SNR 0)")
    if cfg.snr_gamma < 0:
        raise InputError("snr_gamma", f"{cfg.snr_gamma}; must be >= 0 (0 turns min-SNR weighting off)")


def objective(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              prediction: torch.Tensor, cfg: LDMConfig) -> torch.Tensor:
    """The denoising loss: MSE to the noise or to the velocity, min-SNR-weighted per sample
    when ``snr_gamma`` > 0 (weights ``min(SNR, gamma) / SNR``, or ``/ (SNR + 1)`` for v)."""
    from diffusers.training_utils import compute_snr

    target = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma <= 0:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma))
    weight = clipped / (snr + 1) if cfg.prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)
    return (weight * per_sample).mean()


def make_pipeline(vae, unet, conditioner, cfg: LDMConfig):
    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.loading import latent_ddim

    scheduler = latent_ddim(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                            prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr)
    return EmbeddingToImagePipeline(vae=vae, unet=unet, conditioner=conditioner, scheduler=scheduler)


@torch.no_grad()
def validate(pipe, encoder, tiles: torch.Tensor, grid: tuple[int, int], cfg: LDMConfig, out_png: Path) -> dict:
    from studio.io import to_uint8
    from studio.report import contact_sheet, save_png

    tokens = encoder.embed(tiles, grid=grid)
    size = tiles.shape[-1]
    images = pipe(tokens, height=size, width=size, num_inference_steps=cfg.validation_steps,
                  guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(0),
                  output_type="pt", progress=False).images
    generated = encoder.embed(images, grid=None)[:, 0]
    conditions = tokens.mean(dim=1)
    cos = F.cosine_similarity(generated[:, None], conditions[None], dim=-1)  # (gen, cond)
    matched = cos.diag().mean().item()
    off = cos[~torch.eye(len(cos), dtype=torch.bool)].mean().item()
    save_png(contact_sheet([("held-out real tiles (conditions)", [(f"{i}", t) for i, t in enumerate(to_uint8(tiles))]),
                            (f"generated (cosine to own condition {matched:.3f}, to others {off:.3f})",
                             [(f"{i}", t) for i, t in enumerate(to_uint8(images))])], cell=128), out_png)
    return {"val_cosine_matched": matched, "val_cosine_random": off}


def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "ldm.yaml")
    parser.add_argument("--vae", default=None)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; 0 = none")
    parser.add_argument("--export", default=None,
                        help="'latest' or a checkpoint folder: write its EMA weights as a pipeline "
                             "(<output_dir>/export_step_<N>) and stop, without training or encoding the bank")
    args = parser.parse_args(argv)
    cfg = load_config(LDMConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                               "vae": args.vae, "encoder": args.encoder, "threads": args.threads,
                                               "max_minutes": args.max_minutes})
    check_objective(cfg)
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel

    from pipelines.encoders import load_encoder, load_model_folder
    from studio.data.splits import regions
    from studio.io import to_tensor

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.export is None:  # an export reads a run, possibly one still training: it writes only its folder
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    vae = load_model_folder(AutoencoderKL, Path(cfg.vae)).eval().requires_grad_(False).to(accelerator.device)
    encoder = load_encoder(cfg.encoder, device=accelerator.device)
    unet, conditioner = build_models(cfg, vae, encoder.dim)
    denoiser = Denoiser(unet, conditioner)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                    prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    lr_scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(denoiser).parameters(), decay=cfg.ema_decay)

    if args.export is not None:
        return export_checkpoint(args.export, out, accelerator.unwrap_model(denoiser), ema, vae, encoder, cfg)
    start, _ = resume_training(accelerator, out, args.resume, ema=ema)

    grid = conditioner.grid_for(cfg.crop_size, cfg.crop_size)
    sampler = CropSampler(list(regions("train").values()), cfg.crop_size, min_tissue=0.5, seed=cfg.seed)
    val_tiles = to_tensor(CropSampler(list(regions("heldout").values()), cfg.crop_size, min_tissue=0.6,
                                      seed=99).crops(0, 8)).to(accelerator.device)
    bank = (LatentBank(vae, encoder, sampler, cfg.bank_size, grid, dihedral=cfg.dihedral_bank)
            if cfg.bank_size > 0 else None)
    log = MetricsLog(out)
    started = time.monotonic()
    for step in range(start, cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if bank is not None:
            latents, tokens = (t.to(accelerator.device) for t in bank.batch(cfg.batch_size, gen))
        else:
            tiles = to_tensor(sampler.crops(step, cfg.batch_size)).to(accelerator.device)
            latents, tokens = encode_batch(vae, encoder, tiles, grid, gen)
        model = accelerator.unwrap_model(denoiser)
        # Teach both granularities: a grid of local tokens, or one global token (their
        # mean), as large images are built from a coarse grid of tile embeddings.
        if torch.rand(1, generator=gen).item() < cfg.global_prob:
            tokens = tokens.mean(dim=1, keepdim=True)
        tokens = model.conditioner.drop(tokens, cfg.cfg_dropout, gen)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, cfg.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with accelerator.accumulate(denoiser):
            loss = objective(noise_scheduler, latents, noise, t, denoiser(noisy, t, tokens, grid), cfg)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(denoiser.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        ema.step(accelerator.unwrap_model(denoiser).parameters())
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            model = accelerator.unwrap_model(denoiser)
            with ema_weights(ema, model):
                pipe = make_pipeline(vae, model.unet, model.conditioner, cfg)
                metrics = validate(pipe, encoder, val_tiles, grid, cfg, out / "validation" / f"step_{done:06d}.png")
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        saved = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
        if saved:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)
        if cfg.max_minutes > 0 and time.monotonic() - started > cfg.max_minutes * 60:
            if not saved:
                save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)
            log.write(step=done, stopped="max_minutes", minutes=round((time.monotonic() - started) / 60, 2))
            accelerator.print(f"time budget of {cfg.max_minutes} min reached at step {done}; --resume latest goes on")
            break

    final = write_pipeline(out / "final", accelerator.unwrap_model(denoiser), ema, vae, encoder, cfg)
    accelerator.print(f"wrote {final}")
    return final


def write_pipeline(folder: Path, model: Denoiser, ema: Any, vae: Any, encoder: Any, cfg: LDMConfig) -> Path:
    """The EMA weights as a loadable pipeline folder, with the encoder it was trained on."""
    ema.copy_to(model.parameters())
    model.eval()
    make_pipeline(vae, model.unet, model.conditioner, cfg).save_pretrained(folder)
    (folder / "encoder.json").write_text(json.dumps({"encoder": cfg.encoder, "embed_dim": encoder.dim,
                                                     "identity": encoder.identity}, indent=2))
    return folder


def export_checkpoint(which: str, out: Path, model: Denoiser, ema: Any, vae: Any, encoder: Any,
                      cfg: LDMConfig) -> Path:
    """``--export``: a checkpoint's EMA weights as ``out/export_step_<N>``, for evaluating a run
    that is still training (or was stopped) without touching it."""
    from studio.errors import WeightsError

    checkpoint = resume_path(out, which)
    if checkpoint is None:
        raise WeightsError(out, "has no checkpoint to export")
    load_ema(ema, checkpoint)
    step = int(json.loads((checkpoint / "step.json").read_text())["step"])
    folder = write_pipeline(out / f"export_step_{step}", model, ema, vae, encoder, cfg)
    print(f"wrote {folder} (EMA weights of {checkpoint})")
    return folder


if __name__ == "__main__":
    main()

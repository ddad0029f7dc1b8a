"""Train the StainFuser-style normalizer (:class:`pipelines.stain_fuser.StainFuserPipeline`).

    python -m training.stain_fuser --config training/recipes/stain_fuser.yaml [--resume latest]
    python -m training.stain_fuser --config training/recipes/stain_fuser_regressor.yaml

Pairs (:mod:`studio.data.stain_pairs`) are drawn on the fly from the *train* regions of the
real samples: a crop re-rendered in a random stain (plus, half the time, a scanner-like
tone change) is the source; the same crop in another random stain -- or untouched, then
the truth is real pixels -- is the target; another crop of the same image in the target's
stain is the reference. Each batch is a pure function of ``(seed, step)`` (exact resume).

``mode: diffusion``: DDPM noise-prediction loss on the target latent with the source latent
concatenated and the reference statistics as the class embedding; EMA. ``mode:
regressor``: the same network with timestep 0 predicts the target latent directly, L1 loss
-- the one-step baseline. Both save a pipeline folder; validation on held-out crops reports
CIEDE2000 and SSIM to the truth.

``prior: reinhard``: the source moved to the reference's CIELAB statistics
(:func:`pipelines.stain_fuser.reinhard_prior`) is encoded as a third input; the regressor
learns a residual on it (recipes ``stain_fuser_prior.yaml``, ``stain_fuser_regressor_prior.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
class StainFuserConfig:
    output_dir: str = "runs/stain_fuser"
    mode: str = "diffusion"  # diffusion | regressor
    vae: str = "checkpoints/tile-vae"
    seed: int = 0
    crop_size: int = 128
    batch_size: int = 16
    real_target: float = 0.3
    tone_prob: float = 0.5
    max_steps: int = 4000
    learning_rate: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 1000
    val_pairs: int = 32
    inference_steps: int = 6
    strength: float = 0.6
    threads: int = 1
    mixed_precision: str = "no"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    unet_channels: tuple[int, ...] = (32, 64, 128)
    style_dim: int = 256
    # > 0: make and encode this many pairs once (source latent, target latent, reference
    # statistics) and draw batches from them; 0 makes and encodes fresh pairs every step
    bank_size: int = 0
    prior: str = "none"  # none | reinhard (see pipelines.stain_fuser)


def pair_batch(images: list[np.ndarray], names: list[str], step: int, cfg: StainFuserConfig):
    from studio.data.stain_pairs import make_pairs
    from studio.io import to_tensor

    context = cfg.prior != "none"  # the prior's source statistics pool the pair's second view
    pairs = make_pairs(images, cfg.batch_size, cfg.crop_size, seed=cfg.seed * 1_000_003 + step,
                       real_target=cfg.real_target, tone_prob=cfg.tone_prob, names=names, source_context=context)
    sides = ("source", "target", "reference") + (("source_context",) if context else ())
    return [to_tensor(np.stack([getattr(p, side) for p in pairs])) for side in sides]


def held_out_pairs(cfg: StainFuserConfig):
    from studio.data.splits import regions
    from studio.data.stain_pairs import make_pairs

    r = regions("heldout")
    return make_pairs(list(r.values()), cfg.val_pairs, cfg.crop_size, seed=777_777, names=list(r),
                      source_context=cfg.prior != "none")


class PairBank:
    """Training pairs made and encoded once: the two VAE encodes and the pair rendering
    were most of a CPU step. Every entry is its own :func:`pair_batch` draw (source stain,
    tone curve, crop, target), so the bank is the recipe's data distribution, sampled."""

    def __init__(self, vae, images: list[np.ndarray], names: list[str], size: int, cfg: StainFuserConfig,
                 device, chunk: int = 16):
        from dataclasses import replace

        from pipelines.stain_fuser import reference_statistics

        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, size, chunk):
            src, tgt, ref, *context = (t.to(device) for t in pair_batch(
                images, names, 50_000_000 + i, replace(cfg, batch_size=min(chunk, size - i))))
            with torch.no_grad():
                stats = torch.stack([reference_statistics(r[None]) for r in ref])
                for name, value in encode_pair(vae, src, tgt, ref, stats, cfg.prior, *context).items():
                    parts.setdefault(name, []).append(value.cpu())
        self.parts = {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.parts["source"])

    def batch(self, batch_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self), (batch_size,), generator=gen)
        return {name: value[idx] for name, value in self.parts.items()}


def prior_target(ref: torch.Tensor, stats: torch.Tensor):
    """Reinhard fitted on one reference crop; a crop too bare to fit falls back to the LAB
    statistics in its reference vector."""
    from pipelines.stain_fuser import reference_lab_profile, reinhard_target
    from studio.errors import InputError

    try:
        return reinhard_target(ref)
    except InputError:
        return reference_lab_profile(stats)


def source_profile(norm, views: list[torch.Tensor]):
    """Reinhard source statistics pooled over ``views`` of one source; None (per-tile
    estimate) when they hold too little tissue."""
    profile = norm.estimate(views, source="source views")
    return None if profile.fallback else profile


@torch.no_grad()
def encode_pair(vae, src: torch.Tensor, tgt: torch.Tensor, ref: torch.Tensor, stats: torch.Tensor, prior: str,
                context: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One training batch in latent space: source, target and (with a prior) the classical
    estimate's latents, plus the reference statistics. The prior is Reinhard fitted on each
    pair's reference crop, with source statistics pooled over the source crop and its
    ``context`` view (the same stain on another crop), as a slide job pools a slide's."""
    from pipelines.stain_fuser import reinhard_prior

    scale = vae.config.scaling_factor
    batch = {"source": vae.encode(src * 2 - 1).latent_dist.mode() * scale,
             "target": vae.encode(tgt * 2 - 1).latent_dist.mode() * scale, "stats": stats}
    if prior == "reinhard":
        from studio.stain.reinhard import ReinhardNormalizer

        norm = ReinhardNormalizer()  # only estimates source profiles: one for the batch
        others = list(context) if context is not None else [None] * len(src)
        views = [[s] if c is None else [s, c] for s, c in zip(src, others, strict=True)]
        estimate = torch.cat([reinhard_prior(s[None], prior_target(r, st), source_profile(norm, v))
                              for s, r, st, v in zip(src, ref, stats, views, strict=True)])
        batch["prior"] = vae.encode(estimate * 2 - 1).latent_dist.mode() * scale
    return batch


@torch.no_grad()
def evaluate(pipe, pairs, cfg: StainFuserConfig, out_png: Path | None = None) -> dict[str, float]:
    from studio.io import to_tensor, to_uint8
    from studio.metrics import ciede2000, ssim
    from studio.stain.reinhard import ReinhardNormalizer

    src = np.stack([p.source for p in pairs])
    truth = to_tensor(np.stack([p.target for p in pairs]))
    norm = ReinhardNormalizer()  # a prior model's source statistics, pooled over the pair's two views
    sources = [source_profile(norm, [to_tensor(p.source)[0], to_tensor(p.source_context)[0]])
               if p.source_context is not None else None for p in pairs]
    preds = [pipe(src[i:i + 1], [pairs[i].reference], num_inference_steps=cfg.inference_steps,
                  strength=cfg.strength, output_type="pt", prior_source=sources[i]).images
             for i in range(len(pairs))]
    pred = torch.cat(preds)
    metrics = {"ciede2000": float(ciede2000(pred, truth).mean()), "ssim": float(ssim(pred, truth).mean()),
               "ciede2000_source": float(ciede2000(to_tensor(src), truth).mean())}
    if out_png is not None:
        from studio.report import contact_sheet, save_png

        show = range(min(6, len(pairs)))
        save_png(contact_sheet([("source", [(str(i), src[i]) for i in show]),
                                ("reference", [(str(i), pairs[i].reference) for i in show]),
                                ("truth", [(str(i), to_uint8(truth[i:i + 1])[0]) for i in show]),
                                (f"{cfg.mode} (dE00 {metrics['ciede2000']:.2f})",
                                 [(str(i), to_uint8(pred[i:i + 1])[0]) for i in show])], cell=128), out_png)
    return metrics


class StyledUNet(torch.nn.Module):
    """UNet + reference encoder as one trainable module."""

    def __init__(self, unet, encoder):
        super().__init__()
        self.unet, self.encoder = unet, encoder

    def forward(self, x, t, stats):
        return self.unet(x, t, class_labels=self.encoder(stats)).sample


def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "stain_fuser.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(StainFuserConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                                      "threads": args.threads})
    if cfg.mode not in ("diffusion", "regressor"):
        raise ValueError(f"mode must be diffusion or regressor, got {cfg.mode!r}")
    from pipelines.stain_fuser import PRIORS, unet_in_channels

    if cfg.prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {cfg.prior!r}")
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from pipelines.encoders import load_model_folder
    from pipelines.loading import latent_ddim
    from pipelines.stain_fuser import ReferenceEncoder, StainFuserPipeline, reference_statistics
    from studio.data.splits import regions

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    vae = load_model_folder(AutoencoderKL, Path(cfg.vae)).eval().requires_grad_(False).to(accelerator.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = vae.config.latent_channels
    n = len(cfg.unet_channels)
    unet = UNet2DModel(sample_size=cfg.crop_size // factor, in_channels=unet_in_channels(cfg.prior, latent),
                       out_channels=latent,
                       block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), norm_num_groups=32,
                       class_embed_type="identity", time_embedding_dim=cfg.style_dim)
    if cfg.prior != "none" and cfg.mode == "regressor":
        # A residual on the prior that starts at zero: the untrained model *is* the classical
        # estimate, and training can only move it where the loss says it is wrong.
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    encoder = ReferenceEncoder(embed_dim=cfg.style_dim)
    model = StyledUNet(unet, encoder)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    sched = warmup_cosine_scheduler(opt, cfg.warmup_steps, cfg.max_steps)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay)
    start, _ = resume_training(accelerator, out, args.resume, ema=ema)
    train = regions("train")
    images, names = list(train.values()), list(train)
    val = held_out_pairs(cfg)
    log = MetricsLog(out)

    def pipeline(m):
        sch = latent_ddim(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
        return StainFuserPipeline(vae=vae, unet=m.unet, reference_encoder=m.encoder, scheduler=sch, mode=cfg.mode,
                                  prior=cfg.prior)

    bank = PairBank(vae, images, names, cfg.bank_size, cfg, accelerator.device) if cfg.bank_size > 0 else None
    for step in range(start, cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if bank is not None:
            batch = {k: v.to(accelerator.device) for k, v in bank.batch(cfg.batch_size, gen).items()}
        else:
            src, tgt, ref, *context = (t.to(accelerator.device) for t in pair_batch(images, names, step, cfg))
            with torch.no_grad():
                stats = torch.stack([reference_statistics(r[None]) for r in ref])
            batch = encode_pair(vae, src, tgt, ref, stats, cfg.prior, *context)
        src_lat, tgt_lat, stats = batch["source"], batch["target"], batch["stats"]
        # As in StainFuserPipeline.__call__: the condition is the source (and the prior), the
        # regressor's input the prior when there is one, and its output a residual on it.
        base = batch.get("prior", src_lat)
        cond = torch.cat([src_lat, batch["prior"]], 1) if "prior" in batch else src_lat
        with accelerator.accumulate(model):
            if cfg.mode == "regressor":
                t0 = torch.zeros(len(src_lat), dtype=torch.long, device=src_lat.device)
                pred = model(torch.cat([base, cond], 1), t0, stats)
                loss = F.l1_loss(pred + base if "prior" in batch else pred, tgt_lat)
            else:
                noise = torch.randn(tgt_lat.shape, generator=gen).to(tgt_lat)
                t = torch.randint(0, cfg.num_train_timesteps, (len(src_lat),), generator=gen).to(src_lat.device)
                noisy = noise_scheduler.add_noise(tgt_lat, noise, t)
                loss = F.mse_loss(model(torch.cat([noisy, cond], 1), t, stats), noise)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        ema.step(accelerator.unwrap_model(model).parameters())
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=loss.item(), lr=sched.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            m = accelerator.unwrap_model(model)
            with ema_weights(ema, m):
                metrics = evaluate(pipeline(m), val, cfg, out / "validation" / f"step_{done:06d}.png")
            log.write(step=done, **{f"val_{k}": v for k, v in metrics.items()})
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)
    m = accelerator.unwrap_model(model)
    ema.copy_to(m.parameters())
    m.eval()
    final = out / "final"
    pipeline(m).save_pretrained(final)
    accelerator.print(f"wrote {final}")
    return final


if __name__ == "__main__":
    main()

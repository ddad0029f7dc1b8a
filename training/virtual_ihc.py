"""Train the H&E -> IHC translators of :class:`pipelines.virtual_ihc.VirtualIHCPipeline`.

    python -m training.virtual_ihc --config training/recipes/virtual_ihc_her2.yaml [--resume latest]
    python -m training.virtual_ihc --config training/recipes/virtual_ihc_her2_diffusion.yaml

**Data** (:mod:`studio.data.ihc_pairs`): phantom pairs (all tissue presets) and pairs
made from the real labelled tile's train band (real H&E, IHC twin rendered from its
labels), both *misregistered* like consecutive sections, plus any BCI / MIST folder
(``bci: PATH`` / ``mist: PATH``). Random crops with flips / rotations applied to both
sides alike; batches are a pure function of ``(seed, step)`` (exact resume).

**Fast model** (``model: fast``; :class:`~pipelines.virtual_ihc.IHCGenerator`), the ASP
recipe adapted to a small CPU budget:

* LSGAN with an unconditional PatchGAN on IHC patches (realistic texture; a conditional
  discriminator would reward copying the misalignment);
* PatchNCE between input H&E and output (CUT): the output keeps the input's structure;
* ASP's *adaptive supervised* PatchNCE between output and the target IHC: patches at the
  same place are positives, other places negatives; each patch's loss is weighted by how
  well its positive pair already agrees, moving from uniform weights to a Gaussian on the
  similarity over training, so patches that the misalignment makes contradictory count less;
* L1 between Gaussian-blurred output and target (sigma ``l1_blur`` px): colour and
  low-frequency DAB layout without demanding pixel alignment.

**Diffusion model** (``model: diffusion``): a ``UNet2DModel`` predicts the noise of the
IHC latent with the H&E latent concatenated (both from the shipped tile VAE); DDPM
training, DPM-Solver++ few-step sampling.

Validation on held-out phantom pairs: PSNR / SSIM against the truth and the correlation
of DAB-positive area (the DAB read-out of :mod:`studio.dab`) with the truth's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
class VirtualIHCConfig:
    output_dir: str = "runs/virtual_ihc_her2"
    model: str = "fast"  # fast | diffusion
    stain: str = "her2"
    seed: int = 0
    phantom_pairs: int = 160
    real_pairs: bool = True  # the labelled real tile's train band
    # Pixel-aligned pairs (no section-to-section warp): exact correspondences, for a first
    # stage of the latent translator, which learns little from a misregistered condition.
    aligned_pairs: bool = False
    bci: str | None = None
    mist: str | None = None
    pair_size: int = 256
    crop_size: int = 128
    batch_size: int = 8
    max_steps: int = 2000
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 500
    val_pairs: int = 16
    threads: int = 1
    mixed_precision: str = "no"
    # fast model
    widths: tuple[int, ...] = (16, 32, 64, 128)
    gan_weight: float = 1.0
    nce_weight: float = 1.0
    asp_weight: float = 1.0
    l1_weight: float = 10.0
    l1_blur: float = 3.0
    nce_patches: int = 128
    nce_temperature: float = 0.07
    # diffusion model
    vae: str = "checkpoints/tile-vae"
    unet_channels: tuple[int, ...] = (32, 64, 128)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    inference_steps: int = 6
    ema_decay: float = 0.999
    # "fast": refine a trained fast translator's output (pipelines.virtual_ihc, diffusion_prior)
    # -- its IHC latent is a third UNet input and the residual base; "residual": diffuse the
    # (IHC - fast) latent residual from noise (v-prediction); "none": the IHC latent from noise.
    diffusion_prior: str = "none"
    prior_checkpoint: str = "checkpoints/virtual-ihc-her2"  # holds the fast generator for the prior
    diffusion_strength: float = 0.6  # refiner: training noise levels t <= strength x T; sampling starts there
    residual_scale: float = 0.0  # residual prior: latent residual / scale is diffused; 0 = its std over the data
    # Encode every pair once (8 dihedral orientations) and crop in latent space: the frozen
    # VAE's two encodes per batch were ~3/4 of a CPU step. Off for datasets too big for RAM.
    latent_cache: bool = True


# --------------------------------------------------------------------------- data
def build_pairs(cfg: VirtualIHCConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) H&E and IHC stacks of all training pairs."""
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, hgsc_pairs, phantom_pairs

    pairs = phantom_pairs(cfg.phantom_pairs, cfg.pair_size, cfg.stain, seed=cfg.seed * 100_000 + 1000,
                          aligned=cfg.aligned_pairs)
    assert cfg.seed * 100_000 + 1000 + cfg.phantom_pairs < IHC_SEEDS_HELD_OUT, "training seeds reach the held-out ones"
    if cfg.real_pairs:
        pairs += hgsc_pairs(cfg.pair_size, cfg.stain, split="train", seed=cfg.seed, aligned=cfg.aligned_pairs)
    he = [p.he for p in pairs]
    ihc = [p.ihc for p in pairs]
    for root, kind in ((cfg.bci, "bci"), (cfg.mist, "mist")):
        if root:
            from studio.data.paired import BCIDataset, MISTDataset

            data = BCIDataset(root, "train") if kind == "bci" else MISTDataset(root, cfg.stain.upper()
                                                                               if cfg.stain != "ki67" else "Ki67")
            for i in range(len(data)):
                a, b, _ = data.read(i)
                he.append(a)
                ihc.append(b)
    size = min(min(a.shape[:2]) for a in he)
    if size < cfg.crop_size:
        raise ValueError(f"pairs of {size} px are smaller than crop_size {cfg.crop_size}")
    return he, ihc


def held_out_pairs(cfg: VirtualIHCConfig, aligned: bool = False):
    """Phantom pairs from seeds the training never draws (:data:`~studio.data.ihc_pairs.IHC_SEEDS_HELD_OUT` on)."""
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs

    return phantom_pairs(cfg.val_pairs, cfg.pair_size, cfg.stain, seed=IHC_SEEDS_HELD_OUT, aligned=aligned)


def crop_batch(he: list[np.ndarray], ihc: list[np.ndarray], step: int, cfg: VirtualIHCConfig):
    from studio.io import to_tensor

    rng = np.random.default_rng([cfg.seed, step])
    a, b = [], []
    for _ in range(cfg.batch_size):
        i = int(rng.integers(len(he)))
        h, w = he[i].shape[:2]
        y, x = int(rng.integers(0, h - cfg.crop_size + 1)), int(rng.integers(0, w - cfg.crop_size + 1))
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        for src, dst in ((he[i], a), (ihc[i], b)):
            c = np.rot90(src[y:y + cfg.crop_size, x:x + cfg.crop_size], k)
            dst.append(np.ascontiguousarray(c[:, ::-1] if flip else c))
    return to_tensor(np.stack(a)), to_tensor(np.stack(b))


class PairLatentCache:
    """Every training pair encoded once by the frozen VAE, in all 8 dihedral orientations,
    cropped in latent space per batch.

    Encoding the H&E condition and the IHC target for every batch cost about three quarters
    of a CPU training step; the pairs are few (a few hundred 256 px tiles), so their latents
    fit in memory. Orientations are encoded explicitly (not by rotating latents), so the
    cache is exact for any VAE. The target keeps its posterior (mean, std) and is sampled per
    batch, as ``latent_dist.sample`` would; latent crops see the whole pair's context.
    """

    def __init__(self, vae, he: list[np.ndarray], ihc: list[np.ndarray], factor: int, prior=None):
        """``prior``: optional callable H&E ``(B, 3, H, W)`` -> IHC estimate in [0, 1] (the fast
        translator), whose latents are cached too and returned as a 4th batch element."""
        from studio.io import to_tensor

        self.factor = factor
        self.cond: list[torch.Tensor] = []
        self.mean: list[torch.Tensor] = []
        self.std: list[torch.Tensor] = []
        self.prior: list[torch.Tensor] = []
        scale = vae.config.scaling_factor
        for a, b in zip(he, ihc, strict=True):
            h, w = (min(a.shape[0], b.shape[0]) // factor) * factor, (min(a.shape[1], b.shape[1]) // factor) * factor
            views = [(np.rot90(x[:h, :w], k)[:, ::-1] if flip else np.rot90(x[:h, :w], k))
                     for x in (a, b) for k in range(4) for flip in (False, True)]
            by_shape: dict[tuple, list[int]] = {}
            for i, v in enumerate(views[:8]):
                by_shape.setdefault(v.shape, []).append(i)
            for idx in by_shape.values():
                with torch.no_grad():
                    cond = vae.encode(to_tensor(np.stack([views[i] for i in idx])) * 2 - 1).latent_dist
                    target = vae.encode(to_tensor(np.stack([views[8 + i] for i in idx])) * 2 - 1).latent_dist
                    if prior is not None:
                        est = prior(to_tensor(np.stack([views[i] for i in idx]))).float().clamp(0, 1)
                        self.prior += list(vae.encode(est * 2 - 1).latent_dist.mode() * scale)
                self.cond += list(cond.mode() * scale)
                self.mean += list(target.mean * scale)
                self.std += list(target.std * scale)

    def __len__(self) -> int:
        return len(self.cond)

    def residual_std(self) -> float:
        """Standard deviation of (IHC latent mean - prior latent) over every cached view: the
        scale that makes a residual-diffusion target unit-variance, as the noise it is mixed with."""
        if not self.prior:
            raise ValueError("residual_std needs a cache built with a prior")
        diffs = torch.cat([(m - p).flatten() for m, p in zip(self.mean, self.prior, strict=True)])
        return float(diffs.std())

    def batch(self, step: int, cfg: VirtualIHCConfig) -> tuple[torch.Tensor, ...]:
        """``(cond, target_mean, target_std[, prior])`` latent crops of ``cfg.crop_size`` pixels."""
        rng = np.random.default_rng([cfg.seed, step])
        size = cfg.crop_size // self.factor
        sources = (self.cond, self.mean, self.std) + ((self.prior,) if self.prior else ())
        out: tuple[list, ...] = tuple([] for _ in sources)
        for _ in range(cfg.batch_size):
            i = int(rng.integers(len(self.cond)))
            h, w = self.cond[i].shape[-2:]
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            for src, dst in zip(sources, out, strict=True):
                dst.append(src[i][:, y:y + size, x:x + size])
        return tuple(torch.stack(x) for x in out)


# --------------------------------------------------------------------------- losses
class PatchDiscriminator(nn.Module):
    """70x70-style PatchGAN (LSGAN) on IHC images, plain torch."""

    def __init__(self, width: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers):
            mods += [nn.Conv2d(c, c * 2, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class PatchProjector(nn.Module):
    """One 2-layer MLP per encoder level (CUT's PatchSampleF)."""

    def __init__(self, widths: tuple[int, ...], dim: int = 128):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(w, dim), nn.ReLU(), nn.Linear(dim, dim)) for w in widths)

    def forward(self, feats: list[torch.Tensor], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f, idx, mlp in zip(feats, ids, self.mlps, strict=True):
            x = f.flatten(2)[:, :, idx].transpose(1, 2)  # (B, n, C)
            out.append(F.normalize(mlp(x), dim=-1))
        return out


def asp_weights(similarity: torch.Tensor, progress: float, sigma: float = 0.5) -> torch.Tensor:
    """ASP-style adaptive weights: uniform early, then a Gaussian favouring patches whose
    positive pair already agrees (high cosine), mean-normalised to 1."""
    lam = min(1.0, max(0.0, progress))
    gauss = torch.exp(-((1 - similarity) ** 2) / (2 * sigma ** 2))
    w = (1 - lam) + lam * gauss
    return (w / w.mean().clamp_min(1e-8)).detach()


def patch_nce(queries: list[torch.Tensor], keys: list[torch.Tensor], tau: float,
              progress: float | None = None) -> torch.Tensor:
    """InfoNCE per patch: the key at the same position is the positive, the others of the
    same image negatives; ``progress`` (0..1) switches on ASP's adaptive weighting."""
    total = 0.0
    for q, k in zip(queries, keys, strict=True):
        logits = q @ k.transpose(1, 2) / tau  # (B, n, n)
        b, n, _ = logits.shape
        target = torch.arange(n, device=q.device).repeat(b)
        loss = F.cross_entropy(logits.reshape(b * n, n), target, reduction="none")
        if progress is not None:
            loss = loss * asp_weights((q * k).sum(-1).reshape(-1), progress)
        total = total + loss.mean()
    return total / len(queries)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=x.shape[1])


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(pipe, pairs, model: str, out_png: Path | None = None, seed: int = 0, steps: int = 6) -> dict[str, float]:
    """PSNR / SSIM vs the truth and DAB-area correlation over held-out pairs."""
    from studio.dab import dab_positive_fraction
    from studio.io import to_tensor, to_uint8
    from studio.metrics import psnr, ssim

    he = np.stack([p.he for p in pairs])
    truth = to_tensor(np.stack([p.ihc for p in pairs]))
    preds = []
    for i in range(0, len(he), 8):
        preds.append(pipe(he[i:i + 8], model=model, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed + i), output_type="pt").images)
    pred = torch.cat(preds)
    pred_u8, truth_u8 = to_uint8(pred), to_uint8(truth)
    area_pred = np.array([dab_positive_fraction(p) for p in pred_u8])
    area_true = np.array([dab_positive_fraction(t) for t in truth_u8])
    corr = float(np.corrcoef(area_pred, area_true)[0, 1]) if area_pred.std() > 0 and area_true.std() > 0 else 0.0
    metrics = {"psnr": float(psnr(pred, truth).mean()), "ssim": float(ssim(pred, truth).mean()),
               "dab_area_corr": corr, "dab_area_mae": float(np.abs(area_pred - area_true).mean())}
    if out_png is not None:
        from studio.report import contact_sheet, save_png

        show = range(min(6, len(pairs)))
        save_png(contact_sheet([("H&E (held-out)", [(str(i), he[i]) for i in show]),
                                ("IHC truth", [(f"DAB {area_true[i]:.1%}", truth_u8[i]) for i in show]),
                                (f"{model} (r = {corr:.2f})", [(f"DAB {area_pred[i]:.1%}", pred_u8[i]) for i in show])],
                               cell=128), out_png)
    return metrics


# --------------------------------------------------------------------------- loops
def make_pipeline(cfg: VirtualIHCConfig, generator=None, vae=None, unet=None):
    from pipelines.loading import latent_ddim
    from pipelines.virtual_ihc import VirtualIHCPipeline

    scheduler = None
    prior = cfg.diffusion_prior if unet is not None else "none"
    if unet is not None:
        from pipelines.virtual_ihc import PRIOR_PREDICTION

        extra = {"prediction_type": PRIOR_PREDICTION[prior]} if prior in PRIOR_PREDICTION else {}
        scheduler = latent_ddim(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                **extra)
    return VirtualIHCPipeline(generator=generator, vae=vae if unet is not None else None, unet=unet,
                              scheduler=scheduler, stain=cfg.stain, diffusion_prior=prior,
                              diffusion_strength=cfg.diffusion_strength, residual_scale=cfg.residual_scale or 1.0)


def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "virtual_ihc_her2.yaml")
    args = parser.parse_args(argv)
    cfg = load_config(VirtualIHCConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                                      "threads": args.threads})
    if cfg.model not in ("fast", "diffusion"):
        raise ValueError(f"model must be fast or diffusion, got {cfg.model!r}")
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    he, ihc = build_pairs(cfg)
    val = held_out_pairs(cfg)
    log = MetricsLog(out)
    if cfg.model == "fast":
        final = _train_fast(cfg, args, accelerator, he, ihc, val, log, out, EMAModel)
    else:
        final = _train_diffusion(cfg, args, accelerator, he, ihc, val, log, out, EMAModel)
    accelerator.print(f"wrote {final}")
    return final


def _train_fast(cfg, args, accelerator, he, ihc, val, log, out, EMAModel) -> Path:
    from pipelines.virtual_ihc import IHCGenerator

    gen_model = IHCGenerator(widths=tuple(cfg.widths))
    disc = PatchDiscriminator()
    proj = PatchProjector(tuple(cfg.widths))
    g_params = list(gen_model.parameters()) + list(proj.parameters())
    opt_g = torch.optim.Adam(g_params, lr=cfg.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    sched_g = warmup_cosine_scheduler(opt_g, cfg.warmup_steps, cfg.max_steps)
    sched_d = warmup_cosine_scheduler(opt_d, cfg.warmup_steps, cfg.max_steps)
    gen_model, disc, proj, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(gen_model, disc, proj, opt_g, opt_d,
                                                                              sched_g, sched_d)
    ema = EMAModel(accelerator.unwrap_model(gen_model).parameters(), decay=0.995)
    start, _ = resume_training(accelerator, out, args.resume, ema=ema)
    for step in range(start, cfg.max_steps):
        a, b = (t.to(accelerator.device) for t in crop_batch(he, ihc, step, cfg))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        fake = gen_model(a)
        # discriminator (LSGAN)
        d_loss = 0.5 * ((disc(b) - 1) ** 2).mean() + 0.5 * (disc(fake.detach()) ** 2).mean()
        opt_d.zero_grad()
        accelerator.backward(d_loss)
        opt_d.step()
        sched_d.step()
        # generator
        model = accelerator.unwrap_model(gen_model)
        f_fake = model.encode(fake)
        with torch.no_grad():  # keys are targets (MoCo-style): no gradient through them
            f_in, f_true = model.encode(a), model.encode(b)
        ids = [torch.randperm(f.shape[-2] * f.shape[-1], generator=gen)[:cfg.nce_patches] for f in f_fake]
        q = proj(f_fake, ids)
        nce = patch_nce(q, [k.detach() for k in proj(f_in, ids)], cfg.nce_temperature)
        asp = patch_nce(q, [k.detach() for k in proj(f_true, ids)], cfg.nce_temperature,
                        progress=step / max(1, cfg.max_steps))
        gan = ((disc(fake) - 1) ** 2).mean()
        l1 = F.l1_loss(blur(fake, cfg.l1_blur), blur(b, cfg.l1_blur))
        g_loss = cfg.gan_weight * gan + cfg.nce_weight * nce + cfg.asp_weight * asp + cfg.l1_weight * l1
        opt_g.zero_grad()
        accelerator.backward(g_loss)
        accelerator.clip_grad_norm_(g_params, 1.0)
        opt_g.step()
        sched_g.step()
        ema.step(accelerator.unwrap_model(gen_model).parameters())
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, d=d_loss.item(), gan=gan.item(), nce=nce.item(), asp=asp.item(), l1=l1.item(),
                      lr=sched_g.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            model = accelerator.unwrap_model(gen_model)
            with ema_weights(ema, model):
                metrics = evaluate(make_pipeline(cfg, generator=model), val, "fast",
                                   out / "validation" / f"step_{done:06d}.png")
            log.write(step=done, **{f"val_{k}": v for k, v in metrics.items()})
            accelerator.print(f"step {done}: {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)
    model = accelerator.unwrap_model(gen_model)
    ema.copy_to(model.parameters())
    model.eval()
    final = out / "final"
    make_pipeline(cfg, generator=model).save_pretrained(final)
    return final


def diffusion_unet(cfg, vae):
    """The translator's denoiser: noisy IHC latent and H&E latent (and, refining the fast
    translator, its IHC latent) concatenated in; noise out, or for a refiner a residual on
    the fast latent with the last layer zero-initialised (untrained refiner = fast model)."""
    from diffusers import UNet2DModel

    from pipelines.virtual_ihc import DIFFUSION_PRIORS, diffusion_in_channels

    if cfg.diffusion_prior not in DIFFUSION_PRIORS:
        raise ValueError(f"diffusion_prior must be one of {DIFFUSION_PRIORS}, got {cfg.diffusion_prior!r}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = vae.config.latent_channels
    n = len(cfg.unet_channels)
    unet = UNet2DModel(sample_size=cfg.crop_size // factor, in_channels=diffusion_in_channels(cfg.diffusion_prior,
                                                                                             latent),
                       out_channels=latent, block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), norm_num_groups=32)
    if cfg.diffusion_prior == "fast":  # (a residual model keeps the default init: v = 0 is not "no change")
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def fast_prior(cfg: VirtualIHCConfig, device):
    """The frozen fast translator a refiner starts from (``cfg.prior_checkpoint``); saved
    beside the refiner in its pipeline folder."""
    from pipelines.virtual_ihc import VirtualIHCPipeline

    pipe = VirtualIHCPipeline.from_pretrained(cfg.prior_checkpoint)
    if pipe.generator is None:
        raise ValueError(f"{cfg.prior_checkpoint} has no fast translator to refine")
    if pipe.config.stain != cfg.stain:
        raise ValueError(f"{cfg.prior_checkpoint} translates {pipe.config.stain}, not {cfg.stain}")
    return pipe.generator.eval().requires_grad_(False).to(device)


@torch.no_grad()
def run_fast(generator, tiles: torch.Tensor) -> torch.Tensor:
    """The fast translator on tiles of any size (reflect-padded to its multiple, cropped back)."""
    h, w = tiles.shape[-2:]
    f = generator.factor
    padded = F.pad(tiles.to(generator.device), (0, (-w) % f, 0, (-h) % f), mode="reflect")
    return generator(padded)[..., :h, :w]


def _train_diffusion(cfg, args, accelerator, he, ihc, val, log, out, EMAModel) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler

    from pipelines.encoders import load_model_folder

    vae = load_model_folder(AutoencoderKL, Path(cfg.vae)).eval().requires_grad_(False).to(accelerator.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = diffusion_unet(cfg, vae)
    prior_generator = fast_prior(cfg, accelerator.device) if cfg.diffusion_prior != "none" else None
    prior = partial(run_fast, prior_generator) if prior_generator is not None else None
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    sched = warmup_cosine_scheduler(opt, cfg.warmup_steps, cfg.max_steps)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=cfg.ema_decay)
    start, _ = resume_training(accelerator, out, args.resume, ema=ema)
    scale = vae.config.scaling_factor
    cache = PairLatentCache(vae, he, ihc, factor, prior=prior) if cfg.latent_cache else None
    residual = cfg.diffusion_prior == "residual"
    if residual and not cfg.residual_scale:
        if cache is None:
            raise ValueError("diffusion_prior 'residual' without the latent cache needs residual_scale > 0")
        cfg = replace(cfg, residual_scale=round(cache.residual_std(), 4))  # saved in the pipeline config
        accelerator.print(f"residual_scale {cfg.residual_scale} (std of IHC - fast latents over the pairs)")
    # a refiner only ever starts from the fast latent noised to strength x T: train those levels
    t_max = max(1, int(round(cfg.diffusion_strength * cfg.num_train_timesteps))) \
        if cfg.diffusion_prior == "fast" else cfg.num_train_timesteps
    for step in range(start, cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        prior_latent = None
        if cache is not None:
            drawn = [t.to(accelerator.device) for t in cache.batch(step, cfg)]
            cond, mean, std = drawn[:3]
            prior_latent = drawn[3] if prior is not None else None
            target = mean + std * torch.randn(mean.shape, generator=gen).to(mean)
        else:
            a, b = (t.to(accelerator.device) for t in crop_batch(he, ihc, step, cfg))
            with torch.no_grad():
                cond = vae.encode(a * 2 - 1).latent_dist.mode() * scale
                target = vae.encode(b * 2 - 1).latent_dist.sample(gen) * scale
                if prior is not None:
                    prior_latent = vae.encode(prior(a).clamp(0, 1) * 2 - 1).latent_dist.mode() * scale
        noise = torch.randn(target.shape, generator=gen).to(target)
        t = torch.randint(0, t_max, (len(target),), generator=gen).to(target.device)
        with accelerator.accumulate(unet):
            noisy = noise_scheduler.add_noise(target, noise, t)
            if prior_latent is None:
                pred = unet(torch.cat([noisy, cond], 1), t).sample
                loss = F.mse_loss(pred, noise)
            elif residual:  # diffuse the normalised residual, predict its velocity
                delta = (target - prior_latent) / cfg.residual_scale
                noisy = noise_scheduler.add_noise(delta, noise, t)
                pred = unet(torch.cat([noisy, cond, prior_latent], 1), t).sample
                loss = F.mse_loss(pred, noise_scheduler.get_velocity(delta, noise, t))
            else:  # the clean latent as the fast latent plus a residual
                pred = unet(torch.cat([noisy, cond, prior_latent], 1), t).sample
                loss = F.mse_loss(prior_latent + pred, target)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        ema.step(accelerator.unwrap_model(unet).parameters())
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=loss.item(), lr=sched.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            model = accelerator.unwrap_model(unet)
            with ema_weights(ema, model):
                pipe = make_pipeline(cfg, generator=prior_generator, vae=vae, unet=model)
                metrics = evaluate(pipe, val, "diffusion", out / "validation" / f"step_{done:06d}.png",
                                   steps=cfg.inference_steps)
            log.write(step=done, **{f"val_{k}": v for k, v in metrics.items()})
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)
    model = accelerator.unwrap_model(unet)
    ema.copy_to(model.parameters())
    model.eval()
    final = out / "final"
    make_pipeline(cfg, generator=prior_generator, vae=vae, unet=model).save_pretrained(final)
    return final


if __name__ == "__main__":
    main()

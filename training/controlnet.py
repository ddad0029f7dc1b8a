"""Train the nuclei-mask ControlNet of :class:`pipelines.mask_to_image.MaskToImagePipeline`.

    python -m training.controlnet --config training/recipes/controlnet.yaml [--resume latest]

In the style of diffusers' ``train_controlnet.py``: the base model (VAE, UNet, embedding
conditioner of ``checkpoints/embedding-ldm``) is frozen; a ``ControlNetModel`` initialised
from the base UNet's encoder (``ControlNetModel.from_unet``; its zero convolutions make it
start as a no-op) learns to add residuals that draw the nuclei of a control map
(:func:`pipelines.mask_to_image.control_map`: one-hot classes + instance boundaries).

Data: labelled tiles -- by default the real hgsc_nest tile's train band (inflammatory,
neoplastic, connective nuclei) and procedural phantom tiles with exact masks (every
class, including dead and epithelial, which the real tile lacks) -- drawn by weight,
cropped, rotated / flipped and stain-jittered (:class:`training.segmenter.BatchSampler`,
a pure function of ``(seed, step)``, so resume is exact).

Conditioning dropout: the control map is zeroed with probability ``mask_dropout``
(classifier-free guidance on the mask); the base model's embedding input gets the crop's
global SSL token with probability ``embedding_prob`` (style / tissue context) and the null
embedding otherwise, so both uses work at sampling time.

Validation: images generated for held-out label maps (hgsc_nest's held-out band), nuclei
found in them by hematoxylin threshold + watershed, and object-level F1 / Dice against the
conditioning map -- the same measure as ``bench/mask_fidelity.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import InputError
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
class ControlNetConfig:
    output_dir: str = "runs/controlnet"
    base: str = "checkpoints/embedding-ldm"
    encoder: str = "checkpoints/ssl-encoder"
    seed: int = 0
    sources: tuple[dict[str, Any], ...] = ({"name": "hgsc_nest", "weight": 0.6},
                                           {"name": "phantom", "n": 96, "seed": 2000, "weight": 0.4})
    stride: int = 128
    crop_size: int = 128
    batch_size: int = 8
    stain_jitter: bool = True
    max_steps: int = 3000
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    mask_dropout: float = 0.1
    embedding_prob: float = 0.5
    ema_decay: float = 0.995
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 500
    validation_steps: int = 20
    guidance_scale: float = 2.0
    threads: int = 1
    mixed_precision: str = "no"
    # > 0: encode this many augmented crops once (VAE posterior, SSL token, control map) and
    # draw batches from them; 0 encodes every batch (needed when the data must stream).
    bank_size: int = 0
    # share of crops centred on a class-balanced nucleus (training.segmenter.BatchSampler): the
    # scarce class is drawn from its own examples, not only as the odd nucleus in a tumour crop
    class_balance: float = 0.0
    # start from a trained mask-conditioned pipeline's ControlNet (fine-tuning) instead of a
    # fresh copy of the base UNet's encoder; the base must be the one it was trained on
    init_controlnet: str | None = None
    # per-class weights on the denoising loss at a nucleus' latent pixels (class name -> weight,
    # 1 elsewhere): the few latent pixels of a scarce class otherwise count as little as its share
    class_loss_weights: dict[str, float] | None = None


def mask_fidelity(images: np.ndarray, layouts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Nuclei found in generated uint8 images (hematoxylin threshold + watershed) vs their
    conditioning maps: mean object-level F1 (centroids within 8 px) and foreground Dice."""
    from studio.metrics import mask_fidelity as fidelity
    from studio.nuclei import threshold_watershed_baseline

    rows = [fidelity(inst, cls, threshold_watershed_baseline(image)[0])
            for image, (inst, cls) in zip(images, layouts, strict=True)]
    return {"f1": float(np.mean([r["f1"] for r in rows])), "dice": float(np.mean([r["dice"] for r in rows]))}


def heldout_layouts(size: int, n: int, classes: dict[int, str], seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` label maps from hgsc_nest's held-out band (never trained on)."""
    from studio.layouts import LayoutSource

    source = LayoutSource("hgsc_nest", size, classes, split="heldout")
    rng = np.random.default_rng(seed)
    return [(lay.inst, lay.cls) for lay in (source.draw(rng) for _ in range(n))]


@torch.no_grad()
def encode_crops(batch: dict, vae, encoder, num_classes: int, device) -> dict:
    """What the frozen parts make of a :class:`~training.segmenter.BatchSampler` batch:
    control maps, the VAE posterior's mean / std and, with an encoder, the global SSL token
    of each crop."""
    from pipelines.mask_to_image import control_map

    tiles = batch["image"].to(device)
    dist = vae.encode(tiles * 2 - 1).latent_dist
    scale = vae.config.scaling_factor
    out = {"control": torch.from_numpy(np.stack([control_map(inst, cls, num_classes) for inst, cls
                                                 in zip(batch["inst"], batch["tp"].numpy(), strict=True)])),
           "mean": dist.mean * scale, "std": dist.std * scale}
    if encoder is not None:
        out["token"] = encoder.embed(tiles, grid=None)
    return out


class ControlBank:
    """Augmented training crops encoded once by the frozen parts: the VAE posterior (mean,
    std; a fresh latent is sampled from it per use), the global SSL token and the control map.

    Each bank entry is its own :class:`~training.segmenter.BatchSampler` draw (crop, rotation,
    flip, stain jitter), so augmentation is baked in; batches then cost only the ControlNet
    and UNet passes instead of also a VAE and an encoder pass per crop.
    """

    def __init__(self, sampler, size: int, vae, encoder, num_classes: int, device, batch: int = 16):
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, size, batch):
            b = sampler.batch(50_000_000 + i, min(batch, size - i))
            for key, value in encode_crops(b, vae, encoder, num_classes, device).items():
                # binary control maps: 1 byte a pixel instead of 4
                parts.setdefault(key, []).append(value.cpu().to(torch.uint8) if key == "control" else value.cpu())
        self.parts = {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.parts["mean"])

    def batch(self, batch_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self), (batch_size,), generator=gen)
        out = {k: v[idx] for k, v in self.parts.items()}
        mean, std = out.pop("mean"), out.pop("std")
        out["latents"] = mean + std * torch.randn(mean.shape, generator=gen)  # a posterior sample
        out["control"] = out["control"].float()
        return out


@torch.no_grad()
def validate(pipe, layouts, cfg: ControlNetConfig, out_png: Path) -> dict[str, float]:
    from studio.io import to_uint8
    from studio.report import contact_sheet, overlay_labels, save_png

    gen = torch.Generator().manual_seed(0)
    cond = pipe(layouts, num_inference_steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale,
                generator=gen, output_type="pt", progress=False).images
    gen = torch.Generator().manual_seed(0)
    free = pipe(layouts, num_inference_steps=cfg.validation_steps, guidance_scale=1.0,
                controlnet_conditioning_scale=0.0, generator=gen, output_type="pt", progress=False).images
    cond_u8, free_u8 = to_uint8(cond), to_uint8(free)
    m_cond, m_free = mask_fidelity(cond_u8, layouts), mask_fidelity(free_u8, layouts)
    save_png(contact_sheet([
        ("conditioning maps", [(f"{i}", overlay_labels(np.full_like(cond_u8[i], 255), inst, cls))
                               for i, (inst, cls) in enumerate(layouts)]),
        (f"mask-conditioned (F1 {m_cond['f1']:.2f}, Dice {m_cond['dice']:.2f})",
         [(f"{i}", im) for i, im in enumerate(cond_u8)]),
        (f"same seed, no mask (F1 {m_free['f1']:.2f})", [(f"{i}", im) for i, im in enumerate(free_u8)])],
        cell=128), out_png)
    return {"val_f1": m_cond["f1"], "val_dice": m_cond["dice"], "val_f1_unconditioned": m_free["f1"],
            "val_dice_unconditioned": m_free["dice"]}


def loss_weight_map(control: torch.Tensor, weights: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, h, w)`` weights at latent resolution from one-hot control maps ``(B, C + 1, H, W)``:
    ``1 + sum_c (weights[c] - 1) * coverage_c``, where ``coverage_c`` is the share of the latent
    pixel's footprint covered by class ``c`` nuclei (so a latent pixel half on a weighted
    nucleus gets half the extra weight)."""
    cover = F.adaptive_avg_pool2d(control[:, : len(weights)].float(), latent_hw)
    return 1.0 + ((weights.view(1, -1, 1, 1).to(cover) - 1.0) * cover).sum(1, keepdim=True)


def class_weight_vector(cfg: ControlNetConfig, classes: dict[int, str]) -> torch.Tensor | None:
    """Per-class loss weights in class-code order, or None when ``class_loss_weights`` is unset."""
    if not cfg.class_loss_weights:
        return None
    names = {v: k for k, v in classes.items()}
    unknown = sorted(set(cfg.class_loss_weights) - set(names))
    if unknown:
        raise InputError("class_loss_weights", f"unknown class(es) {unknown}; choose from {sorted(names)}")
    bad = {k: v for k, v in cfg.class_loss_weights.items() if not float(v) > 0}
    if bad:
        raise InputError("class_loss_weights", f"{bad}; weights must be > 0")
    return torch.tensor([float(cfg.class_loss_weights.get(classes[c], 1.0)) for c in sorted(classes)])


def init_controlnet(cfg: ControlNetConfig, unet, num_classes: int, latent_factor: int):
    """The ControlNet to train: a fresh copy of the base UNet's encoder, or (``init_controlnet``)
    a trained pipeline's ControlNet, checked against the fresh one's parameter shapes so a
    ControlNet built for another base or class table fails here, not as garbage samples."""
    from pipelines.mask_to_image import controlnet_from_base

    fresh = controlnet_from_base(unet, num_classes, latent_factor)
    if not cfg.init_controlnet:
        return fresh
    from diffusers import ControlNetModel

    from pipelines.encoders import load_model_folder
    from pipelines.loading import check_pipeline_folder
    from studio.errors import WeightsError

    folder = Path(cfg.init_controlnet)
    check_pipeline_folder(folder, required=("controlnet",))
    trained = load_model_folder(ControlNetModel, folder / "controlnet")
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in trained.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise WeightsError(folder / "controlnet", f"does not fit base {cfg.base} with {num_classes} classes "
                                                  f"(first differences: {diff})")
    return trained


def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "controlnet.yaml")
    parser.add_argument("--base", default=None, help="embedding-conditioned base pipeline folder")
    parser.add_argument("--encoder", default=None)
    args = parser.parse_args(argv)
    cfg = load_config(ControlNetConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                                      "base": args.base, "encoder": args.encoder,
                                                      "threads": args.threads})
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.encoders import load_encoder
    from pipelines.loading import latent_ddim
    from pipelines.mask_to_image import MaskToImagePipeline
    from studio.data.samples import PANNUKE_CLASSES
    from studio.stain.augment import StainAugment
    from training.segmenter import BatchSampler, SegmenterConfig, build_training_data

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    base = EmbeddingToImagePipeline.from_pretrained(cfg.base)
    vae, unet, conditioner = base.vae, base.unet, base.conditioner
    for module in (vae, unet, conditioner):
        module.eval().requires_grad_(False).to(accelerator.device)
    encoder = load_encoder(cfg.encoder, device=accelerator.device) if cfg.embedding_prob > 0 else None
    classes = dict(PANNUKE_CLASSES)
    controlnet = init_controlnet(cfg, unet, len(classes), base.latent_factor).train()
    class_weights = class_weight_vector(cfg, classes)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    lr_scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(controlnet).parameters(), decay=cfg.ema_decay)

    start, _ = resume_training(accelerator, out, args.resume, ema=ema)

    seg_cfg = SegmenterConfig(sources=cfg.sources, stride=cfg.stride)
    data, p = build_training_data(seg_cfg)
    sampler = BatchSampler(data, p, cfg.crop_size, stain=StainAugment() if cfg.stain_jitter else None,
                           seed=cfg.seed, class_balance=cfg.class_balance)
    val_layouts = heldout_layouts(cfg.crop_size, 6, classes)
    grid = conditioner.grid_for(cfg.crop_size, cfg.crop_size)
    log = MetricsLog(out)
    bank = ControlBank(sampler, cfg.bank_size, vae, encoder, len(classes), accelerator.device) \
        if cfg.bank_size > 0 else None
    for step in range(start, cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        if bank is not None:
            drawn = bank.batch(cfg.batch_size, gen)
        else:
            batch = sampler.batch(step, cfg.batch_size)
            drawn = encode_crops(batch, vae, encoder, len(classes), accelerator.device)
        control = drawn["control"]
        keep = (torch.rand(len(control), generator=gen) >= cfg.mask_dropout).float().view(-1, 1, 1, 1)
        control = (control * keep).to(accelerator.device)
        if "latents" not in drawn:  # per-batch path: the posterior is sampled after the dropout draw, as always
            drawn["latents"] = drawn["mean"] + drawn["std"] * torch.randn(drawn["mean"].shape, generator=gen).to(
                drawn["mean"])
        latents = drawn["latents"].to(accelerator.device)
        with torch.no_grad():
            if encoder is not None:
                tokens = drawn["token"].to(accelerator.device)  # (B, 1, D) global style token
                use = (torch.rand(len(tokens), generator=gen) < cfg.embedding_prob).view(-1, 1, 1)
                tokens = torch.where(use.to(tokens.device), tokens, conditioner.null_like(tokens))
            else:
                tokens = conditioner.null_embedding.expand(len(latents), 1, -1)
            states, spatial = conditioner(tokens, grid, tuple(latents.shape[-2:]))
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        t = t.to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        sample = torch.cat([noisy, spatial], dim=1)
        with accelerator.accumulate(controlnet):
            down, mid = controlnet(sample, t, encoder_hidden_states=states, controlnet_cond=control,
                                   return_dict=False)
            pred = unet(sample, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            if class_weights is None:
                loss = F.mse_loss(pred, noise)
            else:
                w = loss_weight_map(control, class_weights, tuple(pred.shape[-2:])).to(pred)
                loss = ((pred - noise) ** 2 * w).mean() / w.mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        ema.step(accelerator.unwrap_model(controlnet).parameters())
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            model = accelerator.unwrap_model(controlnet)
            with ema_weights(ema, model):
                scheduler = latent_ddim(base.scheduler.config)
                pipe = MaskToImagePipeline(vae=vae, unet=unet, conditioner=conditioner, controlnet=model,
                                           scheduler=scheduler, class_names=list(classes.values()))
                metrics = validate(pipe, val_layouts, cfg, out / "validation" / f"step_{done:06d}.png")
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)

    model = accelerator.unwrap_model(controlnet)
    ema.copy_to(model.parameters())
    model.eval()
    final = out / "final"
    scheduler = latent_ddim(base.scheduler.config)
    MaskToImagePipeline(vae=vae, unet=unet, conditioner=conditioner, controlnet=model, scheduler=scheduler,
                        class_names=list(classes.values())).save_pretrained(final)
    accelerator.print(f"wrote {final}")
    return final


if __name__ == "__main__":
    main()

"""Train PixCell-256-Cell-ControlNet (:class:`~pipelines.pixcell_controlnet.PixCellControlNet`) on studio data.

    python -m training.pixcell_controlnet --config training/recipes/pixcell_controlnet.yaml [--resume latest]
    accelerate launch -m training.pixcell_controlnet --config ...   # multi-GPU / bf16

The upstream release ships a mock training script; this is a real one, in the style of
diffusers' ``train_controlnet.py``:

* **Frozen**: the PixCell-256 base transformer, the SD3.5 VAE and UNI-2h. **Trained**: the
  ControlNet's copied blocks (the first ``n_blocks``), its zero-initialised mask patch
  embedding ``cond_pos_embed`` and its zero-initialised per-block linears
  ``controlnet_blocks``. The copy's own patch / timestep / UNI embeddings stay as copied
  (frozen), as in PixArt's ControlNet. A fresh ControlNet is a copy of the base
  (:func:`fresh_controlnet`; zero outputs, so step 0 is exactly the base model);
  ``init_from`` continues a released (or earlier) ControlNet folder instead.
* **Data**: mask -> image pairs, ``crop_size`` (256) px crops of the ``sources`` (the same
  entries as the segmenter: dataset folders in PanNuke / CoNIC / folder layout, the
  ``hgsc_nest`` labelled crops, procedural ``phantom`` tiles), rotated / flipped /
  stain-jittered by :class:`training.segmenter.BatchSampler` (a pure function of
  ``(seed, step)``: resume is exact). The mask enters as the release expects it
  (:func:`pipelines.pixcell_controlnet.render_mask_rgb`: nuclei white on black, through the
  SD3.5 VAE like an image).
* **UNI token**: UNI-2h of the training crop itself (as PixCell trains), replaced by the
  learned null embedding with probability ``uni_dropout`` (classifier-free guidance).
* **Objective**: PixCell's: epsilon prediction on the DDPM schedule of the base's
  ``scheduler/scheduler_config.json`` (its betas and ``num_train_timesteps``). The
  transformer outputs ``2 x in_channels`` (learned sigma): the epsilon half is trained with
  MSE; the variance half with IDDPM's variational bound with the mean stopped
  (:func:`variance_vlb`, weight ``vlb_weight``; PixArt's hybrid loss), so the ControlNet's
  residuals cannot silently corrupt the learned variance. The studio's samplers (DPM-Solver,
  DDIM) read only the epsilon half; ``vlb_weight: 0`` trains epsilon alone.

Checkpoints: ``output_dir/checkpoints/checkpoint_N`` every ``checkpoint_every`` optimizer
steps (accelerate state with safetensors weights, the EMA as safetensors:
:func:`training.utils.save_checkpoint`); ``--resume latest`` continues. The result is
``output_dir/final`` in the published ``PixCell-256-Cell-ControlNet`` layout (``controlnet/``,
``transformer/``, ``scheduler/``, ``vae/``, ``model_index.json``), so
``histostudio generate rare --checkpoint OUTPUT/final`` runs it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import InputError, WeightsError
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
class PixCellControlNetConfig:
    output_dir: str = "runs/pixcell_controlnet"
    # PixCell-256 as downloaded (model_index.json, scheduler/, transformer/) or its transformer/
    base: str = "/models/PixCell-256"
    # the SD3.5 VAE folder; None: base/vae when it holds weights, else one in $HISTOSTUDIO_MODELS or beside base
    vae: str | None = None
    # UNI-2h (config.json + model.safetensors); None: found in $HISTOSTUDIO_MODELS or beside base
    uni2h: str | None = None
    # continue a PixCell ControlNet folder (the release, or an earlier final/) instead of a fresh copy
    init_from: str | None = None
    n_blocks: int | None = None  # fresh ControlNet: copied blocks that feed residuals (None: all)
    seed: int = 0
    sources: tuple[dict[str, Any], ...] = ({"name": "hgsc_nest", "weight": 0.6},
                                           {"name": "phantom", "n": 96, "seed": 3000, "weight": 0.4})
    stride: int = 128
    crop_size: int = 256
    batch_size: int = 4  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    stain_jitter: bool = True
    class_balance: float = 0.0
    max_steps: int = 10000  # optimizer steps
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    uni_dropout: float = 0.1  # probability a crop's UNI token is replaced by the learned null embedding
    vlb_weight: float = 1.0  # weight of the variance half's VLB term (0: epsilon MSE only)
    conditioning_scale: float = 1.0
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: no validation images
    validation_tiles: int = 4
    validation_steps: int = 20
    guidance_scale: float = 1.0
    log_every: int = 10
    threads: int = 1
    mixed_precision: str = "no"  # "bf16" on GPU (the frozen base and UNI-2h then run in bf16)
    # final/: hard-link (else copy) the base transformer and VAE weights in, so the folder loads alone
    bundle_weights: bool = True


# --------------------------------------------------------------------------- pieces
def base_root(base: str | Path) -> tuple[Path, Path]:
    """``(release folder, transformer folder)`` of the base; a missing one is one error."""
    from pipelines.pixcell_controlnet import BASE_SOURCE

    path = Path(base)
    if not path.is_dir():
        raise WeightsError(path, f"no such base folder: download PixCell-256 from {BASE_SOURCE} (set 'base')")
    if (path / "transformer").is_dir():
        return path, path / "transformer"
    return path.parent, path


def load_base(cfg: PixCellControlNetConfig) -> tuple[Any, dict[str, Any], Path]:
    """The frozen base transformer, its config and the folder holding ``scheduler/``."""
    from pipelines.pixcell import PixCellTransformer2DModel
    from pipelines.pixcell_controlnet import BASE_SOURCE, TRANSFORMER_CLASSES, load_checked, read_config

    root, tdir = base_root(cfg.base)
    hint = f"download transformer/ from {BASE_SOURCE}"
    config = read_config(tdir, TRANSFORMER_CLASSES, hint)
    if int(config.get("caption_num_tokens", 1)) != 1:
        raise WeightsError(tdir / "config.json", "is PixCell-1024 (16 UNI tokens); the cell ControlNet is trained "
                                                 "on PixCell-256")
    transformer = load_checked(tdir, PixCellTransformer2DModel, config, "PixCellTransformer2DModel", hint,
                                torch.float32)
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise WeightsError(root / "scheduler", f"has no scheduler_config.json (download scheduler/ from {BASE_SOURCE})")
    return transformer, config, root


def fresh_controlnet(base: Any, base_config: dict[str, Any], n_blocks: int | None) -> Any:
    """A ControlNet that starts as the base: its ``transformer`` a copy of the base's weights,
    ``cond_pos_embed`` and ``controlnet_blocks`` zero (so its residuals are zero)."""
    from pipelines.pixcell_controlnet import PixCellControlNet

    kwargs = {k: v for k, v in base_config.items() if not k.startswith("_")}
    try:
        blocks = int(kwargs["num_layers"]) if n_blocks is None else n_blocks  # written out, as the release does
        net = PixCellControlNet.from_config({**kwargs, "n_blocks": blocks})
    except ValueError as exc:
        raise InputError("n_blocks", str(exc)) from exc
    net.transformer.load_state_dict(base.state_dict(), strict=True)
    return net


def init_controlnet(cfg: PixCellControlNetConfig, base: Any, base_config: dict[str, Any]) -> Any:
    if not cfg.init_from:
        return fresh_controlnet(base, base_config, cfg.n_blocks)
    from pipelines.pixcell_controlnet import load_pixcell_controlnet

    folder = Path(cfg.init_from)
    folder = folder / "controlnet" if (folder / "controlnet").is_dir() else folder
    if not folder.is_dir():
        raise WeightsError(folder, "no such ControlNet folder (init_from: a PixCell ControlNet release or final/)")
    return load_pixcell_controlnet(folder, base_config, torch.float32)


def trainable_parameters(controlnet: Any) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what trains: the run copied blocks, ``cond_pos_embed``
    and ``controlnet_blocks`` (the copy's ``norm_out`` / ``proj_out`` never run)."""
    controlnet.requires_grad_(False)
    parts = [*controlnet.transformer.transformer_blocks[: controlnet.n_blocks], controlnet.cond_pos_embed,
             controlnet.controlnet_blocks]
    for part in parts:
        part.requires_grad_(True)
    return [p for p in controlnet.parameters() if p.requires_grad]


def check_has_nuclei(data: Any, sources: Any, limit: int = 4096) -> None:
    """A ControlNet learns where nuclei are: data whose tiles hold none teaches it nothing."""
    for i in range(min(len(data), limit)):
        if np.asarray(data.read(i).inst).max() > 0:
            return
    raise InputError("sources", f"{list(sources)}: no tile holds a labelled nucleus (instance maps all 0); the "
                                "ControlNet learns mask -> image, give datasets with nuclei labels")


def resolve_uni2h(cfg: PixCellControlNetConfig) -> Path:
    from pipelines.pixcell import uni2h_spec_for

    if cfg.uni2h:
        return Path(cfg.uni2h)
    try:
        return Path(uni2h_spec_for(base_root(cfg.base)[0]).split(":", 1)[1])
    except InputError as exc:
        raise InputError("uni2h", "PixCell trains on the UNI-2h token of each crop: set uni2h to a UNI2-h folder "
                                  "(config.json + model.safetensors converted from pytorch_model.bin of Hugging "
                                  "Face MahmoodLab/UNI2-h, gated), or uni_dropout: 1 to train on the null "
                                  "embedding only") from exc


@torch.no_grad()
def encode_batch(batch: dict, vae: Any, uni: Any, device: Any,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the frozen parts make of a batch: image latents (a posterior sample), mask
    latents (the rendered mask through the same VAE) and the crops' UNI-2h tokens."""
    from pipelines.pixcell_controlnet import render_mask_rgb

    cfg = vae.config
    shift = cfg.shift_factor or 0.0

    def latents(x: torch.Tensor) -> torch.Tensor:
        z = vae.encode(x.to(device, vae.dtype) * 2 - 1).latent_dist.sample(generator)
        return ((z - shift) * cfg.scaling_factor).float()

    tiles = batch["image"]
    masks = torch.from_numpy(np.stack([render_mask_rgb(np.asarray(inst)) for inst in batch["inst"]]))
    tokens = uni.embed(tiles).to(device) if uni is not None else None
    return {"latents": latents(tiles), "cond": latents(masks), "tokens": tokens}


def variance_vlb(scheduler: Any, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """IDDPM's L_vlb for the learned-range variance half ``v`` with the epsilon ``eps`` stopped
    (so it trains only the variance): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per
    latent element, and at ``t = 0`` the Gaussian NLL of ``x_0`` (IDDPM's discretised decoder
    likelihood assumes 8-bit pixels; these are VAE latents)."""
    betas = scheduler.betas.to(xt.device, torch.float32)
    ac = scheduler.alphas_cumprod.to(xt.device, torch.float32)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t = 0, as IDDPM
    coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
    coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    def at(a: torch.Tensor) -> torch.Tensor:
        return a[t].view(-1, 1, 1, 1)

    x0, xt, eps, v = x0.float(), xt.float(), eps.detach().float(), v.float()
    true_mean = at(coef_x0) * x0 + at(coef_xt) * xt
    pred_x0 = (xt - (1 - at(ac)).sqrt() * eps) / at(ac).sqrt()
    model_mean = at(coef_x0) * pred_x0 + at(coef_xt) * xt
    frac = (v + 1) / 2
    model_log_var = frac * at(torch.log(betas)) + (1 - frac) * at(post_log_var)
    true_log_var = at(post_log_var)
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    nll = 0.5 * (math.log(2 * math.pi) + model_log_var + (x0 - model_mean) ** 2 * torch.exp(-model_log_var))
    per = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)
    return per.mean()


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_release(folder: Path, controlnet: Any, base_config: dict[str, Any], base_dir: Path, root: Path,
                 vae_dir: Path, bundle: bool) -> Path:
    """Write ``folder`` in the published ``PixCell-256-Cell-ControlNet`` layout (safetensors only)."""
    from pipelines.pixcell_controlnet import CONTROLNET_CLASSES
    from pipelines.uni2h import find_weights

    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    tdir = folder / "transformer"
    tdir.mkdir(exist_ok=True)
    (tdir / "config.json").write_text(json.dumps({**base_config, "_class_name": "PixCellTransformer2DModelControlNet"},
                                                 indent=2))
    if bundle:
        weights = find_weights(base_dir, "the base transformer's weights")
        link_or_copy(weights, tdir / weights.name)
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(root / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    (folder / "vae").mkdir(exist_ok=True)
    shutil.copy2(vae_dir / "config.json", folder / "vae" / "config.json")
    if bundle:
        for weights in vae_dir.glob("*.safetensors"):
            link_or_copy(weights, folder / "vae" / weights.name)
    index = {"_class_name": "PixCellControlNetPipeline", "_diffusers_version": "0.32.2",
             "controlnet": ["pixcell_controlnet", CONTROLNET_CLASSES[0]],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "transformer": ["pixcell_controlnet_transformer", "PixCellTransformer2DModelControlNet"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@torch.no_grad()
def validate(pipe: Any, cfg: PixCellControlNetConfig, out_png: Path,
             autocast: Any = contextlib.nullcontext) -> dict[str, float]:
    """Tiles for held-out hgsc_nest label maps; nuclei found in them vs the maps (F1, Dice)."""
    from studio.io import to_uint8
    from studio.report import contact_sheet, overlay_labels, save_png
    from training.controlnet import heldout_layouts, mask_fidelity

    layouts = heldout_layouts(cfg.crop_size, cfg.validation_tiles, pipe.classes)
    gen = torch.Generator().manual_seed(0)
    with autocast():  # the trained ControlNet is float32 beside a bf16 base under mixed precision
        images = pipe(layouts, num_inference_steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale,
                      generator=gen, output_type="pt", progress=False).images
    u8 = to_uint8(images.float())  # under bf16 autocast the decoder's output is bf16
    m = mask_fidelity(u8, layouts)
    save_png(contact_sheet([
        ("conditioning maps", [(f"{i}", overlay_labels(np.full_like(u8[i], 255), inst, cls))
                               for i, (inst, cls) in enumerate(layouts)]),
        (f"PixCell ControlNet (F1 {m['f1']:.2f}, Dice {m['dice']:.2f})", [(f"{i}", im) for i, im in enumerate(u8)])],
        cell=128), out_png)
    return {"val_f1": m["f1"], "val_dice": m["dice"]}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0], Path(__file__).parent / "recipes" / "pixcell_controlnet.yaml")
    parser.add_argument("--base", default=None, help="PixCell-256 folder")
    parser.add_argument("--vae", default=None, help="SD3.5 VAE folder")
    parser.add_argument("--uni2h", default=None, help="UNI-2h folder")
    args = parser.parse_args(argv)
    cfg = load_config(PixCellControlNetConfig, args.config,
                      {"max_steps": args.max_steps, "output_dir": args.output_dir, "base": args.base,
                       "vae": args.vae, "uni2h": args.uni2h, "threads": args.threads})
    if not 0.0 <= cfg.uni_dropout <= 1.0:
        raise InputError("uni_dropout", f"{cfg.uni_dropout}; must be in [0, 1]")
    if cfg.crop_size % 16:
        raise InputError("crop_size", f"{cfg.crop_size}; PixCell tiles are multiples of 16 px (256 native)")
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel

    from pipelines.encoders import load_model_folder
    from pipelines.pixcell import make_scheduler, resolve_vae
    from pipelines.pixcell_controlnet import PixCellControlNetPipeline, controlled_forward
    from pipelines.uni2h import UNI2hEncoder
    from studio.stain.augment import StainAugment
    from training.segmenter import BatchSampler, SegmenterConfig, build_training_data

    # 1. everything a user gives is checked before anything is written
    base, base_config, root = load_base(cfg)
    base_dir = base_root(cfg.base)[1]
    null = base.caption_projection.uncond_embedding.detach().float().clone()  # (1, D), before any bf16 cast
    # PixCell's training schedule: the DDPM betas / timesteps of the base's scheduler config
    noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(root / "scheduler")))
    if noise_scheduler.config.prediction_type != "epsilon":
        raise WeightsError(root / "scheduler" / "scheduler_config.json", f"prediction_type is "
                           f"{noise_scheduler.config.prediction_type}; PixCell predicts epsilon")
    vae_dir = resolve_vae(root, cfg.vae)
    vae = load_model_folder(AutoencoderKL, vae_dir)
    if vae.config.latent_channels != base.config.in_channels:
        raise WeightsError(vae_dir, f"gives {vae.config.latent_channels} latent channels; PixCell takes "
                                    f"{base.config.in_channels} (the SD3.5 VAE has 16)")
    uni = UNI2hEncoder.from_folder(resolve_uni2h(cfg)) if cfg.uni_dropout < 1.0 else None
    if uni is not None and uni.dim != int(base.config.caption_channels):
        raise WeightsError(resolve_uni2h(cfg), f"gives {uni.dim}-d tokens; the base takes "
                                               f"{base.config.caption_channels} (UNI-2h: 1536)")
    controlnet = init_controlnet(cfg, base, base_config)
    data, p = build_training_data(SegmenterConfig(sources=cfg.sources, stride=cfg.stride))
    check_has_nuclei(data, cfg.sources)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    set_seed(cfg.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    base.requires_grad_(False).eval().to(device)
    if weight_dtype != torch.float32:
        base.to(weight_dtype)
    vae.requires_grad_(False).eval().to(device)  # float32: SD3.5's VAE overflows in half precision
    if uni is not None:
        uni.model.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32:
            uni.model.to(weight_dtype)
    params = trainable_parameters(controlnet)
    controlnet.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.use_ema else None
    start, _ = resume_training(accelerator, out, args.resume, ema=ema)

    sampler = BatchSampler(data, p, cfg.crop_size, stain=StainAugment() if cfg.stain_jitter else None,
                           seed=cfg.seed, class_balance=cfg.class_balance)
    log = MetricsLog(out) if accelerator.is_main_process else None
    channels = int(base.config.in_channels)
    accum = cfg.gradient_accumulation_steps
    for step in range(start, cfg.max_steps):
        for micro in range(accum):
            # 2. batch `index` is a pure function of (seed, index): resume draws the same stream
            index = step * accum + micro
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
            batch = sampler.batch(index, cfg.batch_size, rank=accelerator.process_index,
                                  world=accelerator.num_processes)
            enc = encode_batch(batch, vae, uni, device, gen)
            x0, cond = enc["latents"], enc["cond"]
            n = len(x0)
            tokens = enc["tokens"] if enc["tokens"] is not None else null.expand(n, 1, -1).to(device)
            drop = (torch.rand(n, generator=gen) < cfg.uni_dropout).view(-1, 1, 1).to(device)
            tokens = torch.where(drop, null.to(device).expand_as(tokens), tokens.float())
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)

            # 3. ControlNet residuals -> frozen base; epsilon MSE (+ the variance half's VLB)
            with accelerator.accumulate(controlnet), accelerator.autocast():
                residuals = controlnet(noisy, cond, tokens, t)
                pred = controlled_forward(base, noisy.to(weight_dtype), tokens.to(weight_dtype), t, residuals,
                                          cfg.conditioning_scale).float()
                eps, var = pred[:, :channels], pred[:, channels:]
                mse = F.mse_loss(eps, noise)
                vlb = variance_vlb(noise_scheduler, x0, noisy, t, eps, var) \
                    if cfg.vlb_weight > 0 and var.shape[1] == channels else mse.new_zeros(())
                loss = mse + cfg.vlb_weight * vlb
                if not torch.isfinite(loss.detach()):
                    raise RuntimeError(f"step {step}: loss is {loss.item()} (lower learning_rate, or use bf16 "
                                       "rather than fp16)")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if ema is not None:
            ema.step(params)
        done = step + 1
        if log is not None and (done % cfg.log_every == 0 or done == cfg.max_steps):
            log.write(step=done, loss=loss.detach().item(), mse=mse.detach().item(), vlb=vlb.detach().item(),
                      lr=lr_scheduler.get_last_lr()[0])
        if cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.max_steps) \
                and accelerator.is_main_process:
            model = accelerator.unwrap_model(controlnet)
            with ema_weights(ema, model, params):
                pipe = PixCellControlNetPipeline(transformer=base, controlnet=model, vae=vae,
                                                 scheduler=make_scheduler(root, "dpm"))
                metrics = validate(pipe, cfg, out / "validation" / f"step_{done:06d}.png", accelerator.autocast)
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.detach().item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints, ema=ema)

    # 4. the published layout
    final = out / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(controlnet)
        if ema is not None:
            ema.copy_to(params)
        save_release(final, model.float().eval(), base_config, base_dir, root, vae_dir, cfg.bundle_weights)
        accelerator.print(f"wrote {final}")
    return final


if __name__ == "__main__":
    import sys

    from studio.errors import HistostudioError

    try:
        main()
    except HistostudioError as exc:  # a user's bad folder / recipe: one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

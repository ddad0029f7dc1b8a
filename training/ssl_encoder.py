"""Train the built-in SSL encoder (:class:`pipelines.encoders.PatchEncoder`) with SimCLR.

    python -m training.ssl_encoder --config training/recipes/ssl_encoder.yaml [--resume latest]

SimCLR (Chen et al. 2020): two random augmentations of each 64x64 patch of real tissue
(crop-and-resize, stain jitter, blur, noise, and with ``geometric: d4`` flips and 90-degree
rotations) are pulled together and pushed away from every other patch in the batch
(NT-Xent loss on a projection head that is discarded after training).

``geometric`` decides what the tokens may forget. ``d4`` (the first shipped encoder) makes
them invariant to the eight flips/rotations of a patch, so they cannot say which way fibres,
nuclei or glands run, and a generator conditioned on them cannot reproduce it. ``none``
keeps orientation: two views differ only in scale, stain, blur and noise
(``training/recipes/ssl_encoder_oriented.yaml``). ``bench/orientation_probe.py`` checks
which of the two a checkpoint is. Stain jitter makes the embedding describe tissue and
cells rather than a lab's colours, which is what conditioning generation needs.

Validation, on patches from the held-out regions: alignment (mean distance between two
views of a patch), uniformity (Wang & Isola) and kNN retrieval accuracy of which image a
held-out patch came from (tissue types differ between the images).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import CropSampler
from training.utils import MetricsLog, common_args, load_config, resume_training, save_checkpoint


@dataclass
class SSLConfig:
    output_dir: str = "runs/ssl_encoder"
    seed: int = 0
    patch_size: int = 64
    context: int = 96  # crops are cut from a larger window, then resized: scale jitter
    batch_size: int = 128
    max_steps: int = 3000
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    embed_dim: int = 64
    channels: tuple[int, ...] = (32, 48, 64, 96, 128)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 250
    threads: int = 1
    geometric: str = "d4"  # "d4": invariant to flips and 90-degree rotations; "none": keep orientation


GEOMETRIC = ("d4", "none")


class ProjectionHead(nn.Module):
    def __init__(self, dim: int, hidden: int = 128, out: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def augment(windows: torch.Tensor, size: int, gen: torch.Generator, geometric: str = "d4") -> torch.Tensor:
    """One random view per window: crop 60-100 % of it, resize to ``size``, flip/rotate
    (``geometric="d4"`` only), stain jitter, blur, noise."""
    from studio.stain.augment import StainAugment

    b, _, h, _ = windows.shape
    scale = torch.empty(b).uniform_(0.6, 1.0, generator=gen)
    views = []
    for i in range(b):
        side = int(h * scale[i])
        y, x = torch.randint(0, h - side + 1, (2,), generator=gen).tolist()
        crop = windows[i:i + 1, :, y:y + side, x:x + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        k = int(torch.randint(0, 4, (1,), generator=gen))
        flip = bool(torch.rand(1, generator=gen) < 0.5)  # drawn either way: same stream for both settings
        if geometric == "d4":
            crop = torch.rot90(crop, k, dims=(2, 3))
            crop = crop.flip(3) if flip else crop
        views.append(crop)
    views = torch.cat(views)
    views = StainAugment(angle_deg=6.0, scale=0.35, shift=0.08)(views, gen)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
        k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        views[blur] = F.conv2d(F.pad(views[blur], (1, 1, 1, 1), mode="reflect"), k2, groups=3)
    noise = torch.randn(views.shape, generator=gen) * 0.02
    return (views + noise).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


@torch.no_grad()
def validate(model, windows: torch.Tensor, labels: torch.Tensor, size: int, geometric: str = "d4"
             ) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    a = F.normalize(model(augment(windows, size, gen, geometric)), dim=1)
    b = F.normalize(model(augment(windows, size, gen, geometric)), dim=1)
    align = (a - b).norm(dim=1).pow(2).mean().item()
    uniform = torch.pdist(a).pow(2).mul(-2).exp().mean().log().item()
    sim = a @ b.T  # nearest neighbour of each view among the other views (excluding its twin)
    sim.fill_diagonal_(float("-inf"))
    knn = (labels[sim.argmax(dim=1)] == labels).float().mean().item()
    model.train()
    return {"val_alignment": align, "val_uniformity": uniform, "val_knn_source_acc": knn}


def held_out_windows(context: int, n_per_image: int = 64, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    from studio.data.splits import regions
    from studio.io import to_tensor

    windows, labels = [], []
    for label, image in enumerate(regions("heldout").values()):
        sampler = CropSampler([image], context, seed=seed + label)
        windows.append(to_tensor(sampler.crops(0, n_per_image)))
        labels += [label] * n_per_image
    return torch.cat(windows), torch.tensor(labels)


def main(argv: list[str] | None = None) -> Path:
    recipe = Path(__file__).parent / "recipes" / "ssl_encoder.yaml"
    args = common_args(__doc__.split("\n\n")[0], recipe).parse_args(argv)
    cfg = load_config(SSLConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                               "threads": args.threads})
    if cfg.geometric not in GEOMETRIC:
        from studio.errors import InputError

        raise InputError("geometric", f"{cfg.geometric!r}; use one of {', '.join(GEOMETRIC)}")
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pipelines.encoders import PatchEncoder
    from studio.data.splits import regions

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(project_dir=str(out))
    set_seed(cfg.seed)
    model = PatchEncoder(embed_dim=cfg.embed_dim, channels=tuple(cfg.channels), patch_size=cfg.patch_size)
    head = ProjectionHead(cfg.embed_dim)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=cfg.max_steps,
                                                    pct_start=0.05)
    model, head, optimizer, scheduler = accelerator.prepare(model, head, optimizer, scheduler)
    start, _ = resume_training(accelerator, out, args.resume)
    sampler = CropSampler(list(regions("train").values()), cfg.context, min_tissue=0.5, seed=cfg.seed)
    val_windows, val_labels = held_out_windows(cfg.context)
    log = MetricsLog(out)
    for step in range(start, cfg.max_steps):
        from studio.io import to_tensor

        windows = to_tensor(sampler.crops(step, cfg.batch_size))
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        v1 = augment(windows, cfg.patch_size, gen, cfg.geometric)
        v2 = augment(windows, cfg.patch_size, gen, cfg.geometric)
        loss = nt_xent(head(model(v1)), head(model(v2)), cfg.temperature)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        done = step + 1
        if done % 25 == 0:
            log.write(step=done, loss=loss.item(), lr=scheduler.get_last_lr()[0])
        if done % cfg.validate_every == 0 or done == cfg.max_steps:
            metrics = validate(accelerator.unwrap_model(model), val_windows, val_labels, cfg.patch_size,
                               cfg.geometric)
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.item():.3f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints)
    final = out / "final"
    encoder = accelerator.unwrap_model(model).eval()
    encoder.save_pretrained(final, safe_serialization=True)
    accelerator.print(f"wrote {final}")
    return final


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

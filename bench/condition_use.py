"""Does a conditional latent denoiser use its condition? Its loss with the right condition vs a wrong one.

    python bench/condition_use.py runs/virtual_ihc_her2_diffusion [--checkpoint checkpoint_2000]

For the latent H&E -> IHC translator (``training/virtual_ihc.py``, ``model: diffusion``):
held-out phantom pairs (aligned when the run trained on aligned pairs) are encoded as in
training (:class:`training.virtual_ihc.PairLatentCache`), noised at fixed timesteps, and the
denoiser's noise-prediction MSE is measured with the pair's own H&E latent, with another
pair's (the batch rolled by one) and with zeros. A model that uses the condition has a
clearly lower loss with the right one; equal losses
mean it draws the IHC prior whatever the H&E shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler
    from safetensors.torch import load_file

    from pipelines.encoders import load_model_folder
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs
    from training.utils import latest_checkpoint
    from training.virtual_ihc import PairLatentCache, VirtualIHCConfig, diffusion_unet

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training output_dir (config.json, checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: the latest)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = VirtualIHCConfig(**{k: v for k, v in json.loads((args.run / "config.json").read_text()).items()
                              if k in VirtualIHCConfig.__dataclass_fields__})
    if cfg.diffusion_prior != "none":
        p.error(f"{args.run} trains a refiner (diffusion_prior={cfg.diffusion_prior!r}); this bench measures "
                "translators that denoise from the H&E condition alone")
    folder = args.run / "checkpoints" / args.checkpoint if args.checkpoint else latest_checkpoint(args.run)
    if folder is None or not folder.is_dir():
        p.error(f"{args.run}: no checkpoint {args.checkpoint or '(none saved yet)'}")
    vae = load_model_folder(AutoencoderKL, Path(cfg.vae)).eval()
    unet = diffusion_unet(cfg, vae)
    unet.load_state_dict(load_file(folder / "model.safetensors"))
    unet.eval()
    pairs = phantom_pairs(args.pairs, 256, cfg.stain, seed=IHC_SEEDS_HELD_OUT, aligned=cfg.aligned_pairs)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    cache = PairLatentCache(vae, [x.he for x in pairs], [x.ihc for x in pairs], factor)
    sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    cond, mean, _ = cache.batch(0, cfg)
    gen = torch.Generator().manual_seed(0)
    print(f"{folder}: noise-prediction MSE on {len(mean)} held-out latent crops\n")
    print("| t | right H&E | another tile's H&E | zeros | right / another |\n|---|---|---|---|---|")
    rows = []
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(mean.shape, generator=gen)
        ts = torch.full((len(mean),), t)
        x = sched.add_noise(mean, noise, ts)
        with torch.no_grad():
            losses = [F.mse_loss(unet(torch.cat([x, c], 1), ts).sample, noise).item()
                      for c in (cond, cond.roll(1, 0), torch.zeros_like(cond))]
        rows.append({"t": t, "right": losses[0], "another": losses[1], "zeros": losses[2]})
        print(f"| {t} | {losses[0]:.4f} | {losses[1]:.4f} | {losses[2]:.4f} | {losses[0] / losses[1]:.3f} |")
    print(json.dumps({"checkpoint": str(folder), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

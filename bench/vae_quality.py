"""Reconstruction quality of the tile autoencoder on held-out real tiles.

    python bench/vae_quality.py [--checkpoint checkpoints/tile-vae] [--size 256]

Every 256x256 tissue tile of the held-out bands of the shipped H&E samples (never seen in
training, :func:`studio.data.splits.tissue_tiles`) goes through encode (posterior mean) and
decode; prints PSNR and SSIM against the input (mean and median over tiles).

``--ihc`` adds what a latent H&E -> IHC translator must decode through the same VAE: the
shipped real IHC sample (scikit-image's H-DAB image, four 256 px tiles) and IHC phantom
tiles from held-out seeds, with PSNR, SSIM, CIEDE2000 and the mean RGB shift. An
autoencoder trained on H&E alone pulls IHC colours towards H&E (measured: green drops),
which caps any latent IHC model that uses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipelines.encoders import load_model_folder
from studio.data.splits import tissue_tiles
from studio.io import to_tensor
from studio.metrics import ciede2000, psnr, ssim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tile-vae"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ihc", action="store_true", help="also measure IHC tiles (real + phantom)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    vae = load_model_folder(AutoencoderKL, args.checkpoint).eval()
    tiles = to_tensor(tissue_tiles("heldout", args.size))
    ps, ss = [], []
    with torch.no_grad():
        for i in range(0, len(tiles), 8):
            x = tiles[i:i + 8]
            y = ((vae(x * 2 - 1, sample_posterior=False).sample + 1) / 2).clamp(0, 1)
            ps.append(psnr(y, x).reshape(-1))
            ss.append(ssim(y, x).reshape(-1))
    p, s = torch.cat(ps), torch.cat(ss)
    print(f"{len(tiles)} held-out {args.size}px tiles: PSNR mean {p.mean():.2f} dB, median {p.median():.2f} dB; "
          f"SSIM mean {s.mean():.3f}, median {s.median():.3f}")
    if args.ihc:
        for name, x in ihc_tiles(args.size).items():
            with torch.no_grad():
                y = ((vae(x * 2 - 1, sample_posterior=False).sample + 1) / 2).clamp(0, 1)
            shift = (y - x).mean(dim=(0, 2, 3)).tolist()
            print(f"{name} ({len(x)} tiles): PSNR {psnr(y, x).mean():.2f} dB, SSIM {ssim(y, x).mean():.3f}, "
                  f"CIEDE2000 {ciede2000(y, x).mean():.2f}, mean RGB shift "
                  f"({shift[0]:+.3f}, {shift[1]:+.3f}, {shift[2]:+.3f})")


def ihc_tiles(size: int) -> dict[str, torch.Tensor]:
    import numpy as np

    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs
    from studio.data.samples import load_sample

    real = load_sample("ihc")
    h, w = real.shape[:2]
    crops = [real[y:y + size, x:x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
    # training.vae's H&E + IHC recipe trains on the left three quarters of the real IHC image:
    # only its right quarter is held out for a VAE fine-tuned on IHC.
    cut = int(round(w * 0.75))
    side = min(128, w - cut)
    held = [real[y:y + side, cut:cut + side] for y in range(0, h - side + 1, side)]
    stains = {stain: phantom_pairs(4, size, stain, seed=IHC_SEEDS_HELD_OUT + 500) for stain in ("her2", "ki67")}
    return {"real IHC (skimage H-DAB, whole image)": to_tensor(np.stack(crops)),
            f"real IHC (held-out right quarter, {side} px)": to_tensor(np.stack(held)),
            **{f"phantom {stain} IHC": to_tensor(np.stack([p.ihc for p in pairs])) for stain, pairs in stains.items()}}


if __name__ == "__main__":
    main()

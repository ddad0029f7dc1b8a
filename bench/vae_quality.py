"""Reconstruction quality of the tile autoencoder on held-out real tiles.

    python bench/vae_quality.py [--checkpoint checkpoints/tile-vae] [--size 256]

Every 256x256 tissue tile of the held-out bands of the shipped H&E samples (never seen in
training, :func:`studio.data.splits.tissue_tiles`) goes through encode (posterior mean) and
decode; prints PSNR and SSIM against the input (mean and median over tiles).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipelines.encoders import load_model_folder
from studio.data.splits import tissue_tiles
from studio.io import to_tensor
from studio.metrics import psnr, ssim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tile-vae"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
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


if __name__ == "__main__":
    main()

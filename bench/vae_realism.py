"""How real a tile autoencoder's reconstructions of held-out tissue look: the decoder ceiling.

    python bench/vae_realism.py --vae checkpoints/tile-vae runs/vae_decoder_gan/final \\
        [--floor] [--ldm checkpoints/embedding-ldm] [--out runs/vae_decoder_gan_eval.json] [--threads 1]

No latent model can look more real than the decoder it draws through. For every VAE folder
each tile of held-out half B (the generation bench's halves, :func:`studio.data.splits.heldout_halves`
at its 128 px) is encoded (posterior mode) and decoded; the reconstructions are scored
against half A by both classifier two-sample tests of ``bench/generation.py`` (its
``c2st_table``: the same groups, strata and seeds, fixed features 5 seeds, CNN 3 seeds), and
against their own inputs by PSNR and SSIM. The row is the generation bench's "the model's
VAE reconstructing B (decoder ceiling)" for that VAE.

``--floor`` adds real B itself (0.5 is what the test reads when nothing tells the sets apart).
``--ldm PIPELINE`` adds an embedding-LDM pipeline's tiles, conditioned on B (20 steps,
guidance 2, the generation bench's seeds), decoded by each VAE in turn. Only a VAE that
encodes like the pipeline's own can be swapped in (a decoder-only fine-tune: encoder and
``quant_conv`` bit-identical), because the denoiser was trained on that encoder's latents;
any other is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generation import REALISM_SIZE, Row, c2st_table, conditioning, features, realism_rows  # noqa: E402
from studio.data.splits import HeldoutHalves, heldout_halves  # noqa: E402
from studio.errors import InputError  # noqa: E402
from studio.io import to_tensor, to_uint8  # noqa: E402
from studio.metrics import psnr, ssim  # noqa: E402

FLOOR = "real held-out B (floor)"


def load_vae(folder: str | Path):
    from diffusers import AutoencoderKL

    from pipelines.encoders import load_model_folder

    return load_model_folder(AutoencoderKL, Path(folder)).eval()


@torch.no_grad()
def reconstruct(vae, tiles: torch.Tensor) -> torch.Tensor:
    """Posterior-mode reconstruction of float tiles, all in one batch as the generation bench does."""
    x = tiles.to(vae.device, vae.dtype) * 2 - 1
    return ((vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu() + 1) / 2).clamp(0, 1)


def reconstruction_row(vae, halves: HeldoutHalves) -> tuple[Row, dict[str, float]]:
    """The decoder-ceiling row for ``vae`` and its PSNR / SSIM to B (mean over tiles)."""
    b = to_tensor(halves.b)
    recon = reconstruct(vae, b)
    quality = {"psnr_db": round(psnr(recon, b).mean().item(), 3), "ssim": round(ssim(recon, b).mean().item(), 4)}
    return Row(to_uint8(recon), [f"block{g}" for g in halves.groups_b], halves.sources_b), quality


def same_encoder(a, b) -> bool:
    """Whether two autoencoders make the same latents (encoder and quant_conv bit-identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    return bool(keys) and all(k in sb and torch.equal(sa[k], sb[k]) for k in keys)


def ldm_rows(pipeline: str, vaes: dict[str, object], halves: HeldoutHalves, steps: int, guidance: float) -> dict:
    """The pipeline's tiles conditioned on B, decoded by each VAE (same seeds, so the same latents)."""
    from pipelines.generation import GenerationSettings, embedding_encoder_for, load_generation_pipeline

    settings = GenerationSettings(checkpoint=pipeline, encoder="auto", steps=steps, guidance=guidance, device="cpu")
    pipe = load_generation_pipeline(settings)
    encoder = embedding_encoder_for(settings)
    own = pipe.vae
    with torch.no_grad():
        cond = features(encoder, to_tensor(halves.b))
    out = {}
    for name, vae in vaes.items():
        if not same_encoder(own, vae):
            raise InputError(name, f"encodes differently from {pipeline}'s VAE; its denoiser's latents would not "
                                   "decode through it (only a decoder-only fine-tune can be swapped in)")
        pipe.vae = vae
        start = time.perf_counter()
        rows = realism_rows(pipe, encoder, halves, steps, guidance, baselines=False)
        key = next(k for k in rows if k.startswith("generated"))
        matched, others = conditioning(encoder, [to_tensor(rows[key].tiles)], cond)
        out[name] = {"row": key, "seconds": round(time.perf_counter() - start, 1),
                     "cosine_matched": round(matched, 4), "cosine_random_pairs": round(others, 4),
                     "c2st_auc": c2st_table(halves, {f"{key}, VAE {name}": rows[key]})}
    pipe.vae = own
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="+", default=["checkpoints/tile-vae"], help="AutoencoderKL folders")
    parser.add_argument("--floor", action="store_true", help="also score real B against A")
    parser.add_argument("--ldm", default=None, help="an embedding-LDM pipeline folder to decode through each VAE")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    halves = heldout_halves(REALISM_SIZE)
    found: dict = {"tile_size": REALISM_SIZE, "reference": f"held-out half A ({len(halves.a)} tiles)",
                   "scored": f"held-out half B ({len(halves.b)} tiles)", "threads": args.threads, "vaes": {}}
    if args.floor:
        found["floor"] = c2st_table(halves, {FLOOR: Row(halves.b, [f"block{g}" for g in halves.groups_b],
                                                        halves.sources_b)})[FLOOR]
    vaes = {name: load_vae(name) for name in args.vae}
    for name, vae in vaes.items():
        row, quality = reconstruction_row(vae, halves)
        label = f"VAE {name} reconstructing B (decoder ceiling)"
        found["vaes"][name] = {**quality, "scaling_factor": vae.config.scaling_factor,
                               "c2st_auc": c2st_table(halves, {label: row})[label]}
        print(f"{name}: PSNR {quality['psnr_db']} dB, SSIM {quality['ssim']}", flush=True)
    if args.ldm:
        found["ldm"] = {"pipeline": args.ldm, "steps": args.steps, "guidance": args.guidance,
                        "decoded_by": ldm_rows(args.ldm, vaes, halves, args.steps, args.guidance)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        print(f"wrote {args.out}")
    return found


if __name__ == "__main__":
    main()

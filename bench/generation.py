"""What the embedding-conditioned LDM can do, measured on held-out real tiles.

    python bench/generation.py [--checkpoint checkpoints/embedding-ldm] [--n 64] [--out docs/]

1. **Samples look like tissue**: a grid of generated tiles beside the held-out real tiles
   that conditioned them (``<out>/generation_grid.png``).
2. **Conditioning works**: cosine similarity between encoder(generated) and the embedding
   that conditioned it, against the same figure for random (generated, other condition)
   pairs, over at least ``n`` samples (several seeds per held-out tile when there are
   fewer than ``n`` tiles).
3. **Realism, by a test the model cannot steer**: classifier two-sample tests
   (:mod:`studio.two_sample`) between the reference half A of the held-out tiles and each
   row, at 128 px (the LDM's training crop; :func:`studio.data.splits.heldout_halves`
   deals the held-out bands into two disjoint checkerboard halves A and B). Rows: real B
   (the floor), real tiles of the *train* regions, blurred B, phantom tiles, a
   colour-matched noise texture (control), and the model conditioned on B's embeddings.
   No row shares the reference's pixels: the blurred baseline blurs B, never A. Two
   classifiers (fixed features + logistic regression, small CNN from scratch), several
   seeds each, mean ± std of ROC AUC (0.5: indistinguishable, 1.0: told apart every time).
   Fréchet distances of the same rows to A follow, named by feature space: the
   conditioning encoder's (which guidance can steer, ``--sweep``) and an independent one
   (the shipped nuclei segmenter's pooled deepest features, ``--segmenter``).
   ``--only realism`` runs this section alone.
4. **Large images**: a 1024x1024 image from a 4x4 grid of tile embeddings of a held-out
   region (one shared latent canvas); seam ratio = gradient energy across the 256-pixel
   patch borders / gradient energy elsewhere (1.0 = no seam), against the same 16 patches
   generated independently and pasted.
5. **Throughput**: 256x256 tiles/s with 20 and 4 steps on this device.

All seeded; the encoder is the one the checkpoint was trained with (``encoder.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.generation import GenerationSettings, embedding_encoder_for, fit_to, load_generation_pipeline
from studio.data.splits import HeldoutHalves, heldout_halves, region, tissue_tiles
from studio.io import to_tensor, to_uint8
from studio.metrics import frechet_distance, seam_ratio
from studio.report import contact_sheet, save_png
from studio.two_sample import cnn_c2st, feature_c2st, texture_features


def features(encoder, tiles: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Global embeddings (mean of patch tokens) of float tiles."""
    return torch.cat([encoder.embed(tiles[i:i + batch])[:, 0] for i in range(0, len(tiles), batch)])


def independent_features(segmenter, tiles: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The segmenter's pooled deepest encoder features (see ``HoVerNetLite.pooled_features``)."""
    return torch.cat([segmenter.pooled_features(tiles[i:i + batch]) for i in range(0, len(tiles), batch)])


def conditioning(encoder, batches: list[torch.Tensor], cond: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of encoder(generated) to its own condition, and to the other conditions."""
    n = len(cond)
    off = ~torch.eye(n, dtype=torch.bool)
    matched, random_pairs = [], []
    for batch in batches:
        cos = F.cosine_similarity(features(encoder, batch)[:, None], cond[None], dim=-1)
        matched.append(cos.diag())
        random_pairs.append(cos[off])
    return torch.cat(matched).mean().item(), torch.cat(random_pairs).mean().item()


class Row(NamedTuple):
    """One set of tiles compared against the reference half A (uint8, with split groups)."""

    tiles: np.ndarray
    groups: list[str]
    strata: list[str]


def realism_rows(pipe, encoder, halves: HeldoutHalves, steps: int, guidance: float, seed: int = 0,
                 n_train: int | None = None, baselines: bool = True) -> dict[str, Row]:
    """The rows of the realism table; none shares the reference half's pixels.

    Groups tie each tile to the spatial block it came from (a generated tile to the block
    of the B tile that conditioned it), so no classifier is scored on a block it trained on."""
    from studio.data.phantom import make_phantom

    b = halves.b
    n = len(b)
    size = b.shape[1]
    groups_b = [f"block{g}" for g in halves.groups_b]
    rows = {"real held-out B (floor)": Row(b, groups_b, halves.sources_b)}
    if not baselines:
        return _with_generated(rows, pipe, encoder, b, groups_b, halves.sources_b, steps, guidance, seed)
    train = tissue_tiles("train", size, stride=size, min_tissue=0.6)
    pick = np.sort(np.random.default_rng(seed).choice(len(train), size=min(n_train or n, len(train)), replace=False))
    rows["real tiles of the train regions (unpaired)"] = Row(train[pick], [f"train{i}" for i in pick],
                                                             ["train"] * len(pick))
    rows["blurred B, sigma 2 px (unpaired blurred real)"] = Row(to_uint8(blur(to_tensor(b))), groups_b,
                                                                halves.sources_b)
    phantom = np.stack([make_phantom(size, seed=seed + i).image for i in range(n)])
    rows["phantom tiles"] = Row(phantom, [f"phantom{i}" for i in range(n)], ["phantom"] * n)
    rows["colour-matched noise texture (control)"] = Row(to_uint8(colour_noise(to_tensor(b), seed + 2)),
                                                         [f"noise{i}" for i in range(n)], ["noise"] * n)
    return _with_generated(rows, pipe, encoder, b, groups_b, halves.sources_b, steps, guidance, seed)


def _with_generated(rows: dict[str, Row], pipe, encoder, b: np.ndarray, groups_b: list[str], sources_b: list[str],
                    steps: int, guidance: float, seed: int) -> dict[str, Row]:
    """``rows`` plus the model's tiles conditioned on B (one per B tile, its block as group)."""
    if pipe is None:
        return rows
    size = b.shape[1]
    with torch.no_grad():  # the ceiling: no denoiser can look more real than its VAE's decoder
        x = to_tensor(b).to(pipe.vae.device, pipe.vae.dtype) * 2 - 1
        recon = ((pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.float().cpu() + 1) / 2).clamp(0, 1)
    rows["the model's VAE reconstructing B (decoder ceiling)"] = Row(to_uint8(recon), groups_b, sources_b)
    grid = pipe.conditioner.grid_for(size, size)
    tokens = torch.cat([encoder.embed(to_tensor(b[i:i + 1]), grid=grid) for i in range(len(b))])
    generated = generate_for(pipe, tokens, size, steps, guidance, seed=seed + 500)
    rows[f"generated, conditioned on B ({steps} steps, guidance {guidance:g})"] = Row(to_uint8(generated), groups_b,
                                                                                     sources_b)
    return rows


def c2st_table(halves: HeldoutHalves, rows: dict[str, Row], cnn_seeds: tuple[int, ...] = (0, 1, 2)
               ) -> dict[str, dict]:
    """Both classifiers' AUC (mean, std, per seed) of every row against the reference half A."""
    ref_groups = [f"block{g}" for g in halves.groups_a]
    ref_feat = texture_features(halves.a)
    table = {}
    for name, row in rows.items():
        kw = {"groups_a": ref_groups, "groups_b": row.groups, "strata_a": halves.sources_a, "strata_b": row.strata}
        fixed = feature_c2st(ref_feat, texture_features(row.tiles), **kw)
        cnn = cnn_c2st(halves.a, row.tiles, seeds=cnn_seeds, **kw)
        table[name] = {"fixed_features": fixed.as_dict(), "cnn": cnn.as_dict()}
        print(f"C2ST {name}: fixed features {fixed}, CNN {cnn}", flush=True)
    return table


def fd_table(embed, reference: np.ndarray, rows: dict[str, Row]) -> dict[str, float]:
    """Fréchet distance of every row to the reference tiles in one feature space (``embed``)."""
    ref = embed(to_tensor(reference))
    return {name: round(frechet_distance(embed(to_tensor(row.tiles)), ref), 3) for name, row in rows.items()}


def generate_for(pipe, tokens: torch.Tensor, size: int, steps: int, guidance: float, seed: int,
                 grid: tuple[int, int] | None = None, **kw) -> torch.Tensor:
    out = []
    for i in range(len(tokens)):
        img = pipe(tokens[i:i + 1], height=size, width=size, grid=grid, num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(seed + i), output_type="pt",
                   progress=False, **kw).images
        out.append(img)
    return torch.cat(out)


def colour_noise(real: torch.Tensor, seed: int) -> torch.Tensor:
    """Smooth random texture with the real tiles' per-channel mean and covariance."""
    gen = torch.Generator().manual_seed(seed)
    pixels = real.permute(1, 0, 2, 3).reshape(3, -1)
    mean, cov = pixels.mean(1), torch.cov(pixels)
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(3))
    noise = torch.randn(real.shape[0], 3, real.shape[2] // 8, real.shape[3] // 8, generator=gen)
    noise = F.interpolate(noise, size=real.shape[-2:], mode="bicubic", align_corners=False)
    noise = noise / noise.std(dim=(2, 3), keepdim=True)
    return (torch.einsum("ij,bjhw->bihw", chol, noise) + mean.view(1, 3, 1, 1)).clamp(0, 1)


def blur(tiles: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    padded = F.pad(tiles, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


REALISM_SIZE = 128  # the LDM's training crop; the held-out bands hold too few 256 px tiles (heldout_halves)


def realism(pipe, encoder, args) -> dict:
    """Section 3: every row's C2ST (both classifiers) and Fréchet distances (two named
    feature spaces) against held-out half A."""
    from pipelines.encoders import load_model_folder, weights_digest
    from pipelines.segmenter import HoVerNetLite

    halves = heldout_halves(REALISM_SIZE)
    rows = realism_rows(pipe, encoder, halves, args.steps, args.guidance, baselines=not args.skip_baselines)
    out = {"tile_size": REALISM_SIZE, "reference": f"held-out half A ({len(halves.a)} tiles)",
           "rows_tiles": {k: len(r.tiles) for k, r in rows.items()}}
    generated = [r for k, r in rows.items() if k.startswith("generated")]
    if generated:  # conditioning, on the same samples: cosine to own condition vs to the others
        with torch.no_grad():
            cond = features(encoder, to_tensor(halves.b))
        matched, others = conditioning(encoder, [to_tensor(generated[0].tiles)], cond)
        out["cosine_matched"], out["cosine_random_pairs"] = round(matched, 4), round(others, 4)
    out["c2st_auc"] = c2st_table(halves, rows)
    segmenter = load_model_folder(HoVerNetLite, Path(args.segmenter)).eval()
    with torch.no_grad():
        out["frechet_distance"] = {
            f"conditioning encoder ({encoder.identity}; steerable by guidance)": fd_table(
                lambda t: features(encoder, t), halves.a, rows),
            f"nuclei segmenter pooled features ({args.segmenter}, {weights_digest(Path(args.segmenter))[:16]})":
                fd_table(lambda t: independent_features(segmenter, t), halves.a, rows)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/embedding-ldm")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--large", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--segmenter", default="checkpoints/nuclei-segmenter",
                        help="the independent feature space's network (a nuclei-segmenter folder)")
    parser.add_argument("--sweep", default="", help="comma-separated guidance scales to compare (one seed each)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="realism: only the floor and the model's row (the baselines do not depend on the model)")
    parser.add_argument("--only", choices=("all", "realism"), default="all",
                        help="realism: section 3 alone (C2ST and FD), written to <out>/generation_realism.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = GenerationSettings(checkpoint=args.checkpoint, encoder="auto", steps=args.steps,
                                  guidance=args.guidance, device=args.device)
    pipe = load_generation_pipeline(settings)
    encoder = embedding_encoder_for(settings)
    if args.only == "realism":
        found = {"checkpoint": args.checkpoint, "steps": args.steps, "guidance": args.guidance,
                 "encoder": encoder.identity, "device": args.device, "realism": realism(pipe, encoder, args)}
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / "generation_realism.json"
        target.write_text(json.dumps(found, indent=2) + "\n")
        print(f"wrote {target}")
        return
    size = args.size
    grid = pipe.conditioner.grid_for(size, size)
    real = tissue_tiles("heldout", size, stride=size // 2, min_tissue=0.6)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(real), size=min(args.n, len(real)), replace=False)
    real_t = to_tensor(real[np.sort(pick)])
    n = len(real_t)
    results: dict = {"checkpoint": args.checkpoint, "n": n, "size": size, "steps": args.steps,
                     "guidance": args.guidance, "encoder": encoder.identity, "device": args.device}

    # 1-2: generate ``per`` tiles (seeds) per held-out condition, so at least --n samples
    tokens = torch.cat([encoder.embed(real_t[i:i + 1], grid=grid) for i in range(n)])
    per = -(-args.n // n)
    start = time.perf_counter()
    generated_all = [generate_for(pipe, tokens, size, args.steps, args.guidance, seed=1000 * k) for k in range(per)]
    results["seconds_per_tile"] = round((time.perf_counter() - start) / (n * per), 2)
    generated = generated_all[0]
    real_feat = features(encoder, real_t)
    cond = tokens.mean(dim=1)
    results["samples"] = n * per
    results["samples_per_condition"] = per
    cos_matched, cos_random = conditioning(encoder, generated_all, cond)
    results["cosine_matched"] = round(cos_matched, 4)
    results["cosine_random_pairs"] = round(cos_random, 4)
    results["cosine_real_to_own_condition"] = round(
        F.cosine_similarity(real_feat, cond, dim=-1).mean().item(), 4)
    args.out.mkdir(parents=True, exist_ok=True)
    show = min(8, n)
    save_png(contact_sheet([("held-out real tiles (their embeddings condition the rows below)",
                             [(f"real {i}", t) for i, t in enumerate(to_uint8(real_t[:show]))]),
                            *[(f"generated from those embeddings, seed set {k}",
                               [(f"generated {i}", t) for i, t in enumerate(to_uint8(g[:show]))])
                              for k, g in enumerate(generated_all[:2])]], cell=192),
             args.out / "generation_grid.png")

    # 3: realism: C2ST and unpaired FD of every row against held-out half A
    results["realism"] = realism(pipe, encoder, args)

    # 3c: guidance sweep: conditioning and fixed-feature C2ST (one seed per condition)
    sweep = []
    for g in [float(v) for v in args.sweep.split(",") if v.strip()]:
        batch = generated if g == args.guidance else generate_for(pipe, tokens, size, args.steps, g, seed=0)
        c_m, c_r = conditioning(encoder, [batch], cond)
        halves = heldout_halves(REALISM_SIZE)
        row = realism_rows(pipe, encoder, halves, args.steps, g)
        generated_row = row[next(k for k in row if k.startswith("generated"))]
        c2st = feature_c2st(texture_features(halves.a), texture_features(generated_row.tiles),
                            [f"block{k}" for k in halves.groups_a], generated_row.groups, strata_a=halves.sources_a,
                            strata_b=generated_row.strata)
        sweep.append({"guidance": g, "cosine_matched": round(c_m, 4), "cosine_random_pairs": round(c_r, 4),
                      "c2st_fixed_features": c2st.as_dict()})
        print(sweep[-1], flush=True)
    if sweep:
        results["guidance_sweep"] = sweep

    # 4: large image from a 4x4 grid of tile embeddings
    if not args.skip_large:
        L = args.large
        src = fit_to(np.ascontiguousarray(region("cmu_small_region", "heldout")), L, L)[None]
        big_tokens = encoder.embed(to_tensor(src), grid=(4, 4))
        start = time.perf_counter()
        big = generate_for(pipe, big_tokens, L, args.steps, args.guidance, seed=7, grid=(4, 4))
        results["large_seconds"] = round(time.perf_counter() - start, 1)
        patch_tokens = big_tokens[0].unsqueeze(1)  # (16, 1, D): each cell's token alone
        patches = generate_for(pipe, patch_tokens, L // 4, args.steps, args.guidance, seed=7)
        pasted = torch.zeros(1, 3, L, L)
        for k in range(16):
            r, c = divmod(k, 4)
            pasted[:, :, r * L // 4:(r + 1) * L // 4, c * L // 4:(c + 1) * L // 4] = patches[k]
        big_u8, pasted_u8 = to_uint8(big)[0], to_uint8(pasted)[0]
        results["large_seam_ratio"] = round(seam_ratio(big_u8, L // 4), 3)
        results["pasted_seam_ratio"] = round(seam_ratio(pasted_u8, L // 4), 3)
        save_png(contact_sheet([("1024x1024 from a 4x4 embedding grid: source region / one canvas / pasted tiles",
                                 [("source region", src[0]), ("shared latent canvas", big_u8),
                                  ("16 tiles pasted", pasted_u8)])], cell=400), args.out / "generation_large.png")

    # 5: throughput
    for steps in (20, 4):
        one = tokens[:2]
        generate_for(pipe, one[:1], size, steps, args.guidance, seed=0)  # warm-up
        start = time.perf_counter()
        generate_for(pipe, one, size, steps, args.guidance, seed=0)
        results[f"tiles_per_s_{steps}_steps"] = round(len(one) / (time.perf_counter() - start), 3)
    print(json.dumps(results, indent=2))
    (args.out / "generation_results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

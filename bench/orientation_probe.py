"""Can the conditioning tokens say which way the tissue runs? (issue 19's probe)

    python bench/orientation_probe.py [--encoder checkpoints/ssl-encoder ...] [--out docs/]

For every encoder given: a linear read-out (:func:`studio.orientation.orientation_probe`)
of the dominant structure orientation (structure tensor truth) from each 64 px patch's
token, fitted on held-out half A and scored on held-out half B
(:func:`studio.data.splits.heldout_halves`; no pixel in both). Two controls bound it: the
patch's own averaged structure tensor (the truth's ingredients; near 0 degrees error) and
its mean colour (no orientation; chance). ``rotation_pairs_error_deg`` scores each test
patch together with its 90-degree rotation: an encoder invariant to rotations gives both
the same token and cannot beat 45 degrees there. Writes ``<out>/orientation_probe.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipelines.encoders import load_encoder
from studio.data.splits import heldout_halves
from studio.orientation import encoder_embed, orientation_probe


def structure_tensor_features(patches: np.ndarray) -> np.ndarray:
    """Upper-bound control: the patch-averaged structure tensor (what the truth is computed from)."""
    from skimage.color import rgb2gray
    from skimage.feature import structure_tensor

    rows = []
    for p in patches:
        arr, arc, acc = (c.mean() for c in structure_tensor(rgb2gray(p), sigma=2.0, order="rc"))
        total = arr + acc + 1e-12
        rows.append([(acc - arr) / total, 2 * arc / total])
    return np.asarray(rows)


def mean_colour(patches: np.ndarray) -> np.ndarray:
    """Lower-bound control: mean RGB carries no direction."""
    return patches.reshape(len(patches), -1, 3).mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", action="append", default=None,
                        help="encoder folder or spec (repeatable); default: the shipped ssl-encoder")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--min-coherence", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    halves = heldout_halves(args.patch, min_tissue=0.6, block=8)
    results: dict = {"patch": args.patch, "min_coherence": args.min_coherence,
                     "train": f"held-out half A ({len(halves.a)} patches)",
                     "test": f"held-out half B ({len(halves.b)} patches)", "probes": {}}
    embeds = {"control: averaged structure tensor (upper bound)": structure_tensor_features,
              "control: mean colour (no orientation)": mean_colour}
    for spec in args.encoder or ["checkpoints/ssl-encoder"]:
        encoder = load_encoder(spec)
        embeds[f"encoder {spec} ({encoder.identity})"] = encoder_embed(encoder)
    for name, embed in embeds.items():
        found = orientation_probe(embed, halves.a, halves.b, min_coherence=args.min_coherence)
        results["probes"][name] = found.as_dict()
        print(f"{name}: {found.as_dict()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "orientation_probe.json"
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()

"""Does normalization move tiles toward the truth? Known-answer cases, all three methods.

    python bench/stain_truth.py            # prints the Markdown table the README quotes

Cases (each a set of 256x256 tiles, normalized with a slide-level profile):

* **real, re-stained**: tiles from the left half of a real image are re-stained by a known
  shift in HED space (``studio.stain.augment.known_shift``: "lab-a", "lab-b", "faded");
  the truth is the original tiles; the reference is the right half of the same image
  (same stain as the truth, different tissue mix).
* **phantom, stain A -> B**: phantom layouts rendered with stain A are the input, the same
  layouts rendered with stain B the truth; the reference is other layouts rendered with B.

Scores: mean CIEDE2000 over tissue pixels and SSIM, against the truth (lower / higher is
better); "input" is the un-normalized tile. Deterministic (fixed seeds).
"""

from __future__ import annotations

import numpy as np
import torch

from studio.color import tissue_mask
from studio.data.phantom import make_phantom, random_stain_matrix, render_he
from studio.data.samples import load_sample
from studio.io import to_tensor, to_uint8
from studio.metrics import ciede2000, ssim
from studio.stain import get_normalizer
from studio.stain.augment import known_shift, restain

METHODS = ("macenko", "reinhard", "vahadane")


def grid(image: np.ndarray, size: int = 256) -> np.ndarray:
    h, w, _ = image.shape
    return np.stack([image[y:y + size, x:x + size] for y in range(0, h - size + 1, size)
                     for x in range(0, w - size + 1, size)])


def real_cases():
    for name in ("hgsc_nest", "tiatoolbox_target", "skin"):
        img = np.ascontiguousarray(load_sample(name))
        w = img.shape[1]
        truth = grid(np.ascontiguousarray(img[:, : w // 2]))
        reference = np.ascontiguousarray(img[:, w // 2:])
        for shift in ("lab-a", "lab-b", "faded"):
            matrix, scale, offset = known_shift(shift, len(truth))
            source = to_uint8(restain(to_tensor(truth), matrix, scale, offset))
            yield f"{name}, {shift}", source, truth, [reference]


def phantom_cases(n: int = 12):
    for pair in range(3):
        stain_a = random_stain_matrix(100 + pair, strength=3.0)
        stain_b = random_stain_matrix(200 + pair, strength=3.0)
        layouts = [make_phantom(256, 1000 * pair + i).layout for i in range(2 * n)]
        source = np.stack([render_he(lay, stain_a, seed=i) for i, lay in enumerate(layouts[:n])])
        truth = np.stack([render_he(lay, stain_b, seed=i) for i, lay in enumerate(layouts[:n])])
        reference = [render_he(lay, stain_b, seed=i) for i, lay in enumerate(layouts[n:])]
        yield f"phantom, stain pair {pair + 1}", source, truth, reference


def score(out: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    t_out, t_truth = to_tensor(out), to_tensor(truth)
    mask = tissue_mask(t_truth, min_od=0.05)
    return ciede2000(t_out, t_truth, mask).nanmean().item(), ssim(t_out, t_truth).mean().item()


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for label, source, truth, reference in [*real_cases(), *phantom_cases()]:
        entry = {"case": label, "input": score(source, truth)}
        for method in METHODS:
            norm = get_normalizer(method)
            norm.fit(reference)
            out = norm.transform_uint8(source, source=norm.estimate(source))
            entry[method] = score(out, truth)
        rows.append(entry)
    cols = ("input", *METHODS)
    print("| case | " + " | ".join(f"{c} dE / SSIM" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        best = min(METHODS, key=lambda m: r[m][0])
        cells = [f"{'**' if c == best else ''}{r[c][0]:.2f}{'**' if c == best else ''} / {r[c][1]:.3f}"
                 for c in cols]
        print(f"| {r['case']} | " + " | ".join(cells) + " |")
    closer = {m: sum(r[m][0] < r["input"][0] for r in rows) for m in METHODS}
    print(f"\ncloser to the truth than the input (CIEDE2000), out of {len(rows)} cases: "
          + ", ".join(f"{m} {closer[m]}" for m in METHODS))
    print("mean CIEDE2000: input {:.2f}, ".format(np.mean([r["input"][0] for r in rows]))
          + ", ".join(f"{m} {np.mean([r[m][0] for r in rows]):.2f}" for m in METHODS))


if __name__ == "__main__":
    main()

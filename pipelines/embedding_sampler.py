"""New conditioning embeddings without a source tile.

Two ways, as in PixCell and Graikos et al.:

* :func:`slerp`: walk between two tiles' embeddings (per token, spherical on direction and
  linear on length), e.g. from stroma to tumour;
* :class:`EmbeddingSampler`: a small auxiliary generative model over embedding grids,
  conditioned on a label (a tissue type, a dominant nucleus class): per label a Gaussian
  with a low-rank (PCA) covariance plus isotropic residual, fitted on real tiles' token
  grids. Small and exact to sample; it captures the co-variation of tokens inside a tile
  (which a per-token model would not), and it is stored as safetensors + JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.errors import InputError, WeightsError


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Interpolate token tensors of equal shape ``(..., D)`` at fraction ``t`` in [0, 1]."""
    if a.shape != b.shape:
        raise InputError("embeddings", f"shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-8), b / nb.clamp_min(1e-8)
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    direction = torch.where(so > 1e-4, (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so,
                            (1 - t) * ua + t * ub)
    return direction * ((1 - t) * na + t * nb)


class EmbeddingSampler:
    """Label-conditional Gaussian over flattened token grids ``(N * D)``.

    Args:
        rank: principal components kept per label (the rest is isotropic noise).
    """

    def __init__(self, rank: int = 16):
        self.rank = rank
        self.shape: tuple[int, int] | None = None
        self.params: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def labels(self) -> list[str]:
        return sorted(self.params)

    def fit(self, embeddings: torch.Tensor, labels: list[str]) -> EmbeddingSampler:
        """Fit on ``(M, N, D)`` embeddings with one label per row."""
        if embeddings.ndim != 3 or len(labels) != embeddings.shape[0]:
            raise InputError("embeddings", f"need (M, N, D) and M labels; got {tuple(embeddings.shape)} and "
                                           f"{len(labels)} labels")
        self.shape = (embeddings.shape[1], embeddings.shape[2])
        flat = embeddings.reshape(len(labels), -1).double()
        for label in sorted(set(labels)):
            rows = flat[[i for i, lab in enumerate(labels) if lab == label]]
            if len(rows) < 2:
                raise InputError(label, "needs at least 2 examples to fit")
            mean = rows.mean(0)
            centred = rows - mean
            _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
            r = min(self.rank, len(sv))
            var = sv.square() / (len(rows) - 1)
            residual = var[r:].sum() / max(1, flat.shape[1] - r)
            self.params[label] = {"mean": mean.float(), "components": vt[:r].float(),
                                  "scales": var[:r].sqrt().float(),
                                  "residual": residual.sqrt().float().reshape(1)}
        return self

    def sample(self, label: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, N, D)`` new embedding grids for ``label``."""
        if label not in self.params:
            raise InputError(label, f"unknown label; known: {', '.join(self.labels)}")
        p = self.params[label]
        z = torch.randn(n, len(p["scales"]), generator=generator)
        eps = torch.randn(n, p["mean"].numel(), generator=generator) * p["residual"]
        flat = p["mean"] + (z * p["scales"]) @ p["components"] + eps
        return flat.reshape(n, *self.shape)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{label}.{k}": v.contiguous() for label, p in self.params.items() for k, v in p.items()}
        save_file(tensors, str(folder / "sampler.safetensors"))
        (folder / "sampler.json").write_text(json.dumps({"rank": self.rank, "shape": self.shape,
                                                          "labels": self.labels}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingSampler:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "sampler.json").read_text())
            tensors = load_file(str(folder / "sampler.safetensors"))
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise WeightsError(folder, f"is not an embedding sampler folder ({exc})") from exc
        sampler = cls(rank=meta["rank"])
        sampler.shape = tuple(meta["shape"])
        for label in meta["labels"]:
            sampler.params[label] = {k: tensors[f"{label}.{k}"] for k in ("mean", "components", "scales", "residual")}
        return sampler


# Tissue label of each shipped real image (the sampler's labels for tiles without nuclei labels).
SAMPLE_TISSUE = {"hgsc_nest": "ovarian-carcinoma", "tiatoolbox_target": "carcinoma", "skin": "skin",
                 "cmu_small_region": "skin"}


def real_tile_labels(size: int = 256, stride: int | None = None) -> tuple[list, list[str]]:
    """Train-split tissue tiles of the shipped images with a label each: the image's tissue,
    and for the labelled hgsc_nest tile also its dominant nucleus class
    (``inflammatory-rich``, ``neoplastic-rich``, ``connective-rich``)."""
    import numpy as np

    from studio.data.samples import PANNUKE_CLASSES, load_hgsc_nest_labels
    from studio.data.splits import HELDOUT_BANDS, split_bounds, tissue_fraction

    stride = stride or size // 2
    tiles, labels = [], []
    image_h, inst_h, cls_h = load_hgsc_nest_labels()
    from studio.data.samples import load_sample

    for name in HELDOUT_BANDS:
        y0, y1, x0, x1 = split_bounds(name, "train")
        image = load_sample(name)
        for y in range(y0, y1 - size + 1, stride):
            for x in range(x0, x1 - size + 1, stride):
                tile = image[y:y + size, x:x + size]
                if tissue_fraction(tile) < 0.5:
                    continue
                tiles.append(np.ascontiguousarray(tile))
                labels.append(SAMPLE_TISSUE[name])
                if name == "hgsc_nest":
                    ids, first = np.unique(inst_h[y:y + size, x:x + size], return_index=True)
                    classes = cls_h[y:y + size, x:x + size].ravel()[first[ids > 0]]
                    if classes.size >= 5:
                        dominant = int(np.bincount(classes, minlength=4)[1:].argmax()) + 1
                        tiles.append(tiles[-1])
                        labels.append(f"{PANNUKE_CLASSES[dominant]}-rich")
    return tiles, labels


def fit_on_real_tiles(encoder, grid: tuple[int, int], size: int = 256, rank: int = 16) -> EmbeddingSampler:
    """Fit the sampler on the shipped real tiles (see :func:`real_tile_labels`)."""
    from studio.io import to_tensor

    tiles, labels = real_tile_labels(size)
    embeddings = torch.cat([encoder.embed(to_tensor(t), grid=grid) for t in tiles])
    return EmbeddingSampler(rank=rank).fit(embeddings, labels)

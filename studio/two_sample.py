"""Classifier two-sample tests (C2ST): can a classifier tell two sets of tiles apart?

Lopez-Paz & Oquab, *Revisiting classifier two-sample tests* (ICLR 2017). A classifier
learns "set A or set B" on one part of the data and is scored on the rest by ROC AUC:
0.5 means it cannot tell the sets apart, 1.0 that it always can. Unlike a Fréchet
distance in a generator's conditioning space, a model cannot steer this test by pushing
its samples towards their condition: the classifier is trained from scratch against the
real tiles, on features nobody optimised the generator for.

Two classifiers, as the realism bench reports both:

* :func:`feature_c2st`: standardised L2 logistic regression on fixed, hand-made features
  (:func:`texture_features`: colour and optical-density statistics, gradient-magnitude,
  LBP and GLCM texture statistics, orientation coherence, sharpness), scikit-image's.
* :func:`cnn_c2st`: a small CNN (:class:`SmallCNN`) trained from scratch on the pixels.

Samples that are not independent (four crops of one tile, neighbouring tiles of one
region) carry a *group* id; a group never lies on both sides of a train / test split,
otherwise a classifier could score by recognising a tile it trained on. Every test is
repeated over several seeds (different splits, different initialisations) and reports
mean and standard deviation: with the few dozen held-out tiles the studio has, the
spread is part of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from studio.errors import InputError

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
GLCM_DISTANCES = (1, 2, 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_LBP = ((8, 1.0), (16, 2.0))
_GRADIENT_EDGES = np.array([0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, np.inf])


@dataclass(frozen=True)
class C2STResult:
    """ROC AUC of a two-sample classifier, over seeds (one AUC per seed, mean of its folds)."""

    classifier: str
    auc_mean: float
    auc_std: float
    aucs: tuple[float, ...]
    n_a: int
    n_b: int

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aucs"] = [round(a, 4) for a in self.aucs]
        out["auc_mean"], out["auc_std"] = round(self.auc_mean, 4), round(self.auc_std, 4)
        return out

    def __str__(self) -> str:
        return f"{self.auc_mean:.3f} ± {self.auc_std:.3f}"


def as_uint8_tiles(tiles: Any, name: str = "tiles") -> np.ndarray:
    """``(N, H, W, 3)`` uint8 from uint8 HWC arrays or float ``(N, 3, H, W)`` tensors in [0, 1]."""
    if isinstance(tiles, torch.Tensor):
        from studio.io import to_uint8

        tiles = to_uint8(tiles)
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise InputError(name, f"tiles must be (N, H, W, 3), got {tiles.shape}")
    if tiles.dtype != np.uint8:
        raise InputError(name, f"uint8 tiles expected, got {tiles.dtype}")
    return tiles


def feature_names() -> list[str]:
    """Names of the :func:`texture_features` columns, in order."""
    names = [f"rgb_{c}_{s}" for c in "rgb" for s in ("mean", "std", "p5", "p50", "p95")]
    names += [f"od_{c}_{s}" for c in "he" for s in ("mean", "std", "p5", "p50", "p95")]
    names += ["od_dab_mean", "od_dab_std", "white_fraction"]
    names += [f"grad_hist_{i}" for i in range(len(_GRADIENT_EDGES) - 1)] + ["grad_mean"]
    names += ["coherence_mean", "coherent_fraction", "laplace_var_grey", "laplace_var_h"]
    for p, r in _LBP:
        names += [f"lbp{p}r{r:g}_{i}" for i in range(p + 2)]
    names += [f"glcm_{prop}_d{d}" for prop in GLCM_PROPS for d in GLCM_DISTANCES]
    return names


def _tile_features(tile: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern, structure_tensor
    from skimage.feature import structure_tensor_eigenvalues as eigenvalues
    from skimage.filters import laplace, sobel

    rgb = tile.astype(np.float64) / 255.0
    out: list[float] = []
    for c in range(3):
        v = rgb[..., c]
        out += [v.mean(), v.std(), *np.percentile(v, (5, 50, 95))]
    hed = rgb2hed(tile)
    for c in range(2):
        v = hed[..., c]
        out += [v.mean(), v.std(), *np.percentile(v, (5, 50, 95))]
    out += [hed[..., 2].mean(), hed[..., 2].std(), float((tile.mean(-1) > 215).mean())]
    grey = rgb2gray(tile)
    grad = sobel(grey)
    hist = np.histogram(grad, bins=_GRADIENT_EDGES)[0] / grad.size
    out += [*hist, grad.mean()]
    l1, l2 = eigenvalues(structure_tensor(grey, sigma=2.0, order="rc"))
    coherence = ((l1 - l2) / (l1 + l2 + 1e-8)) ** 2
    out += [coherence.mean(), float((coherence > 0.5).mean()), laplace(grey).var(), laplace(hed[..., 0]).var()]
    grey_u8 = (grey * 255).round().astype(np.uint8)
    for p, r in _LBP:
        codes = local_binary_pattern(grey_u8, p, r, method="uniform")
        out += list(np.bincount(codes.astype(np.int64).ravel(), minlength=p + 2)[:p + 2] / codes.size)
    glcm = graycomatrix(grey_u8 // 8, distances=list(GLCM_DISTANCES), angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                        levels=32, symmetric=True, normed=True)
    for prop in GLCM_PROPS:
        out += list(graycoprops(glcm, prop).mean(axis=1))
    return np.asarray(out, dtype=np.float64)


def texture_features(tiles: Any) -> np.ndarray:
    """Fixed features ``(N, F)`` of RGB tiles (columns named by :func:`feature_names`).

    What a pathologist's eye and a blur or colour shortcut would both use: RGB and
    optical-density (scikit-image ``rgb2hed``) statistics, the share of glass, gradient
    magnitude histograms, structure-tensor coherence (aligned fibres score high), Laplacian
    variance (sharpness), uniform LBP histograms at two radii, and GLCM statistics at three
    distances (mean over four angles). Nothing here was optimised by any generator.
    """
    tiles = as_uint8_tiles(tiles)
    feats = np.stack([_tile_features(t) for t in tiles])
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)


def _joint(values_a: Sequence[Any] | None, values_b: Sequence[Any] | None, n_a: int, n_b: int,
           name: str) -> np.ndarray | None:
    """One id space over both sets (``None`` for both: every sample on its own)."""
    if values_a is None and values_b is None:
        return None
    if values_a is None or values_b is None:
        raise InputError(name, "give them for both sets or for neither")
    for side, values, n in (("a", values_a, n_a), ("b", values_b, n_b)):
        if len(values) != n:
            raise InputError(f"{name}_{side}", f"has {len(values)} entries for {n} samples")
    joint = np.array([str(v) for v in values_a] + [str(v) for v in values_b])
    return np.unique(joint, return_inverse=True)[1]


def grouped_folds(groups: np.ndarray, folds: int, rng: np.random.Generator,
                  strata: np.ndarray | None = None) -> np.ndarray:
    """A fold id per sample; all samples of one group share a fold, groups dealt evenly,
    stratum by stratum when ``strata`` (one per sample, constant within a group) is given.

    Stratifying matters under the null: when one fold of A holds more of some image than
    the same fold of B, a classifier trained on the other fold learns the reverse and
    scores below 0.5 (cross-validated AUC is biased low on small samples)."""
    ids = np.unique(groups)
    if len(ids) < folds:
        raise InputError("groups", f"{len(ids)} independent groups cannot fill {folds} folds")
    stratum_of = np.zeros(ids.max() + 1, dtype=np.int64)
    if strata is not None:
        stratum_of[groups] = np.unique(np.asarray(strata), return_inverse=True)[1]
    fold_of = np.empty(ids.max() + 1, dtype=np.int64)
    dealt = 0
    for stratum in np.unique(stratum_of[ids]):
        members = rng.permutation(ids[stratum_of[ids] == stratum])
        fold_of[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold_of[groups]


def _splits(n_a: int, n_b: int, groups_a, groups_b, folds: int, seed: int, strata_a=None, strata_b=None):
    """Per fold: (train index, test index) into the stacked [A; B] samples; labels A=0, B=1.

    Groups are *shared* between the sets: tiles of one spatial block, whichever set they
    are in (and generated tiles conditioned on that block's tiles), fall on the same side
    of every split. Were the block's A tiles trained on and its B tiles scored, a
    classifier would learn "this tissue is A" and score below chance."""
    groups = _joint(groups_a, groups_b, n_a, n_b, "groups")
    if groups is None:
        groups = np.arange(n_a + n_b)
    strata = _joint(strata_a, strata_b, n_a, n_b, "strata")
    fold = grouped_folds(groups, folds, np.random.default_rng(seed), strata)
    labels = np.r_[np.zeros(n_a), np.ones(n_b)]
    for k in range(folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if len(np.unique(labels[train])) < 2 or len(np.unique(labels[test])) < 2:
            raise InputError("groups", f"fold {k} of seed {seed} holds one set only; use fewer folds or finer groups")
        yield train, test


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(binary_auroc(scores, labels.long()))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iterations: int = 200) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS: weights then bias, ``(F + 1,)``.

    Minimises mean BCE + ``l2 / (2 n) * |w|^2`` (bias unpenalised), scikit-learn's
    ``LogisticRegression(C=1 / l2)`` objective divided by ``n``."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * l2 * (w[:-1] ** 2).sum() / len(x)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _check_pair(a: np.ndarray, b: np.ndarray, min_samples: int) -> None:
    for name, x in (("set A", a), ("set B", b)):
        if len(x) < min_samples:
            raise InputError(name, f"has {len(x)} samples; a two-sample test needs at least {min_samples}")


def feature_c2st(feats_a: Any, feats_b: Any, groups_a: Sequence[Any] | None = None,
                 groups_b: Sequence[Any] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS, folds: int = 2,
                 l2: float = 1.0, strata_a: Sequence[Any] | None = None,
                 strata_b: Sequence[Any] | None = None) -> C2STResult:
    """C2ST with standardised L2 logistic regression on feature rows (e.g. :func:`texture_features`).

    With ``folds=2`` each seed trains on one half of both sets and scores the other half,
    then the roles swap; the seed's AUC is the mean of the two."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    _check_pair(a, b, 2 * folds)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError("features", f"need two (N, F) matrices of equal width, got {a.shape} and {b.shape}")
    x = torch.from_numpy(np.concatenate([a, b]))
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).double()
    aucs = []
    for seed in seeds:
        fold_aucs = []
        for train, test in _splits(len(a), len(b), groups_a, groups_b, folds, seed, strata_a, strata_b):
            mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
            w = fit_logistic((x[train] - mean) / std, y[train], l2=l2)
            xt = (x[test] - mean) / std
            fold_aucs.append(_auc(xt @ w[:-1] + w[-1], y[test]))
        aucs.append(float(np.mean(fold_aucs)))
    return C2STResult("fixed features + logistic regression", float(np.mean(aucs)), float(np.std(aucs)),
                      tuple(aucs), len(a), len(b))


class SmallCNN(nn.Module):
    """Five 3x3 conv layers (four stride-2), GroupNorm, global average pooling, one logit:
    about 0.1 M parameters, trained from scratch for each test, so it owes nothing to any
    network the generator was trained or judged with."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(4, chans[i + 1]), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).mean(dim=(2, 3))).squeeze(1)


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same random flip/rotation for the whole batch (label-neutral augmentation)."""
    x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
    return x.flip(3) if torch.rand(1, generator=gen) < 0.5 else x


def _train_cnn(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch: int, crop: int) -> SmallCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(x) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    # balance the classes: weight each sample by the inverse of its class size
    pos_weight = (y == 0).sum() / (y == 1).sum().clamp_min(1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = x[idx]
            h, w = xb.shape[-2:]
            top = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
            xb = _dihedral(xb[..., top:top + crop, left:left + crop], gen)
            loss = F.binary_cross_entropy_with_logits(model(xb), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def cnn_c2st(tiles_a: Any, tiles_b: Any, groups_a: Sequence[Any] | None = None,
             groups_b: Sequence[Any] | None = None, seeds: Sequence[int] = (0, 1, 2), folds: int = 2,
             epochs: int = 25, batch: int = 32, crop: int | None = None, strata_a: Sequence[Any] | None = None,
             strata_b: Sequence[Any] | None = None) -> C2STResult:
    """C2ST with a :class:`SmallCNN` trained from scratch on the pixels of each training split.

    Training sees random ``crop``-pixel crops (default three quarters of the tile) under
    random flips and rotations; scoring sees the whole tile. Classes are balanced by weighting."""
    a = torch.from_numpy(as_uint8_tiles(tiles_a, "tiles_a")).permute(0, 3, 1, 2).float() / 255
    b = torch.from_numpy(as_uint8_tiles(tiles_b, "tiles_b")).permute(0, 3, 1, 2).float() / 255
    _check_pair(a.numpy(), b.numpy(), 2 * folds)
    if a.shape[1:] != b.shape[1:]:
        raise InputError("tiles", f"both sets need one tile size, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    crop = crop or (a.shape[-1] * 3) // 4
    x = torch.cat([a, b])
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    aucs = []
    for seed in seeds:
        fold_aucs = []
        splits = _splits(len(a), len(b), groups_a, groups_b, folds, seed, strata_a, strata_b)
        for k, (train, test) in enumerate(splits):
            model = _train_cnn(x[train], y[train], seed * 100 + k, epochs, batch, crop)
            with torch.no_grad():
                scores = torch.cat([model(x[test][i:i + 64]) for i in range(0, len(test), 64)])
            fold_aucs.append(_auc(scores, y[test]))
        aucs.append(float(np.mean(fold_aucs)))
    return C2STResult("small CNN from scratch", float(np.mean(aucs)), float(np.std(aucs)), tuple(aucs),
                      len(a), len(b))


def crops_of(tiles: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``size`` crops of each tile and the index of the tile each came from
    (its group: crops of one tile are never split between training and scoring)."""
    tiles = as_uint8_tiles(tiles)
    n, h, w, _ = tiles.shape
    if h < size or w < size:
        raise InputError("size", f"{size} px crops do not fit {h}x{w} tiles")
    out, groups = [], []
    for i in range(n):
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                out.append(tiles[i, y:y + size, x:x + size])
                groups.append(i)
    return np.ascontiguousarray(np.stack(out)), np.asarray(groups)

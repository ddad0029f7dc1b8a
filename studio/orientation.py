"""Does an embedding know which way the tissue runs? A linear orientation probe.

A generator conditioned on tokens can only reproduce what the tokens carry. Fibres in
stroma, elongated nuclei and gland walls have a direction; an encoder trained to be
invariant to flips and 90-degree rotations maps a patch and its rotation to the same
token, so no read-out of that token can say whether the fibres run left-right or
up-down.

The truth is the structure tensor (scikit-image): its components averaged over a patch
give the patch's dominant orientation ``theta`` (modulo 180 degrees) and a coherence in
[0, 1] (1: one direction everywhere). The probe regresses ``(cos 2 theta, sin 2 theta)``
from the tokens with ridge regression, fitted on one set of patches and scored on
another, as mean absolute angular error in degrees (45 is chance for a uniform angle)
and R². Scoring each test patch together with its 90-degree rotation makes the check
sharp: the truth turns by 90 degrees, an invariant encoder's token does not, so it
cannot beat chance on those pairs whatever it learned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from studio.errors import InputError


def dominant_orientation(patches: np.ndarray, sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Per uint8 RGB patch ``(N, H, W, 3)``: dominant orientation in radians, in
    ``[0, pi)`` measured from the image x axis (columns) towards y (rows), and coherence.

    The orientation is that of the *structures* (fibres, elongated nuclei), i.e. normal to
    the mean gradient direction, from the patch-averaged structure tensor."""
    from skimage.color import rgb2gray
    from skimage.feature import structure_tensor

    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise InputError("patches", f"must be (N, H, W, 3) RGB, got {patches.shape}")
    angles, coherence = [], []
    for patch in patches:
        arr, arc, acc = structure_tensor(rgb2gray(patch), sigma=sigma, order="rc")
        jyy, jxy, jxx = arr.mean(), arc.mean(), acc.mean()
        gradient_angle = 0.5 * np.arctan2(2 * jxy, jxx - jyy)  # direction of strongest change
        angles.append(np.mod(gradient_angle + np.pi / 2, np.pi))
        root = np.hypot(jxx - jyy, 2 * jxy)
        coherence.append(root / (jxx + jyy + 1e-12))
    return np.asarray(angles), np.asarray(coherence)


def angular_error_deg(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Absolute difference of two orientations modulo 180 degrees, in [0, 90]."""
    d = np.mod(np.asarray(predicted) - np.asarray(truth), np.pi)
    return np.degrees(np.minimum(d, np.pi - d))


@dataclass(frozen=True)
class ProbeResult:
    """Held-out scores of the linear read-out (and of predicting no direction at all)."""

    mean_error_deg: float
    median_error_deg: float
    r2: float
    rotation_pairs_error_deg: float
    n_train: int
    n_test: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _double_angle(theta: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(2 * theta), np.sin(2 * theta)], axis=1)


def _rot90(patches: np.ndarray) -> np.ndarray:
    """Rotate patches by 90 degrees (np.rot90 on the row/column axes; structure angle + 90 deg
    modulo 180, whichever way round)."""
    return np.ascontiguousarray(np.rot90(patches, 1, axes=(1, 2)))


def orientation_probe(embed: Callable[[np.ndarray], np.ndarray], train: np.ndarray, test: np.ndarray,
                      min_coherence: float = 0.2, ridge: float = 1.0) -> ProbeResult:
    """Fit the read-out on ``train`` patches (each with its 90-degree rotation) and score
    it on ``test``: on the test patches as they are (``mean_error_deg``, ``r2``), and on
    each test patch paired with its rotation (``rotation_pairs_error_deg``).

    ``embed`` maps uint8 patches ``(N, H, W, 3)`` to features ``(N, D)``. Only patches
    with structure-tensor coherence ``>= min_coherence`` (a direction to read) count."""
    sets = {}
    for name, patches in (("train", train), ("test", test)):
        theta, coherence = dominant_orientation(patches)
        keep = coherence >= min_coherence
        if keep.sum() < 4:
            raise InputError(name, f"has {int(keep.sum())} oriented patches (coherence >= {min_coherence}); need 4")
        sets[name] = (np.asarray(patches)[keep], theta[keep])
    (tr_p, tr_t), (te_p, te_t) = sets["train"], sets["test"]
    tr_rot_p = _rot90(tr_p)
    tr_rot_t = dominant_orientation(tr_rot_p)[0]
    x = np.concatenate([embed(tr_p), embed(tr_rot_p)]).astype(np.float64)
    y = _double_angle(np.concatenate([tr_t, tr_rot_t]))
    mean, std = x.mean(0), x.std(0) + 1e-8
    xs = np.c_[(x - mean) / std, np.ones(len(x))]
    penalty = ridge * np.eye(xs.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(xs.T @ xs + penalty, xs.T @ y)

    def predict(patches: np.ndarray) -> np.ndarray:
        f = (embed(patches).astype(np.float64) - mean) / std
        out = np.c_[f, np.ones(len(f))] @ w
        return np.mod(0.5 * np.arctan2(out[:, 1], out[:, 0]), np.pi), out

    angle, raw = predict(te_p)
    err = angular_error_deg(angle, te_t)
    target = _double_angle(te_t)
    r2 = 1 - ((raw - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    te_rot = _rot90(te_p)
    rot_angle, _ = predict(te_rot)
    pair_err = np.concatenate([err, angular_error_deg(rot_angle, dominant_orientation(te_rot)[0])])
    return ProbeResult(float(err.mean()), float(np.median(err)), float(r2), float(pair_err.mean()),
                       len(x), len(te_p))


def encoder_embed(encoder, batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """An ``embed`` for :func:`orientation_probe` from a studio encoder: the global token
    of each patch (:meth:`Encoder.embed` with ``grid=None``)."""
    from studio.io import to_tensor

    def embed(patches: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = [encoder.embed(to_tensor(patches[i:i + batch]))[:, 0] for i in range(0, len(patches), batch)]
        return torch.cat(out).float().numpy()

    return embed

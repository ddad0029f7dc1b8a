"""Training batches of real tissue crops, reproducible from (seed, step).

Every batch is a pure function of the seed and the step number, so a run resumed from a
checkpoint at step k sees exactly the batches an uninterrupted run would have seen:
resume is bit-for-bit, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from studio.data.splits import tissue_fraction
from studio.io import to_tensor
from studio.stain.augment import StainAugment


class CropSampler:
    """Random ``size`` x ``size`` crops of tissue with flips, 90-degree rotations and stain jitter.

    Args:
        images: uint8 ``(H, W, 3)`` source images (e.g. ``studio.data.splits.regions("train")``).
        size: crop side in pixels.
        min_tissue: crops with less tissue (share of non-glass pixels) are redrawn.
        stain: stain-space augmentation, or None.
        seed: base seed; batch ``step`` uses ``(seed, step)``.
    """

    def __init__(self, images: Sequence[np.ndarray], size: int, *, min_tissue: float = 0.4,
                 stain: StainAugment | None = None, seed: int = 0):
        self.images = [np.ascontiguousarray(im) for im in images if min(im.shape[:2]) >= size]
        if not self.images:
            raise ValueError(f"no image is at least {size}x{size}")
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.size = size
        self.min_tissue = min_tissue
        self.stain = stain
        self.seed = seed

    def crops(self, step: int, batch_size: int) -> np.ndarray:
        """uint8 ``(B, size, size, 3)`` for this step (geometric augmentation included)."""
        rng = np.random.default_rng([self.seed, step])
        out = np.empty((batch_size, self.size, self.size, 3), dtype=np.uint8)
        for i in range(batch_size):
            for _ in range(20):
                image = self.images[rng.choice(len(self.images), p=self.weights)]
                y = rng.integers(0, image.shape[0] - self.size + 1)
                x = rng.integers(0, image.shape[1] - self.size + 1)
                crop = image[y:y + self.size, x:x + self.size]
                if tissue_fraction(crop) >= self.min_tissue:
                    break
            crop = np.rot90(crop, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[i] = crop
        return out

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """float ``(B, 3, size, size)`` in [0, 1], stain-augmented."""
        tiles = to_tensor(self.crops(step, batch_size))
        if self.stain is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            tiles = self.stain(tiles, gen)
        return tiles

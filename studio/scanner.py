"""What a whole-slide scanner adds to an ideal tile: defocus blur, sensor noise, JPEG.

One model of it for the whole studio: the segmenter's training augmentation draws its
three strengths at random (:func:`random_scanner_degrade`), the benches apply fixed ones
(:func:`scanner_degrade`) to the phantom's clean renderings, so that a test set and an
augmentation never disagree about what "scanned" means.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

#: Ranges the training augmentation draws from: blur sigma (px), noise (grey levels), JPEG quality.
BLUR_RANGE = (0.0, 1.5)
NOISE_RANGE = (0.0, 6.0)
QUALITY_RANGE = (35, 95)


def scanner_degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 4.0,
                    quality: int = 75) -> np.ndarray:
    """A uint8 RGB tile blurred (Gaussian, ``blur`` px; none below 0.2), with Gaussian
    sensor noise of ``noise`` grey levels drawn from ``rng``, then JPEG-compressed at
    ``quality``."""
    x = image.astype(np.float32)
    if blur > 0.2:
        x = ndi.gaussian_filter(x, (blur, blur, 0))
    x = x + rng.normal(0.0, noise, x.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def random_scanner_degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`scanner_degrade` at strengths drawn from :data:`BLUR_RANGE`, :data:`NOISE_RANGE`
    and :data:`QUALITY_RANGE` (the training augmentation)."""
    blur = float(rng.uniform(*BLUR_RANGE))
    noise = float(rng.uniform(*NOISE_RANGE))
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    return scanner_degrade(image, rng, blur=blur, noise=noise, quality=quality)

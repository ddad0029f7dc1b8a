"""One conversion of a pipeline's decoded batch to the caller's ``output_type``.

Every studio pipeline returns images the diffusers way (``"pil"``, ``"np"`` or ``"pt"``).
The rounding is ours, not diffusers' ``VaeImageProcessor.postprocess`` (which truncates):
``uint8 = floor(x * 255 + 0.5)``, so a pipeline's PIL output and ``np`` output agree to
the nearest grey level, and every pipeline rounds the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def format_images(images: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """``images`` (B, 3, H, W) in [0, 1] as ``"pt"`` (unchanged), ``"np"`` (B, H, W, 3)
    float32, or a list of RGB ``PIL.Image`` (anything else, diffusers' default ``"pil"``)."""
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).float().cpu().numpy()
    return arr if output_type == "np" else [Image.fromarray((a * 255 + 0.5).astype(np.uint8)) for a in arr]

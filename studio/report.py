"""Visual summaries: labelled PNG contact sheets and label overlays.

A contact sheet is a list of rows, each a title and a list of (caption, uint8 image)
cells; images are resized to a common cell size so tiles of any shape line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from studio.io import atomic_path

Cell = tuple[str, np.ndarray]
Row = tuple[str, Sequence[Cell]]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def contact_sheet(rows: Sequence[Row], cell: int = 192, title: str | None = None) -> Image.Image:
    """Lay images out in labelled rows; returns a PIL image (write it with :func:`save_png`)."""
    pad, caption_h, row_title_h = 6, 16, 20
    title_h = 28 if title else 0
    ncols = max((len(cells) for _, cells in rows), default=1)
    width = pad + ncols * (cell + pad)
    # A row without images (e.g. a skipped step) is just its title line.
    height = title_h + sum(row_title_h + (cell + caption_h + pad if cells else 0) for _, cells in rows) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 6), title, fill="black", font=_font(16))
    y = title_h + pad
    for row_title, cells in rows:
        draw.text((pad, y), row_title, fill=(20, 20, 90), font=_font(13))
        y += row_title_h
        for i, (caption, image) in enumerate(cells):
            x = pad + i * (cell + pad)
            img = Image.fromarray(np.asarray(image)).convert("RGB")
            img.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
            draw.text((x, y + cell + 2), caption[:34], fill="black", font=_font(11))
        if cells:
            y += cell + caption_h + pad
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# Colours per PanNuke class (also used in GeoJSON exports): neoplastic red, inflammatory
# green, connective blue, dead yellow, epithelial orange.
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 0, 0), 2: (0, 200, 0), 3: (30, 80, 255), 4: (255, 220, 0), 5: (255, 128, 0),
    6: (160, 0, 200),
}


def overlay_labels(image: np.ndarray, inst: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray:
    """Draw nucleus outlines over an RGB image, coloured by class (white if no class)."""
    from skimage.segmentation import find_boundaries

    out = np.array(image, copy=True)
    edges = find_boundaries(inst, mode="inner")
    if cls is None:
        out[edges] = (255, 255, 255)
        return out
    for code, colour in CLASS_COLOURS.items():
        out[edges & (cls == code)] = colour
    out[edges & (cls == 0)] = (255, 255, 255)
    return out

"""Is this image H&E or IHC (hematoxylin-DAB)? A check for inputs that must be H&E.

Virtual staining translates H&E; an IHC image fed to it yields a plausible-looking but
meaningless "IHC of an IHC". The two differ in one stain: H&E is counterstained with eosin
(pink cytoplasm and stroma), hematoxylin-DAB slides carry none. After colour deconvolution
with Ruifrok's H/E/DAB vectors (:func:`studio.color.rgb_to_hed`) an IHC image has *no*
tissue pixel with eosin concentration above 0.1, while H&E has many.

Measured on random crops with at least 20,000 tissue pixels (``tissue_mask(min_od=0.1)``):
the share of tissue pixels with eosin > 0.1 is exactly 0 on all 300 crops of
scikit-image's real H-DAB image and on the phantom's HER2 / Ki67 renders, at 160, 256 and
512 px; on the real H&E samples it is at least 0.048 over 1,058 crops of 256 px and at
least 0.49 at 512 px, but one 160 px crop (keratin / dark muscle in skin or the Aperio
region) had none. So images are judged only from :data:`MIN_TISSUE_PIXELS` tissue pixels
up (about a 200 x 200 px tissue area; smaller tiles pass unjudged), with the threshold
:data:`MIN_EOSIN_SHARE` between the two groups.
"""

from __future__ import annotations

import torch

from studio.color import rgb_to_hed, tissue_mask
from studio.errors import InputError

EOSIN_POSITIVE = 0.1  # eosin concentration above which a pixel counts as eosin-stained
MIN_EOSIN_SHARE = 0.01  # fewer eosin-stained tissue pixels than this share: not H&E
MIN_TISSUE_PIXELS = 40_000  # fewer tissue pixels: too little to judge (small or blank tiles pass)


def _eosin_counts(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of float ``(B, 3, H, W)``: eosin-stained tissue pixels, tissue pixels."""
    tiles = tiles.float()
    mask = tissue_mask(tiles, min_od=0.1)[:, 0]
    stained = (rgb_to_hed(tiles)[:, 1] > EOSIN_POSITIVE) & mask
    return stained.sum(dim=(1, 2)), mask.sum(dim=(1, 2))


def _refuse(what: str, share: float, kind: str) -> InputError:
    return InputError(what, f"looks like an IHC (hematoxylin-DAB) {kind}, not H&E: {share:.1%} of its tissue is "
                            f"eosin-stained (H&E measures 5 % or more). Virtual staining needs the H&E section.")


def eosin_share(tiles: torch.Tensor) -> list[float | None]:
    """Share of each tile's tissue pixels stained by eosin (``None`` when a tile has fewer
    than :data:`MIN_TISSUE_PIXELS` tissue pixels). ``tiles``: float ``(B, 3, H, W)`` in [0, 1]."""
    stained, tissue = _eosin_counts(tiles)
    return [int(s) / int(n) if n >= MIN_TISSUE_PIXELS else None for s, n in zip(stained, tissue, strict=True)]


def check_he(tiles: torch.Tensor, what: str = "images") -> None:
    """Raise :class:`~studio.errors.InputError` when a tile with enough tissue carries no
    eosin, i.e. is an IHC (hematoxylin-DAB) image rather than H&E."""
    for i, share in enumerate(eosin_share(tiles)):
        if share is not None and share < MIN_EOSIN_SHARE:
            raise _refuse(f"{what}[{i}]" if len(tiles) > 1 else what, share, "image")


def pooled_eosin_share(tiles) -> float | None:
    """Share of eosin-stained pixels over the tissue of several uint8 ``(H, W, 3)`` tiles
    together (``None`` below :data:`MIN_TISSUE_PIXELS` tissue pixels in all): one decision
    for a whole slide from its sampled tissue tiles, so no single dark window decides."""
    from studio.io import to_tensor

    counts = [_eosin_counts(to_tensor(tile[None] if tile.ndim == 3 else tile)) for tile in tiles]
    stained = sum(int(s.sum()) for s, _ in counts)
    tissue = sum(int(n.sum()) for _, n in counts)
    return stained / tissue if tissue >= MIN_TISSUE_PIXELS else None


def check_he_sample(tiles, what: str = "slide") -> None:
    """:func:`check_he` for a slide, judged on its sampled tissue tiles pooled."""
    share = pooled_eosin_share(tiles)
    if share is not None and share < MIN_EOSIN_SHARE:
        raise _refuse(what, share, "slide")

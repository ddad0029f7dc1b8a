"""Batched classical stain normalization (Macenko, Reinhard, Vahadane) and stain
augmentation, on CPU or GPU, behind one interface::

    from studio.stain import get_normalizer
    norm = get_normalizer("macenko")
    target = norm.fit(reference_tiles)          # -> StainProfile (inspectable, .save(json))
    source = norm.estimate(tiles_of_one_slide)  # slide-level source profile
    out = norm.transform(batch, source=source)  # (B,3,H,W) float in [0,1]
"""

from __future__ import annotations

from typing import Any

from studio.errors import InputError
from studio.stain.base import StainNormalizer
from studio.stain.macenko import MacenkoNormalizer
from studio.stain.profile import StainProfile
from studio.stain.reinhard import ReinhardNormalizer
from studio.stain.vahadane import VahadaneNormalizer

NORMALIZERS: dict[str, type[StainNormalizer]] = {
    cls.name: cls for cls in (MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer)
}


def get_normalizer(name: str, **options: Any) -> StainNormalizer:
    """A fresh classical normalizer by name (``macenko``, ``reinhard``, ``vahadane``)."""
    try:
        cls = NORMALIZERS[name.lower()]
    except KeyError:
        raise InputError(name, f"unknown stain method; choose one of {', '.join(NORMALIZERS)}") from None
    return cls(**options)


__all__ = ["NORMALIZERS", "MacenkoNormalizer", "ReinhardNormalizer", "StainNormalizer", "StainProfile",
           "VahadaneNormalizer", "get_normalizer"]

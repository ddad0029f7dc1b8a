"""``StainProfile``: what a normalizer learned about one source or target, inspectable and
saved as JSON.

A profile is the whole state a classical normalizer needs to map one stain onto another:
the stain matrix (unit OD vectors of hematoxylin and eosin in columns) and robust
concentration maxima for Macenko and Vahadane, the tissue CIELAB mean/std for Reinhard.
Fitting a slide once and storing its profile is what keeps the tiles of one slide
mutually consistent; ``histostudio normalize --reference profile.json`` reuses a target.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.errors import InputError
from studio.io import atomic_write_text

PROFILE_VERSION = 1


@dataclass
class StainProfile:
    """Stain statistics of an image, a tile set or a slide.

    Attributes:
        method: normalizer that produced it ("macenko", "vahadane", "reinhard").
        stain_matrix: 3 rows (R, G, B optical density) x k columns (H, E), unit columns.
        max_concentrations: per-stain robust maximum (the 99th percentile over tissue).
        concentration_percentiles: per-stain {"p1", "p50", "p99"} over tissue pixels.
        lab_mean, lab_std: CIELAB mean and standard deviation over tissue (Reinhard).
        background: glass intensity in [0, 1] the optical densities were computed against.
        tissue_pixels: how many tissue pixels the estimate rests on.
        fallback: True when the estimate came from a fallback (too little tissue, one stain).
        source: free text: what it was fitted on.
        params: the normalizer's parameters (alpha, beta, lambda...).
    """

    method: str
    stain_matrix: list[list[float]] | None = None
    max_concentrations: list[float] | None = None
    concentration_percentiles: dict[str, list[float]] = field(default_factory=dict)
    lab_mean: list[float] | None = None
    lab_std: list[float] | None = None
    background: float = 240.0 / 255.0
    tissue_pixels: int = 0
    fallback: bool = False
    source: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    # ------------------------------------------------------------------ tensors
    def matrix(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Stain matrix as a float32 ``(3, k)`` tensor."""
        if self.stain_matrix is None:
            raise InputError(f"{self.method} profile", "has no stain matrix")
        return torch.tensor(self.stain_matrix, dtype=torch.float32, device=device)

    def max_conc(self, device: torch.device | str | None = None) -> torch.Tensor:
        if self.max_concentrations is None:
            raise InputError(f"{self.method} profile", "has no concentration maxima")
        return torch.tensor(self.max_concentrations, dtype=torch.float32, device=device)

    def lab_stats(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lab_mean is None or self.lab_std is None:
            raise InputError(f"{self.method} profile", "has no LAB statistics")
        return (torch.tensor(self.lab_mean, dtype=torch.float32, device=device),
                torch.tensor(self.lab_std, dtype=torch.float32, device=device))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (atomically)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> StainProfile:
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or "method" not in data:
            raise InputError(source, "is not a stain profile (no 'method' field)")
        unknown = set(data) - known
        if unknown:
            raise InputError(source, f"has unknown fields {sorted(unknown)}")
        profile = cls(**data)
        profile.validate(source)
        return profile

    @classmethod
    def load(cls, path: str | Path) -> StainProfile:
        """Read a profile written by :meth:`save`, with clear errors for bad files."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such stain profile file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(path, f"is not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str = "profile") -> None:
        """Check shapes and finiteness; raises InputError naming ``source``."""
        def finite(values: list[float]) -> bool:
            return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

        if self.stain_matrix is not None:
            rows = self.stain_matrix
            if len(rows) != 3 or any(len(r) != len(rows[0]) for r in rows) or not finite(sum(rows, [])):
                raise InputError(source, "stain_matrix must be 3 rows of finite numbers (one column per stain)")
        if self.max_concentrations is not None and (
            not finite(self.max_concentrations) or min(self.max_concentrations) <= 0
        ):
            raise InputError(source, "max_concentrations must be positive finite numbers")
        for name in ("lab_mean", "lab_std"):
            values = getattr(self, name)
            if values is not None and (len(values) != 3 or not finite(values)):
                raise InputError(source, f"{name} must be 3 finite numbers")
        if not 0.0 < self.background <= 1.0:
            raise InputError(source, f"background {self.background} must be in (0, 1]")

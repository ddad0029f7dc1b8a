"""Tile transforms: the one interface the slide job runs.

A tile transform maps uint8 RGB tiles ``(B, H, W, 3)`` to tiles of the same shape. The
job (``studio.jobs``) never knows which transform it runs: it asks the transform to
``estimate`` a source once per slide (or per tile folder) from sampled tissue tiles, then
streams every tile through ``apply``. Classical stain normalizers are registered here;
other packages (the diffusion normalizer in ``pipelines``) plug in through the entry-point
group ``histostudio.tile_transforms`` so that ``studio`` never imports them::

    [project.entry-points."histostudio.tile_transforms"]
    stainfuser = "pipelines.stain_fuser:create_tile_transform"

A factory is called as ``factory(reference=..., device=..., seed=..., **options)``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from studio.errors import InputError
from studio.stain import NORMALIZERS, StainNormalizer, StainProfile, get_normalizer

ENTRY_POINT_GROUP = "histostudio.tile_transforms"


@runtime_checkable
class TileTransform(Protocol):
    """What the slide job needs from a transform."""

    name: str
    #: True when each output pixel depends only on the same input pixel: such transforms
    #: need no tile overlap or seam blending, and a fixed source makes them a lookup table.
    pixelwise: bool

    def estimate(self, tiles: Sequence[np.ndarray]) -> Any:
        """Source state from sampled tissue tiles of one slide (e.g. a stain profile)."""

    def apply(self, tiles: np.ndarray, source: Any | None) -> np.ndarray:
        """uint8 ``(B, H, W, 3)`` -> same; ``source=None`` means estimate per tile."""

    def describe(self) -> dict[str, Any]:
        """Parameters and target, JSON-serialisable, recorded in the job manifest."""

    # Optional: ``accepts_tile_lists = True`` when ``apply`` also takes a list of same-shaped
    # tiles (as their stack): the job then passes its decoded tiles without stacking them.
    # Optional: ``check(image, name)`` raising a HistostudioError for an input this transform
    # must refuse (e.g. virtual staining fed an IHC image); tile jobs call it per file, so the
    # file is reported as failed and the others are still processed.


@dataclass
class ClassicalStainTransform:
    """A classical stain normalizer as a tile transform (exact LUT for fixed sources)."""

    normalizer: StainNormalizer
    workers: int = 2

    @property
    def name(self) -> str:
        return self.normalizer.name

    pixelwise = True
    #: ``apply`` takes the job's list of decoded tiles as it is: the lookup table reads each
    #: tile in place, so the batch is never stacked into one more copy.
    accepts_tile_lists = True

    def estimate(self, tiles: Sequence[np.ndarray]) -> StainProfile:
        return self.normalizer.estimate(list(tiles), source="sampled tissue tiles")

    def apply(self, tiles: np.ndarray | Sequence[np.ndarray], source: StainProfile | None) -> np.ndarray:
        return self.normalizer.transform_uint8(tiles, source=source, workers=self.workers)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "target": self.normalizer.target.to_dict()}


def load_reference_images(reference: str | Path) -> list[np.ndarray]:
    """Reference tiles from a sample name, an image, a folder of images or a slide."""
    from studio.data.samples import SAMPLES, load_sample
    from studio.io import IMAGE_SUFFIXES, read_image

    ref = str(reference)
    if ref in SAMPLES:
        return [np.ascontiguousarray(load_sample(ref))]
    path = Path(ref)
    if not path.exists():
        raise InputError(path, f"no such reference (give an image, a folder, a slide, a profile .json, "
                               f"or a sample name: {', '.join(SAMPLES)})")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(path, "reference folder holds no images")
        return [read_image(p) for p in files]
    from studio.slides import is_slide_path

    if is_slide_path(path):
        from studio.jobs import sample_tissue_tiles
        from studio.slides import open_slide

        with open_slide(path) as slide:
            return sample_tissue_tiles(slide, count=64, seed=0)
    return [read_image(path)]


def _classical_factory(method: str) -> Callable[..., TileTransform]:
    def factory(reference: str | Path | None = None, device: str | None = None, seed: int = 0,
                workers: int = 2, **options: Any) -> ClassicalStainTransform:
        normalizer = get_normalizer(method, device=device, seed=seed, **options)
        if reference is not None:
            if str(reference).lower().endswith(".json"):
                normalizer.set_target(StainProfile.load(reference))
            else:
                normalizer.fit(load_reference_images(reference), source=str(reference))
        return ClassicalStainTransform(normalizer, workers=workers)

    return factory


def registered_transforms() -> dict[str, Callable[..., TileTransform] | importlib.metadata.EntryPoint]:
    """Every known transform name: the classical ones, then installed plugins."""
    found: dict[str, Any] = {name: _classical_factory(name) for name in NORMALIZERS}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def create_tile_transform(name: str, **kwargs: Any) -> TileTransform:
    """Instantiate a registered tile transform by name."""
    known = registered_transforms()
    entry = known.get(name.lower())
    if entry is None:
        raise InputError(name, f"unknown method; available: {', '.join(sorted(known))}")
    # An entry point is loaded by duck type: once dask.distributed is imported, entry_points()
    # hands back the importlib_metadata backport's EntryPoint, not the stdlib class.
    factory = entry if callable(entry) else entry.load()
    transform = factory(**kwargs)
    _attach_spec(transform, name, kwargs)
    return transform


def _attach_spec(transform: Any, name: str, kwargs: dict[str, Any]) -> None:
    """Record how to rebuild ``transform`` (``.spec``, a :class:`studio.jobs.TransformSpec`):
    what a Dask worker receives instead of the pickled transform and its weights. Paths
    become absolute, since workers need not share this process's working folder."""
    from studio.jobs import TransformSpec

    def portable(value: Any) -> Any:
        if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
            return str(Path(value).absolute())
        return value

    try:
        transform.spec = TransformSpec("studio.transforms:create_tile_transform",
                                       {"name": name, **{k: portable(v) for k, v in kwargs.items()}})
    except AttributeError:  # a transform that takes no attributes is pickled as it is
        pass

"""Nucleus exports: QuPath GeoJSON and HoVer-Net-style JSON.

**GeoJSON** (:func:`to_geojson`, :func:`write_geojson`): a ``FeatureCollection`` with one
``Feature`` per nucleus, as QuPath imports it (File > Import objects, or drag and drop)::

    {"type": "Feature", "id": "<uuid>", "geometry": {"type": "Polygon", "coordinates": [...]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "neoplastic", "color": [255, 0, 0]},
                    "measurements": {"nucleus_id": 17, "type_prob": 0.93}}}

Coordinates are ``(x, y)`` in full-resolution image pixels with pixel *corners* at
integers (pixel ``(row r, col c)`` is the square ``[c, c + 1] x [r, r + 1]``), QuPath's
convention. Outlines trace the pixel edges exactly: each nucleus mask is upsampled 2x
(nearest) and traced with marching squares (:func:`skimage.measure.find_contours`) at 0.5,
which in original pixels runs along the pixel edges with 1/4-pixel chamfers at corners
(area error 1/32 px per corner), then simplified with Douglas-Peucker at ``simplify``
pixels (a smaller tolerance where that would change a small nucleus' area by more than
5 %; ``simplify=0`` still drops collinear points). A nucleus whose pixels form several
4-connected pieces becomes a ``MultiPolygon``; holes become interior rings (not
simplified). Exterior rings are counter-clockwise and holes clockwise in (x, y)
(RFC 7946). Nuclei of class 0 (unknown) have no ``classification``. Marching squares never
lets two rings share a point, so every polygon is valid.

**HoVer-Net JSON** (:func:`hovernet_json`, :func:`write_hovernet_json`): the per-tile
output of HoVer-Net's ``run_infer.py``::

    {"mag": 20, "nuc": {"1": {"bbox": [[rmin, cmin], [rmax, cmax]], "centroid": [x, y],
                              "contour": [[x, y], ...], "type_prob": 0.93, "type": 1}}}

with HoVer-Net's conventions: ``bbox`` rows/columns with exclusive maxima, ``centroid``
the centre of mass in pixel-*centre* coordinates (pixel ``(r, c)`` at ``(c, r)``),
``contour`` the outer boundary of the nucleus' largest piece in the same pixel-centre
coordinates, ``type_prob`` None when unknown.

Every writer is atomic (:func:`studio.io.atomic_path`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from studio.errors import InputError
from studio.io import atomic_path

__all__ = [
    "hovernet_json",
    "mask_rings",
    "nucleus_feature",
    "nucleus_features",
    "to_geojson",
    "write_features",
    "write_geojson",
    "write_hovernet_json",
]


def _default_names() -> dict[int, str]:
    from studio.data.samples import PANNUKE_CLASSES

    return dict(PANNUKE_CLASSES)


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _simplify(ring: np.ndarray, tolerance: float, max_area_change: float = 0.05) -> np.ndarray:
    """Douglas-Peucker on a closed ring (first == last), keeping the area within
    ``max_area_change`` (relative): small nuclei get a smaller tolerance, down to dropping
    only collinear points. Never fewer than 4 points."""
    from skimage.measure import approximate_polygon

    area = abs(_signed_area(ring))
    for tol in (tolerance, tolerance / 4, 1e-6):
        if tol <= 0:
            continue
        out = approximate_polygon(ring, tolerance=tol)
        if len(out) >= 4 and abs(abs(_signed_area(out)) - area) <= max_area_change * area:
            return out
    return ring


def mask_rings(mask: np.ndarray, simplify: float = 0.5) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask: per 4-connected piece, ``[exterior, *holes]`` as float
    ``(n, 2)`` closed rings of ``(x, y)`` pixel-corner coordinates (exterior CCW, holes CW),
    pieces largest first."""
    from skimage.measure import find_contours

    mask = np.asarray(mask, dtype=bool)
    pieces, n = ndi.label(mask)
    out = []
    for sl, k in zip(ndi.find_objects(pieces), range(1, n + 1), strict=True):
        if sl is None:
            continue
        piece = pieces[sl] == k
        up = np.pad(piece.repeat(2, axis=0).repeat(2, axis=1), 1).astype(np.float32)
        rings = []
        for contour in find_contours(up, 0.5, fully_connected="low"):
            # upsampled (row, col) -> original corner coordinates (x, y)
            ring = np.stack([(contour[:, 1] - 0.5) / 2 + sl[1].start,
                             (contour[:, 0] - 0.5) / 2 + sl[0].start], axis=1)
            if not np.array_equal(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            rings.append(ring)
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_signed_area(r)))
        oriented = []
        for j, ring in enumerate(rings):
            # Holes keep their pixel outline (collinear points dropped): simplifying both
            # rings independently could make a hole cross its exterior.
            ring = _simplify(ring, simplify if j == 0 else 0.0)
            ccw = _signed_area(ring) > 0
            want_ccw = j == 0
            oriented.append(ring if ccw == want_ccw else ring[::-1])
        out.append((int(piece.sum()), oriented))
    out.sort(key=lambda t: -t[0])
    return [rings for _, rings in out]


def _round(ring: np.ndarray, offset: tuple[float, float], scale: float) -> list[list[float]]:
    pts = ring * scale + np.asarray(offset, dtype=np.float64)
    return np.round(pts, 3).tolist()


def nucleus_feature(
    mask: np.ndarray,
    cls: int,
    class_names: Mapping[int, str],
    *,
    origin: tuple[int, int] = (0, 0),
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    simplify: float = 0.5,
    nucleus_id: int | None = None,
    type_prob: float | None = None,
) -> dict[str, Any] | None:
    """One QuPath detection Feature from a nucleus mask (None when the mask is empty).

    Args:
        mask: bool ``(h, w)`` nucleus pixels, its top-left at ``origin`` ``(x, y)`` of the image.
        cls: class code (0 = unknown: no classification).
        class_names: class code -> name.
        offset: ``(x, y)`` added after scaling (e.g. a tile's position in its slide).
        scale: full-resolution pixels per image pixel (a slide read at a coarser level).
    """
    from studio.report import CLASS_COLOURS

    rings = mask_rings(mask, simplify)
    if not rings:
        return None
    shift = (origin[0] * scale + offset[0], origin[1] * scale + offset[1])
    polys = [[_round(r, shift, scale) for r in piece] for piece in rings]
    geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                else {"type": "MultiPolygon", "coordinates": polys})
    props: dict[str, Any] = {"objectType": "detection"}
    if cls:
        if cls not in class_names:
            raise InputError("cls", f"class {cls} has no name in class_names {dict(class_names)}")
        colour = CLASS_COLOURS.get(int(cls), (128, 128, 128))
        props["classification"] = {"name": str(class_names[cls]), "color": [int(c) for c in colour]}
    measurements: dict[str, float] = {}
    if nucleus_id is not None:
        measurements["nucleus_id"] = int(nucleus_id)
    if type_prob is not None:
        measurements["type_prob"] = round(float(type_prob), 4)
    if measurements:
        props["measurements"] = measurements
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _check_maps(inst: np.ndarray, cls: np.ndarray | None, class_names: Mapping[int, str]) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    from studio.data.base import validate_labels

    inst = np.asarray(inst)
    cls = np.zeros(inst.shape, np.uint8) if cls is None else np.asarray(cls)
    return validate_labels(inst, cls, inst.shape, max(class_names, default=0), "labels")


def nucleus_features(
    inst: np.ndarray,
    cls: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    simplify: float = 0.5,
    type_prob: Mapping[int, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Features of every nucleus of an instance map (lazily, in id order)."""
    names = _default_names() if class_names is None else dict(class_names)
    inst, cls = _check_maps(inst, cls, names)
    top = int(inst.max(initial=0))
    for i, sl in enumerate(ndi.find_objects(inst, max_label=top), start=1):
        if sl is None:
            continue
        mask = inst[sl] == i
        code = int(cls[sl][mask][0])
        feat = nucleus_feature(mask, code, names, origin=(sl[1].start, sl[0].start), offset=offset, scale=scale,
                               simplify=simplify, nucleus_id=i,
                               type_prob=None if type_prob is None else type_prob.get(i))
        if feat is not None:
            yield feat


def to_geojson(
    inst: np.ndarray,
    cls: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    simplify: float = 0.5,
    *,
    scale: float = 1.0,
    type_prob: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """QuPath ``FeatureCollection`` of the nuclei of an instance map (see the module docstring).

    Args:
        inst: ``(H, W)`` integer instance map (0 = background; ids need not be contiguous).
        cls: ``(H, W)`` class map (one class per instance; None = all unknown).
        class_names: class code -> name (PanNuke's by default).
        offset: ``(x, y)`` of the map's top-left in full-resolution pixels.
        simplify: Douglas-Peucker tolerance in pixels (0 = the exact pixel outline).
        scale: full-resolution pixels per map pixel.
        type_prob: optional nucleus id -> type probability, stored as a measurement.
    """
    feats = list(nucleus_features(inst, cls, class_names, offset=offset, scale=scale, simplify=simplify,
                                  type_prob=type_prob))
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(path: str | Path, collection: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Path:
    """Write a FeatureCollection, or stream an iterable of Features as one, atomically.

    Streaming keeps memory flat for whole-slide exports (millions of nuclei): features are
    written one by one as the iterable yields them. Returns the path (:func:`write_features`
    returns the number of features instead).
    """
    write_features(path, collection)
    return Path(path)


def write_features(path: str | Path, collection: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
    """Like :func:`write_geojson`, returning the number of features written."""
    features = collection.get("features", []) if isinstance(collection, Mapping) else collection
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feat in features:
            fh.write(("\n" if n == 0 else ",\n") + json.dumps(feat, separators=(",", ":")))
            n += 1
        fh.write("\n]}\n")
    return n


def hovernet_json(
    inst: np.ndarray,
    cls: np.ndarray | None = None,
    type_prob: Mapping[int, float] | None = None,
    mag: float | None = None,
) -> dict[str, Any]:
    """HoVer-Net tile output ``{"mag": ..., "nuc": {id: {...}}}`` (see the module docstring).

    Args:
        inst: ``(H, W)`` instance map; the JSON keys are its ids (as strings).
        cls: class map (one class per instance), or None (types 0).
        type_prob: nucleus id -> type probability (None per nucleus when not given).
        mag: objective magnification recorded as ``mag`` (e.g. 20 for 0.5 um/px).
    """
    from studio.metrics import instance_centroids

    inst = np.asarray(inst)
    cls = np.zeros(inst.shape, np.uint8) if cls is None else np.asarray(cls)
    top = int(cls.max(initial=0)) if cls.size else 0
    inst, cls = _check_maps(inst, cls, {c: str(c) for c in range(1, max(top, 1) + 1)})
    ids, centroids = instance_centroids(inst)
    slices = ndi.find_objects(inst, max_label=int(inst.max(initial=0)))
    nuc: dict[str, Any] = {}
    for i, (cy, cx) in zip(ids.tolist(), centroids.tolist(), strict=True):
        sl = slices[i - 1]
        mask = inst[sl] == i
        rings = mask_rings(mask, simplify=0.0)
        ring = rings[0][0] if rings else np.zeros((0, 2))
        contour = (ring[:-1] + np.array([sl[1].start - 0.5, sl[0].start - 0.5])).round(2).tolist()
        nuc[str(i)] = {
            "bbox": [[int(sl[0].start), int(sl[1].start)], [int(sl[0].stop), int(sl[1].stop)]],
            "centroid": [round(cx, 3), round(cy, 3)],
            "contour": contour,
            "type_prob": None if type_prob is None or i not in type_prob else round(float(type_prob[i]), 4),
            "type": int(cls[sl][mask][0]),
        }
    return {"mag": mag, "nuc": nuc}


def write_hovernet_json(path: str | Path, inst: np.ndarray, cls: np.ndarray | None = None,
                        type_prob: Mapping[int, float] | None = None, mag: float | None = None) -> Path:
    """:func:`hovernet_json` written atomically to ``path``."""
    data = hovernet_json(inst, cls, type_prob=type_prob, mag=mag)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data), encoding="utf-8")
    return Path(path)

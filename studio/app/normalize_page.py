"""Normalize page: one reference, a few source tiles, every registered method side by side.

Methods are whatever :func:`studio.transforms.registered_transforms` lists: the classical
normalizers (Macenko, Reinhard, Vahadane) and installed plugins (e.g. the diffusion
normalizer). Under each output: SSIM of lightness to the source (structure kept) and mean
CIEDE2000 of tissue colour to the reference (colour match), see :mod:`studio.app.compare`.
Downloads: the fitted target stain profile (JSON, for ``histostudio normalize --reference``)
and each normalized tile (PNG).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from studio.app.common import Picked, centre_crop, limit_side, pick_image, pick_tiles, png_bytes
from studio.app.compare import colour_distance, structure_ssim, tissue_colours
from studio.errors import HistostudioError

REFERENCE_MAX_SIDE = 2048  # the reference is fitted on a copy at most this size (area-downscaled)
TILE_MAX_SIDE = 1024  # larger source images are centre-cropped to this
DEFAULT_REFERENCE = "tiatoolbox_target"
DEFAULT_SOURCE = "skin"


@dataclass
class Result:
    """One method applied to one tile."""

    method: str
    image: np.ndarray | None
    ssim: float = math.nan
    delta_e: float = math.nan
    note: str = ""
    error: str = ""


def classical_methods() -> tuple[str, ...]:
    from studio.stain import NORMALIZERS

    return tuple(NORMALIZERS)


def available_methods() -> list[str]:
    from studio.transforms import registered_transforms

    return list(registered_transforms())


# --------------------------------------------------------------------------- cached work
@st.cache_resource(max_entries=24, show_spinner=False)
def fitted_transform(method: str, reference_digest: str, reference_name: str, _reference: np.ndarray) -> Any:
    """A tile transform fitted to the reference (shared between sessions; read-only use).

    Classical methods are fitted directly (the profile records the reference's name);
    plugins get the reference as a PNG path, as ``histostudio normalize --reference`` would.
    """
    from studio.transforms import ClassicalStainTransform, create_tile_transform

    if method in classical_methods():
        from studio.stain import get_normalizer

        normalizer = get_normalizer(method, device="cpu", seed=0)
        normalizer.fit([np.ascontiguousarray(_reference)], source=reference_name)
        return ClassicalStainTransform(normalizer, workers=1)
    from studio.io import write_image

    with tempfile.TemporaryDirectory(prefix="histostudio-reference-") as tmp:
        path = write_image(Path(tmp) / f"{Path(reference_name).stem or 'reference'}.png", _reference)
        return create_tile_transform(method, reference=str(path), device="cpu", seed=0)


@st.cache_data(max_entries=64, show_spinner=False)
def reference_colours(reference_digest: str, _reference: np.ndarray) -> np.ndarray | None:
    return tissue_colours(_reference)


@st.cache_data(max_entries=256, show_spinner=False)
def normalize_tile(method: str, reference_digest: str, tile_digest: str, _transform: Any, _tile: np.ndarray
                   ) -> tuple[np.ndarray, str]:
    """(normalized uint8 tile, note): the tile's own stain estimate mapped to the target."""
    tile = np.ascontiguousarray(_tile)
    normalizer = getattr(_transform, "normalizer", None)
    if normalizer is not None:
        from studio.io import to_uint8

        profile = normalizer.estimate([tile], source="source tile")
        out = to_uint8(normalizer.transform(tile[None], source=profile))[0]
        note = "fallback: too little tissue or a single stain; tile left as it was" if profile.fallback else ""
        return out, note
    return np.asarray(_transform.apply(tile[None], None))[0], ""


def profile_json(transform: Any) -> str | None:
    """The fitted target stain profile as JSON, or None for methods without one."""
    target = getattr(getattr(transform, "normalizer", None), "target", None)
    if target is None:
        return None
    return json.dumps(target.to_dict(), indent=2) + "\n"


def run_comparison(reference: Picked, tiles: list[Picked], methods: list[str]
                   ) -> tuple[dict[str, Any], list[tuple[Picked, float, list[Result]]]]:
    """Fit every method, normalize every tile, score everything; with a progress bar."""
    ref_image = limit_side(reference.image, REFERENCE_MAX_SIDE)
    ref_digest = reference.digest
    transforms: dict[str, Any] = {}
    rows: list[tuple[Picked, float, list[Result]]] = []
    total = len(methods) * (1 + len(tiles))
    bar = st.progress(0.0, text="Fitting the methods to the reference…")
    done = 0
    errors: dict[str, str] = {}
    for method in methods:
        try:
            transforms[method] = fitted_transform(method, ref_digest, reference.name, ref_image)
        except HistostudioError as exc:
            errors[method] = str(exc)
        except Exception as exc:  # a plugin failing must not take the page down
            errors[method] = f"{type(exc).__name__}: {exc}"
        done += 1
        bar.progress(done / total, text=f"Fitted {method}")
    ref_colours = reference_colours(ref_digest, ref_image)
    for tile in tiles:
        image = centre_crop(tile.image, TILE_MAX_SIDE)
        digest = tile.digest
        baseline = colour_distance(tissue_colours(image), ref_colours)
        results = []
        for method in methods:
            if method in errors:
                results.append(Result(method, None, error=errors[method]))
            else:
                try:
                    out, note = normalize_tile(method, ref_digest, digest, transforms[method], image)
                    results.append(Result(method, out, structure_ssim(image, out),
                                          colour_distance(tissue_colours(out), ref_colours), note))
                except HistostudioError as exc:
                    results.append(Result(method, None, error=str(exc)))
            done += 1
            bar.progress(done / total, text=f"{method} on {tile.name}")
        rows.append((Picked(tile.name, image), baseline, results))
    bar.empty()
    return transforms, rows


# --------------------------------------------------------------------------- page
def _fmt(value: float, spec: str) -> str:
    return "n/a (no tissue)" if math.isnan(value) else format(value, spec)


def render() -> None:
    from studio.data.samples import HE_SAMPLES

    st.title("Stain normalization")
    st.caption("Map the stain of your tiles onto a reference and compare methods side by side: structure kept "
               "(SSIM of lightness to the source, 1 = unchanged) and colour match (mean CIEDE2000 of tissue colour "
               "to the reference, lower = closer; under ~3 is hard to tell apart by eye).")
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader("1 · Reference stain")
        reference = pick_image("Reference", "norm_ref", samples=HE_SAMPLES, default_sample=DEFAULT_REFERENCE,
                               help="The image whose stain the tiles should take on.")
        if reference is not None:
            st.image(limit_side(reference.image, 512), caption=f"reference: {reference.name}", width=260)
    with right:
        st.subheader("2 · Source tiles")
        tiles = pick_tiles("Source", "norm_src", samples=HE_SAMPLES, default_sample=DEFAULT_SOURCE)
        if tiles:
            st.image([limit_side(t.image, 256) for t in tiles], caption=[t.name for t in tiles], width=120)
    st.subheader("3 · Methods")
    options = available_methods()
    plugins = [m for m in options if m not in classical_methods()]
    methods = st.multiselect("Methods to compare", options, default=list(classical_methods()), key="norm_methods",
                             help="Classical normalizers, plus installed plugins"
                                  + (f" ({', '.join(plugins)})" if plugins else "") + ".")
    if reference is None or not tiles or not methods:
        st.info("Choose a reference, at least one source tile and at least one method.")
        return
    if any(max(t.image.shape[:2]) > TILE_MAX_SIDE for t in tiles):
        st.caption(f"Source images larger than {TILE_MAX_SIDE} px are compared on their central "
                   f"{TILE_MAX_SIDE}x{TILE_MAX_SIDE} px.")
    transforms, rows = run_comparison(reference, tiles, methods)
    _show_profiles(transforms, methods)
    _show_grid(rows, methods)
    _show_table(rows)


def _show_profiles(transforms: dict[str, Any], methods: list[str]) -> None:
    st.subheader("Target stain profiles")
    with_profiles = [(m, profile_json(transforms[m])) for m in methods if m in transforms]
    with_profiles = [(m, p) for m, p in with_profiles if p is not None]
    if not with_profiles:
        st.caption("None of the chosen methods has a stain profile to download.")
        return
    cols = st.columns(len(with_profiles))
    for col, (method, text) in zip(cols, with_profiles, strict=True):
        col.download_button(f"{method} profile (JSON)", text, file_name=f"{method}_profile.json",
                            mime="application/json", key=f"norm_profile_{method}", icon=":material/download:")
    st.caption("Reuse a profile on slides and tile folders: "
               "`histostudio normalize INPUTS --method METHOD --reference METHOD_profile.json --out OUT`")


def _show_grid(rows: list[tuple[Picked, float, list[Result]]], methods: list[str]) -> None:
    st.subheader("Comparison")
    header = st.columns(1 + len(methods))
    header[0].markdown("**source**")
    for col, method in zip(header[1:], methods, strict=True):
        col.markdown(f"**{method}**")
    for r, (tile, baseline, results) in enumerate(rows):
        cols = st.columns(1 + len(methods))
        cols[0].image(tile.image, caption=tile.name, width="stretch")
        cols[0].caption(f"SSIM 1.000 · ΔE00 {_fmt(baseline, '.1f')} (before)")
        for col, result in zip(cols[1:], results, strict=True):
            if result.image is None:
                col.error(f"{result.method}: {result.error}", icon=":material/error:")
                continue
            col.image(result.image, caption=f"{result.method}: {tile.name}", width="stretch")
            col.caption(f"SSIM {_fmt(result.ssim, '.3f')} · ΔE00 {_fmt(result.delta_e, '.1f')}")
            if result.note:
                col.caption(f":orange[{result.note}]")
            stem = Path(tile.name).stem.replace("@", "_").replace(",", "_")
            col.download_button("PNG", png_bytes(result.image), file_name=f"{stem}_{result.method}.png",
                                mime="image/png", key=f"norm_png_{r}_{result.method}", icon=":material/download:")


def _show_table(rows: list[tuple[Picked, float, list[Result]]]) -> None:
    import pandas as pd

    records = []
    for tile, baseline, results in rows:
        records.append({"tile": tile.name, "method": "(source)", "SSIM to source": 1.0,
                        "ΔE00 to reference": baseline})
        for result in results:
            if result.image is not None:
                records.append({"tile": tile.name, "method": result.method, "SSIM to source": result.ssim,
                                "ΔE00 to reference": result.delta_e})
    with st.expander("Scores as a table", expanded=False):
        st.dataframe(pd.DataFrame.from_records(records), hide_index=True,
                     column_config={"SSIM to source": st.column_config.NumberColumn(format="%.3f"),
                                    "ΔE00 to reference": st.column_config.NumberColumn(format="%.2f")})


__all__ = ["Result", "available_methods", "fitted_transform", "normalize_tile", "profile_json", "render",
           "run_comparison"]

"""The published models a page can use, listed beside the shipped checkpoints.

Users download PixCell, UNI-2h, the SD3.5 VAE and the virtual-staining release into one
folder (``$HISTOSTUDIO_MODELS``); :func:`studio.published.find_published` recognises each
by its layout. A page shows every installed model of the kinds it runs, with its status
(ready, or the missing piece in words), so a user sees at once why a model they downloaded
is not offered; only ready models enter the page's model choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from studio.published import ENV, PublishedModel, find_published, models_dir

#: Suffix of a published model's label in a page's model choice (shipped ones have none).
PUBLISHED_TAG = " · published"


def installed(kinds: Sequence[str]) -> list[PublishedModel]:
    """Every published model of ``kinds`` in the models folder (none without one)."""
    return [m for m in find_published(models_dir()) if m.kind in kinds]


def uni2h_ready() -> bool:
    """PixCell is conditioned on UNI-2h tokens of the source tile: without a ready UNI-2h
    folder it cannot embed an upload, so it is listed but not offered."""
    return any(m.ready for m in installed(("uni2h",)))


def runnable(kinds: Sequence[str], needs_uni2h: bool = True) -> dict[str, Path]:
    """Label -> folder of the ready published models of ``kinds`` (what a page may run)."""
    if needs_uni2h and not uni2h_ready():
        return {}
    return {f"{m.name}{PUBLISHED_TAG}": m.path for m in installed(kinds) if m.ready}


def _source(model: PublishedModel) -> str:
    try:
        return model.source
    except KeyError:  # a kind recognised before its download source was written down
        return ""


def render_published(kinds: Sequence[str], purpose: str, needs_uni2h: bool = True) -> None:
    """A collapsed table of the installed published models of ``kinds`` (and of UNI-2h, when
    they need it), or one line saying where the page looks for them."""
    root = models_dir()
    shown = list(kinds) + (["uni2h", "sd35-vae"] if needs_uni2h else [])
    models = installed(shown)
    if root is None or not models:
        where = f"`{root}` holds none" if root is not None else f"set `{ENV}` to the folder you downloaded them to"
        st.caption(f"Published models for {purpose} (PixCell, UNI-2h, the SD3.5 VAE): {where}. "
                   f"The README's *Use the published models* lists the files.")
        return
    with st.expander(f"Published models in {root} ({sum(m.ready for m in models)} of {len(models)} ready)"):
        rows = [{"name": m.name, "kind": m.kind, "status": m.status, "detail": m.detail,
                 "size (MB)": round(m.size_mb, 1), "from": _source(m)} for m in models]
        st.dataframe(rows, hide_index=True, use_container_width=True)
        if needs_uni2h and not uni2h_ready() and any(m.kind not in ("uni2h", "sd35-vae") for m in models):
            st.caption("PixCell models are offered once a converted UNI-2h folder is installed beside them "
                       "(they are conditioned on its tokens).")

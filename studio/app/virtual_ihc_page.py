"""Virtual IHC page: H&E in, a virtual IHC stain (HER2, Ki67, ER, PR) out, and the DAB
read-out of the *output* (heat map, DAB-positive %).

The translation pipeline arrives with the virtual-IHC capability. Until
``pipelines.virtual_ihc`` can be imported the page says so and offers only the DAB
read-out of a real IHC image (the same read-out the virtual stains will get).

Wiring the real pipeline is :func:`load_translator` alone: return a callable
``translate(he_uint8 (H, W, 3), stain: str) -> ihc_uint8 (H, W, 3)``. The expected module
API (adapt here if it differs) is ``pipelines.virtual_ihc.load_virtual_ihc(stain,
checkpoints_dir) -> callable(he_uint8) -> ihc_uint8``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import streamlit as st

from studio.app.common import Picked, limit_side, pick_image, png_bytes, show_error
from studio.app.dab import DEFAULT_THRESHOLD, HEATMAP_MAX, dab_heatmap, dab_positive_fraction, wipe
from studio.errors import HistostudioError

STAINS = ("HER2", "Ki67", "ER", "PR")
NOT_YET = ("Virtual IHC models arrive with the virtual-IHC capability: translating H&E into HER2, Ki67, ER and PR "
           "needs `pipelines.virtual_ihc`, which this installation does not have yet.")
WORK_SIDE = 1024  # H&E inputs are translated at most this large (area-downscaled)

Translator = Callable[[np.ndarray, str], np.ndarray]


def load_translator() -> Translator | None:
    """The H&E -> IHC translator, or None while the virtual-IHC pipeline is not installed."""
    try:
        from pipelines import virtual_ihc
    except ImportError:
        return None
    from studio.info import checkpoints_dir

    @st.cache_resource(show_spinner="Loading the virtual IHC model…")
    def model(stain: str):
        return virtual_ihc.load_virtual_ihc(stain, checkpoints_dir())

    def translate(he: np.ndarray, stain: str) -> np.ndarray:
        return np.asarray(model(stain)(he))

    return translate


@st.cache_data(max_entries=16, show_spinner=False)
def _translated(digest: str, stain: str, _translate: Translator, _he: np.ndarray) -> np.ndarray:
    return _translate(np.ascontiguousarray(_he), stain)


@st.cache_data(max_entries=32, show_spinner=False)
def _readout(digest: str, threshold: float, _ihc: np.ndarray) -> tuple[np.ndarray, float]:
    return dab_heatmap(_ihc), dab_positive_fraction(_ihc, threshold)


def show_dab_readout(ihc: Picked, key: str) -> None:
    """Heat map of DAB optical density and the DAB-positive share of tissue."""
    threshold = st.slider("DAB threshold (optical density)", 0.02, 0.30, DEFAULT_THRESHOLD, 0.01, key=f"{key}_thr",
                          help="A tissue pixel counts as DAB-positive above this DAB optical density "
                               "(colour deconvolution, Ruifrok & Johnston vectors).")
    heat, fraction = _readout(ihc.digest, float(threshold), ihc.image)
    st.metric("DAB-positive tissue", f"{100 * fraction:.1f} %", help="Share of tissue pixels above the threshold.")
    st.image(heat, caption=f"DAB heat map (optical density 0 to {HEATMAP_MAX:.2f}, dark to bright)", width="stretch")


def show_translation(he: Picked, ihc: np.ndarray, stain: str) -> None:
    """Side by side, a before/after slider, and the DAB read-out of the output."""
    output = Picked(f"{he.name} ({stain})", ihc)
    left, right = st.columns(2)
    left.image(he.image, caption=f"H&E: {he.name}", width="stretch")
    right.image(ihc, caption=f"virtual {stain}", width="stretch")
    right.download_button(f"Virtual {stain} (PNG)", png_bytes(ihc), file_name=f"virtual_{stain}.png",
                          mime="image/png", key="vihc_png", icon=":material/download:")
    position = st.slider("Compare: H&E ◀ ▶ virtual IHC", 0, 100, 50, key="vihc_wipe")
    st.image(wipe(he.image, ihc, position / 100), width="stretch")
    st.subheader(f"DAB read-out of the virtual {stain}")
    show_dab_readout(output, "vihc")


def render() -> None:
    st.title("Virtual IHC")
    translate = load_translator()
    if translate is None:
        st.info(NOT_YET, icon=":material/info:")
        st.subheader("DAB read-out of a real IHC image")
        st.caption("The read-out the virtual stains will get: DAB separated by colour deconvolution, a heat map "
                   "of it, and the share of tissue above a threshold.")
        ihc = pick_image("IHC image", "dab_src", samples=("ihc",), default_sample="ihc")
        if ihc is not None:
            cols = st.columns(2)
            cols[0].image(limit_side(ihc.image, 1024), caption=ihc.name, width="stretch")
            with cols[1]:
                show_dab_readout(ihc, "dab")
        return
    from studio.data.samples import HE_SAMPLES

    he = pick_image("H&E", "vihc_src", samples=HE_SAMPLES, default_sample="hgsc_nest")
    stain = st.radio("Stain", STAINS, horizontal=True, key="vihc_stain")
    if he is None:
        return
    he = Picked(he.name, limit_side(he.image, WORK_SIDE))
    try:
        with st.spinner(f"Translating to virtual {stain}…"):
            ihc = _translated(he.digest, stain, translate, he.image)
    except HistostudioError as exc:
        show_error(exc)
        return
    show_translation(he, ihc, stain)

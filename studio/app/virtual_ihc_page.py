"""Virtual IHC page: H&E in, a virtual IHC stain (HER2, Ki67, ER, PR) out, and the DAB
read-out of the *output* (heat map, DAB-positive %, H-score).

Stains are those with a ``VirtualIHCPipeline`` checkpoint (``virtual-ihc-<stain>`` under
``studio.info.checkpoints_dir()``); each may hold the fast translator, the diffusion one,
or both, and the page offers what it holds. Without any, the page says how to train one
and offers the DAB read-out of a real IHC image (the same read-out the virtual stains get).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import streamlit as st

from studio.app.common import Picked, limit_side, pick_image, png_bytes, show_error
from studio.app.dab import DEFAULT_THRESHOLD, HEATMAP_MAX, dab_heatmap, dab_positive_fraction, h_score, wipe
from studio.app.published_models import render_published
from studio.errors import HistostudioError

STAINS = ("HER2", "Ki67", "ER", "PR")
TRAIN_COMMAND = "python -m training.virtual_ihc --config training/recipes/virtual_ihc_her2.yaml"
#: Published folders this page lists: PixCell-1024 and the virtual-staining release (LoRA + flow).
PUBLISHED_KINDS = ("pixcell", "pixcell-staining")
WORK_SIDE = 1024  # H&E inputs are translated at most this large (area-downscaled)

Translator = Callable[[np.ndarray, str], np.ndarray]


def display_name(stain: str) -> str:
    return {s.lower(): s for s in STAINS}[stain]


def available_stains() -> dict[str, list[str]]:
    """Display stain name -> the translators its checkpoint holds (empty dict: none installed)."""
    import json

    from pipelines.virtual_ihc import virtual_ihc_checkpoints
    from studio.info import checkpoints_dir

    out = {}
    for stain, folder in virtual_ihc_checkpoints(checkpoints_dir()).items():
        index = json.loads((folder / "model_index.json").read_text())
        models = []
        if (index.get("generator") or [None])[0]:
            models.append("fast")
        if (index.get("unet") or [None])[0]:
            models.append("diffusion")
        out[display_name(stain)] = models
    for stain in published_stains():
        out.setdefault(stain, []).append("pixcell")
    return out


def published_stains() -> dict[str, str]:
    """Display stain name -> the installed ``pixcell-virtual-staining`` release that can run it
    (its LoRA and flow MLP, PixCell-1024, UNI-2h and the SD3.5 VAE all found)."""
    from pipelines.pixcell_staining import STAIN_FILES, check_release
    from studio.app.published_models import installed
    from studio.errors import HistostudioError

    out: dict[str, str] = {}
    for release in installed(("pixcell-staining",)):
        if not release.ready:
            continue
        for stain in STAIN_FILES:
            try:
                check_release(release.path, stain)
            except HistostudioError:
                continue
            out.setdefault(display_name(stain), str(release.path))
    return out


@st.cache_resource(max_entries=2, show_spinner="Loading PixCell-1024 with the staining LoRA…")
def _pixcell(stain: str, release: str, seed: int):
    from pipelines.pixcell_staining import create_pixcell_staining_transform

    return create_pixcell_staining_transform(stain.lower(), release, seed=seed, device="auto")


@st.cache_resource(max_entries=4, show_spinner="Loading the virtual IHC model…")
def _pipeline(stain: str):
    from pipelines.virtual_ihc import load_virtual_ihc
    from studio.info import checkpoints_dir

    return load_virtual_ihc(stain.lower(), checkpoints_dir())


def load_translator(model: str = "fast", seed: int = 0) -> Translator:
    """``translate(he_uint8, stain) -> ihc_uint8`` with the chosen translator."""
    import torch

    def translate(he: np.ndarray, stain: str) -> np.ndarray:
        if model == "pixcell":  # the published release: UNI-2h tokens -> flow MLP -> PixCell-1024 + LoRA
            return _pixcell(stain, published_stains()[stain], seed).apply(he[None])[0]
        out = _pipeline(stain)(he, model=model, generator=torch.Generator().manual_seed(seed), output_type="np")
        return (out.images[0] * 255 + 0.5).astype(np.uint8)

    return translate


@st.cache_data(max_entries=16, show_spinner=False)
def _translated(digest: str, stain: str, model: str, seed: int, _translate: Translator, _he: np.ndarray
                ) -> np.ndarray:
    return _translate(np.ascontiguousarray(_he), stain)


@st.cache_data(max_entries=32, show_spinner=False)
def _readout(digest: str, threshold: float, _ihc: np.ndarray) -> tuple[np.ndarray, float, dict]:
    return dab_heatmap(_ihc), dab_positive_fraction(_ihc, threshold), h_score(_ihc)


def show_dab_readout(ihc: Picked, key: str) -> None:
    """Heat map of DAB optical density and the DAB-positive share of tissue."""
    threshold = st.slider("DAB threshold (optical density)", 0.02, 0.30, DEFAULT_THRESHOLD, 0.01, key=f"{key}_thr",
                          help="A tissue pixel counts as DAB-positive above this DAB optical density "
                               "(colour deconvolution, Ruifrok & Johnston vectors).")
    heat, fraction, score = _readout(ihc.digest, float(threshold), ihc.image)
    a, b = st.columns(2)
    a.metric("DAB-positive tissue", f"{100 * fraction:.1f} %", help="Share of tissue pixels above the threshold.")
    b.metric("H-score (pixel)", f"{score['h_score']:.0f}",
             help="1 x %weak + 2 x %moderate + 3 x %strong DAB tissue pixels (0-300); a pixel-level analogue of "
                  "the cell-level score.")
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


def no_checkpoint_message() -> str:
    from studio.info import checkpoints_dir

    return (f"**No virtual IHC checkpoint yet.** Translating H&E into HER2, Ki67, ER or PR needs a "
            f"`VirtualIHCPipeline` folder named `virtual-ihc-<stain>` in `{checkpoints_dir()}`. Train one with "
            f"`{TRAIN_COMMAND}`, then copy its `runs/virtual_ihc_her2/final` folder to "
            f"`{checkpoints_dir() / 'virtual-ihc-her2'}`.")


def render() -> None:
    st.title("Virtual IHC")
    render_published(PUBLISHED_KINDS, "virtual IHC")
    stains = available_stains()
    if not stains:
        st.info(no_checkpoint_message(), icon=":material/info:")
        st.subheader("DAB read-out of a real IHC image")
        st.caption("The read-out the virtual stains get: DAB separated by colour deconvolution, a heat map "
                   "of it, the share of tissue above a threshold and a pixel H-score.")
        ihc = pick_image("IHC image", "dab_src", samples=("ihc",), default_sample="ihc")
        if ihc is not None:
            cols = st.columns(2)
            cols[0].image(limit_side(ihc.image, 1024), caption=ihc.name, width="stretch")
            with cols[1]:
                show_dab_readout(ihc, "dab")
        return
    from studio.data.samples import HE_SAMPLES

    he = pick_image("H&E", "vihc_src", samples=HE_SAMPLES, default_sample="hgsc_nest")
    stain = st.radio("Stain", list(stains), horizontal=True, key="vihc_stain")
    a, b = st.columns(2)
    model = a.radio("Translator", stains[stain], horizontal=True, key="vihc_model",
                    help="fast: one forward pass; diffusion: a few denoising steps, seeded; pixcell: the "
                         "published PixCell-1024 virtual-staining release (20 steps; slow without a GPU).")
    seed = b.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="vihc_seed")
    if he is None:
        return
    he = Picked(he.name, limit_side(he.image, WORK_SIDE))
    try:
        with st.spinner(f"Translating to virtual {stain}…"):
            ihc = _translated(he.digest, stain, model, int(seed), load_translator(model, int(seed)), he.image)
    except HistostudioError as exc:
        show_error(exc)
        return
    show_translation(he, ihc, stain)

"""Generate page: variations of a real tile with the embedding-conditioned diffusion model,
and rare-class nuclei patches with the mask-conditioned one.

The tile is embedded by the encoder its checkpoint was trained with (``encoder.json``),
on the model's token grid; the pipeline then draws ``n`` new tiles conditioned on those
embeddings (seeds ``seed .. seed+n-1``), exactly as ``histostudio generate embedding
--from TILE`` does. Checkpoints are the ``EmbeddingToImagePipeline`` folders under
``studio.info.checkpoints_dir()`` (``$HISTOSTUDIO_CHECKPOINTS``); the shipped one is
``embedding-ldm``. Without one, the page says how to train it and shows no controls.

Rare-class patches run ``histostudio generate rare``'s job (``MaskToImagePipeline``
folders, shipped as ``mask-ldm``) into a temporary folder and offer the written dataset
(PanNuke layout, provenance, preview) as a ZIP.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import streamlit as st

from studio.app.common import Picked, pick_image, png_bytes, sample_crops, show_error, zip_bytes
from studio.app.published_models import render_published, runnable
from studio.errors import HistostudioError

PIPELINE_CLASS = "EmbeddingToImagePipeline"
SHIPPED = "embedding-ldm"
TRAIN_COMMAND = "python -m training.ldm --config training/recipes/ldm.yaml"
MASK_PIPELINE_CLASS = "MaskToImagePipeline"
MASK_SHIPPED = "mask-ldm"
MASK_TRAIN_COMMAND = "python -m training.controlnet --config training/recipes/controlnet.yaml"
SIZES = (128, 256)
DEFAULT_SOURCE = "hgsc_nest"


def pipeline_checkpoints(root: Path | None = None, cls: str = PIPELINE_CLASS, shipped: str = SHIPPED) -> list[Path]:
    """Pipeline folders of class ``cls`` under ``root``, the shipped one first."""
    from studio.info import checkpoints_dir, list_checkpoints

    found = []
    for info in list_checkpoints(root or checkpoints_dir()):
        try:
            index = json.loads((info.path / "model_index.json").read_text())
        except (OSError, ValueError):
            continue
        if index.get("_class_name") == cls:
            found.append(info.path)
    return sorted(found, key=lambda p: (p.name != shipped, p.name))


def embedding_checkpoints(root: Path | None = None) -> list[Path]:
    """Pipeline folders of the embedding-conditioned model under ``root``, shipped one first."""
    return pipeline_checkpoints(root)


def mask_checkpoints(root: Path | None = None) -> list[Path]:
    """Pipeline folders of the mask-conditioned model under ``root``, shipped one first."""
    return pipeline_checkpoints(root, MASK_PIPELINE_CLASS, MASK_SHIPPED)


def _stamp(folder: Path) -> float:
    """Changes when the checkpoint is replaced (cache key)."""
    index = folder / "model_index.json"
    return index.stat().st_mtime if index.exists() else 0.0


@st.cache_resource(max_entries=2, show_spinner="Loading the diffusion pipeline…")
def load_pipeline(folder: str, stamp: float):
    from pipelines.generation import GenerationSettings, load_generation_pipeline

    return load_generation_pipeline(GenerationSettings(checkpoint=folder, encoder="auto"))


@st.cache_resource(max_entries=2, show_spinner="Loading the encoder…")
def load_encoder(folder: str, stamp: float):
    from pipelines.generation import GenerationSettings, embedding_encoder_for

    return embedding_encoder_for(GenerationSettings(checkpoint=folder, encoder="auto"))


@st.cache_resource
def _pipeline_lock() -> threading.Lock:
    return threading.Lock()  # one sampling run at a time: the scheduler is stateful


def source_tile(picked: Picked, size: int) -> np.ndarray:
    """The tile the model sees: a sample's most tissue-rich native-resolution crop, or an
    upload centre-cropped and resized to ``size`` (as ``generate embedding --from`` does)."""
    from pipelines.generation import fit_to
    from studio.data.samples import SAMPLES

    if picked.name in SAMPLES and min(picked.image.shape[:2]) >= size:
        return sample_crops(picked.name, size, 1)[0].image
    return fit_to(np.ascontiguousarray(picked.image), size, size)


def run_variations(folder: Path, tile: np.ndarray, n: int, steps: int, guidance: float, seed: int,
                   progress=None) -> dict:
    """``n`` variations of ``tile``; returns images, names and the manifest (as the CLI writes)."""
    import torch

    from pipelines.generation import GenerationSettings, check_encoder, generate
    from studio.io import to_tensor

    settings = GenerationSettings(checkpoint=str(folder), encoder="auto", steps=steps, guidance=guidance, seed=seed)
    pipe = load_pipeline(str(folder), _stamp(folder))
    encoder = load_encoder(str(folder), _stamp(folder))
    check_encoder(pipe, encoder)
    size = tile.shape[0]
    grid = pipe.conditioner.grid_for(size, size)
    with torch.no_grad():
        tokens = encoder.embed(to_tensor(tile), grid=grid).repeat(n, 1, 1)
    start = time.perf_counter()
    with _pipeline_lock():
        images = generate(pipe, tokens, size, size, grid, settings, seed, progress, n * steps)
    names = [f"variation_{seed + i:04d}" for i in range(n)]
    manifest = {"command": "histostudio app: generate variations", "checkpoint": str(folder), "size": size,
                "grid": list(grid), "n": n, "seeds": [seed + i for i in range(n)],
                "seconds": round(time.perf_counter() - start, 2), "settings": asdict(settings),
                "encoder_identity": encoder.identity}
    return {"images": images, "names": names, "manifest": manifest, "source": tile}


def run_rare(folder: Path, classes: list[str], count: int, per_patch: int, size: int, steps: int, seed: int,
             labels: str = "hgsc_nest", min_agreement: float = 0.6, progress=None) -> dict:
    """``generate rare`` into a temporary folder; returns samples, provenance and the dataset as ZIP bytes."""
    from pipelines.rare_generation import RareRequest, generate_rare
    from studio.data.registry import open_dataset
    from studio.report import overlay_labels

    with tempfile.TemporaryDirectory(prefix="histostudio-rare-") as tmp:
        out = Path(tmp) / "rare"
        req = RareRequest(labels=labels, classes=",".join(classes), count=count, out=str(out), per_patch=per_patch,
                          size=size, checkpoint=str(folder), seed=seed, steps=steps, min_agreement=min_agreement)
        with _pipeline_lock():
            provenance = generate_rare(req, on_step=progress, log=lambda _: None)
        data = open_dataset(out)
        samples = [data.read(i) for i in range(len(data))]
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {"images": [s.image for s in samples], "overlays": [overlay_labels(s.image, s.inst, s.cls)
                                                               for s in samples],
            "names": [s.meta["name"] for s in samples], "provenance": provenance, "zip": zip_bytes(files)}


def results_zip(result: dict, source_name: str) -> bytes:
    files = {f"{name}.png": png_bytes(image) for name, image in zip(result["names"], result["images"], strict=True)}
    files["source.png"] = png_bytes(result["source"])
    files["manifest.json"] = (json.dumps({**result["manifest"], "source": source_name}, indent=2) + "\n").encode()
    return zip_bytes(files)


def no_checkpoint_message(root: Path) -> str:
    return (f"**No generation checkpoint yet.** Generation needs an embedding-conditioned diffusion checkpoint "
            f"(`{PIPELINE_CLASS}`) in `{root}`; the shipped one will be `{root / SHIPPED}`.\n\n"
            f"Train one with `{TRAIN_COMMAND}` (it uses the tile VAE and SSL encoder from "
            f"`training/recipes/vae.yaml` and `training/recipes/ssl_encoder.yaml`), then copy its `runs/ldm/final` "
            f"folder to `{root / SHIPPED}`, or point `HISTOSTUDIO_CHECKPOINTS` at a folder that holds one.")


def render() -> None:
    from studio.data.samples import HE_SAMPLES
    from studio.info import checkpoints_dir

    st.title("Generate")
    root = checkpoints_dir()
    folders = {f.name: f for f in embedding_checkpoints(root)} | runnable(("pixcell",))
    if not folders:
        st.info(no_checkpoint_message(root), icon=":material/info:")
    else:
        render_variations(folders, HE_SAMPLES)
    render_published(("pixcell", "pixcell-controlnet"), "generation")
    render_rare(root)


def rare_class_options(folder: Path) -> list[str]:
    """The classes a mask model can draw: its ``class_names`` (shipped models), else the
    PanNuke classes that the published cell ControlNet's masks are rendered from."""
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("class_names"):
        return str(index["class_names"]).split(",")
    from studio.data.samples import PANNUKE_CLASSES

    return [name for code, name in sorted(PANNUKE_CLASSES.items()) if code]


def render_rare(root: Path) -> None:
    """Rare-class nuclei patches (the mask-conditioned model), when a checkpoint exists."""
    st.subheader("Rare-class nuclei patches")
    folders = {f.name: f for f in mask_checkpoints(root)} | runnable(("pixcell-controlnet",))
    if not folders:
        st.caption(f"Needs a mask-conditioned checkpoint (`{MASK_PIPELINE_CLASS}`), shipped as "
                   f"`{root / MASK_SHIPPED}`; train one with `{MASK_TRAIN_COMMAND}`.")
        return
    st.caption("Real label maps of the shipped tile are edited to hold exactly the requested nuclei, the model draws "
               "H&E to them, and a filter drops patches whose pixels disagree with their mask. The labels are the "
               "conditioning maps: a ready-to-train PanNuke dataset.")
    left, right = st.columns([1, 2], gap="large")
    with left:
        chosen = st.selectbox("Checkpoint", list(folders), key="rare_checkpoint")
        folder = folders[chosen]
        options = rare_class_options(folder)
        classes = st.multiselect("Classes", options, default=[c for c in ("dead", "inflammatory") if c in options],
                                 key="rare_classes")
        a, b = st.columns(2)
        count = a.number_input("Patches", min_value=1, max_value=16, value=4, key="rare_count")
        per_patch = b.number_input("Per class per patch", min_value=1, max_value=12, value=3, key="rare_per_patch")
        size = a.selectbox("Patch size (px)", SIZES, index=0, key="rare_size")
        steps = b.number_input("Steps", min_value=1, max_value=100, value=20, key="rare_steps")
        seed = a.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="rare_seed")
        min_agreement = b.number_input("Quality filter", min_value=0.0, max_value=1.0, value=0.6, step=0.05,
                                       key="rare_min_agreement",
                                       help="Share of nuclei whose hematoxylin must stand out from their "
                                            "surroundings; patches below it are redrawn.")
        go = st.button("Generate patches", type="primary", key="rare_go", disabled=not classes,
                       icon=":material/auto_awesome:")
    with right:
        if go:
            bar = st.progress(0.0, text="Generating…")

            def progress(done: int, total: int) -> None:
                bar.progress(min(1.0, done / max(total, 1)), text=f"Accepted {done} of {total}")

            try:
                result = run_rare(folder, list(classes), int(count), int(per_patch), int(size), int(steps), int(seed),
                                  min_agreement=float(min_agreement), progress=progress)
            except HistostudioError as exc:
                bar.empty()
                show_error(exc)
                return
            bar.empty()
            st.session_state["rare_result"] = result
        result = st.session_state.get("rare_result")
        if result is None:
            st.caption("Press Generate patches.")
            return
        prov = result["provenance"]
        st.markdown(f"**{prov['accepted']} patch(es)** · nuclei {prov['written_counts']} · rejection rate "
                    f"{prov['rejection_rate']:.0%} · {prov['seconds']} s")
        st.image(result["images"], caption=result["names"], width=160)
        st.image(result["overlays"], caption=[f"{n} labels" for n in result["names"]], width=160)
        st.download_button("Download dataset (ZIP: PanNuke arrays, manifest, provenance)", result["zip"],
                           file_name="rare_patches.zip", mime="application/zip", key="rare_zip",
                           icon=":material/download:")


def render_variations(folders: dict[str, Path], samples) -> None:
    st.subheader("Variations of a tile")
    st.caption("The tile is embedded by the encoder the checkpoint was trained with; the diffusion model draws new "
               "tiles from those embeddings: the same kind of tissue, new instances of it.")
    left, right = st.columns([1, 2], gap="large")
    with left:
        chosen = st.selectbox("Checkpoint", list(folders), key="gen_checkpoint")
        folder = folders[chosen]
        size = st.selectbox("Tile size (px)", SIZES, index=len(SIZES) - 1, key="gen_size")
        picked = pick_image("Source tile", "gen_src", samples=samples, default_sample=DEFAULT_SOURCE)
        a, b = st.columns(2)
        n = a.number_input("Variations", min_value=1, max_value=8, value=4, key="gen_n")
        steps = b.number_input("Steps", min_value=1, max_value=100, value=20, key="gen_steps")
        guidance = a.number_input("Guidance", min_value=0.0, max_value=15.0, value=2.0, step=0.5, key="gen_guidance",
                                  help="Classifier-free guidance: higher follows the embeddings more closely.")
        seed = b.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="gen_seed",
                              help="Variation i uses seed + i; the same settings give the same images.")
        go = st.button("Generate", type="primary", key="gen_go", disabled=picked is None,
                       icon=":material/auto_awesome:")
    with right:
        if picked is None:
            st.info("Choose a sample or upload a tile.")
            return
        tile = source_tile(picked, int(size))
        if go:
            bar = st.progress(0.0, text="Sampling…")

            def progress(done: int, total: int) -> None:
                bar.progress(min(1.0, done / max(total, 1)), text=f"Sampling: step {done} of {total}")

            try:
                result = run_variations(folder, tile, int(n), int(steps), float(guidance), int(seed), progress)
            except HistostudioError as exc:
                bar.empty()
                show_error(exc)
                return
            bar.empty()
            result["source_name"] = picked.name
            st.session_state["gen_result"] = result
        result = st.session_state.get("gen_result")
        st.image(tile, caption=f"source tile: {picked.name}", width=200)
        if result is None:
            st.caption("Press Generate to draw variations.")
            return
        manifest = result["manifest"]
        st.markdown(f"**{len(result['images'])} variation(s)** of `{result['source_name']}` · "
                    f"{manifest['settings']['steps']} steps · guidance {manifest['settings']['guidance']} · "
                    f"{manifest['seconds']} s")
        st.image(list(result["images"]), caption=[f"seed {s}" for s in manifest["seeds"]], width=200)
        st.download_button("Download all (ZIP: PNGs + manifest)", results_zip(result, result["source_name"]),
                           file_name="variations.zip", mime="application/zip", key="gen_zip",
                           icon=":material/download:")

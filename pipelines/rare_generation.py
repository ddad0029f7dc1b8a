"""The job behind ``histostudio generate rare``: class-balancing synthetic nuclei datasets.

DiffMix's recipe with the studio's pieces: draw a base label map (real data or phantom
layouts, :class:`studio.layouts.LayoutSource`), edit it to exactly the requested number of
nuclei of each rare class (:class:`studio.layouts.LayoutEditor`), render pixels for it with
the mask-conditioned diffusion model (:class:`pipelines.mask_to_image.MaskToImagePipeline`),
keep the sample only if its pixels agree with its mask (:func:`mask_agreement`), and write
the accepted samples as a ready-to-train dataset whose labels *are* the conditioning maps.

Output folder (written all-or-nothing: staged beside the target, renamed when complete):
the dataset in the requested layout (PanNuke / CoNIC / folder; ``manifest.csv`` carries
each sample's seed, base map and edits), ``provenance.json`` (request, checkpoint,
shape statistics, requested vs written class counts, rejection rate) and ``preview.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from studio.errors import InputError, OutputError

MAX_COUNT = 100_000
Step = Callable[[int, int], None]


@dataclass
class RareRequest:
    """What ``generate rare`` was asked for (recorded verbatim in ``provenance.json``)."""

    labels: str
    classes: str
    count: int
    out: str
    format: str = "pannuke"
    per_patch: int = 4
    size: int = 256
    checkpoint: str = "checkpoints/mask-ldm"
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 2.0
    min_agreement: float = 0.6
    max_attempts: float = 3.0  # at most this many generated samples per requested one
    batch_size: int = 4
    tissue: str = "tumor"  # phantom preset when labels == "phantom"; "home": where the classes live
    split: str = "train"  # hgsc_nest band when labels == "hgsc_nest"
    overwrite: bool = False
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps
    reference: str | None = None  # PixCell ControlNet: H&E tile whose UNI-2h token the tiles take
    uni2h: str | None = None  # its UNI-2h folder (default: found in $HISTOSTUDIO_MODELS / beside)


def mask_agreement(image: np.ndarray, inst: np.ndarray, ring: int = 3, margin: float = 0.05) -> float:
    """Share of nuclei whose pixels look like nuclei: mean hematoxylin optical density
    inside the outline exceeds the mean of a ``ring``-pixel band around it by ``margin``.

    An empty mask scores 1.0 (nothing to disagree with). Cheap, needs no model, and catches
    the failure that matters: a labelled nucleus drawn as stroma or glass.
    """
    from skimage.segmentation import expand_labels

    from studio.color import hematoxylin_od
    from studio.io import to_tensor

    ids = np.unique(inst[inst > 0])
    if ids.size == 0:
        return 1.0
    h = hematoxylin_od(to_tensor(np.ascontiguousarray(image)))[0, 0].numpy().astype(np.float64)
    grown = expand_labels(inst, ring)
    band = np.where(inst > 0, 0, grown)
    inside = np.asarray(ndi.mean(h, inst, ids))
    with np.errstate(invalid="ignore", divide="ignore"):  # a nucleus with no free ring (packed): NaN, replaced below
        around = np.asarray(ndi.mean(h, band, ids))
    around = np.where(np.isnan(around), np.median(h), around)
    return float(np.mean(inside > around + margin))


def _check_options(req: RareRequest) -> None:
    """The checks that need no model: run before the checkpoint is loaded, so a bad
    ``--count`` is refused at once, not after seconds of loading."""
    from studio.data.registry import LAYOUTS

    if req.format not in LAYOUTS:
        raise InputError("--format", f"{req.format!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(req.count, bool) or int(req.count) != req.count or req.count < 1:
        raise InputError("--count", f"{req.count}; ask for at least 1 patch")
    if req.count > MAX_COUNT:
        raise InputError("--count", f"{req.count} patches is more than one run makes ({MAX_COUNT}); split it "
                                    "into several runs with different --seed values")
    if req.per_patch < 1:
        raise InputError("--per-patch", f"{req.per_patch}; each patch needs at least one nucleus of each class")
    if req.size < 32 or req.size % 8:
        raise InputError("--size", f"{req.size}; use a multiple of 8, at least 32")
    if req.steps < 1:
        raise InputError("--steps", f"{req.steps}; sample with at least 1 step")
    if not 0 <= req.min_agreement <= 1:
        raise InputError("--min-agreement", f"{req.min_agreement}; a share between 0 and 1")


def _check_request(req: RareRequest, classes: dict[int, str]) -> list[int]:
    from studio.layouts import parse_classes

    _check_options(req)
    codes = parse_classes(req.classes, classes)
    if req.format == "conic":
        from studio.data.conic import PANNUKE_TO_CONIC

        lost = [classes[c] for c in codes if c not in PANNUKE_TO_CONIC]
        if lost:
            raise InputError("--format", f"CoNIC has no class for {', '.join(lost)}; use pannuke or folder")
    out = Path(req.out)
    if out.exists() and not req.overwrite:
        raise OutputError(out, "already exists; pass --overwrite to replace it")
    return codes


def _room_check(stats, codes: list[int], per_patch: int, size: int, classes: dict[int, str]) -> None:
    """Refuse requests that cannot fit: rare nuclei would cover over half the patch."""
    import math

    need = sum(per_patch * math.exp(stats.shape(c).log_area_mean) for c in codes)
    if need > 0.5 * size * size:
        raise InputError("--per-patch", f"{per_patch} nuclei of each of {', '.join(classes[c] for c in codes)} "
                                        f"would cover {need / size / size:.0%} of a {size}x{size} patch; "
                                        "ask for fewer per patch or a larger --size")


def generate_rare(req: RareRequest, on_step: Step | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the request; returns the provenance dict (also written as ``provenance.json``)."""
    from studio.data.base import NucleiSample
    from studio.data.registry import open_dataset, write_dataset
    from studio.devices import autocast_context, enable_fast_attention, resolve_device
    from studio.io import atomic_write_text, to_uint8
    from studio.layouts import LayoutEditor, LayoutSource, home_tissue

    out = Path(req.out)
    _check_options(req)  # before loading anything
    device = resolve_device(req.device)  # a missing GPU is a one-line error before the model loads
    if out.exists() and not req.overwrite:
        raise OutputError(out, "already exists; pass --overwrite to replace it")
    if not Path(req.checkpoint).exists():
        from studio.errors import WeightsError

        raise WeightsError(req.checkpoint, "no mask-conditioned checkpoint here; train one with python -m "
                                           "training.controlnet --config training/recipes/controlnet.yaml "
                                           "(it needs checkpoints/embedding-ldm as its base) or pass --checkpoint")
    pipe, backend = _load_mask_pipeline(req, device)
    enable_fast_attention(pipe, device)  # xformers when installed on CUDA, else torch SDPA
    classes = pipe.classes
    codes = _check_request(req, classes)
    tissue = home_tissue([classes[c] for c in codes]) if req.tissue == "home" else req.tissue
    source = LayoutSource(req.labels, req.size, classes, split=req.split, tissue=tissue)
    stats = source.stats()
    _room_check(stats, codes, req.per_patch, req.size, classes)
    editor = LayoutEditor(stats)
    targets = {c: req.per_patch for c in codes}
    rng = np.random.default_rng(req.seed)
    budget = max(req.count, int(np.ceil(req.count * req.max_attempts)))
    accepted: list[NucleiSample] = []
    scores_all: list[float] = []
    generated = 0
    t0 = time.perf_counter()
    while len(accepted) < req.count and generated < budget:
        n = min(req.batch_size, budget - generated, req.count - len(accepted))
        layouts = []
        for _ in range(n):
            for _try in range(50):
                lay = editor.exact_counts(source.draw(rng), targets, rng)
                if lay is not None:
                    break
            else:
                raise InputError("--per-patch", f"could not fit {req.per_patch} nuclei of each requested class "
                                                f"into {req.size}x{req.size} patches of {req.labels} in 50 tries")
            layouts.append(lay)
        seeds = [req.seed * 1_000_003 + generated + i for i in range(n)]
        with autocast_context(device):  # bf16/fp16 on CUDA, a no-op (exact fp32) on the CPU
            images = pipe([(lay.inst, lay.cls) for lay in layouts], num_inference_steps=req.steps,
                          guidance_scale=req.guidance_scale,
                          generator=[torch.Generator().manual_seed(s) for s in seeds],
                          output_type="pt", progress=False).images.float()
        for lay, image, seed in zip(layouts, to_uint8(images), seeds, strict=True):
            score = mask_agreement(image, lay.inst)
            scores_all.append(score)
            if score >= req.min_agreement and len(accepted) < req.count:
                accepted.append(NucleiSample(image, lay.inst, lay.cls, {
                    "name": f"rare_{len(accepted):05d}", "source": "synthetic", "parent": lay.source,
                    "seed": seed, "edits": "; ".join(lay.edits), "agreement": round(score, 3),
                    "tissue": "synthetic"}))
        generated += n
        if on_step is not None:
            on_step(len(accepted), req.count)
    rejected = generated - len(accepted)
    if len(accepted) < req.count:
        raise OutputError(out, f"only {len(accepted)} of {req.count} samples passed the mask-agreement filter "
                               f"(>= {req.min_agreement}) within {generated} tries; nothing was written. Lower "
                               "--min-agreement, raise --max-attempts, or use a better checkpoint")

    requested = {classes[c]: req.count * req.per_patch for c in codes}
    in_memory = _class_counts(accepted)
    made = {classes[c]: in_memory.get(c, 0) for c in codes}
    if made != requested:  # cannot happen unless the editor is broken: refuse rather than write wrong labels
        raise OutputError(out, f"class counts {made} differ from the request {requested}; nothing was written")
    expected = _class_counts(accepted, conic=req.format == "conic")
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.staging")
    try:
        write_dataset(staging, accepted, req.format)
        reread = open_dataset(staging, req.format)
        written = _class_counts([reread.read(i) for i in range(len(reread))])
        if written != expected or len(reread) != req.count:
            raise OutputError(out, f"the written dataset reads back with class counts {written}, expected "
                                   f"{expected}; nothing was written")
        provenance = {
            "request": asdict(req), "device": device, "checkpoint": str(Path(req.checkpoint).resolve()),
            "backend": backend,
            "checkpoint_digest": pipeline_digest(req.checkpoint),
            **({"phantom_tissue": tissue} if req.labels == "phantom" else {}),
            "classes": {str(k): v for k, v in classes.items()}, "shape_statistics": stats.to_dict(),
            "requested_counts": requested, "written_counts": made,
            "written_counts_by_code": {str(k): v for k, v in sorted(written.items())},
            "generated": generated, "accepted": len(accepted), "rejected": rejected,
            "rejection_rate": round(rejected / generated, 4),
            "agreement": {"min": round(float(np.min(scores_all)), 3), "median": round(float(np.median(scores_all)), 3)},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        atomic_write_text(staging / "provenance.json", json.dumps(provenance, indent=2) + "\n")
        _preview(accepted[:8], staging / "preview.png")
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"generated {generated}, accepted {len(accepted)}, rejected {rejected} "
        f"({provenance['rejection_rate']:.0%}) by the mask-agreement filter")
    return provenance


def _load_mask_pipeline(req: RareRequest, device: str) -> tuple[Any, dict[str, Any]]:
    """The mask-conditioned generator of ``req.checkpoint`` and what it is (for provenance):
    a published PixCell ControlNet folder (``model_index.json`` lists a ``controlnet``) runs
    :class:`~pipelines.pixcell_controlnet.PixCellControlNetPipeline`, anything else the
    studio's :class:`~pipelines.mask_to_image.MaskToImagePipeline`."""
    from pipelines.mask_to_image import MaskToImagePipeline
    from pipelines.pixcell_controlnet import PixCellControlNetPipeline, is_controlnet_folder, reference_tokens

    if not is_controlnet_folder(req.checkpoint):
        if req.reference is not None:
            raise InputError("--reference", "a reference tile is for the PixCell ControlNet (--checkpoint "
                                            "PixCell-256-Cell-ControlNet); the studio's mask model takes none")
        return MaskToImagePipeline.from_pretrained(req.checkpoint).to(device), {"kind": "mask-to-image"}
    pipe = PixCellControlNetPipeline.from_pretrained(req.checkpoint).to(device)
    if req.reference is not None:
        pipe.set_reference(reference_tokens(req.reference, req.checkpoint, req.uni2h, device=device))
        uni = {"uni_token": "reference", "reference": str(Path(req.reference).resolve())}
    else:
        uni = {"uni_token": "learned null embedding (no --reference; guidance has no effect)"}
    return pipe, {"kind": "pixcell-controlnet", "mask_rendering": "binary nuclei mask as RGB, white on black",
                  **uni}


def pipeline_digest(folder: str | Path) -> dict[str, str]:
    """Component -> weights digest of a pipeline folder (symlinked components resolved): what
    the samples were drawn with, so a cached dataset can tell it came from other weights."""
    from pipelines.encoders import weights_digest

    folder = Path(folder)
    return {sub.name: weights_digest(sub.resolve()) for sub in sorted(folder.iterdir())
            if sub.is_dir() and any(sub.resolve().glob("*.safetensors"))}


def _class_counts(samples, conic: bool = False) -> dict[int, int]:
    """Nuclei per class code over samples (PanNuke codes mapped to CoNIC ones if ``conic``)."""
    from studio.data.conic import PANNUKE_TO_CONIC

    totals: dict[int, int] = {}
    for s in samples:
        fg = s.inst > 0
        ids, first = np.unique(s.inst[fg], return_index=True)
        for code in s.cls[fg][first].tolist():
            code = PANNUKE_TO_CONIC[code] if conic else code
            totals[code] = totals.get(code, 0) + 1
    return totals


def _preview(samples, path: Path) -> None:
    from studio.report import contact_sheet, overlay_labels, save_png

    save_png(contact_sheet([("generated", [(s.meta["name"], s.image) for s in samples]),
                            ("conditioning labels", [(s.meta["name"], overlay_labels(s.image, s.inst, s.cls))
                                                     for s in samples])], cell=128), path)

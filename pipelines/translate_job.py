"""The transform behind ``histostudio translate``, built from a spec a Dask worker can load.

``translate`` runs through the one slide-job runner (:func:`studio.jobs.run_job`) with a
:class:`~pipelines.virtual_ihc.VirtualIHCTransform` that skips blank tiles (glass, black,
featureless: :func:`studio.slides.blank_tiles`; they are copied through). What travels to a worker is
:func:`translate_spec` -- the stain, the checkpoint folder (absolute) and the sampling
options -- never the weights; each worker process builds the transform once with
:func:`create_translate_transform` (cached by :func:`studio.jobs.load_transform`).
``--model pixcell`` builds :class:`~pipelines.pixcell_staining.PixCellStainingTransform` instead
(PixCell-1024 + the ``pixcell-virtual-staining`` LoRA and flow MLP, found from the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.errors import InputError


def checkpoint_folder(stain: str, checkpoint: str | Path | None) -> Path:
    """The pipeline folder to use: ``checkpoint``, else the shipped ``virtual-ihc-<stain>``."""
    from pipelines.virtual_ihc import CHECKPOINT_PREFIX, virtual_ihc_checkpoints
    from studio.info import checkpoints_dir

    if checkpoint:
        return Path(checkpoint).absolute()
    found = virtual_ihc_checkpoints(checkpoints_dir())
    return Path(found.get(stain, checkpoints_dir() / f"{CHECKPOINT_PREFIX}{stain}")).absolute()


def pixcell_staining_checkpoint(checkpoint: str | Path | None) -> Path:
    """``--checkpoint`` for ``--model pixcell``, else the staining release found in ``$HISTOSTUDIO_MODELS``."""
    from studio.published import find_published, models_dir

    if checkpoint:
        path = Path(checkpoint).absolute()
        if not path.exists():
            raise InputError("--checkpoint", f"{path}: no such file or folder (download Hugging Face "
                                             "StonyBrook-CVLab/pixcell-virtual-staining)")
        return path
    for found in find_published(models_dir()):
        if found.kind == "pixcell-staining":
            return found.path.absolute()
    raise InputError("--checkpoint", "--model pixcell needs the staining release: download Hugging Face "
                                     "StonyBrook-CVLab/pixcell-virtual-staining and pass --checkpoint FOLDER "
                                     "(or put it in $HISTOSTUDIO_MODELS)")


def create_translate_transform(stain: str, checkpoint: str, model: str = "fast", steps: int = 6, seed: int = 0,
                               halo: int = 32, device: str | None = "cpu") -> Any:
    """Load the virtual IHC pipeline of ``checkpoint`` and wrap it as the slide job's tile transform."""
    from pipelines.segment_job import resolve_device
    from pipelines.virtual_ihc import VirtualIHCPipeline, VirtualIHCTransform
    from studio.errors import WeightsError

    if model == "pixcell":  # PixCell-1024 + the release's LoRA and flow MLP (pipelines/pixcell_staining.py)
        from pipelines.pixcell_staining import create_pixcell_staining_transform

        return create_pixcell_staining_transform(stain, checkpoint, steps=steps, seed=seed, halo=halo, device=device)
    folder = Path(checkpoint)
    if not (folder / "model_index.json").is_file():
        raise WeightsError(folder, f"no virtual IHC pipeline here; train one with python -m training.virtual_ihc "
                                   f"--config training/recipes/virtual_ihc_{stain}.yaml or pass --checkpoint")
    from studio.devices import enable_fast_attention

    resolved = resolve_device(device)
    pipe = VirtualIHCPipeline.from_pretrained(folder).to(resolved)
    enable_fast_attention(pipe, resolved)  # xformers on CUDA when installed; nothing changes on the CPU
    if pipe.config.stain != stain:
        raise InputError(folder, f"is a {pipe.config.stain} model, not {stain}")
    transform = VirtualIHCTransform(pipe, model, steps=steps, seed=seed, halo=halo, checkpoint=str(folder))
    # Glass, black and featureless tiles are copied through unchanged, as glass comes out of the
    # model: nothing there to stain, and a model fed black invents a coloured border and DAB.
    transform.skip_blank = True
    return transform


#: Sampling steps when none are given: the shipped few-step model's, and the PixCell release's.
DEFAULT_STEPS = {"fast": 6, "diffusion": 6, "pixcell": 20}


def translate_spec(stain: str, checkpoint: str | Path | None = None, *, model: str = "fast",
                   steps: int | None = None, seed: int = 0, halo: int = 32, device: str | None = "cpu") -> Any:
    """The :class:`studio.jobs.TransformSpec` of a translate run (stain checked first);
    ``steps=None`` takes the model's default (:data:`DEFAULT_STEPS`)."""
    from studio.data.ihc_pairs import check_stain
    from studio.jobs import TransformSpec

    stain = check_stain(stain)
    if model not in ("fast", "diffusion", "pixcell"):
        raise InputError("--model", f"{model!r}; use fast, diffusion or pixcell")
    steps = DEFAULT_STEPS[model] if steps is None else int(steps)
    if steps < 1:
        raise InputError("--steps", f"{steps}; must be at least 1")
    if model == "pixcell":
        from pipelines.pixcell_staining import check_release

        folder = pixcell_staining_checkpoint(checkpoint)
        check_release(folder, stain)  # a missing LoRA, flow MLP, PixCell-1024, VAE or UNI-2h: refused up front
    else:
        folder = checkpoint_folder(stain, checkpoint)
    return TransformSpec("pipelines.translate_job:create_translate_transform",
                         {"stain": stain, "checkpoint": str(folder), "model": model,
                          "steps": steps, "seed": seed, "halo": halo, "device": device})

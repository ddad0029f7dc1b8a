"""The transform behind ``histostudio translate``, built from a spec a Dask worker can load.

``translate`` runs through the one slide-job runner (:func:`studio.jobs.run_job`) with a
:class:`~pipelines.virtual_ihc.VirtualIHCTransform` that skips blank tiles (glass, black,
featureless: :func:`studio.slides.blank_tiles`; they are copied through). What travels to a worker is
:func:`translate_spec` -- the stain, the checkpoint folder (absolute) and the sampling
options -- never the weights; each worker process builds the transform once with
:func:`create_translate_transform` (cached by :func:`studio.jobs.load_transform`).
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


def create_translate_transform(stain: str, checkpoint: str, model: str = "fast", steps: int = 6, seed: int = 0,
                               halo: int = 32, device: str | None = "cpu") -> Any:
    """Load the virtual IHC pipeline of ``checkpoint`` and wrap it as the slide job's tile transform."""
    from pipelines.segment_job import resolve_device
    from pipelines.virtual_ihc import VirtualIHCPipeline, VirtualIHCTransform
    from studio.errors import WeightsError

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


def translate_spec(stain: str, checkpoint: str | Path | None = None, *, model: str = "fast", steps: int = 6,
                   seed: int = 0, halo: int = 32, device: str | None = "cpu") -> Any:
    """The :class:`studio.jobs.TransformSpec` of a translate run (stain checked first)."""
    from studio.data.ihc_pairs import check_stain
    from studio.jobs import TransformSpec

    stain = check_stain(stain)
    if model not in ("fast", "diffusion"):
        raise InputError("--model", f"{model!r}; use fast or diffusion")
    if steps < 1:
        raise InputError("--steps", f"{steps}; must be at least 1")
    return TransformSpec("pipelines.translate_job:create_translate_transform",
                         {"stain": stain, "checkpoint": str(checkpoint_folder(stain, checkpoint)), "model": model,
                          "steps": steps, "seed": seed, "halo": halo, "device": device})

"""Loading pipelines and models from local folders, with errors that say what is wrong.

``DiffusionPipeline.from_pretrained`` on a folder with a problem falls through to hub
lookups and generic messages. Every studio pipeline validates the folder first: it must
be a local diffusers layout (``model_index.json`` + one folder per component, each with
``config.json``), weights must be ``.safetensors`` (pickled ``.bin``/``.ckpt`` files are
never loaded), and nothing is fetched from the network.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from studio.errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NO_WEIGHTS = ("scheduler", "tokenizer", "feature_extractor", "image_processor")


def check_pipeline_folder(folder: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate a local pipeline folder; return its ``model_index.json``.

    Raises:
        WeightsError: missing folder or index, a missing component, a component without
            config or safetensors weights, or pickled weights only.
    """
    folder = Path(folder)
    if not folder.exists():
        raise WeightsError(folder, "no such pipeline folder (pipelines load from local folders only)")
    if not folder.is_dir():
        raise WeightsError(folder, "is a file; a pipeline is a folder with model_index.json")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(folder, "has no model_index.json (not a diffusers pipeline folder)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(index_path, f"is not valid JSON ({exc})") from exc
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and all(x is None or isinstance(x, str) for x in v)]
    for name in required:
        if name not in components:
            raise WeightsError(index_path, f"lists no '{name}' component (has {', '.join(components)})")
    for name in components:
        sub = folder / name
        if index[name][0] is None:  # an optional component saved as None
            continue
        if not sub.is_dir():
            raise WeightsError(sub, f"missing: model_index.json lists component '{name}'")
        configs = list(sub.glob("*config.json"))
        if not configs:
            raise WeightsError(sub, "has no config.json")
        if name in NO_WEIGHTS:
            continue
        if not list(sub.glob("*.safetensors")):
            pickled = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise WeightsError(sub, f"holds only pickled weights ({', '.join(pickled)}); the studio loads "
                                        f".safetensors only (convert them with safetensors.torch.save_file)")
            raise WeightsError(sub, "has no .safetensors weights")
    return index


@functools.lru_cache(maxsize=1)
def _dtype_keyword() -> str:
    """``dtype`` on diffusers that have it (torch_dtype is deprecated there), else ``torch_dtype``."""
    from diffusers import DiffusionPipeline

    return "dtype" if 'kwargs.pop("dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained) else "torch_dtype"


def dtype_kwargs(dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """The from_pretrained keyword that sets the loaded weights' dtype.

    Shipped checkpoints store fp16 weights (half the size in git); loading defaults to
    float32, what CPUs compute in, so callers get full-precision models unless they ask.
    """
    return {} if dtype is None else {_dtype_keyword(): dtype}


def save_fp16(model_or_pipeline: Any, folder: str | Path) -> Path:
    """``save_pretrained`` with fp16 weights (for shipping), leaving the object unchanged."""
    import copy

    half = copy.deepcopy(model_or_pipeline).to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# Latent x0 predictions are clipped here (the tile VAE's latents: 99.9 % within +-3.7): the
# cosine schedule ends at alpha_bar(999) ~ 2e-9, where an epsilon-prediction model's x0 =
# (x - sqrt(1 - a) eps) / sqrt(a) amplifies any error ~2e4-fold; unclipped samplers
# (DPM-Solver++, Euler) turn that into saturated colour blobs, DDIM with clipping does not.
LATENT_CLIP = 3.0


def latent_ddim(config: Any = None, **overrides: Any):
    """A DDIM scheduler safe for epsilon-prediction latent models on the cosine schedule:
    x0 clipped to +-:data:`LATENT_CLIP`, 'leading' timesteps (the first step is not t=999).
    A zero-terminal-SNR config (``rescale_betas_zero_snr``, v-prediction) gets plain DDIM on
    'trailing' timesteps instead."""
    from diffusers import DDIMScheduler

    kwargs = {"clip_sample": True, "clip_sample_range": LATENT_CLIP, "timestep_spacing": "leading",
              "steps_offset": 1, "set_alpha_to_one": False}
    zero_snr = (config or {}).get("rescale_betas_zero_snr", False) or overrides.get("rescale_betas_zero_snr", False)
    if zero_snr:
        # zero terminal SNR (Lin et al. 2024) with v-prediction: the first step starts at
        # pure noise (t = 999, 'trailing') and x0 needs no clipping -- no workaround
        kwargs = {"clip_sample": False, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": False}
    kwargs.update(overrides)
    if config is not None:
        return DDIMScheduler.from_config(config, **kwargs)
    return DDIMScheduler(**kwargs)


def loading_failure(exc: BaseException) -> str:
    """One line for a failed load. A config that disagrees with its weights makes torch
    list every mismatched tensor and diffusers append advice about
    ``ignore_mismatched_sizes`` (17 lines for one checkpoint); the first mismatch says it."""
    import re

    text = str(exc)
    found = re.search(r"size mismatch for ([^:\s]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) "
                      r"from checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", text)
    if found:
        name, stored, expected = found.groups()
        more = text.count("size mismatch for") - 1
        return (f"config.json disagrees with the weights: {name} is {stored[11:-1]} in the file, "
                f"{expected[11:-1]} in the config" + (f" (and {more} more)" if more > 0 else ""))
    found = re.search(r"because (\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got torch\.Size\(\[([^\]]*)\]\)",
                      text)  # diffusers' own check, followed by its ignore_mismatched_sizes advice
    if found:
        name, expected, stored = found.groups()
        return f"config.json disagrees with the weights: {name} is [{stored}] in the file, [{expected}] in the config"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"


class LocalPipeline:
    """Mixin for the studio's diffusers pipelines: ``from_pretrained`` loads a validated
    *local* folder only (no hub lookup), safetensors only, float32 unless a dtype is given
    (shipped weights are fp16 on disk), turns any loading failure into a
    :class:`~studio.errors.WeightsError` naming the folder, then runs the pipeline's own
    ``check_compatible()`` when it has one. List it before ``DiffusionPipeline``."""

    required_components: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from studio.errors import HistostudioError, WeightsError

        check_pipeline_folder(pretrained_model_name_or_path, required=cls.required_components)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs.update(dtype_kwargs(torch.float32))
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except HistostudioError:
            raise
        except Exception as exc:
            raise WeightsError(pretrained_model_name_or_path,
                               f"cannot load {cls.__name__} ({loading_failure(exc)})") from exc
        check = getattr(pipe, "check_compatible", None)
        if callable(check):
            check()
        return pipe

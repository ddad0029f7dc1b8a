"""``histostudio convert``: a third-party ``.pth`` / ``.bin`` checkpoint -> ``.safetensors``, safely.

Published pathology models ship torch pickles (UNI-2h's ``pytorch_model.bin``, PixCell's
virtual-staining ``.pth`` files). Unpickling runs arbitrary code, so the studio loads
weights only from safetensors, and this converter is the one place a pickle is opened:

* once, with ``torch.load(weights_only=True)``, torch's restricted unpickler, which refuses
  any object that is not a tensor, a container or a primitive;
* the result must be a plain dict of tensors, optionally nested under ``state_dict`` or
  ``model`` (training checkpoints); anything else is refused with one line naming the
  first offending key;
* the output is written atomically: a refusal or a failure leaves nothing behind, not even
  an empty folder.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import InputError, OutputError, WeightsError

NESTED_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass
class Converted:
    """What a conversion wrote: the file, its tensor count and size, and top-level entries skipped."""

    path: Path
    tensors: int
    bytes: int
    nested_under: str | None = None
    ignored: list[str] = field(default_factory=list)


def _describe(value: Any) -> str:
    return type(value).__name__


def _load_failure(exc: Exception) -> str:
    """torch's multi-paragraph refusal -> the one fact a user needs (which object was refused)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a Python object ({found.group(1)}), not only tensors"
    if "Weights only load failed" in text:
        return "it holds pickle instructions beyond tensors and containers (code or objects)"
    return f"not a torch checkpoint ({type(exc).__name__})"


def tensor_dict(obj: Any, source: Path) -> tuple[dict[str, Any], str | None, list[str]]:
    """The flat ``{name: tensor}`` inside a loaded checkpoint, or a :class:`WeightsError`.

    Returns the dict, the key it was nested under (or None) and the top-level keys skipped.
    """
    import torch

    if not isinstance(obj, dict):
        raise WeightsError(source, f"holds a {_describe(obj)}, not a dict of tensors; nothing was written")
    nested, ignored = None, []
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                nested = key
                ignored = sorted(str(k) for k in obj if k != key)
                obj = obj[key]
                break
    if not obj:
        raise WeightsError(source, "holds an empty dict (no tensors); nothing was written")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(source, f"has a non-text key {key!r} ({_describe(key)}); nothing was written")
        where = f"{nested}.{key}" if nested else key
        if not isinstance(value, torch.Tensor):
            raise WeightsError(source, f"entry '{where}' is a {_describe(value)}, not a tensor (only plain tensor "
                                       "dicts are converted); nothing was written")
        if value.layout != torch.strided:
            raise WeightsError(source, f"entry '{where}' is a {value.layout} tensor; only dense tensors convert")
    return obj, nested, ignored


def read_tensor_file(path: str | Path, download_hint: str = "") -> dict[str, Any]:
    """The ``{name: tensor}`` of a published weights file, for loaders that accept the
    release's own format: a ``.safetensors`` file as it is, any other file only through
    ``torch.load(weights_only=True)`` and :func:`tensor_dict` (plain tensor dicts, possibly
    nested under ``state_dict`` / ``model_state_dict`` / ``model``). Every refusal is one
    :class:`WeightsError` line; ``download_hint`` (e.g. "from Hugging Face R-J/StainFuser")
    ends the message for an unreadable safetensors file."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            again = f"download it again {download_hint}".rstrip()
            raise WeightsError(path, f"cannot be read as safetensors ({type(exc).__name__}: truncated or another "
                                     f"format); {again}") from exc
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(path, f"refused: {_load_failure(exc)}; only plain tensor dicts are read (or convert it: "
                                 f"histostudio convert {path} --out {path.with_suffix('.safetensors')})") from exc
    return tensor_dict(loaded, path)[0]


def convert_checkpoint(source: str | Path, out: str | Path, overwrite: bool = False) -> Converted:
    """Read ``source`` once with ``torch.load(weights_only=True)``; write its tensors to ``out``.

    Raises:
        InputError: missing source, wrong output suffix, output exists (without ``overwrite``).
        WeightsError: the file is not a tensors-only pickle, or not a plain tensor dict.
        OutputError: the output cannot be written (nothing partial is left).
    """
    import torch
    from safetensors.torch import save_file

    from studio.io import atomic_path

    source, out = Path(source), Path(out)
    if not source.is_file():
        raise InputError(source, "no such checkpoint file")
    if out.suffix != ".safetensors":
        raise InputError(out, "the output must end in .safetensors")
    if out.resolve() == source.resolve():
        raise InputError(out, "is the input file; choose another output path")
    if out.exists() and not overwrite:
        raise InputError(out, "exists; pass --overwrite to replace it")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(source, f"refused: {_load_failure(exc)}; nothing was written") from exc
    tensors, nested, ignored = tensor_dict(loaded, source)
    seen: set[int] = set()
    ready = {}
    for key, value in tensors.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen:  # tied weights share storage; safetensors stores each tensor on its own
            value = value.clone()
        seen.add(ptr)
        ready[key] = value
    metadata = {"format": "pt", "converted_from": source.name}
    try:
        with atomic_path(out) as tmp:
            save_file(ready, str(tmp), metadata=metadata)
    except OutputError:
        raise
    except Exception as exc:
        raise WeightsError(source, f"cannot be written as safetensors ({exc}); nothing was written") from exc
    return Converted(out, len(ready), out.stat().st_size, nested, ignored)

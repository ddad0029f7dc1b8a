"""One answer to "which torch device?" for every command that runs a model.

Every model-running command (normalize --method stainfuser, translate, segment, generate,
embed, experiment) takes ``--device`` with the default ``auto``, so a GPU user gets the GPU
without knowing to ask, and a laptop user gets the CPU without an error. The resolution
lives here, once, so that the commands, the slide-job workers (which resolve on the machine
they run on) and the benches agree on what ``auto`` means.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from studio.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: resolving a device name must not pay for it
    import torch

AUTO = "auto"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device (kept separate so tests can monkeypatch torch)."""
    import torch

    return bool(torch.cuda.is_available())


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | None, option: str = "--device") -> str:
    """Turn a ``--device`` value into a torch device string.

    Args:
        spec: ``auto`` (or ``None``), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; case and
            surrounding spaces are ignored.
        option: the option name the error message names.

    Returns:
        ``"cuda"`` for ``auto`` when torch sees CUDA, else ``"cpu"``; an explicit device as given
        (lower-cased) once it is known to exist.

    Raises:
        InputError: one line naming the option and the fix, for an unknown spelling, a CUDA
            device on a machine without CUDA, a CUDA index past the last device, or MPS
            where it is not available.
    """
    name = (spec if spec is not None else AUTO).strip().lower()
    if not _SPEC.match(name):
        raise InputError(option, f"{spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if name == AUTO:
        return "cuda" if cuda_available() else "cpu"
    if name.startswith("cuda"):
        if not cuda_available():
            raise InputError(option, f"{name}: CUDA is not available on this machine (torch sees no GPU); "
                                     "use --device auto or --device cpu")
        if ":" in name:
            import torch

            index, count = int(name.split(":", 1)[1]), torch.cuda.device_count()
            if index >= count:
                raise InputError(option, f"{name}: this machine has {count} CUDA device(s), numbered 0 to "
                                         f"{count - 1}; use --device cuda:0 or --device auto")
    if name == "mps" and not _mps_available():
        raise InputError(option, "mps: Apple MPS is not available on this machine; use --device auto or --device cpu")
    return name


# --------------------------------------------------------------------------- CUDA inference policy
# One policy for every pipeline's inference call, so the stainfuser, virtual IHC, segmenter and
# generators agree on what "fast on a GPU" means, and the CPU path stays exactly fp32 (autocast
# is never entered there, so CPU outputs are bit-identical to a build without this policy).
AUTOCAST_ENV = "HISTOSTUDIO_AUTOCAST"  # set to 0 to run CUDA in fp32 (e.g. to compare with the CPU bit for bit)


def _device_type(device) -> str:
    import torch

    return torch.device(device).type if device is not None else "cpu"


def inference_dtype(device) -> torch.dtype:
    """The precision model inference runs in on ``device``.

    bf16 on a CUDA device that supports it (Ampere and later: fp32's range, so no overflow in
    softmax or GroupNorm), fp16 on older CUDA cards, float32 on the CPU and MPS (where reduced
    precision is slower or changes results). ``HISTOSTUDIO_AUTOCAST=0`` keeps CUDA in float32.
    """
    import os

    import torch

    if _device_type(device) != "cuda" or os.environ.get(AUTOCAST_ENV, "1").strip().lower() in ("0", "false", "no"):
        return torch.float32
    index = torch.device(device).index
    major, _ = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    return torch.bfloat16 if major >= 8 else torch.float16  # bf16 runs natively from compute capability 8.0


def autocast_context(device, enabled: bool = True):
    """A context for a model's forward passes: ``torch.autocast`` in :func:`inference_dtype`
    on CUDA, a no-op elsewhere (or when ``enabled`` is False, e.g. for weights already loaded
    in half precision).

    Autocast runs matmuls and convolutions in reduced precision and keeps reductions
    (softmax, norms) in float32. Callers cast what leaves the context back with ``.float()``
    and keep colour maths (LAB, optical density, blending) outside it.
    """
    import contextlib

    import torch

    dtype = inference_dtype(device) if enabled else torch.float32
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def enable_fast_attention(model, device) -> str:
    """Pick the attention kernel of a diffusers pipeline or model on ``device``; returns its name.

    On CUDA, xformers' memory-efficient attention when the ``gpu`` extra is installed
    (``enable_xformers_memory_efficient_attention``); otherwise, and on the CPU, diffusers'
    default ``AttnProcessor2_0``, i.e. torch's ``scaled_dot_product_attention`` (fused flash /
    memory-efficient kernels on CUDA). Nothing is changed off CUDA.
    """
    import importlib.util

    if _device_type(device) != "cuda":
        return "sdpa"
    enable = getattr(model, "enable_xformers_memory_efficient_attention", None)
    if enable is not None and importlib.util.find_spec("xformers") is not None:
        try:
            enable()
            return "xformers"
        except Exception:  # an xformers build that does not match this torch/CUDA: SDPA is as good
            disable = getattr(model, "disable_xformers_memory_efficient_attention", None)
            if disable is not None:
                disable()
    return "sdpa"

"""One answer to "which torch device?" for every command that runs a model.

Every model-running command (normalize --method stainfuser, translate, segment, generate,
embed, experiment) takes ``--device`` with the default ``auto``, so a GPU user gets the GPU
without knowing to ask, and a laptop user gets the CPU without an error. The resolution
lives here, once, so that the commands, the slide-job workers (which resolve on the machine
they run on) and the benches agree on what ``auto`` means.
"""

from __future__ import annotations

import re

from studio.errors import InputError

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

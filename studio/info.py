"""What this installation can do: versions, compute device, checkpoints and sample data.

Used by ``histostudio info`` and by the Streamlit app's sidebar, so both report the same.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = (
    "torch", "diffusers", "accelerate", "kornia", "scikit-image", "numpy", "tifffile", "safetensors",
    "torchmetrics", "typer", "rich", "tiffslide", "openslide-python", "openslide-bin", "transformers",
    "dask", "distributed", "streamlit", "xformers", "timm", "torchstain",
)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def checkpoints_dir() -> Path:
    """Where shipped demo weights live: ``$HISTOSTUDIO_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("HISTOSTUDIO_CHECKPOINTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass
class DeviceReport:
    torch_version: str
    cuda: bool
    devices: list[str] = field(default_factory=list)
    mps: bool = False
    xformers: bool = False
    threads: int = 1


def device_report() -> DeviceReport:
    """Probe torch for CUDA/MPS and xformers without allocating on the GPU."""
    import torch

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    xformers = False
    if package_version("xformers"):
        try:
            import xformers.ops

            xformers = True
        except Exception:
            xformers = False
    return DeviceReport(torch.__version__, cuda, devices, mps, xformers, torch.get_num_threads())


@dataclass
class CheckpointInfo:
    name: str
    path: Path
    size_mb: float
    kind: str  # "pipeline" (model_index.json), "model" (config.json) or "weights"


def list_checkpoints(root: Path | None = None) -> list[CheckpointInfo]:
    """Every shipped checkpoint folder (diffusers layout) under ``root``."""
    root = root or checkpoints_dir()
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            continue
        kind = "pipeline" if (folder / "model_index.json").exists() else (
            "model" if (folder / "config.json").exists() else "weights")
        size = sum(f.stat().st_size for f in files) / 2**20
        found.append(CheckpointInfo(folder.name, folder, size, kind))
    return found


def published_models(models_folder: str | Path | None = None):
    """Published models (PixCell, UNI-2h, SD3.5 VAE) in ``models_folder`` or ``$HISTOSTUDIO_MODELS``.

    Returns the folder searched (None when neither is set) and what was found there.
    """
    from studio.published import find_published, models_dir

    root = models_dir(models_folder)
    return root, find_published(root)


def platform_summary() -> dict[str, str]:
    return {"python": platform.python_version(), "platform": platform.platform(terse=True)}

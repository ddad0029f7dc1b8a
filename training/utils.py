"""Small pieces every training script shares: YAML recipes into typed configs, finding
the checkpoint to resume, and an append-only metrics log."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from studio.errors import InputError

T = TypeVar("T")
R = TypeVar("R")


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """A dataclass config from a YAML recipe plus command-line overrides (None values skipped).

    Unknown keys are errors: a typo in a recipe must not be silently ignored.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such recipe file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(path, f"is not valid YAML ({exc})") from exc
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(fields)
    if unknown:
        raise InputError(path or "config", f"unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """``output_dir/checkpoints/checkpoint_N`` with the largest N (accelerate's naming)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return max(found)[1] if found else None


def resume_path(output_dir: str | Path, resume: str | None) -> Path | None:
    """``--resume latest`` -> the newest checkpoint (or None); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise InputError(path, "no such checkpoint folder")
    return path


class MetricsLog:
    """One JSON object per line in ``output_dir/metrics.jsonl`` (survives crashes, easy to plot)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def write(self, **values: Any) -> None:
        values.setdefault("time", round(time.time() - self.start, 1))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(values) + "\n")


def common_args(description: str, recipe: Path) -> argparse.ArgumentParser:
    """The options every training script takes (recipe values can be overridden)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=recipe, help="YAML recipe")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 beside other jobs)")
    return parser


EMA_FILE = "ema.safetensors"
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"


def save_ema(ema: Any, folder: Path) -> Path:
    """An ``EMAModel``'s state as safetensors: its shadow tensors, and its scalars (decay,
    step count, ...) as JSON metadata. Registered with ``register_for_checkpointing``, the
    EMA would be a pickle that accelerate reads back with ``weights_only=False``."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow_params.{i}": t.detach().contiguous().cpu() for i, t in enumerate(state["shadow_params"])}
    scalars = {k: v for k, v in state.items() if k != "shadow_params"}
    path = Path(folder) / EMA_FILE
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    return path


def load_ema(ema: Any, folder: Path) -> None:
    """Restore :func:`save_ema`'s file. A checkpoint written before it (accelerate's
    ``custom_checkpoint_0.pkl``) is read with ``torch.load(weights_only=True)``: tensors and
    numbers only, never objects."""
    import torch
    from safetensors import safe_open

    from studio.errors import WeightsError

    folder = Path(folder)
    if (folder / EMA_FILE).is_file():
        with safe_open(str(folder / EMA_FILE), framework="pt") as f:
            scalars = json.loads((f.metadata() or {}).get("scalars", "{}"))
            shadow = [f.get_tensor(f"shadow_params.{i}") for i in range(len(list(f.keys())))]
        ema.load_state_dict({**scalars, "shadow_params": shadow})
    elif (folder / LEGACY_EMA_FILE).is_file():
        import pickle

        try:
            state = torch.load(folder / LEGACY_EMA_FILE, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(folder / LEGACY_EMA_FILE, "holds more than tensors and numbers (refused: weights "
                                                         f"only); {str(exc).splitlines()[0]}") from exc
        ema.load_state_dict(state)
    else:
        raise WeightsError(folder, f"has no EMA state ({EMA_FILE}); resume from a checkpoint this recipe wrote")


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, keep: int,
                    extra: Callable[[Path], None] | None = None, ema: Any = None) -> Path:
    """Accelerator state (safetensors weights) in ``checkpoints/checkpoint_<step>``, the
    step number beside it, the EMA as safetensors (:func:`save_ema`), ``extra(path)`` for
    anything else; only the newest ``keep`` checkpoints are kept."""
    path = Path(output_dir) / "checkpoints" / f"checkpoint_{step}"
    accelerator.save_state(str(path), safe_serialization=True)  # every process takes part; the main one writes
    if getattr(accelerator, "is_main_process", True):
        if ema is not None:
            save_ema(ema, path)
        if extra is not None:
            extra(path)
        (path / "step.json").write_text(json.dumps({"step": step}))
        old = sorted((p for p in path.parent.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name)),
                     key=lambda p: int(p.name.split("_")[1]))
        for stale in old[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    if hasattr(accelerator, "wait_for_everyone"):
        accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Any, path: Path) -> int:
    """Restore accelerator state from ``path``; return the step it was saved at."""
    accelerator.load_state(str(path))
    return int(json.loads((path / "step.json").read_text())["step"])


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to
    ``floor`` at ``total`` (the schedule every recipe uses; a ``LambdaLR`` multiplier)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine_scheduler(optimizer: Any, warmup: int, total: int, floor: float = 0.1) -> Any:
    """``LambdaLR`` with :func:`warmup_cosine` (stepped once per optimizer step)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, floor))


def resume_training(accelerator: Any, output_dir: str | Path, resume: str | None,
                    ema: Any = None) -> tuple[int, Path | None]:
    """``--resume``: restore the accelerator state (and the EMA, :func:`load_ema`);
    ``(step to start at, checkpoint or None)``."""
    checkpoint = resume_path(output_dir, resume)
    if checkpoint is None:
        return 0, None
    start = load_checkpoint(accelerator, checkpoint)
    if ema is not None:
        load_ema(ema, checkpoint)
    accelerator.print(f"resumed from {checkpoint} at step {start}")
    return start, checkpoint


@contextlib.contextmanager
def ema_weights(ema: Any, model: Any, params: list[Any] | None = None) -> Iterator[Any]:
    """Validate with the EMA weights: swap them in (eval mode), swap the training weights
    back afterwards (train mode). ``ema=None`` only switches the mode. ``params``: the
    parameters the EMA tracks when it holds only the trained part of ``model`` (adapters,
    ControlNets); default every parameter of ``model``."""
    tracked = list(model.parameters()) if params is None else list(params)
    if ema is not None:
        ema.store(tracked)
        ema.copy_to(tracked)
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(tracked)



def map_across_processes(accelerator: Any, count: int, fn: Callable[[int], R], what: str = "items") -> list[R]:
    """``[fn(0), ..., fn(count - 1)]`` on every process, each process computing one contiguous share.

    Why: a frozen-model pre-encoding pass (UNI-2h tokens, VAE posteriors) done by every rank
    costs ``num_processes`` times the work for the same bank. accelerate's
    ``split_between_processes`` deals the indices and ``gather_object`` puts the results back
    in index order, so every rank holds the bank a single process would build. Results should
    be CPU objects: they travel pickled (``all_gather_object``).
    """
    indices = list(range(count))
    with accelerator.split_between_processes(indices) as mine:
        if accelerator.num_processes > 1:  # every rank says its share: the launcher interleaves them
            span = f"{mine[0]}-{mine[-1]}" if mine else "none"
            print(f"process {accelerator.process_index}/{accelerator.num_processes}: {what} {span} of {count}",
                  flush=True)
        local = [(i, fn(i)) for i in mine]
    if accelerator.num_processes == 1:
        return [value for _, value in local]
    from accelerate.utils import gather_object

    gathered = dict(gather_object(local))
    if sorted(gathered) != indices:
        raise RuntimeError(f"gathered {len(gathered)} of {count} items across {accelerator.num_processes} processes")
    return [gathered[i] for i in indices]

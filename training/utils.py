"""Small pieces every training script shares: YAML recipes into typed configs, finding
the checkpoint to resume, and an append-only metrics log."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, TypeVar

import yaml

from studio.errors import InputError

T = TypeVar("T")


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

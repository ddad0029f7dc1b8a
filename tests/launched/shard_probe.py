"""Run under ``accelerate launch``: map_across_processes over 7 items, each rank writes what it computed
and what it ended with to ``<out>/rank<r>.json`` (tests/test_map_across_processes.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from training.utils import map_across_processes

if __name__ == "__main__":
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    computed: list[int] = []

    def square(i: int) -> torch.Tensor:
        computed.append(i)
        return torch.full((2,), float(i * i))

    result = map_across_processes(accelerator, 7, square, what="probe items")
    (out / f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"computed": computed, "result": [r.tolist() for r in result]}))

"""Pre-encoding banks across processes (training.utils.map_across_processes): each rank computes a
disjoint contiguous share, every rank ends with the single-process result in index order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from factories_staining import write_staining_models_dir

from training.utils import map_across_processes

ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], port: int) -> subprocess.CompletedProcess:
    """Two CPU processes on gloo: accelerate's torchrun launcher (``--multi_gpu``) with
    ``ACCELERATE_USE_CPU=1`` (its ``--cpu`` multi-process mode needs MPI)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1",
           "ACCELERATE_DISABLE_RICH": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_one_process_maps_every_item_in_order(fresh_accelerate_state):
    from accelerate import Accelerator

    seen: list[int] = []
    out = map_across_processes(Accelerator(cpu=True), 5, lambda i: seen.append(i) or i * 10)
    assert out == [0, 10, 20, 30, 40] and seen == [0, 1, 2, 3, 4]
    assert map_across_processes(Accelerator(cpu=True), 0, lambda i: i) == []


def test_two_processes_split_the_work_and_both_get_the_whole_result(tmp_path):
    run = launch([str(ROOT / "tests" / "launched" / "shard_probe.py"), str(tmp_path)], port=29531)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    computed = [r["computed"] for r in ranks]
    assert computed == [[0, 1, 2, 3], [4, 5, 6]]  # contiguous, disjoint, together every item once
    expected = [[float(i * i)] * 2 for i in range(7)]
    assert ranks[0]["result"] == ranks[1]["result"] == expected
    assert "process 0/2: probe items 0-3 of 7" in run.stdout and "process 1/2: probe items 4-6 of 7" in run.stdout


@pytest.mark.slow  # ~20 s beside two training jobs: two processes each load the tiny PixCell + UNI-2h folders
def test_staining_training_on_two_processes_encodes_each_view_once(tmp_path):
    models = write_staining_models_dir(tmp_path / "models")
    recipe = {"output_dir": str(tmp_path / "run"), "pixcell": str(models["pixcell"]), "uni2h": str(models["uni2h"]),
              "phantom_pairs": 2, "real_pairs": False, "orientations": 2, "cache_latents": True, "max_steps": 1,
              "warmup_steps": 1, "flow": {"time_embed_dim": 32, "model_channels": 32, "bottleneck_channels": 24,
                                          "num_res_blocks": 2},
              "flow_batch_size": 8, "lora_batch_size": 1, "checkpoint_every": 1, "log_every": 1, "threads": 1,
              "val_pairs": 1, "val_flow_steps": 2}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = launch(["-m", "training.pixcell_staining", "--config", str(tmp_path / "recipe.yaml")], port=29533)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "process 0/2: encoded views 0-1 of 4" in run.stdout
    assert "process 1/2: encoded views 2-3 of 4" in run.stdout
    assert "4 views" in run.stdout
    assert any((tmp_path / "run" / "final").iterdir())
    assert torch.isfinite(torch.tensor([json.loads(line).get("flow_loss", 0.0) for line in
                                        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()])).all()

"""bench/throughput.py runs end to end on one cheap pipeline and writes its table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from studio.errors import InputError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_main_on_macenko_writes_table_and_json(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "throughput.json"
    result = bench.main(["--device", "cpu", "--size", "64", "--batches", "1,2", "--repeats", "1",
                         "--only", "macenko", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["device"] == "cpu" and saved["size"] == 64
    assert [(r["pipeline"], r["batch"]) for r in saved["rows"]] == [("macenko", 1), ("macenko", 2)]
    for row in saved["rows"]:
        assert row["tiles_per_s"] > 0 and row["peak_mb"] > 0
        assert row["mpix_per_s"] == pytest.approx(row["tiles_per_s"] * 64 * 64 / 1e6, rel=0.01)
    printed = capsys.readouterr().out
    assert "| pipeline | tile | batch | tiles/s | MPix/s | peak memory (MiB) |" in printed
    assert "| macenko | 64x64 | 2 |" in printed


def test_throughput_refuses_unknown_pipeline_and_bad_size(tmp_path):
    bench = _bench()
    with pytest.raises(InputError, match="--only: nope"):
        bench.main(["--device", "cpu", "--only", "nope", "--out", str(tmp_path / "t.json")])
    with pytest.raises(InputError, match="--size"):
        bench.main(["--device", "cpu", "--size", "50", "--only", "macenko", "--out", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_pixcell_row_times_native_tiles_of_the_published_architecture(tmp_path):
    """The PixCell-256 row on its toy-size stand-in: native 256 px output whatever --size says,
    and left out of the CPU default (at full size it takes minutes per tile there)."""
    bench = _bench()
    result = bench.main(["--device", "cpu", "--size", "64", "--batches", "1", "--only", "pixcell-256",
                         "--pixcell", "tiny", "--out", str(tmp_path / "t.json")])
    (row,) = result["rows"]
    assert row["pipeline"] == "pixcell-256" and row["size"] == 256 and row["tiles_per_s"] > 0
    assert row["mpix_per_s"] == pytest.approx(row["tiles_per_s"] * 256 * 256 / 1e6, rel=0.01)
    assert "pixcell-256" in bench.GPU_ONLY and "pixcell-256" in bench.PIPELINES
    with pytest.raises(InputError, match="--pixcell"):
        bench.random_pixcell("cpu", "huge")


def test_pixcell_stand_in_has_the_published_shapes():
    """Full size without running it: the published config's block count and widths, on the meta device."""
    import torch

    from pipelines.pixcell import PixCellTransformer2DModel

    with torch.device("meta"):
        model = PixCellTransformer2DModel()
    assert len(model.transformer_blocks) == 28 and model.inner_dim == 1152
    assert model.caption_projection.linear_1.in_features == 1536
    assert 550e6 < sum(p.numel() for p in model.parameters()) < 700e6

"""normalize, translate and segment on a real ``distributed.LocalCluster`` (two worker
processes): the same outputs as the local executor, models loaded once per worker from a
spec, a killed worker costing one retry of the unit it held, and clear errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.data.samples import load_sample
from studio.errors import InputError
from studio.io import load_npy, read_image, write_image
from studio.jobs import JobOptions, Manifest, TileJob, TransformSpec, expand_inputs, run_job
from studio.transforms import create_tile_transform

distributed = pytest.importorskip("distributed")
torch.set_num_threads(1)
#: Per-tile fit: no 16M-colour lookup table per unit (seconds each), the same code path otherwise.
FAST = JobOptions(fit="tile")


# --------------------------------------------------------------------------- a probe processor
def _event(prefix: str, kind: str, unit_id: str) -> None:
    Path(f"{prefix}-{kind}-{unit_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}").touch()


def events(prefix: str, kind: str) -> list[tuple[str, int]]:
    """(unit id, pid) of every ``kind`` event, oldest first."""
    folder, stem = Path(prefix).parent, Path(prefix).name
    found = sorted(folder.glob(f"{stem}-{kind}-*"), key=lambda p: p.stat().st_mtime_ns)
    return [(p.name.split("-")[2], int(p.name.split("-")[3])) for p in found]


class ProbeJob:
    """Reinhard normalization as a unit processor that logs each build, start and finish with
    its process id, and can sleep (to be caught mid-unit) or kill its own worker process."""

    name = "probe-reinhard"

    def __init__(self, log: str, delay: float = 0.0, doomed: str = ""):
        _event(log, "built", "x")
        self.log, self.delay, self.doomed = log, delay, doomed
        self.job = TileJob(create_tile_transform("reinhard", reference="tiatoolbox_target"))

    def describe(self) -> dict:
        return {"probe": True, **self.job.describe()}

    def validate(self, opts: JobOptions) -> None:
        opts.validate()

    def process_unit(self, unit, opts, reporter) -> dict:
        _event(self.log, "start", unit.id)
        if unit.id == self.doomed:
            os.kill(os.getpid(), signal.SIGKILL)  # this worker is lost while it holds the unit
        time.sleep(self.delay)
        result = self.job.process_unit(unit, opts, reporter)
        _event(self.log, "done", unit.id)
        return result


def probe(log: str, delay: float = 0.0, doomed: str = "") -> ProbeJob:
    return ProbeJob(log, delay, doomed)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from studio.slides import write_pyramid

    root = tmp_path_factory.mktemp("dask_inputs")
    image = np.ascontiguousarray(load_sample("hgsc_nest"))
    paths: dict[str, Path] = {}
    for k in range(4):  # four tile folders of two tiles: four units
        for j in range(2):
            y, x = 200 * k, 300 * j
            write_image(root / f"set{k}" / f"t{j}.png", image[y:y + 128, x:x + 160])
        paths[f"set{k}"] = root / f"set{k}"
    region = image[600:1000, 500:1000]
    paths["slide"] = write_pyramid(root / "slide.tif", (region[y:y + 256, x:x + 256] for y in range(0, 400, 256)
                                                         for x in range(0, 500, 256)), 500, 400, mpp=0.5,
                                   compression="deflate")
    paths["image"] = write_image(root / "cells.png", image[:200, :300])
    return paths


def tifs_equal(a: Path, b: Path) -> None:
    import tifffile

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        assert len(ta.series[0].levels) == len(tb.series[0].levels)
        for la, lb in zip(ta.series[0].levels, tb.series[0].levels, strict=True):
            np.testing.assert_array_equal(la.asarray(), lb.asarray())


def same_images(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".png", ".tif"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.suffix in (".png", ".tif"))
    for f in files:
        if f.suffix == ".tif":
            tifs_equal(a / f, b / f)
        else:
            np.testing.assert_array_equal(read_image(a / f), read_image(b / f))


# --------------------------------------------------------------------------- same outputs
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalize_on_dask_is_bit_identical_to_local(cluster, data, tmp_path, method):
    from typer.testing import CliRunner

    from studio.cli import app

    inputs = [str(data["set0"]), str(data["slide"])]
    common = ["--method", method, "--reference", "tiatoolbox_target", "--tile-size", "256"]
    local = CliRunner().invoke(app, ["normalize", *inputs, "--out", str(tmp_path / "local"), *common])
    assert local.exit_code == 0, local.output
    result = CliRunner().invoke(app, ["normalize", *inputs, "--out", str(tmp_path / "dask"), *common,
                                      "--executor", "dask", "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, (result.output, result.exception)
    same_images(tmp_path / "local", tmp_path / "dask")
    units = Manifest.load(tmp_path / "dask").units
    assert {u["status"] for u in units.values()} == {"done"} and {u["attempts"] for u in units.values()} == {1}
    assert all(u["worker"].startswith("tcp://") for u in units.values())
    assert not (tmp_path / "dask" / ".histostudio-attempts").exists()


def test_segment_on_dask_equals_local_and_resumes(cluster, data, tmp_path):
    from typer.testing import CliRunner

    from pipelines.segmenter import HoVerNetLite
    from studio.cli import app

    torch.manual_seed(0)
    HoVerNetLite(widths=(8, 16, 16, 16)).save_pretrained(tmp_path / "seg")
    inputs = [str(data["image"]), str(data["slide"])]
    for name, extra in (("local", []), ("dask", ["--executor", "dask", "--scheduler", cluster.scheduler_address])):
        result = CliRunner().invoke(app, ["segment", *inputs, "--out", str(tmp_path / name), "--checkpoint",
                                          str(tmp_path / "seg"), *extra])
        assert result.exit_code == 0, (result.output, result.exception)
    a, b = tmp_path / "local", tmp_path / "dask"
    for stem in ("cells",):
        for suffix in ("_inst.npy", "_cls.npy"):
            np.testing.assert_array_equal(load_npy(a / f"{stem}{suffix}"), load_npy(b / f"{stem}{suffix}"))
        assert (a / "json" / f"{stem}.json").read_text() == (b / "json" / f"{stem}.json").read_text()
    def features(path):  # feature ids are random UUIDs (QuPath's); everything else must agree
        return [{k: v for k, v in f.items() if k != "id"} for f in json.loads(path.read_text())["features"]]

    for stem in ("cells", "slide"):
        assert features(a / f"{stem}.geojson") == features(b / f"{stem}.geojson")
        assert len(features(a / f"{stem}.geojson")) > 0

    def rows(folder):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(folder / "summary.csv"))]

    assert rows(a) == rows(b) and len(rows(a)) == 2
    # resuming the dask run on the cluster redoes nothing
    stamp = os.stat(b / "slide.geojson").st_mtime_ns
    result = CliRunner().invoke(app, ["segment", *inputs, "--out", str(b), "--checkpoint", str(tmp_path / "seg"),
                                      "--resume", "--executor", "dask", "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0 and "skipped 2 finished unit(s)" in result.output
    assert os.stat(b / "slide.geojson").st_mtime_ns == stamp


def test_translate_on_dask_equals_local(cluster, data, tmp_path):
    from typer.testing import CliRunner

    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline
    from studio.cli import app

    torch.manual_seed(0)
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), stain="her2").save_pretrained(tmp_path / "vihc")
    inputs = [str(data["set2"]), str(data["slide"])]
    common = ["--checkpoint", str(tmp_path / "vihc"), "--tile-size", "128", "--halo", "16"]
    for name, extra in (("local", []), ("dask", ["--executor", "dask", "--scheduler", cluster.scheduler_address])):
        result = CliRunner().invoke(app, ["translate", *inputs, "--out", str(tmp_path / name), *common, *extra])
        assert result.exit_code == 0, (result.output, result.exception)
    same_images(tmp_path / "local", tmp_path / "dask")
    assert json.loads((tmp_path / "local" / "dab_readout.json").read_text()) == \
        json.loads((tmp_path / "dask" / "dab_readout.json").read_text())


# --------------------------------------------------------------------------- specs, not weights
def test_workers_build_a_spec_once_per_process_and_never_get_weights(cluster, data, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    spec = TransformSpec("test_dask_jobs:probe", {"log": str(log / "ev")})
    out = tmp_path / "out"
    units = expand_inputs([data[f"set{k}"] for k in range(4)], out)
    report = run_job(units, spec, out, FAST, executor="dask", scheduler=cluster.scheduler_address)
    assert report.ok and sorted(report.done) == ["set0", "set1", "set2", "set3"]
    builds = [pid for _, pid in events(str(log / "ev"), "built")]
    assert len(builds) == len(set(builds)), builds  # no process built the processor twice
    workers = {pid for _, pid in events(str(log / "ev"), "start")}
    assert os.getpid() not in workers and workers <= set(builds)
    # a transform that holds a model and has no spec is refused before anything is sent
    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline, VirtualIHCTransform

    held = VirtualIHCTransform(VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16))))
    with pytest.raises(InputError, match="never pickled weights"):
        run_job(units, held, tmp_path / "o2", FAST, executor="dask", scheduler=cluster.scheduler_address)
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- lost workers
def test_a_finished_unit_whose_result_was_lost_with_its_worker_is_not_processed_again(data, tmp_path):
    """A task's result sits in its worker's memory until gathered: when that worker dies
    first, the scheduler reruns the task. The rerun must return the finished entry, not
    process the unit a second time (seen in the full suite: a kill cost two units)."""
    from studio.jobs import dask_task

    log = tmp_path / "log"
    log.mkdir()
    prefix = str(log / "ev")
    unit = expand_inputs([data["set0"]], tmp_path / "out")[0]
    attempts = str(tmp_path / "out" / ".histostudio-attempts" / "t")
    first = dask_task(unit, probe(prefix), FAST, attempts)
    again = dask_task(unit, probe(prefix), FAST, attempts)
    assert first["status"] == "done" and again == first and again["attempts"] == 1
    assert [u for u, _ in events(prefix, "start")] == ["set0"]  # processed once


def test_a_worker_killed_mid_batch_costs_one_retry_of_its_unit(cluster, data, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    prefix = str(log / "ev")
    spec = TransformSpec("test_dask_jobs:probe", {"log": prefix, "delay": 3.0})
    out = tmp_path / "out"
    units = expand_inputs([data[f"set{k}"] for k in range(4)], out)
    killed: list[tuple[str, int]] = []

    def kill_a_busy_worker(unit, entry) -> None:
        if killed:
            return
        finished = {u for u, _ in events(prefix, "done")}
        starts = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}-start-*"), key=lambda p: p.stat().st_mtime)
        # a unit started well under its 3 s ago: certainly still held when the signal lands
        busy = [(p.name.split("-")[2], int(p.name.split("-")[3])) for p in starts
                if p.name.split("-")[2] not in finished and time.time() - p.stat().st_mtime < 1.2]
        if busy:
            killed.append(busy[-1])
            os.kill(busy[-1][1], signal.SIGKILL)

    report = run_job(units, spec, out, FAST, executor="dask", scheduler=cluster.scheduler_address,
                     on_unit_done=kill_a_busy_worker)
    assert killed, "no unit was caught mid-way"
    victim, pid = killed[0]
    assert report.ok and sorted(report.done) == ["set0", "set1", "set2", "set3"]
    assert report.retried == {victim: 2}, (killed, report.failed, events(prefix, "start"), events(prefix, "done"))
    entries = Manifest.load(out).units
    assert {k: v["attempts"] for k, v in entries.items()} == {u.id: 2 if u.id == victim else 1 for u in units}
    done = [u for u, _ in events(prefix, "done")]
    assert sorted(done) == ["set0", "set1", "set2", "set3"]  # every unit finished exactly once
    starts = [u for u, _ in events(prefix, "start")]
    assert starts.count(victim) == 2 and all(starts.count(u.id) == 1 for u in units if u.id != victim)
    assert pid not in {p for u, p in events(prefix, "done") if u == victim}
    for unit in units:  # and its outputs are those of the local executor
        assert len(list(Path(unit.output).iterdir())) == 2
    local = tmp_path / "local"
    run_job(expand_inputs([data[victim]], local), create_tile_transform("reinhard", reference="tiatoolbox_target"),
            local, FAST)
    same_images(local / victim, out / victim)
    assert not list(out.rglob("*.tmp")) and not (out / ".histostudio-attempts").exists()


def test_a_unit_that_loses_its_worker_twice_is_recorded_failed_and_the_batch_goes_on(cluster, data, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    spec = TransformSpec("test_dask_jobs:probe", {"log": str(log / "ev"), "doomed": "set1"})
    out = tmp_path / "out"
    units = expand_inputs([data["set0"], data["set1"], data["set3"]], out)
    report = run_job(units, spec, out, FAST, executor="dask", scheduler=cluster.scheduler_address)
    assert sorted(report.done) == ["set0", "set3"] and list(report.failed) == ["set1"]
    entry = Manifest.load(out).units["set1"]
    assert entry["status"] == "failed" and entry["attempts"] == 2 and "lost" in entry["error"]
    assert [u for u, _ in events(str(log / "ev"), "start")].count("set1") == 2  # tried twice, not a third time
    assert not (out / "set1").exists() or not list((out / "set1").iterdir())


# --------------------------------------------------------------------------- bad input
def test_unreachable_scheduler_is_one_line_and_writes_nothing(data, tmp_path, monkeypatch):
    import subprocess
    import sys

    import studio.jobs as jobs

    monkeypatch.setattr(jobs, "DASK_CONNECT_TIMEOUT", 1.0)
    out = tmp_path / "out"
    units = expand_inputs([data["set0"]], out)
    with pytest.raises(InputError, match="cannot reach the dask scheduler") as info:
        run_job(units, create_tile_transform("reinhard"), out, JobOptions(), executor="dask",
                scheduler="tcp://127.0.0.1:9")
    assert "\n" not in str(info.value) and not out.exists()
    with pytest.raises(InputError, match="--scheduler"):
        run_job(units, create_tile_transform("reinhard"), out, JobOptions(), executor="dask")
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "normalize", str(data["set0"]), "--out", str(out),
                           "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"], capture_output=True, text=True,
                          env={**os.environ, "HISTOSTUDIO_DASK_TIMEOUT": "1"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot reach the dask scheduler" in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


def test_a_worker_without_histostudio_and_a_client_without_distributed_are_one_line(monkeypatch):
    import importlib.metadata

    import studio.jobs as jobs

    class Client:  # what client.run returns when a worker cannot import the package
        def run(self, fn, *args, on_error="raise"):
            return {"tcp://10.0.0.7:4242": importlib.metadata.PackageNotFoundError("histostudio")}

    with pytest.raises(InputError, match="worker tcp://10.0.0.7:4242 cannot import histostudio") as info:
        jobs._check_workers(Client(), "tcp://10.0.0.1:8786")
    assert "pip install 'histostudio[distributed]'" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)
    with pytest.raises(InputError, match="needs the 'distributed' extra"):
        jobs._connect("tcp://127.0.0.1:8786")



def test_plugin_transforms_still_load_once_distributed_is_imported():
    """Importing distributed (this module does) makes importlib.metadata hand back the
    importlib_metadata backport's EntryPoint: plugins must load by duck type, not isinstance."""
    from pipelines.stain_fuser import StainFuserTransform

    assert distributed is not None
    transform = create_tile_transform("stainfuser", reference="hgsc_nest", device="cpu")
    assert isinstance(transform, StainFuserTransform) and transform.spec.kwargs["device"] == "cpu"

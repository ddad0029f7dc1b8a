"""``histostudio segment`` on the one slide-job runner: manifest, refusal of an earlier run,
``--resume`` after a kill -9, ``--overwrite``, summary from the manifest, blank tiles,
converted inputs, and the bad-input battery (``--out`` a file, a full disk)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from studio.cli import app
from studio.data.samples import load_sample
from studio.errors import InputError, OutputError
from studio.io import load_npy, write_image
from studio.jobs import Manifest

torch.set_num_threads(1)
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "nuclei-segmenter"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from pipelines.segmenter import HoVerNetLite

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seg") / "seg"
    HoVerNetLite(widths=(8, 16, 16, 16)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiles")
    image = np.ascontiguousarray(load_sample("hgsc_nest"))
    return [write_image(root / f"tile{k}.png", image[150 * k:150 * k + 160, 200:360]) for k in range(3)]


def segment(*args: str) -> object:
    return CliRunner().invoke(app, ["segment", *map(str, args)])


def summary(folder: Path) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in csv.DictReader(open(folder / "summary.csv"))}


# --------------------------------------------------------------------------- the runner's guarantees
def test_segment_refuses_an_earlier_run_then_resumes_and_overwrites(ckpt, tiles, tmp_path):
    ck = ckpt
    out = tmp_path / "out"
    first = segment(tiles[0], tiles[1], "--out", out, "--checkpoint", ck)
    assert first.exit_code == 0, first.output
    manifest = Manifest.load(out)
    assert manifest.header["command"] == "segment" and set(manifest.units) == {"tile0", "tile1"}
    assert manifest.units["tile0"]["output_files"][0].endswith("tile0_inst.npy")
    stamp = os.stat(out / "tile0_inst.npy").st_mtime_ns

    again = segment(tiles[0], tiles[2], "--out", out, "--checkpoint", ck)
    assert again.exit_code != 0 and isinstance(again.exception, InputError)
    assert "--resume" in str(again.exception) and "--overwrite" in str(again.exception)
    assert summary(out).keys() == {"tile0", "tile1"}  # the refused run changed nothing

    resumed = segment(tiles[0], tiles[2], "--out", out, "--checkpoint", ck, "--resume")
    assert resumed.exit_code == 0 and "skipped 1 finished unit(s) (--resume): tile0" in resumed.output
    assert os.stat(out / "tile0_inst.npy").st_mtime_ns == stamp  # not redone
    rows = summary(out)
    assert rows.keys() == {"tile0", "tile1", "tile2"}  # from the manifest: earlier runs' inputs too
    assert all(r["status"] == "done" for r in rows.values())

    changed = segment(tiles[0], "--out", out, "--checkpoint", ck, "--resume", "--overlap", "32")
    assert isinstance(changed.exception, InputError) and "different transform" in str(changed.exception)

    redone = segment(tiles[2], "--out", out, "--checkpoint", ck, "--overwrite")
    assert redone.exit_code == 0, redone.output
    assert summary(out).keys() == {"tile2"}
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == ["manifest.json", "summary.csv", "tile2.geojson", "tile2.json", "tile2_cls.npy", "tile2_inst.npy"]


def test_a_bad_input_fails_alone_and_leaves_no_files(ckpt, tiles, tmp_path):
    ck = ckpt
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    result = segment(tiles[0], bad, tiles[1], "--out", out, "--checkpoint", ck)
    assert result.exit_code == 1
    assert "2 done, 1 failed" in result.output and "bad.png" in result.output
    rows = summary(out)
    assert rows["bad"]["status"] == "failed" and rows["tile1"]["status"] == "done"
    assert not list(out.glob("bad*")) and not list(out.rglob(".*.tmp"))


def test_resume_after_kill_9_mid_batch_redoes_nothing_finished(ckpt, tmp_path):
    ck = ckpt
    image = np.ascontiguousarray(load_sample("hgsc_nest"))
    inputs = [write_image(tmp_path / "in" / f"im{k:02d}.png", image[150 * k:150 * k + 256, :256]) for k in range(6)]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "studio.cli", "segment", *map(str, inputs), "--out", str(out),
                             "--checkpoint", str(ck)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    finished: list[str] = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                units = json.loads((out / "manifest.json").read_text())["units"]
            except (OSError, ValueError, KeyError):
                units = {}
            finished = [k for k, v in units.items() if v["status"] == "done"]
            if finished:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert 1 <= len(finished) < len(inputs), "the batch was not caught mid-way"
    stamps = {k: os.stat(out / f"{k}_inst.npy").st_mtime_ns for k in finished}

    result = segment(*inputs, "--out", out, "--checkpoint", ck, "--resume")
    assert result.exit_code == 0, result.output
    units = Manifest.load(out).units
    assert all(units[f"im{k:02d}"]["status"] == "done" for k in range(6))
    assert {k: os.stat(out / f"{k}_inst.npy").st_mtime_ns for k in finished} == stamps  # nothing redone
    skipped = result.output.split("skipped ")[1].split(" finished")[0]
    assert int(skipped) >= len(finished)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporaries, probes or claims
    for k in range(6):
        assert load_npy(out / f"im{k:02d}_inst.npy").shape == (256, 256)
    assert len(summary(out)) == 6


# --------------------------------------------------------------------------- battery
def test_out_an_existing_file_is_one_line_exit_2(tiles, tmp_path, monkeypatch, capsys):
    from studio import cli

    target = tmp_path / "existing_file"
    target.write_text("not a folder")
    monkeypatch.setattr(sys, "argv", ["histostudio", "segment", str(tiles[0]), "--out", str(target)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "existing_file" in err and "not a folder" in err
    assert target.read_text() == "not a folder"


def test_black_and_flat_tiles_get_no_nuclei_like_white_ones(tmp_path):
    """The battery's all-black tile gave one 1,495 px 'inflammatory' nucleus along the border
    with the shipped segmenter; blank tiles (black, white, flat) now get empty maps, and a
    black block in a real tile loses the nuclei the model invents on it."""
    from pipelines.segmenter import NucleiSegmenter

    tissue = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :256])
    half = np.concatenate([tissue, np.zeros_like(tissue)], axis=1)
    images = {"black": np.zeros((256, 256, 3), np.uint8), "white": np.full((256, 256, 3), 255, np.uint8),
              "flat": np.full((256, 256, 3), (180, 120, 170), np.uint8), "half": half}
    paths = [write_image(tmp_path / f"{k}.png", v) for k, v in images.items()]
    seg = NucleiSegmenter.from_pretrained(SHIPPED)
    raw_black, _, _ = seg.segment(images["black"])
    raw_half, _, _ = seg.segment(half)
    out = tmp_path / "out"
    result = segment(*paths, "--out", out, "--checkpoint", SHIPPED)
    assert result.exit_code == 0, result.output
    units = Manifest.load(out).units
    for name in ("black", "white", "flat"):
        assert units[name]["blank"] is True and units[name]["n_nuclei"] == 0
        assert not load_npy(out / f"{name}_inst.npy").any()
        assert json.loads((out / f"{name}.geojson").read_text())["features"] == []
        assert f"note {name}: blank" in result.output
    assert raw_black.max() >= 1  # what the model alone makes of black (the battery's finding)
    inst = load_npy(out / "half_inst.npy")
    assert inst.max() > 5 and not inst[:, 256:].any()  # tissue nuclei kept, none on the black block
    ids = np.unique(raw_half)
    on_tissue = [i for i in ids[ids > 0] if (raw_half[:, :256] == i).sum() * 2 > (raw_half == i).sum()]
    assert int(inst.max()) == len(on_tissue)  # every nucleus of the tissue block kept
    assert units["half"]["blank_blocks"] == 1
    assert sorted(np.unique(inst).tolist()) == list(range(int(inst.max()) + 1))  # ids stay 1..n
    assert summary(out)["black"]["note"].startswith("blank")


def test_rgba_and_16_bit_inputs_are_recorded_and_noted(ckpt, tmp_path):
    import tifffile
    from PIL import Image

    ck = ckpt
    tissue = np.ascontiguousarray(load_sample("hgsc_nest")[:128, :128])
    rgba = np.dstack([tissue, np.full(tissue.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    tifffile.imwrite(tmp_path / "deep.tif", tissue.astype(np.uint16) * 257, photometric="rgb")
    out = tmp_path / "out"
    result = segment(tmp_path / "alpha.png", tmp_path / "deep.tif", "--out", out, "--checkpoint", ck)
    assert result.exit_code == 0, result.output
    units = Manifest.load(out).units
    assert units["alpha"]["converted"] == "RGBA composited over white"
    assert units["deep"]["converted"] == "16-bit scaled to 8-bit"
    assert "note alpha: read as 8-bit RGB: RGBA composited over white" in result.output
    assert "note deep: read as 8-bit RGB: 16-bit scaled to 8-bit" in result.output


def test_write_probe_never_stays_behind_on_a_full_disk(tmp_path, monkeypatch):
    """``_check_writable`` creates its probe, the disk refuses the bytes: the probe goes and
    the error says disk full (not the numpy/OS wording)."""
    import errno

    from studio import jobs

    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".histostudio-write-test-"):
            self.touch()  # the file is created, its bytes are not
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="disk full") as info:
        jobs._check_writable(tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 192 KiB tmpfs (needs root; skipped elsewhere): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_segment_on_a_really_full_disk_says_disk_full(ckpt, tiny_disk, tmp_path):
    ck = ckpt
    image = np.ascontiguousarray(load_sample("hgsc_nest"))
    big = write_image(tmp_path / "big.png", image[:400, :400])  # 400 x 400 int32 maps do not fit in 192 KiB
    result = segment(big, "--out", tiny_disk / "out", "--checkpoint", ck)
    assert result.exit_code != 0
    assert isinstance(result.exception, OutputError) and str(result.exception).startswith("disk full")
    assert "requested and" not in str(result.exception)
    left = [p.name for p in (tiny_disk / "out").rglob("*") if p.is_file()]
    assert not [n for n in left if n.startswith(".")], left  # no probe, no temporary


# --------------------------------------------------------------------------- leftovers of the issue-22 battery
def test_an_old_format_output_folder_is_refused_then_overwritten_clean(ckpt, tiles, tmp_path, monkeypatch, capsys):
    """A folder from before the job manifest (summary.csv and maps, no manifest.json) is an
    earlier run: refused like one; --overwrite removes every file its summary lists."""
    out = tmp_path / "old"
    first = segment(tiles[0], tiles[1], "--out", out, "--checkpoint", ckpt)
    assert first.exit_code == 0, first.output
    (out / "manifest.json").unlink()  # what the pre-runner segment left: summary.csv and maps only
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())

    for extra in ((), ("--resume",)):
        again = segment(tiles[2], "--out", out, "--checkpoint", ckpt, *extra)
        assert isinstance(again.exception, InputError), again.output
        message = str(again.exception)
        assert "summary.csv, no manifest.json" in message and "--overwrite" in message and "\n" not in message
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == before
    monkeypatch.setattr(sys, "argv", ["histostudio", "segment", str(tiles[2]), "--out", str(out),
                                      "--checkpoint", str(ckpt)])
    from studio.cli import main

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 1

    redone = segment(tiles[2], "--out", out, "--checkpoint", ckpt, "--overwrite")
    assert redone.exit_code == 0, redone.output
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == ["json/tile2.json", "manifest.json", "summary.csv", "tile2.geojson", "tile2_cls.npy",
                    "tile2_inst.npy"]  # no tile0/tile1 files stay behind, unlisted
    assert summary(out).keys() == {"tile2"}


def test_a_truncated_tiff_gives_only_our_one_line(ckpt, tmp_path, monkeypatch, capsys, caplog):
    """tifffile logs what it fails on (``shaped series raised ...``, ``invalid page offset``);
    the user should see only the studio's line naming the file."""
    import logging

    import tifffile

    from studio.io import read_image
    from studio.slides import open_slide

    image = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :256])
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, np.stack([image, image]), tile=(128, 128), photometric="rgb")  # a shaped series
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 10])

    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        with pytest.raises(InputError, match="cut.tif"):
            open_slide(cut)
        with pytest.raises(InputError, match="cut.tif"):
            read_image(cut)
    assert [r for r in caplog.records if r.name.startswith("tifffile")] == []
    assert capsys.readouterr().err == ""
    with tifffile.TiffFile(cut) as tf:  # outside our reads tifffile's logging is left alone
        assert isinstance(tf.series, list)
    assert any(r.name == "tifffile" for r in caplog.records)

    caplog.clear()
    monkeypatch.setattr(sys, "argv", ["histostudio", "segment", str(cut), "--out", str(tmp_path / "o"),
                                      "--checkpoint", str(ckpt)])
    from studio.cli import main

    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr()
    assert "tifffile" not in err.err + err.out and "TiffFileError" not in err.err + err.out
    failed = [line for line in (err.err + err.out).splitlines() if "cut.tif" in line and "failed" in line]
    assert len(failed) == 1, err

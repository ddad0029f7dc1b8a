"""The augmentation experiment (training/experiment.py) on the shipped data: toy models,
2 training steps, 2 seeds -- what is written, identical splits, valid metrics, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studio.errors import InputError, OutputError
from training.experiment import make_scarce, run_augment_experiment

torch.set_num_threads(1)

TINY = {"widths": (8, 16, 16), "decoder_scale": 1.0, "batch_size": 2, "crop_size": 64}
REAL = {"name": "hgsc_nest", "stride": 256}  # 20 train-region crops instead of 70
SYNTHETIC = {"name": "phantom", "n": 4}
VARIANTS = ("baseline", "synthetic", "stain_augment", "tta_macenko")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "augment"
    events: list[dict] = []
    result = run_augment_experiment(REAL, SYNTHETIC, out, seeds=2, steps=2, stain_augment=True,
                                    tta_normalize="macenko", scarce_class="connective", train_options=TINY,
                                    progress=events.append)
    return out, result, events


def test_writes_results_models_and_data(experiment):
    from PIL import Image

    out, result, events = experiment
    assert json.loads((out / "results.json").read_text()) == result
    with Image.open(out / "results.png") as png:
        assert png.size[0] >= 560 and png.size[1] > 300
    assert [v["id"] for v in result["variants"]] == list(VARIANTS)
    for variant in VARIANTS[:3]:
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed_{seed}"
            assert (run / "final" / "config.json").is_file() and (run / "train.log").is_file()
            assert not (run / "checkpoints").exists()  # optimizer state is not kept
    assert {p.name for p in (out / "data").iterdir()} == {"real_train", "synthetic", "heldout"}
    kinds = [e["event"] for e in events]
    assert kinds[0] == "data" and kinds[-1] == "done"
    assert kinds.count("run_done") == 6 and kinds.count("evaluated") == 2  # TTA reuses the baseline models


def test_markdown_has_a_mean_sd_row_per_variant(experiment):
    out, result, _ = experiment
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant | PQ | mPQ+"))
    columns = header.count("|") - 2
    assert "PQ neoplastic" in header and "PQ connective *(scarce)*" in header and "count R²" in header
    for v in result["variants"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {v['label']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == columns and all(" ± " in c for c in cells), row
    assert "| threshold-watershed (no classes, reference) |" in md
    assert md.count("| +synthetic") == 2  # the table and the paired differences to the baseline


def test_splits_are_identical_for_every_variant_and_seed(experiment):
    from studio.data.registry import open_dataset

    out, result, _ = experiment
    splits = result["splits"]
    held = splits["heldout"]
    assert len(held) == 6 and all(name.endswith("_x1125") for name in held)  # the shipped held-out band
    runs = result["runs"]
    assert len(runs) == 8
    assert all(run["heldout_ids"] == held for run in runs)
    assert {(r["variant"], r["seed"]) for r in runs} == {(v, s) for v in VARIANTS for s in (0, 1)}
    real_paths = {run["training_sources"][0]["path"] for run in runs if "training_sources" in run}
    assert real_paths == {result["data"]["folders"]["real_train"]}
    real_train = open_dataset(result["data"]["folders"]["real_train"])
    assert [real_train.read(i).meta["name"] for i in range(len(real_train))] == splits["real_train"]
    assert all(real_train.read(i).meta["x"] + 256 <= 1125 for i in range(len(real_train)))  # no pixel of the band
    for run in runs:
        cfg = json.loads((out / "runs" / run["variant"].replace("tta_macenko", "baseline") / f"seed_{run['seed']}"
                          / "config.json").read_text())
        assert cfg["val"] == result["data"]["folders"]["heldout"] and cfg["seed"] == run["seed"]
    assert not set(splits["dropped_for_scarcity"]) & set(splits["real_train"])
    sc = result["scarcity"]
    assert sc["class_name"] == "connective" and 0 < sc["nuclei_after"] <= sc["budget"] < sc["nuclei_before"]
    assert result["data"]["nuclei"]["real_train"]["connective"] == sc["nuclei_after"]


def test_sources_are_mixed_only_in_the_synthetic_variant(experiment):
    out, result, _ = experiment
    assert result["data"]["sources"]["synthetic"] == {"phantom": 4}
    assert result["data"]["sources"]["real_train"] == {"real": result["data"]["tiles"]["real_train"]}
    for variant, allowed in (("baseline", {"real"}), ("stain_augment", {"real"}), ("synthetic", {"real", "phantom"})):
        for seed in (0, 1):
            log = (out / "runs" / variant / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
            seen = set().union(*(json.loads(line).get("sources", {}).keys() for line in log))
            assert seen and seen <= allowed, (variant, seen)


def test_metrics_are_in_valid_ranges(experiment):
    _, result, _ = experiment
    assert result["evaluated_class_names"] == ["neoplastic", "inflammatory", "connective"]
    for run in result["runs"]:
        m = run["metrics"]
        for key in ("pq", "dq", "sq", "mpq_plus", "mpq_plus_all_classes", "detection_f1"):
            assert 0.0 <= m[key] <= 1.0, (key, m[key])
        assert all(v is None or 0.0 <= v <= 1.0 for v in m["pq_per_class"].values())
        assert m["r2"] is None or m["r2"] <= 1.0
        assert m["nuclei_true"] > 0
    ref = result["reference"]["threshold_watershed"]
    assert 0.0 < ref["pq"] <= 1.0 and ref["mpq_plus"] is None
    for variant in VARIANTS:
        stats = result["summary"][variant]["pq_connective"]
        assert stats["n"] == 2 and stats["sd"] >= 0.0 and 0.0 <= stats["mean"] <= 1.0
    assert result["summary"]["tta_macenko"]["delta_vs_baseline"]["pq"]["n"] == 2


def test_scarcity_counts_shared_nuclei_once():
    from studio.data.base import NucleiSample

    def tile(name, ids):
        inst = np.zeros((8, 8), np.int32)
        for k, i in enumerate(ids):
            inst[k, :2] = i
        return NucleiSample(np.zeros((8, 8, 3), np.uint8), inst, (inst > 0).astype(np.uint8) * 3,
                            {"name": name, "parent": "p", "y": 0, "x": 0})

    parent = np.zeros((8, 8), np.int32)
    parent[:4, :2] = np.arange(1, 5)[:, None]
    tiles = [tile("a", [1, 2]), tile("b", [1, 2, 3, 4]), tile("c", [])]
    kept, dropped, summary = make_scarce(tiles, 3, 0.5, seed=0, parents={"p": parent})
    assert summary["nuclei_before"] == 4 and summary["budget"] == 2
    assert [t.meta["name"] for t in kept] == ["a", "c"] and [t.meta["name"] for t in dropped] == ["b"]


def _folder(path, classes, *, empty=False):
    from studio.data.folder import write_folder
    from studio.data.phantom_dataset import phantom_samples

    samples = phantom_samples(2, seed=7, size=64)
    for s in samples:
        s.cls = np.where(s.cls > 2, 1, s.cls).astype(np.uint8)
        if empty:
            s.inst = np.zeros_like(s.inst)
            s.cls = np.zeros_like(s.cls)
    return write_folder(path, samples, classes=classes)


def test_bad_inputs_give_clear_errors(tmp_path, experiment):
    out = tmp_path / "exp"
    kw = {"steps": 1, "seeds": 1, "train_options": TINY}
    with pytest.raises(InputError, match="not a built-in dataset"):
        run_augment_experiment("hgsc_nestt", "phantom", out, **kw)
    with pytest.raises(InputError, match="real labelled tile"):
        run_augment_experiment("phantom", "hgsc_nest", out, **kw)
    with pytest.raises(InputError, match="unknown stain method"):
        run_augment_experiment(REAL, "phantom", out, tta_normalize="magic", **kw)
    with pytest.raises(InputError, match="--seeds"):
        run_augment_experiment(REAL, "phantom", out, seeds=0)
    with pytest.raises(InputError, match="fixed held-out band"):
        run_augment_experiment(REAL, "phantom", out, heldout=0.3, **kw)
    with pytest.raises(InputError, match="not a class of the real data"):
        run_augment_experiment(REAL, SYNTHETIC, out, scarce_class="mitotic", **kw)
    two_classes = _folder(tmp_path / "two_classes", {1: "tumour", 2: "immune"})
    with pytest.raises(InputError, match="class table .* differs from the real data"):
        run_augment_experiment(REAL, two_classes, out, **kw)
    empty = _folder(tmp_path / "empty", {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead",
                                         5: "epithelial"}, empty=True)
    with pytest.raises(InputError, match="hold no classified nuclei"):
        run_augment_experiment(REAL, SYNTHETIC, out, heldout=empty, **kw)
    with pytest.raises(InputError, match="at least 2"):
        run_augment_experiment({"name": "phantom", "n": 1, "size": 64}, SYNTHETIC, out, **kw)
    assert not out.exists()  # every error came before anything was written
    with pytest.raises(OutputError, match="already holds an experiment"):
        run_augment_experiment(REAL, SYNTHETIC, experiment[0], **kw)

"""HoVerNetLite, sliding-window segmentation with band merging, the segment job and a
training smoke test -- tiny models, real pixels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pipelines.segment_job import expand_segment_inputs, segment_inputs
from pipelines.segmenter import HoVerNetLite, NucleiSegmenter, blend_weights, window_origins
from studio.data.samples import load_hgsc_nest_labels
from studio.errors import InputError, WeightsError
from studio.io import load_npy, write_image
from studio.metrics import multi_pq_plus, panoptic_quality
from studio.nuclei import hv_targets, relabel_sequential, threshold_watershed_baseline

torch.set_num_threads(1)


def tiny_model(seed: int = 0, num_classes: int = 5) -> HoVerNetLite:
    torch.manual_seed(seed)
    names = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")[:num_classes]
    return HoVerNetLite(num_classes=num_classes, widths=(8, 16, 16), decoder_scale=1.0, class_names=names).eval()


@pytest.fixture(scope="module")
def hgsc():
    return load_hgsc_nest_labels()


def perfect_maps(inst: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.stack([(cls == c) for c in range(6)]).astype(np.float32)
    return (inst > 0).astype(np.float32), hv_targets(inst), tp


# --------------------------------------------------------------------------- network
def test_forward_shapes_on_odd_sizes():
    model = tiny_model()
    assert model.multiple == 4
    with torch.no_grad():
        out = model(torch.rand(2, 3, 200, 231))
    assert out.np_logits.shape == (2, 2, 200, 231)
    assert out.hv.shape == (2, 2, 200, 231) and out.hv.abs().max() <= 1.0
    assert out.tp_logits.shape == (2, 6, 200, 231)
    with torch.no_grad():
        no_tp = tiny_model(num_classes=0)(torch.rand(1, 3, 37, 41))
    assert no_tp.tp_logits is None and no_tp.np_logits.shape == (1, 2, 37, 41)
    with pytest.raises(InputError, match="tiles"):
        model(torch.rand(1, 4, 32, 32))


def test_default_size_and_class_names():
    model = HoVerNetLite()
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 3e6
    assert tuple(model.config.class_names) == ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
    assert tuple(HoVerNetLite(num_classes=2, widths=(8, 8, 8)).config.class_names) == ("class 1", "class 2")
    with pytest.raises(InputError, match="class_names"):
        HoVerNetLite(num_classes=2, widths=(8, 8, 8), class_names=("a",))


def test_save_load_round_trip(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "seg")
    assert {p.name for p in (tmp_path / "seg").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    seg = NucleiSegmenter.from_pretrained(tmp_path / "seg")
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        a, b = model(x), seg.model(x)
    for name in ("np_logits", "hv", "tp_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert seg.class_names[1] == "neoplastic" and seg.mpp == 0.5 and seg.postprocess.marker_open == 3


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such model folder"):
        NucleiSegmenter.from_pretrained(tmp_path / "missing")
    folder = tmp_path / "pickled"
    tiny_model().save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(WeightsError, match=r"no \.safetensors.*diffusion_pytorch_model\.bin"):
        NucleiSegmenter.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        NucleiSegmenter.from_pretrained(folder)


def test_tta_is_flip_equivariant():
    seg = NucleiSegmenter(tiny_model(seed=1), tta=True)
    x = torch.rand(1, 3, 48, 64)
    a, b = seg.predict(x), seg.predict(x.flip(-1))
    torch.testing.assert_close(b["np"], a["np"].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(b["hv"][:, 0], -a["hv"][:, 0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(b["hv"][:, 1], a["hv"][:, 1].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(b["tp"].sum(1), torch.ones(1, 48, 64), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- sliding windows
def test_window_helpers():
    assert window_origins(600, 256, 64) == [0, 192, 344]
    assert window_origins(200, 256, 64) == [0]
    w = blend_weights(256, 256, 64)
    assert w.max() == 1.0 and w.min() > 0 and w[128, 128] == 1.0 and w[0, 128] < 0.1


def test_segment_runs_on_any_size(hgsc):
    image = hgsc[0][:600, :700]
    seen = []
    inst, cls, info = NucleiSegmenter(tiny_model()).segment(image, tile_size=256, overlap=64,
                                                            progress=lambda d, t: seen.append((d, t)))
    assert inst.shape == cls.shape == (600, 700) and inst.dtype == np.int32 and cls.dtype == np.uint8
    assert info["windows"] == 12 and seen[-1] == (12, 12)
    n = info["n_nuclei"]
    assert n == int(inst.max()) and set(np.unique(inst)) == set(range(n + 1))
    assert sum(info["class_counts"].values()) == n
    with pytest.raises(InputError, match="uint8"):
        NucleiSegmenter(tiny_model()).segment(image.astype(np.float32))


def coordinate_image(h: int, w: int) -> np.ndarray:
    """Pixels that encode their own (y, x), so a fake model knows where a window is."""
    yy, xx = np.indices((h, w))
    return np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("band_rows", [512, 32])
def test_sliding_windows_merge_seamlessly(hgsc, monkeypatch, band_rows):
    """A fake model returns perfect maps computed from the *window's own crop* of a known
    label map (nuclei cut by a window border get the HV maps of their visible part, as a
    real model would see them): blending and band merging must still give the nuclei back,
    whole and once, across window and band borders."""
    _, inst_full, cls_full = hgsc
    h, w = 600, 700
    truth = relabel_sequential(inst_full[300:300 + h, 200:200 + w])
    truth_cls = cls_full[300:300 + h, 200:200 + w]
    seg = NucleiSegmenter(tiny_model())

    def fake_predict(tiles):
        px = (tiles * 255).round().long().numpy()
        maps = {"np": [], "hv": [], "tp": []}
        for t in px:
            ys, xs = t[0] + (t[2] // 16) * 256, t[1] + (t[2] % 16) * 256
            np_prob, hv, tp = perfect_maps(relabel_sequential(truth[ys, xs]), truth_cls[ys, xs])
            maps["np"].append(np_prob)
            maps["hv"].append(hv)
            maps["tp"].append(tp)
        return {k: torch.from_numpy(np.stack(v)) for k, v in maps.items()}

    import pipelines.segmenter as module

    bands = []
    real = module.hovernet_instances

    def spy(np_prob, hv, cfg=None):
        bands.append(np_prob.shape)
        return real(np_prob, hv, cfg)

    monkeypatch.setattr(seg, "predict", fake_predict)
    monkeypatch.setattr(module, "hovernet_instances", spy)
    inst, cls, info = seg.segment(coordinate_image(h, w), tile_size=256, overlap=64, band_rows=band_rows)
    assert len(bands) == (1 if band_rows == 512 else 3)  # one pass, or three overlapping bands
    pq = panoptic_quality(truth, inst)
    assert pq["pq"] > 0.95, pq
    assert pq["fp"] == 0  # no nucleus duplicated at a window or band border
    mpq = multi_pq_plus([truth], [truth_cls], [inst], [cls], 5)
    present = [c - 1 for c in np.unique(truth_cls) if c]
    assert np.all(mpq["pq"][present] > 0.9), mpq["pq"]


# --------------------------------------------------------------------------- the job
def baseline_predict(tiles):
    """A deterministic stand-in for a trained model: the classical baseline's nuclei as maps."""
    out = {"np": [], "hv": [], "tp": []}
    for t in tiles:
        inst, _ = threshold_watershed_baseline((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        np_prob, hv, tp = perfect_maps(inst, np.where(inst > 0, 1, 0))
        out["np"].append(np_prob)
        out["hv"].append(hv)
        out["tp"].append(tp)
    return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


def test_segment_inputs_folder_with_a_corrupt_image_and_a_slide(tmp_path, hgsc, monkeypatch):
    from studio.slides import write_pyramid

    image = hgsc[0]
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "good.png", image[:300, :320])
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    (src / "notes.txt").write_text("ignored: neither image nor slide")
    region = image[600:1000, 500:1000]
    write_pyramid(src / "slide.tif", (region[y:y + 256, x:x + 256] for y in range(0, 400, 256)
                                      for x in range(0, 500, 256)), 500, 400, mpp=0.5, compression="deflate")
    seg = NucleiSegmenter(tiny_model())
    monkeypatch.setattr(seg, "predict", baseline_predict)
    events, errors = [], []
    written = segment_inputs([src], tmp_path / "out", seg, progress=events.append, errors=errors)
    out = tmp_path / "out"
    labels = dict(written)
    assert labels["summary"] == out / "summary.csv" and written[-1][0] == "summary"
    for name in ("good inst", "good cls", "good geojson", "good json", "slide geojson"):
        assert labels[name].is_file(), name
    assert "bad inst" not in labels and not (out / "bad.geojson").exists()
    assert [e[0] for e in errors] == ["bad"] and "bad.png" in errors[0][1]
    assert {e["event"] for e in events} >= {"start", "windows", "done", "failed"}

    rows = {r["name"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["bad"]["status"] == "failed" and "corrupt" in rows["bad"]["error"]
    inst = load_npy(out / "good_inst.npy")
    cls = load_npy(out / "good_cls.npy")
    assert inst.shape == (300, 320) and inst.dtype == np.int32 and cls.dtype == np.uint8
    good = rows["good"]
    assert good["status"] == "done" and (good["width"], good["height"]) == ("320", "300")
    assert int(good["n_nuclei"]) == int(inst.max()) > 10
    assert int(good["neoplastic"]) + int(good["unknown"]) == int(good["n_nuclei"])
    geo = json.loads((out / "good.geojson").read_text())
    assert len(geo["features"]) == int(inst.max())
    assert len(json.loads((out / "json" / "good.json").read_text())["nuc"]) == int(inst.max())

    slide = rows["slide"]
    assert slide["status"] == "done" and (slide["width"], slide["height"]) == ("500", "400")
    assert float(slide["mpp"]) == pytest.approx(0.5)
    sgeo = json.loads((out / "slide.geojson").read_text())
    assert len(sgeo["features"]) == int(slide["n_nuclei"]) > 20
    xy = np.concatenate([np.array(f["geometry"]["coordinates"][0]) for f in sgeo["features"]
                         if f["geometry"]["type"] == "Polygon"])
    assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= 500 and xy[:, 1].min() >= 0 and xy[:, 1].max() <= 400
    # the slide's nuclei match the image path on the same pixels (same windows, same merge)
    ref, _, _ = seg.segment(region)
    assert abs(int(slide["n_nuclei"]) - int(ref.max())) <= 2
    assert not list(out.rglob("*.tmp"))


def test_segment_inputs_refuses_unknown_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no such file"):
        expand_segment_inputs([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="expected images or slides"):
        expand_segment_inputs([tmp_path / "a.txt"])
    with pytest.raises(InputError, match="glob matched no"):
        expand_segment_inputs([str(tmp_path / "*.png")])
    with pytest.raises(InputError, match="folder holds no images"):
        expand_segment_inputs([tmp_path])
    (tmp_path / "x").mkdir()
    write_image(tmp_path / "x" / "t.png", np.zeros((8, 8, 3), np.uint8))
    write_image(tmp_path / "t.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="same name"):
        expand_segment_inputs([tmp_path / "x" / "t.png", tmp_path / "t.jpg"])
    with pytest.raises(InputError, match="--overlap"):
        segment_inputs([tmp_path / "t.jpg"], tmp_path / "out", NucleiSegmenter(tiny_model()), overlap=200)


# --------------------------------------------------------------------------- training
def test_training_smoke(tmp_path):
    from training.segmenter import SegmenterConfig, train

    cfg = SegmenterConfig(output_dir=str(tmp_path / "run"), sources=({"name": "phantom", "n": 2, "weight": 1.0},
                                                                     {"name": "hgsc_nest", "weight": 1.0}),
                          stride=256, val_tiles=1, crop_size=64, batch_size=2, max_steps=2, warmup_steps=1,
                          checkpoint_every=2, validate_every=2, log_every=1, widths=(8, 16, 16),
                          decoder_scale=1.0)
    final = train(cfg)
    seg = NucleiSegmenter.from_pretrained(final)
    assert seg.num_classes == 5 and seg.class_names[3] == "connective"
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_2" / "step.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(set(r["sources"]) <= {"real", "phantom"} for r in steps)
    assert any("val_pq" in r and "val_mpq_plus" in r for r in log)

    # fine-tuning: the first run's weights start a second one with class-balanced crops and
    # phantom sources of chosen tissue / class mix; another architecture is refused by name
    from dataclasses import replace

    from pipelines.encoders import load_model_folder
    from pipelines.segmenter import HoVerNetLite
    from training.segmenter import build_model, init_weights

    tuned = replace(cfg, output_dir=str(tmp_path / "tuned"), init_from=str(final), class_balance=0.5,
                    sources=({"name": "phantom", "n": 2, "tissue": "crowded", "weight": 1.0},
                             {"name": "phantom", "n": 2, "seed": 50, "class_mix": {"dead": 1.0}, "weight": 1.0}))
    model = build_model(tuned, 5, list(seg.class_names.values()))
    init_weights(model, final)
    start = load_model_folder(HoVerNetLite, final).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert NucleiSegmenter.from_pretrained(train(tuned)).num_classes == 5
    with pytest.raises(InputError, match="does not match"):
        init_weights(build_model(replace(cfg, widths=(8, 16, 32)), 5, list(seg.class_names.values())), final)
    with pytest.raises(InputError, match="unknown keys"):
        train(replace(tuned, sources=({"name": "phantom", "n": 2, "colour": "red"},)))


def test_image_mpp_resamples_to_the_model_resolution(hgsc, monkeypatch):
    """A 10x-like image (half the model's resolution) is segmented at the model's scale and
    the maps come back on the image's own pixel grid."""
    from PIL import Image

    from studio.metrics import detection_f1, instance_centroids

    image, inst, _ = hgsc
    crop, truth = image[:512, :512], relabel_sequential(inst[:512, :512])
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((256, 256), Image.Resampling.BOX))
    truth_small = np.asarray(Image.fromarray(truth).resize((256, 256), Image.Resampling.NEAREST))
    seg = NucleiSegmenter(tiny_model())
    seg.mpp = 0.5
    monkeypatch.setattr(seg, "predict", baseline_predict)
    native, _, _ = seg.segment(small)
    inst_r, cls_r, info = seg.segment(small, image_mpp=1.0)
    assert inst_r.shape == small.shape[:2] and cls_r.shape == small.shape[:2]
    assert info["working_mpp"] == 0.5 and info["image_mpp"] == 1.0
    ids = np.unique(inst_r[inst_r > 0])
    assert (ids == np.arange(1, len(ids) + 1)).all() and set(info["type_prob"]) == set(ids.tolist())

    def f1(pred):
        return detection_f1(instance_centroids(truth_small)[1], instance_centroids(pred)[1], 4.0)["f1"]

    assert f1(inst_r) > f1(native)  # the baseline-as-model sees nuclei at the size it expects
    with pytest.raises(InputError, match="microns per pixel"):
        seg.segment(small, image_mpp=100.0)


def test_pooled_features_describe_images_for_an_independent_frechet_distance(hgsc):
    """One descriptor per tile, any tile size, that separates real tissue from flat colour:
    the feature space bench/generation.py measures realism in besides the conditioning encoder's."""
    from studio.io import to_tensor

    image, _, _ = hgsc
    model = tiny_model()
    tissue = to_tensor(np.stack([image[:64, :64], image[64:128, 64:128], image[:96, :96][:64, :64]]))
    feats = model.pooled_features(tissue)
    assert feats.shape == (3, 16) and torch.isfinite(feats).all()
    torch.testing.assert_close(model.pooled_features(tissue[:1]), feats[:1])
    assert model.pooled_features(to_tensor(image[:80, :48])).shape == (1, 16)
    flat = torch.full_like(tissue[:1], 0.8)
    assert (model.pooled_features(flat) - feats[0]).norm() > (feats[1] - feats[0]).norm() * 0.1
    with pytest.raises(InputError, match="expected"):
        model.pooled_features(tissue[:, :1])

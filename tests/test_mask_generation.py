"""Mask-conditioned synthesis: control maps, layout editing, the pipeline, ``generate rare``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import tiny_mask_checkpoint, tiny_mask_pipeline
from typer.testing import CliRunner

from pipelines.mask_to_image import MaskToImagePipeline, control_map
from studio.cli import app
from studio.data.base import validate_labels
from studio.data.registry import open_dataset
from studio.data.samples import PANNUKE_CLASSES
from studio.errors import HistostudioError, InputError, WeightsError
from studio.layouts import LayoutEditor, LayoutSource, NucleusStats, parse_classes

DEAD, INFLAMMATORY = 4, 2


def assert_clear_error(result, message: str) -> None:
    """The command failed with a studio error (one clean line from the console script)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, HistostudioError), result.exception
    assert message in " ".join(str(result.exception).split())


@pytest.fixture(scope="module")
def hgsc_source() -> LayoutSource:
    return LayoutSource("hgsc_nest", 64, PANNUKE_CLASSES)


@pytest.fixture(scope="module")
def mask_ckpt(tmp_path_factory) -> str:
    return str(tiny_mask_checkpoint(tmp_path_factory.mktemp("ckpt") / "mask-ldm"))


def test_control_map_one_hot_and_boundaries():
    inst = np.zeros((16, 16), np.int32)
    cls = np.zeros((16, 16), np.uint8)
    inst[2:8, 2:8], cls[2:8, 2:8] = 1, DEAD
    inst[8:14, 8:14], cls[8:14, 8:14] = 2, INFLAMMATORY
    c = control_map(inst, cls, 5)
    assert c.shape == (6, 16, 16) and c.dtype == np.float32
    assert c[DEAD - 1].sum() == 36 and c[INFLAMMATORY - 1].sum() == 36 and c[:5].sum() == 72
    assert c[5].sum() == 2 * 20  # inner outline of two 6x6 squares
    assert (c[5] <= (inst > 0)).all()
    cls[2, 2] = 7
    with pytest.raises(InputError, match="outside the model's classes"):
        control_map(inst, cls, 5)


def test_stats_measured_from_real_labels_with_priors_for_missing(hgsc_source):
    stats = hgsc_source.stats()
    assert stats.shapes[INFLAMMATORY].n > 100  # measured on the real tile
    assert stats.shapes[DEAD].n == 0  # the real tile has no dead nuclei: phantom prior
    # dead nuclei are small and round (4-6 um at 0.5 um/px), inflammatory ones measured larger
    assert np.exp(stats.shapes[DEAD].log_area_mean) < np.exp(stats.shapes[INFLAMMATORY].log_area_mean)
    assert set(stats.to_dict()["classes"]) == set(PANNUKE_CLASSES.values())


@pytest.mark.parametrize("source_name", ["hgsc_nest", "phantom"])
def test_exact_counts_without_overlaps(source_name):
    source = LayoutSource(source_name, 96, PANNUKE_CLASSES)
    editor = LayoutEditor(source.stats())
    rng = np.random.default_rng(3)
    targets = {DEAD: 3, INFLAMMATORY: 2}
    made = 0
    for _ in range(6):
        base = source.draw(rng)
        lay = editor.exact_counts(base, targets, rng)
        if lay is None:
            continue
        made += 1
        assert {c: lay.counts().get(c, 0) for c in targets} == targets
        validate_labels(lay.inst, lay.cls, lay.inst.shape, 5, "layout")  # one class per instance, in range
        ids = np.unique(lay.inst[lay.inst > 0])
        assert (ids == np.arange(1, len(ids) + 1)).all()  # contiguous ids
        assert lay.edits and lay.source
        assert base.counts() != lay.counts() or not lay.edits
    assert made >= 4


def test_editor_keeps_gap_between_added_nuclei():
    from scipy import ndimage as ndi

    stats = NucleusStats.priors(PANNUKE_CLASSES)
    editor = LayoutEditor(stats, gap=2)
    from studio.layouts import Layout

    lay = Layout(np.zeros((64, 64), np.int32), np.zeros((64, 64), np.uint8), "empty")
    rng = np.random.default_rng(0)
    assert editor.add(lay, DEAD, 6, rng) == 6
    for i in range(1, 7):
        grown = ndi.binary_dilation(lay.inst == i, iterations=2)
        assert not np.isin(lay.inst[grown], [j for j in range(1, 7) if j != i]).any()


def test_parse_classes_errors():
    assert parse_classes("dead, inflammatory", PANNUKE_CLASSES) == [DEAD, INFLAMMATORY]
    with pytest.raises(InputError, match="unknown class 'neutrophils'"):
        parse_classes("dead,neutrophils", PANNUKE_CLASSES)
    with pytest.raises(InputError, match="at least one"):
        parse_classes(" , ", PANNUKE_CLASSES)


def test_pipeline_seeds_round_trip_and_errors(tmp_path, hgsc_source):
    pipe = tiny_mask_pipeline()
    rng = np.random.default_rng(0)
    lay = LayoutEditor(hgsc_source.stats()).exact_counts(hgsc_source.draw(rng), {DEAD: 2}, rng)
    masks = [(lay.inst, lay.cls)]

    def run(p, seed, **kw):
        return p(masks, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np",
                 progress=False, **kw).images[0]

    a, b = run(pipe, 0), run(pipe, 1)
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).mean() > 1e-3  # different seeds, different images
    no_mask = run(pipe, 0, controlnet_conditioning_scale=0.0, guidance_scale=1.0)
    assert np.abs(a - no_mask).mean() > 1e-4  # the mask changes the image
    pipe.save_pretrained(tmp_path / "p")
    loaded = MaskToImagePipeline.from_pretrained(tmp_path / "p")
    assert loaded.classes == PANNUKE_CLASSES
    np.testing.assert_allclose(run(loaded, 0), a, atol=1e-5)
    with pytest.raises(InputError, match="control channels"):
        pipe(torch.zeros(1, 3, 64, 64), num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="multiples of 4"):
        pipe([(lay.inst[:62, :62], lay.cls[:62, :62])], num_inference_steps=1, progress=False)
    (tmp_path / "p" / "controlnet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="safetensors"):
        MaskToImagePipeline.from_pretrained(tmp_path / "p")


def test_generate_rare_writes_exact_counts_pannuke(tmp_path, mask_ckpt):
    out = tmp_path / "rare"
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead,inflammatory",
                                      "--count", "3", "--per-patch", "2", "--size", "64", "--steps", "2",
                                      "--min-agreement", "0", "--checkpoint", mask_ckpt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote pannuke dataset" in result.output
    data = open_dataset(out)  # the project's own reader, with its shape/dtype checks
    assert len(data) == 3
    per_tile = []
    for i in range(3):
        s = data.read(i)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        fg = s.inst > 0
        ids, first = np.unique(s.inst[fg], return_index=True)
        classes = s.cls[fg][first]
        per_tile.append(((classes == DEAD).sum(), (classes == INFLAMMATORY).sum()))
        assert s.meta["source"] == "synthetic" and "hgsc_nest" in s.meta["parent"]
    assert per_tile == [(2, 2)] * 3
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["requested_counts"] == prov["written_counts"] == {"dead": 6, "inflammatory": 6}
    assert prov["rejection_rate"] == 0 and (out / "preview.png").is_file()
    from pipelines.rare_generation import pipeline_digest

    # the weights it was drawn with, per component: a cache of generated data can tell when they change
    assert prov["checkpoint_digest"] == pipeline_digest(mask_ckpt) and "controlnet" in prov["checkpoint_digest"]


def test_generate_rare_conic_phantom_and_filter(tmp_path, mask_ckpt):
    out = tmp_path / "conic"
    args = ["generate", "rare", "--labels", "phantom", "--classes", "inflammatory", "--count", "2", "--per-patch",
            "3", "--size", "64", "--steps", "2", "--checkpoint", mask_ckpt, "--format", "conic"]
    result = CliRunner().invoke(app, [*args, "--min-agreement", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = open_dataset(out, "conic")
    assert len(data) == 2
    # a filter nothing passes: clear error, nothing written
    strict = tmp_path / "strict"
    result = CliRunner().invoke(app, [*args, "--min-agreement", "1.0", "--max-attempts", "1", "--out", str(strict)])
    assert_clear_error(result, "passed the mask-agreement filter")
    assert not strict.exists() and not list(tmp_path.glob(".strict*"))


def test_generate_rare_draws_a_class_in_its_home_tissue(tmp_path, mask_ckpt):
    from studio.layouts import home_tissue

    assert home_tissue(["connective"]) == "stroma" and home_tissue(["Inflammatory"]) == "inflamed"
    assert home_tissue(["connective", "dead"]) == "mixed"  # no shared home: the mixed preset
    out = tmp_path / "home"
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", "phantom", "--tissue", "home", "--classes",
                                      "connective", "--count", "1", "--per-patch", "2", "--size", "64", "--steps", "1",
                                      "--min-agreement", "0", "--checkpoint", mask_ckpt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["request"]["tissue"] == "home" and prov["phantom_tissue"] == "stroma"
    assert "stroma" in open_dataset(out).read(0).meta["parent"]


@pytest.mark.parametrize("extra, message", [
    (["--classes", "dead,neutrophils"], "unknown class 'neutrophils'"),
    (["--classes", "dead", "--format", "conic"], "CoNIC has no class for dead"),
    (["--classes", "dead", "--count", "0"], "at least 1 patch"),
    (["--classes", "dead", "--count", "10000000"], "more than one run makes"),
    (["--classes", "dead", "--per-patch", "60"], "would cover"),
])
def test_generate_rare_bad_requests(tmp_path, mask_ckpt, extra, message):
    out = tmp_path / "x"
    args = ["generate", "rare", "--labels", "hgsc_nest", "--count", "2", "--size", "64", "--steps", "1",
            "--checkpoint", mask_ckpt, "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert_clear_error(result, message)
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--count", "-3"], "at least 1 patch"),
    (["--count", "2", "--steps", "0"], "at least 1 step"),
    (["--count", "2", "--min-agreement", "1.5"], "between 0 and 1"),
])
def test_generate_rare_refuses_bad_numbers_before_loading_the_model(tmp_path, monkeypatch, extra, message):
    """The issue-22 battery: --count -3 used to load the checkpoint first. A folder that is
    no checkpoint at all proves nothing was loaded: the option error comes first."""
    from pipelines.mask_to_image import MaskToImagePipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(MaskToImagePipeline, "from_pretrained", never)
    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", "phantom", "--classes", "dead", "--size", "64",
                                      "--checkpoint", str(tmp_path), "--out", str(out), *extra])
    assert_clear_error(result, message)
    assert not out.exists()


def test_generate_rare_dataset_labels_with_foreign_classes(tmp_path, mask_ckpt):
    from studio.data.folder import write_folder
    from studio.data.samples import load_hgsc_nest_labels

    image, inst, cls = load_hgsc_nest_labels()
    from studio.data.base import NucleiSample

    ds = tmp_path / "ds"
    write_folder(ds, [NucleiSample(image[:128, :128], inst[:128, :128], cls[:128, :128], {"name": "a",
                                                                                          "source": "real"})])
    (ds / "classes.json").write_text(json.dumps({"1": "neoplastic", "2": "inflammatory", "3": "mitotic"}))
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", str(ds), "--classes", "dead", "--count", "1",
                                      "--size", "64", "--steps", "1", "--checkpoint", mask_ckpt,
                                      "--out", str(tmp_path / "o")])
    assert_clear_error(result, "not one of the model's classes")


@pytest.mark.parametrize("bank_size", [0, 6])
def test_controlnet_training_runs_validates_and_resumes(tmp_path, bank_size):
    """Per-batch encoding (bank 0) and the pre-encoded crop bank train, validate and resume alike."""
    import yaml
    from factories import tiny_checkpoint

    from training.controlnet import main

    base = tiny_checkpoint(tmp_path / "base")
    encoder = json.loads((base / "encoder.json").read_text())["encoder"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "base": str(base), "encoder": encoder, "crop_size": 64,
        "batch_size": 2, "max_steps": 2, "validate_every": 2, "checkpoint_every": 1, "validation_steps": 2,
        "bank_size": bank_size, "sources": [{"name": "phantom", "n": 2, "seed": 5, "size": 96, "weight": 1.0}]}))
    final = main(["--config", str(recipe)])
    pipe = MaskToImagePipeline.from_pretrained(final)
    assert pipe.classes == PANNUKE_CLASSES
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_f1", "val_dice", "val_f1_unconditioned"} <= set(rows[-1])
    assert (tmp_path / "run" / "validation" / "step_000002.png").is_file()
    # resume from the last checkpoint continues to a longer schedule
    final = main(["--config", str(recipe), "--resume", "latest", "--max-steps", "3"])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_3").is_dir()
    if bank_size:
        _fine_tune_from_trained(tmp_path, recipe, final, base)


def _fine_tune_from_trained(tmp_path, recipe, trained, base):
    """``init_controlnet`` starts from a trained pipeline's ControlNet (exactly its weights) and
    refuses one built for another class table; the class-balanced, class-weighted recipe trains."""
    import yaml

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from training.controlnet import ControlNetConfig, init_controlnet, main

    pipe = EmbeddingToImagePipeline.from_pretrained(base)
    unet, factor = pipe.unet, pipe.latent_factor
    cfg = ControlNetConfig(base=str(base), init_controlnet=str(trained))
    start = init_controlnet(cfg, unet, len(PANNUKE_CLASSES), factor).state_dict()
    saved = MaskToImagePipeline.from_pretrained(trained).controlnet.state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    with pytest.raises(WeightsError, match="does not fit"):
        init_controlnet(cfg, unet, 3, factor)
    values = yaml.safe_load(recipe.read_text())
    values.update({"output_dir": str(tmp_path / "tuned"), "init_controlnet": str(trained), "class_balance": 0.6,
                   "class_loss_weights": {"connective": 4.0}, "max_steps": 1, "validate_every": 1})
    recipe.write_text(yaml.safe_dump(values))
    tuned = main(["--config", str(recipe)])
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["class_loss_weights"] == {"connective": 4.0}
    assert MaskToImagePipeline.from_pretrained(tuned).classes == PANNUKE_CLASSES


def test_control_bank_holds_what_per_batch_encoding_would_give(tmp_path):
    from factories import tiny_checkpoint

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from training.controlnet import ControlBank
    from training.segmenter import BatchSampler, SegmenterConfig, build_training_data

    base = EmbeddingToImagePipeline.from_pretrained(tiny_checkpoint(tmp_path / "base"))
    data, p = build_training_data(SegmenterConfig(sources=({"name": "phantom", "n": 2, "seed": 5, "size": 96,
                                                             "weight": 1.0},), stride=64))
    sampler = BatchSampler(data, p, 64, seed=0)
    bank = ControlBank(sampler, 5, base.vae, None, len(PANNUKE_CLASSES), "cpu", batch=4)
    assert len(bank) == 5 and set(bank.parts) == {"mean", "std", "control"}
    direct = sampler.batch(50_000_004, 1)  # the bank's 5th crop is the second chunk's first draw
    with torch.no_grad():
        mean = base.vae.encode(direct["image"] * 2 - 1).latent_dist.mean * base.vae.config.scaling_factor
    torch.testing.assert_close(bank.parts["mean"][4], mean[0])
    expected = control_map(direct["inst"][0], direct["tp"][0].numpy(), len(PANNUKE_CLASSES))
    np.testing.assert_array_equal(bank.parts["control"][4].numpy(), expected)
    drawn = bank.batch(3, torch.Generator().manual_seed(1))
    assert drawn["latents"].shape == (3, *mean.shape[1:]) and drawn["control"].dtype == torch.float32


def test_generate_rare_without_a_checkpoint_names_the_recipe(tmp_path):
    result = CliRunner().invoke(app, ["generate", "rare", "--labels", "hgsc_nest", "--classes", "dead", "--count",
                                      "1", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert_clear_error(result, "training/recipes/controlnet.yaml")
    assert not (tmp_path / "o").exists()


def _scarce_class_tile() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 256 px tile with 40 inflammatory nuclei and one connective nucleus in a corner."""
    from studio.layouts import ellipse

    inst = np.zeros((256, 256), np.int32)
    cls = np.zeros((256, 256), np.uint8)
    nid = 0
    for y in range(40, 240, 32):
        for x in range(40, 240, 32):
            nid += 1
            m = ellipse(inst.shape, y, x, 10, 10, 0.0)
            inst[m], cls[m] = nid, 2
    m = ellipse(inst.shape, 12, 12, 14, 6, 0.3)
    inst[m], cls[m] = nid + 1, 3
    image = np.full((256, 256, 3), 220, np.uint8)
    image[inst > 0] = (90, 60, 140)
    return image, inst, cls


def test_class_balanced_crops_show_the_scarce_class_as_often_as_the_common_one():
    from studio.data.base import ArrayNucleiDataset, NucleiSample
    from training.segmenter import BatchSampler

    image, inst, cls = _scarce_class_tile()
    data = ArrayNucleiDataset([NucleiSample(image, inst, cls, {})], PANNUKE_CLASSES, source="real")

    def share_with_connective(balance: float) -> float:
        sampler = BatchSampler(data, np.ones(1), 64, seed=0, class_balance=balance)
        tp = np.concatenate([sampler.batch(step, 8)["tp"].numpy() for step in range(25)])
        return float(np.mean([(t == 3).any() for t in tp]))

    uniform, balanced = share_with_connective(0.0), share_with_connective(1.0)
    assert uniform < 0.12  # one nucleus in a corner: few uniform 64 px crops reach it
    assert 0.35 < balanced < 0.65  # two classes present -> about half the crops are centred on it
    # class_balance 0 keeps the random stream (and so shipped checkpoints) unchanged
    a = BatchSampler(data, np.ones(1), 64, seed=3).batch(7, 4)["inst"]
    b = BatchSampler(data, np.ones(1), 64, seed=3, class_balance=0.0).batch(7, 4)["inst"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="class_balance"):
        BatchSampler(data, np.ones(1), 64, class_balance=1.5)


def test_class_loss_weights_weigh_latent_pixels_by_nucleus_coverage():
    from training.controlnet import ControlNetConfig, class_weight_vector, loss_weight_map

    control = torch.zeros(1, 6, 16, 16)
    control[0, 2, :8, :8] = 1  # connective nucleus filling the top-left latent pixel's footprint (8x8)
    control[0, 1, 8:12, 8:16] = 1  # an inflammatory nucleus covering half of another
    w = class_weight_vector(ControlNetConfig(class_loss_weights={"connective": 4.0}), dict(PANNUKE_CLASSES))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0]))
    got = loss_weight_map(control, w, (2, 2))
    torch.testing.assert_close(got, torch.tensor([[[[4.0, 1.0], [1.0, 1.0]]]]))
    control[0, 2, :8, :8] = 0
    control[0, 2, :4, :8] = 1  # half coverage -> half the extra weight
    assert loss_weight_map(control, w, (2, 2))[0, 0, 0, 0].item() == pytest.approx(2.5)
    assert class_weight_vector(ControlNetConfig(), dict(PANNUKE_CLASSES)) is None
    with pytest.raises(InputError, match="unknown class"):
        class_weight_vector(ControlNetConfig(class_loss_weights={"stroma": 2.0}), dict(PANNUKE_CLASSES))
    with pytest.raises(InputError, match="> 0"):
        class_weight_vector(ControlNetConfig(class_loss_weights={"connective": 0.0}), dict(PANNUKE_CLASSES))

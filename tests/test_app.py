"""The Streamlit app (streamlit.testing.v1.AppTest, in-process) and its plain helpers:
upload validation, the comparison numbers, the DAB read-out."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from factories import tiny_checkpoint
from streamlit.testing.v1 import AppTest

from studio.app.common import MAX_SIDE, decode_upload, sniff_format, tissue_crops
from studio.app.compare import structure_ssim, tissue_colour_delta_e
from studio.app.dab import dab_heatmap, dab_positive_fraction, wipe
from studio.data.samples import load_sample
from studio.errors import InputError
from studio.stain import StainProfile

torch.set_num_threads(1)
APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
TIMEOUT = 120  # seconds per script run (first runs import torch & co. on a busy 2-core machine)


# --------------------------------------------------------------------------- helpers
def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def he_tile(size: int = 256) -> np.ndarray:
    return np.ascontiguousarray(load_sample("hgsc_nest")[200:200 + size, 300:300 + size])


@pytest.fixture
def empty_checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "no-checkpoints"
    folder.mkdir()
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(folder))
    return folder


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if page:
        at.query_params["page"] = page
    return at.run()


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def image_captions(at: AppTest) -> list[str]:
    return [c for element in at.get("image") for c in element.captions]


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


# --------------------------------------------------------------------------- upload validation
def test_uploads_are_validated_with_clear_messages():
    tile = he_tile(64)
    assert decode_upload("tile.png", png(tile)).shape == (64, 64, 3)
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=95)
    assert decode_upload("tile.jpeg", buf.getvalue()).shape == (64, 64, 3)
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="TIFF")
    assert np.array_equal(decode_upload("tile.tif", buf.getvalue()), tile)
    assert sniff_format(png(tile)) == ".png" and sniff_format(b"GIF89a") is None

    cases = {
        "grayscale": ("g.png", png(tile[..., 0]), "grayscale"),
        "truncated": ("t.png", png(tile)[:200], "corrupt or truncated"),
        "not an image": ("n.png", b"hello, this is text" * 10, "not a PNG, JPEG or TIFF"),
        "extension": ("x.bmp", png(tile), "upload a PNG, JPEG or TIFF"),
        "empty": ("e.png", b"", "empty"),
        "too many bytes": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20), "limit is 20 MB"),
        "too many pixels": ("wide.png", png(np.zeros((16, MAX_SIDE + 8, 3), np.uint8)), f"limit is {MAX_SIDE} px"),
    }
    for label, (name, data, message) in cases.items():
        with pytest.raises(InputError, match=message) as info:
            decode_upload(name, data)
        assert str(info.value).startswith(f"{name}: "), label  # names the user's file, not a temp path
        assert "/tmp" not in str(info.value), label


# --------------------------------------------------------------------------- comparison numbers
def test_comparison_numbers_mean_what_they_say():
    from studio.transforms import create_tile_transform

    reference = load_sample("tiatoolbox_target")
    skin = load_sample("skin")
    y, x = tissue_crops(skin, 256, 1)[0]
    tile = np.ascontiguousarray(skin[y:y + 256, x:x + 256])
    assert structure_ssim(tile, tile) == pytest.approx(1.0, abs=1e-6)
    assert tissue_colour_delta_e(tile, tile) == pytest.approx(0.0, abs=1e-3)
    assert np.isnan(tissue_colour_delta_e(np.full((64, 64, 3), 250, np.uint8), reference))  # glass: no tissue
    out = create_tile_transform("reinhard", reference="tiatoolbox_target", workers=1).apply(tile[None], None)[0]
    before, after = tissue_colour_delta_e(tile, reference), tissue_colour_delta_e(out, reference)
    assert after < 0.5 * before, (before, after)  # normalized colour is much closer to the reference
    assert 0.5 < structure_ssim(tile, out) < 1.0  # structure kept, colour changed


# --------------------------------------------------------------------------- DAB read-out
def test_dab_readout_on_real_ihc_and_real_he():
    ihc = load_sample("ihc")
    fraction = dab_positive_fraction(ihc)
    assert 0.15 < fraction < 0.40, fraction  # strong DAB in the colonic glands (0.26 at the default threshold)
    assert dab_positive_fraction(ihc, threshold=0.05) > fraction > dab_positive_fraction(ihc, threshold=0.2)
    for name in ("hgsc_nest", "tiatoolbox_target", "skin"):
        he = np.ascontiguousarray(load_sample(name)[:512, :512])
        assert dab_positive_fraction(he) < 0.01, name  # H&E has no DAB
    heat_ihc, heat_he = dab_heatmap(ihc), dab_heatmap(np.ascontiguousarray(load_sample("hgsc_nest")[:512, :512]))
    assert heat_ihc.shape == (512, 512, 3) and heat_ihc.dtype == np.uint8
    assert heat_ihc.mean() > heat_he.mean() + 20  # the DAB map lights up on IHC only
    assert dab_positive_fraction(np.full((32, 32, 3), 255, np.uint8)) == 0.0  # glass only
    composite = wipe(np.zeros((8, 10, 3), np.uint8), np.full((8, 10, 3), 100, np.uint8), 0.5)
    assert composite[0, 0, 0] == 0 and composite[0, -1, 0] == 100 and composite[0, 5, 0] == 255
    with pytest.raises(InputError, match="uint8 RGB"):
        dab_positive_fraction(np.zeros((8, 8), np.uint8))


# --------------------------------------------------------------------------- pages
def test_normalize_page_compares_methods_with_metrics_and_downloads(empty_checkpoints):
    at = app()
    no_exception(at)
    assert at.title[0].value == "Stain normalization"
    assert "none yet" in " ".join(m.value for m in at.sidebar.markdown)  # sidebar: studio.info facts
    table = at.dataframe[0].value
    methods = ("macenko", "reinhard", "vahadane")
    assert set(table["method"]) == {"(source)", *methods}
    assert len(table) == 2 * 4  # two sample crops x (source + 3 methods)
    scored = table[table["method"] != "(source)"]
    assert scored["SSIM to source"].between(0.3, 1.0).all()
    for tile, rows in table.groupby("tile"):
        before = rows.loc[rows["method"] == "(source)", "ΔE00 to reference"].item()
        after = rows.loc[rows["method"] == "reinhard", "ΔE00 to reference"].item()
        assert after < before, (tile, before, after)
    captions = image_captions(at)
    assert all(any(c.startswith(f"{m}: skin@") for c in captions) for m in methods)
    labels = [d.label for d in at.download_button]
    assert [f"{m} profile (JSON)" for m in methods] == labels[:3] and labels.count("PNG") == 6
    assert any("SSIM" in c.value and "ΔE00" in c.value for c in at.caption)

    # The downloadable profile is the fitted target, loadable by `histostudio normalize --reference`.
    from studio.app.normalize_page import fitted_transform, profile_json

    reference = load_sample("tiatoolbox_target")
    profile = StainProfile.from_dict(json.loads(profile_json(fitted_transform("macenko", "k", "ref", reference))))
    assert profile.method == "macenko" and profile.source == "ref" and not profile.fallback

    # Upload a real tile as the source instead of sample crops.
    at.radio(key="norm_src_mode").set_value("Upload").run()
    assert at.info and "Choose a reference" in at.info[0].value  # nothing uploaded yet: no grid, no error
    at.file_uploader(key="norm_src_files").set_value([("he_tile.png", png(he_tile()), "image/png")]).run()
    no_exception(at)
    assert not at.error
    assert {"macenko: he_tile.png", "reinhard: he_tile.png", "vahadane: he_tile.png"} <= set(image_captions(at))
    assert set(at.dataframe[0].value["tile"]) == {"he_tile.png"}


def test_bad_uploads_show_an_error_and_the_app_keeps_working(empty_checkpoints):
    at = app()
    at.radio(key="norm_src_mode").set_value("Upload").run()
    gray = png(he_tile(64)[..., 0])
    corrupt = png(he_tile(64))[:300]
    oversize = b"\x89PNG\r\n\x1a\n" + bytes(21 * 2**20)
    at.file_uploader(key="norm_src_files").set_value([
        ("corrupt.png", corrupt, "image/png"), ("gray.png", gray, "image/png"), ("huge.png", oversize, "image/png"),
        ("good.png", png(he_tile(128)), "image/png"),
    ]).run()
    no_exception(at)
    text = errors(at)
    assert "corrupt.png: corrupt or truncated" in text
    assert "gray.png: is a grayscale image" in text
    assert "huge.png: is 21.0 MB; the limit is 20 MB" in text
    assert "Traceback" not in text
    assert "macenko: good.png" in image_captions(at)  # the good file is still compared

    # A bad reference: error shown, no comparison, and a good one brings everything back.
    at.radio(key="norm_ref_mode").set_value("Upload").run()
    at.file_uploader(key="norm_ref_file").set_value(("ref.png", b"not an image at all", "image/png")).run()
    no_exception(at)
    assert "ref.png: is not a PNG, JPEG or TIFF image" in errors(at)
    assert not at.dataframe
    at.file_uploader(key="norm_ref_file").set_value(("ref.png", png(load_sample("tiatoolbox_target")[:512, :512]),
                                                     "image/png")).run()
    no_exception(at)
    assert at.dataframe and set(at.dataframe[0].value["tile"]) == {"good.png"}


def test_plugin_transforms_are_compared_and_a_failing_one_does_not_break_the_page(empty_checkpoints, monkeypatch):
    import studio.transforms

    class Negative:  # a stand-in plugin: anything with the TileTransform interface
        name, pixelwise = "negative", True

        def estimate(self, tiles):
            return None

        def apply(self, tiles, source):
            return 255 - np.asarray(tiles)

        def describe(self):
            return {"method": "negative"}

    def broken(**kwargs):
        raise RuntimeError("weights not found")

    classical = studio.transforms.registered_transforms
    monkeypatch.setattr(studio.transforms, "registered_transforms",
                        lambda: {**classical(), "negative": lambda **kw: Negative(), "broken": broken})
    at = app()
    assert "negative" in at.multiselect(key="norm_methods").options
    at.number_input(key="norm_src_count").set_value(1)
    at.multiselect(key="norm_methods").set_value(["reinhard", "negative", "broken"]).run()
    no_exception(at)
    assert "broken: RuntimeError: weights not found" in errors(at)
    assert {"negative", "reinhard"} <= set(at.dataframe[0].value["method"])
    assert any(c.startswith("negative: skin@") for c in image_captions(at))
    assert [d.label for d in at.download_button].count("reinhard profile (JSON)") == 1  # plugins: no profile


def test_generate_without_checkpoint_explains_how_to_train_one(empty_checkpoints):
    at = app("generate")
    no_exception(at)
    assert at.title[0].value == "Generate"
    message = at.info[0].value
    assert "python -m training.ldm --config training/recipes/ldm.yaml" in message
    assert str(empty_checkpoints / "embedding-ldm") in message
    assert not at.button and not at.number_input  # no controls that cannot work


def test_generate_variations_with_a_tiny_checkpoint(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "ckpts" / "embedding-ldm")
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(tmp_path / "ckpts"))
    at = app("generate")
    no_exception(at)
    assert at.selectbox(key="gen_checkpoint").value == "embedding-ldm"
    at.selectbox(key="gen_size").set_value(128)
    at.number_input(key="gen_n").set_value(2)
    at.number_input(key="gen_steps").set_value(2)
    at.number_input(key="gen_seed").set_value(7)
    at.button(key="gen_go").click().run()
    no_exception(at)
    assert not at.error
    result = at.session_state["gen_result"]
    images = result["images"]
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1]) and images.std() > 1
    assert result["manifest"]["seeds"] == [7, 8] and result["manifest"]["grid"] == [2, 2]
    assert ["seed 7", "seed 8"] == [c for c in image_captions(at) if c.startswith("seed")]
    assert any(d.label.startswith("Download all") for d in at.download_button)

    from studio.app.generate_page import results_zip

    names = zipfile.ZipFile(io.BytesIO(results_zip(result, "hgsc_nest"))).namelist()
    assert sorted(names) == ["manifest.json", "source.png", "variation_0007.png", "variation_0008.png"]


def test_virtual_ihc_page_without_a_checkpoint_says_so_and_reads_real_dab(empty_checkpoints):
    at = app("virtual-ihc")
    no_exception(at)
    assert at.title[0].value == "Virtual IHC"
    assert "python -m training.virtual_ihc" in at.info[0].value
    assert at.metric[0].value == "25.9 %"  # DAB-positive share of the real IHC sample
    assert 20 < float(at.metric[1].value) < 120  # pixel H-score of a real HER2-like image
    at.slider(key="dab_thr").set_value(0.2).run()
    assert float(at.metric[0].value.rstrip(" %")) < 10


def test_virtual_ihc_page_with_a_tiny_checkpoint(empty_checkpoints):
    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline

    torch.manual_seed(0)
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16)), stain="ki67").save_pretrained(
        empty_checkpoints / "virtual-ihc-ki67")
    at = app("virtual-ihc")
    no_exception(at)
    assert not at.info
    assert at.radio(key="vihc_stain").options == ["Ki67"]
    assert at.radio(key="vihc_model").options == ["fast"]
    at.selectbox(key="vihc_src_sample").set_value("tiatoolbox_target").run()
    no_exception(at)
    captions = image_captions(at)
    assert "H&E: tiatoolbox_target" in captions and "virtual Ki67" in captions
    assert any(c.startswith("DAB heat map") for c in captions)
    assert at.slider(key="vihc_wipe").value == 50
    assert at.metric[0].value.endswith("%")


def test_generate_rare_patches_with_a_tiny_mask_checkpoint(tmp_path, monkeypatch):
    from factories import tiny_mask_checkpoint

    tiny_mask_checkpoint(tmp_path / "ckpts" / "mask-ldm")
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(tmp_path / "ckpts"))
    at = app("generate")
    no_exception(at)
    assert at.multiselect(key="rare_classes").value == ["dead", "inflammatory"]
    at.number_input(key="rare_count").set_value(2)
    at.number_input(key="rare_per_patch").set_value(2)
    at.number_input(key="rare_steps").set_value(2)
    at.number_input(key="rare_min_agreement").set_value(1.0)  # an untrained model cannot pass this
    at.button(key="rare_go").click().run()
    no_exception(at)
    assert "mask-agreement filter" in errors(at) and "rare_result" not in at.session_state
    at.number_input(key="rare_min_agreement").set_value(0.0)
    at.button(key="rare_go").click().run()
    no_exception(at)
    assert not at.error
    result = at.session_state["rare_result"]
    assert len(result["images"]) == 2 and result["provenance"]["written_counts"] == {"dead": 4, "inflammatory": 4}
    names = zipfile.ZipFile(io.BytesIO(result["zip"])).namelist()
    assert {"images.npy", "masks.npy", "types.npy", "provenance.json"} <= set(names)

"""The app's Generate and Virtual IHC pages list the installed published models beside the
shipped checkpoints, and run a ready PixCell folder (tiny, in the published layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
from factories_published import write_models_dir, write_pixcell, write_sd35_vae
from streamlit.testing.v1 import AppTest

torch.set_num_threads(1)
APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
TIMEOUT = 180


def app(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["page"] = page
    return at.run()


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture
def no_checkpoints(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "no-checkpoints"
    folder.mkdir()
    monkeypatch.setenv("HISTOSTUDIO_CHECKPOINTS", str(folder))
    return folder


def table_rows(at: AppTest) -> list[dict]:
    frame = at.dataframe[0].value
    return frame.to_dict("records")


def test_without_a_models_folder_the_pages_say_where_they_look(no_checkpoints, monkeypatch):
    monkeypatch.delenv("HISTOSTUDIO_MODELS", raising=False)
    for page in ("generate", "virtual-ihc"):
        at = app(page)
        no_exception(at)
        assert any("HISTOSTUDIO_MODELS" in c.value for c in at.caption), page


def test_a_ready_pixcell_folder_is_offered_and_generates(no_checkpoints, tmp_path, monkeypatch):
    models = write_models_dir(tmp_path / "models")
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(tmp_path / "models"))
    at = app("generate")
    no_exception(at)
    assert not at.info  # a published model is a generation model: no "train one first"
    assert at.selectbox(key="gen_checkpoint").options == ["PixCell-256 · published"]
    rows = {r["name"]: r for r in table_rows(at)}
    assert set(rows) == {"PixCell-256", "UNI2-h", "sd3.5-vae"} and all(r["status"] == "ready" for r in rows.values())
    assert rows["PixCell-256"]["from"] and rows["PixCell-256"]["kind"] == "pixcell"
    at.selectbox(key="gen_size").set_value(256)
    at.number_input(key="gen_n").set_value(1)
    at.number_input(key="gen_steps").set_value(2)
    at.button(key="gen_go").click().run()
    no_exception(at)
    assert not at.error
    result = at.session_state["gen_result"]
    assert result["images"].shape == (1, 256, 256, 3) and result["images"].std() > 0
    assert result["manifest"]["encoder_identity"].startswith("uni2h:")
    assert result["manifest"]["checkpoint"] == str(models["pixcell"])


def test_pixcell_without_uni2h_is_listed_but_not_offered(no_checkpoints, tmp_path, monkeypatch):
    write_pixcell(tmp_path / "models" / "PixCell-256")
    write_sd35_vae(tmp_path / "models" / "sd3.5-vae")
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(tmp_path / "models"))
    at = app("generate")
    no_exception(at)
    assert "No generation checkpoint yet" in at.info[0].value  # nothing runnable yet
    assert {r["name"] for r in table_rows(at)} == {"PixCell-256", "sd3.5-vae"}
    assert any("UNI-2h" in c.value and "offered" in c.value for c in at.caption)


def test_virtual_ihc_page_lists_published_models(no_checkpoints, tmp_path, monkeypatch):
    write_models_dir(tmp_path / "models", tokens=16)
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(tmp_path / "models"))
    at = app("virtual-ihc")
    no_exception(at)
    rows = {r["name"]: r["status"] for r in table_rows(at)}
    assert rows == {"PixCell-1024": "ready", "UNI2-h": "ready", "sd3.5-vae": "ready"}
    assert len(at.metric) == 2  # the real-IHC read-out still shows beneath


def test_virtual_ihc_page_runs_the_published_staining_release(no_checkpoints, tmp_path, monkeypatch):
    from factories_staining import write_staining_models_dir

    write_staining_models_dir(tmp_path / "models")  # PixCell-1024, UNI-2h, VAE and a HER2 release
    monkeypatch.setenv("HISTOSTUDIO_MODELS", str(tmp_path / "models"))
    at = app("virtual-ihc")
    no_exception(at)
    assert not at.info  # a published stain counts: no "train one first"
    assert at.radio(key="vihc_stain").options == ["HER2"] and at.radio(key="vihc_model").options == ["pixcell"]
    captions = [c for element in at.get("image") for c in element.captions]
    assert "virtual HER2" in captions, captions
    assert at.metric[0].value.endswith("%")

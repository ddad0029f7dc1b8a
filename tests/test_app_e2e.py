"""The app in a real browser: `streamlit run` in a subprocess, driven by Playwright with
Debian's Chromium (``scripts/install_chromium.sh``; ``playwright install`` is never used).

Skipped cleanly when /usr/bin/chromium or the playwright package is missing. With
``HISTOSTUDIO_UPDATE_SCREENSHOT=1`` the page screenshot is also written to
``docs/app_screenshot.png``.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.data.samples import load_sample

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
START_TIMEOUT = 90  # seconds for the server to answer its health check
STEP_TIMEOUT_MS = 90_000  # per page step (first script runs import torch & co. on a busy machine)

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (scripts/install_chromium.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run streamlit_app.py`` on a free loopback port; yields its URL."""
    work = tmp_path_factory.mktemp("app-server")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited ({proc.returncode}): {(work / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start in {START_TIMEOUT} s: {(work / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_normalize_page_in_a_real_browser(server, browser, tmp_path):
    tile = tmp_path / "he_tile.png"
    Image.fromarray(np.ascontiguousarray(load_sample("hgsc_nest")[200:584, 300:684])).save(tile)
    page = browser.new_page(viewport={"width": 1400, "height": 1560})
    try:
        page.goto(f"{server}/?page=normalize")
        radios = page.locator('[data-testid="stRadio"]')
        radios.nth(1).wait_for(timeout=STEP_TIMEOUT_MS)
        assert "Source from" in radios.nth(1).inner_text()
        radios.nth(1).get_by_text("Upload", exact=True).click()
        uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]').first
        uploader.wait_for(state="attached", timeout=STEP_TIMEOUT_MS)
        uploader.set_input_files(str(tile))

        for method in ("macenko", "reinhard", "vahadane"):
            page.get_by_text(f"{method}: he_tile.png", exact=True).wait_for(timeout=STEP_TIMEOUT_MS)
        page.get_by_text("ΔE00", exact=False).first.wait_for(timeout=STEP_TIMEOUT_MS)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0

        image = page.locator('[data-testid="stImage"]', has=page.get_by_text("macenko: he_tile.png",
                                                                           exact=True)).locator("img").first
        image.wait_for(state="visible", timeout=STEP_TIMEOUT_MS)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=STEP_TIMEOUT_MS)
        pixels = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 20, pixels.std()  # tissue, not a blank or broken image
        assert pixels.mean() < 235  # not white

        page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "app_screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("HISTOSTUDIO_UPDATE_SCREENSHOT") == "1":
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(shot, ROOT / "docs" / "app_screenshot.png")
    finally:
        page.close()


def test_virtual_ihc_page_in_a_real_browser(server, browser, tmp_path):
    """Upload a real H&E tile on the virtual IHC page (shipped HER2 checkpoint) and wait for
    the virtual stain to render."""
    if not (ROOT / "checkpoints" / "virtual-ihc-her2" / "model_index.json").is_file():
        pytest.skip("no shipped virtual-ihc-her2 checkpoint")
    tile = tmp_path / "breast_he.png"
    Image.fromarray(np.ascontiguousarray(load_sample("tiatoolbox_target")[300:556, 0:256])).save(tile)
    page = browser.new_page(viewport={"width": 1400, "height": 1560})
    try:
        page.goto(f"{server}/?page=virtual-ihc")
        source = page.locator('[data-testid="stRadio"]', has=page.get_by_text("H&E from", exact=True)).first
        source.wait_for(timeout=STEP_TIMEOUT_MS)
        source.get_by_text("Upload", exact=True).click()
        uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]').first
        uploader.wait_for(state="attached", timeout=STEP_TIMEOUT_MS)
        uploader.set_input_files(str(tile))

        page.get_by_text("virtual HER2", exact=True).wait_for(timeout=STEP_TIMEOUT_MS)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0
        image = page.locator('[data-testid="stImage"]', has=page.get_by_text("virtual HER2", exact=True)
                             ).locator("img").first
        image.wait_for(state="visible", timeout=STEP_TIMEOUT_MS)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=STEP_TIMEOUT_MS)
        pixels = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 100 and pixels.std() > 10  # a stained image, not a blank one
        brown = (pixels[..., 0] > pixels[..., 2] + 15).mean()  # DAB is brown: red above blue
        assert brown > 0.005, brown
        page.get_by_text("DAB-positive tissue", exact=False).first.wait_for(timeout=STEP_TIMEOUT_MS)
        shot = tmp_path / "virtual_ihc.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("HISTOSTUDIO_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "app_virtual_ihc.png")
    finally:
        page.close()

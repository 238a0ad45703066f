"""The link `kd demo` prints, opened in a real browser (headless Chromium) against `mlflow ui`."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from mlflow import MlflowClient

from kd.tracking import tags as T
from kd.tracking.store import TRAINING_VIEW
from tests.conftest import run_kd

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


TRAINING_SIDEBAR = ("Runs", "Models")  # MLflow 3's model-training sidebar; the GenAI one has these instead:
GENAI_SIDEBAR = ("Evaluation runs", "Agent versions")
WAIT_MS = 180_000  # a loaded CI machine serves MLflow's pages slowly


def assert_training_view(page: Any) -> None:
    sidebar = page.locator("aside").inner_text()
    assert all(item in sidebar for item in TRAINING_SIDEBAR), sidebar
    assert not any(item in sidebar for item in GENAI_SIDEBAR), sidebar


@pytest.mark.slow
def test_the_demo_link_and_kd_links_stay_in_model_training(store, tmp_path):
    """The link `kd demo` prints opens kd's runs table; a student's page, its teacher's registered version
    and the teacher's logged model, each opened by the link kd writes, show model training and the
    registration both ways. Screenshots in tmp_path: runs, student, version, logged-model, models."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("no Chromium: apt-get install -y chromium (.ci/install_system.sh)")
    demo = run_kd("demo", "--epochs", "1", "--device", "cpu")
    assert demo.returncode == 0, demo.stderr
    command, url = re.search(r"run `(mlflow ui [^`]+)`, then open (\S+)", demo.stdout).groups()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client = MlflowClient()
    exp = client.get_experiment_by_name("demo").experiment_id
    [student] = client.search_runs([exp], f"tags.`{T.METHOD}` = 'logit'")
    version = client.search_model_versions("name = 'digits-ResNet20'")[0]
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", *command.split()[1:3], store, "--port", str(port),
                           "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{base}/health")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            page.goto(url.replace("http://127.0.0.1:5000", base))
            for name in ("teacher-s0-digits-ResNet20", "pure-s0-digits-ResNet8", "logit-a0.5-s0-digits-"):
                page.get_by_text(re.compile(re.escape(name))).first.wait_for()
            page.get_by_text("Sort: best_test_acc").wait_for()  # kd's saved view: its order and columns
            assert "final_test_acc" in page.inner_text("body")
            assert_training_view(page)
            page.screenshot(path=str(tmp_path / "runs.png"))

            page.goto(f"{base}/#/experiments/{exp}/runs/{student.info.run_id}?{TRAINING_VIEW}")  # as kd links it
            page.get_by_text("Student ResNet8 distilled from ResNet20").first.wait_for()
            assert_training_view(page)
            page.screenshot(path=str(tmp_path / "student.png"), full_page=True)

            teacher_link = page.get_by_role("link", name=f"digits-ResNet20 v{version.version}").first  # its teacher's
            page.goto(urljoin(page.url, teacher_link.get_attribute("href")))  # (the note's links open a new tab)
            page.get_by_text("float32 images in [0, 1]").first.wait_for()
            assert_training_view(page)
            assert "teacher-s0-digits-ResNet20" in page.inner_text("body")  # source run and logged model
            page.screenshot(path=str(tmp_path / "version.png"), full_page=True)

            model_id = version.source.removeprefix("models:/")
            page.goto(f"{base}/#/experiments/{exp}/models/{model_id}?{TRAINING_VIEW}")
            page.get_by_text("Model versions").wait_for()
            page.get_by_role("link", name="digits-ResNet20").first.wait_for()  # registered, not "Not registered"
            assert_training_view(page)
            page.screenshot(path=str(tmp_path / "logged-model.png"), full_page=True)

            page.set_viewport_size({"width": 2600, "height": 1000})  # the grid renders only the columns in view
            page.goto(f"{base}/#/experiments/{exp}/models?{TRAINING_VIEW}")
            page.get_by_role("link", name="digits-ResNet20").first.wait_for()  # the Models tab's registered column
            page.screenshot(path=str(tmp_path / "models.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)

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

import pytest

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


@pytest.mark.slow
def test_the_demo_link_shows_the_demo_runs_with_their_method(store, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("no Chromium: apt-get install -y chromium (.ci/install_system.sh)")
    demo = run_kd("demo", "--epochs", "1", "--device", "cpu")
    assert demo.returncode == 0, demo.stderr
    command, url = re.search(r"run `(mlflow ui [^`]+)`, then open (\S+)", demo.stdout).groups()
    port = free_port()
    url = url.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", *command.split()[1:3], store, "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            for name in ("teacher-s0-digits-ResNet20", "pure-s0-digits-ResNet8", "logit-a0.5-s0-digits-"):
                page.get_by_text(re.compile(re.escape(name))).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "runs.png"))
            table = page.inner_text("body")
            assert "Model training" in table or "Runs" in table
            page.get_by_text("logit-a0.5-s0").first.click()
            page.get_by_text("Student ResNet8 distilled from ResNet20").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)

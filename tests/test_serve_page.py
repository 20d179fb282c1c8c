"""The page served at `GET /` drives the real `opendit serve` (2 processes) in headless Chromium.

Needs Debian's chromium + chromium-driver (`make browser`); Selenium Manager never downloads anything here.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "serve_page.png"
NPROC = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
            return response.status == 200 and json.loads(response.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode} before /healthz was ok:\n{log.read_text()[-4000:]}")
        if _healthy(url):
            return
        time.sleep(0.5)
    pytest.fail(f"/healthz not ok after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def _driver():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `make browser`")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


@pytest.mark.slow  # a 2-process server and a browser: `make test`, not `make test-fast`
def test_page_generates_and_draws_timeline(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "opendit", "serve", "--nproc", str(NPROC), "--host", "127.0.0.1", "--port", str(port)]
    server = None
    try:
        with open(log, "wb") as out:
            cwd = tempfile.mkdtemp(dir=tmp_path)
            server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _wait_healthy(server, url, log)

        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        assert driver.find_element(By.ID, "info-nproc").text == str(NPROC)
        assert driver.find_element(By.ID, "info-model").text not in ("", "…")

        for field, value in (("steps", STEPS), ("seed", 3)):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(value))
        boxes = driver.find_elements(By.CSS_SELECTOR, "#classes input[type=checkbox]")
        assert boxes, "no class checkboxes"
        for box in boxes:  # exactly one class: 3
            if box.is_selected() != (box.get_attribute("value") == "3"):
                box.click()
        driver.find_element(By.ID, "generate").click()

        def shown(d):
            error = d.find_element(By.ID, "error").text
            assert not error, f"page shows an error: {error}"
            imgs = d.find_elements(By.CSS_SELECTOR, "#results img.result")
            ok = [i for i in imgs if i.is_displayed() and d.execute_script("return arguments[0].naturalWidth", i) > 0]
            return ok or False

        imgs = WebDriverWait(driver, 90).until(shown)
        assert len(imgs) == 1
        progress = driver.find_element(By.ID, "progress")
        assert progress.get_attribute("max") == str(STEPS)
        assert progress.get_attribute("value") == str(STEPS), "progress bar did not reach its max"
        assert driver.find_element(By.ID, "timing").text.strip()
        assert driver.find_element(By.CSS_SELECTOR, "#results figcaption").text.strip()

        # the trace is fetched after the results: wait for its event rects (row backgrounds have no class)
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.querySelectorAll('#timeline rect.event').length") > 0
        )
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#timeline text')].filter(t => t.textContent.startsWith('rank '))"
            ".map(t => t.textContent)"
        )
        assert sorted(rows) == [f"rank {r}" for r in range(NPROC)]
        counts = driver.execute_script(
            "const svg = document.getElementById('timeline'); const out = {}; let rank = null;"
            "for (const n of svg.children) {"
            "  if (n.tagName === 'text' && n.textContent.startsWith('rank ')) rank = n.textContent;"
            "  if (n.tagName === 'rect' && n.classList.contains('event')) out[rank] = (out[rank] || 0) + 1; }"
            "return out;"
        )
        assert all(counts.get(f"rank {r}", 0) >= 1 for r in range(NPROC)), counts

        if os.environ.get("OPENDIT_UPDATE_DOCS"):  # the docs' screenshot, refreshed on request only (a test run
            driver.save_screenshot(str(SCREENSHOT))  # leaves the checkout as it found it)
    finally:
        driver.quit()
        if server is not None:
            _stop(server)

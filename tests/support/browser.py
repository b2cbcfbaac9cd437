"""A real browser for page tests: Debian's headless Chromium driven by its chromedriver
through selenium, with a fresh profile, talking to loopback only."""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", "--window-size=1280,900")


def require_chromium() -> None:
    """Fail clearly (never skip) when the browser or its driver is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)} (tests/run installs the Debian packages "
                    "chromium and chromium-driver)")


@contextlib.contextmanager
def chromium(log_dir: Path) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a profile of its own, quit (with its driver) afterwards."""
    require_chromium()
    profile = Path(tempfile.mkdtemp(prefix="mirror-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, CSP reports
    log_dir.mkdir(parents=True, exist_ok=True)
    service = Service(CHROMEDRIVER, log_output=str(log_dir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()  # ends Chromium and stops chromedriver
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Console messages of level SEVERE since the last call (CSP violations among them)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page, beyond the window too (Chrome DevTools' full-page capture)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000),
                 "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))

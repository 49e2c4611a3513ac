"""A headless Chromium driven through WebDriver: Debian's `chromium` and `chromium-driver`
(`tests/support/services/install.sh` installs them), selenium from PyPI. The browser's console and
its network requests are logged, for tests to assert on."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

__all__ = ["SCREENSHOTS", "chromium", "console_errors", "requests_made"]

SCREENSHOTS = Path(
    os.environ.get("TOKENGATE_SCREENSHOTS", Path(__file__).parents[2] / "artifacts" / "console")
)
"""Where tests write screenshots (`$TOKENGATE_SCREENSHOTS`, default `artifacts/console`)."""

_BINARIES = ("/usr/bin/chromium", "/usr/bin/chromedriver")


def _binary(name: str, default: str) -> str:
    found = shutil.which(name) or (default if Path(default).exists() else None)
    if found is None:
        raise RuntimeError(f"{name} is missing: run `make services` (Debian's {name} package)")
    return found


@contextmanager
def chromium(width: int = 1366, height: int = 900) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a window of `width` x `height` CSS pixels, quit on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", _BINARIES[0])
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(_binary("chromedriver", _BINARIES[1]))
    )
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (the log is read once)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry for entry in entries if entry["level"] == "SEVERE"]


def requests_made(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Every request the page sent since the last call: `{"url", "method", "headers"}`."""
    made = []
    entries: list[dict[str, Any]] = driver.get_log("performance")  # type: ignore[no-untyped-call]
    for entry in entries:
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            made.append(
                {"url": request["url"], "method": request["method"], "headers": request["headers"]}
            )
    return made

"""The console's files as the admin listener serves them (in-process): a fixed list, each with its
type and a content security policy that lets the page load nothing from elsewhere; and the
Chart.js it ships, byte for byte Debian's."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from gateway.admin import create_app
from gateway.config import AdminConfig
from gateway.console import ASSETS
from gateway.ledger.db import Connection, open_ledger
from tests.support.billing_app import ADMIN, BILLING, Billing
from tests.support.openai_errors import error

# Chart.js 3.9.1 from Debian 12's libjs-chart.js 3.9.1+~0.2.1-2 (static/vendor/README.md).
CHARTJS_SHA256 = "fbc45926e6b46845a0f905552a0e0b1331049bff1115ecf94dbe0904d895e710"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Connection]:
    """The console reads no ledger: one backend is enough."""
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as conn:
        yield conn


@pytest.fixture
def console(ledger: Connection) -> Billing:
    api = Billing(ledger)
    api.app = create_app(ledger, ADMIN, BILLING, console=True)
    return api


def test_the_console_is_off_by_default(ledger: Connection) -> None:
    assert AdminConfig().console is False
    off = Billing(ledger)
    assert error(off("/console/", token=None), 404)["code"] == "unknown_route"


def test_every_file_is_served_with_its_type_and_policy(console: Billing) -> None:
    types = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg"}
    for name in ASSETS:
        path = "/console/" if name == "index.html" else f"/console/{name}"
        response = console(path, token=None)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(types[name.rsplit(".", 1)[1]])
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "connect-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    redirect = console("/console", token=None, follow_redirects=False)
    assert (redirect.status_code, redirect.headers["location"]) == (308, "/console/")


def test_only_the_listed_files_are_served(console: Billing) -> None:
    for path in (
        "/console/../admin.py",
        "/console/%2e%2e/__init__.py",
        "/console/vendor/README.md",
        "/console/__init__.py",
        "/console/static/index.html",
    ):
        assert console(path, token=None).status_code == 404, path
    # No file name is taken from the query.
    assert console("/console/console.css?name=index.html", token=None).text.startswith(":root")


def test_the_page_loads_only_files_of_its_own(console: Billing) -> None:
    page = console("/console/", token=None).text
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(loaded) == ["console.css", "console.js", "favicon.svg", "vendor/chart.min.js"]
    assert "<script>" not in page
    assert " style=" not in page
    script = console("/console/console.js", token=None).text
    assert "innerHTML" not in script, "text from the APIs is set as text"
    assert "localStorage" not in script, "the credential is kept for the tab only"


def test_chartjs_is_debians_copy() -> None:
    shipped = resources.files("gateway.console").joinpath("static/vendor/chart.min.js")
    data = shipped.read_bytes()
    assert hashlib.sha256(data).hexdigest() == CHARTJS_SHA256
    assert data.startswith(b"/*!\n * Chart.js v3.9.1")
    assert b"Released under the MIT License" in data[:200]

"""The usage and billing console in a real headless Chromium, against a real `gateway serve` in
front of a real `gateway sim`, with traffic (served and refused) from two tenants.

Every page loads with no console error, each chart has drawn its data, the totals shown equal the
billing API's for the same range, a tenant reaches nothing of another tenant's through any
request the page makes, and signing out forgets the key. Screenshots of each page go to
`tests.support.browser.SCREENSHOTS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support import procs
from tests.support.browser import SCREENSHOTS, chromium, console_errors, requests_made

pytestmark = pytest.mark.e2e

TOKEN = "console-admin-token"
MODEL = "sim-model"
ADMIN_LISTENING = r"admin API listening on (http://\S+)"
# Generous: a page loads in well under a second, but CI machines are shared.
LOAD_TIMEOUT_S = 60


@dataclass
class Scenario:
    gateway: procs.Process
    sim: procs.Process
    admin_url: str
    keys: dict[str, dict[str, Any]]  # by label: the admin API's issued key
    tenants: dict[str, str]  # name -> id
    served: dict[str, int]  # tenant name -> requests answered 200
    refused: dict[str, int]  # tenant name -> requests answered 429
    failed: int = 0  # acme's requests the worker failed

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {TOKEN}"}
        return httpx.request(method, f"{self.admin_url}{path}", headers=headers, timeout=10, **kw)

    def billing(self, path: str, credential: str, **params: Any) -> httpx.Response:
        return httpx.get(
            f"{self.admin_url}/v1/billing{path}",
            params={name: value for name, value in params.items() if value is not None},
            headers={"authorization": f"Bearer {credential}"},
            timeout=10,
        )

    def key(self, label: str) -> str:
        secret: str = self.keys[label]["key"]
        return secret


def _chat(gateway: procs.Process, key: str) -> int:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    return response.status_code


def _totals(scenario: Scenario, credential: str, **params: Any) -> tuple[int, int]:
    """(requests, refused) the billing API holds from `params`' start to now."""
    requests = refused = 0
    for path, field in (("/usage", "num_model_requests"), ("/refusals", "requests")):
        page: str | None = None
        while True:
            body = scenario.billing(path, credential, **params, page=page).json()
            count = sum(r[field] for b in body["data"] for r in b["results"])
            if path == "/usage":
                requests += count
            else:
                refused += count
            page = body["next_page"]
            if page is None:
                break
    return requests, refused


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("console")
    sim = procs.start_sim()
    config = procs.write_config(
        tmp / "gateway.toml",
        [sim.url],
        tmp / "ledger.db",
        "[admin]\nport = 0\nconsole = true\n[control]\nkey_refresh_ms = 100\nusage_flush_ms = 50\n",
    )
    gateway = procs.start(["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": TOKEN})
    admin_url = procs.wait_line(gateway, ADMIN_LISTENING).group(1)
    scenario = Scenario(gateway, sim, admin_url, {}, {}, {}, {})
    try:
        for tenant in ("acme", "globex"):
            created = scenario.admin("POST", "/admin/v1/tenants", json={"name": tenant})
            scenario.tenants[tenant] = created.json()["id"]
        for label, tenant in (("acme-prod", "acme"), ("acme-ci", "acme"), ("globex", "globex")):
            issued = scenario.admin(
                "POST", f"/admin/v1/tenants/{tenant}/keys", json={"name": label}
            )
            scenario.keys[label] = issued.json()
        old = scenario.admin("POST", "/admin/v1/tenants/acme/keys", json={"name": "old"}).json()
        scenario.admin("DELETE", f"/admin/v1/keys/{old['id']}")
        price = {"prompt_per_mtok": 2_000_000, "cached_per_mtok": 1_000_000}
        price |= {"completion_per_mtok": 8_000_000, "effective_at": 0}
        assert scenario.admin("PUT", f"/admin/v1/prices/{MODEL}", json=price).status_code == 201
        budget = {"money_budget_micros": 5_000_000, "token_budget": 1_000_000}
        assert scenario.admin("PUT", "/admin/v1/tenants/acme/quota", json=budget).is_success
        ci_key = scenario.keys["acme-ci"]["id"]
        limited = {"requests_per_minute": 3}
        assert scenario.admin("PUT", f"/admin/v1/keys/{ci_key}/quota", json=limited).is_success
        assert scenario.admin("PUT", "/admin/v1/tenants/globex/quota", json=limited).is_success
        # The core holds the quotas once its key and policy snapshots are pushed.
        assert procs.wait_for(lambda: _chat(gateway, scenario.key("globex")) == 200, 10)
        scenario.served = {"acme": 0, "globex": 1}
        scenario.refused = {"acme": 0, "globex": 0}
        for label, tenant, count in (("acme-prod", "acme", 8), ("acme-ci", "acme", 6)):
            for _ in range(count):
                status = _chat(gateway, scenario.key(label))
                scenario.served[tenant] += status == 200
                scenario.refused[tenant] += status == 429
        while scenario.refused["globex"] < 2 and scenario.served["globex"] < 20:
            status = _chat(gateway, scenario.key("globex"))
            scenario.served["globex"] += status == 200
            scenario.refused["globex"] += status == 429
        assert scenario.refused["acme"] >= 1
        assert scenario.refused["globex"] >= 2
        # Two requests the worker fails: metered (failed), billed for nothing they produced.
        faults = f"{sim.url}/sim/faults"
        assert httpx.post(faults, json={"error_rate": 1.0}, timeout=10).is_success
        for _ in range(2):
            status = _chat(gateway, scenario.key("acme-prod"))
            assert status >= 500, status
            scenario.failed += 1
        assert httpx.post(faults, json={"error_rate": 0.0}, timeout=10).is_success
        start = int(time.time()) - 86_400
        expected = {
            name: (
                scenario.served[name] + (scenario.failed if name == "acme" else 0),
                scenario.refused[name],
            )
            for name in scenario.tenants
        }

        def recorded() -> bool:
            return all(
                _totals(scenario, TOKEN, start_time=start, bucket_width="1h", tenant=name) == counts
                for name, counts in expected.items()
            )

        assert procs.wait_for(recorded, 20), "the ledger holds every served and refused request"
        yield scenario
    finally:
        gateway.stop()
        sim.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def _wait_loaded(driver: WebDriver) -> None:
    def loaded(d: WebDriver) -> bool:
        if d.execute_script("return document.body.dataset.loaded !== undefined"):
            return True
        status = d.find_element(By.ID, "status")
        assert "bad" not in (status.get_attribute("class") or ""), status.text
        return False

    WebDriverWait(driver, LOAD_TIMEOUT_S).until(loaded)


def _sign_in(driver: WebDriver, scenario: Scenario, credential: str, query: str = "") -> None:
    driver.get(f"{scenario.admin_url}/console/{query}")
    signed_out = WebDriverWait(driver, LOAD_TIMEOUT_S).until(
        lambda d: (
            d.find_element(By.ID, "sign-in").is_displayed()
            or d.find_element(By.ID, "sign-out").is_displayed()
        )
    )
    assert signed_out
    if driver.find_element(By.ID, "sign-out").is_displayed():
        driver.find_element(By.ID, "sign-out").click()
    driver.find_element(By.ID, "credential").send_keys(credential)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    _wait_loaded(driver)


def _shown_totals(driver: WebDriver) -> dict[str, int]:
    cards = driver.find_elements(By.CSS_SELECTOR, "#totals [data-testid]")
    return {
        card.get_attribute("data-testid") or "": int(card.get_attribute("data-value") or -1)
        for card in cards
    }


def _range(driver: WebDriver) -> dict[str, Any]:
    content = driver.find_element(By.ID, "content")
    return {
        "start_time": int(content.get_attribute("data-start-time") or 0),
        "end_time": int(content.get_attribute("data-end-time") or 0),
        "bucket_width": content.get_attribute("data-bucket-width"),
    }


def _api_totals(scenario: Scenario, credential: str, **params: Any) -> dict[str, int]:
    """The billing API's sums over the buckets of `params`, as the console's cards name them."""
    names = ("requests", "prompt", "cached", "completion", "spend", "failed", "refused")
    sums = dict.fromkeys(names, 0)
    page: str | None = None
    while True:
        body = scenario.billing("/usage", credential, **params, page=page).json()
        for result in (r for b in body["data"] for r in b["results"]):
            sums["requests"] += result["num_model_requests"]
            sums["prompt"] += result["input_tokens"] - result["input_cached_tokens"]
            sums["cached"] += result["input_cached_tokens"]
            sums["completion"] += result["output_tokens"]
            sums["spend"] += result["cost_micros"]
            sums["failed"] += result["failed_requests"]
        page = body["next_page"]
        if page is None:
            break
    sums["refused"] = _totals(scenario, credential, **params)[1]
    return {f"total-{name}": value for name, value in sums.items()}


def _chart_sums(driver: WebDriver) -> dict[str, float]:
    """Per canvas id, the sum of every value Chart.js holds for it (None: no chart on it)."""
    sums: dict[str, float] = driver.execute_script(
        """
        const sums = {};
        for (const canvas of document.querySelectorAll("canvas")) {
          const chart = Chart.getChart(canvas);
          const values = chart ? chart.data.datasets.flatMap((d) => d.data) : null;
          const number = (v) => (typeof v === "number" ? v : 0);
          sums[canvas.id] = values && values.reduce((n, v) => n + number(v), 0);
        }
        return sums;
        """
    )
    return sums


def _canvas_has_pixels(driver: WebDriver, canvas_id: str) -> bool:
    drawn: bool = driver.execute_script(
        """
        const canvas = document.getElementById(arguments[0]);
        const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
        return false;
        """,
        canvas_id,
    )
    return drawn


def _screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page, as tall as it is, at the window's width."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], height + 140))
    try:
        assert driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    assert path.stat().st_size > 10_000, "a screenshot of a drawn page"
    return path


def test_the_console_is_off_unless_enabled(tmp_path: Path) -> None:
    sim = procs.start_sim()
    config = procs.write_config(
        tmp_path / "gateway.toml", [sim.url], tmp_path / "ledger.db", "[admin]\nport = 0\n"
    )
    gateway = procs.start(["serve", "--config", str(config)], env={"TOKENGATE_ADMIN_TOKEN": TOKEN})
    try:
        admin_url = procs.wait_line(gateway, ADMIN_LISTENING).group(1)
        response = httpx.get(f"{admin_url}/console/", timeout=10)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_route"
    finally:
        gateway.stop()
        sim.stop()


def test_the_tenant_view_draws_its_own_usage_and_its_totals_are_the_billing_apis(
    scenario: Scenario, browser: WebDriver
) -> None:
    key = scenario.key("acme-prod")
    console_errors(browser)
    _sign_in(browser, scenario, key)
    assert browser.find_element(By.ID, "who").text == "Tenant acme"
    assert console_errors(browser) == []

    shown = _shown_totals(browser)
    assert shown == _api_totals(scenario, key, **_range(browser))
    assert shown["total-requests"] == scenario.served["acme"] + scenario.failed
    assert shown["total-failed"] == scenario.failed
    assert shown["total-refused"] == scenario.refused["acme"]
    assert shown["total-spend"] > 0

    charts = _chart_sums(browser)
    assert set(charts) == {"chart-tokens", "chart-spend", "chart-refusals"}
    api = _api_totals(scenario, key, **_range(browser))
    tokens = api["total-prompt"] + api["total-cached"] + api["total-completion"]
    assert charts["chart-tokens"] == tokens
    # Spend: per bucket, the cumulative line and the budget's line.
    assert charts["chart-spend"] > api["total-spend"] / 1e6
    assert charts["chart-refusals"] == scenario.refused["acme"]
    for canvas in charts:
        assert _canvas_has_pixels(browser, canvas), f"{canvas} is drawn"

    keys = browser.find_element(By.ID, "keys-table").text
    assert scenario.keys["acme-prod"]["id"] in keys
    assert scenario.keys["acme-ci"]["id"] in keys
    assert "revoked" in keys
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = scenario.billing("/invoices", key, period=month).json()
    rows = browser.find_elements(By.CSS_SELECTOR, "#invoices-table tbody tr")
    assert rows[0].text.startswith(f"{month} {invoice['requests']} ")
    quota = browser.find_element(By.ID, "quota").text
    assert "Money budget" in quota
    assert "Remaining" in quota
    assert "requests_per_minute" not in quota  # labels, not field names
    _screenshot(browser, "tenant")


def test_the_invoice_csv_downloads_through_the_page(
    scenario: Scenario, browser: WebDriver, tmp_path: Path
) -> None:
    key = scenario.key("acme-prod")
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}
    )
    _sign_in(browser, scenario, key)
    month = datetime.now(UTC).strftime("%Y-%m")
    browser.find_element(By.CSS_SELECTOR, f'#invoices-table button[data-period="{month}"]').click()
    expected = scenario.billing("/invoices", key, period=month, format="csv").text
    path = tmp_path / f"invoice-acme-{month}.csv"
    assert procs.wait_for(lambda: path.exists() and path.read_text() == expected, 20)
    assert console_errors(browser) == []


def test_a_tenant_reaches_nothing_of_another_tenant_through_the_page(
    scenario: Scenario, browser: WebDriver
) -> None:
    key = scenario.key("acme-prod")
    requests_made(browser)
    # A tenant named in the console's own address changes nothing.
    globex = scenario.tenants["globex"]
    _sign_in(browser, scenario, key, f"?tenant={globex}#tenant=globex")
    made = requests_made(browser)
    shown = _shown_totals(browser)
    assert shown["total-requests"] == scenario.served["acme"] + scenario.failed

    api_calls = [r for r in made if urlsplit(r["url"]).path.startswith(("/v1/", "/admin/"))]
    assert api_calls, "the page reads the billing API"
    assert all(urlsplit(r["url"]).netloc == urlsplit(scenario.admin_url).netloc for r in made)
    for request in api_calls:
        url = urlsplit(request["url"])
        assert url.path.startswith("/v1/billing/"), f"a tenant's page calls {url.path}"
        params = dict(parse_qsl(url.query))
        assert "tenant" not in params, "a tenant's page names no tenant"
        # The same request for the other tenant, by its id or its name: refused where the route
        # takes a tenant, and answered for the caller alone where it takes none (`/me`).
        for other in (globex, "globex"):
            forged = f"{scenario.admin_url}{url.path}?{urlencode({**params, 'tenant': other})}"
            response = httpx.get(forged, headers={"authorization": f"Bearer {key}"}, timeout=10)
            if url.path == "/v1/billing/me":
                assert response.json()["tenant_id"] == scenario.tenants["acme"]
            else:
                assert response.status_code == 403, (forged, response.text)
                assert response.json()["error"]["code"] == "permission_denied"
        # And as the page made it: nothing of the other tenant in the answer.
        answer = httpx.get(request["url"], headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200
        assert globex not in answer.text
        assert scenario.keys["globex"]["id"] not in answer.text
    for path in ("/admin/v1/fleet", "/admin/v1/tenants", "/admin/v1/changes"):
        response = scenario.billing("/me", key)  # the key is valid...
        assert response.json()["role"] == "tenant"
        refused = httpx.get(
            f"{scenario.admin_url}{path}", headers={"authorization": f"Bearer {key}"}, timeout=10
        )
        assert refused.status_code == 401  # ...and opens no admin route
    page = browser.page_source
    assert globex not in page
    assert "globex" not in page
    assert console_errors(browser) == []


def test_signing_out_forgets_the_key(scenario: Scenario, browser: WebDriver) -> None:
    key = scenario.key("acme-prod")
    _sign_in(browser, scenario, key)
    assert browser.execute_script("return sessionStorage.length") == 1
    browser.find_element(By.ID, "sign-out").click()
    assert browser.find_element(By.ID, "sign-in").is_displayed()
    assert not browser.find_element(By.ID, "console").is_displayed()
    kept = browser.execute_script(
        "return [sessionStorage.length, localStorage.length, document.cookie]"
    )
    assert kept == [0, 0, ""]
    assert key not in browser.page_source
    assert browser.find_element(By.ID, "credential").get_attribute("value") == ""
    browser.refresh()
    WebDriverWait(browser, LOAD_TIMEOUT_S).until(
        lambda d: d.find_element(By.ID, "sign-in").is_displayed()
    )
    assert not browser.find_element(By.ID, "sign-out").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    assert console_errors(browser) == []


def test_a_wrong_key_is_told_and_not_kept(scenario: Scenario, browser: WebDriver) -> None:
    browser.get(f"{scenario.admin_url}/console/")
    WebDriverWait(browser, LOAD_TIMEOUT_S).until(
        lambda d: d.find_element(By.ID, "sign-in").is_displayed()
    )
    browser.find_element(By.ID, "credential").send_keys("tg-not-a-key")
    browser.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    error = browser.find_element(By.ID, "sign-in-error")
    WebDriverWait(browser, LOAD_TIMEOUT_S).until(lambda _: error.is_displayed())
    assert "not valid" in error.text
    assert browser.execute_script("return sessionStorage.length") == 0
    # The browser reports the refused request itself; nothing else.
    errors = console_errors(browser)
    assert all("401" in entry["message"] for entry in errors), errors


def test_the_range_and_bucket_width_change_what_is_read(
    scenario: Scenario, browser: WebDriver
) -> None:
    key = scenario.key("acme-prod")
    _sign_in(browser, scenario, key)
    loaded = browser.execute_script("return document.body.dataset.loaded")
    Select(browser.find_element(By.ID, "range")).select_by_value("3600")
    WebDriverWait(browser, LOAD_TIMEOUT_S).until(
        lambda d: d.execute_script("return document.body.dataset.loaded") not in (None, loaded)
    )
    loaded = browser.execute_script("return document.body.dataset.loaded")
    Select(browser.find_element(By.ID, "width")).select_by_value("1m")
    WebDriverWait(browser, LOAD_TIMEOUT_S).until(
        lambda d: d.execute_script("return document.body.dataset.loaded") not in (None, loaded)
    )
    selected = _range(browser)
    assert selected["bucket_width"] == "1m"
    assert time.time() - 3_700 <= selected["start_time"] <= time.time() - 3_500
    assert _shown_totals(browser) == _api_totals(scenario, key, **selected)
    buckets = browser.execute_script(
        'return Chart.getChart(document.getElementById("chart-tokens")).data.labels.length'
    )
    # The minute holding the hour's start to the one holding now, whatever the queries' own clocks.
    assert buckets == 61, "a bucket a minute over the hour"
    assert selected["end_time"] - selected["start_time"] in range(3_601, 3_661)
    assert console_errors(browser) == []


def test_a_browser_whose_clock_is_slow_reads_the_server_s_window(
    scenario: Scenario, browser: WebDriver
) -> None:
    """The window ends at the server's now, read from its responses' `Date`: a browser ten
    minutes slow still shows the usage of the minutes its own clock has not reached."""
    browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": "const realNow = Date.now; Date.now = () => realNow() - 600000;"},
    )
    key = scenario.key("acme-prod")
    _sign_in(browser, scenario, key)
    assert browser.execute_script("return Date.now()") < (time.time() - 590) * 1000
    selected = _range(browser)
    assert time.time() - 60 <= selected["end_time"] <= time.time() + 2
    shown = _shown_totals(browser)
    assert shown["total-requests"] == scenario.served["acme"] + scenario.failed
    assert shown == _api_totals(
        scenario, key, start_time=selected["start_time"], bucket_width=selected["bucket_width"]
    )
    assert console_errors(browser) == []


def test_the_operator_view_shows_every_tenant_and_the_fleet(
    scenario: Scenario, browser: WebDriver
) -> None:
    _sign_in(browser, scenario, TOKEN)
    assert browser.find_element(By.ID, "who").text == "Operator"
    shown = _shown_totals(browser)
    assert shown == _api_totals(scenario, TOKEN, **_range(browser))
    assert shown["total-requests"] == sum(scenario.served.values()) + scenario.failed
    assert shown["total-failed"] == scenario.failed
    assert shown["total-refused"] == sum(scenario.refused.values())

    charts = _chart_sums(browser)
    assert set(charts) == {
        "chart-requests",
        "chart-tenant-spend",
        "chart-tokens",
        "chart-refusals",
    }
    assert all(value and value > 0 for value in charts.values()), charts
    for canvas in charts:
        assert _canvas_has_pixels(browser, canvas), f"{canvas} is drawn"

    tenants = browser.find_element(By.ID, "tenants-table").text
    assert "acme" in tenants
    assert "globex" in tenants
    fleet = browser.find_element(By.ID, "fleet-table").text
    assert f"{scenario.sim.url} up " in fleet
    (worker,) = scenario.admin("GET", "/admin/v1/fleet").json()["workers"]
    assert worker["load"] is not None, "the core scraped the simulator's vLLM gauges"
    assert set(worker["load"]) == {"running", "waiting", "kv_cache_usage"}
    changes = browser.find_element(By.ID, "changes-table").text
    for action in ("key.revoked", "quota.set", "price.set", "tenant.created"):
        assert action in changes
    assert console_errors(browser) == []
    _screenshot(browser, "operator")


def test_the_pages_fit_a_phone(scenario: Scenario) -> None:
    with chromium(390, 844) as phone:
        for name, credential in (("tenant", scenario.key("acme-prod")), ("operator", TOKEN)):
            _sign_in(phone, scenario, credential)
            overflow = phone.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"the {name} page scrolls sideways by {overflow} px"
            assert all(value is not None for value in _chart_sums(phone).values())
            _screenshot(phone, f"{name}-phone")
            assert console_errors(phone) == []

"""The transactions web page in a real headless browser (Debian's chromium).

Served by a real HTTP server in this process; chromium is driven through
chromedriver (selenium). The detail page of a finished transaction is saved
as a screenshot (``timeline.png`` in the test's folder, and under
``$CELERY_TX_SCREENSHOTS`` when set).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from celery_tx import TransactionCoordinator, TxStatus, transactions_blueprint
from tests.conftest import server_missing
from tests.journaled import journal_started
from tests.participants import append_line, append_line_slowly, fail_with, nothing

pytestmark = pytest.mark.timeout(180)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        server_missing("chromium", FileNotFoundError(f"{CHROMIUM} and {CHROMEDRIVER}"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # This machine's network is closed: no attempts to reach Google's services.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def site(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, TransactionCoordinator]]:
    """The blueprint mounted in a Flask app, served on a free port of loopback;
    refreshing every 0.3 s, or as the test's ``site`` parameter says."""
    refresh = getattr(request, "param", 0.3)
    coordinator = TransactionCoordinator(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    app = Flask("site")
    app.register_blueprint(
        transactions_blueprint(coordinator, refresh_seconds=refresh), url_prefix="/transactions"
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/transactions", coordinator
    finally:
        server.shutdown()
        coordinator.close()


def _rolled_back(coordinator: TransactionCoordinator, log: str) -> Any:
    tx_id = coordinator.begin_transaction(name="order")
    coordinator.register_participant(
        tx_id, "charge", functools.partial(append_line_slowly, log, "charge", 0.05), nothing
    )
    coordinator.register_participant(
        tx_id, "reserve", functools.partial(append_line_slowly, log, "reserve", 0.03), nothing
    )
    coordinator.register_participant(tx_id, "email", functools.partial(fail_with, "550"), nothing)
    return coordinator.commit_transaction(tx_id)


def _running(coordinator: TransactionCoordinator, name: str) -> Any:
    """A journaled RUNNING transaction (a PENDING one is only in this process's memory)."""
    tx_id = coordinator.begin_transaction(name=name)
    coordinator.register_participant(tx_id, "a", nothing, nothing)
    return journal_started(coordinator, tx_id).id


# Not refreshing while the test reads it: a refresh swaps the elements it holds.
@pytest.mark.parametrize("site", [3600.0], indirect=True)
def test_the_list_and_a_timeline_in_chromium(browser: Any, site, tmp_path: Path):
    from selenium.webdriver.common.by import By

    url, coordinator = site
    log = str(tmp_path / "effects.log")
    rolled_back = _rolled_back(coordinator, log)
    committed = coordinator.begin_transaction(name="order")
    coordinator.register_participant(
        committed, "charge", functools.partial(append_line, log, "c"), nothing
    )
    coordinator.commit_transaction(committed)
    _running(coordinator, "cart <script>alert(1)</script>")  # escaped, not run

    browser.get(url + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#transactions tbody tr")
    assert [r.get_attribute("data-status") for r in rows] == ["RUNNING", "COMMITTED", "ROLLED_BACK"]
    assert "cart <script>alert(1)</script>" in rows[0].text
    browser.get(url + "/?status=ROLLED_BACK")
    rows = browser.find_elements(By.CSS_SELECTOR, "#transactions tbody tr")
    assert [r.get_attribute("data-id") for r in rows] == [str(rolled_back.id)]

    rows[0].find_element(By.TAG_NAME, "a").click()
    assert browser.find_element(By.ID, "status").text == "ROLLED_BACK"
    bars = browser.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")
    drawn = [
        (
            b.get_attribute("data-step"),
            b.get_attribute("data-phase"),
            b.get_attribute("data-result"),
        )
        for b in bars
    ]
    assert drawn == [
        ("charge", "action", "done"),
        ("reserve", "action", "done"),
        ("email", "action", "failed"),
        ("email", "compensation", "done"),
        ("reserve", "compensation", "done"),
        ("charge", "compensation", "done"),
    ]
    # Drawn on one time axis: each starts where the one before it ended, or later.
    xs = [float(b.get_attribute("x")) for b in bars]
    assert xs == sorted(xs)
    charge = bars[0].rect
    assert charge["width"] > 20  # 50 ms of a ~100 ms transaction: a real bar
    assert bars[1].rect["x"] >= charge["x"] + charge["width"] - 1
    shot = tmp_path / "timeline.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("CELERY_TX_SCREENSHOTS"):
        folder = Path(os.environ["CELERY_TX_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "timeline.png")


def test_the_page_refreshes_itself_while_the_transaction_runs(browser: Any, site, tmp_path: Path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, coordinator = site
    log = str(tmp_path / "effects.log")
    tx_id = coordinator.begin_transaction(name="order")
    coordinator.register_participant(
        tx_id, "charge", functools.partial(append_line, log, "c"), nothing
    )
    coordinator.register_participant(
        tx_id, "email", functools.partial(append_line, log, "e"), nothing
    )
    now = datetime.now(UTC)
    journal_started(coordinator, tx_id, now)

    browser.get(f"{url}/{tx_id}")
    assert browser.find_element(By.ID, "status").text == "RUNNING"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")) == 1
    browser.execute_script("window.loadedOnce = true;")  # gone if the page reloads

    assert coordinator.retry_transaction(tx_id, force=True).status is TxStatus.COMMITTED
    WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: b.find_element(By.ID, "status").text == "COMMITTED"
    )
    assert browser.execute_script("return window.loadedOnce === true;")
    results = [
        b.get_attribute("data-result")
        for b in browser.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")
    ]
    assert results == ["done", "done"]
    summary = browser.find_element(By.ID, "summary")
    assert summary.get_attribute("data-final") == "true"  # and it stops refreshing


def test_bad_addresses_get_clear_errors(site):
    import urllib.error
    import urllib.request

    url, _ = site
    for path, code in (
        ("/not-an-id", 400),
        ("/00000000-0000-0000-0000-000000000000", 404),
        ("/?status=DONE", 400),
        ("/?page=0", 400),
        ("/?page=%C2%B2", 400),  # a digit to str.isdigit(), not to int()
        ("/?page=99999999999999999999", 400),
        ("/?name=a%00b", 400),
        ("/api/transactions/00000000-0000-0000-0000-000000000000", 404),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url + path, timeout=10)
        assert caught.value.code == code, path
    with urllib.request.urlopen(url + "/api/transactions", timeout=10) as response:
        assert response.status == 200


def test_the_json_routes_answer_errors_in_json(site):
    import urllib.error
    import urllib.request

    url, _ = site
    for path, code, message in (
        ("/api/transactions/not-an-id", 400, "not a transaction id: 'not-an-id'"),
        ("/api/transactions/00000000-0000-0000-0000-000000000000", 404, "no transaction"),
        ("/api/transactions?status=DONE", 400, "unknown status 'DONE'"),
        ("/api/transactions?page=99999999999999999999", 400, "page must be a whole number"),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url + path, timeout=10)
        assert caught.value.code == code, path
        assert caught.value.headers["Content-Type"] == "application/json", path
        body = json.loads(caught.value.read())
        assert body["status"] == code
        assert message in body["error"], (path, body)
    with pytest.raises(urllib.error.HTTPError) as caught:  # a page's errors stay pages
        urllib.request.urlopen(url + "/not-an-id", timeout=10)
    assert caught.value.headers["Content-Type"].startswith("text/html")


def test_every_response_forbids_framing_and_foreign_script(site):
    import urllib.error
    import urllib.request

    url, coordinator = site
    tx_id = _running(coordinator, "order")
    nonces = set()
    for path in ("/", f"/{tx_id}", "/api/transactions", "/?fragment=1"):
        with urllib.request.urlopen(url + path, timeout=10) as response:
            headers, page = response.headers, response.read().decode()
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        policy = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy
        assert "default-src 'none'" in policy
        nonce = re.search(r"script-src 'nonce-([\w-]+)'", policy)
        assert nonce is not None, policy
        nonces.add(nonce.group(1))
        scripts = re.findall(r"<script[^>]*>", page)
        assert all(f'nonce="{nonce.group(1)}"' in tag for tag in scripts), (path, scripts)
    assert len(nonces) == 4  # drawn again for every response
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url + "/not-an-id", timeout=10)
    assert caught.value.headers["X-Frame-Options"] == "DENY"


def test_a_journal_that_is_down_is_a_503(tmp_path: Path):
    coordinator = TransactionCoordinator(f"sqlite:///{tmp_path / 'no' / 'such' / 'j.sqlite3'}")
    app = Flask("down")
    app.register_blueprint(transactions_blueprint(coordinator), url_prefix="/tx")
    client = app.test_client()
    api = client.get("/tx/api/transactions")
    assert api.status_code == 503
    assert "the journal is unavailable" in api.get_json()["error"]
    page = client.get("/tx/")
    assert page.status_code == 503
    assert page.headers["X-Frame-Options"] == "DENY"


def test_the_list_refreshes_and_keeps_what_is_typed_in_the_filters(browser: Any, site):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, coordinator = site
    first = _running(coordinator, "first")
    browser.get(url + "/")
    field = browser.find_element(By.NAME, "name")
    field.send_keys("half-typ")
    second = _running(coordinator, "second")  # appears without a reload

    def ids(b: Any) -> list[str]:
        rows = b.find_elements(By.CSS_SELECTOR, "#transactions tbody tr")
        return [r.get_attribute("data-id") for r in rows]

    WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: ids(b) == [str(second), str(first)]
    )
    assert browser.find_element(By.NAME, "name").get_attribute("value") == "half-typ"

"""End to end in a real headless browser: sign in, register, search, watch the tile rise, sign out.

Runs the dashboard as a real ``pms serve dashboard`` process in front of the real platform
(gateway, auth, patient, billing, pipeline, analytics) when all of it has landed; until then,
in front of the stand-in gateway (the test says which in its output). Screenshots of each page
go to ``test-artifacts/dashboard/``; the README's copies in ``docs/screenshots/`` are written when
missing or when ``UPDATE_SCREENSHOTS=1`` is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pms import process
from pms.settings import Settings
from tests.dashboard.stack import ADMIN_EMAIL, ADMIN_PASSWORD, ANALYTICS, CORE, missing_services
from tests.dashboard.stub_gateway import PASSWORD, StubGateway
from tests.fixtures.services import ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
SCREENSHOTS = ROOT / "docs" / "screenshots"
DEADLINE_S = 60.0


@dataclass
class Target:
    kind: str
    dashboard_url: str
    email: str
    password: str


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    logs = tmp_path_factory.mktemp("dash-e2e-logs")
    if not missing_services(CORE + ANALYTICS):
        stack = request.getfixturevalue("real_stack")  # shared with test_real_stack.py: started once
        yield from _with_dashboard(stack.settings, logs, "real stack", ADMIN_EMAIL, ADMIN_PASSWORD)
        return
    stub_settings: Settings = request.getfixturevalue("stub_settings")
    stub = StubGateway(stub_settings).start()
    try:
        settings = Settings(_env_file=None, **{  # type: ignore[call-arg]
            **stub_settings.model_dump(),
            "gateway": {"url": stub.url, "port": stub.port},
            "dashboard": {"port": process.free_port()},
        })
        missing = ", ".join(missing_services(CORE + ANALYTICS))
        yield from _with_dashboard(settings, logs, f"stand-in gateway (not landed yet: {missing})",
                                   "admin@pms.local", PASSWORD)
    finally:
        stub.stop()


def _with_dashboard(settings: Settings, logs: Path, kind: str, email: str, password: str) -> Iterator[Target]:
    print(f"dashboard e2e against the {kind}")
    dashboard = ServiceProcess("dashboard", settings, logs / "dashboard.log").start(timeout=60)
    try:
        yield Target(kind, dashboard.base_url, email, password)
    finally:
        dashboard.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"],
        )
        yield chromium
        chromium.close()


def _shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    # Not mid-run: Streamlit shows its status widget ("Running…"/"Stop") while a script runs.
    page.get_by_test_id("stStatusWidget").wait_for(state="hidden", timeout=15_000)  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # type: ignore[attr-defined]  # let charts finish their transition
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    # The README's copies are tracked files: refresh them on request only, so a test run does not
    # dirty a shared checkout (UPDATE_SCREENSHOTS=1 .venv/bin/pytest tests/dashboard/test_e2e.py).
    published = SCREENSHOTS / f"dashboard-{name}.png"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1" or not published.exists():
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, published)


def _nav(page: object, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()  # type: ignore[attr-defined]
    page.get_by_role("heading", name=title).wait_for()  # type: ignore[attr-defined]


def _active_patients(page: object) -> int:
    tile = page.get_by_test_id("stMetric").filter(has_text="Active patients")  # type: ignore[attr-defined]
    text = tile.get_by_test_id("stMetricValue").inner_text(timeout=15_000).strip()
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", text), f"active patients tile shows {text!r}, not a number"
    return int(text.replace(",", ""))


def test_sign_in_register_search_see_tile_rise_sign_out(target: Target, browser: object) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 1500})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        page.goto(target.dashboard_url)
        page.get_by_role("button", name="Sign in").wait_for()
        _shot(page, "login")

        page.get_by_label("E-mail", exact=True).fill(target.email)
        page.get_by_label("Password", exact=True).fill("definitely-wrong-password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_text("E-mail or password is not correct.")).to_be_visible()
        page.get_by_label("Password", exact=True).fill(target.password)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Patients").wait_for()

        _nav(page, "Analytics")
        before = _active_patients(page)

        _nav(page, "Register patient")
        unique = uuid.uuid4().hex[:6]
        name = f"Edsger Dijkstra {unique}"
        page.get_by_label("Full name *").fill(name)
        page.get_by_label("E-mail *").fill(f"edsger.{unique}@example.com")
        page.get_by_label("Phone", exact=True).fill("+1 202 456 1111")
        page.get_by_label("Street address *").fill("1 University Ave")
        page.get_by_label("City", exact=True).fill("Austin")
        for part, value in (("year", "1930"), ("month", "05"), ("day", "11")):
            page.get_by_role("spinbutton", name=f"{part}, Date of birth *").click()
            page.keyboard.type(value)
        _shot(page, "register")
        page.get_by_role("button", name="Register patient").click()
        expect(page.get_by_text(re.compile(r"registered\. MRN"))).to_be_visible()
        _shot(page, "register-success")

        _nav(page, "Patients")
        search = page.get_by_placeholder("Name, e-mail, MRN or phone")
        search.fill(unique)
        search.press("Enter")
        expect(page.get_by_text(re.compile(r"Showing 1 to 1 of 1 patient\b"))).to_be_visible()
        option = page.get_by_role("option", name=re.compile(re.escape(name)))
        deadline = time.monotonic() + 20
        while not option.is_visible():  # a rerun still in flight can close the list under the click
            assert time.monotonic() < deadline, "the 'Open a record' list never showed the new patient"
            page.get_by_role("combobox", name="Open a record").click()
            page.wait_for_timeout(300)
        option.click()
        page.get_by_role("heading", name=name).wait_for()
        _shot(page, "patients")
        page.get_by_role("tab", name="FHIR").click()
        with page.expect_download() as download:
            page.get_by_role("button", name="Download FHIR R4 Patient (JSON)").click()
        resource = json.loads(Path(download.value.path()).read_text())
        assert resource["resourceType"] == "Patient"

        _nav(page, "Analytics")
        page.get_by_text("Auto-refresh").click()  # the tiles re-run by themselves from now on
        deadline = time.monotonic() + DEADLINE_S
        while _active_patients(page) <= before:
            assert time.monotonic() < deadline, f"active patients stayed at {before} for {DEADLINE_S:.0f}s"
            page.wait_for_timeout(500)
        charts = page.get_by_test_id("stVegaLiteChart")
        expect(charts).to_have_count(3)
        for i in range(3):
            charts.nth(i).locator("canvas, svg").first.wait_for()
        _shot(page, "analytics")

        _nav(page, "Users")
        expect(page.get_by_text(re.compile(r"\d+ accounts? · "))).to_be_visible()
        _shot(page, "users")

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_text("You have signed out.")).to_be_visible()
        expect(page.get_by_role("link", name="Patients")).to_have_count(0)
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
        raise
    finally:
        context.close()

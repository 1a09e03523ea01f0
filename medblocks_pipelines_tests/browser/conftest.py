"""Fixtures for the real-browser tests: the sandbox, our web app, a tenant's return page and a
headless Chromium driven by selenium + chromedriver, all on loopback.

Tools: Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and the ``selenium`` Python package. When one is missing the tests skip
locally and fail when ``CI=true`` (CI installs them). ``MEDBLOCKS_CHROMIUM`` and
``MEDBLOCKS_CHROMEDRIVER`` point at other binaries.

Screenshots go to ``artifacts/browser/`` at the repository root (gitignored), or to
``MEDBLOCKS_BROWSER_ARTIFACTS``.
"""

import base64
import html
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.web.app import create_app
from medblocks_sandbox.run import SandboxHandle, serve, start_sandbox

TENANT = "acme"
#: Patients connect at this EHR organization; the EHR launch runs at the other one, so each
#: sandbox FHIR base maps to exactly one of our sources.
PATIENT_ORG = "mercy-general"
CLINICIAN_ORG = "lakeside-clinic"
PATIENT_CLIENT = "medblocks-patient-app"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Chromium without network: these flags stop it calling home (updates, sync, QUIC probes).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-proxy-server",
    # Every host name but loopback resolves to nothing: a page can never reach past this machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--window-size=1100,900",
)
WAIT_SECONDS = 20.0


@dataclass(frozen=True)
class BrowserTools:
    """Where the browser and its driver are."""

    chromium: str
    chromedriver: str


def _find(env_var: str, names: tuple[str, ...]) -> str | None:
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_tools_or_skip() -> BrowserTools:
    """The tools, or a skip (locally) / failure (``CI=true``) naming what is missing."""
    missing = []
    chromium = _find("MEDBLOCKS_CHROMIUM", ("chromium", "chromium-browser"))
    driver = _find("MEDBLOCKS_CHROMEDRIVER", ("chromedriver",))
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (Python package)")
    if missing:
        why = "real-browser tests need " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI=true: the CI image must install them)", pytrace=False)
        pytest.skip(why)
    assert chromium is not None and driver is not None
    return BrowserTools(chromium=chromium, chromedriver=driver)


@pytest.fixture(scope="session")
def browser_tools() -> BrowserTools:
    """Checked first by every heavy fixture, so a missing browser skips before servers start."""
    return browser_tools_or_skip()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where screenshots are kept (created; old screenshots of these tests replaced)."""
    path = Path(
        os.environ.get("MEDBLOCKS_BROWSER_ARTIFACTS") or REPO_ROOT / "artifacts" / "browser"
    )
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


@pytest.fixture(scope="session")
def browser_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """SQLite control plane, lake and warehouse in a temporary folder (never the env's database)."""
    root = tmp_path_factory.mktemp("browser-data")
    s = Settings(
        data_dir=root,
        database_url=f"sqlite:///{root / 'control.db'}",
        lake_root=root / "lake",
        warehouse_dir=root / "warehouse",
    )
    s.ensure_dirs()
    return s


@pytest.fixture(scope="session")
def sandbox(browser_tools: BrowserTools) -> Iterator[SandboxHandle]:
    """The sandbox EHR orgs and the EHR that launches apps, on ephemeral loopback ports."""
    handle = start_sandbox(base_port=0, persons=12, seed=5, roles=["ehr", "cds_ehr"])
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def control_plane(browser_settings: Settings) -> Iterator[ControlPlane]:
    """The control plane on the temporary settings (the vault key file lives in that folder)."""
    cp = open_control_plane(browser_settings)
    try:
        yield cp
    finally:
        cp.engine.dispose()


@pytest.fixture(scope="session")
def web_base(
    browser_settings: Settings, control_plane: ControlPlane, sandbox: SandboxHandle
) -> Iterator[str]:
    """Our web app on loopback, with the tenant, the patient-access source and our client
    registered at the sandbox (as ``medblocks-sandbox demo`` registers them)."""
    with serve(lambda base: create_app(public_base_url=base, settings=browser_settings)) as base:
        sandbox.register_client(
            {
                "client_id": PATIENT_CLIENT,
                "token_endpoint_auth_method": "none",
                "redirect_uris": [f"{base}/connect/callback"],
                "name": "Acme Health App",
            },
            kinds=("ehr",),
        )
        control_plane.add_tenant(TENANT, "Acme Health App", {"delete_on_revoke": False})
        endpoint = sandbox.org(PATIENT_ORG)
        control_plane.add_source(
            PATIENT_ORG,
            endpoint.name,
            "sandbox",
            "ehr",
            endpoint.fhir_base,
            ["patient_access"],
            {"client_id": PATIENT_CLIENT},
        )
        yield base


def _return_page(request: Request) -> HTMLResponse:
    # The tenant's page: shows what our callback reported, escaped, under stable ids.
    q = request.query_params
    rows = "".join(
        f'<p id="{k}">{html.escape(q.get(k, ""))}</p>'
        for k in ("status", "connection_id", "reason")
    )
    return HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Acme: connection'
        f"</title></head><body><h1>Back at Acme</h1>{rows}</body></html>"
    )


@pytest.fixture(scope="session")
def tenant_app(browser_tools: BrowserTools) -> Iterator[str]:
    """A tiny Starlette app standing in for the tenant's own site (the connect return URL)."""
    with serve(lambda _base: Starlette(routes=[Route("/connected", _return_page)])) as base:
        yield base


@pytest.fixture
def browser(browser_tools: BrowserTools, tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium (own profile folder) per test, quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_tools.chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # Explicit driver path: Selenium Manager never runs (it would try to download a driver).
    service = Service(executable_path=browser_tools.chromedriver, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(artifacts_dir: Path, browser: Any) -> Callable[[str], Path]:
    """``screenshot(name)`` saves the current page as ``<artifacts>/<name>.png`` and returns it."""

    def take(name: str) -> Path:
        path = artifacts_dir / f"{name}.png"
        # The whole page, not just the window: long consent pages are what a reviewer wants.
        shot = browser.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"screenshot {name} is not a PNG"
        assert path.stat().st_size > 1000, f"screenshot {name} is empty"
        return path

    return take

"""An EHR launch through a TLS-terminating reverse proxy, embedded in the EHR's page, in headless
Chromium.

``medblocks serve`` (a subprocess) knows its public ``https://127.0.0.1:<port>/medblocks`` address
only from ``MEDBLOCKS_PUBLIC_BASE_URL``; a test-only proxy with a self-signed certificate
(Chromium runs with ``--ignore-certificate-errors``) terminates TLS in front of it. The EHR's page
(plain http on another port: a different site, schemefully) frames the sandbox EHR's launcher,
which opens our public launch URL; the launch runs through the EHR's authorization server back to
our public callback and app page, all inside the iframe. That only works when the launch cookie
is ``SameSite=None; Secure`` (a cross-site frame gets no Lax cookie) and ``Partitioned`` (Chromium
runs with third-party cookies phased out, keeping only partitioned ones), scoped to the public path.
"""

import html
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.web.ehr_launch import SESSION_COOKIE
from medblocks_pipelines_tests.browser.conftest import CHROMIUM_FLAGS, WAIT_SECONDS, BrowserTools
from medblocks_pipelines_tests.browser.test_patient_connect import wait_for
from medblocks_pipelines_tests.tls_proxy import PublicServe, medblocks_behind_tls_proxy
from medblocks_sandbox.drivers.clinician import first_patient, setup_clinician_org
from medblocks_sandbox.run import SandboxHandle, serve, start_sandbox

TENANT = "acme"


@pytest.fixture(scope="module")
def world(
    browser_tools: BrowserTools, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SandboxHandle, ControlPlane, PublicServe]]:
    """Its own sandbox (EHR + launching EHR), control plane and ``medblocks serve`` behind the
    proxy, so the registrations here touch no other browser test."""
    root = tmp_path_factory.mktemp("tls-browser")
    settings = Settings(
        data_dir=root / "data",
        database_url=f"sqlite:///{root / 'data' / 'control.db'}",
        lake_root=root / "data" / "lake",
        warehouse_dir=root / "data" / "warehouse",
    )
    settings.ensure_dirs()
    cp = open_control_plane(settings)
    cp.add_tenant(TENANT, "Acme Health App")
    env = {
        "MEDBLOCKS_DATA_DIR": str(settings.data_dir),
        "MEDBLOCKS_DATABASE_URL": settings.database_url,
        "MEDBLOCKS_LAKE_ROOT": str(settings.lake_root),
        "MEDBLOCKS_WAREHOUSE_DIR": str(settings.warehouse_dir),
    }
    sandbox = start_sandbox(base_port=0, persons=6, seed=11, roles=["ehr", "cds_ehr"])
    try:
        with medblocks_behind_tls_proxy(root, env=env) as served:
            yield sandbox, cp, served
    finally:
        sandbox.stop()
        cp.engine.dispose()


def _ehr_page(request: Request) -> HTMLResponse:
    # The EHR's own page, embedding the launched app as EHRs do.
    src = html.escape(request.query_params["src"])
    return HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>EHR</title></head>'
        f'<body><h1>EHR chart</h1><iframe id="app" src="{src}" width="1000" height="700">'
        "</iframe></body></html>"
    )


@pytest.fixture
def tls_browser(browser_tools: BrowserTools, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium accepting the proxy's self-signed certificate, third-party cookies off."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_tools.chromium
    for flag in (
        *CHROMIUM_FLAGS,
        "--ignore-certificate-errors",
        "--test-third-party-cookie-phaseout",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=browser_tools.chromedriver, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def test_embedded_ehr_launch_through_the_proxy(
    world: tuple[SandboxHandle, ControlPlane, PublicServe], tls_browser: Any, artifacts_dir: Path
) -> None:
    import base64

    from selenium.webdriver.common.by import By

    sandbox, cp, served = world
    org = sandbox.orgs_of("ehr")[0].org_id
    # Registered at the EHR with the public callback; the launch URL is the public one.
    ids = setup_clinician_org(sandbox, cp, tenant=TENANT, org=org, web_base=served.public)
    patient = first_patient(sandbox, org)
    launch = f"{sandbox.role_urls['cds_ehr']}/launch?" + urllib.parse.urlencode(
        {
            "org": org,
            "patient": patient,
            "encounter": "enc-tls",
            "app": f"{served.public}/ehr/launch",
        }
    )
    with serve(lambda _base: Starlette(routes=[Route("/chart", _ehr_page)])) as ehr_page:
        assert urllib.parse.urlsplit(ehr_page).scheme == "http"  # the top-level site differs
        tls_browser.get(f"{ehr_page}/chart?" + urllib.parse.urlencode({"src": launch}))
        frame = tls_browser.find_element(By.ID, "app")
        tls_browser.switch_to.frame(frame)
        here = lambda b: b.execute_script("return location.href")  # noqa: E731
        wait_for(
            tls_browser,
            lambda b: (
                here(b).startswith(f"{served.public}/ehr/app/")
                and b.find_elements(By.TAG_NAME, "h1")
            ),
            "our app page in the frame",
        )
        body = tls_browser.find_element(By.TAG_NAME, "body").text
        assert tls_browser.find_element(By.TAG_NAME, "h1").text == "Unified record", body
        assert tls_browser.find_elements(By.ID, "patient-banner")
        conn_id = here(tls_browser).rsplit("/", 1)[-1]
        tls_browser.switch_to.default_content()
        shot = tls_browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        (artifacts_dir / "ehr-launch-behind-tls-proxy.png").write_bytes(
            base64.b64decode(shot["data"])
        )
        cookies = tls_browser.execute_cdp_cmd("Storage.getCookies", {})["cookies"]
    (cookie,) = [c for c in cookies if c["name"] == SESSION_COOKIE]
    assert cookie["sameSite"] == "None" and cookie["secure"] is True
    assert cookie["path"] == "/medblocks/ehr"  # scoped to the public path
    assert cookie.get("partitionKey")  # CHIPS: kept under the EHR page's site
    conn = cp.get_connection(conn_id)
    assert conn.pattern == "clinician_workflow" and conn.state == "active"
    assert conn.organization_id == ids["organization_id"]
    assert conn.source_patient_id == patient
    assert conn.context["launch_context"]["encounter"] == "enc-tls"
    assert served.proxy.forwarded >= 3  # launch, callback, app page

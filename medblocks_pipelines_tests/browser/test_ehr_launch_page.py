"""The EHR-launch app page in a real headless Chromium: the sandbox EHR (the CDS-calling role)
launches our app, the browser follows the SMART EHR launch through the EHR's authorization server
to our callback, and our app page shows the patient banner and the unified record."""

from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines_tests.browser.conftest import CLINICIAN_ORG, TENANT
from medblocks_pipelines_tests.browser.test_patient_connect import wait_for
from medblocks_pipelines_tests.support.cds_synthetic import write_warehouse
from medblocks_sandbox.drivers.clinician import first_patient, setup_clinician_org
from medblocks_sandbox.run import SandboxHandle

SCT = "http://snomed.info/sct"


@pytest.fixture(scope="module")
def clinician(
    sandbox: SandboxHandle, control_plane: ControlPlane, browser_settings: Settings, web_base: str
) -> Iterator[dict[str, Any]]:
    """Our app registered at the sandbox EHR org, and a warehouse where its patient has a
    condition recorded at another organization."""
    ids = setup_clinician_org(
        sandbox, control_plane, tenant=TENANT, org=CLINICIAN_ORG, web_base=web_base
    )
    patient_id = first_patient(sandbox, CLINICIAN_ORG)
    patient = next(
        p
        for p in sandbox.org_handles(CLINICIAN_ORG)["store"].iter_type("Patient")
        if p["id"] == patient_id
    )
    when = date.today() - timedelta(days=30)
    write_warehouse(
        warehouse_path(browser_settings, TENANT),
        links=[
            {
                "patient_key": f"{ids['source_id']}/Patient/{patient_id}",
                "source": ids["source_id"],
                "person_id": "P-browser",
            },
        ],
        facts=[
            {
                "fact_id": "f-browser-1",
                "person_id": "P-browser",
                "kind": "condition",
                "code_system": SCT,
                "code": "38341003",
                "display": "Hypertensive disorder (browser test)",
                "effective_date": when,
                "last_date": when,
                "sources": ["mercy-general"],
                "patterns": ["patient_access"],
                "organizations": ["mercy-general"],
                "codes": [f"{SCT}|38341003"],
                "from_claims": False,
                "status": "active",
            }
        ],
    )
    yield {**ids, "patient_id": patient_id, "patient": patient}


def test_ehr_launch_shows_the_patient_banner(
    browser: Any,
    screenshot: Callable[[str], Path],
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
    clinician: dict[str, Any],
) -> None:
    from selenium.webdriver.common.by import By

    launcher = sandbox.role_urls["cds_ehr"]
    patient = clinician["patient"]
    # The EHR opens our launch URL with iss + launch; the clinician is signed in at the EHR.
    browser.get(
        f"{launcher}/launch?org={CLINICIAN_ORG}&patient={clinician['patient_id']}"
        f"&encounter=enc-browser&app={web_base}/ehr/launch"
    )
    wait_for(browser, lambda b: b.current_url.startswith(f"{web_base}/ehr/app/"), "our app page")
    wait_for(browser, lambda b: b.find_elements(By.ID, "patient-banner"), "the patient banner")
    banner = browser.find_element(By.ID, "patient-banner")
    assert banner.is_displayed()
    name = patient["name"][0]
    assert name["family"] in banner.text
    assert name["given"][0] in banner.text
    assert str(patient["birthDate"]) in banner.text
    record = browser.find_element(By.ID, "record").text
    assert "Hypertensive disorder (browser test)" in record
    assert "patient-authorized access" in record  # provenance: how we learnt it
    screenshot("ehr-launch-app-page")

    conn_id = browser.current_url.rsplit("/", 1)[-1]
    conn = control_plane.get_connection(conn_id)
    assert conn.pattern == "clinician_workflow" and conn.state == "active"
    assert conn.source_patient_id == clinician["patient_id"]
    assert conn.organization_id == clinician["organization_id"]
    assert conn.context["launch_context"]["encounter"] == "enc-browser"

    # The page belongs to the browser that launched it: a fresh session gets nothing.
    browser.delete_all_cookies()
    browser.refresh()
    wait_for(browser, lambda b: b.find_elements(By.TAG_NAME, "h1"), "the refusal page")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not available"
    assert not browser.find_elements(By.ID, "patient-banner")
    assert name["family"] not in browser.find_element(By.TAG_NAME, "body").text
    screenshot("ehr-launch-other-browser")


def test_unknown_iss_is_refused_in_the_browser(
    browser: Any,
    screenshot: Callable[[str], Path],
    web_base: str,
    clinician: dict[str, Any],
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{web_base}/ehr/launch?iss=https://attacker.example/fhir&launch=x")
    wait_for(browser, lambda b: b.find_elements(By.TAG_NAME, "h1"), "the refusal page")
    # No redirect anywhere: the browser stays on our page, which names the reason.
    assert browser.current_url.startswith(f"{web_base}/ehr/launch")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Cannot launch"
    assert "unknown_iss" in browser.find_element(By.TAG_NAME, "body").text
    screenshot("ehr-launch-unknown-iss")

"""A patient connects by clicking through in a real headless Chromium: our connect link, the
sandbox EHR's sign-in and consent pages, our callback, and the tenant's return page."""

import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medblocks_pipelines.lib.registry import ControlPlane
from medblocks_pipelines.lib.smart.launch import MAX_GET_URL, ConnectLink, create_connect_link
from medblocks_pipelines.lib.smart.tokens import tokens_secret_name
from medblocks_pipelines_tests.browser.conftest import PATIENT_ORG, TENANT, WAIT_SECONDS
from medblocks_sandbox.run import SandboxHandle

Shot = Callable[[str], Path]


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def wait_for(browser: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Wait until ``condition(browser)`` is truthy; the failure names ``what`` and the page."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT_SECONDS, poll_frequency=0.05).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; at {browser.current_url!r}: {browser.title!r}")


def text_of(browser: Any, element_id: str) -> str:
    return str(browser.find_element(_by().ID, element_id).text)


def login(sandbox: SandboxHandle, index: int) -> Any:
    """The ``index``-th sandbox portal login of the patient-access org."""
    logins = [lg for lg in sandbox.population.logins if lg.org_id == PATIENT_ORG]
    assert len(logins) > index, "the sandbox population has too few portal logins"
    return logins[index]


def open_link_to_login_page(
    browser: Any,
    sandbox: SandboxHandle,
    cp: ControlPlane,
    web_base: str,
    return_url: str | None,
    patient_ref: str,
) -> ConnectLink:
    """Create a connect link, open it, and wait for the EHR's sign-in form; returns the link."""
    link = create_connect_link(
        cp,
        tenant_id=TENANT,
        source_id=PATIENT_ORG,
        patient_ref=patient_ref,
        public_base_url=web_base,
        return_url=return_url,
    )
    assert cp.get_connection(link.connection_id).state == "pending"
    browser.get(link.url)
    By = _by()
    wait_for(browser, lambda b: b.find_elements(By.ID, "username"), "the sandbox sign-in form")
    # The link took the browser away from us to the EHR's own authorization server.
    assert browser.current_url.startswith(sandbox.org(PATIENT_ORG).base_url)
    assert not browser.current_url.startswith(web_base)
    assert browser.title.startswith("Sign in")
    return link


def sign_in(browser: Any, username: str, password: str) -> None:
    By = _by()
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, 'button[value="login"]').click()


def wait_for_consent(browser: Any) -> None:
    By = _by()
    wait_for(
        browser,
        lambda b: b.find_elements(By.CSS_SELECTOR, 'button[value="approve"]'),
        "the sandbox consent page",
    )


def test_patient_connects_by_clicking_through(
    browser: Any,
    screenshot: Shot,
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
    tenant_app: str,
) -> None:
    cp, By = control_plane, _by()
    who = login(sandbox, 0)
    link = open_link_to_login_page(
        browser, sandbox, cp, web_base, f"{tenant_app}/connected?from=email", "acme-user-1"
    )
    conn_id = link.connection_id
    assert "Acme Health App" in browser.page_source  # the EHR names the app asking
    screenshot("connect-1-login")

    sign_in(browser, who.username, who.password)
    wait_for_consent(browser)
    boxes = browser.find_elements(By.CSS_SELECTOR, 'input[type="checkbox"][name="scope"]')
    offered = [b.get_attribute("value") for b in boxes]
    assert boxes and all(b.is_selected() for b in boxes)
    assert any(s.startswith("patient/Observation.") for s in offered), offered
    assert "offline_access" in offered  # we ask for a refresh token
    assert who.username in browser.find_element(By.TAG_NAME, "body").text
    screenshot("connect-2-consent")

    browser.find_element(By.CSS_SELECTOR, 'button[value="approve"]').click()
    wait_for(
        browser,
        lambda b: b.current_url.startswith(f"{tenant_app}/connected"),
        "the tenant's return page",
    )
    wait_for(browser, lambda b: b.find_elements(By.ID, "status"), "the return page content")
    assert text_of(browser, "status") == "active"
    assert text_of(browser, "connection_id") == conn_id
    assert text_of(browser, "reason") == ""
    assert "from=email" in browser.current_url  # the tenant's own query is kept
    # Nothing secret rides on the return URL.
    for secret_word in ("code=", "state=", "token", who.password):
        assert secret_word not in browser.current_url
    screenshot("connect-3-return")

    conn = cp.get_connection(conn_id)
    assert conn.state == "active"
    assert conn.source_patient_id == who.patient_id
    assert conn.has_refresh_token is True
    assert "patient/Observation" in str(conn.scopes_granted)
    blob = cp.vault.get(tokens_secret_name(conn_id))
    assert blob is not None
    tokens = json.loads(blob.reveal())
    assert isinstance(tokens.get("refresh_token"), str) and tokens["refresh_token"]
    assert isinstance(tokens.get("access_token"), str) and tokens["access_token"]

    # Opening the same link again cannot start a second authorization for this connection.
    browser.get(link.url)
    wait_for(browser, lambda b: b.find_elements(By.TAG_NAME, "h1"), "our link page")
    assert browser.current_url.startswith(web_base)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Cannot connect"
    screenshot("connect-4-link-reused")
    assert cp.get_connection(conn_id).state == "active"


@pytest.mark.parametrize(
    ("where", "button"),
    [("consent", 'button[value="deny"]'), ("login", 'button[value="deny"]')],
    ids=["deny-on-consent", "cancel-on-sign-in"],
)
def test_patient_denies(
    where: str,
    button: str,
    browser: Any,
    screenshot: Shot,
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
    tenant_app: str,
) -> None:
    cp, By = control_plane, _by()
    who = login(sandbox, 1)
    conn_id = open_link_to_login_page(
        browser, sandbox, cp, web_base, f"{tenant_app}/connected", f"acme-deny-{where}"
    ).connection_id
    if where == "consent":
        sign_in(browser, who.username, who.password)
        wait_for_consent(browser)
    # The sign-in page's Cancel is `formnovalidate`: it works with empty required fields.
    browser.find_element(By.CSS_SELECTOR, button).click()
    wait_for(
        browser,
        lambda b: b.current_url.startswith(f"{tenant_app}/connected"),
        "the tenant's return page",
    )
    wait_for(browser, lambda b: b.find_elements(By.ID, "status"), "the return page content")
    assert text_of(browser, "status") == "failed"
    assert text_of(browser, "reason") == "access_denied"
    assert text_of(browser, "connection_id") == conn_id
    screenshot(f"deny-{where}-return")

    conn = cp.get_connection(conn_id)
    assert conn.state == "failed"
    assert conn.state_reason == "access_denied"
    assert conn.source_patient_id is None
    assert cp.vault.get(tokens_secret_name(conn_id)) is None
    assert not cp.vault.names(f"conn/{conn_id}/")


def test_wrong_password_then_our_own_connected_page(
    browser: Any,
    screenshot: Shot,
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
) -> None:
    """A wrong password keeps the patient on the sign-in page; without a return URL our own
    callback page says the records are connected."""
    cp, By = control_plane, _by()
    who = login(sandbox, 2)
    conn_id = open_link_to_login_page(
        browser, sandbox, cp, web_base, None, "acme-no-return"
    ).connection_id
    sign_in(browser, who.username, who.password + "-wrong")
    wait_for(browser, lambda b: "Wrong username or password" in b.page_source, "the sign-in error")
    assert not browser.find_elements(By.CSS_SELECTOR, 'button[value="approve"]')
    screenshot("wrong-password")
    assert cp.get_connection(conn_id).state == "pending"  # a typo fails nothing

    sign_in(browser, who.username, who.password)
    wait_for_consent(browser)
    browser.find_element(By.CSS_SELECTOR, 'button[value="approve"]').click()
    wait_for(
        browser,
        lambda b: b.current_url.startswith(f"{web_base}/connect/callback"),
        "our callback page",
    )
    wait_for(browser, lambda b: b.find_elements(By.TAG_NAME, "h1"), "our page heading")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Connected"
    screenshot("connect-own-page")
    conn = cp.get_connection(conn_id)
    assert conn.state == "active" and conn.source_patient_id == who.patient_id

    # The callback URL is single use: reloading it is refused and changes nothing.
    browser.refresh()
    wait_for(
        browser,
        lambda b: b.find_element(By.TAG_NAME, "h1").text != "Connected",
        "the refusal of a replayed callback",
    )
    assert "Connection refused" in browser.find_element(By.TAG_NAME, "h1").text
    assert cp.get_connection(conn_id).state == "active"


def test_patient_unticks_scopes_and_we_record_what_was_granted(
    browser: Any,
    screenshot: Shot,
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
    tenant_app: str,
) -> None:
    """The consent page lets the patient take scopes away; we keep what the EHR granted, not
    what we asked for."""
    cp, By = control_plane, _by()
    who = login(sandbox, 3)
    conn_id = open_link_to_login_page(
        browser, sandbox, cp, web_base, f"{tenant_app}/connected", "acme-partial"
    ).connection_id
    sign_in(browser, who.username, who.password)
    wait_for_consent(browser)
    dropped = []
    for box in browser.find_elements(By.CSS_SELECTOR, 'input[type="checkbox"][name="scope"]'):
        value = str(box.get_attribute("value"))
        if value.startswith(("patient/Observation.", "patient/Immunization.")):
            box.click()
            assert not box.is_selected()
            dropped.append(value)
    assert len(dropped) == 2, dropped
    screenshot("partial-consent")
    browser.find_element(By.CSS_SELECTOR, 'button[value="approve"]').click()
    wait_for(browser, lambda b: b.find_elements(By.ID, "status"), "the tenant's return page")
    assert text_of(browser, "status") == "active"

    conn = cp.get_connection(conn_id)
    granted = str(conn.scopes_granted).split()
    requested = str(conn.scopes_requested).split()
    assert set(dropped) <= set(requested)
    assert not set(dropped) & set(granted)
    assert "patient/Patient.rs" in granted or "patient/Patient.read" in granted
    assert conn.has_refresh_token is True


#: Fine-grained SMART v2 scopes (category-filtered), as vendors with long scope lists ask for;
#: together they push the authorize URL past 2000 characters.
OBSERVATION_CATEGORIES = (
    "laboratory",
    "vital-signs",
    "social-history",
    "survey",
    "exam",
    "imaging",
    "procedure",
    "therapy",
    "activity",
)
LONG_SCOPES = [
    "launch/patient",
    "openid",
    "fhirUser",
    "offline_access",
    "patient/Patient.rs",
    *(
        "patient/Observation.rs?category="
        f"http://terminology.hl7.org/CodeSystem/observation-category|{c}"
        for c in OBSERVATION_CATEGORIES
    ),
    *(
        f"patient/Condition.rs?category=http://terminology.hl7.org/CodeSystem/condition-category|{c}"
        for c in ("problem-list-item", "encounter-diagnosis")
    ),
    *(
        "patient/DocumentReference.rs?category="
        f"http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category|{c}"
        for c in ("clinical-note",)
    ),
    *(
        f"patient/DiagnosticReport.rs?category=http://terminology.hl7.org/CodeSystem/v2-0074|{c}"
        for c in ("LAB", "RAD", "CT", "NMR", "CUS", "PAT")
    ),
    "patient/Observation.rs?category=http://hl7.org/fhir/us/core/CodeSystem/us-core-category|sdoh",
]


@pytest.fixture(scope="module")
def long_scope_source(sandbox: SandboxHandle, control_plane: ControlPlane, web_base: str) -> str:
    """A second patient-access source at the same EHR whose scope list is long."""
    endpoint = sandbox.org(PATIENT_ORG)
    source_id = f"{PATIENT_ORG}-long-scopes"
    control_plane.add_source(
        source_id,
        f"{endpoint.name} (fine-grained scopes)",
        "sandbox",
        "ehr",
        endpoint.fhir_base,
        ["patient_access"],
        {"client_id": "medblocks-patient-app", "scopes": LONG_SCOPES},
    )
    return source_id


def test_long_scope_list_goes_through_the_auto_posting_form(
    browser: Any,
    screenshot: Shot,
    sandbox: SandboxHandle,
    control_plane: ControlPlane,
    web_base: str,
    tenant_app: str,
    long_scope_source: str,
) -> None:
    """Past 2000 characters we POST the authorization request (SPECS §1.3): our start page is a
    form that submits itself; only a browser running it proves it works."""
    cp, By = control_plane, _by()
    who = login(sandbox, 4)
    link = create_connect_link(
        cp,
        tenant_id=TENANT,
        source_id=long_scope_source,
        patient_ref="acme-long-scopes",
        public_base_url=web_base,
        return_url=f"{tenant_app}/connected",
    )
    browser.get(link.url)
    wait_for(browser, lambda b: b.find_elements(By.ID, "username"), "the sandbox sign-in form")
    assert browser.current_url.startswith(sandbox.org(PATIENT_ORG).base_url)
    started = [
        e
        for e in cp.connection_events(link.connection_id)
        if e.event_type == "launch.authorize_redirect"
    ]
    assert [e.detail["method"] for e in started] == ["POST"]
    # POST because the GET URL would have been too long (not because POST is always used).
    assert len(urllib.parse.urlencode({"scope": " ".join(LONG_SCOPES)})) > MAX_GET_URL
    sign_in(browser, who.username, who.password)
    wait_for_consent(browser)
    offered = [
        b.get_attribute("value")
        for b in browser.find_elements(By.CSS_SELECTOR, 'input[type="checkbox"][name="scope"]')
    ]
    assert [s for s in offered if "category=" in str(s)] == [
        s for s in LONG_SCOPES if "category=" in s
    ]
    assert "(only some)" in browser.find_element(By.TAG_NAME, "body").text
    screenshot("long-scopes-consent")
    browser.find_element(By.CSS_SELECTOR, 'button[value="approve"]').click()
    wait_for(browser, lambda b: b.find_elements(By.ID, "status"), "the tenant's return page")
    assert text_of(browser, "status") == "active"
    conn = cp.get_connection(link.connection_id)
    assert conn.state == "active" and conn.source_patient_id == who.patient_id
    granted = set(str(conn.scopes_granted).split())
    assert {s for s in LONG_SCOPES if s.startswith("patient/")} <= granted

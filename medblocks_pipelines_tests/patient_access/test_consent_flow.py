"""The SMART standalone consent flow over real sockets: our web app <-> the sandbox EHR/payer.

Every test drives the sandbox's real login and consent pages through HTML forms; nothing goes
around the authorization server. Covers the authorization request (PKCE S256, state entropy, aud,
scopes), success, denial, narrowed grants, state mismatch and replay, bad PKCE, expired codes,
confidential clients, v1 scope syntax, payer sources and the tenant's JSON link endpoint.
"""

import base64
import hashlib
import json
import urllib.parse

import httpx
import pytest

from medblocks_pipelines.lib.smart.assertion import generate_signing_key, jwks_of
from medblocks_pipelines.lib.smart.launch import create_connect_link, state_secret_name
from medblocks_pipelines.lib.smart.scopes import ScopeSet
from medblocks_pipelines.lib.smart.tokens import tokens_secret_name
from medblocks_pipelines.web.connect import issue_connect_api_key
from medblocks_pipelines_tests.patient_access.conftest import RETURN_URL, PatientAccessEnv
from medblocks_sandbox.consent_browser import connect_via_consent_page


def authorize_params(env: PatientAccessEnv, link_url: str) -> dict[str, str]:
    """Open a link without following redirects: the query our start route sends the browser to."""
    resp = env.http.get(link_url)
    assert resp.status_code == 302
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(resp.headers["location"]).query))


def test_authorization_request_follows_the_spec(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p-1",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    q = authorize_params(pa_env, link.url)
    assert q["response_type"] == "code"
    assert q["aud"] == org.fhir_base
    assert q["redirect_uri"] == pa_env.callback
    assert q["code_challenge_method"] == "S256"
    assert len(base64.urlsafe_b64decode(q["code_challenge"] + "=")) == 32  # a SHA-256 digest
    # state: >= 122 bits of entropy; only its hash is stored, bound to this connection.
    assert len(base64.urlsafe_b64decode(q["state"] + "=" * (-len(q["state"]) % 4))) * 8 >= 122
    assert pa_env.cp.vault.get(state_secret_name(q["state"])) is not None
    assert q["state"] not in json.dumps(pa_env.cp.get_connection(link.connection_id).context)
    scopes = q["scope"].split()
    assert {"launch/patient", "openid", "fhirUser", "offline_access"} <= set(scopes)
    assert "patient/Observation.rs" in scopes  # the sandbox offers permission-v2
    # The stored verifier matches the challenge we sent.
    pending = json.loads(pa_env.cp.vault.get(state_secret_name(q["state"])).reveal())
    digest = hashlib.sha256(pending["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == q["code_challenge"]
    assert 43 <= len(pending["code_verifier"]) <= 128


def test_consent_approved_makes_an_active_connection(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    conn_id, outcome = pa_env.connect(sid, login)
    assert outcome.status == "active" and outcome.connection_id == conn_id
    assert outcome.final_url.startswith(RETURN_URL)
    conn = pa_env.cp.get_connection(conn_id)
    assert conn.state == "active"
    assert conn.source_patient_id == login.patient_id
    assert conn.has_refresh_token is True
    assert conn.token_expires_at is not None
    blob = json.loads(pa_env.cp.vault.get(tokens_secret_name(conn_id)).reveal())
    assert blob["refresh_token"] and blob["access_token"]
    events = [e.event_type for e in pa_env.cp.connection_events(conn_id)]
    assert events == [
        "created",
        "link.created",
        "launch.authorize_redirect",
        "launch.callback",
        "token.received",
        "state.active",
    ]
    received = pa_env.cp.connection_events(conn_id)[4].detail
    assert received["id_token_verified"] is True
    # No secret material leaked into the registry or events.
    dumped = json.dumps(
        [conn.context, [e.detail for e in pa_env.cp.connection_events(conn_id)]], default=str
    )
    assert blob["access_token"] not in dumped and blob["refresh_token"] not in dumped


def test_consent_denied_fails_the_connection(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0], approve=False)
    assert outcome.status == "failed" and outcome.reason == "access_denied"
    conn = pa_env.cp.get_connection(conn_id)
    assert conn.state == "failed" and conn.state_reason == "access_denied"
    assert pa_env.cp.vault.names(f"conn/{conn_id}/") == []
    types = [e.type for e in pa_env.cp.list_events(tenant_id="acme")]
    assert "connection.failed" in types


def test_patient_narrows_the_grant(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, outcome = pa_env.connect(
        sid,
        pa_env.logins(org)[1],
        uncheck_scopes=["patient/Observation.rs", "patient/Condition.rs"],
    )
    assert outcome.status == "active"
    conn = pa_env.cp.get_connection(conn_id)
    granted = ScopeSet.parse(conn.scopes_granted)
    assert not granted.can_search("Observation") and granted.can_search("Encounter")
    detail = pa_env.cp.connection_events(conn_id)[4].detail
    assert detail["granted_differs"] is True


def test_state_mismatch_is_refused_and_the_real_callback_still_works(
    pa_env: PatientAccessEnv,
) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    captured: list[str] = []

    def forge_state(url: str) -> str:
        captured.append(url)
        parts = urllib.parse.urlsplit(url)
        q = dict(urllib.parse.parse_qsl(parts.query))
        q["state"] = "forged-" + q["state"][7:]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))

    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    outcome = connect_via_consent_page(
        link.url,
        username=login.username,
        password=login.password,
        stop_at=RETURN_URL,
        http=pa_env.http,
        tamper=forge_state,
    )
    assert outcome.status == "refused"
    assert pa_env.cp.get_connection(link.connection_id).state == "pending"
    # The genuine callback (same code and state) is then accepted once, and only once.
    first = pa_env.http.get(captured[0])
    assert first.status_code == 302 and "status=active" in first.headers["location"]
    replay = pa_env.http.get(captured[0])
    assert replay.status_code == 400
    assert pa_env.cp.get_connection(link.connection_id).state == "active"


def test_bad_pkce_verifier_fails_the_connection(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]

    def swap_verifier(url: str) -> str:
        state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
        name = state_secret_name(state)
        pending = json.loads(pa_env.cp.vault.get(name).reveal())
        pending["code_verifier"] = "x" * 64  # well-formed, but not the one we committed to
        pa_env.cp.vault.put(name, json.dumps(pending))
        return url

    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    outcome = connect_via_consent_page(
        link.url,
        username=login.username,
        password=login.password,
        stop_at=RETURN_URL,
        http=pa_env.http,
        tamper=swap_verifier,
    )
    assert outcome.status == "failed" and outcome.reason == "invalid_grant"
    assert pa_env.cp.get_connection(link.connection_id).state_reason == "invalid_grant"


def test_expired_code_fails_the_connection(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    pa_env.sandbox.admin(org.org_id, "config", {"code_lifetime": 0})
    try:
        conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    finally:
        pa_env.sandbox.admin(org.org_id, "config", {"code_lifetime": 60})
    assert outcome.status == "failed" and outcome.reason == "invalid_grant"
    assert pa_env.cp.get_connection(conn_id).state == "failed"


def test_v1_scope_syntax_per_source(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org, config={"scope_syntax": "v1"})
    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    assert "patient/Observation.read" in authorize_params(pa_env, link.url)["scope"].split()
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "active"
    # Granted v1 strings are stored normalised to v2.
    assert "patient/Observation.rs" in pa_env.cp.get_connection(conn_id).scopes_granted


def test_confidential_client_secret_basic(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(
        org,
        config={"client_auth": "client_secret_basic"},
        register={"token_endpoint_auth_method": "client_secret_basic"},
    )
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "active"


def test_confidential_client_private_key_jwt(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    key = generate_signing_key("ES384")
    sid = pa_env.add_source(
        org,
        config={"client_auth": "private_key_jwt"},
        register={"token_endpoint_auth_method": "private_key_jwt", "jwks": jwks_of([key])},
    )
    pa_env.cp.vault.put(f"source/{sid}/signing_key", key.to_json())
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "active"
    assert pa_env.cp.connection_events(conn_id)[2].detail["client_auth"] == "private_key_jwt"


def test_public_client_refused_where_the_source_wants_a_confidential_one(
    pa_env: PatientAccessEnv,
) -> None:
    org = pa_env.org("ehr")
    # Registered confidential at the source, but our config says public: the exchange is refused.
    sid = pa_env.add_source(org, register={"token_endpoint_auth_method": "client_secret_basic"})
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "failed" and outcome.reason == "invalid_client"


def test_payer_connection(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("payer")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    scopes = authorize_params(pa_env, link.url)["scope"].split()
    assert "patient/ExplanationOfBenefit.rs" in scopes and "patient/Coverage.rs" in scopes
    assert "patient/Observation.rs" not in scopes
    conn_id, outcome = pa_env.connect(sid, login)
    assert outcome.status == "active"
    assert pa_env.cp.get_connection(conn_id).source_patient_id == login.patient_id


def test_tenant_link_endpoint(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    key = issue_connect_api_key(pa_env.cp, "acme")
    url = f"{pa_env.web_base}/connect/links"
    body = {"tenant": "acme", "source": sid, "patient_ref": "t-42", "return_url": RETURN_URL}
    assert pa_env.http.post(url, json=body).status_code == 401
    assert (
        pa_env.http.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    bad = {**body, "return_url": "javascript:alert(1)"}
    assert (
        pa_env.http.post(url, json=bad, headers={"Authorization": f"Bearer {key}"}).status_code
        == 400
    )
    resp = pa_env.http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 201
    created = resp.json()
    assert created["url"].startswith(f"{pa_env.web_base}/connect/start/")
    login = pa_env.logins(org)[0]
    outcome = connect_via_consent_page(
        created["url"],
        username=login.username,
        password=login.password,
        stop_at=RETURN_URL,
        http=pa_env.http,
    )
    assert outcome.connection_id == created["connection_id"] and outcome.status == "active"
    assert pa_env.cp.get_connection(created["connection_id"]).patient_ref == "t-42"


def test_unknown_link_is_refused(pa_env: PatientAccessEnv) -> None:
    resp = pa_env.http.get(f"{pa_env.web_base}/connect/start/not-a-link")
    assert resp.status_code == 400


@pytest.mark.parametrize("query", ["", "?code=abc", "?state=nope&code=abc"])
def test_callback_without_a_known_state_is_refused(pa_env: PatientAccessEnv, query: str) -> None:
    resp = pa_env.http.get(f"{pa_env.web_base}/connect/callback{query}")
    assert resp.status_code == 400


def test_callback_from_another_browser_is_refused(pa_env: PatientAccessEnv) -> None:
    """The state is tied to the browser that opened the link (a session cookie): a callback URL
    carried to another browser (login CSRF) is refused, and the right browser still succeeds."""
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    captured: list[str] = []
    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )

    def steal(url: str) -> str:
        captured.append(url)
        with httpx.Client() as other_browser:
            assert other_browser.get(url).status_code == 400
        return url

    outcome = connect_via_consent_page(
        link.url,
        username=login.username,
        password=login.password,
        stop_at=RETURN_URL,
        http=pa_env.http,
        tamper=steal,
    )
    assert captured and outcome.status == "active"


def test_long_scope_lists_use_post_authorization(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    many = (
        ["launch/patient", "openid", "fhirUser", "offline_access"]
        + [f"patient/Observation.rs?code=http://loinc.org|{1000 + i}-{i % 10}" for i in range(60)]
        + ["patient/Patient.rs", "patient/Encounter.rs"]
    )
    sid = pa_env.add_source(org, config={"scopes": many})
    link = create_connect_link(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        patient_ref="p",
        public_base_url=pa_env.web_base,
        return_url=RETURN_URL,
    )
    page = pa_env.http.get(link.url)
    assert page.status_code == 200 and 'method="post"' in page.text  # auto-submitting form
    login = pa_env.logins(org)[0]
    outcome = connect_via_consent_page(
        link.url,
        username=login.username,
        password=login.password,
        stop_at=RETURN_URL,
        http=pa_env.http,
    )
    assert outcome.status == "active"


def test_tenant_revokes_through_the_api(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, _ = pa_env.connect(sid, pa_env.logins(org)[0])
    key = issue_connect_api_key(pa_env.cp, "acme")
    url = f"{pa_env.web_base}/connect/connections/{conn_id}"
    assert pa_env.http.delete(url).status_code == 401
    resp = pa_env.http.delete(url, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200 and resp.json()["revoked_at_source"] is True
    assert pa_env.cp.get_connection(conn_id).state == "revoked"

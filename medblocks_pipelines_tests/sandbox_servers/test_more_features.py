"""Smaller features: _revinclude, $everything _since, launch fhirContext/intent, id_token nonce,
refresh-token lifetime, CapabilityStatement-free discovery of the OIDC issuer."""

import jwt

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    AuthRequest,
    Server,
    consent,
    exchange,
    get_code,
    redirect_params,
    register_public,
    standalone_token,
)


def test_revinclude_provenance(ehr: Server) -> None:
    register_public(ehr)
    ehr.admin(
        "apply-changes",
        {
            "upserts": [
                {
                    "resourceType": "Provenance",
                    "id": "prov1",
                    "recorded": "2024-03-01T10:00:00Z",
                    "target": [{"reference": "Condition/cond1"}, {"reference": "Patient/p1"}],
                    "agent": [{"who": {"reference": "Practitioner/dr1"}}],
                }
            ]
        },
    )
    auth = {"Authorization": f"Bearer {standalone_token(ehr)['access_token']}"}
    bundle = ehr.http.get(
        f"{ehr.fhir}/Condition?_revinclude=Provenance:target", headers=auth
    ).json()
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in bundle["entry"]] == [
        ("cond1", "match"),
        ("prov1", "include"),
    ]


def test_everything_since(ehr: Server) -> None:
    register_public(ehr)
    auth = {"Authorization": f"Bearer {standalone_token(ehr)['access_token']}"}
    mark = ehr.app.state.store.now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    ehr.admin(
        "apply-changes",
        {
            "upserts": [
                {
                    "resourceType": "Observation",
                    "id": "late",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/p1"},
                }
            ]
        },
    )
    bundle = ehr.http.get(f"{ehr.fhir}/Patient/p1/$everything?_since={mark}", headers=auth).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["late"]
    bad = ehr.http.get(f"{ehr.fhir}/Patient/p1/$everything?start=2020", headers=auth)
    assert bad.status_code == 400


def test_launch_context_fhir_context_intent_and_nonce(ehr: Server) -> None:
    register_public(ehr)
    launch = ehr.admin(
        "launch",
        {
            "patient": "p1",
            "user": "Practitioner/dr1",
            "intent": "reconcile-medications",
            "fhir_context": [{"reference": "MedicationRequest/mr1", "role": "https://x.org/role"}],
            "smart_style_url": "http://127.0.0.1:9/style.json",
        },
    ).json()["launch"]
    req = AuthRequest(
        scope="launch openid fhirUser patient/*.rs",
        extra={"launch": launch, "nonce": "n-0S6_WzA2Mj"},
    )
    page = ehr.http.get(ehr.smart()["authorization_endpoint"], params=req.params(ehr))
    code = redirect_params(consent(ehr, page))["code"]
    body = exchange(ehr, req, code).json()
    assert body["intent"] == "reconcile-medications"
    assert body["fhirContext"] == [
        {"reference": "MedicationRequest/mr1", "role": "https://x.org/role"}
    ]
    assert body["smart_style_url"] == "http://127.0.0.1:9/style.json"
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["nonce"] == "n-0S6_WzA2Mj" and claims["aud"] == "app"
    # Introspection repeats the launch context (SPECS §1.8).
    info = ehr.http.post(
        ehr.smart()["introspection_endpoint"],
        data={"token": body["access_token"]},
        headers={"Authorization": f"Bearer {body['access_token']}"},
    ).json()
    assert info["intent"] == "reconcile-medications" and info["patient"] == "p1"


def test_refresh_token_expiry(ehr: Server) -> None:
    register_public(ehr)
    ehr.auth.config.refresh_token_lifetime = 0
    body = standalone_token(ehr)
    resp = ehr.http.post(
        ehr.smart()["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": "app",
        },
    )
    assert resp.json()["error"] == "invalid_grant"


def test_online_access_gives_refresh_token(ehr: Server) -> None:
    register_public(ehr)
    req = AuthRequest(scope="launch/patient online_access patient/Patient.rs")
    code = get_code(ehr, req)
    body = exchange(ehr, req, code).json()
    assert body["refresh_token"] and "online_access" in body["scope"].split()


def test_concurrent_refresh_with_one_token_kills_the_grant(ehr: Server) -> None:
    """SPECS §1.7: two refreshes of the same token race; the loser looks like a replay, so
    the server revokes the grant (why clients must keep one refresher per grant)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    register_public(ehr)
    body = standalone_token(ehr)
    url = ehr.smart()["token_endpoint"]
    data = {
        "grant_type": "refresh_token",
        "refresh_token": body["refresh_token"],
        "client_id": "app",
    }

    def refresh(_: int) -> httpx.Response:
        with httpx.Client(timeout=10) as client:
            return client.post(url, data=data)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(refresh, range(2)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 400]
    winner = next(r.json() for r in results if r.status_code == 200)
    follow = ehr.http.post(url, data={**data, "refresh_token": winner["refresh_token"]})
    assert follow.json()["error"] == "invalid_grant"


def test_token_errors_are_not_cached_and_xml_is_not_acceptable(ehr: Server) -> None:
    resp = ehr.http.post(ehr.smart()["token_endpoint"], data={"grant_type": "nope"})
    assert resp.status_code == 401 and resp.headers["cache-control"] == "no-store"
    xml = ehr.http.get(f"{ehr.fhir}/metadata", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 406

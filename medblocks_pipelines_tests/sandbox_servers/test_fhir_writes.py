"""The sandbox EHR's FHIR R4 write API over real sockets (FHIR R4 http.html, SMART v2 letters).

Transactions (all or nothing, processing order, urn:uuid references rewritten), batches (entry by
entry), REST create/update/delete with Location/ETag/Last-Modified and Prefer, If-Match, R4B
validation, content-type and Bundle-shape errors, and the c/u/d permission letters of system and
patient-context tokens.
"""

import json
import secrets
import uuid
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome

from medblocks_pipelines_tests.sandbox_servers.helpers import (
    AuthRequest,
    KeyPair,
    Server,
    backend_token,
    make_key,
    register_public,
    standalone_token,
)

FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return make_key("RS384", "writes-1")


def system_auth(
    ehr: Server, key: KeyPair, scope: str, ceiling: tuple[str, ...] = ("system/*.cruds",)
) -> dict[str, str]:
    """Bearer header of a Backend Services token with `scope` (client registered with `ceiling`)."""
    client_id = f"svc-{secrets.token_hex(4)}"
    reg = ehr.admin(
        "clients",
        {
            "client_id": client_id,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [key.public_jwk]},
            "scopes": list(ceiling),
        },
    )
    assert reg.status_code == 201, reg.text
    resp = backend_token(ehr, client_id, key, scope=scope)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


@pytest.fixture
def writer(ehr: Server, key: KeyPair) -> dict[str, str]:
    """A `system/*.cud` + `system/*.rs` token (what the export feature's client holds)."""
    return system_auth(ehr, key, "system/*.cud system/*.rs")


def _obs(oid: str | None, pid: str = "p1", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": 72, "unit": "/min"},
        **extra,
    }
    if oid is not None:
        out["id"] = oid
    return out


def _bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _put(resource: dict[str, Any], **request: Any) -> dict[str, Any]:
    url = f"{resource['resourceType']}/{resource['id']}"
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def _delete(url: str, **request: Any) -> dict[str, Any]:
    return {"request": {"method": "DELETE", "url": url, **request}}


def _post(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def _send(
    ehr: Server,
    auth: dict[str, str],
    body: Any,
    *,
    ctype: str = FHIR_JSON,
    url: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ehr.http.post(
        url or f"{ehr.fhir}/",
        content=content,
        headers={"Content-Type": ctype, "Accept": FHIR_JSON, **auth, **(headers or {})},
    )


def _outcome(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    body = resp.json()
    OperationOutcome.model_validate(body)
    if code is not None:
        assert body["issue"][0]["code"] == code, body
    return body


def _version(ehr: Server, auth: dict[str, str], url: str) -> str | int:
    """The current versionId at `url`, or the HTTP status when it is not readable."""
    resp = ehr.http.get(f"{ehr.fhir}/{url}", headers=auth)
    return resp.json()["meta"]["versionId"] if resp.status_code == 200 else resp.status_code


# -- transactions ------------------------------------------------------------------------------
def test_transaction_applies_in_order_and_rewrites_urn_references(
    ehr: Server, writer: dict[str, str]
) -> None:
    new_patient = f"urn:uuid:{uuid.uuid4()}"
    new_obs = f"urn:uuid:{uuid.uuid4()}"
    renamed = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Smith-Jones", "given": ["Alice"]}],
        "meta": {"versionId": "77", "lastUpdated": "2001-01-01T00:00:00Z"},  # ignored
    }
    carol = {"resourceType": "Patient", "id": "client-id-ignored", "gender": "female"}
    pulse = _obs(
        None,
        subject={"reference": new_patient},
        text={
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{new_patient}">Carol</a></div>',
        },
    )
    report = {
        "resourceType": "DiagnosticReport",
        "id": "rep-1",
        "status": "final",
        "code": {"text": "Pulse"},
        "subject": {"reference": new_patient},
        "result": [{"reference": new_obs}],
    }
    body = _bundle(
        "transaction",
        {"request": {"method": "GET", "url": "Patient/p1"}},  # processed last: sees the PUT
        _put(renamed),
        _delete("Observation/bp-1"),
        _post(pulse, new_obs),
        _post(carol, new_patient),
        {**_put(report), "fullUrl": f"{ehr.fhir}/DiagnosticReport/rep-1"},
        _delete("Observation/never-existed"),
    )
    resp = _send(ehr, writer, body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    out = resp.json()
    Bundle.model_validate(out)
    assert out["type"] == "transaction-response" and len(out["entry"]) == 7
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == [
        "200 OK",
        "200 OK",
        "204 No Content",
        "201 Created",
        "201 Created",
        "201 Created",
        "204 No Content",
    ]
    got = out["entry"][0]["resource"]
    assert got["name"][0]["family"] == "Smith-Jones" and got["meta"]["versionId"] == "2"
    put_resp = out["entry"][1]["response"]
    assert put_resp["location"] == "Patient/p1/_history/2" and put_resp["etag"] == 'W/"2"'
    assert put_resp["lastModified"].endswith("Z") and "resource" not in out["entry"][1]
    assert out["entry"][2]["response"]["etag"] == 'W/"2"'  # the deletion is version 2
    obs_loc = out["entry"][3]["response"]["location"]
    pat_loc = out["entry"][4]["response"]["location"]
    assert obs_loc.startswith("Observation/") and obs_loc.endswith("/_history/1")
    pat_id = pat_loc.split("/")[1]
    assert pat_id != "client-id-ignored" and pat_loc == f"Patient/{pat_id}/_history/1"

    # Reads, search and history see the writes; every urn:uuid became Type/id.
    obs = ehr.http.get(f"{ehr.fhir}/{obs_loc.rsplit('/_history', 1)[0]}", headers=writer).json()
    assert obs["subject"] == {"reference": f"Patient/{pat_id}"}
    assert f'href="Patient/{pat_id}"' in obs["text"]["div"]
    rep = ehr.http.get(f"{ehr.fhir}/DiagnosticReport/rep-1", headers=writer).json()
    assert rep["subject"]["reference"] == f"Patient/{pat_id}"
    assert rep["result"] == [{"reference": f"Observation/{obs['id']}"}]
    found = ehr.http.get(
        f"{ehr.fhir}/Observation", params={"subject": f"Patient/{pat_id}"}, headers=writer
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [obs["id"]]
    assert _version(ehr, writer, "Observation/bp-1") == 410
    hist = ehr.http.get(f"{ehr.fhir}/Patient/p1/_history", headers=writer).json()
    assert hist["total"] == 2 and hist["entry"][0]["resource"]["meta"]["versionId"] == "2"
    # The authorization server's patient picker learns new patients' names.
    assert ehr.auth.patient_names["p1"] == "Alice Smith-Jones"


def test_transaction_is_all_or_nothing(ehr: Server, writer: dict[str, str]) -> None:
    store = ehr.app.state.store
    before = store.count()
    good = [
        _put({"resourceType": "Patient", "id": "p1", "gender": "other"}),
        _delete("Observation/bp-1"),
        _post(_obs(None)),
    ]
    orphan = _obs(None, subject={"reference": f"urn:uuid:{uuid.uuid4()}"})
    cases: list[tuple[dict[str, Any], int, str]] = [
        (_post({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}), 422, ""),
        (_put(_obs("x1", effectiveDateTime="2024-13-45")), 422, "effectiveDateTime"),
        (_put(_obs("x2", issued=None)), 422, "issued"),
        (_put(_obs("x3", note=[])), 422, "note"),
        (_put({"resourceType": "Spaceship", "id": "s1"}), 404, ""),
        ({"resource": _obs("x4"), "request": {"method": "PUT", "url": "Condition/x4"}}, 400, ""),
        ({"resource": _obs("x5"), "request": {"method": "PUT", "url": "Observation/x6"}}, 400, ""),
        ({"resource": _obs(None), "request": {"method": "PUT", "url": "Observation/x7"}}, 400, ""),
        (_put(_obs("bad_id!")), 400, ""),
        (_delete("Patient/p1"), 400, "request.url"),  # p1 is already PUT by another entry
        (_put(_obs("bp-2"), ifMatch='W/"7"'), 412, "ifMatch"),
        (_post(orphan), 400, "subject.reference"),
        ({"request": {"method": "PATCH", "url": "Patient/p1"}}, 405, ""),
        ({"request": {"method": "GET", "url": "Observation/none"}}, 404, ""),
        (
            {"request": {"method": "POST", "url": "Observation?code=1"}, "resource": _obs(None)},
            400,
            "",
        ),
        ({"resource": _obs(None)}, 400, "request"),
        ({**_post(_obs(None)), "search": {"mode": "match"}}, 400, "search"),
    ]
    for bad, status, where in cases:
        resp = _send(ehr, writer, _bundle("transaction", *good, bad))
        body = _outcome(resp, status)
        issue = body["issue"][0]
        assert issue["severity"] == "error"
        if where:
            assert where in issue["expression"][0], (where, issue)
        assert "Alice" not in json.dumps(body)  # nothing of the stored content echoed
        # Nothing changed: p1 still at version 1, bp-1 still there, no resource created.
        assert _version(ehr, writer, "Patient/p1") == "1", bad
        assert _version(ehr, writer, "Observation/bp-1") == "1", bad
        assert store.count() == before, bad


def test_batch_entries_succeed_or_fail_alone(ehr: Server, writer: dict[str, str]) -> None:
    body = _bundle(
        "batch",
        _put(_obs("bp-2", valueQuantity={"value": 64, "unit": "/min"})),
        _post({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}),
        _delete("Observation/nothing-here"),
        _put({"resourceType": "Spaceship", "id": "s1"}),
        {"request": {"method": "PATCH", "url": "Patient/p1"}},
        _post(_obs(None, subject={"reference": f"urn:uuid:{uuid.uuid4()}"})),
        {"request": {"method": "GET", "url": "Patient/p2"}},
        _post(_obs(None, pid="p2")),
        _put(_obs("bp-1"), ifMatch='W/"2"'),
    )
    resp = _send(ehr, writer, body, headers={"Prefer": "return=representation"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    Bundle.model_validate(out)
    assert out["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == [
        "200 OK",
        "422 Unprocessable Entity",
        "204 No Content",
        "404 Not Found",
        "405 Method Not Allowed",
        "400 Bad Request",
        "200 OK",
        "201 Created",
        "412 Precondition Failed",
    ]
    for entry, status in zip(out["entry"], statuses, strict=True):
        failed = not status.startswith("2")
        assert ("outcome" in entry["response"]) == failed
        if failed:
            assert entry["response"]["outcome"]["issue"][0]["severity"] == "error"
    assert out["entry"][0]["resource"]["valueQuantity"]["value"] == 64  # return=representation
    assert out["entry"][6]["resource"]["id"] == "p2"
    assert _version(ehr, writer, "Observation/bp-2") == "2"
    assert _version(ehr, writer, "Observation/bp-1") == "1"
    new_id = out["entry"][7]["resource"]["id"]
    assert _version(ehr, writer, f"Observation/{new_id}") == "1"


def test_request_errors(ehr: Server, writer: dict[str, str]) -> None:
    bundle = _bundle("transaction", _put(_obs("bp-2")))
    for ctype in ("text/plain", "application/xml", "application/fhir+xml", ""):
        _outcome(_send(ehr, writer, bundle, ctype=ctype), 415, "not-supported")
    _outcome(_send(ehr, writer, bundle, ctype=f"{FHIR_JSON}; fhirVersion=3.0"), 415)
    _outcome(_send(ehr, writer, b'{"resourceType": "Bundle",'), 400, "structure")
    _outcome(_send(ehr, writer, b""), 400, "structure")
    _outcome(
        _send(ehr, writer, b'{"resourceType":"Bundle","type":"batch","type":"transaction"}'),
        400,
        "structure",
    )
    _outcome(_send(ehr, writer, {"resourceType": "Patient", "id": "p1"}), 400, "invalid")
    _outcome(_send(ehr, writer, [bundle]), 400, "invalid")
    for kind in ("collection", "searchset", "transaction-response", None):
        _outcome(_send(ehr, writer, {**bundle, "type": kind}), 400, "invalid")
    _outcome(_send(ehr, writer, {**bundle, "entry": {}}), 400, "structure")
    _outcome(_send(ehr, writer, {**bundle, "colour": "blue"}), 400, "structure")
    _outcome(_send(ehr, writer, bundle, headers={"Accept": "application/xml"}), 406)
    _outcome(_send(ehr, {}, bundle), 401, "login")
    # application/json works too, and so does the base without its trailing slash.
    ok = _send(ehr, writer, bundle, ctype="application/json; charset=utf-8", url=ehr.fhir)
    assert ok.status_code == 200 and ok.json()["entry"][0]["response"]["status"] == "200 OK"
    empty = _send(ehr, writer, {"resourceType": "Bundle", "type": "batch"})
    assert empty.status_code == 200 and empty.json()["entry"] == []


# -- permissions -------------------------------------------------------------------------------
def test_scopes_decide_who_may_write(ehr: Server, key: KeyPair) -> None:
    change = _bundle("transaction", _put(_obs("bp-2")))
    reader = system_auth(ehr, key, "system/*.rs")
    resp = _send(ehr, reader, change)
    _outcome(resp, 403, "forbidden")
    challenge = resp.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and "system/Observation.u" in challenge
    # Letters matter one by one: c creates (also update-as-create), u updates, d deletes.
    creator = system_auth(ehr, key, "system/Observation.c system/Observation.r")
    assert (
        _send(ehr, creator, _bundle("batch", _post(_obs(None))))
        .json()["entry"][0]["response"]["status"]
        .startswith("201")
    )
    assert _send(ehr, creator, change).status_code == 403  # bp-2 exists: needs u
    assert _send(ehr, creator, _bundle("transaction", _put(_obs("fresh")))).status_code == 200
    _outcome(_send(ehr, creator, _bundle("transaction", _delete("Observation/bp-2"))), 403)
    for scope in ("system/*.cud", "system/*.cruds", "system/Observation.u"):
        auth = system_auth(ehr, key, scope)
        assert _send(ehr, auth, change).status_code == 200, scope


def test_patient_token_writes_only_inside_its_compartment(ehr: Server) -> None:
    register_public(
        ehr, scopes=["launch/patient", "openid", "fhirUser", "patient/*.cruds", "patient/*.rs"]
    )
    req = AuthRequest(scope="launch/patient openid fhirUser patient/*.cruds")
    token = standalone_token(ehr, req)
    assert token["patient"] == "p1" and "patient/*.cruds" in token["scope"]
    alice = {"Authorization": f"Bearer {token['access_token']}"}
    mine = _bundle("transaction", _put(_obs("bp-2", valueQuantity={"value": 80, "unit": "/min"})))
    assert _send(ehr, alice, mine).status_code == 200
    # Moving her observation into Bob's compartment, touching Bob's data, creating for Bob: no.
    for entry in (
        _put(_obs("bp-2", pid="p2")),
        _put(_obs("b-a1c", pid="p1")),
        _delete("Observation/b-a1c"),
        _post(_obs(None, pid="p2")),
        _put({"resourceType": "Patient", "id": "p2", "gender": "male"}),
    ):
        body = _outcome(_send(ehr, alice, _bundle("transaction", entry)), 403, "forbidden")
        assert body["issue"][0]["expression"] == ["Bundle.entry[0]"]
    assert ehr.app.state.store.get("Observation", "bp-2")["subject"]["reference"] == "Patient/p1"
    assert ehr.app.state.store.get("Observation", "b-a1c") is not None
    # REST too.
    rest = ehr.http.put(
        f"{ehr.fhir}/Observation/bp-2",
        content=json.dumps(_obs("bp-2", pid="p2")),
        headers={**alice, "Content-Type": FHIR_JSON},
    )
    _outcome(rest, 403, "forbidden")


# -- REST, versions, validation ----------------------------------------------------------------
def test_rest_create_update_delete(ehr: Server, writer: dict[str, str]) -> None:
    headers = {**writer, "Content-Type": FHIR_JSON}
    given = _obs("chosen-by-client", meta={"versionId": "99", "profile": ["http://x/p"]})
    created = ehr.http.post(f"{ehr.fhir}/Observation", content=json.dumps(given), headers=headers)
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith(FHIR_JSON)
    body = created.json()
    oid = body["id"]
    assert oid != "chosen-by-client" and body["meta"]["versionId"] == "1"
    assert body["meta"]["profile"] == ["http://x/p"]  # other meta is kept
    assert created.headers["location"] == f"{ehr.fhir}/Observation/{oid}/_history/1"
    assert created.headers["etag"] == 'W/"1"' and created.headers["last-modified"].endswith("GMT")

    minimal = ehr.http.put(
        f"{ehr.fhir}/Observation/{oid}",
        content=json.dumps({**body, "status": "amended"}),
        headers={**headers, "Prefer": "return=minimal", "If-Match": 'W/"1"'},
    )
    assert minimal.status_code == 200 and minimal.content == b""
    assert minimal.headers["etag"] == 'W/"2"'
    stale = ehr.http.put(
        f"{ehr.fhir}/Observation/{oid}",
        content=json.dumps(body),
        headers={**headers, "If-Match": 'W/"1"'},
    )
    _outcome(stale, 412, "conflict")
    bad_tag = ehr.http.put(
        f"{ehr.fhir}/Observation/{oid}",
        content=json.dumps(body),
        headers={**headers, "If-Match": "2"},
    )
    _outcome(bad_tag, 400, "invalid")
    hist = ehr.http.get(f"{ehr.fhir}/Observation/{oid}/_history", headers=writer).json()
    assert [e["resource"]["status"] for e in hist["entry"]] == ["amended", "final"]

    as_create = ehr.http.put(
        f"{ehr.fhir}/Observation/made-by-put",
        content=json.dumps(_obs("made-by-put")),
        headers=headers,
    )
    assert as_create.status_code == 201 and as_create.json()["meta"]["versionId"] == "1"
    mismatch = ehr.http.put(
        f"{ehr.fhir}/Observation/other", content=json.dumps(_obs("made-by-put")), headers=headers
    )
    _outcome(mismatch, 400, "invalid")
    _outcome(
        ehr.http.put(f"{ehr.fhir}/Spaceship/1", content=b"{}", headers=headers),
        404,
        "not-supported",
    )
    _outcome(
        ehr.http.post(f"{ehr.fhir}/Observation", content=b"<Observation/>", headers=headers),
        400,
        "structure",
    )
    _outcome(
        ehr.http.post(
            f"{ehr.fhir}/Observation", content=json.dumps(_obs(None)), headers=writer
        ),  # no Content-Type
        415,
    )

    stale_delete = ehr.http.delete(
        f"{ehr.fhir}/Observation/{oid}", headers={**writer, "If-Match": 'W/"1"'}
    )
    _outcome(stale_delete, 412, "conflict")
    gone = ehr.http.delete(f"{ehr.fhir}/Observation/{oid}", headers=writer)
    assert gone.status_code == 204 and gone.content == b"" and gone.headers["etag"] == 'W/"3"'
    assert _version(ehr, writer, f"Observation/{oid}") == 410
    assert ehr.http.delete(f"{ehr.fhir}/Observation/{oid}", headers=writer).status_code == 204
    assert ehr.http.delete(f"{ehr.fhir}/Observation/never", headers=writer).status_code == 204
    # Update of a deleted resource brings it back (update-as-create).
    back = ehr.http.put(
        f"{ehr.fhir}/Observation/{oid}", content=json.dumps({**body, "id": oid}), headers=headers
    )
    assert back.status_code == 201 and back.json()["meta"]["versionId"] == "4"
    patch = ehr.http.patch(f"{ehr.fhir}/Observation/{oid}", content=b"[]", headers=headers)
    _outcome(patch, 405, "not-supported")


def test_r4b_validation_answers_422_without_echoing_content(
    ehr: Server, writer: dict[str, str]
) -> None:
    headers = {**writer, "Content-Type": FHIR_JSON}
    no_status = {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}
    resp = ehr.http.post(f"{ehr.fhir}/Observation", content=json.dumps(no_status), headers=headers)
    issue = _outcome(resp, 422, "invalid")["issue"][0]
    assert issue["expression"][0] in ("Observation.status", "Observation.code")
    secret = "Very-Private-Value-123"
    cases = [
        _obs("v1", valueQuantity={"value": secret}),
        {"resourceType": "Patient", "id": "v2", "gender": secret},  # a required binding
        _obs("v3", effectiveDateTime=secret),
        _obs("v4", **{secret: 1}),
        _obs("v5", code={}),
    ]
    for case in cases:
        url = f"{ehr.fhir}/{case['resourceType']}/{case['id']}"
        resp = ehr.http.put(url, content=json.dumps(case), headers=headers)
        body = _outcome(resp, 422)
        assert body["issue"][0]["code"] in ("invalid", "code-invalid")
        assert secret.lower() not in json.dumps(body).lower() or case.get(secret), body
        assert ehr.app.state.store.state(case["resourceType"], case["id"]) == "absent"


def test_capability_statement_lists_writes(ehr: Server) -> None:
    cs = ehr.http.get(f"{ehr.fhir}/metadata").json()
    CapabilityStatement.model_validate(cs)
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    obs = next(r for r in rest["resource"] if r["type"] == "Observation")
    assert {"read", "create", "update", "delete", "search-type"} <= {
        i["code"] for i in obs["interaction"]
    }
    assert obs["updateCreate"] is True and obs["versioning"] == "versioned-update"


def test_payer_stays_read_only(payer: Server) -> None:
    assert payer.http.put(f"{payer.fhir}/Patient/m1", json={}).status_code == 405
    assert payer.http.post(f"{payer.fhir}/", json={}).status_code == 405
    cs = payer.http.get(f"{payer.fhir}/metadata").json()
    assert "interaction" not in cs["rest"][0]

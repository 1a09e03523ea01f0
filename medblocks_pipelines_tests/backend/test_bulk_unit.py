"""Unit tests of the bulk client and token source with httpx.MockTransport: error paths that are
awkward to stage on a live server (Retry-After forms, manifest coercion, redirects across
origins, token caching and renewal, request shaping per vendor profile).
"""

import email.utils
import json
import time
from typing import Any

import httpx
import jwt
import pytest

from medblocks_pipelines.lib.errors import AuthError, ConfigError, ProtocolError, TransientError
from medblocks_pipelines.lib.fhir.bulk import (
    GROUP,
    PROFILES,
    SYSTEM,
    BulkClient,
    ExportRequest,
    KickoffRefused,
    adapt_request,
    clamp_wait,
    coerce_bool,
    parse_manifest,
    parse_retry_after,
)
from medblocks_pipelines.lib.smart.assertion import generate_signing_key
from medblocks_pipelines.lib.smart.backend import BackendAuth

BASE = "https://ehr.example/fhir"
KEY = generate_signing_key("ES384")


# -- Retry-After --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),  # delay-seconds
        ("0", 0.0),
        (None, None),  # absent
        ("", None),
        ("soon", None),  # garbage is ignored, not a crash
        ("-5", None),  # negative is not delay-seconds
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = time.time()
    value = email.utils.formatdate(now + 90, usegmt=True)
    got = parse_retry_after(value, now=now)
    assert got is not None and 88 <= got <= 91
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


@pytest.mark.parametrize(
    ("asked", "fallback", "expected"),
    [
        (18000.0, 1.0, 300.0),  # Cerner's 5 h is clamped to 300 s
        (0.0, 1.0, 1.0),  # never hammer
        (None, 8.0, 8.0),
    ],  # no header: the client's own backoff
)
def test_clamp_wait(asked: float | None, fallback: float, expected: float) -> None:
    assert clamp_wait(asked, fallback) == expected


# -- manifest -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("TRUE", True),
        ("false", False),
        (None, True),
        ("yes", True),
        (1, True),
    ],
)
def test_requires_access_token_coercion(value: Any, expected: bool) -> None:
    assert coerce_bool(value, default=True) is expected


def test_manifest_parsing_and_counts() -> None:
    m = parse_manifest(
        {
            "transactionTime": "2026-01-01T00:00:00Z",
            "requiresAccessToken": "true",
            "output": [
                {"type": "Patient", "url": f"{BASE}/f/1", "count": 2},
                {"type": "Patient", "url": f"{BASE}/f/2", "count": 3},
                {"type": "Observation", "url": f"{BASE}/f/3"},
            ],
            "deleted": [{"type": "Bundle", "url": f"{BASE}/f/4"}],
            "outcome": [{"type": "OperationOutcome", "url": f"{BASE}/f/5"}],  # STU4 name
        }
    )
    assert m.requires_access_token is True
    assert m.expected_counts == {"Patient": 5}  # Observation has no count: not checked
    assert [i.kind for i in m.items] == ["output"] * 3 + ["deleted", "error"]


@pytest.mark.parametrize(
    "body",
    [
        {},  # no transactionTime
        {"transactionTime": "x", "output": {"url": "a"}},  # output not an array
        {"transactionTime": "x", "output": [{"type": "Patient"}]},  # no url
        {"transactionTime": "x", "output": [{"type": "Patient", "url": "/relative"}]},
    ],
)
def test_bad_manifests_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_manifest(body)


# -- request shaping ----------------------------------------------------------------------------
def test_oracle_profile_adapts_request() -> None:
    req = ExportRequest(
        level=SYSTEM,
        group_id="g",
        types=("Observation", "Coverage"),
        type_filters=("Observation?category=laboratory",),
        elements=("id",),
    )
    shaped, warnings = adapt_request(req, PROFILES["oracle"])
    assert shaped.level == GROUP
    assert shaped.types == ("Observation",)
    assert shaped.elements == ()
    assert shaped.method == "GET"
    assert len(warnings) == 3
    with pytest.raises(ConfigError):
        adapt_request(ExportRequest(level=SYSTEM), PROFILES["oracle"])
    with pytest.raises(ConfigError):
        adapt_request(
            ExportRequest(level=GROUP, group_id="g", patients=("p1",)), PROFILES["oracle"]
        )


def test_patient_parameter_forces_post() -> None:
    shaped, _ = adapt_request(
        ExportRequest(level=GROUP, group_id="g", patients=("p1",)), PROFILES["generic"]
    )
    assert shaped.method == "POST"
    with pytest.raises(ConfigError):
        adapt_request(ExportRequest(level=SYSTEM, patients=("p1",)), PROFILES["generic"])


# -- a mock server --------------------------------------------------------------------------------
class Body(httpx.SyncByteStream):
    """A streamed body (``content=`` would arrive already read, unlike a real response)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield self.data


class FakeServer:
    """Token endpoint, kick-off, status and file routes; records requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.tokens = 0
        self.kickoff_status = 202
        self.token_status = 200

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if url.endswith("/.well-known/smart-configuration"):
            return httpx.Response(
                200,
                json={
                    "token_endpoint": "https://ehr.example/auth/token",
                    "capabilities": [],
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                },
            )
        if url == "https://ehr.example/auth/token":
            if self.token_status != 200:
                return httpx.Response(
                    self.token_status,
                    json={"error": "invalid_client", "error_description": "secret"},
                )
            self.tokens += 1
            return httpx.Response(
                200,
                json={
                    "access_token": f"tok{self.tokens}",
                    "token_type": "bearer",
                    "expires_in": 300,
                    "scope": "system/*.rs",
                },
            )
        if "$export" in url:
            if self.kickoff_status != 202:
                return httpx.Response(
                    self.kickoff_status,
                    json={
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "not-supported"}],
                    },
                    headers={"Retry-After": "7"},
                )
            return httpx.Response(202, headers={"Content-Location": "/fhir/status/1"})
        if url.startswith(f"{BASE}/file/redirect"):
            return httpx.Response(307, headers={"Location": "https://bucket.example/obj?sig=1"})
        if url.startswith("https://bucket.example/"):
            if "authorization" in request.headers:
                return httpx.Response(
                    400,
                    text="<Error>two auth mechanisms</Error>",
                    headers={"Content-Type": "application/xml"},
                )
            return httpx.Response(200, stream=Body(b'{"resourceType":"Patient","id":"1"}\n'))
        if url.startswith(f"{BASE}/file/expiring"):
            if request.headers.get("authorization") == "Bearer tok1":
                return httpx.Response(401)
            return httpx.Response(200, stream=Body(b'{"resourceType":"Patient","id":"2"}\n'))
        if url.startswith(f"{BASE}/file/html"):
            return httpx.Response(
                200, stream=Body(b"<html>maintenance</html>"), headers={"Content-Type": "text/html"}
            )
        return httpx.Response(404)


def _client(server: FakeServer, **kw: Any) -> BulkClient:
    http = httpx.Client(transport=httpx.MockTransport(server.handler))
    auth = BackendAuth(client_id="app", scope="system/*.rs", key=KEY, http=http, fhir_base_url=BASE)
    return BulkClient(BASE, http=http, auth=auth, sleep=lambda s: None, **kw)


def test_kickoff_get_joins_type_once_and_resolves_location() -> None:
    server = FakeServer()
    client = _client(server)
    url = client.kickoff(
        ExportRequest(
            level=GROUP,
            group_id="g1",
            since="2026-01-01T00:00:00Z",
            types=("Patient", "Observation"),
            type_filters=("Observation?status=final",),
        )
    )
    assert url == "https://ehr.example/fhir/status/1"
    kick = next(r for r in server.requests if "$export" in str(r.url))
    assert kick.url.params.get_list("_type") == ["Patient,Observation"]
    assert kick.headers["prefer"] == "respond-async"
    assert kick.headers["accept"] == "application/fhir+json"
    assert kick.headers["authorization"] == "Bearer tok1"
    # the assertion went to the discovered token endpoint with the right audience
    tok = next(r for r in server.requests if str(r.url).endswith("/auth/token"))
    form = dict(x.split("=", 1) for x in tok.content.decode().split("&"))
    claims = jwt.decode(
        form["client_assertion"].replace("%2F", "/"), options={"verify_signature": False}
    )
    assert claims["aud"] == "https://ehr.example/auth/token"


def test_kickoff_post_sends_parameters_with_patients() -> None:
    server = FakeServer()
    client = _client(server)
    client.kickoff(ExportRequest(level=GROUP, group_id="g1", patients=("p1", "p2"), method="POST"))
    kick = next(r for r in server.requests if "$export" in str(r.url))
    body = json.loads(kick.content)
    assert kick.method == "POST" and body["resourceType"] == "Parameters"
    refs = [p["valueReference"]["reference"] for p in body["parameter"] if p["name"] == "patient"]
    assert refs == ["Patient/p1", "Patient/p2"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, KickoffRefused),
        (422, KickoffRefused),
        (429, TransientError),
        (503, TransientError),
        (403, AuthError),
    ],
)
def test_kickoff_errors(status: int, error: type[Exception]) -> None:
    server = FakeServer()
    server.kickoff_status = status
    with pytest.raises(error) as info:
        _client(server).kickoff(ExportRequest())
    if status == 429:
        assert info.value.retry_after == 7.0  # type: ignore[attr-defined]
    assert "secret" not in str(info.value)


def test_refused_token_message_has_no_description() -> None:
    server = FakeServer()
    server.token_status = 401
    with pytest.raises(AuthError) as info:
        _client(server).kickoff(ExportRequest())
    assert "invalid_client" in str(info.value) and "secret" not in str(info.value)


def test_cross_origin_redirect_drops_authorization(tmp_path: Any) -> None:
    server = FakeServer()
    got = _client(server).download(
        f"{BASE}/file/redirect", tmp_path / "a.ndjson", requires_token=True
    )
    assert got.path.read_bytes().startswith(b'{"resourceType":"Patient"')
    first, second = [
        r for r in server.requests if "file/redirect" in str(r.url) or "bucket" in str(r.url)
    ]
    assert "authorization" in first.headers and "authorization" not in second.headers


def test_no_token_when_not_required(tmp_path: Any) -> None:
    server = FakeServer()
    _client(server).download(f"{BASE}/file/expiring", tmp_path / "b.ndjson", requires_token=False)
    assert all("authorization" not in r.headers for r in server.requests)


def test_401_on_file_renews_token(tmp_path: Any) -> None:
    server = FakeServer()
    client = _client(server)
    got = client.download(f"{BASE}/file/expiring", tmp_path / "c.ndjson", requires_token=True)
    assert got.attempts == 2 and server.tokens == 2
    assert got.path.read_bytes() == b'{"resourceType":"Patient","id":"2"}\n'


def test_html_maintenance_page_is_never_landed(tmp_path: Any) -> None:
    server = FakeServer()
    client = _client(server, max_attempts=2)
    with pytest.raises(TransientError):
        client.download(f"{BASE}/file/html", tmp_path / "d.ndjson", requires_token=True)
    assert not (tmp_path / "d.ndjson").exists()


def test_token_sent_to_storage_origin_is_a_hard_error(tmp_path: Any) -> None:
    server = FakeServer()
    client = _client(server)
    # if the token ever crossed origins, S3 answers 400: a definite refusal, not retried
    client.token_origins.add(("https", "bucket.example", 443))
    with pytest.raises(ProtocolError):
        client.download(f"{BASE}/file/redirect", tmp_path / "e.ndjson", requires_token=True)


def test_token_is_cached_until_near_expiry() -> None:
    server = FakeServer()
    now = [1000.0]
    http = httpx.Client(transport=httpx.MockTransport(server.handler))
    auth = BackendAuth(
        client_id="app",
        scope="system/*.rs",
        key=KEY,
        http=http,
        token_endpoint="https://ehr.example/auth/token",
        clock=lambda: now[0],
    )
    assert auth.token() == "tok1"
    now[0] += 200
    assert auth.token() == "tok1"  # still fresh
    now[0] += 80  # 280 s: inside the 30 s renewal margin of a 300 s token
    assert auth.token() == "tok2"
    auth.invalidate("tok1")  # a stale 401 does not drop the newer token
    assert auth.token() == "tok2"
    auth.invalidate()
    assert auth.token() == "tok3"
    assert "tok" not in repr(auth)


@pytest.mark.parametrize(
    ("status", "body", "headers", "state"),
    [
        (202, None, {"Retry-After": "5", "X-Progress": "50%"}, "in_progress"),
        (429, None, {"Retry-After": "9"}, "in_progress"),  # polled too fast
        (
            500,
            {"resourceType": "OperationOutcome", "issue": [{"code": "transient"}]},
            {},
            "in_progress",
        ),  # the status check failed, not the job
        (500, {"resourceType": "OperationOutcome", "issue": [{"code": "exception"}]}, {}, "failed"),
        # the server no longer knows the export (expired or deleted): abandon it, kick off anew
        (
            404,
            {"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}]},
            {},
            "expired",
        ),
        (410, {}, {}, "expired"),
        (400, {"resourceType": "OperationOutcome", "issue": [{"code": "invalid"}]}, {}, "failed"),
        (200, {"transactionTime": "t", "output": []}, {}, "complete"),
    ],
)
def test_status_classification(status: int, body: Any, headers: dict[str, str], state: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("token"):
            return httpx.Response(200, json={"access_token": "t", "token_type": "bearer"})
        return httpx.Response(status, json=body, headers=headers)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    auth = BackendAuth(
        client_id="a", scope="s", key=KEY, http=http, token_endpoint="https://ehr.example/token"
    )
    st = BulkClient(BASE, http=http, auth=auth).status(f"{BASE}/status/1")
    assert st.state == state
    if "Retry-After" in headers:
        assert st.retry_after == float(headers["Retry-After"])

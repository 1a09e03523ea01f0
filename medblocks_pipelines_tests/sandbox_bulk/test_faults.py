"""Fault injection (faults.py) over live servers: each fault kind, per-client rules, the admin
API and the Python API. The bulk app is the main subject; a tiny app stands in for the EHR's
token endpoint and search paging."""

import email.utils
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from medblocks_sandbox.faults import (
    FaultInjector,
    FaultMiddleware,
    FaultRule,
    fault_admin_routes,
    jwt_client_resolver,
    retry_after_value,
    rule_from_dict,
)

from .conftest import KICKOFF_HEADERS, BulkEnv, serve

STATUS = r"/bulk-status/"
FILES = r"/bulk-files/"


def _poll(env: BulkEnv, location: str, client_id: str = "client-a") -> httpx.Response:
    return httpx.get(location, headers={"Accept": "application/json", **env.auth(client_id)})


def test_latency(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    env.faults.add("latency", path=STATUS, seconds=0.4)
    started = time.monotonic()
    _poll(env, location)
    assert time.monotonic() - started >= 0.4
    env.faults.clear()
    started = time.monotonic()
    _poll(env, location)
    assert time.monotonic() - started < 0.4


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_rate_limit_per_client(env: BulkEnv, form: str) -> None:
    location = env.kickoff().headers["content-location"]
    env.kickoff(client_id="client-b")
    env.faults.add("rate_limit", path=STATUS, limit=2, window=30, retry_after_form=form)
    assert _poll(env, location).status_code in (200, 202)
    assert _poll(env, location).status_code in (200, 202)
    limited = _poll(env, location)
    assert limited.status_code == 429
    assert limited.json()["issue"][0]["code"] == "throttled"
    value = limited.headers["retry-after"]
    if form == "seconds":
        assert value.isdigit() and 1 <= int(value) <= 30
    else:
        when = email.utils.parsedate_to_datetime(value)
        assert when.tzinfo is not None and when > datetime.now(UTC)
        assert value.endswith("GMT")
    # Another client has its own window.
    other = env.server.jobs()[1]
    other_url = location.rsplit("/", 1)[0] + "/" + other.id
    assert _poll(env, other_url, "client-b").status_code in (200, 202)


def test_rate_limit_window_passes(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    env.faults.add("rate_limit", path=STATUS, limit=1, window=1.0)
    assert _poll(env, location).status_code != 429
    assert _poll(env, location).status_code == 429
    time.sleep(1.05)
    assert _poll(env, location).status_code != 429


def test_rule_for_one_client_leaves_others_alone(env: BulkEnv) -> None:
    env.faults.add("error_burst", client_id="client-b", count=5, status=500)
    assert env.kickoff().status_code == 202
    assert env.kickoff(client_id="client-b").status_code == 500


def test_error_burst_then_recovery(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    env.faults.add("error_burst", path=STATUS, count=3, status=503)
    codes = [_poll(env, location) for _ in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 503]
    # A 503 status answer is a transient issue: the job itself did not fail (SPECS 3.2).
    assert {r.json()["issue"][0]["code"] for r in codes} == {"transient"}
    assert env.wait(location).status_code == 200
    assert not env.faults.rules()


def test_html_error_page_with_status_200(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    env.faults.add("html_200", path=STATUS)
    response = _poll(env, location)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert env.wait(location).status_code == 200


def test_connection_dropped_mid_body_then_resume_with_range(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Observation"})
    url = manifest["output"][0]["url"]
    headers = {"Accept-Encoding": "identity", **env.auth()}
    whole = httpx.get(url, headers=headers).content
    env.faults.add("drop_connection", path=FILES, after_bytes=100)
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert received == whole[:100]
    rest = httpx.get(url, headers={**headers, "Range": f"bytes={len(received)}-"})
    assert rest.status_code == 206
    assert received + rest.content == whole


@pytest.mark.parametrize("kind", ["ndjson_truncate", "ndjson_malformed"])
def test_damaged_ndjson_lines(env: BulkEnv, kind: str) -> None:
    env.faults.add(kind, line=3)
    manifest = env.export(params={"_type": "Observation"})
    text = httpx.get(manifest["output"][0]["url"], headers=env.auth()).text
    lines = text.splitlines()
    assert len(lines) == 6
    bad = []
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
    assert bad == [3]
    # The fault is used up: the next export is clean.
    clean = env.export(params={"_type": "Observation"})
    assert all(
        json.loads(x)
        for x in httpx.get(clean["output"][0]["url"], headers=env.auth()).text.splitlines()
    )


def test_count_mismatch(env: BulkEnv) -> None:
    env.faults.add("count_mismatch", delta=2)
    manifest = env.export(params={"_type": "Observation"})
    item = manifest["output"][0]
    assert item["count"] == 8
    assert len(env.lines(item["url"])) == 6


def test_export_fails_midway(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(export_seconds=2.0)
    env.faults.add("export_fail", at_fraction=0.5, status=500)
    location = env.kickoff().headers["content-location"]
    assert _poll(env, location).status_code == 202
    time.sleep(1.05)
    failed = _poll(env, location)
    assert failed.status_code == 500
    outcome = failed.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] != "transient"  # the job failed, not the status call
    assert _poll(env, location).status_code == 500  # it stays failed


def test_huge_page_makes_one_file_per_type(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(max_lines_per_file=2)
    env.faults.add("huge_page")
    manifest = env.export(params={"_type": "Observation"})
    assert [o["count"] for o in manifest["output"]] == [6]


def test_expired_token_mid_run(env: BulkEnv) -> None:
    token = env.token()
    headers = {**KICKOFF_HEADERS, "Authorization": f"Bearer {token}"}
    location = httpx.get(env.base + "/$export", headers=headers).headers["content-location"]
    env.faults.add("expire_token", after_requests=2)
    assert httpx.get(location, headers=headers).status_code in (200, 202)
    assert httpx.get(location, headers=headers).status_code in (200, 202)
    expired = httpx.get(location, headers=headers)
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]
    env.faults.clear()
    # The hook expired it in the token store too: it stays dead without the fault.
    assert httpx.get(location, headers=headers).status_code == 401
    assert env.wait(location).status_code == 200  # a new token carries on


def test_admin_api(env: BulkEnv) -> None:
    admin = env.base + "/_sandbox/faults"
    created = httpx.post(
        admin,
        json=[
            {"kind": "error_burst", "count": 2, "status": 502, "path": "/\\$export"},
            {"kind": "latency", "seconds": 0.01, "client_id": "client-z"},
        ],
    )
    assert created.status_code == 201
    ids = created.json()["ids"]
    listed = httpx.get(admin).json()["rules"]
    assert [r["kind"] for r in listed] == ["error_burst", "latency"]
    assert listed[0]["params"] == {"status": 502}
    assert env.kickoff().status_code == 502
    assert httpx.delete(f"{admin}/{ids[0]}").status_code == 204
    assert httpx.delete(f"{admin}/{ids[0]}").status_code == 404
    assert env.kickoff().status_code == 202
    assert httpx.delete(admin).status_code == 204
    assert httpx.get(admin).json()["rules"] == []
    # Faults never apply to the admin API itself.
    env.faults.add("error_burst", count=10)
    assert httpx.get(admin).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "meteor_strike"},  # unknown kind
        {"kind": "latency", "seconds": 1, "bogus": 2},  # unknown parameter
        {"kind": "error_burst", "count": 0},  # count must be positive
        {"kind": "rate_limit", "retry_after_form": "minutes"},
        {"seconds": 1},  # no kind
        "not json",
    ],
)
def test_admin_api_rejects_bad_rules(env: BulkEnv, body: object) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(env.base + "/_sandbox/faults", content=content)
    assert response.status_code == 400
    assert env.faults.rules() == []


def test_admin_token() -> None:
    faults = FaultInjector()
    app = Starlette(routes=fault_admin_routes(faults, admin_token="s3cret"))
    with serve(app) as base:
        assert httpx.get(base + "/_sandbox/faults").status_code == 403
        ok = httpx.post(
            base + "/_sandbox/faults",
            json={"kind": "latency"},
            headers={"X-Sandbox-Admin": "s3cret"},
        )
        assert ok.status_code == 201


# -- the EHR-side faults, on a stand-in app ------------------------------------------------------
def _ehr_like_app(faults: FaultInjector) -> Starlette:
    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        return JSONResponse({"grant_type": form.get("grant_type"), "echo": form.get("x")})

    async def search(request: Request) -> JSONResponse:
        return JSONResponse(
            {"count": request.query_params.get("_count"), "code": request.query_params.get("code")}
        )

    return Starlette(
        routes=[Route("/auth/token", token, methods=["POST"]), Route("/Observation", search)],
        middleware=[Middleware(FaultMiddleware, faults=faults)],
    )


def test_revoked_refresh_token() -> None:
    faults = FaultInjector()
    revoked: list[str] = []
    faults.on_refresh_revoked = revoked.append
    faults.add("revoke_refresh", client_id="app-1")
    with serve(_ehr_like_app(faults)) as base:
        refused = httpx.post(
            base + "/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": "app-1"},
        )
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_grant"
        assert refused.headers["cache-control"] == "no-store"
        assert revoked == ["rt-1"]
        # Another client, and other grants, reach the real endpoint with the body intact.
        other = httpx.post(
            base + "/auth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": "rt-2",
                "client_id": "app-2",
                "x": "y" * 5000,
            },
        )
        assert other.json() == {"grant_type": "refresh_token", "echo": "y" * 5000}
        cc = httpx.post(
            base + "/auth/token", data={"grant_type": "client_credentials", "client_id": "app-1"}
        )
        assert cc.json()["grant_type"] == "client_credentials"


def test_huge_page_rewrites_count() -> None:
    faults = FaultInjector()
    faults.add("huge_page", page_size=5000)
    with serve(_ehr_like_app(faults)) as base:
        got = httpx.get(base + "/Observation", params={"_count": "10", "code": "a|b"}).json()
    assert got == {"count": "5000", "code": "a|b"}
    assert faults.page_size(client_id=None) == 5000


def test_jwt_client_resolver() -> None:
    import jwt as pyjwt

    token = pyjwt.encode({"client_id": "abc", "sub": "user"}, "k" * 32, algorithm="HS256")
    assert jwt_client_resolver(token) == "abc"
    assert jwt_client_resolver("opaque-token") is None


def test_rule_parsing_and_counts() -> None:
    rule = rule_from_dict(
        {"kind": "error_burst", "count": 2, "status": 500, "methods": ["get"], "path": "^/x"}
    )
    assert rule.methods == ("GET",) and rule.params == {"status": 500}
    faults = FaultInjector()
    faults.add_rule(rule)
    assert faults.take("error_burst", client_id=None, path="/y", method="GET") is None
    assert faults.take("error_burst", client_id=None, path="/x", method="POST") is None
    assert faults.take("error_burst", client_id=None, path="/x", method="GET") == {"status": 500}
    assert faults.take("error_burst", client_id=None, path="/x", method="GET") is not None
    assert faults.take("error_burst", client_id=None, path="/x", method="GET") is None
    with pytest.raises(ValueError):
        FaultRule(kind="latency", path="(")  # bad regex


def test_retry_after_forms() -> None:
    assert retry_after_value(0.2, "seconds") == "1"
    assert retry_after_value(4.5, "seconds") == "5"
    parsed = email.utils.parsedate_to_datetime(retry_after_value(10, "http-date"))
    assert 5 < (parsed - datetime.now(UTC)).total_seconds() < 20


def test_connect_auth_server_uses_the_as_seams() -> None:
    calls: list[tuple[str, str]] = []

    class FakeAS:
        def client_of(self, token: str) -> str | None:
            return {"t1": "app-1"}.get(token)

        def validate_access_token(self, token: str) -> None:
            return None

        def expire_access_token(self, token: str) -> None:
            calls.append(("expire", token))

        def revoke_refresh_token(self, token: str) -> None:
            calls.append(("revoke", token))

    from medblocks_sandbox.faults import connect_auth_server

    faults = FaultInjector()
    resolve = connect_auth_server(faults, FakeAS())
    assert resolve("t1") == "app-1"
    assert resolve("unknown") is None
    faults.add("expire_token", after_requests=1)
    assert not faults.token_expired(token="t1", client_id="app-1", path="/", method="GET")
    assert faults.token_expired(token="t1", client_id="app-1", path="/", method="GET")
    assert faults.token_expired(token="t1", client_id="app-1", path="/", method="GET")
    assert calls == [("expire", "t1")]  # the AS is told once
    assert faults.on_refresh_revoked is not None
    faults.on_refresh_revoked("rt")
    assert calls[-1] == ("revoke", "rt")


def test_client_honouring_http_date_retry_after_gets_through(env: BulkEnv) -> None:
    env.faults.add(
        "rate_limit", path=r"/\$export", limit=1, window=1.5, retry_after_form="http-date"
    )
    assert env.kickoff().status_code == 202
    limited = env.kickoff()
    assert limited.status_code == 429
    when = email.utils.parsedate_to_datetime(limited.headers["retry-after"])
    time.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()))
    assert env.kickoff().status_code == 202


def test_drop_connection_on_gzip_download(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Observation"})
    url = manifest["output"][0]["url"]
    env.faults.add("drop_connection", path=FILES, after_bytes=40)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", url, headers={"Accept-Encoding": "gzip", **env.auth()}) as response,
    ):
        assert response.headers["content-encoding"] == "gzip"
        b"".join(response.iter_raw())
    # The next request is whole.
    assert len(httpx.get(url, headers=env.auth()).text.splitlines()) == 6


def test_faults_only_where_their_path_matches(env: BulkEnv) -> None:
    env.faults.add("error_burst", path=FILES, count=1)
    location = env.kickoff().headers["content-location"]
    manifest = env.wait(location).json()  # kick-off and status untouched
    assert httpx.get(manifest["output"][0]["url"], headers=env.auth()).status_code == 503
    assert httpx.get(manifest["output"][0]["url"], headers=env.auth()).status_code == 200


def test_expire_token_after_seconds() -> None:
    faults = FaultInjector()
    expired: list[str] = []
    faults.on_token_expired = expired.append
    faults.add("expire_token", after_seconds=0.2)
    where = {"client_id": None, "path": "/x", "method": "GET"}
    assert not any(faults.token_expired(token="t", **where) for _ in range(5))
    time.sleep(0.25)
    assert faults.token_expired(token="t", **where)
    assert faults.token_expired(token="t", **where)
    assert not faults.token_expired(token="fresh", **where)  # its own clock
    assert expired == ["t"]

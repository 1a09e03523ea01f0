"""CDS Hooks served by several worker processes (``medblocks serve --workers 2``), the jti stores
(Redis and the control-plane table) and the batched audit writer.

The replay test finds, for each keep-alive connection, which worker process accepted it (the socket
inode in ``/proc/net/tcp`` and the worker's ``/proc/<pid>/fd``), then sends one JWT to one worker and
the same JWT to the other: the second must be refused whichever store is shared.
"""

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.cds.audit_writer import AuditWriter
from medblocks_pipelines.lib.cds.jti_store import RedisJtiStore, SqlJtiStore
from medblocks_pipelines.lib.cds.security import CdsAuthenticator
from medblocks_pipelines.lib.cds.tables import cds_jti
from medblocks_pipelines.lib.errors import CdsRequestError
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry.schema import audit_log
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.assertion import SigningKey, generate_signing_key

REDIS_URL = "redis://127.0.0.1:6379/0"
ISS = "https://workers-ehr.example"


def _redis() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError:
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI (.ci/run starts it) but not reachable")
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    return client


def _register(cp: ControlPlane, key: SigningKey) -> None:
    cp.add_tenant("acme", "Acme")
    cp.add_source(
        "ehr-a", "EHR A", "sandbox", "ehr", "http://a.example/fhir", ["clinician_workflow"]
    )
    cp.add_organization(
        "mercy",
        "acme",
        "ehr-a",
        "Mercy",
        config={"cds": {"iss": ISS, "jwks": {"keys": [key.public_jwk()]}}},
    )


def _token(key: SigningKey, aud: str, jti: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": aud, "iat": now, "exp": now + 300, "jti": jti or str(uuid.uuid4())}
    return jwt.encode(
        claims, key.private_pem, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
    )


# -- the stores -------------------------------------------------------------------------------------
def test_sql_jti_store_remembers_once_and_purges(settings: Settings) -> None:
    cp = open_control_plane(settings)
    store = SqlJtiStore(cp.engine)
    assert store.remember("https://i.example", "j1", time.time() + 60) is True
    assert store.remember("https://i.example", "j1", time.time() + 60) is False
    assert store.remember("https://other.example", "j1", time.time() + 60) is True  # per issuer
    assert store.remember("https://i.example", "old", time.time() - 5) is True
    assert store.purge_expired() == 1
    with cp.engine.connect() as conn:
        left = sorted(r.jti for r in conn.execute(sa.select(cds_jti.c.jti)))
    assert left == ["j1", "j1"]
    cp.engine.dispose()


def test_redis_jti_store_remembers_once_until_the_token_expires() -> None:
    client = _redis()
    store = RedisJtiStore(client, prefix=f"test:jti:{secrets.token_hex(4)}:")
    assert store.remember("https://i.example", "j1", time.time() + 60) is True
    assert store.remember("https://i.example", "j1", time.time() + 60) is False
    assert store.remember("https://other.example", "j1", time.time() + 60) is True
    ttl = client.ttl(store.key("https://i.example", "j1"))
    assert 0 < ttl <= 61  # forgotten when the token could not verify any more
    client.delete(store.key("https://i.example", "j1"), store.key("https://other.example", "j1"))


def test_replay_refused_across_authenticators_with_redis(settings: Settings) -> None:
    client = _redis()
    cp = open_control_plane(settings)
    key = generate_signing_key("ES384", kid="w1")
    _register(cp, key)
    url = "http://us.example/cds-services"
    prefix = f"test:jti:{secrets.token_hex(4)}:"
    first = CdsAuthenticator(cp, jti_store=RedisJtiStore(client, prefix=prefix))
    second = CdsAuthenticator(cp, jti_store=RedisJtiStore(client, prefix=prefix))
    token = _token(key, url)
    assert first.verify(f"Bearer {token}", url=url).tenant_id == "acme"
    with pytest.raises(CdsRequestError) as err:
        second.verify(f"Bearer {token}", url=url)
    assert err.value.reason == "replayed_jti"
    with cp.engine.connect() as conn:  # Redis decided: the table was not used
        assert conn.execute(sa.select(sa.func.count()).select_from(cds_jti)).scalar_one() == 0
    cp.engine.dispose()


# -- the audit writer -------------------------------------------------------------------------------
def test_audit_writer_keeps_every_row_until_close(settings: Settings) -> None:
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    writer = AuditWriter(cp.engine, interval=3600, max_batch=7)  # no periodic flush in this test
    for i in range(25):
        writer.submit(
            tenant_id="acme", actor="cds:mercy", action="cds.patient-view", person_id=f"P{i}"
        )

    def count() -> int:
        with cp.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one())

    assert count() == 0  # queued, off the request path
    writer.close()
    assert count() == 25 and writer.written == 25
    with cp.engine.connect() as conn:
        people = {r.person_id for r in conn.execute(sa.select(audit_log.c.person_id))}
    assert people == {f"P{i}" for i in range(25)}
    with pytest.raises(RuntimeError):
        writer.submit(tenant_id="acme", actor="x", action="cds.patient-view")
    cp.engine.dispose()


# -- real worker processes --------------------------------------------------------------------------
@dataclass
class Served:
    base: str
    port: int
    proc: subprocess.Popen[bytes]
    key: SigningKey
    cp: ControlPlane

    def workers(self) -> list[int]:
        pids: list[int] = []
        frontier = [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            try:
                kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            pids.extend(map(int, kids))
            frontier.extend(map(int, kids))
        return pids


@contextlib.contextmanager
def _serve(settings: Settings, store: str, workers: int = 2, **env_extra: str) -> Iterator[Served]:
    import socket

    cp = open_control_plane(settings)
    key = generate_signing_key("ES384", kid="w1")
    _register(cp, key)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(os.environ)
    env.pop("MEDBLOCKS_REDIS_URL", None)
    env.update(env_extra)
    if store == "redis":
        _redis()
        env["MEDBLOCKS_REDIS_URL"] = REDIS_URL
    cmd = [sys.executable, "-m", "medblocks_pipelines.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL)
    served = Served(f"http://127.0.0.1:{port}", port, proc, key, cp)
    try:
        for _ in range(900):  # worker processes import the app first: up to a few minutes
            assert proc.poll() is None, "the server exited"
            if len(served.workers()) >= workers and _healthy(port):
                break
            time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        cp.engine.dispose()


def _healthy(port: int) -> bool:
    try:
        conn = HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _owner(served: Served, conn: HTTPConnection) -> int | None:
    """The worker process holding the server side of ``conn``."""
    client_port = conn.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote = parts[1], parts[2]
        if (
            int(local.split(":")[1], 16) == served.port
            and int(remote.split(":")[1], 16) == client_port
        ):
            inode = parts[9]
    for pid in served.workers():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def _connections_to_two_workers(served: Served) -> tuple[HTTPConnection, HTTPConnection]:
    by_worker: dict[int, HTTPConnection] = {}
    spare: list[HTTPConnection] = []
    for _ in range(200):
        conn = HTTPConnection("127.0.0.1", served.port, timeout=30)
        conn.request("GET", "/healthz")  # answered: a worker has accepted this connection
        resp = conn.getresponse()
        resp.read()
        owner = _owner(served, conn)
        if owner is not None and owner not in by_worker:
            by_worker[owner] = conn
            if len(by_worker) == 2:
                break
        else:
            spare.append(conn)
    for conn in spare:
        conn.close()
    assert len(by_worker) == 2, "the connections never reached two different workers"
    first, second = by_worker.values()
    return first, second


def _discovery(conn: HTTPConnection, token: str) -> tuple[int, str]:
    conn.request("GET", "/cds-services", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


@pytest.mark.parametrize("store", ["redis", "sql"])
def test_same_jti_to_two_workers_is_refused_once(settings: Settings, store: str) -> None:
    with _serve(settings, store) as served:
        a, b = _connections_to_two_workers(served)
        token = _token(served.key, f"{served.base}/cds-services")
        status_a, _ = _discovery(a, token)
        status_b, body_b = _discovery(b, token)
        assert status_a == 200
        assert status_b == 401 and "replayed_jti" in body_b
        # A fresh token is fine on the second worker: it refused the replay, not the caller.
        assert _discovery(b, _token(served.key, f"{served.base}/cds-services"))[0] == 200
        a.close()
        b.close()


def test_every_call_is_audited_after_a_clean_shutdown(settings: Settings) -> None:
    calls = 12
    # No periodic flush: only the shutdown of each worker can write the rows.
    with _serve(settings, "sql", MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS="3600") as served:
        url = f"{served.base}/cds-services/medblocks-patient-view"
        for _ in range(calls):
            body = (
                '{"hook": "patient-view", "hookInstance": "%s", "context": {"userId": '
                '"Practitioner/dr1", "patientId": "a1"}, "prefetch": {"patient": null}}'
                % uuid.uuid4()
            )
            conn = HTTPConnection("127.0.0.1", served.port, timeout=60)
            conn.request(
                "POST",
                "/cds-services/medblocks-patient-view",
                body=body,
                headers={
                    "Authorization": f"Bearer {_token(served.key, url)}",
                    "Content-Type": "application/json",
                },
            )
            assert conn.getresponse().status == 200
            conn.close()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0
        with served.cp.engine.connect() as conn_db:
            rows = conn_db.execute(
                sa.select(sa.func.count())
                .select_from(audit_log)
                .where(audit_log.c.action == "cds.patient-view", audit_log.c.decision == "allowed")
            ).scalar_one()
        assert rows == calls


def test_warm_loads_every_cds_tenant_index_before_any_call(cds_env: Any) -> None:
    from medblocks_pipelines.lib.cds.service import CdsService
    from medblocks_pipelines.lib.warehouse.build import warehouse_path

    service = CdsService(
        cds_env.cp,
        public_base_url="http://us.example",
        warehouse_path_of=lambda tenant: warehouse_path(cds_env.settings, tenant),
    )
    try:
        assert service.warm() == ["acme"]
        index = service.indexes.for_tenant("acme")
        assert index.loads == 1 and index.current() is not None
    finally:
        service.close()


def test_an_unreachable_jti_store_fails_closed(settings: Settings) -> None:
    import redis

    cp = open_control_plane(settings)
    key = generate_signing_key("ES384", kid="w1")
    _register(cp, key)
    with socket_closed_port() as port:
        down = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1.0)
        auth = CdsAuthenticator(cp, jti_store=RedisJtiStore(down))
        url = "http://us.example/cds-services"
        with pytest.raises(CdsRequestError) as err:
            auth.verify(f"Bearer {_token(key, url)}", url=url)
    assert err.value.status == 503 and err.value.reason == "jti_unavailable"
    cp.engine.dispose()


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listened: connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])

"""One refresher per grant across real OS processes, on SQLite and on PostgreSQL.

Several processes hold the same stale access token and refresh at once. The vault's row lock lets
exactly one of them call the sandbox's token endpoint; the others wait, find the fresh token and
use it. Had two of them sent the same refresh token, the sandbox (like real servers) would have
revoked the whole grant.
"""

import dataclasses
import multiprocessing as mp
import os

import pytest

from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.smart.tokens import TokenManager, tokens_secret_name
from medblocks_pipelines_tests.patient_access._refresh_child import refresh_in_child
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv

PROCESSES = 3


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_one_refresher_across_processes(
    pa_env: PatientAccessEnv, backend: str, request: pytest.FixtureRequest
) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "active"
    settings = pa_env.settings
    if backend == "postgres":
        # Move the connection (and its tokens) into a PostgreSQL control plane.
        url = request.getfixturevalue("pg_database_url")
        settings = dataclasses.replace(settings, database_url=url)
        pg = open_control_plane(settings)
        source = pa_env.cp.get_source(sid)
        pg.add_tenant("acme", "Acme")
        pg.add_source(
            sid,
            source.name,
            source.vendor,
            source.kind,
            source.fhir_base_url,
            source.patterns,
            config=source.config,
        )
        pg.create_connection(tenant_id="acme", pattern="patient_access", source_id=sid, id=conn_id)
        pg.transition(conn_id, "active")
        pg.vault.put(
            tokens_secret_name(conn_id), pa_env.cp.vault.get(tokens_secret_name(conn_id)).reveal()
        )
    cp = open_control_plane(settings, check_schema=False)
    stale = TokenManager(cp, conn_id, http=pa_env.http).access_token()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    env_key = os.environ["MEDBLOCKS_SECRET_KEY"]
    assert env_key  # children inherit the vault key through the environment
    procs = [
        ctx.Process(target=refresh_in_child, args=(settings, conn_id, stale, barrier, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    tokens = {t for t, _n in results}
    assert len(tokens) == 1 and stale not in tokens
    assert sum(n for _t, n in results) == 1
    grants = [g for g in pa_env.auth(org).grants() if g["client_id"] == pa_env.clients[sid]]
    assert grants[0]["revoked"] is False
    # The new token works at the source.
    patient = pa_env.cp.get_connection(conn_id).source_patient_id
    resp = pa_env.http.get(
        f"{org.fhir_base}/Patient/{patient}",
        headers={"Authorization": f"Bearer {tokens.pop()}", "Accept": "application/fhir+json"},
    )
    assert resp.status_code == 200
    cp.engine.dispose()

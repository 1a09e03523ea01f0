"""Pulls and token keeping over real sockets against the sandbox EHR and payer.

Covers landing with provenance, reference following and Binary content, incremental pulls,
refresh with rotation (never reusing a refresh token, one refresher across "processes"), refused
refreshes (refresh_failed), token expiry mid-pull, 429 storms and other transient faults, sources
that support only some types, OperationOutcome entries, paging loops, malformed resources, a batch
where one connection fails, the source rate limit, and revocation with data deletion.
"""

import threading
from collections import Counter
from typing import Any

import duckdb
import pytest

from medblocks_pipelines.lib.fhir.pull import (
    plan_queries,
    revoke_connection,
    search_watermark_key,
    watermark_key,
)
from medblocks_pipelines.lib.fhir.pull_batch import pull_batch
from medblocks_pipelines.lib.smart.scopes import ScopeSet
from medblocks_pipelines.lib.smart.tokens import TokenManager, tokens_secret_name
from medblocks_pipelines.lib.warehouse.lake import quarantine_glob, resources_glob
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv, custom_ehr

FAST = {"backoff": 0.05, "max_backoff": 2.0}


def lake_rows(env: PatientAccessEnv, connection_id: str) -> list[tuple[Any, ...]]:
    glob = resources_glob(env.settings.lake_root, env.tenant)
    with duckdb.connect() as con:  # our own connection: never the shared default one
        return con.execute(
            f"SELECT resource_type, resource_id, pattern, source, connection, run_id "
            f"FROM read_parquet('{glob}', hive_partitioning=false) WHERE connection = ?",
            [connection_id],
        ).fetchall()


def connect_n(env: PatientAccessEnv, sid: str, org: Any, n: int) -> list[str]:
    ids = []
    for login in env.logins(org)[:n]:
        conn_id, outcome = env.connect(sid, login)
        assert outcome.status == "active", outcome
        ids.append(conn_id)
    return ids


def pull(env: PatientAccessEnv, ids: list[str], run_id: str = "r1", **kw: Any):  # type: ignore[no-untyped-def]
    return pull_batch(
        env.cp,
        ids,
        lake_root=env.settings.lake_root,
        run_id=run_id,
        http=env.http,
        client_options=FAST,
        **kw,
    )


def truth(env: PatientAccessEnv, org: Any, patient_id: str) -> Counter[str]:
    store = env.sandbox.org_handles(org.org_id)["store"]
    return Counter(r["resourceType"] for r in store.compartment(patient_id))


def test_pull_lands_the_record_with_provenance(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    batch = pull(pa_env, [conn_id])
    (res,) = batch.results
    assert res.status == "success", res
    rows = lake_rows(pa_env, conn_id)
    assert {(r[2], r[3], r[4], r[5]) for r in rows} == {("patient_access", sid, conn_id, "r1")}
    landed = Counter(r[0] for r in rows)
    patient = pa_env.cp.get_connection(conn_id).source_patient_id
    expected = truth(pa_env, org, patient)
    for rtype in (
        "Encounter",
        "Condition",
        "Observation",
        "Immunization",
        "DocumentReference",
        "Procedure",
        "DiagnosticReport",
        "AllergyIntolerance",
    ):
        assert landed[rtype] == expected[rtype], rtype
    assert landed["Patient"] == 1
    # Documents' Binary content and referenced Practitioners came along.
    assert landed["Binary"] == expected["DocumentReference"]
    assert landed["Practitioner"] >= 1
    # One row per resource: dedupe within the pull.
    assert len({(r[0], r[1]) for r in rows}) == len(rows)
    history = pa_env.cp.list_pulls(tenant_id="acme")[0]
    assert history.status == "success" and history.connection_id == conn_id
    assert history.counts["Observation"] == expected["Observation"]
    assert pa_env.cp.get_watermark(watermark_key(conn_id)) is not None
    assert pa_env.cp.get_connection(conn_id).next_pull_due is not None


def test_incremental_pull_uses_last_updated(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    assert pull(pa_env, [conn_id]).results[0].status == "success"
    second = pull(pa_env, [conn_id], run_id="r2").results[0]
    assert second.status == "success" and second.since is not None
    # Only the Patient read (always fetched) comes back when nothing changed.
    assert {k: v for k, v in second.counts.items() if not k.startswith("_")} == {"Patient": 1}
    # A change at the source is picked up by the next incremental pull.
    patient = pa_env.cp.get_connection(conn_id).source_patient_id
    store = pa_env.sandbox.org_handles(org.org_id)["store"]
    enc = next(r for r in store.compartment(patient) if r["resourceType"] == "Encounter")
    changed = {
        **enc,
        "status": "entered-in-error" if enc.get("status") != "entered-in-error" else "finished",
    }
    pa_env.sandbox.admin(org.org_id, "apply-changes", {"upserts": [changed]})
    third = pull(pa_env, [conn_id], run_id="r3").results[0]
    assert third.counts["Encounter"] == 1


def test_refresh_rotates_and_never_reuses(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    seen = set()
    for _ in range(3):
        manager = TokenManager(pa_env.cp, conn_id, http=pa_env.http)
        manager.refresh(stale=manager.access_token())
        blob = pa_env.cp.vault.get(tokens_secret_name(conn_id)).reveal()
        seen.add(blob)
    assert len(seen) == 3
    grants = [g for g in pa_env.auth(org).grants() if g["client_id"] == pa_env.clients[sid]]
    assert len(grants) == 1 and grants[0]["revoked"] is False  # reuse would have revoked it
    events = [e.event_type for e in pa_env.cp.connection_events(conn_id)]
    assert events.count("token.refreshed") == 3


def test_one_refresher_per_grant_across_processes(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    stale = TokenManager(pa_env.cp, conn_id, http=pa_env.http).access_token()
    # Separate managers stand for separate processes: they share only the database.
    managers = [TokenManager(pa_env.cp, conn_id, http=pa_env.http) for _ in range(6)]
    barrier = threading.Barrier(len(managers))
    tokens: list[str] = []

    def go(m: TokenManager) -> None:
        barrier.wait()
        tokens.append(m.refresh(stale=stale))

    threads = [threading.Thread(target=go, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1  # everybody got the one new token
    assert sum(m.refreshes for m in managers) == 1
    grants = [g for g in pa_env.auth(org).grants() if g["client_id"] == pa_env.clients[sid]]
    assert grants[0]["revoked"] is False
    assert pa_env.cp.get_connection(conn_id).state == "active"


def test_refused_refresh_makes_the_connection_refresh_failed(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    client_id = pa_env.clients[sid]
    pa_env.faults(org).add("revoke_refresh", client_id=client_id)
    pa_env.sandbox.admin(org.org_id, "expire-tokens", {"client_id": client_id})
    res = pull(pa_env, [conn_id]).results[0]
    assert res.status == "failed" and res.error == "refresh_refused"
    conn = pa_env.cp.get_connection(conn_id)
    assert conn.state == "refresh_failed"
    assert "invalid_grant" in conn.state_reason
    types = [e.type for e in pa_env.cp.list_events(tenant_id="acme")]
    assert "connection.refresh_failed" in types
    assert pa_env.cp.list_pulls(tenant_id="acme")[0].status == "failed"
    # Pulls stop for it: the next batch does not touch the source.
    again = pull(pa_env, [conn_id], run_id="r2").results[0]
    assert again.status == "failed" and again.requests == 0


def test_token_expiry_mid_pull_refreshes_once(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    clean = pull(pa_env, [conn_id], run_id="clean", full=True).results[0]
    pa_env.faults(org).add("expire_token", client_id=pa_env.clients[sid], after_requests=5)
    res = pull(pa_env, [conn_id], run_id="expiring", full=True).results[0]
    pa_env.faults(org).clear()
    assert res.status == "success"
    # Every token dies after 5 requests: one refresh (with rotation) per 5 requests, no reuse.
    assert res.refreshes >= 1 and res.refreshes == (res.requests - 1) // 6
    assert res.counts == clean.counts
    assert pa_env.cp.get_connection(conn_id).state == "active"


def test_429_storm_and_transient_faults_lose_nothing(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    clean = pull(pa_env, [conn_id], run_id="clean", full=True).results[0]
    faults = pa_env.faults(org)
    cid = pa_env.clients[sid]
    faults.add("rate_limit", client_id=cid, limit=12, window=1.0)
    faults.add("error_burst", client_id=cid, count=3, status=503)
    faults.add("html_200", client_id=cid, count=2)
    faults.add("drop_connection", client_id=cid, count=1, after_bytes=40)
    try:
        res = pull(pa_env, [conn_id], run_id="stormy", full=True).results[0]
    finally:
        faults.clear()
    assert res.status == "success", res
    assert res.counts == clean.counts
    assert res.statuses[429] >= 1 and res.statuses[503] == 3  # the storm really happened
    assert res.retry_reasons["html_instead_of_json"] == 2


def test_source_supporting_only_some_types(pa_env: PatientAccessEnv) -> None:
    with custom_ehr(
        pa_env,
        resource_types=(
            "Patient",
            "Condition",
            "Encounter",
            "Practitioner",
            "Organization",
            "Location",
        ),
    ) as (sid, endpoint):
        login = pa_env.logins(pa_env.org("ehr"))[0]
        conn_id, outcome = pa_env.connect(sid, login)
        assert outcome.status == "active"
        # Only offered types were asked for.
        granted = ScopeSet.parse(pa_env.cp.get_connection(conn_id).scopes_granted)
        assert granted.can_search("Condition") and not granted.can_search("Observation")
        res = pull(pa_env, [conn_id]).results[0]
    assert res.status == "success", res
    assert res.skipped_types["Observation"] == "not_supported"
    assert set(k for k in res.counts if not k.startswith("_")) <= {
        "Patient",
        "Condition",
        "Encounter",
        "Practitioner",
        "Organization",
        "Location",
    }
    assert res.counts["Condition"] >= 1


def _outcome_entry(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if body.get("resourceType") != "Bundle" or "/Condition" not in path:
        return None
    body.setdefault("entry", []).append(
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "incomplete",
                        "diagnostics": "some rows withheld",
                    }
                ],
            },
            "search": {"mode": "outcome"},
        }
    )
    return body


def test_operation_outcome_inside_a_searchset(pa_env: PatientAccessEnv) -> None:
    with custom_ehr(pa_env, rewrite=(r"/fhir/Condition$", _outcome_entry)) as (sid, _e):
        conn_id, _o = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        res = pull(pa_env, [conn_id]).results[0]
    assert res.outcome_issues == Counter({"warning:incomplete": 1})
    assert res.status == "success"  # a warning is recorded, not a failure
    assert res.counts["Condition"] >= 1 and "OperationOutcome" not in res.counts


def _loop(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if body.get("resourceType") != "Bundle" or "/Observation" not in path:
        return None
    self_url = next(link["url"] for link in body["link"] if link["relation"] == "self")
    body["link"] = [{"relation": "self", "url": self_url}, {"relation": "next", "url": self_url}]
    return body


def test_paging_loop_stops_that_search_with_an_error(pa_env: PatientAccessEnv) -> None:
    with custom_ehr(pa_env, rewrite=(r"/fhir/Observation$", _loop)) as (sid, _e):
        conn_id, _o = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        res = pull(pa_env, [conn_id]).results[0]
    assert res.status == "partial"
    assert res.failures["paging_loop"] >= 1
    assert res.counts["Condition"] >= 1  # the other searches went on
    history = pa_env.cp.list_pulls(tenant_id="acme")[0]
    assert history.status == "partial" and "paging_loop" in history.error
    assert pa_env.cp.get_watermark(watermark_key(conn_id)) is None  # retried in full next time


def test_partial_pull_moves_the_clean_searches_only(pa_env: PatientAccessEnv) -> None:
    """A quirk that recurs on one search (a paging loop on Observation) does not make every pull a
    full one: the searches that ran clean move their own watermark, the looping one is held."""
    with custom_ehr(pa_env, rewrite=(r"/fhir/Observation$", _loop)) as (sid, _e):
        conn_id, _o = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        first = pull(pa_env, [conn_id]).results[0]
        assert first.status == "partial" and first.counts["Condition"] >= 1
        assert "Condition" in first.clean_searches
        assert first.held_searches and all(
            label.startswith("Observation") for label in first.held_searches
        )
        marks = pa_env.cp.list_watermarks(watermark_key(conn_id) + "/")
        assert marks[search_watermark_key(conn_id, "Condition")] is not None
        assert not any(search_watermark_key(conn_id, h) in marks for h in first.held_searches)
        second = pull(pa_env, [conn_id], run_id="r2").results[0]
    assert second.status == "partial"
    assert second.counts["Condition"] == 0  # incremental: nothing changed since its mark
    assert second.failures["paging_loop"] == first.failures["paging_loop"]  # held: in full again
    assert second.history_counts()["_searches_held"] == len(first.held_searches)


def test_complete_pull_clears_the_search_marks(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    stale = search_watermark_key(conn_id, "Condition")
    pa_env.cp.set_watermark(stale, "2026-01-01T00:00:00Z")
    res = pull(pa_env, [conn_id]).results[0]
    assert res.status == "success" and not res.held_searches
    assert pa_env.cp.get_watermark(stale) is None
    assert pa_env.cp.get_watermark(watermark_key(conn_id)) is not None


def _malform(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if body.get("resourceType") != "Bundle" or "/Encounter" not in path or not body.get("entry"):
        return None
    body["entry"][0]["resource"].pop("id")
    body["entry"].append({"resource": ["not", "an", "object"]})
    return body


def test_malformed_resources_are_quarantined(pa_env: PatientAccessEnv) -> None:
    with custom_ehr(pa_env, rewrite=(r"/fhir/Encounter$", _malform)) as (sid, _e):
        conn_id, _o = pa_env.connect(sid, pa_env.logins(pa_env.org("ehr"))[0])
        res = pull(pa_env, [conn_id]).results[0]
    assert res.quarantined == 2
    glob = quarantine_glob(pa_env.settings.lake_root, pa_env.tenant)
    with duckdb.connect() as con:
        found = con.execute(
            f"SELECT reason FROM read_parquet('{glob}', hive_partitioning=false) "
            "WHERE connection = ?",
            [conn_id],
        ).fetchall()
    reasons = sorted(r[0] for r in found)
    assert reasons == ["missing id", "not a JSON object"]


def test_one_failed_connection_does_not_fail_the_batch(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    ids = connect_n(pa_env, sid, org, 2)
    victim = pa_env.cp.get_connection(ids[1]).source_patient_id
    pa_env.sandbox.admin(
        org.org_id, "revoke-grant", {"client_id": pa_env.clients[sid], "patient": victim}
    )
    batch = pull(pa_env, ids)
    status = {r.connection_id: r.status for r in batch.results}
    assert status == {ids[0]: "success", ids[1]: "failed"}
    assert pa_env.cp.get_connection(ids[1]).state == "refresh_failed"
    assert batch.as_metadata()["failures_by_reason"] == {"refresh_refused": 1}


def test_source_rate_limit_is_never_breached(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(
        org, config={"rate_limit": {"requests": 15, "per_seconds": 1.0}, "concurrency": 3}
    )
    ids = connect_n(pa_env, sid, org, 2)
    pa_env.faults(org).add(
        "rate_limit", client_id=pa_env.clients[sid], limit=15, window=1.0, path="/fhir/"
    )
    try:
        batch = pull_batch(
            pa_env.cp, ids, lake_root=pa_env.settings.lake_root, run_id="rl", http=pa_env.http
        )
    finally:
        pa_env.faults(org).clear()
    assert all(r.status == "success" for r in batch.results)
    assert batch.requests >= 20
    # The server enforces the same limit: not one request was answered 429.
    assert batch.statuses[429] == 0
    assert batch.statuses[200] == batch.requests


def test_revoke_stops_pulls_and_deletes_data(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    ids = connect_n(pa_env, sid, org, 2)
    pull(pa_env, ids)
    assert lake_rows(pa_env, ids[0]) and lake_rows(pa_env, ids[1])
    result = revoke_connection(
        pa_env.cp, ids[0], lake_root=pa_env.settings.lake_root, http=pa_env.http
    )
    assert result.delete_data is True and result.rows_deleted > 0  # tenant delete_on_revoke
    assert result.revoked_at_source is True
    assert lake_rows(pa_env, ids[0]) == []
    assert lake_rows(pa_env, ids[1])  # the other connection keeps its data
    assert pa_env.cp.get_connection(ids[0]).state == "revoked"
    assert pa_env.cp.vault.names(f"conn/{ids[0]}/") == []
    patient = pa_env.cp.get_connection(ids[0]).source_patient_id
    grants = [
        g
        for g in pa_env.auth(org).grants()
        if g["client_id"] == pa_env.clients[sid] and g["patient"] == patient
    ]
    assert grants and all(g["revoked"] for g in grants)
    again = pull(pa_env, [ids[0]], run_id="r2").results[0]
    assert again.status == "failed" and again.requests == 0


def test_plan_queries_respects_support_and_grant() -> None:
    granted = ScopeSet.parse("patient/Observation.rs patient/Condition.read patient/Goal.r")
    queries, skipped = plan_queries(
        kind="ehr",
        patient_id="p1",
        supported={"Observation", "Condition", "Goal"},
        granted=granted,
        since="2026-01-01T00:00:00Z",
    )
    labels = [q.label for q in queries]
    assert "Observation:laboratory" in labels and "Condition" in labels
    assert skipped["Goal"] == "not_granted" and skipped["Encounter"] == "not_supported"
    assert all(("_lastUpdated", "gt2026-01-01T00:00:00Z") in q.params for q in queries)
    payer, _ = plan_queries(
        kind="payer", patient_id="p1", supported=set(), granted=ScopeSet.parse("patient/*.rs")
    )
    assert [q.resource_type for q in payer] == ["Coverage", "ExplanationOfBenefit"]


@pytest.mark.parametrize("kind", ["payer"])
def test_payer_pull(pa_env: PatientAccessEnv, kind: str) -> None:
    org = pa_env.org(kind)
    sid = pa_env.add_source(org)
    (conn_id,) = connect_n(pa_env, sid, org, 1)
    res = pull(pa_env, [conn_id]).results[0]
    assert res.status == "success", res
    patient = pa_env.cp.get_connection(conn_id).source_patient_id
    expected = truth(pa_env, org, patient)
    assert res.counts["ExplanationOfBenefit"] == expected["ExplanationOfBenefit"] > 0
    assert res.counts["Coverage"] == expected["Coverage"] > 0

"""Backend syncs that lose nothing (issue 12 part B), over real sockets against the sandbox EHR with
the vendor quirks seen on third-party Bulk Data servers (named faults in ``sandbox/faults.py``):

* ``manifest_errors_partial``: some types fail generation; their watermark is held back and the
  next incremental sync re-delivers them (nothing lost, nothing duplicated in the warehouse);
* ``export_expires``: files answer 410 / the status URL 404; the export is abandoned and a new
  one starts from the same watermark, without ``--full``;
* ``retry_after_epoch``: ``Retry-After`` as an absolute epoch time;
* ``paged_manifest``: the manifest in ``link[next]`` pages (``allowPartialManifests``);
* token reuse: one token and one discovery request for a whole multi-poll export;
* one in-flight export per organization, atomically (two threads; two PostgreSQL connections).
"""

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from medblocks_pipelines.lib.fhir import bulk_watermarks as wm
from medblocks_pipelines.lib.fhir.bulk import ExportExpired
from medblocks_pipelines.lib.fhir.bulk_sync import (
    SyncReport,
    kickoff_export,
    land_export,
    poll_export,
    sync_organization,
    wait_for_export,
    watermark_key,
)
from medblocks_pipelines.lib.smart.backend import SHARED_CACHE
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse

from .conftest import TENANT, Env

ORG = "mercy-general"


def _sync(env: Env, run_id: str, **kw: Any) -> SyncReport:
    return sync_organization(
        env.cp, env.settings, TENANT, ORG, run_id=run_id, min_wait=0.05, timeout=40, **kw
    )


def _touch(ehr, rtype: str, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Change ``n`` resources of ``rtype`` at the source (a new version each); their ids."""
    ids = []
    for res in list(ehr.store.iter_type(rtype))[:n]:
        changed = {**res, "status": "amended" if rtype == "Observation" else res.get("status")}
        changed.pop("meta", None)
        ehr.store.put(changed)
        ids.append(res["id"])
    return ids


def test_partial_export_holds_failed_types_and_next_sync_redelivers(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient", "Observation", "Condition"]})
    first = _sync(env, "run-1")
    assert first.status == "success" and first.missing_types == []
    t1 = first.watermark
    time.sleep(0.01)
    changed_obs = _touch(ehr, "Observation", 2)
    _touch(ehr, "Condition", 1)

    ehr.faults.add("manifest_errors_partial", types=["Observation"])
    second = _sync(env, "run-2")
    assert second.status == "partial"
    assert second.missing_types == ["Observation"]
    assert "Observation" not in second.counts_by_type and second.counts_by_type["Condition"] == 1
    assert second.error_entries.get("error") == 1
    # the organization's watermark moved, the failed type is held at the old _since
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) == second.watermark != t1
    assert wm.holds(env.cp, TENANT, ORG) == {"Observation": t1}
    (event,) = [e for e in env.cp.list_events(tenant_id=TENANT) if e.type.startswith("backend")]
    assert event.type == "backend.export.partial"
    assert event.payload["missing_types"] == ["Observation"]
    assert env.cp.get_bulk_export(second.export_id).counts["missing_types"] == ["Observation"]

    third = _sync(env, "run-3")
    assert third.since == t1  # asked again from the held type's watermark
    assert third.status == "success" and third.missing_types == []
    assert third.counts_by_type.get("Observation") == 2
    assert wm.holds(env.cp, TENANT, ORG) == {}

    build_warehouse(TENANT, settings=env.settings, steps=[])
    with open_warehouse(TENANT, settings=env.settings) as con:
        n, distinct = con.execute(
            "SELECT count(*), count(DISTINCT resource_key) FROM resources"
        ).fetchone()  # type: ignore[misc]
        amended = con.execute(
            "SELECT resource_id FROM resources WHERE resource_type = 'Observation' "
            "AND json_extract_string(resource, '$.status') = 'amended' ORDER BY 1"
        ).fetchall()
    assert n == distinct == sum(first.counts_by_type.values())
    assert [r[0] for r in amended] == sorted(changed_obs)


def test_errors_naming_no_type_hold_the_whole_watermark(env: Env) -> None:
    env.add_org(ORG, org_config={"types": ["Patient", "Observation"]})
    report = _sync(env, "run-1")
    assert report.status == "success"
    # an error issue whose text names no resource type: the watermark must not move
    outcome = {"severity": "error", "code": "exception", "diagnostics": "disk full"}
    moved = wm.advance(
        env.cp,
        TENANT,
        ORG,
        transaction_time="2099-01-01T00:00:00Z",
        export_since=report.watermark,
        requested_types=["Patient"],
        failed_types=wm.types_named(outcome),
        unnamed_errors=1,
    )
    assert moved.held_back and moved.missing_types == ("*",)
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) == report.watermark


def test_expired_export_files_410_is_abandoned_and_next_run_starts_anew(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient", "Observation"]})
    ehr.faults.add("export_expires", after_downloads=1)
    kicked = kickoff_export(env.cp, TENANT, ORG, run_id="k1")
    wait_for_export(env.cp, kicked.export_id, min_wait=0.05, timeout=20)
    with pytest.raises(ExportExpired):
        land_export(env.cp, env.settings, kicked.export_id, run_id="land-1")
    row = env.cp.get_bulk_export(kicked.export_id)
    assert row.status == "expired" and "410" in row.error
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) is None
    assert [e.type for e in env.cp.list_events(tenant_id=TENANT)][-1] == "backend.export.expired"
    # no --full: a new export, from the same (empty) watermark
    again = kickoff_export(env.cp, TENANT, ORG, run_id="k2")
    assert not again.reused and again.export_id != kicked.export_id and again.since is None
    wait_for_export(env.cp, again.export_id, min_wait=0.05, timeout=20)
    report = land_export(env.cp, env.settings, again.export_id, run_id="land-2")
    assert report.status == "success" and report.landed > 0


def test_expired_status_url_404_abandons_the_export(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient"]})
    first = _sync(env, "run-1")
    kicked = kickoff_export(env.cp, TENANT, ORG, run_id="k")
    assert kicked.since == first.watermark
    for job in ehr.bulk.jobs():
        job.expired = True  # the server forgot it: its status URL answers 404
    st = poll_export(env.cp, kicked.export_id, min_wait=0.05)
    assert st.state == "expired"
    assert env.cp.get_bulk_export(kicked.export_id).status == "expired"
    # the CLI/non-Dagster path recovers by itself, from the same watermark
    ehr.faults.add("export_expires", after_downloads=0)
    _touch(ehr, "Patient", 1)  # something to download
    report = _sync(env, "run-2")
    assert report.since == first.watermark
    assert any("expired" in w for w in report.warnings)
    statuses = [r.status for r in env.cp.list_bulk_exports(tenant_id=TENANT)]
    assert statuses == ["completed", "expired", "expired", "completed"]


def test_retry_after_as_epoch_time_is_understood(env: Env) -> None:
    ehr = env.add_org(ORG)
    ehr.bulk.config.retry_after = 3
    ehr.bulk.config.export_seconds = 30
    ehr.faults.add("retry_after_epoch")
    kicked = kickoff_export(env.cp, TENANT, ORG, run_id="k")
    st = poll_export(env.cp, kicked.export_id, min_wait=0.05)
    assert st.state == "in_progress"
    assert st.retry_after is not None and st.retry_after <= 4  # not 1.7e9 s (clamped to 300)
    wait = env.cp.get_bulk_export(kicked.export_id).next_poll_at - datetime.now(UTC)
    assert wait.total_seconds() <= 4


def test_paged_manifest_is_followed(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"allow_partial_manifests": True})
    ehr.faults.add("paged_manifest", page_size=2)
    report = _sync(env, "run-1")
    assert report.files > 2  # more files than one page holds
    assert report.status == "success"
    assert report.landed == sum(report.expected_by_type.values())
    assert len(report.expected_by_type) > 2


def test_one_token_and_one_discovery_for_a_multi_poll_export(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient", "Condition"]})
    ehr.bulk.config.export_seconds = 1.0
    SHARED_CACHE.clear()
    report = _sync(env, "run-1")
    polls = env.cp.get_bulk_export(report.export_id).counts["_polls"]
    assert polls >= 6
    assert ehr.faults.requests(r"/token$", "POST") == 1
    assert ehr.faults.requests(r"smart-configuration$", "GET") == 1


def test_concurrent_kickoffs_start_one_export(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient"]})
    barrier = threading.Barrier(2)
    results = []

    def go(run: str) -> None:
        barrier.wait()
        results.append(kickoff_export(env.cp, TENANT, ORG, run_id=run))

    threads = [threading.Thread(target=go, args=(f"r{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.export_id for r in results}) == 1
    assert sorted(r.reused for r in results) == [False, True]
    assert ehr.faults.requests(r"/\$export$") == 1
    assert len(env.cp.list_bulk_exports(tenant_id=TENANT)) == 1

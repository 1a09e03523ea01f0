"""End-to-end backend syncs over real sockets against the sandbox EHR (SMART AS + Bulk Data).

Covers: registration by JWKS URL (our served JWKS), token by discovery, Group kick-off, polling,
parallel download, landing, watermark and DELETE; then an incremental sync with `_since` that
picks up only changes and deletions (tombstones).
"""

from collections import Counter

import duckdb

from medblocks_pipelines.lib.fhir.bulk_sync import sync_organization, watermark_key
from medblocks_pipelines.lib.warehouse.lake import resources_glob

from .conftest import TENANT, Env


def _compartment_counts(ehr) -> Counter[str]:  # type: ignore[no-untyped-def]
    """What a Group export of every patient should hold, by type, straight from the store."""
    from medblocks_sandbox.bulk_source import patients_of
    from medblocks_sandbox.fhir_params import PATIENT_COMPARTMENT, SHARED_TYPES

    members = {p["id"] for p in ehr.store.iter_type("Patient")}
    out: Counter[str] = Counter()
    for rtype in ehr.store.resource_types():
        if rtype not in PATIENT_COMPARTMENT and rtype not in SHARED_TYPES and rtype != "Patient":
            continue
        for res in ehr.store.iter_type(rtype):
            in_compartment = rtype in PATIENT_COMPARTMENT or rtype == "Patient"
            if in_compartment and not patients_of(res) & members:
                continue
            out[rtype] += 1
    return out


def test_full_then_incremental_sync(env: Env) -> None:
    ehr = env.add_org("mercy-general")
    report = sync_organization(
        env.cp, env.settings, TENANT, "mercy-general", run_id="run-1", min_wait=0.05, timeout=30
    )
    expected = _compartment_counts(ehr)
    assert report.counts_by_type == dict(expected)
    assert report.status == "success", report.as_metadata()
    assert report.count_mismatches == {}
    assert report.files >= len(expected)
    assert report.watermark
    assert env.cp.get_watermark(watermark_key(TENANT, "mercy-general")) == report.watermark
    # DELETE after download: the server no longer knows the job.
    assert ehr.bulk.jobs() == []
    rows = env.cp.list_bulk_exports(tenant_id=TENANT)
    assert [r.status for r in rows] == ["completed"]
    conn = env.cp.get_connection(rows[0].connection_id)
    assert conn.state == "active"

    # Changes at the source: one updated Observation, one deleted Condition.
    obs = next(ehr.store.iter_type("Observation"))
    cond = next(ehr.store.iter_type("Condition"))
    changed = {**obs, "status": "amended"}
    changed.pop("meta", None)
    ehr.store.put(changed)
    ehr.store.delete("Condition", cond["id"])

    second = sync_organization(
        env.cp, env.settings, TENANT, "mercy-general", run_id="run-2", min_wait=0.05, timeout=30
    )
    assert second.since == report.watermark
    assert second.counts_by_type == {"Observation": 1}
    assert second.deleted == 1
    con = duckdb.connect()
    rows2 = con.execute(
        f"SELECT resource_type, resource_id, deleted FROM read_parquet('{resources_glob(env.settings.lake_root, TENANT)}', hive_partitioning=false) WHERE run_id = 'run-2' ORDER BY 1"
    ).fetchall()
    assert ("Condition", cond["id"], True) in rows2
    assert ("Observation", obs["id"], False) in rows2

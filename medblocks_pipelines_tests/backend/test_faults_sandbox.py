"""Bad input and faults, over real sockets against the sandbox EHR (fault injection middleware and
vendor profiles): refused kick-off, failure midway, 429 storms (seconds and HTTP-date), dropped
connections (resume with Range), malformed and truncated lines, manifest count mismatch, token
expiry during downloads, informational error files, a failed land rerun without duplicates, and
the Oracle-like (Group only, presigned 307 to another origin, string requiresAccessToken, one
export at a time) and Epic-like (JWKS URL only, jku) profiles.
"""

import httpx
import pytest

from medblocks_pipelines.lib.errors import TransientError
from medblocks_pipelines.lib.fhir.bulk import ExportFailed, KickoffRefused
from medblocks_pipelines.lib.fhir.bulk_sync import (
    kickoff_export,
    land_export,
    sync_organization,
    wait_for_export,
    watermark_key,
)
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse

from .conftest import CLIENT_ID, TENANT, Env

ORG = "mercy-general"
FILES = r"/bulk-files/"


def _sync(env: Env, run_id: str = "run-1", **kw: object):  # type: ignore[no-untyped-def]
    return sync_organization(
        env.cp, env.settings, TENANT, ORG, run_id=run_id, min_wait=0.05, timeout=40, **kw
    )  # type: ignore[arg-type]


def test_kickoff_refused_saves_nothing(env: Env) -> None:
    env.add_org(ORG, org_config={"types": ["Observation", "NotAType"]})
    with pytest.raises(KickoffRefused) as info:
        _sync(env)
    assert info.value.status == 400 and info.value.issue_codes == ["invalid"]
    assert env.cp.list_bulk_exports() == []
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) is None


def test_export_failing_midway(env: Env) -> None:
    ehr = env.add_org(ORG)
    ehr.faults.add("export_fail", at_fraction=0.2, status=500)
    with pytest.raises(ExportFailed):
        _sync(env)
    (row,) = env.cp.list_bulk_exports()
    assert row.status == "failed"
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) is None


@pytest.mark.parametrize("form", ["seconds", "http-date"])  # Retry-After in both forms
def test_429_storm_on_status_and_files(env: Env, form: str) -> None:
    ehr = env.add_org(ORG)
    ehr.faults.add(
        "rate_limit", path=r"/bulk-(status|files)/", limit=2, window=1.0, retry_after_form=form
    )
    env.cp.update_organization(
        ORG, config={"group_id": "cohort", "types": ["Patient", "Condition", "Encounter"]}
    )
    report = _sync(env)
    assert report.status == "success"
    assert report.landed == sum(report.expected_by_type.values())
    row = env.cp.list_bulk_exports()[0]
    assert row.status == "completed"


@pytest.mark.parametrize("gzip", [False, True])  # resume plain and gzip-encoded files
def test_dropped_connections_resume_with_range(env: Env, gzip: bool) -> None:
    ehr = env.add_org(ORG, source_config={"max_parallel_downloads": 1, "accept_gzip": gzip})
    ehr.faults.add("drop_connection", path=FILES, count=3, after_bytes=500)
    report = _sync(env)
    assert report.status == "success"
    # plain files are all larger than the cut; some gzip files are smaller (no drop happens)
    assert report.resumed_bytes >= (500 if gzip else 3 * 500)
    assert report.count_mismatches == {}
    assert report.landed == sum(report.expected_by_type.values())


def test_malformed_and_truncated_lines_are_quarantined(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Observation"]})
    ehr.faults.add("ndjson_malformed", line=3)
    ehr.faults.add("ndjson_truncate", line=7)
    total = sum(1 for _ in ehr.store.iter_type("Observation"))
    report = _sync(env)
    assert report.quarantined == 2
    assert report.counts_by_type == {"Observation": total - 2}
    assert report.status == "partial"
    # what the manifest promised was received: two lines arrived but were bad
    assert report.received_by_type == {"Observation": total}


def test_manifest_count_mismatch_is_reported(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Condition"]})
    ehr.faults.add("count_mismatch", delta=2)
    report = _sync(env)
    got = sum(1 for _ in ehr.store.iter_type("Condition"))
    assert report.counts_by_type == {"Condition": got}
    assert report.count_mismatches["Condition"]["received"] == got
    assert report.count_mismatches["Condition"]["manifest"] > got
    assert report.status == "partial"


def test_token_expiry_during_downloads(env: Env) -> None:
    ehr = env.add_org(ORG, source_config={"max_parallel_downloads": 1})
    # every token dies after two file requests: the client must fetch new ones and carry on
    ehr.faults.add("expire_token", path=FILES, after_requests=2)
    report = _sync(env)
    assert report.status == "success"
    assert report.files > 4
    # the land step starts with the token the polls used (shared until near expiry), then needs
    # a new one every two files
    assert report.tokens_fetched >= report.files // 2 - 1


def test_informational_error_file_is_success_with_warning(env: Env) -> None:
    scope = "system/Patient.rs system/Observation.rs"
    ehr = env.add_org(ORG, source_config={"scope": scope})
    resp = ehr.admin(
        "clients",
        {
            "client_id": CLIENT_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": env.jwks_url,
            "scopes": scope.split(),
        },
    )
    assert resp.status_code == 201
    report = _sync(env)
    assert set(report.counts_by_type) == {"Patient", "Observation"}
    assert report.error_entries.get("information", 0) >= 1
    assert report.status == "success"
    assert any("error files" in w for w in report.warnings)
    assert list((env.settings.data_dir / "bulk_errors").rglob("*.ndjson*"))


def test_failed_land_then_rerun_has_no_duplicates(env: Env) -> None:
    ehr = env.add_org(ORG, source_config={"max_parallel_downloads": 2})
    kicked = kickoff_export(env.cp, TENANT, ORG, run_id="k")
    wait_for_export(env.cp, kicked.export_id, min_wait=0.05, timeout=20)
    # one file keeps failing: some files land, the run fails, nothing is deleted or watermarked
    first_file = ehr.bulk.jobs()[0].files[0].name
    ehr.faults.add("error_burst", path=first_file, count=100, status=503)
    with pytest.raises(TransientError):
        land_export(
            env.cp,
            env.settings,
            kicked.export_id,
            run_id="land-1",
            client_kwargs={"max_attempts": 2, "backoff_base": 0.01},
        )
    assert env.cp.get_watermark(watermark_key(TENANT, ORG)) is None
    assert env.cp.get_bulk_export(kicked.export_id).status == "ready"
    assert ehr.bulk.jobs(), "the export must not be deleted after a failed land"
    ehr.faults.clear()
    report = land_export(env.cp, env.settings, kicked.export_id, run_id="land-2")
    assert report.status == "success"
    # a third run of the completed export is a no-op
    again = land_export(env.cp, env.settings, kicked.export_id, run_id="land-3")
    assert again.landed == 0 and "already landed" in again.warnings[0]
    build_warehouse(TENANT, settings=env.settings, steps=[])
    with open_warehouse(TENANT, settings=env.settings) as con:
        n, distinct = con.execute(
            "SELECT count(*), count(DISTINCT resource_key) FROM resources"
        ).fetchone()  # type: ignore[misc]
    assert n == distinct == report.landed


def test_oracle_profile_presigned_redirects_and_one_export(env: Env) -> None:
    ehr = env.add_org(
        ORG, profile="oracle", org_config={"types": ["Patient", "Condition", "Observation"]}
    )
    assert ehr.storage_url and ehr.storage_url != ehr.base_url
    first = kickoff_export(env.cp, TENANT, ORG, run_id="a")
    # a second kick-off while one is in flight reuses it instead of drawing a 429
    second = kickoff_export(env.cp, TENANT, ORG, run_id="b")
    assert second.reused and second.export_id == first.export_id
    wait_for_export(env.cp, first.export_id, min_wait=0.05, timeout=20)
    manifest = env.cp.get_bulk_export(first.export_id).manifest
    assert manifest["requiresAccessToken"] == "true"
    report = land_export(env.cp, env.settings, first.export_id, run_id="land")
    # the presigned host refuses any Authorization header: success proves it was stripped
    assert report.status == "success"
    assert set(report.counts_by_type) == {"Patient", "Condition", "Observation"}


def test_oracle_profile_refuses_system_level(env: Env) -> None:
    env.add_org(ORG, profile="oracle", org_config={"group_id": None, "level": "system"})
    from medblocks_pipelines.lib.errors import ConfigError

    with pytest.raises(ConfigError):
        kickoff_export(env.cp, TENANT, ORG)


def test_epic_profile_needs_jwks_url_and_jku(env: Env) -> None:
    ehr = env.add_org(ORG, profile="epic", org_config={"types": ["Patient"]})
    inline = ehr.admin(
        "clients",
        {
            "client_id": "inline",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": []},
        },
    )
    assert inline.status_code == 400
    report = _sync(env)
    assert report.counts_by_type == {"Patient": sum(1 for _ in ehr.store.iter_type("Patient"))}


def test_html_maintenance_page_on_status_is_retried(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"types": ["Patient"]})
    ehr.faults.add("html_200", path=r"/bulk-status/", count=1, methods=["GET"])
    report = _sync(env)
    assert report.status == "success"


def test_unknown_token_is_refused_clearly(env: Env) -> None:
    ehr = env.add_org(ORG)
    resp = httpx.get(
        f"{ehr.fhir_base}/Group/cohort/$export",
        headers={
            "Accept": "application/fhir+json",
            "Prefer": "respond-async",
            "Authorization": "Bearer nope",
        },
    )
    assert resp.status_code == 401


def test_attachments_downloaded_when_configured(env: Env) -> None:
    ehr = env.add_org(
        ORG, source_config={"attachments": True}, org_config={"types": ["DocumentReference"]}
    )
    docs = sum(1 for _ in ehr.store.iter_type("DocumentReference"))
    assert docs > 0
    report = _sync(env)
    assert report.attachments == docs
    folder = env.settings.data_dir / "attachments" / f"tenant={TENANT}"
    assert len(list(folder.rglob("*"))) >= docs
    # every attachment is linked to its DocumentReference; the small ones are inline
    import base64

    import polars as pl

    links = pl.read_parquet(list(folder.rglob("links/*.parquet")))
    ids = {d["id"] for d in ehr.store.iter_type("DocumentReference")}
    assert set(links["document_reference_id"]) == ids
    small = links.filter(pl.col("data_base64").is_not_null())
    assert small.height == report.attachments_inlined
    for row in small.iter_rows(named=True):
        assert len(base64.b64decode(row["data_base64"])) == row["size"]

"""The demo path against the whole sandbox as `medblocks-sandbox serve` starts it (run.start_sandbox):
register our client at two EHR organizations, sync both through the Dagster jobs, apply one
population evolve step at the source, and sync again: only the changes and deletions arrive.
"""

import pytest

from medblocks_pipelines.cli.backend import run_backend_sync
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse
from medblocks_sandbox.drivers.backend import setup_sandbox_backend

from .conftest import TENANT, Env


@pytest.fixture
def sandbox():  # type: ignore[no-untyped-def]
    from medblocks_sandbox.run import start_sandbox

    handle = start_sandbox(base_port=0, persons=8, seed=5, roles=["ehr"])
    for org in handle.orgs_of("ehr"):
        bulk = handle.org_handles(org.org_id)["bulk"]
        bulk.config.export_seconds = 0.2
        bulk.config.retry_after = 0
    try:
        yield handle
    finally:
        handle.stop()


def test_two_orgs_then_incremental(env: Env, sandbox, live_defs_state) -> None:  # type: ignore[no-untyped-def]
    orgs = [o.org_id for o in sandbox.orgs_of("ehr")][:2]
    assert len(orgs) == 2
    setup_sandbox_backend(env.cp, sandbox, TENANT, orgs, jwks_url=env.jwks_url)
    first = {
        org: run_backend_sync(
            env.cp, env.settings, TENANT, org, min_wait=0.05, timeout=30, instance=live_defs_state
        )
        for org in orgs
    }
    for md in first.values():
        assert md["status"] == "success" and md["landed"] > 0 and md["deleted"] == 0
    sandbox.apply_changes(1)
    second = {
        org: run_backend_sync(
            env.cp, env.settings, TENANT, org, min_wait=0.05, timeout=30, instance=live_defs_state
        )
        for org in orgs
    }
    for org in orgs:
        assert second[org]["since"] == first[org]["watermark"]
        # far fewer resources than the full export: only what changed
        assert second[org]["landed"] < first[org]["landed"] / 2
    assert sum(md["landed"] + md["deleted"] for md in second.values()) > 0
    build_warehouse(TENANT, settings=env.settings, steps=[])
    with open_warehouse(TENANT, settings=env.settings) as con:
        n, distinct, orgs_seen = con.execute(
            "SELECT count(*), count(DISTINCT resource_key), count(DISTINCT organization) "
            "FROM resources"
        ).fetchone()  # type: ignore[misc]
    assert n == distinct and orgs_seen == 2


def test_sync_and_build_through_dagster_into_object_storage(  # type: ignore[no-untyped-def]
    env: Env, sandbox, live_defs_state, s3_bucket, monkeypatch
) -> None:
    """The same Dagster jobs with the lake and the warehouses in an S3-compatible store: lake
    files and the published warehouse land in the bucket, and a machine that never built reads it."""
    import dataclasses

    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.defs.warehouse.assets import WAREHOUSE_KEY
    from medblocks_pipelines.lib.settings import get_settings

    bucket, client = s3_bucket
    monkeypatch.setenv("MEDBLOCKS_LAKE_ROOT", f"s3://{bucket}/lake")
    monkeypatch.setenv("MEDBLOCKS_WAREHOUSE_DIR", f"s3://{bucket}/warehouses")
    org = [o.org_id for o in sandbox.orgs_of("ehr")][0]
    setup_sandbox_backend(env.cp, sandbox, TENANT, [org], jwks_url=env.jwks_url)
    md = run_backend_sync(
        env.cp, env.settings, TENANT, org, min_wait=0.05, timeout=30, instance=live_defs_state
    )
    assert md["status"] == "success" and md["landed"] > 0
    result = run_job("tenant_warehouse_job", partition_key=TENANT, instance=live_defs_state)
    [mat] = [
        m
        for m in result.asset_materializations_for_node("warehouse__tenant_warehouse")
        if m.asset_key == WAREHOUSE_KEY
    ]
    assert mat.metadata["published"].value == f"s3://{bucket}/warehouses/{TENANT}.duckdb"
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    assert f"warehouses/{TENANT}.duckdb" in keys
    lake_files = [k for k in keys if k.startswith("lake/")]
    assert lake_files and all(k.endswith(".parquet") for k in lake_files)
    assert mat.metadata["storage"].value["mirror_files"] == len(lake_files)  # type: ignore[index]
    elsewhere = dataclasses.replace(
        get_settings(env.settings.data_dir.parent / "other-machine"), database_url="unused"
    )
    with open_warehouse(TENANT, settings=elsewhere) as con:
        (n,) = con.execute("SELECT count(*) FROM resources").fetchone()  # type: ignore[misc]
    assert n == md["landed"]

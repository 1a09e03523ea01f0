"""Dagster wiring of the warehouse: the build asset with its checks and metadata, the debounced
rebuild sensor, and the definitions."""

import json

import dagster as dg
import pytest

from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.warehouse.assets import (
    BASE_TABLES_KEY,
    CHECK_SPECS,
    IDENTITY_KEY,
    TENANT_TAG,
    UNIFIED_KEY,
    VIEWS_KEY,
    WAREHOUSE_KEY,
    tenant_warehouse,
)
from medblocks_pipelines.defs.warehouse.lineage import landing_keys, with_landing_lineage
from medblocks_pipelines.defs.warehouse.sensors import (
    landing_asset_keys,
    plan_rebuilds,
    warehouse_on_landing_sensor,
)
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines_tests.warehouse.conftest import TENANT, land_population
from medblocks_sandbox.generator import PopulationSpec, generate_population

BULK = "backend/bulk_resources"


def test_debounce_waits_for_quiet() -> None:
    """Landings 10 s apart keep a tenant pending until 60 s of quiet."""
    due, cur = plan_rebuilds(
        {}, [(BULK, 5, "acme.mercy", 1000.0)], now=1010, quiet_s=60, max_wait_s=600
    )
    assert due == [] and cur["pending"]["acme"]["storage_id"] == 5
    due, cur = plan_rebuilds(
        cur, [(BULK, 9, "acme.lakeside", 1050.0)], now=1060, quiet_s=60, max_wait_s=600
    )
    assert due == []
    due, cur = plan_rebuilds(cur, [], now=1111, quiet_s=60, max_wait_s=600)
    assert due == [("acme", 9)] and cur["pending"] == {} and cur["after"][BULK] == 9


def test_debounce_has_a_deadline_and_keeps_tenants_apart() -> None:
    cur: dict = {}
    due: list = []
    for i in range(0, 700, 30):  # a steady trickle never goes quiet
        due, cur = plan_rebuilds(
            cur,
            [(BULK, i + 1, "acme.mercy", 1000.0 + i)],
            now=1000.0 + i,
            quiet_s=60,
            max_wait_s=600,
        )
        if due:
            break
    assert due == [("acme", 601)]
    due, cur = plan_rebuilds(
        {},
        [(BULK, 1, "acme.a", 0.0), (BULK, 2, "beta.b", 100.0)],
        now=120,
        quiet_s=60,
        max_wait_s=600,
    )
    assert due == [("acme", 1)] and set(cur["pending"]) == {"beta"}


def test_sensor_requests_one_tagged_build_per_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBLOCKS_WAREHOUSE_DEBOUNCE_S", "0")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenants", ["acme"])
        for part in ("acme.mercy", "acme.lakeside", "ghost.org"):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=["backend", "bulk_resources"], partition=part)
            )
        ctx = dg.build_sensor_context(instance=instance, definitions=_definitions())
        result = warehouse_on_landing_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        reqs = result.run_requests or []
        assert [r.partition_key for r in reqs] == ["acme"]  # one build; unknown tenant skipped
        assert reqs[0].tags[TENANT_TAG] == "acme"
        # nothing new landed: the next tick requests nothing
        ctx2 = dg.build_sensor_context(
            instance=instance, cursor=result.cursor, definitions=_definitions()
        )
        again = warehouse_on_landing_sensor(ctx2)
        assert isinstance(again, dg.SensorResult) and not again.run_requests


def _definitions() -> dg.Definitions:
    from medblocks_pipelines.cli.runtime import load_definitions

    return load_definitions()


LANDING = {
    "backend/bulk_resources",
    "backend/ndjson_import",
    "clinician_workflow/records",
    "network/query_results",
    "patient_access/records",
}


def test_landing_keys_found_in_the_definitions() -> None:
    """Every tagged landing asset, and only those, is upstream of the warehouse's base tables."""
    definitions = _definitions()
    repo = definitions.get_repository_def()
    tagged = {k.to_user_string() for k in landing_keys(definitions)}
    assert tagged == LANDING  # all five landing assets carry the tag
    assert {k.to_user_string() for k in landing_asset_keys(repo)} == LANDING
    graph = repo.asset_graph
    for key in LANDING:
        node = graph.get(dg.AssetKey.from_user_string(key))
        assert node.tags.get("medblocks/layer") == "landing"
        assert BASE_TABLES_KEY in node.child_keys


def test_a_newly_tagged_asset_joins_the_lineage() -> None:
    """No list to update: an asset tagged as landing becomes a dep of the warehouse."""

    @dg.asset(key=["newpattern", "records"], tags={"medblocks/layer": "landing"})
    def new_landing() -> None: ...

    wired = with_landing_lineage(
        dg.Definitions(
            assets=[new_landing, tenant_warehouse], resources={"platform": PlatformResource()}
        )
    )
    repo = wired.get_repository_def()
    parents = repo.asset_graph.get(BASE_TABLES_KEY).parent_keys
    assert parents == {dg.AssetKey(["newpattern", "records"])}
    assert landing_asset_keys(repo) == [dg.AssetKey(["newpattern", "records"])]


def test_one_build_materializes_every_layer() -> None:
    """The multi-asset cannot be subset: one build, one lock, one publish for all layers."""
    assert set(tenant_warehouse.keys) == {
        BASE_TABLES_KEY,
        VIEWS_KEY,
        IDENTITY_KEY,
        UNIFIED_KEY,
        WAREHOUSE_KEY,
    }
    assert not tenant_warehouse.can_subset


def test_asset_builds_checks_and_reports(settings: Settings) -> None:
    pop = generate_population(PopulationSpec(seed=2, persons=8))
    land_population(settings, pop)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenants", [TENANT])
        res = dg.materialize(
            [tenant_warehouse],
            partition_key=TENANT,
            instance=instance,
            resources={"platform": PlatformResource()},
        )
        assert res.success
        mats = {
            m.asset_key: m
            for m in res.asset_materializations_for_node("warehouse__tenant_warehouse")
        }
        assert set(mats) == set(tenant_warehouse.keys)  # every layer, from one build
        mat = mats[WAREHOUSE_KEY]
        counts = mat.metadata["table_counts"].value
        assert isinstance(counts, dict)
        layer_tables = {k: set(m.metadata["table_counts"].value or {}) for k, m in mats.items()}  # type: ignore[arg-type]
        assert {"resources", "quarantine"} <= layer_tables[BASE_TABLES_KEY]
        assert {"persons", "patient_links"} <= layer_tables[IDENTITY_KEY]
        assert {"facts", "fact_sources"} <= layer_tables[UNIFIED_KEY]
        assert {"view_errors", "condition"} <= layer_tables[VIEWS_KEY]
        # each table is in exactly one layer (the published file's own table is build_info)
        layered = [t for k, ts in layer_tables.items() if k != WAREHOUSE_KEY for t in ts]
        assert len(layered) == len(set(layered))
        assert set(layered) | {"build_info"} == set(counts)
        assert counts["persons"] > 0 and counts["facts"] > 0
        assert "Warehouse summary" in str(mat.metadata["summary"].value)
        evals = res.get_asset_check_evaluations()
        assert {e.check_name for e in evals} == {s.name for s in CHECK_SPECS}
        assert all(e.passed for e in evals), [e.check_name for e in evals if not e.passed]
        run = instance.get_run_by_id(res.run_id)
        assert run is not None and run.tags[TENANT_TAG] == TENANT
        # a second build compares its counts with the first
        res2 = dg.materialize(
            [tenant_warehouse],
            partition_key=TENANT,
            instance=instance,
            resources={"platform": PlatformResource()},
        )
        rc = [e for e in res2.get_asset_check_evaluations() if e.check_name == "row_counts"][0]
        assert rc.passed
        details = rc.metadata["details"].value
        assert isinstance(details, dict) and details["emptied"] == []
        assert json.dumps(details)  # JSON-safe

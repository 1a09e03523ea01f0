"""The per-tenant warehouse multi-asset: builds the tenant's DuckDB file from the lake, publishes
atomically.

The build runs the base tables, the ViewDefinition tables, identity and the unified record
(``lib/warehouse/steps.py``), then checks the published file (``lib/warehouse/quality.py``). Each
layer is an asset of one multi-asset (``warehouse/base_tables`` -> ``views`` / ``identity`` ->
``unified_record`` -> ``tenant_warehouse``, the published file with the checks); one build
materializes all of them, under one lock, with one atomic publish. Metadata: row counts per layer
and a markdown summary: counts and our own ids only, never patient data.
"""

import json
from collections.abc import Iterator
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.shared.partitions import tenant_partitions
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.lib.warehouse.build import (
    BuildResult,
    build_warehouse,
    open_warehouse,
    published_url,
)
from medblocks_pipelines.lib.warehouse.layers import counts_by_layer
from medblocks_pipelines.lib.warehouse.quality import (
    CheckOutcome,
    run_checks,
    summary,
    summary_markdown,
)

WAREHOUSE_KEY = dg.AssetKey(["warehouse", "tenant_warehouse"])
BASE_TABLES_KEY = dg.AssetKey(["warehouse", "base_tables"])
VIEWS_KEY = dg.AssetKey(["warehouse", "views"])
IDENTITY_KEY = dg.AssetKey(["warehouse", "identity"])
UNIFIED_KEY = dg.AssetKey(["warehouse", "unified_record"])
TENANT_TAG = "medblocks/tenant"

_CHECK_DESCRIPTIONS = {
    "row_counts": "Row counts of every table against the previous build of this tenant: none "
    "emptied, none shrank by more than half (warns; tombstones shrink tables legitimately).",
    "every_row_has_person": "patient_links, facts and matched fact_mentions rows all belong to a "
    "person in `persons`.",
    "every_row_has_provenance": "Every ViewDefinition table and fact_sources row carries source, "
    "pattern, resource key and fetched_at; every fact has at least one source.",
    "referential_integrity": "fact_sources -> resources, patient_links -> resources, "
    "persons -> patient_links.",
    "quarantine_growth": "Quarantined rows grew by at most 5% of the newly landed resources (warns).",
    "views_compiled": "Every ViewDefinition (shipped and user) compiled and ran.",
    "network_rows_have_purpose": "Every network row (resources, versions, fact sources, view "
    "tables) carries the exchange purpose and the network query that obtained it.",
}

CHECK_SPECS = [
    dg.AssetCheckSpec(name=name, asset=WAREHOUSE_KEY, description=text)
    for name, text in _CHECK_DESCRIPTIONS.items()
]


def _previous_counts(context: dg.AssetExecutionContext, tenant: str) -> dict[str, int] | None:
    """Table counts of this tenant's previous successful build, from its materialization metadata."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=WAREHOUSE_KEY, asset_partitions=[tenant]), limit=1
    ).records
    if not records:
        return None
    mat = records[0].asset_materialization
    value = mat.metadata.get("table_counts") if mat is not None else None
    data: Any = getattr(value, "data", None) if value is not None else None
    if not isinstance(data, dict):
        return None
    return {str(k): int(v) for k, v in data.items()}


def _check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=outcome.name,
        asset_key=WAREHOUSE_KEY,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN
        if outcome.severity == "WARN"
        else dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata={"details": dg.MetadataValue.json(json.loads(json.dumps(outcome.metadata)))},
    )


_LAYER_KEYS = {
    "base_tables": BASE_TABLES_KEY,
    "views": VIEWS_KEY,
    "identity": IDENTITY_KEY,
    "unified_record": UNIFIED_KEY,
    "published": WAREHOUSE_KEY,
}
# build step name (lib/warehouse/build.py step timings) -> layer
_STEP_LAYER = {
    "base": "base_tables",
    "views_step": "views",
    "identity_step": "identity",
    "unified_step": "unified_record",
    "build_info_step": "published",
}


def _spec(key: dg.AssetKey, deps: list[dg.AssetKey], description: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key,
        deps=deps,
        group_name="warehouse",
        kinds={"duckdb"},
        owners=["team:data-platform"],
        tags={"medblocks/layer": "warehouse"},
        partitions_def=tenant_partitions,
        description=description,
    )


def warehouse_specs() -> list[dg.AssetSpec]:
    """The layers one build produces (a function: module-level specs would load as assets).

    ``base_tables`` gets every landing asset as a dep when the code location loads
    (``defs/warehouse/lineage.py``)."""
    return [
        _spec(
            BASE_TABLES_KEY,
            [],
            "The latest version of every landed resource (`resources`), all versions, tombstones, "
            "version conflicts, sightings, quarantine and pull history, read from the landing lake.",
        ),
        _spec(
            VIEWS_KEY,
            [BASE_TABLES_KEY],
            "One table per SQL-on-FHIR ViewDefinition (shipped and the tenant's own), with provenance "
            "columns; `view_errors` lists views that failed.",
        ),
        _spec(
            IDENTITY_KEY,
            [BASE_TABLES_KEY],
            "Identity: `persons`, `patient_links` (source patient -> person) and `identity_edges`.",
        ),
        _spec(
            UNIFIED_KEY,
            [BASE_TABLES_KEY, IDENTITY_KEY],
            "The unified record: deduplicated `facts`, their `fact_sources` and `fact_mentions`, and "
            "the `facts_*` views.",
        ),
        _spec(
            WAREHOUSE_KEY,
            [VIEWS_KEY, UNIFIED_KEY],
            "The tenant's published warehouse file (DuckDB), rebuilt from the landing lake in one "
            "build and published atomically, with its quality checks; analysts and the CDS service "
            "read the last published file.",
        ),
    ]


def _layer_metadata(
    layer: str, tables: dict[str, int], timings: dict[str, float]
) -> dict[str, Any]:
    seconds = sum(v for step, v in timings.items() if _STEP_LAYER.get(step) == layer)
    return {
        "table_counts": dg.MetadataValue.json(tables),
        "tables": len(tables),
        "dagster/row_count": sum(tables.values()),
        "duration_s": round(seconds, 3),
    }


@dg.multi_asset(
    name="warehouse__tenant_warehouse",
    specs=warehouse_specs(),
    partitions_def=tenant_partitions,
    # One build makes every layer in one file under one lock and publishes it atomically: the
    # layers are never materialized apart.
    can_subset=False,
    # No pool: a Dagster pool is one name for every partition, so one tenant's crashed build held
    # the slot for all tenants. Builds of one tenant are serialized by the build lock (file +
    # advisory) and the per-tenant `medblocks/tenant` run limit; runs of different tenants never
    # wait on each other.
    check_specs=CHECK_SPECS,
    description="Build one tenant's warehouse from the landing lake (all layers, one lock, one "
    "atomic publish) and check it.",
)
def tenant_warehouse(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult]:
    """Build the tenant's warehouse, check it, report each layer's row counts and a summary."""
    tenant = context.partition_key
    if context.run.tags.get(TENANT_TAG) != tenant:
        # runs started from the UI or a backfill get the tenant tag too (labels the run)
        context.instance.add_run_tags(context.run_id, {TENANT_TAG: tenant})
    previous = _previous_counts(context, tenant)
    result = build_warehouse(
        tenant,
        settings=platform.settings,
        control_plane=platform.control_plane,
        run_id=context.run_id,
    )
    with open_warehouse(tenant, settings=platform.settings) as con:
        outcomes = run_checks(con, result.table_counts, previous)
        headline = summary(con)
    by_layer = counts_by_layer(result.table_counts)
    for layer, key in _LAYER_KEYS.items():
        if key != WAREHOUSE_KEY:
            yield dg.MaterializeResult(
                asset_key=key,
                metadata=_layer_metadata(layer, by_layer[layer], result.step_timings),
            )
    yield dg.MaterializeResult(
        asset_key=WAREHOUSE_KEY,
        metadata=_published_metadata(result, headline, outcomes, platform),
        check_results=[_check_result(o) for o in outcomes],
    )


def _published_metadata(
    result: BuildResult,
    headline: dict[str, Any],
    outcomes: list[CheckOutcome],
    platform: PlatformResource,
) -> dict[str, Any]:
    counts = result.table_counts
    return {
        "path": dg.MetadataValue.path(str(result.path)),
        "duration_s": round(result.duration_s, 3),
        "step_timings_s": dg.MetadataValue.json(
            {k: round(v, 3) for k, v in result.step_timings.items()}
        ),
        "resources": counts.get("resources", 0),
        "quarantine": counts.get("quarantine", 0),
        "version_conflicts": counts.get("version_conflicts", 0),
        "persons": counts.get("persons", 0),
        "patient_links": counts.get("patient_links", 0),
        "facts": counts.get("facts", 0),
        "fact_sources": counts.get("fact_sources", 0),
        "dagster/row_count": counts.get("facts", 0),
        "table_counts": dg.MetadataValue.json(counts),
        "summary": dg.MetadataValue.md(summary_markdown(headline, counts, outcomes)),
        **(
            {"published": dg.MetadataValue.url(published_url(platform.settings, result.tenant))}
            if platform.settings.warehouse_url
            else {}
        ),
        **({"storage": dg.MetadataValue.json(result.storage)} if result.storage else {}),
    }


tenant_warehouse_job = dg.define_asset_job(
    "tenant_warehouse_job",
    selection=[tenant_warehouse],
    partitions_def=tenant_partitions,
    description="Rebuild one tenant's warehouse.",
)

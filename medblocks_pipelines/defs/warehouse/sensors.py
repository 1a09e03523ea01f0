"""Automation: rebuild a tenant's warehouse when new data lands, debounced.

``warehouse_on_landing_sensor`` watches materializations of every pattern's landing assets: the
parents of ``warehouse/base_tables`` in the asset graph (every asset tagged
``medblocks/layer: landing``; see ``lineage.py``). Each landing partition key starts with
the tenant (``tenant.org``, ``tenant.source``...). A tenant is rebuilt once its landings have been quiet
for ``MEDBLOCKS_WAREHOUSE_DEBOUNCE_S`` seconds (default 60), or at the latest
``MEDBLOCKS_WAREHOUSE_MAX_WAIT_S`` (default 600) after the first pending landing, so a burst of fifty
organization pulls gives one build rather than fifty. The cursor keeps, per landing asset, the last
storage id seen and, per tenant, the pending window; a crash between ticks loses nothing.
"""

import json
import time
from typing import Any

import dagster as dg

from medblocks_pipelines.defs.warehouse.assets import (
    BASE_TABLES_KEY,
    TENANT_TAG,
    tenant_warehouse_job,
)
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.partitions import split_partition_key
from medblocks_pipelines.lib.settings import Tuning


def landing_asset_keys(repository_def: dg.RepositoryDefinition) -> list[dg.AssetKey]:
    """The landing assets: the parents of ``warehouse/base_tables`` in the code location's asset
    graph (every asset tagged ``medblocks/layer: landing``, wired in ``lineage.py``)."""
    graph = repository_def.asset_graph
    if not graph.has(BASE_TABLES_KEY):
        return []
    return sorted(graph.get(BASE_TABLES_KEY).parent_keys, key=lambda k: k.to_user_string())


def plan_rebuilds(
    cursor: dict[str, Any],
    landings: list[tuple[str, int, str | None, float]],
    *,
    now: float,
    quiet_s: float,
    max_wait_s: float,
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Pure debounce logic.

    ``landings``: (asset key, storage id, partition key, timestamp) of new landing materializations.
    Returns the tenants to rebuild now as (tenant, newest storage id) and the new cursor.
    """
    after: dict[str, int] = dict(cursor.get("after", {}))
    pending: dict[str, dict[str, float]] = {
        k: dict(v) for k, v in cursor.get("pending", {}).items()
    }
    for key, storage_id, pkey, ts in landings:
        after[key] = max(after.get(key, 0), storage_id)
        if not pkey:
            continue
        tenant = split_partition_key(pkey)[0]
        p = pending.setdefault(tenant, {"first": ts, "last": ts, "storage_id": storage_id})
        p["first"] = min(p["first"], ts)
        p["last"] = max(p["last"], ts)
        p["storage_id"] = max(p["storage_id"], storage_id)
    due: list[tuple[str, int]] = []
    for tenant in sorted(pending):
        p = pending[tenant]
        if now - p["last"] >= quiet_s or now - p["first"] >= max_wait_s:
            due.append((tenant, int(p["storage_id"])))
    for tenant, _ in due:
        pending.pop(tenant)
    return due, {"after": after, "pending": pending}


@dg.sensor(
    job=tenant_warehouse_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Rebuilds a tenant's warehouse after new data landed for it (debounced).",
)
def warehouse_on_landing_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Request a warehouse build per tenant whose landings went quiet (or waited too long)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    after = cursor.get("after", {})
    landings: list[tuple[str, int, str | None, float]] = []
    repository_def = context.repository_def
    if repository_def is None:
        raise ConfigError("the sensor needs the code location's definitions to find landing assets")
    for key in landing_asset_keys(repository_def):
        name = key.to_user_string()
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after.get(name)),
            limit=1000,
            ascending=True,
        ).records
        for r in records:
            landings.append((name, r.storage_id, r.partition_key, r.timestamp))
    tuning = Tuning.from_env()
    due, new_cursor = plan_rebuilds(
        cursor,
        landings,
        now=time.time(),
        quiet_s=tuning.warehouse_debounce_s,  # MEDBLOCKS_WAREHOUSE_DEBOUNCE_S
        max_wait_s=tuning.warehouse_max_wait_s,  # MEDBLOCKS_WAREHOUSE_MAX_WAIT_S
    )
    known = set(context.instance.get_dynamic_partitions("tenants"))
    requests = []
    for tenant, storage_id in due:
        if tenant not in known:
            context.log.warning(f"landing for unknown tenant partition {tenant}; skipped")
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"warehouse:{tenant}:{storage_id}",
                partition_key=tenant,
                tags={TENANT_TAG: tenant},
            )
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(new_cursor, sort_keys=True))

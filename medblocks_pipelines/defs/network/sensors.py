"""Relationship-triggered network queries: a new encounter, appointment or EHR launch for a
person not queried recently starts a run for that person's (tenant, network) partitions.
"""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from medblocks_pipelines.defs.network.assets import network_query_job
from medblocks_pipelines.defs.shared.resources import PlatformResource
from medblocks_pipelines.defs.shared.sandbox_guard import without_stopped_sandboxes
from medblocks_pipelines.lib.network.scope import (
    default_purpose,
    partition_key,
    tenant_networks,
    triggered_persons,
)

#: A person queried within this window is not re-queried on a new event.
REQUERY_AFTER = timedelta(days=7)


@dg.sensor(
    name="network_relationship_sensor",
    job=network_query_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Starts a network query when a new relationship event (encounter, appointment, EHR "
    "launch) appears for a person not queried in the last 7 days. Never sweeps.",
)
def network_relationship_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    """Turn new relationship events into per-partition run requests (persons in run config)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    after_conn = datetime.fromisoformat(cursor["conn"]) if cursor.get("conn") else None
    cp = platform.control_plane
    now = datetime.now(UTC)
    found, event_cursor, conn_cursor = triggered_persons(
        cp,
        after_event_id=int(cursor.get("event", 0)),
        after_connection=after_conn,
        requery_after=REQUERY_AFTER,
        now=now,
    )
    new_cursor = json.dumps(
        {"event": event_cursor, "conn": conn_cursor.isoformat() if conn_cursor else None}
    )
    tenants = {t.id: t for t in cp.list_tenants()}
    existing = set(context.instance.get_dynamic_partitions("network_scopes"))
    requests = []
    for tenant_id, persons in sorted(found.items()):
        tenant = tenants.get(tenant_id)
        purpose = default_purpose(tenant) if tenant else None
        if tenant is None or purpose is None:
            continue
        for network in tenant_networks(cp, tenant):
            key = partition_key(tenant_id, network)
            if key not in existing:
                continue
            people = sorted(persons)
            requests.append(
                dg.RunRequest(
                    run_key=f"{key}:{new_cursor}",
                    partition_key=key,
                    run_config={
                        "ops": {
                            "network__query_results": {
                                "config": {
                                    "persons": people,
                                    "purpose": purpose,
                                    "trigger": "event",
                                    "actor": "medblocks-network-sensor",
                                }
                            }
                        }
                    },
                    tags={"medblocks/tenant": tenant_id, "medblocks/source": network},
                )
            )
    requests = without_stopped_sandboxes(context, cp, requests)
    if not requests:
        return dg.SensorResult(skip_reason="no new relationship events", cursor=new_cursor)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)

"""Map ``network_scopes`` partition keys back to (tenant, network) and find who needs a query."""

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.network.evidence import last_query_at
from medblocks_pipelines.lib.network.policy import tenant_network_settings
from medblocks_pipelines.lib.network.tables import aware, network_relationship_events
from medblocks_pipelines.lib.partitions import normalise_id, partition_key, split_partition_key
from medblocks_pipelines.lib.registry.rows import Tenant

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane


def resolve_scope(cp: "ControlPlane", key: str) -> tuple[str, str]:
    """``tenant.network`` partition key -> registry ids (keys are normalised, ids may not be)."""
    parts = split_partition_key(key)
    if len(parts) != 2:
        raise ConfigError(f"not a network scope partition key: {key!r}")
    tenant = next((t.id for t in cp.list_tenants() if normalise_id(t.id) == parts[0]), None)
    network = next(
        (s.id for s in cp.list_sources() if s.kind == "network" and normalise_id(s.id) == parts[1]),
        None,
    )
    if tenant is None or network is None:
        raise ConfigError(f"partition {key!r} does not match a registered tenant and network")
    return tenant, network


def tenant_networks(cp: "ControlPlane", tenant: Tenant) -> list[str]:
    """Networks a tenant queries: settings ``networks``, else every network source."""
    settings = tenant.settings or {}
    listed = settings.get("networks") or tenant_network_settings(settings).get("networks")
    if listed:
        return [str(n) for n in listed]
    return [s.id for s in cp.list_sources() if s.kind == "network"]


def default_purpose(tenant: Tenant) -> str | None:
    """The purpose event-triggered queries assert: ``network.default_purpose`` or T-TREAT if declared."""
    net = tenant_network_settings(tenant.settings)
    declared = net.get("purposes") or []
    purpose = net.get("default_purpose") or ("T-TREAT" if "T-TREAT" in declared else None)
    return purpose if purpose in declared else None


def triggered_persons(
    cp: "ControlPlane",
    *,
    after_event_id: int,
    after_connection: datetime | None,
    requery_after: timedelta,
    now: datetime,
) -> tuple[dict[str, dict[str, set[str]]], int, datetime | None]:
    """New relationship events and EHR launches since the cursors, by tenant -> person -> refs.

    Persons queried (allowed) within ``requery_after`` are left out: a launch every hour does not
    re-query the network every hour. Returns (found, new event cursor, new connection cursor).
    """
    found: dict[str, dict[str, set[str]]] = {}
    t = network_relationship_events
    max_event = after_event_id
    with cp.engine.connect() as c:
        rows = c.execute(sa.select(t).where(t.c.id > after_event_id).order_by(t.c.id)).all()
    for r in rows:
        max_event = max(max_event, int(r.id))
        found.setdefault(r.tenant_id, {}).setdefault(r.person_id, set()).add(f"rel:{r.id}")
    max_conn = after_connection
    for conn in cp.list_connections(pattern="clinician_workflow"):
        created = aware(conn.created_at)
        if created is None or (after_connection is not None and created <= after_connection):
            continue
        max_conn = created if max_conn is None or created > max_conn else max_conn
        person = conn.patient_ref or (conn.context or {}).get("patient")
        if person and conn.state != "failed":
            found.setdefault(conn.tenant_id, {}).setdefault(str(person), set()).add(conn.id)
    for tenant in list(found):
        for person in list(found[tenant]):
            last = last_query_at(cp, tenant=tenant, person=person)
            if last is not None and now - last < requery_after:
                del found[tenant][person]
        if not found[tenant]:
            del found[tenant]
    return found, max_event, max_conn


__all__ = [
    "default_purpose",
    "partition_key",
    "resolve_scope",
    "tenant_networks",
    "triggered_persons",
]

"""Facts the purpose-of-use policy decides on (:mod:`~.policy`): relationship evidence (EHR
launches, patient-access grants, recorded events) and the person's earlier queries."""

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from medblocks_pipelines.lib.network.policy import Evidence, PriorQuery
from medblocks_pipelines.lib.network.tables import (
    aware,
    network_queries,
    network_relationship_events,
    utcnow,
)
from medblocks_pipelines.lib.registry.rows import Connection


# -- facts for the policy --------------------------------------------------------------------------
def record_relationship_event(
    cp: Any,
    *,
    tenant: str,
    person: str,
    kind: str,
    ref: str,
    organization: str | None,
    at: datetime,
    detail: dict[str, Any] | None = None,
) -> int:
    """Record an encounter/appointment/order... for ``person`` (idempotent on ``ref``)."""
    t = network_relationship_events
    with cp.engine.begin() as conn:
        row = conn.execute(sa.select(t.c.id).where(t.c.tenant_id == tenant, t.c.ref == ref)).first()
        if row:
            return int(row.id)
        res = conn.execute(
            t.insert().values(
                tenant_id=tenant,
                person_id=person,
                kind=kind,
                ref=ref,
                organization_id=organization,
                at=at,
                recorded_at=utcnow(),
                detail=dict(detail or {}),
            )
        )
        return int(res.inserted_primary_key[0])


def _conn_person(conn: Connection) -> set[str]:
    ctx = conn.context or {}
    ids = {
        conn.patient_ref,
        conn.source_patient_id,
        ctx.get("person_id"),
        ctx.get("patient"),
    }
    return {str(i) for i in ids if i}


def gather_evidence(
    cp: Any, *, tenant: str, person: str, aliases: set[str] | None = None
) -> list[Evidence]:
    """Relationship evidence for ``person``: EHR launches, patient-access connections, events.

    ``aliases`` are other ids of the same person (its linked source patients); a connection or
    event recorded under any of them counts.
    """
    ids = {person, *(aliases or set())}
    out: list[Evidence] = []
    for conn in cp.list_connections(tenant_id=tenant, pattern="clinician_workflow"):
        if not ids & _conn_person(conn) or conn.state == "failed":
            continue
        out.append(
            Evidence(
                "ehr_launch",
                conn.id,
                aware(conn.created_at) or utcnow(),
                conn.organization_id,
            )
        )
    for conn in cp.list_connections(tenant_id=tenant, pattern="patient_access"):
        if not ids & _conn_person(conn):
            continue
        # The patient authenticated to the source themselves; only a live grant counts.
        out.append(
            Evidence(
                "patient_access",
                conn.id,
                aware(conn.created_at) or utcnow(),
                conn.organization_id,
                verified=conn.state == "active",
            )
        )
    t = network_relationship_events
    with cp.engine.connect() as c:
        for row in c.execute(sa.select(t).where(t.c.tenant_id == tenant, t.c.person_id.in_(ids))):
            out.append(
                Evidence(row.kind, f"rel:{row.id}", aware(row.at) or utcnow(), row.organization_id)
            )
    return out


def prior_queries(cp: Any, *, tenant: str, person: str, purpose: str) -> list[PriorQuery]:
    """Earlier allowed queries for the same person and purpose (for repeat rules)."""
    t = network_queries
    with cp.engine.connect() as c:
        rows = c.execute(
            sa.select(t).where(
                t.c.tenant_id == tenant,
                t.c.person_id == person,
                t.c.purpose == purpose,
                t.c.decision == "allowed",
            )
        ).all()
    return [PriorQuery(aware(r.at) or utcnow(), r.purpose, tuple(r.event_refs or [])) for r in rows]


def last_query_at(cp: Any, *, tenant: str, person: str) -> datetime | None:
    """When ``person`` was last queried (allowed) for this tenant, any purpose."""
    t = network_queries
    with cp.engine.connect() as c:
        v = c.execute(
            sa.select(sa.func.max(t.c.at)).where(
                t.c.tenant_id == tenant, t.c.person_id == person, t.c.decision == "allowed"
            )
        ).scalar()
    return aware(v)

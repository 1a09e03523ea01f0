"""Run one network query end to end: policy -> audit -> XCPD -> XCA -> C-CDA -> FHIR -> lake.

:func:`run_network_query` is shared by the CLI (``medblocks sync network``) and the Dagster
assets. A refused query never leaves the machine; allowed or refused, it is written to the audit
log (who, tenant, person, purpose, evidence, gateways asked, responders, documents, time). An
allowed query that then fails (before or while sending) or only partly succeeds gets a second,
appended audit row saying so (``lib.network.outcome``); the decision row is never rewritten to
look like something else.
"""

import hashlib
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from medblocks_pipelines.lib.errors import ConfigError, NotFound
from medblocks_pipelines.lib.fhir.compartment import PatientScope, patients_with_identifier
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.ccda import SourceDocument, binary_resources, convert_ccda
from medblocks_pipelines.lib.network.client import GatewayClient, GatewayConfig, GatewayOutcome
from medblocks_pipelines.lib.network.errors import UnsafeXMLError
from medblocks_pipelines.lib.network.outcome import audit_outcome, fail_and_audit, settle_status
from medblocks_pipelines.lib.network.policy import (
    Evidence,
    PolicyDecision,
    PolicyRequest,
    PriorQuery,
    evaluate,
    load_catalog,
    tenant_network_settings,
)
from medblocks_pipelines.lib.network.tables import (
    aware,
    network_documents,
    network_queries,
    network_relationship_events,
    utcnow,
)
from medblocks_pipelines.lib.registry.rows import Connection
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

log = logging.getLogger(__name__)

#: Default: an on-demand document is fetched again only after this long.
ON_DEMAND_REFRESH = timedelta(hours=24)


@dataclass
class QueryResult:
    """The outcome of :func:`run_network_query` (counts and our own ids only: safe to log)."""

    allowed: bool
    reason: str
    purpose: str
    query_id: int
    audit_id: int
    network: str | None = None
    status: str = "refused"  # refused | success | partial | failed
    gateways: list[str] = field(default_factory=list)
    responders: list[str] = field(default_factory=list)
    gateway_status: dict[str, str] = field(default_factory=dict)
    documents_retrieved: int = 0
    documents_skipped: int = 0
    documents_stored_binary: int = 0
    resources_by_type: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """A flat, PHI-free dict for Dagster metadata and the CLI."""
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "purpose": self.purpose,
            "status": self.status,
            "gateways": len(self.gateways),
            "responders": len(self.responders),
            "documents_retrieved": self.documents_retrieved,
            "documents_skipped": self.documents_skipped,
            "resources": sum(self.resources_by_type.values()),
            "quarantined": self.quarantined,
        }


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


# -- configuration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkConfig:
    """A network source: our identity in it and its responding gateways."""

    id: str
    home_community_id: str
    gateways: tuple[GatewayConfig, ...]
    max_parallel: int = 4
    signing_key_secret: str | None = None
    signing_cert_secret: str | None = None


def network_config(cp: Any, network: str | None, tenant_settings: dict[str, Any]) -> NetworkConfig:
    """Load the network source (``kind="network"``) named by ``network`` or by the tenant."""
    net = tenant_network_settings(tenant_settings)
    listed = tenant_settings.get("networks") or []
    network = network or net.get("network") or (listed[0] if len(listed) == 1 else None)
    if network is None:
        candidates = [s for s in cp.list_sources() if s.kind == "network"]
        if len(candidates) != 1:
            raise ConfigError(
                "no network named and not exactly one network source",
                hint="pass --network or set tenant settings network.network",
            )
        network = candidates[0].id
    try:
        src = cp.get_source(network)
    except NotFound:
        raise ConfigError(f"network source {network!r} is not registered") from None
    cfg = src.config or {}
    if not cfg.get("gateways"):
        raise ConfigError(f"network source {network!r} has no gateways configured")
    return NetworkConfig(
        id=src.id,
        home_community_id=ihe.as_urn(
            str(cfg.get("home_community_id", "urn:oid:2.16.840.1.113883.3.9999.100"))
        ),
        gateways=tuple(GatewayConfig.from_dict(g) for g in cfg["gateways"]),
        max_parallel=int(cfg.get("max_parallel", 4)),
        signing_key_secret=cfg.get("signing_key_secret"),
        signing_cert_secret=cfg.get("signing_cert_secret"),
    )


def _signing(cp: Any, cfg: NetworkConfig) -> tuple[bytes | None, bytes | None]:
    if not cfg.signing_key_secret or not cfg.signing_cert_secret:
        return None, None
    key, cert = cp.vault.get(cfg.signing_key_secret), cp.vault.get(cfg.signing_cert_secret)
    if key is None or cert is None:
        raise ConfigError(f"network {cfg.id}: signing key or certificate missing from the vault")
    return key.reveal().encode(), cert.reveal().encode()


def _warehouse_rows(
    settings: Settings, tenant: str, sql: str, params: list[Any]
) -> list[tuple[Any, ...]]:
    """Rows from the tenant's published warehouse, or nothing if it or the tables are missing."""
    import duckdb

    from medblocks_pipelines.lib.warehouse.build import current_warehouse_path

    path = current_warehouse_path(settings, tenant)
    if not path.exists():
        return []
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return []
    try:
        return con.execute(sql, params).fetchall()
    except duckdb.Error:
        return []
    finally:
        con.close()


def person_aliases(settings: Settings, *, tenant: str, person: str) -> set[str]:
    """``person`` plus the ids of the source patients the warehouse links to it.

    Connections carry the source's patient id (an EHR launch's patient); the unified record's
    person links many of them. Either may be what the caller calls "person".
    """
    rows = _warehouse_rows(
        settings,
        tenant,
        "SELECT r.resource_id FROM patient_links l JOIN resources r ON r.resource_key = l.patient_key "
        "WHERE l.person_id = ?",
        [person],
    )
    return {person, *(str(r[0]) for r in rows)}


def resolve_demographics(
    settings: Settings, *, tenant: str, person: str
) -> ihe.Demographics | None:
    """Find ``person``'s demographics for XCPD, never from the network itself.

    First the warehouse (a Patient linked to the person, or a Patient with that id or resource key
    ``source/Patient/id``), newest first; then the lake (the newest landed Patient with that id or
    key), for a person not yet in a build.
    """
    import json

    import duckdb

    from medblocks_pipelines.lib.warehouse.lake import resources_glob

    rows = _warehouse_rows(
        settings,
        tenant,
        "SELECT r.resource FROM resources r LEFT JOIN patient_links l ON l.patient_key = r.resource_key "
        "WHERE r.resource_type = 'Patient' AND r.pattern <> 'network' "
        "AND (l.person_id = ? OR r.resource_id = ? OR r.resource_key = ?) "
        "ORDER BY r.fetched_at DESC LIMIT 1",
        [person, person, person],
    )
    if rows:
        return ihe.Demographics.from_patient(json.loads(rows[0][0]))
    if settings.lake_url:
        from medblocks_pipelines.lib.warehouse.lake import mirror_tenant

        mirror_tenant(settings.lake_url, settings.lake_root, tenant)
    pattern = resources_glob(settings.lake_root, tenant)
    con = duckdb.connect()
    try:
        row = con.execute(
            "SELECT resource FROM read_parquet(?, hive_partitioning=true, union_by_name=true) "
            "WHERE resource_type = 'Patient' AND NOT deleted AND pattern <> 'network' "
            "AND (resource_id = ? OR source || '/Patient/' || resource_id = ?) "
            "ORDER BY fetched_at DESC LIMIT 1",
            [pattern, person, person],
        ).fetchone()
    except duckdb.Error:
        return None
    finally:
        con.close()
    return ihe.Demographics.from_patient(json.loads(row[0])) if row else None


# -- the query -------------------------------------------------------------------------------------
def _is_ccda(mime: str, content: bytes) -> bool:
    head = content[:2048].lstrip()
    return ("xml" in mime or mime == "application/octet-stream") and b"ClinicalDocument" in head


def run_network_query(
    cp: Any,
    settings: Settings,
    *,
    tenant: str,
    person: str,
    purpose: str,
    actor: str,
    demographics: ihe.Demographics | None = None,
    network: str | None = None,
    trigger: str = "request",
    retry_reason: str | None = None,
    run_id: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    now: datetime | None = None,
) -> QueryResult:
    """Decide, audit and (if allowed) run one network query for ``person`` under ``purpose``.

    Never raises for a refusal: the result says ``allowed=False`` with the reason. Raises
    :class:`ConfigError` when the tenant or network is not configured for network queries.
    """
    now = now or datetime.now(UTC)
    run_id = run_id or f"net-{uuid.uuid4().hex[:12]}"
    tenant_row = cp.get_tenant(tenant)
    tsettings = tenant_row.settings or {}
    net = tenant_network_settings(tsettings)
    catalog = load_catalog(net.get("catalog_version"))
    aliases = person_aliases(settings, tenant=tenant, person=person)
    evidence = gather_evidence(cp, tenant=tenant, person=person, aliases=aliases)
    decision: PolicyDecision = evaluate(
        PolicyRequest(
            tenant=tenant,
            tenant_settings=tsettings,
            person=person,
            purpose=purpose,
            evidence=tuple(evidence),
            prior_queries=tuple(prior_queries(cp, tenant=tenant, person=person, purpose=purpose)),
            trigger=trigger,
            retry_reason=retry_reason,
            now=now,
        ),
        catalog,
    )
    ev_doc = {
        "catalog_version": catalog.version,
        "trigger": trigger,
        "relied_on": [e.to_dict() for e in decision.evidence],
        "available": len(evidence),
        # TEFCA wants requestor and NPI per request (SPECS 5.5); the SAML is in network_queries.
        "requestor": {
            "actor": actor,
            "organization": net.get("organization"),
            "npi": net.get("npi"),
        },
    }
    cfg: NetworkConfig | None = None
    if decision.allowed:
        cfg = network_config(cp, network, tsettings)
    gateway_ids = [g.id for g in cfg.gateways] if cfg else []
    audit_id = cp.audit(
        tenant_id=tenant,
        actor=actor,
        action="network.query",
        decision=decision.decision,
        person_id=person,
        purpose=purpose,
        reason=decision.reason,
        evidence=ev_doc,
        gateways=gateway_ids,
    )
    t = network_queries
    with cp.engine.begin() as conn:
        query_id = int(
            conn.execute(
                t.insert().values(
                    tenant_id=tenant,
                    network_id=cfg.id if cfg else network,
                    person_id=person,
                    purpose=purpose,
                    actor=actor,
                    trigger=trigger,
                    decision=decision.decision,
                    reason=decision.reason,
                    audit_id=audit_id,
                    run_id=run_id,
                    status="running" if decision.allowed else "refused",
                    event_refs=[e.ref for e in decision.evidence],
                    exchanges=[],
                    counts={},
                    at=now,
                    finished_at=None if decision.allowed else now,
                )
            ).inserted_primary_key[0]
        )
    result = QueryResult(
        decision.allowed, decision.reason, purpose, query_id, audit_id, cfg.id if cfg else network
    )
    if not decision.allowed or cfg is None:
        return result

    pull_id = cp.start_pull(tenant_id=tenant, pattern="network", source_id=cfg.id, run_id=run_id)
    outcomes: list[GatewayOutcome] = []
    try:
        demo = demographics or resolve_demographics(settings, tenant=tenant, person=person)
        if demo is None:
            raise ConfigError(f"no demographics for person {person!r} in tenant {tenant!r}")
        key_pem, cert_pem = _signing(cp, cfg)
        rule = decision.rule
        sec = ihe.SecurityContext(
            subject_id=actor,
            organization=str(net.get("organization_name") or net.get("organization") or tenant),
            organization_id=ihe.as_urn(str(net.get("organization_oid") or cfg.home_community_id)),
            home_community_id=cfg.home_community_id,
            purpose=purpose,
            purpose_display=rule.display if rule else purpose,
            npi=net.get("npi"),
            tin=net.get("tin"),
            key_pem=key_pem,
            cert_pem=cert_pem,
        )
        date_from = None
        if rule is not None and rule.requires_date_range:
            # Treatment XP SOP: a QHIN query for T-TRTMNT must carry a date range.
            years = int(net.get("date_range_years", 5))
            date_from = (now - timedelta(days=365 * years)).strftime("%Y%m%d")
        refresh = timedelta(
            hours=float(
                net.get("on_demand_refresh_hours", ON_DEMAND_REFRESH.total_seconds() / 3600)
            )
        )
        known = _known_documents(cp, tenant)

        def should_fetch(entry: ihe.DocumentEntry) -> bool:
            fetched = known.get(entry.key)
            if fetched is None:
                return True
            return entry.on_demand and now - fetched > refresh

        client = GatewayClient(sec, transport=transport, max_parallel=cfg.max_parallel)
        outcomes = client.run_sync(
            list(cfg.gateways), demo, should_fetch=should_fetch, date_from=date_from
        )
        _land(cp, settings, tenant, person, cfg, outcomes, query_id, run_id, result)
    except Exception as exc:
        fail_and_audit(
            cp,
            lambda error: _finish(cp, result, query_id, pull_id, outcomes, error=error),
            tenant=tenant,
            actor=actor,
            person=person,
            result=result,
            query_id=query_id,
            error=type(exc).__name__,
            sent=bool(outcomes),
        )
        raise
    settle_status(result, (o.status for o in outcomes))
    _finish(cp, result, query_id, pull_id, outcomes)
    audit_outcome(cp, tenant=tenant, actor=actor, person=person, result=result, query_id=query_id)
    return result


def _known_documents(cp: Any, tenant: str) -> dict[tuple[str, str, str], datetime]:
    t = network_documents
    with cp.engine.connect() as c:
        rows = c.execute(
            sa.select(
                t.c.home_community_id,
                t.c.repository_unique_id,
                t.c.document_unique_id,
                t.c.fetched_at,
            ).where(t.c.tenant_id == tenant)
        ).all()
    return {(r[0], r[1], r[2]): aware(r[3]) or utcnow() for r in rows}


def _land(
    cp: Any,
    settings: Settings,
    tenant: str,
    person: str,
    cfg: NetworkConfig,
    outcomes: list[GatewayOutcome],
    query_id: int,
    run_id: str,
    result: QueryResult,
) -> None:
    by_type: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for out in outcomes:
        result.gateways.append(out.gateway)
        result.gateway_status[out.gateway] = out.status
        if out.responded or out.documents:
            result.responders.append(out.gateway)
        for e in out.errors:
            errors[e] += 1
        result.documents_skipped += len(out.skipped)
        if not out.documents:
            continue
        org = out.organization or out.home_community_id
        entries = {e.key: e for e in out.entries}
        prov = Provenance(
            tenant=tenant,
            pattern="network",
            source=cfg.id,
            organization=org,
            connection=None,
            run_id=run_id,
            # Why we were allowed to get these rows, for the consumers' read policy
            # (lib/warehouse/read_policy.py): the audited purpose and query.
            permitted_purpose=result.purpose,
            network_query_id=str(query_id),
        )
        # Converted documents land under the person's scope: what a document's record target
        # (matched against this gateway's XCPD matches) owns, never another patient's records.
        # Raw documents (PDFs) carry nothing to check and land as DocumentReference + Binary.
        scope = PatientScope(frozenset())
        wanted = [(m.assigning_authority, m.patient_id) for m in out.matches]
        with (
            LakeWriter(settings.lake, prov, patient_scope=scope) as w,
            LakeWriter(settings.lake, prov) as raw,
        ):
            for doc in out.documents:
                entry = entries.get(doc.key)
                on_demand = bool(entry and entry.on_demand)
                # On-demand: the snapshot id is the stored document's identity.
                doc_uid = doc.new_document_unique_id or doc.document_unique_id
                repo = doc.new_repository_unique_id or doc.repository_unique_id
                source = SourceDocument(out.home_community_id, repo, doc_uid, doc.mime_type, org)
                origin = f"{out.home_community_id}|{repo}|{doc_uid}"
                status, n_res, n_q = "stored", 0, 0
                if _is_ccda(doc.mime_type, doc.content):
                    try:
                        conv = convert_ccda(doc.content, source)
                    except (UnsafeXMLError, ValueError) as exc:
                        w.quarantine(
                            doc.content,
                            f"C-CDA refused: {exc}",
                            resource_type="DocumentReference",
                            origin=origin,
                        )
                        status, n_q = "quarantined", 1
                    else:
                        scope.allow(patients_with_identifier(conv.resources, wanted))
                        for res in conv.resources:
                            if w.add(res, origin=origin):
                                by_type[res["resourceType"]] += 1
                                n_res += 1
                            else:  # outside the matched patient's compartment
                                n_q += 1
                        for qd in conv.quarantined:
                            w.quarantine(
                                qd.raw, qd.reason, resource_type=qd.resource_type, origin=qd.origin
                            )
                            n_q += 1
                        # Keep the source document itself beside what was extracted from it.
                        _docref, binary = binary_resources(doc.content, source, patient_ref=None)
                        if w.add(binary, origin=origin):
                            by_type["Binary"] += 1
                        status = "converted"
                else:
                    patient_ref = None
                    for r in binary_resources(doc.content, source, patient_ref=patient_ref):
                        if raw.add(r, origin=origin):
                            by_type[r["resourceType"]] += 1
                            n_res += 1
                    result.documents_stored_binary += 1
                result.documents_retrieved += 1
                result.quarantined += n_q
                _register(
                    cp,
                    tenant,
                    cfg.id,
                    person,
                    org,
                    doc,
                    entry,
                    on_demand,
                    status,
                    n_res,
                    n_q,
                    query_id,
                )
    result.resources_by_type = dict(by_type)
    result.errors = dict(errors)


def _register(
    cp: Any,
    tenant: str,
    network: str,
    person: str,
    org: str,
    doc: ihe.RetrievedDocument,
    entry: ihe.DocumentEntry | None,
    on_demand: bool,
    status: str,
    n_res: int,
    n_q: int,
    query_id: int,
) -> None:
    t = network_documents
    key = {
        "tenant_id": tenant,
        "home_community_id": doc.home_community_id,
        "repository_unique_id": doc.repository_unique_id,
        "document_unique_id": doc.document_unique_id,
    }
    values = {
        "network_id": network,
        "person_id": person,
        "organization": org,
        "mime_type": doc.mime_type,
        "on_demand": on_demand,
        "new_document_unique_id": doc.new_document_unique_id,
        "size": len(doc.content),
        "sha256": hashlib.sha256(doc.content).hexdigest(),
        "status": status,
        "resources": n_res,
        "quarantined": n_q,
        "query_id": query_id,
        "fetched_at": utcnow(),
    }
    cond = sa.and_(*(t.c[k] == v for k, v in key.items()))
    try:
        with cp.engine.begin() as conn:
            conn.execute(t.insert().values(**key, **values))
    except sa.exc.IntegrityError:
        # Already registered (an on-demand refresh, or a concurrent run for the same person).
        with cp.engine.begin() as conn:
            conn.execute(t.update().where(cond).values(**values))


def _finish(
    cp: Any,
    result: QueryResult,
    query_id: int,
    pull_id: int,
    outcomes: list[GatewayOutcome],
    *,
    error: str | None = None,
) -> None:
    documents = [
        {
            "home_community_id": o.home_community_id,
            "document_unique_id": d.new_document_unique_id or d.document_unique_id,
            "mime_type": d.mime_type,
        }
        for o in outcomes
        for d in o.documents
    ]
    exchanges = [
        {**vars(x), "assertion": o.assertion if i == 0 else None}
        for o in outcomes
        for i, x in enumerate(o.exchanges)
    ]
    counts = {
        "gateways": len(result.gateways),
        "responders": len(result.responders),
        "documents": result.documents_retrieved,
        "documents_skipped": result.documents_skipped,
        "resources": sum(result.resources_by_type.values()),
        "quarantined": result.quarantined,
    }
    cp.update_audit(result.audit_id, responders=list(result.responders), documents=documents)
    t = network_queries
    with cp.engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.id == query_id)
            .values(status=result.status, exchanges=exchanges, counts=counts, finished_at=utcnow())
        )
    pull_status = {"success": "success", "partial": "partial"}.get(result.status, "failed")
    cp.finish_pull(pull_id, status=pull_status, counts=counts, error=error)

"""Run one network query end to end: policy -> audit -> XCPD -> XCA -> C-CDA -> FHIR -> lake.

:func:`run_network_query` is shared by the CLI (``medblocks sync network``) and the Dagster
assets. A refused query never leaves the machine; allowed or refused, it is written to the audit
log (who, tenant, person, purpose, evidence, gateways asked, responders, documents, time). An
allowed query that then fails (before or while sending) or only partly succeeds gets a second,
appended audit row saying so (``lib.network.outcome``); the decision row is never rewritten to
look like something else.

The steps it runs live beside it: :mod:`~.evidence` (facts for the policy), :mod:`~.config` (the
network source), :mod:`~.demographics` (who the query is about), :mod:`~.landing` (documents into
the lake and the registry).
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.client import GatewayClient, GatewayOutcome
from medblocks_pipelines.lib.network.config import NetworkConfig, network_config, signing_identity
from medblocks_pipelines.lib.network.demographics import person_aliases, resolve_demographics
from medblocks_pipelines.lib.network.evidence import gather_evidence, prior_queries
from medblocks_pipelines.lib.network.landing import known_documents, land_documents
from medblocks_pipelines.lib.network.outcome import audit_outcome, fail_and_audit, settle_status
from medblocks_pipelines.lib.network.policy import (
    PolicyDecision,
    PolicyRequest,
    evaluate,
    load_catalog,
    tenant_network_settings,
)
from medblocks_pipelines.lib.network.tables import network_queries, utcnow
from medblocks_pipelines.lib.settings import Settings

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


# -- the query -------------------------------------------------------------------------------------


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
        key_pem, cert_pem = signing_identity(cp, cfg)
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
        known = known_documents(cp, tenant)

        def should_fetch(entry: ihe.DocumentEntry) -> bool:
            fetched = known.get(entry.key)
            if fetched is None:
                return True
            return entry.on_demand and now - fetched > refresh

        client = GatewayClient(sec, transport=transport, max_parallel=cfg.max_parallel)
        outcomes = client.run_sync(
            list(cfg.gateways), demo, should_fetch=should_fetch, date_from=date_from
        )
        land_documents(cp, settings, tenant, person, cfg, outcomes, query_id, run_id, result)
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

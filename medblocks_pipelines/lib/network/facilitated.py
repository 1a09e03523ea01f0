"""TEFCA Facilitated FHIR: one policy-checked, audited query over FHIR + UDAP, beside XCPD/XCA.

:func:`run_facilitated_query` goes: purpose-of-use policy (the same :func:`policy.evaluate` and
evidence as the IHE query) -> audit row (allowed or refused; a refusal never leaves the machine)
-> directory (nodes answering the purpose over ``hl7-fhir-rest``) -> per node, in parallel under
one deadline: UDAP discovery + registration (once, stored) + a B2B token bound to (requestor,
purpose) -> ``Patient/$match`` -> US Core searches -> landing through ``LakeWriter`` (pattern
``network``, organization = the node) -> per-node statuses in the result, the audit row and the
``network_queries`` record.

The network source's ``config["facilitated_fhir"]`` block configures it::

    {"directory_url": ..., "community": "urn:oid:2.16.840.1.113883.3.7204.1.5",
     "trust_anchor_pem": "..." | "trust_anchor_secret": "vault name", "identity": "acme",
     "timeout_s": 10, "max_parallel": 8, "client_name": ..., "contacts": ["mailto:..."],
     "check_revocation": true, "directory_api_key_secret": null, "resource_types": [...]}

``identity`` names our UDAP certificate and key in the vault (:mod:`.udap.certs`).
"""

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography import x509

from medblocks_pipelines.lib.errors import ConfigError, NotFound, NoUdap
from medblocks_pipelines.lib.fhir.client import FhirClient, dumps_exact
from medblocks_pipelines.lib.fhir.compartment import PatientScope
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.demographics import person_aliases, resolve_demographics
from medblocks_pipelines.lib.network.evidence import gather_evidence, prior_queries
from medblocks_pipelines.lib.network.fhir_nodes import (
    US_CORE_TYPES,
    NodeEndpoint,
    NodeOutcome,
    double_check,
    fan_out,
    find_nodes,
    match_patient,
    pull_us_core,
)
from medblocks_pipelines.lib.network.outcome import audit_outcome, fail_and_audit, settle_status
from medblocks_pipelines.lib.network.policy import (
    PolicyRequest,
    evaluate,
    load_catalog,
    tenant_network_settings,
)
from medblocks_pipelines.lib.network.query import QueryResult
from medblocks_pipelines.lib.network.tables import network_queries, utcnow
from medblocks_pipelines.lib.network.udap.certs import VaultSigner, load_pem_chain
from medblocks_pipelines.lib.network.udap.discovery import TEFCA_COMMUNITY
from medblocks_pipelines.lib.network.udap.registration import ClientProfile
from medblocks_pipelines.lib.network.udap.session import UdapSession
from medblocks_pipelines.lib.network.udap.token import (
    Requestor,
    b2b_extension,
    tefca_ias_extension,
)
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

TRANSPORT = "facilitated_fhir"
NPI_OID = "urn:oid:2.16.840.1.113883.4.6"


@dataclass(frozen=True)
class FacilitatedConfig:
    """The ``facilitated_fhir`` block of a network source."""

    network: str
    directory_url: str
    identity: str
    anchors_pem: str
    community: str = TEFCA_COMMUNITY
    timeout_s: float = 10.0
    max_parallel: int = 8
    client_name: str = "medblocks"
    contacts: tuple[str, ...] = ("mailto:ops@medblocks.invalid",)
    check_revocation: bool = True
    directory_api_key: str | None = None
    resource_types: tuple[str, ...] = US_CORE_TYPES
    home_community_id: str | None = None


def facilitated_config(
    cp: Any, network: str | None, tenant_settings: dict[str, Any]
) -> FacilitatedConfig:
    """Load the network source named by ``network`` (or the tenant's) and its FHIR block."""
    net = tenant_network_settings(tenant_settings)
    network = network or net.get("network")
    if network is None:
        found = [
            s
            for s in cp.list_sources()
            if s.kind == "network" and (s.config or {}).get("facilitated_fhir")
        ]
        if len(found) != 1:
            raise ConfigError("no network named and not exactly one Facilitated FHIR network")
        network = found[0].id
    try:
        src = cp.get_source(network)
    except NotFound:
        raise ConfigError(f"network source {network!r} is not registered") from None
    block = (src.config or {}).get("facilitated_fhir")
    if not isinstance(block, dict) or not block.get("directory_url"):
        raise ConfigError(f"network {network!r} has no facilitated_fhir.directory_url")
    anchors = block.get("trust_anchor_pem")
    if not anchors and block.get("trust_anchor_secret"):
        secret = cp.vault.get(block["trust_anchor_secret"])
        anchors = secret.reveal() if secret is not None else None
    if not anchors:
        raise ConfigError(f"network {network!r}: no UDAP trust anchor configured")
    api_key = None
    if block.get("directory_api_key_secret"):
        secret = cp.vault.get(block["directory_api_key_secret"])
        api_key = secret.reveal() if secret is not None else None
    return FacilitatedConfig(
        network=src.id,
        directory_url=str(block["directory_url"]),
        identity=str(block.get("identity") or src.id),
        anchors_pem=str(anchors),
        community=str(block.get("community") or TEFCA_COMMUNITY),
        timeout_s=float(block.get("timeout_s", 10.0)),
        max_parallel=int(block.get("max_parallel", 8)),
        client_name=str(block.get("client_name", "medblocks")),
        contacts=tuple(block.get("contacts") or ("mailto:ops@medblocks.invalid",)),
        check_revocation=bool(block.get("check_revocation", True)),
        directory_api_key=api_key,
        resource_types=tuple(block.get("resource_types") or US_CORE_TYPES),
        home_community_id=(src.config or {}).get("home_community_id"),
    )


def open_session(
    cp: Any, cfg: FacilitatedConfig, *, http: httpx.Client | None = None
) -> UdapSession:
    """A UDAP session for ``cfg`` (keep it across queries to reuse tokens; close ``.http``)."""
    anchors: list[x509.Certificate] = load_pem_chain(cfg.anchors_pem.encode())
    return UdapSession(
        network=cfg.network,
        vault=cp.vault,
        signer=VaultSigner(cp.vault, cfg.identity),
        anchors=anchors,
        profile=ClientProfile(
            client_name=cfg.client_name,
            contacts=cfg.contacts,
            home_community_id=cfg.home_community_id,
        ),
        http=http or httpx.Client(),
        community=cfg.community,
        check_revocation=cfg.check_revocation,
    )


@dataclass
class FhirQueryResult(QueryResult):
    """:class:`QueryResult` plus what is particular to FHIR (per-node outcomes, tokens)."""

    transport: str = TRANSPORT
    nodes: list[dict[str, Any]] = field(default_factory=list)
    matched: int = 0
    elapsed_s: float = 0.0

    def as_metadata(self) -> dict[str, Any]:
        """PHI-free counts, with the node statuses."""
        meta = super().as_metadata()
        meta.update(
            {
                "transport": self.transport,
                "matched": self.matched,
                "node_status": dict(Counter(self.gateway_status.values())),
            }
        )
        return meta


def _requestor(net: dict[str, Any], actor: str, purpose: str, tenant: str) -> Requestor:
    name = str(net.get("organization_name") or net.get("organization") or tenant)
    npi = net.get("npi")
    if npi and purpose in ("T-TREAT", "T-TRTMNT"):
        # Treatment XP SOP (FHIR): the NPI/TIN go into organization_name.
        name = f"{name} (NPI {npi}{', TIN ' + str(net['tin']) if net.get('tin') else ''})"
    org_id = net.get("rce_organization_id") or (
        f"urn:oid:{net['organization_oid']}" if net.get("organization_oid") else None
    )
    return Requestor(
        organization_name=name,
        organization_id=str(org_id or f"urn:medblocks:tenant:{tenant}"),
        subject_name=actor,
        subject_id=f"{NPI_OID}#{npi}" if npi else None,  # [verify] NPI URI form
        consent_policy=tuple(net.get("consent_policy") or ()),
    )


def _record(cp: Any, **values: Any) -> int:
    with cp.engine.begin() as conn:
        return int(conn.execute(network_queries.insert().values(**values)).inserted_primary_key[0])


def run_facilitated_query(
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
    id_token: str | None = None,
    run_id: str | None = None,
    session: UdapSession | None = None,
    http: httpx.Client | None = None,
    now: datetime | None = None,
) -> FhirQueryResult:
    """Decide, audit and (if allowed) run one Facilitated FHIR query for ``person``.

    Never raises for a refusal (``allowed=False`` with the reason; nothing is sent). T-IAS needs
    ``id_token`` (the identity provider's IAL2 token): without it the query is refused locally.
    ``session`` reuses registrations and tokens across queries (the Dagster asset keeps one).
    """
    now = now or datetime.now(UTC)
    run_id = run_id or f"fhirnet-{uuid.uuid4().hex[:12]}"
    tsettings = cp.get_tenant(tenant).settings or {}
    net = tenant_network_settings(tsettings)
    catalog = load_catalog(net.get("catalog_version"))
    aliases = person_aliases(settings, tenant=tenant, person=person)
    evidence = gather_evidence(cp, tenant=tenant, person=person, aliases=aliases)
    decision = evaluate(
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
    allowed, reason = decision.allowed, decision.reason
    if allowed and purpose == "T-IAS" and not id_token:
        # tefca_ias requires the CSP's IAL2 id_token: a request without it would be refused.
        allowed, reason = False, "no_ial2_id_token"
    cfg = facilitated_config(cp, network, tsettings) if allowed else None
    nodes: list[NodeEndpoint] = []
    own_session = session is None and cfg is not None
    if cfg is not None:
        session = session or open_session(cp, cfg, http=http)
        nodes = find_nodes(session.http, cfg.directory_url, purpose, api_key=cfg.directory_api_key)
    ev_doc = {
        "catalog_version": catalog.version,
        "trigger": trigger,
        "transport": TRANSPORT,
        "relied_on": [e.to_dict() for e in decision.evidence],
        "available": len(evidence),
        "requestor": {
            "actor": actor,
            "organization": net.get("organization"),
            "npi": net.get("npi"),
        },
    }
    requestor = _requestor(net, actor, purpose, tenant)
    if allowed:
        # What every node is told (SPECS 5.5: requestor, XP and NPI per request, for audit).
        ev_doc["hl7_b2b"] = b2b_extension(requestor, purpose)
    decision_word = "allowed" if allowed else "refused"
    audit_id = cp.audit(
        tenant_id=tenant,
        actor=actor,
        action="network.query",
        decision=decision_word,
        person_id=person,
        purpose=purpose,
        reason=reason,
        evidence=ev_doc,
        gateways=[n.id for n in nodes],
    )
    query_id = _record(
        cp,
        tenant_id=tenant,
        network_id=cfg.network if cfg else network,
        person_id=person,
        purpose=purpose,
        actor=actor,
        trigger=trigger,
        decision=decision_word,
        reason=reason,
        audit_id=audit_id,
        run_id=run_id,
        status="running" if allowed else "refused",
        event_refs=[e.ref for e in decision.evidence],
        exchanges=[],
        counts={},
        at=now,
        finished_at=None if allowed else now,
    )
    result = FhirQueryResult(
        allowed, reason, purpose, query_id, audit_id, cfg.network if cfg else network
    )
    if not allowed or cfg is None or session is None:
        return result
    pull_id = cp.start_pull(
        tenant_id=tenant, pattern="network", source_id=cfg.network, run_id=run_id
    )
    outcomes: list[NodeOutcome] = []
    started = time.monotonic()
    try:
        demo = demographics or resolve_demographics(settings, tenant=tenant, person=person)
        if demo is None:
            raise ConfigError(f"no demographics for person {person!r} in tenant {tenant!r}")
        ias = None
        if purpose == "T-IAS":
            from medblocks_pipelines.lib.network.fhir_nodes import idi_patient

            ias = tefca_ias_extension(id_token=str(id_token), patient=idi_patient(demo))
        # One client for every node (thread-safe; building one costs a TLS context). The purpose
        # travels with every request (the sandbox refuses a token used for another purpose).
        with httpx.Client(
            headers={"X-Purpose-Of-Use": purpose},
            timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=4 * max(1, cfg.max_parallel)),
        ) as fhir_http:
            outcomes = fan_out(
                nodes,
                _node_work(session, fhir_http, cfg, requestor, purpose, demo, ias),
                timeout_s=cfg.timeout_s,
                max_parallel=cfg.max_parallel,
            )
        result.elapsed_s = time.monotonic() - started
        _land(settings, tenant, cfg, outcomes, run_id, result)
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
    finally:
        if own_session and session is not None and http is None:
            session.http.close()
    settle_status(result, (o.status for o in outcomes))
    _finish(cp, result, query_id, pull_id, outcomes)
    audit_outcome(cp, tenant=tenant, actor=actor, person=person, result=result, query_id=query_id)
    return result


def _node_work(
    session: UdapSession,
    http: httpx.Client,
    cfg: FacilitatedConfig,
    requestor: Requestor,
    purpose: str,
    demo: ihe.Demographics,
    ias: dict[str, Any] | None,
) -> Any:
    def work(node: NodeEndpoint, out: NodeOutcome) -> None:
        try:
            tokens = session.tokens_for(
                node.id, node.fhir_base, requestor, purpose, ias=ias, timeout=cfg.timeout_s
            )
        except NoUdap:
            out.status = "no_udap"
            return
        fhir = FhirClient(
            node.fhir_base,
            http=http,
            tokens=tokens,
            max_retries=1,
            backoff=0.2,
            timeout=cfg.timeout_s,
        )
        try:
            patient = match_patient(fhir, http, tokens.access_token(), demo, out)
            if patient is None:
                return
            if purpose == "T-IAS" and not double_check(patient, demo):
                # IAS Demographics Double-Check failed: reject, keep nothing.
                out.status = "mismatch"
                return
            out.patient_id = str(patient["id"])
            out.resources.append(patient)
            pull_us_core(fhir, out.patient_id, cfg.resource_types, out)
        finally:
            out.requests += fhir.stats.requests

    return work


def _land(
    settings: Settings,
    tenant: str,
    cfg: FacilitatedConfig,
    outcomes: list[NodeOutcome],
    run_id: str,
    result: FhirQueryResult,
) -> None:
    by_type: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for out in outcomes:
        result.gateways.append(out.node)
        result.gateway_status[out.node] = out.status
        result.nodes.append(out.summary())
        for e in out.errors:
            errors[e] += 1
        if out.status in ("ok", "no_match", "ambiguous", "mismatch"):
            result.responders.append(out.node)
        if out.status != "ok" or not out.resources:
            continue
        result.matched += 1
        prov = Provenance(
            tenant=tenant,
            pattern="network",
            source=cfg.network,
            organization=out.node,
            connection=None,
            run_id=run_id,
            # The rows remember the purpose and the query that let them in (the read policy).
            permitted_purpose=result.purpose,
            network_query_id=str(result.query_id),
        )
        # Only the matched patient's records land: the landing writer's patient scope (the R4
        # Patient compartment, lib/fhir/compartment.py) quarantines anything a node returns about
        # another patient as `outside_patient_compartment`, the same check as every
        # patient-scoped pull.
        scope = PatientScope.of(str(out.patient_id))
        with LakeWriter(settings.lake, prov, patient_scope=scope) as w:
            for res in out.resources:
                rtype = str(res.get("resourceType"))
                origin = f"fhir|{out.node}|{rtype}/{res.get('id')}"
                text = dumps_exact(res)  # decimals digit for digit (FhirClient parses exactly)
                if w.add(text, origin=origin):
                    by_type[rtype] += 1
                else:
                    result.quarantined += 1
    result.resources_by_type = dict(by_type)
    result.errors = dict(errors)


def _finish(
    cp: Any,
    result: FhirQueryResult,
    query_id: int,
    pull_id: int,
    outcomes: list[NodeOutcome],
    *,
    error: str | None = None,
) -> None:
    counts = {
        "transport": TRANSPORT,
        "nodes": len(outcomes),
        "responders": len(result.responders),
        "matched": result.matched,
        "resources": sum(result.resources_by_type.values()),
        "quarantined": result.quarantined,
        "node_status": dict(Counter(o.status for o in outcomes)),
    }
    cp.update_audit(
        result.audit_id,
        responders=list(result.responders),
        documents=[
            {"node": o.node, "status": o.status, "resources": len(o.resources)} for o in outcomes
        ],
    )
    with cp.engine.begin() as conn:
        conn.execute(
            network_queries.update()
            .where(network_queries.c.id == query_id)
            .values(
                status=result.status,
                exchanges=[o.summary() for o in outcomes],
                counts=counts,
                finished_at=utcnow(),
            )
        )
    pull_status = {"success": "success", "partial": "partial"}.get(result.status, "failed")
    cp.finish_pull(pull_id, status=pull_status, counts=counts, error=error)

"""Retrieved XCA documents into the lake and the document registry: C-CDA converted to FHIR
under the matched patient's scope, anything else kept as DocumentReference + Binary."""

import hashlib
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from medblocks_pipelines.lib.fhir.compartment import PatientScope, patients_with_identifier
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.ccda import SourceDocument, binary_resources, convert_ccda
from medblocks_pipelines.lib.network.client import GatewayOutcome
from medblocks_pipelines.lib.network.config import NetworkConfig
from medblocks_pipelines.lib.network.errors import UnsafeXMLError
from medblocks_pipelines.lib.network.tables import aware, network_documents, utcnow
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

if TYPE_CHECKING:  # query.py imports this module
    from medblocks_pipelines.lib.network.query import QueryResult


def _is_ccda(mime: str, content: bytes) -> bool:
    head = content[:2048].lstrip()
    return ("xml" in mime or mime == "application/octet-stream") and b"ClinicalDocument" in head


def known_documents(cp: Any, tenant: str) -> dict[tuple[str, str, str], datetime]:
    """When each document the tenant holds was fetched (decides what to retrieve again)."""
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


def land_documents(
    cp: Any,
    settings: Settings,
    tenant: str,
    person: str,
    cfg: NetworkConfig,
    outcomes: list[GatewayOutcome],
    query_id: int,
    run_id: str,
    result: "QueryResult",
) -> None:
    """Land each gateway's retrieved documents and register them; fill ``result``'s counts."""
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

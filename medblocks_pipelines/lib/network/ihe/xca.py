"""XCA ITI-38 (Cross Gateway Query, FindDocuments) and ITI-39 (Cross Gateway Retrieve, inline
or MTOM documents), requests and response readers (ITI TF-2 3.38, 3.39)."""

import base64
from dataclasses import dataclass

from lxml import etree

from medblocks_pipelines.lib.errors import ProtocolError
from medblocks_pipelines.lib.network.ihe.common import QUERY, RIM, RS, XDSB, XOP, _q, _sub, as_urn
from medblocks_pipelines.lib.network.ihe.xcpd import PatientMatch

ACTION_XCA_QUERY = "urn:ihe:iti:2007:CrossGatewayQuery"
ACTION_XCA_QUERY_RESPONSE = "urn:ihe:iti:2007:CrossGatewayQueryResponse"
ACTION_XCA_RETRIEVE = "urn:ihe:iti:2007:CrossGatewayRetrieve"
ACTION_XCA_RETRIEVE_RESPONSE = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"


FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
STABLE_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
ON_DEMAND_ENTRY = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"
STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
RESPONSE_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
RESPONSE_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
RESPONSE_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"
EI_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
EI_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
CL_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
CL_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
CL_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"


# -- XCA ITI-38 ----------------------------------------------------------------------------------
def _slot(parent: etree._Element, name: str, *values: str) -> None:
    s = _sub(parent, RIM, "Slot", name=name)
    vl = _sub(s, RIM, "ValueList")
    for v in values:
        _sub(vl, RIM, "Value", v)


def build_find_documents(
    match: PatientMatch,
    *,
    service_start_from: str | None = None,
    service_start_to: str | None = None,
    on_demand: bool = True,
) -> etree._Element:
    """``AdhocQueryRequest`` FindDocuments with ``home``, quoted patient id and entry types."""
    req = etree.Element(_q(QUERY, "AdhocQueryRequest"), nsmap={"query": QUERY, "rim": RIM})
    _sub(req, QUERY, "ResponseOption", returnType="LeafClass", returnComposedObjects="true")
    aq = _sub(req, RIM, "AdhocQuery", id=FIND_DOCUMENTS, home=as_urn(match.home_community_id))
    _slot(aq, "$XDSDocumentEntryPatientId", f"'{match.xds_patient_id}'")
    _slot(aq, "$XDSDocumentEntryStatus", f"('{STATUS_APPROVED}')")
    types = [STABLE_ENTRY, ON_DEMAND_ENTRY] if on_demand else [STABLE_ENTRY]
    _slot(aq, "$XDSDocumentEntryType", "(" + ",".join(f"'{t}'" for t in types) + ")")
    if service_start_from:
        _slot(aq, "$XDSDocumentEntryServiceStartTimeFrom", service_start_from)
    if service_start_to:
        _slot(aq, "$XDSDocumentEntryServiceStartTimeTo", service_start_to)
    return req


@dataclass(frozen=True)
class RegistryError_:
    """One ``RegistryError`` (codes only; codeContext is kept short and never logged)."""

    code: str
    severity: str
    context: str = ""

    @property
    def is_error(self) -> bool:
        """True for severity Error (Warnings do not fail anything)."""
        return self.severity.endswith("Error")


@dataclass(frozen=True)
class DocumentEntry:
    """An ``ExtrinsicObject`` from an XCA query response."""

    home_community_id: str
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    object_type: str
    entry_uuid: str = ""
    creation_time: str | None = None
    service_start_time: str | None = None
    class_code: str | None = None
    type_code: str | None = None
    format_code: str | None = None
    size: int | None = None
    hash: str | None = None

    @property
    def on_demand(self) -> bool:
        """True for on-demand entries (a fresh document is built on each retrieve)."""
        return self.object_type == ON_DEMAND_ENTRY

    @property
    def key(self) -> tuple[str, str, str]:
        """The document registry key."""
        return (self.home_community_id, self.repository_unique_id, self.document_unique_id)


@dataclass(frozen=True)
class QueryResponse:
    """An ``AdhocQueryResponse``: status, entries and errors (PartialSuccess = both)."""

    status: str
    entries: tuple[DocumentEntry, ...]
    errors: tuple[RegistryError_, ...]


def _errors(el: etree._Element) -> tuple[RegistryError_, ...]:
    out = []
    for e in el.iter(_q(RS, "RegistryError")):
        out.append(
            RegistryError_(
                e.get("errorCode", ""),
                e.get("severity", SEVERITY_ERROR),
                (e.get("codeContext") or "")[:200],
            )
        )
    return tuple(out)


def _first_slot(obj: etree._Element, name: str) -> str | None:
    values = _slot_values(obj, name)
    return values[0] if values else None


def _slot_values(obj: etree._Element, name: str) -> list[str]:
    for s in obj.findall(_q(RIM, "Slot")):
        if s.get("name") == name:
            return [(v.text or "").strip() for v in s.iter(_q(RIM, "Value"))]
    return []


def _classification(obj: etree._Element, scheme: str) -> str | None:
    for c in obj.findall(_q(RIM, "Classification")):
        if c.get("classificationScheme") == scheme:
            node: str | None = c.get("nodeRepresentation")
            return node
    return None


def parse_query_response(el: etree._Element) -> QueryResponse:
    """Read an ``AdhocQueryResponse`` (LeafClass)."""
    if el.tag != _q(QUERY, "AdhocQueryResponse"):
        raise ProtocolError(f"expected AdhocQueryResponse, got {etree.QName(el).localname}")
    status = el.get("status") or ""
    if status not in (RESPONSE_SUCCESS, RESPONSE_PARTIAL, RESPONSE_FAILURE):
        raise ProtocolError("AdhocQueryResponse with an unknown status")
    entries = []
    for obj in el.iter(_q(RIM, "ExtrinsicObject")):
        unique = None
        for ei in obj.findall(_q(RIM, "ExternalIdentifier")):
            if ei.get("identificationScheme") == EI_UNIQUE_ID:
                unique = ei.get("value")
        repo = _first_slot(obj, "repositoryUniqueId")
        home = obj.get("home")
        if not unique or not repo or not home:
            # Without all three coordinates the document cannot be retrieved (XDSMissingHomeCommunityId).
            continue
        size = _first_slot(obj, "size")
        entries.append(
            DocumentEntry(
                home_community_id=home,
                repository_unique_id=repo,
                document_unique_id=unique,
                mime_type=obj.get("mimeType") or "application/octet-stream",
                object_type=obj.get("objectType") or STABLE_ENTRY,
                entry_uuid=obj.get("id") or "",
                creation_time=_first_slot(obj, "creationTime"),
                service_start_time=_first_slot(obj, "serviceStartTime"),
                class_code=_classification(obj, CL_CLASS),
                type_code=_classification(obj, CL_TYPE),
                format_code=_classification(obj, CL_FORMAT),
                size=int(size) if size and size.isdigit() else None,
                hash=_first_slot(obj, "hash"),
            )
        )
    return QueryResponse(status, tuple(entries), _errors(el))


# -- XCA ITI-39 ----------------------------------------------------------------------------------
def build_retrieve(entries: list[DocumentEntry]) -> etree._Element:
    """``RetrieveDocumentSetRequest`` with one DocumentRequest per entry (its ``home``)."""
    req = etree.Element(_q(XDSB, "RetrieveDocumentSetRequest"), nsmap={"xdsb": XDSB})
    for e in entries:
        dr = _sub(req, XDSB, "DocumentRequest")
        _sub(dr, XDSB, "HomeCommunityId", as_urn(e.home_community_id))
        _sub(dr, XDSB, "RepositoryUniqueId", e.repository_unique_id)
        _sub(dr, XDSB, "DocumentUniqueId", e.document_unique_id)
    return req


@dataclass(frozen=True)
class RetrievedDocument:
    """One ``DocumentResponse``: coordinates, mime type and the bytes (inline or MTOM)."""

    home_community_id: str
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    content: bytes
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """The registry key of the entry that was asked for."""
        return (self.home_community_id, self.repository_unique_id, self.document_unique_id)


@dataclass(frozen=True)
class RetrieveResponse:
    """A ``RetrieveDocumentSetResponse``."""

    status: str
    documents: tuple[RetrievedDocument, ...]
    errors: tuple[RegistryError_, ...]


def parse_retrieve_response(el: etree._Element, attachments: dict[str, bytes]) -> RetrieveResponse:
    """Read a ``RetrieveDocumentSetResponse``; ``Document`` is base64 text or an ``xop:Include``."""
    if el.tag != _q(XDSB, "RetrieveDocumentSetResponse"):
        raise ProtocolError(
            f"expected RetrieveDocumentSetResponse, got {etree.QName(el).localname}"
        )
    rr = el.find(_q(RS, "RegistryResponse"))
    status = rr.get("status", "") if rr is not None else ""
    if status not in (RESPONSE_SUCCESS, RESPONSE_PARTIAL, RESPONSE_FAILURE):
        raise ProtocolError("RetrieveDocumentSetResponse with an unknown status")
    docs = []
    for dr in el.findall(_q(XDSB, "DocumentResponse")):
        doc_el = dr.find(_q(XDSB, "Document"))
        if doc_el is None:
            raise ProtocolError("DocumentResponse without a Document")
        inc = doc_el.find(_q(XOP, "Include"))
        if inc is not None:
            href = inc.get("href", "")
            cid = href[4:] if href.startswith("cid:") else href
            from urllib.parse import unquote

            cid = unquote(cid)
            if cid not in attachments:
                raise ProtocolError("xop:Include points at a MIME part that is not in the message")
            content = attachments[cid]
        else:
            try:
                content = base64.b64decode("".join((doc_el.text or "").split()), validate=True)
            except ValueError:
                raise ProtocolError("Document is not valid base64") from None
        docs.append(
            RetrievedDocument(
                home_community_id=dr.findtext(_q(XDSB, "HomeCommunityId")) or "",
                repository_unique_id=dr.findtext(_q(XDSB, "RepositoryUniqueId")) or "",
                document_unique_id=dr.findtext(_q(XDSB, "DocumentUniqueId")) or "",
                mime_type=dr.findtext(_q(XDSB, "mimeType")) or "application/octet-stream",
                content=content,
                new_repository_unique_id=dr.findtext(_q(XDSB, "NewRepositoryUniqueId")),
                new_document_unique_id=dr.findtext(_q(XDSB, "NewDocumentUniqueId")),
            )
        )
    return RetrieveResponse(status, tuple(docs), _errors(el))

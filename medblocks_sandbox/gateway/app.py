"""A responding gateway (XCPD ITI-55, XCA ITI-38/ITI-39) for the sandbox's network organizations.

Each network organization of the synthetic population is one community with its own endpoints:
``POST /{org_id}/xcpd``, ``POST /{org_id}/xca/query``, ``POST /{org_id}/xca/retrieve``. Documents
are C-CDA CCDs rendered on the fly from that organization's FHIR resources, plus (per behaviour)
on-demand entries, a PDF, MTOM/XOP responses, PartialSuccess, slow answers and SOAP faults.

The gateway is as strict as the spec: SOAP 1.2 content type, WS-Addressing Action/To/MessageID,
a SAML assertion whose PurposeOfUse is a TEFCA XP code (signature verified when a trusted
certificate is configured), ``home`` on every XCA query, a single-quoted patient id. Every
request it sees is appended to ``app.state.seen`` so tests can prove a refused query never came.
"""

import asyncio
import base64
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from medblocks_sandbox.gateway import spec
from medblocks_sandbox.gateway.reader import (
    SoapRequest,
    UnreadableRequest,
    XcpdDemographics,
    read_soap_request,
    read_xcpd_demographics,
    timestamp_signature_ok,
)
from medblocks_sandbox.gateway.render import render_ccd

#: A fixed instant for stable documents: the same patient gives the same bytes every time.
STABLE_DOCUMENT_TIME = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
#: An entity-expansion ("billion laughs") document a hostile responder might send.
HOSTILE_DOCUMENT = (
    b'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&c;</title></ClinicalDocument>'
)
SUPPORTED_PURPOSES = frozenset({"T-TREAT", "T-TRTMNT", "T-IAS", "T-PYMNT", "T-HCO", "T-PH"})


@dataclass(frozen=True)
class Behaviour:
    """How one community misbehaves (all off by default).

    delay_s: seconds before answering each request (per-gateway timeouts).
    fault_on: transactions ("ITI-55", "ITI-38", "ITI-39") answered with a SOAP Receiver fault.
    partial_success: ITI-38 answers PartialSuccess (documents plus a RegistryError).
    mtom: ITI-39 answers as MTOM/XOP multipart with the document in a MIME part.
    on_demand: offer an on-demand CCD entry beside the stable one.
    pdf: offer a stable PDF document too (stored as DocumentReference + Binary).
    flaws: C-CDA flaws passed to the renderer (null_codes, missing_sections, no_tz, unknown_entry).
    malformed: transactions answered with a body that is not a SOAP envelope.
    detected_issue: XCPD answers "no match" with a DetectedIssueEvent asking for an address.
    wrong_demographics: XCPD matches but returns a different birth date (IAS double-check).
    hostile_document: the CCD retrieve returns an entity-expansion attack instead of a C-CDA.
    foreign_document: the CCD retrieve returns another patient's CCD (a mixed-up document: its
        record target is not the patient XCPD matched).
    busy_first: transactions ("ITI-38", "ITI-39") whose first request answers Failure +
        XDSRegistryBusy / XDSRepositoryBusy (a retry succeeds).
    """

    delay_s: float = 0.0
    fault_on: frozenset[str] = frozenset()
    partial_success: bool = False
    mtom: bool = False
    on_demand: bool = False
    pdf: bool = False
    flaws: frozenset[str] = frozenset()
    malformed: frozenset[str] = frozenset()
    detected_issue: bool = False
    wrong_demographics: bool = False
    hostile_document: bool = False
    foreign_document: bool = False
    busy_first: frozenset[str] = frozenset()


@dataclass
class _Community:
    org: Any
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    documents: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # doc uid -> (patient id, kind)
    on_demand_counter: int = 0
    busy_done: set[str] = field(default_factory=set)

    @property
    def oid(self) -> str:
        return str(self.org.oid)

    @property
    def hcid(self) -> str:
        return str(self.org.home_community_id or f"urn:oid:{self.org.oid}")

    @property
    def repository(self) -> str:
        return f"{self.oid}.2"

    def mrn(self, patient_id: str) -> str:
        """The community's MRN for a patient (its ``urn:oid:<oid>.1`` identifier), else the id."""
        for ident in self.patients[patient_id].get("identifier") or []:
            if ident.get("system") == f"urn:oid:{self.oid}.1" and ident.get("value"):
                return str(ident["value"])
        return patient_id

    def by_mrn(self, mrn: str) -> str | None:
        """The patient id for an MRN this community assigned."""
        return next((pid for pid in self.patients if self.mrn(pid) == mrn), None)

    def doc_uid(self, patient_id: str, kind: str) -> str:
        n = int(hashlib.sha256(f"{kind}|{patient_id}".encode()).hexdigest()[:12], 16)
        arc = {"ccd": 9, "pdf": 10, "od": 8}[kind]
        return f"{self.oid}.{arc}.{n}"


def _patient_of(res: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = (res.get(key) or {}).get("reference") or ""
        if ref.startswith("Patient/"):
            return ref.split("/", 1)[1]
    return None


def _load(pop: Any, orgs: list[str] | None) -> dict[str, _Community]:
    out = {}
    for org in pop.organizations:
        if getattr(org, "kind", None) != "network" or (orgs and org.id not in orgs):
            continue
        com = _Community(org)
        for res in pop.resources_for(org.id):
            if res.get("resourceType") == "Patient":
                com.patients[res["id"]] = res
            else:
                pid = _patient_of(res)
                if pid:
                    com.resources.setdefault(pid, []).append(res)
        for pid in com.patients:
            com.documents[com.doc_uid(pid, "ccd")] = (pid, "ccd")
            com.documents[com.doc_uid(pid, "pdf")] = (pid, "pdf")
            com.documents[com.doc_uid(pid, "od")] = (pid, "od")
        out[org.id] = com
    return out


def _fault(code: str, subcode: str, reason: str, status: int) -> Response:
    env = etree.Element(f"{{{spec.SOAP}}}Envelope", nsmap={"soap": spec.SOAP, "wsa": spec.WSA})
    header = etree.SubElement(env, f"{{{spec.SOAP}}}Header")
    etree.SubElement(
        header, f"{{{spec.WSA}}}Action"
    ).text = "http://www.w3.org/2005/08/addressing/soap/fault"
    body = etree.SubElement(env, f"{{{spec.SOAP}}}Body")
    fault = etree.SubElement(body, f"{{{spec.SOAP}}}Fault")
    c = etree.SubElement(fault, f"{{{spec.SOAP}}}Code")
    etree.SubElement(c, f"{{{spec.SOAP}}}Value").text = f"soap:{code}"
    sc = etree.SubElement(c, f"{{{spec.SOAP}}}Subcode")
    etree.SubElement(sc, f"{{{spec.SOAP}}}Value").text = subcode
    r = etree.SubElement(fault, f"{{{spec.SOAP}}}Reason")
    t = etree.SubElement(r, f"{{{spec.SOAP}}}Text")
    t.text = reason
    t.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    return Response(
        etree.tostring(env, xml_declaration=True, encoding="UTF-8"),
        status_code=status,
        media_type="application/soap+xml; charset=UTF-8",
    )


def _reply(action: str, relates_to: str, body: etree._Element) -> bytes:
    env = etree.Element(f"{{{spec.SOAP}}}Envelope", nsmap={"soap": spec.SOAP, "wsa": spec.WSA})
    header = etree.SubElement(env, f"{{{spec.SOAP}}}Header")
    etree.SubElement(header, f"{{{spec.WSA}}}Action").text = action
    etree.SubElement(header, f"{{{spec.WSA}}}MessageID").text = f"urn:uuid:{uuid.uuid4()}"
    etree.SubElement(header, f"{{{spec.WSA}}}RelatesTo").text = relates_to
    etree.SubElement(env, f"{{{spec.SOAP}}}Body").append(body)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def _soap_response(data: bytes) -> Response:
    return Response(data, media_type="application/soap+xml; charset=UTF-8")


class _Reject(Exception):
    def __init__(self, subcode: str, reason: str, code: str = "Sender") -> None:
        self.subcode, self.reason, self.code = subcode, reason, code


def _check_security(msg: SoapRequest, url_path: str, trusted_cert: bytes | None) -> str:
    sec = msg.header(spec.WSSE, "Security")
    if sec is None:
        raise _Reject("wsse:InvalidSecurity", "missing wsse:Security header")
    assertion = sec.find(f"{{{spec.SAML}}}Assertion")
    if assertion is None:
        raise _Reject("wsse:InvalidSecurity", "missing SAML assertion")
    if trusted_cert is not None:
        from signxml import XMLVerifier

        try:
            XMLVerifier().verify(
                etree.fromstring(etree.tostring(assertion)),
                x509_cert=trusted_cert.decode("ascii"),
                id_attribute="ID",
                expect_references=1,
            )
        except Exception:  # noqa: BLE001 - any verification failure is a security fault
            raise _Reject("wsse:FailedCheck", "assertion signature does not verify") from None
        if not timestamp_signature_ok(msg.root, trusted_cert):
            raise _Reject("wsse:MessageExpired", "timestamp not signed, invalid or expired")
    audience = assertion.findtext(f".//{{{spec.SAML}}}Audience") or ""
    if not audience.endswith(url_path):
        raise _Reject("wsse:FailedCheck", "assertion audience is not this endpoint")
    purpose = None
    for attr in assertion.iter(f"{{{spec.SAML}}}Attribute"):
        if attr.get("Name") == spec.ATTR_PURPOSE:
            pou = attr.find(f".//{{{spec.HL7}}}PurposeOfUse")
            if pou is not None and pou.get("codeSystem") == spec.XP_CODE_SYSTEM:
                purpose = pou.get("code")
    if purpose is None:
        raise _Reject("wsse:FailedCheck", "no TEFCA PurposeOfUse in the assertion")
    if purpose not in SUPPORTED_PURPOSES:
        raise _Reject("wsse:FailedCheck", "purpose of use not supported by this responder")
    return purpose


def _registry_error(
    parent: etree._Element, code: str, context: str, severity: str = spec.SEVERITY_ERROR
) -> None:
    rel = parent.find(f"{{{spec.RS}}}RegistryErrorList")
    if rel is None:
        rel = etree.SubElement(parent, f"{{{spec.RS}}}RegistryErrorList")
    etree.SubElement(
        rel, f"{{{spec.RS}}}RegistryError", errorCode=code, codeContext=context, severity=severity
    )


def _match(com: _Community, demo: XcpdDemographics) -> list[dict[str, Any]]:
    out = []
    for p in com.patients.values():
        if p.get("birthDate") != demo.birth_date:
            continue
        name = (p.get("name") or [{}])[0]
        fam_ok = (name.get("family") or "").lower() == demo.family.lower()
        given = [g.lower() for g in name.get("given") or []]
        given_ok = bool(demo.given) and demo.given[0].lower() in given
        zip_ok = bool(demo.postal_code) and demo.postal_code == ((p.get("address") or [{}])[0]).get(
            "postalCode"
        )
        if (fam_ok and (given_ok or zip_ok)) or (
            given_ok and zip_ok and p.get("gender") == demo.gender
        ):
            out.append(p)
    return out


def _xcpd_response(
    com: _Community,
    request: etree._Element,
    matches: list[dict[str, Any]],
    *,
    issue: str | None = None,
    shift_birth: bool = False,
) -> etree._Element:
    v3 = spec.HL7
    root = etree.Element(f"{{{v3}}}PRPA_IN201306UV02", nsmap={None: v3}, ITSVersion="XML_1.0")
    etree.SubElement(root, f"{{{v3}}}id", root=str(uuid.uuid4()))
    etree.SubElement(
        root, f"{{{v3}}}creationTime", value=datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    )
    etree.SubElement(
        root, f"{{{v3}}}interactionId", root="2.16.840.1.113883.1.6", extension="PRPA_IN201306UV02"
    )
    ack = etree.SubElement(root, f"{{{v3}}}acknowledgement")
    etree.SubElement(ack, f"{{{v3}}}typeCode", code="AA")
    cap = etree.SubElement(root, f"{{{v3}}}controlActProcess", classCode="CACT", moodCode="EVN")
    etree.SubElement(
        cap, f"{{{v3}}}code", code="PRPA_TE201306UV02", codeSystem="2.16.840.1.113883.1.6"
    )
    for p in matches:
        subj = etree.SubElement(cap, f"{{{v3}}}subject", typeCode="SUBJ")
        reg = etree.SubElement(subj, f"{{{v3}}}registrationEvent", classCode="REG", moodCode="EVN")
        s1 = etree.SubElement(reg, f"{{{v3}}}subject1", typeCode="SBJ")
        pat = etree.SubElement(s1, f"{{{v3}}}patient", classCode="PAT")
        etree.SubElement(pat, f"{{{v3}}}id", root=f"{com.oid}.1", extension=com.mrn(p["id"]))
        etree.SubElement(pat, f"{{{v3}}}statusCode", code="active")
        person = etree.SubElement(pat, f"{{{v3}}}patientPerson")
        name = (p.get("name") or [{}])[0]
        nm = etree.SubElement(person, f"{{{v3}}}name")
        for g in name.get("given") or []:
            etree.SubElement(nm, f"{{{v3}}}given").text = g
        etree.SubElement(nm, f"{{{v3}}}family").text = name.get("family") or ""
        g = {"male": "M", "female": "F"}.get(p.get("gender", ""), "UN")
        etree.SubElement(person, f"{{{v3}}}administrativeGenderCode", code=g)
        etree.SubElement(
            person, f"{{{v3}}}birthTime", value=_birth(p.get("birthDate") or "", shift_birth)
        )
    qa = etree.SubElement(cap, f"{{{v3}}}queryAck")
    etree.SubElement(qa, f"{{{v3}}}queryResponseCode", code="OK" if matches else "NF")
    if issue:
        # ITI-55 3.55.4.2.2.6: a DetectedIssueEvent whose management code asks for more data.
        reason = etree.SubElement(cap, f"{{{v3}}}reasonOf", typeCode="RSON")
        ev = etree.SubElement(
            reason, f"{{{v3}}}detectedIssueEvent", classCode="ALRT", moodCode="EVN"
        )
        etree.SubElement(
            ev,
            f"{{{v3}}}code",
            code="ActAdministrativeDetectedIssueCode",
            codeSystem="2.16.840.1.113883.5.4",
        )
        mit = etree.SubElement(ev, f"{{{v3}}}mitigatedBy", typeCode="MITGT")
        mgmt = etree.SubElement(
            mit, f"{{{v3}}}detectedIssueManagement", classCode="ACT", moodCode="EVN"
        )
        etree.SubElement(mgmt, f"{{{v3}}}code", code=issue, codeSystem="1.3.6.1.4.1.19376.1.2.27.3")
    qbp = request.find(f".//{{{v3}}}queryByParameter")
    if qbp is not None:
        cap.append(qbp)
    return root


def _busy(tx: str) -> tuple[str, etree._Element]:
    if tx == "ITI-38":
        resp = etree.Element(
            f"{{{spec.QUERY}}}AdhocQueryResponse", nsmap={"query": spec.QUERY, "rs": spec.RS}
        )
        resp.set("status", spec.RESPONSE_FAILURE)
        _registry_error(resp, "XDSRegistryBusy", "try again later")
        return spec.ACTION_XCA_QUERY_RESPONSE, resp
    resp = etree.Element(
        f"{{{spec.XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": spec.XDSB, "rs": spec.RS}
    )
    rr = etree.SubElement(resp, f"{{{spec.RS}}}RegistryResponse", status=spec.RESPONSE_FAILURE)
    _registry_error(rr, "XDSRepositoryBusy", "try again later")
    return spec.ACTION_XCA_RETRIEVE_RESPONSE, resp


def _birth(birth_date: str, shift: bool) -> str:
    value = birth_date.replace("-", "")
    if shift and len(value) == 8:
        # Same person by the gateway's lights, a different birth year on the wire.
        value = f"{int(value[:4]) - 1}{value[4:]}"
    return value


def _extrinsic(com: _Community, pid: str, kind: str) -> etree._Element:
    rim = spec.RIM
    uid = com.doc_uid(pid, kind)
    mime = "application/pdf" if kind == "pdf" else "text/xml"
    obj = etree.Element(
        f"{{{rim}}}ExtrinsicObject",
        id=f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, uid)}",
        mimeType=mime,
        objectType=spec.ON_DEMAND_ENTRY if kind == "od" else spec.STABLE_ENTRY,
        status=spec.STATUS_APPROVED,
        home=com.hcid,
    )

    def slot(name: str, value: str) -> None:
        s = etree.SubElement(obj, f"{{{rim}}}Slot", name=name)
        etree.SubElement(etree.SubElement(s, f"{{{rim}}}ValueList"), f"{{{rim}}}Value").text = value

    slot("repositoryUniqueId", com.repository)
    slot("creationTime", STABLE_DOCUMENT_TIME.strftime("%Y%m%d%H%M%S"))
    slot("languageCode", "en-US")
    slot("sourcePatientId", f"{com.mrn(pid)}^^^&{com.oid}.1&ISO")
    fmt = (
        "urn:ihe:iti:xds:2017:mimeTypeSufficient"
        if kind == "pdf"
        else "urn:hl7-org:sdwg:ccda-structuredBody:2.1"
    )
    for scheme, code in (
        (spec.CL_CLASS, "34133-9"),
        (spec.CL_TYPE, "34133-9"),
        (spec.CL_FORMAT, fmt),
    ):
        etree.SubElement(
            obj,
            f"{{{rim}}}Classification",
            classificationScheme=scheme,
            classifiedObject=obj.get("id", ""),
            nodeRepresentation=code,
        )
    etree.SubElement(
        obj,
        f"{{{rim}}}ExternalIdentifier",
        identificationScheme=spec.EI_PATIENT_ID,
        value=f"{com.mrn(pid)}^^^&{com.oid}.1&ISO",
    )
    etree.SubElement(
        obj, f"{{{rim}}}ExternalIdentifier", identificationScheme=spec.EI_UNIQUE_ID, value=uid
    )
    return obj


def _pdf_bytes(title: str) -> bytes:
    """A tiny, valid one-page PDF (no patient data beyond a generic title)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({title}) Tj ET".encode("latin-1")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def create_gateway_app(
    pop: Any,
    *,
    behaviours: dict[str, Behaviour] | None = None,
    trusted_cert: bytes | None = None,
    organizations: list[str] | None = None,
) -> Starlette:
    """Build the responding-gateway ASGI app for ``pop``'s network organizations.

    ``pop`` needs ``organizations`` (objects with id, name, kind, oid, home_community_id) and
    ``resources_for(org_id)``. ``behaviours`` maps org ids to :class:`Behaviour`.
    ``trusted_cert`` (PEM) turns on SAML signature verification.
    """
    communities = _load(pop, organizations)
    behaviours = behaviours or {}
    seen: list[dict[str, Any]] = []

    async def handle(request: Request) -> Response:
        org_id = request.path_params["org"]
        transaction = request.path_params["tx"]
        com = communities.get(org_id)
        if com is None:
            return Response("unknown community", status_code=404, media_type="text/plain")
        b = behaviours.get(org_id, Behaviour())
        tx = {"xcpd": "ITI-55", "xca/query": "ITI-38", "xca/retrieve": "ITI-39"}[transaction]
        expected = {
            "ITI-55": spec.ACTION_XCPD,
            "ITI-38": spec.ACTION_XCA_QUERY,
            "ITI-39": spec.ACTION_XCA_RETRIEVE,
        }[tx]
        body = await request.body()
        record: dict[str, Any] = {"org": org_id, "transaction": tx, "purpose": None}
        seen.append(record)
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/soap+xml"):
            return _fault(
                "Sender", "env:VersionMismatch", "SOAP 1.2 requires application/soap+xml", 415
            )
        try:
            msg = read_soap_request(body)
        except UnreadableRequest as exc:
            if exc.unsafe:
                return _fault("Sender", "wsse:InvalidSecurity", "XML refused", 400)
            return _fault("Sender", "env:Sender", "not a SOAP 1.2 request", 400)
        if msg.action != expected or ctype.find(expected) < 0:
            return _fault("Sender", "wsa:ActionNotSupported", "unexpected action", 400)
        to = msg.header(spec.WSA, "To")
        message_id = msg.header(spec.WSA, "MessageID")
        if to is None or message_id is None or not (message_id.text or "").startswith("urn:uuid:"):
            return _fault(
                "Sender",
                "wsa:MessageAddressingHeaderRequired",
                "wsa:To and wsa:MessageID are required",
                400,
            )
        try:
            record["purpose"] = _check_security(msg, request.url.path, trusted_cert)
        except _Reject as r:
            return _fault(r.code, r.subcode, r.reason, 400)
        if tx in b.fault_on:
            return _fault("Receiver", "env:Receiver", "responder temporarily unavailable", 500)
        if tx in b.malformed:
            return Response(
                b"<html><body>502 Bad Gateway</body></html>",
                status_code=502,
                media_type="text/html",
            )
        relates = (message_id.text or "").strip()
        if tx == "ITI-55":
            try:
                demo = read_xcpd_demographics(msg.body)
            except UnreadableRequest:
                return _fault("Sender", "env:Sender", "bad PRPA_IN201305UV02", 400)
            if b.detected_issue:
                resp = _xcpd_response(com, msg.body, [], issue="PatientAddressRequested")
            else:
                resp = _xcpd_response(
                    com, msg.body, _match(com, demo), shift_birth=b.wrong_demographics
                )
            return _soap_response(_reply(spec.ACTION_XCPD_RESPONSE, relates, resp))
        if tx in b.busy_first and tx not in com.busy_done:
            com.busy_done.add(tx)
            busy_action, busy_body = _busy(tx)
            return _soap_response(_reply(busy_action, relates, busy_body))
        if tx == "ITI-38":
            aq = msg.body.find(f"{{{spec.RIM}}}AdhocQuery")
            if aq is not None:
                record["slots"] = sorted(
                    str(x.get("name")) for x in aq.findall(f"{{{spec.RIM}}}Slot")
                )
            return _soap_response(
                _reply(spec.ACTION_XCA_QUERY_RESPONSE, relates, _query(com, msg.body, b))
            )
        return _retrieve(com, msg.body, b, relates)

    def _query(com: _Community, req: etree._Element, b: Behaviour) -> etree._Element:
        resp = etree.Element(
            f"{{{spec.QUERY}}}AdhocQueryResponse",
            nsmap={"query": spec.QUERY, "rim": spec.RIM, "rs": spec.RS},
        )
        aq = req.find(f"{{{spec.RIM}}}AdhocQuery")
        if req.tag != f"{{{spec.QUERY}}}AdhocQueryRequest" or aq is None:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSRegistryError", "not an AdhocQueryRequest")
            return resp
        if not aq.get("home"):
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSMissingHomeCommunityId", "home attribute is required in XCA")
            return resp
        if aq.get("home") != com.hcid:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownCommunity", "home is not this community")
            return resp
        if aq.get("id") != spec.FIND_DOCUMENTS:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownStoredQuery", "only FindDocuments is supported")
            return resp
        slots = {
            s.get("name"): [(v.text or "") for v in s.iter(f"{{{spec.RIM}}}Value")]
            for s in aq.findall(f"{{{spec.RIM}}}Slot")
        }
        pid_values = slots.get("$XDSDocumentEntryPatientId") or []
        if len(pid_values) != 1 or not (
            pid_values[0].startswith("'") and pid_values[0].endswith("'")
        ):
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(
                resp,
                "XDSStoredQueryParamNumber",
                "$XDSDocumentEntryPatientId must be one quoted value",
            )
            return resp
        if "$XDSDocumentEntryStatus" not in slots:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(
                resp, "XDSStoredQueryMissingParam", "$XDSDocumentEntryStatus is required"
            )
            return resp
        cx = pid_values[0][1:-1]
        mrn, _, aa = cx.partition("^^^&")
        pid = com.by_mrn(mrn) or ""
        if aa.split("&")[0] != f"{com.oid}.1" or pid not in com.patients:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownPatientId", "patient id not known here")
            return resp
        types = " ".join(slots.get("$XDSDocumentEntryType") or [spec.STABLE_ENTRY])
        rol = etree.SubElement(resp, f"{{{spec.RIM}}}RegistryObjectList")
        rol.append(_extrinsic(com, pid, "ccd"))
        if b.pdf and not b.partial_success:
            rol.append(_extrinsic(com, pid, "pdf"))
        if b.on_demand and spec.ON_DEMAND_ENTRY in types:
            rol.append(_extrinsic(com, pid, "od"))
        if b.partial_success:
            resp.set("status", spec.RESPONSE_PARTIAL)
            _registry_error(resp, "XDSRepositoryError", "one repository did not answer")
        else:
            resp.set("status", spec.RESPONSE_SUCCESS)
        # RegistryObjectList must come before RegistryErrorList (ebRS 3.0 schema order).
        rel = resp.find(f"{{{spec.RS}}}RegistryErrorList")
        if rel is not None:
            resp.remove(rel)
            resp.append(rel)
        return resp

    def _retrieve(com: _Community, req: etree._Element, b: Behaviour, relates: str) -> Response:
        resp = etree.Element(
            f"{{{spec.XDSB}}}RetrieveDocumentSetResponse",
            nsmap={"xdsb": spec.XDSB, "rs": spec.RS, "xop": spec.XOP},
        )
        rr = etree.SubElement(resp, f"{{{spec.RS}}}RegistryResponse")
        parts: list[tuple[str, bytes, str]] = []
        ok = failed = 0
        for dr in req.findall(f"{{{spec.XDSB}}}DocumentRequest"):
            home = dr.findtext(f"{{{spec.XDSB}}}HomeCommunityId") or ""
            repo = dr.findtext(f"{{{spec.XDSB}}}RepositoryUniqueId") or ""
            uid = dr.findtext(f"{{{spec.XDSB}}}DocumentUniqueId") or ""
            if not home:
                _registry_error(rr, "XDSMissingHomeCommunityId", "HomeCommunityId is required")
                failed += 1
                continue
            if home != com.hcid or repo != com.repository or uid not in com.documents:
                _registry_error(rr, "XDSMissingDocument", "document not found")
                failed += 1
                continue
            pid, kind = com.documents[uid]
            org = {"name": com.org.name, "oid": com.oid}
            out = etree.SubElement(resp, f"{{{spec.XDSB}}}DocumentResponse")
            etree.SubElement(out, f"{{{spec.XDSB}}}HomeCommunityId").text = com.hcid
            etree.SubElement(out, f"{{{spec.XDSB}}}RepositoryUniqueId").text = repo
            etree.SubElement(out, f"{{{spec.XDSB}}}DocumentUniqueId").text = uid
            if kind == "pdf":
                content, mime = _pdf_bytes("Visit summary"), "application/pdf"
            elif kind == "od":
                com.on_demand_counter += 1
                new_uid = f"{com.oid}.7.{com.on_demand_counter}"
                etree.SubElement(out, f"{{{spec.XDSB}}}NewRepositoryUniqueId").text = repo
                etree.SubElement(out, f"{{{spec.XDSB}}}NewDocumentUniqueId").text = new_uid
                content = render_ccd(
                    com.patients[pid],
                    com.resources.get(pid, []),
                    org=org,
                    document_id=new_uid,
                    flaws=b.flaws,
                )
                mime = "text/xml"
            elif b.hostile_document:
                content, mime = HOSTILE_DOCUMENT, "text/xml"
            elif b.foreign_document:
                other = next((p for p in com.patients if p != pid), None)
                someone = (
                    com.patients[other]
                    if other
                    else {**com.patients[pid], "id": f"{pid}-other", "identifier": []}
                )
                content = render_ccd(
                    someone,
                    com.resources.get(other or pid, []),
                    org=org,
                    document_id=uid,
                    effective=STABLE_DOCUMENT_TIME,
                )
                mime = "text/xml"
            else:
                content = render_ccd(
                    com.patients[pid],
                    com.resources.get(pid, []),
                    org=org,
                    document_id=uid,
                    effective=STABLE_DOCUMENT_TIME,
                    flaws=b.flaws,
                )
                mime = "text/xml"
            etree.SubElement(out, f"{{{spec.XDSB}}}mimeType").text = mime
            doc = etree.SubElement(out, f"{{{spec.XDSB}}}Document")
            if b.mtom:
                cid = f"doc{len(parts)}@sandbox.medblocks"
                etree.SubElement(doc, f"{{{spec.XOP}}}Include", href=f"cid:{cid}")
                parts.append((cid, content, mime))
            else:
                doc.text = base64.b64encode(content).decode("ascii")
            ok += 1
        status = (
            spec.RESPONSE_SUCCESS
            if not failed
            else spec.RESPONSE_PARTIAL
            if ok
            else spec.RESPONSE_FAILURE
        )
        rr.set("status", status)
        # DocumentResponses follow the RegistryResponse; errors stay inside it.
        envelope = _reply(spec.ACTION_XCA_RETRIEVE_RESPONSE, relates, resp)
        if not b.mtom:
            return _soap_response(envelope)
        boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        root_cid = "root.message@sandbox.medblocks"
        chunks = [
            f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{root_cid}>\r\n\r\n".encode()
            + envelope
            + b"\r\n"
        ]
        for cid, content, mime in parts:
            chunks.append(
                f"--{boundary}\r\nContent-Type: {mime}\r\nContent-Transfer-Encoding: binary\r\n"
                f"Content-ID: <{cid}>\r\n\r\n".encode()
                + content
                + b"\r\n"
            )
        chunks.append(f"--{boundary}--\r\n".encode())
        ctype = (
            f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
            f'start="<{root_cid}>"; start-info="application/soap+xml"'
        )
        return Response(b"".join(chunks), media_type=ctype)

    app = Starlette(
        routes=[Route("/{org}/{tx:path}", handle, methods=["POST"])],
    )
    app.state.seen = seen
    app.state.communities = communities
    return app


def network_source_config(
    base_url: str,
    pop: Any,
    *,
    our_home_community_id: str = "urn:oid:2.16.840.1.113883.3.9999.100",
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The ``sources.config`` of a network source pointing at this gateway mounted at ``base_url``."""
    base = base_url.rstrip("/")
    gateways = []
    for org in pop.organizations:
        if getattr(org, "kind", None) != "network":
            continue
        gateways.append(
            {
                "id": org.id,
                "name": org.name,
                "organization": org.id,
                "home_community_id": org.home_community_id or f"urn:oid:{org.oid}",
                "xcpd_url": f"{base}/{org.id}/xcpd",
                "xca_query_url": f"{base}/{org.id}/xca/query",
                "xca_retrieve_url": f"{base}/{org.id}/xca/retrieve",
                "timeout_s": timeout_s,
            }
        )
    return {"home_community_id": our_home_community_id, "gateways": gateways, "max_parallel": 4}


#: What the demo's communities do by default: one offers on-demand CCDs, one answers in MTOM with a PDF.
DEFAULT_BEHAVIOURS = {
    "riverside-health": Behaviour(on_demand=True),
    "valley-medical": Behaviour(mtom=True, pdf=True),
}


def gateway_role(ctx: Any) -> Any:
    """Role factory for ``sandbox.run.register_role("gateway", gateway_role)``.

    ``ctx`` is a ``RoleContext``; options ``gateway_behaviours`` (org id -> :class:`Behaviour`) and
    ``gateway_trusted_cert`` (PEM bytes) are honoured. ``extra`` carries ``seen`` (requests log)
    and ``source_config`` (the network source's registry config for these endpoints).
    """
    from medblocks_sandbox.run import OrgEndpoint, RoleApp

    behaviours = ctx.options.get("gateway_behaviours", DEFAULT_BEHAVIOURS)
    app = create_gateway_app(
        ctx.population, behaviours=behaviours, trusted_cert=ctx.options.get("gateway_trusted_cert")
    )
    base = ctx.base_url.rstrip("/")
    endpoints = [
        OrgEndpoint(org.id, org.name, "network", ctx.name, f"{base}/{org.id}")
        for org in ctx.population.organizations
        if getattr(org, "kind", None) == "network"
    ]
    return RoleApp(
        app=app,
        orgs=endpoints,
        extra={
            "seen": app.state.seen,
            "source_config": network_source_config(base, ctx.population),
        },
    )

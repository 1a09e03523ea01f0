"""What the responding gateway sends: SOAP 1.2 envelopes and faults, the security check (WS-A,
SAML PurposeOfUse, signature), XCPD matches and responses (ITI-55), and the XCA document
entries and PDF content (ITI-38/ITI-39).
"""

import uuid
from datetime import UTC, datetime
from typing import Any

from lxml import etree
from starlette.responses import Response

from medblocks_sandbox.gateway import spec
from medblocks_sandbox.gateway.community import STABLE_DOCUMENT_TIME, SUPPORTED_PURPOSES, _Community
from medblocks_sandbox.gateway.reader import (
    SoapRequest,
    XcpdDemographics,
    timestamp_signature_ok,
)


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

"""XCPD ITI-55 (Cross Gateway Patient Discovery): the PRPA_IN201305UV02 request built from
demographics, and the reader for PRPA_IN201306UV02 matches (ITI TF-2 3.55)."""

import uuid
from dataclasses import dataclass
from typing import Any

from lxml import etree

from medblocks_pipelines.lib.errors import ProtocolError
from medblocks_pipelines.lib.network.ihe.common import HL7, XSI, _now, _q, _sub, oid_of

ACTION_XCPD = "urn:hl7-org:v3:PRPA_IN201305UV02:CrossGatewayPatientDiscovery"
ACTION_XCPD_RESPONSE = "urn:hl7-org:v3:PRPA_IN201306UV02:CrossGatewayPatientDiscovery"


# -- XCPD ITI-55 ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Demographics:
    """What XCPD matches on (never logged)."""

    given: tuple[str, ...]
    family: str
    gender: str  # male | female | other | unknown
    birth_date: str  # YYYY-MM-DD
    line: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    phone: str | None = None

    @classmethod
    def from_patient(cls, patient: dict[str, Any]) -> "Demographics":
        """From a FHIR Patient resource (first name, first address, first phone)."""
        name = (patient.get("name") or [{}])[0]
        addr = (patient.get("address") or [{}])[0]
        phone = next(
            (
                t.get("value")
                for t in patient.get("telecom", []) or []
                if t.get("system") == "phone"
            ),
            None,
        )
        return cls(
            given=tuple(name.get("given") or ()),
            family=name.get("family") or "",
            gender=patient.get("gender") or "unknown",
            birth_date=patient.get("birthDate") or "",
            line=(addr.get("line") or [None])[0],
            city=addr.get("city"),
            state=addr.get("state"),
            postal_code=addr.get("postalCode"),
            phone=phone,
        )


_GENDER = {"male": "M", "female": "F", "other": "UN", "unknown": "UN"}
_GENDER_BACK = {"M": "male", "F": "female", "UN": "other"}


def _v3(parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
    return _sub(parent, HL7, tag, **attrs)


def build_xcpd_request(
    demo: Demographics, *, sender_hcid: str, receiver_hcid: str, npi: str | None = None
) -> etree._Element:
    """``PRPA_IN201305UV02`` for one person's demographics."""
    root = etree.Element(
        _q(HL7, "PRPA_IN201305UV02"), nsmap={None: HL7, "xsi": XSI}, ITSVersion="XML_1.0"
    )
    _v3(root, "id", root=str(uuid.uuid4()))
    _v3(root, "creationTime", value=_now().strftime("%Y%m%d%H%M%S"))
    _v3(root, "interactionId", root="2.16.840.1.113883.1.6", extension="PRPA_IN201305UV02")
    _v3(root, "processingCode", code="P")
    _v3(root, "processingModeCode", code="T")
    _v3(root, "acceptAckCode", code="AL")
    recv = _v3(
        _v3(root, "receiver", typeCode="RCV"), "device", classCode="DEV", determinerCode="INSTANCE"
    )
    _v3(recv, "id", root=oid_of(receiver_hcid))
    send = _v3(
        _v3(root, "sender", typeCode="SND"), "device", classCode="DEV", determinerCode="INSTANCE"
    )
    _v3(send, "id", root=oid_of(sender_hcid))
    cap = _v3(root, "controlActProcess", classCode="CACT", moodCode="EVN")
    _v3(cap, "code", code="PRPA_TE201305UV02", codeSystem="2.16.840.1.113883.1.6")
    qbp = _v3(cap, "queryByParameter")
    _v3(qbp, "queryId", root=oid_of(sender_hcid), extension=str(uuid.uuid4()))
    _v3(qbp, "statusCode", code="new")
    _v3(qbp, "responseModalityCode", code="R")
    _v3(qbp, "responsePriorityCode", code="I")
    pl = _v3(qbp, "parameterList")
    g = _v3(pl, "livingSubjectAdministrativeGender")
    _v3(g, "value", code=_GENDER.get(demo.gender, "UN"), codeSystem="2.16.840.1.113883.5.1")
    _v3(g, "semanticsText").text = "LivingSubject.administrativeGender"
    b = _v3(pl, "livingSubjectBirthTime")
    _v3(b, "value", value=demo.birth_date.replace("-", ""))
    _v3(b, "semanticsText").text = "LivingSubject.birthTime"
    n = _v3(pl, "livingSubjectName")
    nv = _v3(n, "value")
    for given in demo.given:
        _v3(nv, "given").text = given
    _v3(nv, "family").text = demo.family
    _v3(n, "semanticsText").text = "LivingSubject.name"
    if demo.line or demo.city or demo.postal_code:
        pa = _v3(pl, "patientAddress")
        av = _v3(pa, "value")
        for tag, val in (
            ("streetAddressLine", demo.line),
            ("city", demo.city),
            ("state", demo.state),
            ("postalCode", demo.postal_code),
        ):
            if val:
                _v3(av, tag).text = val
        _v3(pa, "semanticsText").text = "Patient.addr"
    if demo.phone:
        pt = _v3(pl, "patientTelecom")
        _v3(pt, "value", value=f"tel:{demo.phone}")
        _v3(pt, "semanticsText").text = "Patient.telecom"
    if npi:
        pc = _v3(pl, "principalCareProviderId")
        _v3(pc, "value", root="2.16.840.1.113883.4.6", extension=npi)
        _v3(pc, "semanticsText").text = "AssignedProvider.id"
    return root


def parse_xcpd_request(el: etree._Element) -> Demographics:
    """Read the demographics out of a ``PRPA_IN201305UV02`` (responding-gateway side)."""
    if el.tag != _q(HL7, "PRPA_IN201305UV02"):
        raise ProtocolError("expected PRPA_IN201305UV02")
    pl = el.find(f".//{_q(HL7, 'parameterList')}")
    if pl is None:
        raise ProtocolError("XCPD request without parameterList")

    def val(path: str, attr_name: str | None = None) -> str | None:
        node = pl.find(path, {"v3": HL7})
        if node is None:
            return None
        return node.get(attr_name) if attr_name else (node.text or "").strip() or None

    name = pl.find("v3:livingSubjectName/v3:value", {"v3": HL7})
    given = (
        tuple((g.text or "").strip() for g in name.findall(_q(HL7, "given")))
        if name is not None
        else ()
    )
    phone = val("v3:patientTelecom/v3:value", "value")
    return Demographics(
        given=given,
        family=val("v3:livingSubjectName/v3:value/v3:family") or "",
        gender=_GENDER_BACK.get(
            val("v3:livingSubjectAdministrativeGender/v3:value", "code") or "", "unknown"
        ),
        birth_date=_date8(val("v3:livingSubjectBirthTime/v3:value", "value") or ""),
        line=val("v3:patientAddress/v3:value/v3:streetAddressLine"),
        city=val("v3:patientAddress/v3:value/v3:city"),
        state=val("v3:patientAddress/v3:value/v3:state"),
        postal_code=val("v3:patientAddress/v3:value/v3:postalCode"),
        phone=phone[4:] if phone and phone.startswith("tel:") else phone,
    )


def _attr_of(el: etree._Element | None, name: str) -> str:
    # lxml elements without children are falsy: never write ``el or default``.
    return el.get(name, "") if el is not None else ""


def _date8(v: str) -> str:
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) >= 8 else v


@dataclass(frozen=True)
class PatientMatch:
    """One XCPD match: the remote patient id and its assigning authority (needed for XCA)."""

    patient_id: str
    assigning_authority: str
    home_community_id: str
    demographics: Demographics | None = None

    @property
    def xds_patient_id(self) -> str:
        """The CX form used by XCA: ``id^^^&aaOID&ISO``."""
        return f"{self.patient_id}^^^&{oid_of(self.assigning_authority)}&ISO"


@dataclass(frozen=True)
class XcpdResult:
    """Outcome of one XCPD exchange with one responding gateway."""

    ack: str  # AA | AE
    response_code: str  # OK | NF | QE | AE
    matches: tuple[PatientMatch, ...]
    detected_issue: str | None = (
        None  # soft no-match: more demographics requested / answer not available
    )


def parse_xcpd_response(el: etree._Element, *, home_community_id: str) -> XcpdResult:
    """Read ``PRPA_IN201306UV02``: acknowledgement, queryResponseCode, matched patients."""
    if el.tag != _q(HL7, "PRPA_IN201306UV02"):
        raise ProtocolError(f"expected PRPA_IN201306UV02, got {etree.QName(el).localname}")
    ns = {"v3": HL7}
    ack = el.find("v3:acknowledgement/v3:typeCode", ns)
    code = el.find("v3:controlActProcess/v3:queryAck/v3:queryResponseCode", ns)
    issue_ev = el.find(".//v3:detectedIssueEvent", ns)
    # ITI-55: the management code says what would help (e.g. PatientAddressRequested).
    issue = None
    if issue_ev is not None:
        issue = issue_ev.find(".//v3:detectedIssueManagement/v3:code", ns)
        if issue is None:
            issue = issue_ev.find("v3:code", ns)
    matches = []
    for subject in el.findall("v3:controlActProcess/v3:subject", ns):
        pat = subject.find("v3:registrationEvent/v3:subject1/v3:patient", ns)
        if pat is None:
            continue
        pid = pat.find("v3:id", ns)
        if pid is None or not pid.get("extension") or not pid.get("root"):
            continue
        demo = None
        person = pat.find("v3:patientPerson", ns)
        if person is not None:
            given = tuple((g.text or "").strip() for g in person.findall("v3:name/v3:given", ns))
            demo = Demographics(
                given=given,
                family=(person.findtext("v3:name/v3:family", namespaces=ns) or "").strip(),
                gender=_GENDER_BACK.get(
                    _attr_of(person.find("v3:administrativeGenderCode", ns), "code"),
                    "unknown",
                ),
                birth_date=_date8(_attr_of(person.find("v3:birthTime", ns), "value")),
            )
        matches.append(
            PatientMatch(pid.get("extension", ""), pid.get("root", ""), home_community_id, demo)
        )
    return XcpdResult(
        ack=(ack.get("code") if ack is not None else None) or "AE",
        response_code=(code.get("code") if code is not None else None)
        or ("OK" if matches else "NF"),
        matches=tuple(matches),
        detected_issue=issue.get("code") if issue is not None else None,
    )

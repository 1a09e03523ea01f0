"""The responding gateway's own reader of SOAP 1.2 / XCPD requests (lxml, hardened).

Written against the specifications, not shared with the product's client (``lib/network``): when
the client and the gateway read with the same parser, a spec error on both sides cannot be caught.

* :func:`read_soap_request`: size limit, a parser that resolves no entity, loads no DTD and
  touches no network; a DOCTYPE is refused outright (SOAP 1.2 Part 1 §5 forbids one in a
  message); the root must be a SOAP 1.2 ``Envelope`` with exactly one ``Body`` holding one element.
* :func:`read_xcpd_demographics`: the ``parameterList`` of a ``PRPA_IN201305UV02`` (IHE ITI
  TF-2b 3.55.4.1.2), at its exact place under ``controlActProcess/queryByParameter``; name and
  birth time are required.
* :func:`timestamp_signature_ok`: the detached XML-DSig over ``wsu:Timestamp`` (WS-Security 1.0)
  and its validity window.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from lxml import etree

from medblocks_sandbox.gateway.spec import DS, HL7, SAML, SOAP, WSA, WSSE, WSU

#: Largest request the gateway reads (bytes).
MAX_REQUEST_BYTES = 5 * 1024 * 1024
#: Clock skew allowed on a Timestamp's Created.
CLOCK_SKEW = timedelta(minutes=5)


class UnreadableRequest(Exception):
    """A request the gateway refuses to read. ``unsafe`` marks a hostile or oversized document."""

    def __init__(self, reason: str, *, unsafe: bool = False) -> None:
        super().__init__(reason)
        self.unsafe = unsafe


@dataclass(frozen=True)
class SoapRequest:
    """A read SOAP 1.2 request: the envelope, its WS-Addressing action, the one body element."""

    root: etree._Element
    action: str | None
    body: etree._Element

    def header(self, ns: str, tag: str) -> etree._Element | None:
        """The first header block with this qualified name."""
        return self.root.find(f"{{{SOAP}}}Header/{{{ns}}}{tag}")


def _hardened_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
    )


def read_soap_request(data: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> SoapRequest:
    """Read a plain SOAP 1.2 request; raise :class:`UnreadableRequest` with the reason."""
    if len(data) > max_bytes:
        raise UnreadableRequest("request over the size limit", unsafe=True)
    try:
        root = etree.fromstring(data, parser=_hardened_parser())
    except etree.XMLSyntaxError:
        raise UnreadableRequest("not well-formed XML", unsafe=True) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise UnreadableRequest("a DOCTYPE is not allowed in a SOAP message", unsafe=True)
    if any(True for _ in root.iter(etree.Entity)):
        raise UnreadableRequest("entity references are not allowed", unsafe=True)
    if root.tag != f"{{{SOAP}}}Envelope":
        raise UnreadableRequest("root is not a SOAP 1.2 Envelope")
    bodies = root.findall(f"{{{SOAP}}}Body")
    if len(bodies) != 1:
        raise UnreadableRequest("a SOAP Envelope has exactly one Body")
    children = [c for c in bodies[0] if isinstance(c.tag, str)]
    if len(children) != 1:
        raise UnreadableRequest("a request Body holds exactly one element")
    action = root.findtext(f"{{{SOAP}}}Header/{{{WSA}}}Action")
    return SoapRequest(root, action.strip() if action else None, children[0])


@dataclass(frozen=True)
class XcpdDemographics:
    """The traits an XCPD request asks to match on (never logged)."""

    given: tuple[str, ...]
    family: str
    gender: str  # male | female | other | unknown
    birth_date: str  # YYYY-MM-DD
    postal_code: str | None = None


_ADMINISTRATIVE_GENDER = {"M": "male", "F": "female", "UN": "other"}


def _v3(path: str) -> str:
    return "/".join(f"{{{HL7}}}{step}" for step in path.split("/"))


def read_xcpd_demographics(message: etree._Element) -> XcpdDemographics:
    """The demographics of a ``PRPA_IN201305UV02``; :class:`UnreadableRequest` when malformed."""
    if message.tag != _v3("PRPA_IN201305UV02"):
        raise UnreadableRequest("body is not a PRPA_IN201305UV02")
    params = message.find(_v3("controlActProcess/queryByParameter/parameterList"))
    if params is None:
        raise UnreadableRequest("no controlActProcess/queryByParameter/parameterList")
    name = params.find(_v3("livingSubjectName/value"))
    family = (name.findtext(_v3("family")) or "").strip() if name is not None else ""
    if name is None or not family:
        raise UnreadableRequest("livingSubjectName with a family name is required")
    birth = params.find(_v3("livingSubjectBirthTime/value"))
    born = birth.get("value", "") if birth is not None else ""
    if len(born) < 8 or not born[:8].isdigit():
        raise UnreadableRequest("livingSubjectBirthTime/value is required (YYYYMMDD...)")
    gender = params.find(_v3("livingSubjectAdministrativeGender/value"))
    zip_code = params.findtext(_v3("patientAddress/value/postalCode"))
    return XcpdDemographics(
        given=tuple((g.text or "").strip() for g in name.findall(_v3("given"))),
        family=family,
        gender=_ADMINISTRATIVE_GENDER.get(
            gender.get("code", "") if gender is not None else "", "unknown"
        ),
        birth_date=f"{born[:4]}-{born[4:6]}-{born[6:8]}",
        postal_code=zip_code.strip() if zip_code else None,
    )


def _instant(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    except ValueError:
        return None


def timestamp_signature_ok(root: etree._Element, cert_pem: bytes) -> bool:
    """True when the Security header's ``wsu:Timestamp`` is signed by ``cert_pem`` and current."""
    from signxml import SignatureConfiguration, XMLVerifier

    security = root.find(f"{{{SOAP}}}Header/{{{WSSE}}}Security")
    if security is None:
        return False
    stamp = security.find(f"{{{WSU}}}Timestamp")
    signature = security.find(f"{{{DS}}}Signature")
    if stamp is None or signature is None:
        return False
    uris = [ref.get("URI", "") for ref in signature.iter(f"{{{DS}}}Reference")]
    if uris != [f"#{stamp.get(f'{{{WSU}}}Id')}"]:
        return False
    # The assertion carries its own enveloped signature (checked by the caller): verify without it.
    copy = etree.fromstring(etree.tostring(root))
    for assertion in copy.iter(f"{{{SAML}}}Assertion"):
        assertion.getparent().remove(assertion)
        break
    try:
        XMLVerifier().verify(
            copy,
            x509_cert=cert_pem.decode("ascii"),
            id_attribute="Id",
            expect_config=SignatureConfiguration(require_x509=True),
        )
    except Exception:  # noqa: BLE001 - any failure means "not verified"
        return False
    created = _instant(stamp.findtext(f"{{{WSU}}}Created"))
    expires = _instant(stamp.findtext(f"{{{WSU}}}Expires"))
    if created is None or expires is None:
        return False
    now = datetime.now(UTC)
    return created - CLOCK_SKEW <= now < expires

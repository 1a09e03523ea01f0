"""Namespaces and the small XML helpers every IHE message shares (SOAP, WS-*, SAML, HL7 v3,
ebXML RegRep, XDS.b), and the home-community-id forms that travel both ways."""

from datetime import UTC, datetime

from lxml import etree

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XOP = "http://www.w3.org/2004/08/xop/include"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _sub(
    parent: etree._Element, ns: str, tag: str, text: str | None = None, **attrs: str
) -> etree._Element:
    el = etree.SubElement(parent, _q(ns, tag))
    for k, v in attrs.items():
        el.set(k, v)
    if text is not None:
        el.text = text
    return el


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def oid_of(hcid: str) -> str:
    """``urn:oid:1.2.3`` -> ``1.2.3`` (home community ids travel both ways)."""
    return hcid[8:] if hcid.startswith("urn:oid:") else hcid


def as_urn(hcid: str) -> str:
    """``1.2.3`` -> ``urn:oid:1.2.3``."""
    return hcid if hcid.startswith("urn:") else f"urn:oid:{hcid}"

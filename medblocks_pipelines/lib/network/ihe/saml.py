"""Security: the XUA SAML 2.0 assertion every QTF request carries (who asks, for what purpose),
signed when an identity is configured (ITI TF-2 3.40, SPECS 5.3)."""

import uuid
from dataclasses import dataclass
from datetime import timedelta

from lxml import etree

from medblocks_pipelines.lib.network.ihe.common import (
    DS,
    HL7,
    SAML,
    XSI,
    _iso,
    _now,
    _q,
    _sub,
    as_urn,
)

XP_CODE_SYSTEM = "2.16.840.1.113883.3.7204.1.5.2.1"
NAME_FORMAT_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"
NAME_FORMAT_BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
ATTR_SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
ATTR_ORG = "urn:oasis:names:tc:xspa:1.0:subject:organization"
ATTR_ORG_ID = "urn:oasis:names:tc:xspa:1.0:subject:organization-id"
ATTR_HCID = "urn:nhin:names:saml:homeCommunityId"
ATTR_ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_PURPOSE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"
ATTR_NPI = "urn:oasis:names:tc:xspa:2.0:subject:npi"
ATTR_TIN = "urn:nhin:names:saml:tin"


# -- security: XUA SAML assertion ----------------------------------------------------------------
@dataclass(frozen=True)
class SecurityContext:
    """Who is asking, for what purpose: becomes the SAML assertion (XUA) in every request."""

    subject_id: str
    organization: str
    organization_id: str  # urn:oid:...
    home_community_id: str  # urn:oid:... (ours)
    purpose: str  # an XP code, e.g. T-TREAT
    purpose_display: str = ""
    role_code: str = "112247003"  # SNOMED "Medical doctor"
    role_display: str = "Medical doctor"
    npi: str | None = None
    tin: str | None = None
    key_pem: bytes | None = None
    cert_pem: bytes | None = None
    lifetime_s: int = 300


def _attribute(stmt: etree._Element, name: str, friendly: str | None, fmt: str) -> etree._Element:
    a = _sub(stmt, SAML, "Attribute", Name=name, NameFormat=fmt)
    if friendly:
        a.set("FriendlyName", friendly)
    return _sub(a, SAML, "AttributeValue")


def build_assertion(
    ctx: SecurityContext, *, audience: str, name_format: str = NAME_FORMAT_URI
) -> etree._Element:
    """A SAML 2.0 assertion carrying subject, organization, home community, role and purpose of use.

    Signed (enveloped, RSA-SHA256, exclusive c14n) when ``ctx`` has a key and certificate.
    """
    now = _now()
    aid = f"_{uuid.uuid4()}"
    nsmap = {"saml2": SAML, "xsi": XSI, "hl7": HL7, "ds": DS}
    a = etree.Element(
        _q(SAML, "Assertion"), nsmap=nsmap, ID=aid, IssueInstant=_iso(now), Version="2.0"
    )
    subject_dn = f"CN={ctx.subject_id},O={ctx.organization}"
    _sub(
        a,
        SAML,
        "Issuer",
        subject_dn,
        Format="urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName",
    )
    if ctx.key_pem and ctx.cert_pem:
        # signxml puts the signature where this placeholder is: after Issuer, as SAML requires.
        _sub(a, DS, "Signature", Id="placeholder")
    subj = _sub(a, SAML, "Subject")
    _sub(
        subj,
        SAML,
        "NameID",
        subject_dn,
        Format="urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName",
    )
    sc = _sub(
        subj, SAML, "SubjectConfirmation", Method="urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"
    )
    scd = _sub(sc, SAML, "SubjectConfirmationData")
    if ctx.cert_pem:
        ki = _sub(scd, DS, "KeyInfo")
        body = b"".join(line for line in ctx.cert_pem.splitlines() if b"-----" not in line)
        _sub(_sub(ki, DS, "X509Data"), DS, "X509Certificate", body.decode("ascii"))
    cond = _sub(
        a,
        SAML,
        "Conditions",
        NotBefore=_iso(now),
        NotOnOrAfter=_iso(now + timedelta(seconds=ctx.lifetime_s)),
    )
    _sub(_sub(cond, SAML, "AudienceRestriction"), SAML, "Audience", audience)
    authn = _sub(a, SAML, "AuthnStatement", AuthnInstant=_iso(now))
    _sub(
        _sub(authn, SAML, "AuthnContext"),
        SAML,
        "AuthnContextClassRef",
        "urn:oasis:names:tc:SAML:2.0:ac:classes:X509",
    )
    st = _sub(a, SAML, "AttributeStatement")
    _attribute(st, ATTR_SUBJECT_ID, None, name_format).text = ctx.subject_id
    _attribute(st, ATTR_ORG, None, name_format).text = ctx.organization
    _attribute(st, ATTR_ORG_ID, None, name_format).text = ctx.organization_id
    _attribute(st, ATTR_HCID, None, name_format).text = as_urn(ctx.home_community_id)
    role = _sub(_attribute(st, ATTR_ROLE, None, name_format), HL7, "Role")
    role.set(_q(XSI, "type"), "CE")
    for k, v in (
        ("code", ctx.role_code),
        ("codeSystem", "2.16.840.1.113883.6.96"),
        ("codeSystemName", "SNOMED_CT"),
        ("displayName", ctx.role_display),
    ):
        role.set(k, v)
    pou = _sub(_attribute(st, ATTR_PURPOSE, None, name_format), HL7, "PurposeOfUse")
    pou.set(_q(XSI, "type"), "CE")
    for k, v in (
        ("code", ctx.purpose),
        ("codeSystem", XP_CODE_SYSTEM),
        ("codeSystemName", "TEFCA Exchange Purpose"),
        ("displayName", ctx.purpose_display or ctx.purpose),
    ):
        pou.set(k, v)
    if ctx.npi:
        _attribute(st, ATTR_NPI, "NPI", ATTR_NPI).text = ctx.npi
    if ctx.tin:
        _attribute(st, ATTR_TIN, "TIN", ATTR_TIN).text = ctx.tin
    if ctx.key_pem and ctx.cert_pem:
        from signxml import XMLSigner  # imported lazily: only signing needs it

        signer = XMLSigner(
            signature_algorithm="rsa-sha256",
            digest_algorithm="sha256",
            c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
        )
        a = signer.sign(
            a,
            key=ctx.key_pem,
            cert=ctx.cert_pem.decode("ascii"),
            reference_uri=aid,
            id_attribute="ID",
        )
    return a

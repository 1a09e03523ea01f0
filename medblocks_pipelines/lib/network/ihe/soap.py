"""SOAP 1.2 transport: envelopes with WS-Addressing and WS-Security (signed Timestamp), the
request content type, and the parser for untrusted responses (plain or MTOM/XOP multipart)."""

import base64
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lxml import etree

from medblocks_pipelines.lib.errors import ProtocolError
from medblocks_pipelines.lib.network.errors import SoapFault, UnsafeXMLError
from medblocks_pipelines.lib.network.ihe.common import (
    ANONYMOUS,
    DS,
    SAML,
    SOAP,
    WSA,
    WSSE,
    WSU,
    _iso,
    _now,
    _q,
    _sub,
)
from medblocks_pipelines.lib.network.safexml import DEFAULT_MAX_BYTES, parse_untrusted


def envelope(
    action: str,
    to: str,
    body: etree._Element,
    security: etree._Element | None,
    *,
    signing: tuple[bytes, bytes] | None = None,
) -> bytes:
    """A SOAP 1.2 envelope with WS-Addressing headers and an optional wsse:Security header.

    With ``signing`` (key PEM, cert PEM) the ``wsu:Timestamp`` is signed too (detached signature
    in the Security header, RSA-SHA256, exclusive c14n), as the QTF asks beside the signed assertion.
    """
    nsmap = {"soap": SOAP, "wsa": WSA}
    env = etree.Element(_q(SOAP, "Envelope"), nsmap=nsmap)
    header = _sub(env, SOAP, "Header")
    mu = {_q(SOAP, "mustUnderstand"): "1"}
    el = _sub(header, WSA, "Action", action)
    el.attrib.update(mu)
    _sub(header, WSA, "MessageID", f"urn:uuid:{uuid.uuid4()}")
    _sub(_sub(header, WSA, "ReplyTo"), WSA, "Address", ANONYMOUS)
    el = _sub(header, WSA, "To", to)
    el.attrib.update(mu)
    if security is not None:
        sec = etree.SubElement(header, _q(WSSE, "Security"), nsmap={"wsse": WSSE, "wsu": WSU})
        sec.attrib.update(mu)
        now = _now()
        ts = _sub(sec, WSU, "Timestamp")
        ts.set(_q(WSU, "Id"), f"TS-{uuid.uuid4()}")
        _sub(ts, WSU, "Created", _iso(now))
        _sub(ts, WSU, "Expires", _iso(now + timedelta(minutes=5)))
        sec.append(security)
        if signing is not None:
            from signxml import SignatureConstructionMethod, XMLSigner

            signer = XMLSigner(
                method=SignatureConstructionMethod.detached,
                signature_algorithm="rsa-sha256",
                digest_algorithm="sha256",
                c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
            )
            sig = signer.sign(
                env,
                key=signing[0],
                cert=signing[1].decode("ascii"),
                reference_uri=[ts.get(_q(WSU, "Id"), "")],
                id_attribute="Id",
            )
            sec.append(sig)
    _sub(env, SOAP, "Body").append(body)
    return bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))


def verify_timestamp_signature(root: etree._Element, cert_pem: bytes) -> bool:
    """Verify the detached signature over ``wsu:Timestamp`` in a request's Security header.

    Also checks the Timestamp is current (Created <= now < Expires). Returns False when absent,
    invalid or expired; never raises for a bad signature.
    """
    from signxml import SignatureConfiguration, XMLVerifier

    sec = root.find(f"{_q(SOAP, 'Header')}/{_q(WSSE, 'Security')}")
    if sec is None:
        return False
    ts = sec.find(_q(WSU, "Timestamp"))
    sig = sec.find(_q(DS, "Signature"))
    if ts is None or sig is None:
        return False
    refs = [r.get("URI", "") for r in sig.iter(_q(DS, "Reference"))]
    if refs != [f"#{ts.get(_q(WSU, 'Id'))}"]:
        return False
    # Verify on a copy without the assertion: its own enveloped signature is checked separately.
    copy = etree.fromstring(etree.tostring(root))
    for a in copy.iter(_q(SAML, "Assertion")):
        a.getparent().remove(a)
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
    created = datetime.fromisoformat((ts.findtext(_q(WSU, "Created")) or "").replace("Z", "+00:00"))
    expires = datetime.fromisoformat((ts.findtext(_q(WSU, "Expires")) or "").replace("Z", "+00:00"))
    now = datetime.now(UTC)
    return created - timedelta(minutes=5) <= now < expires


def soap_content_type(action: str) -> str:
    """``Content-Type`` of a SOAP 1.2 request (the action travels as a media-type parameter)."""
    return f'application/soap+xml; charset=UTF-8; action="{action}"'


@dataclass(frozen=True)
class SoapMessage:
    """A parsed SOAP envelope: the WS-Addressing action, the first body child, attachments."""

    root: etree._Element
    action: str | None
    body: etree._Element
    attachments: dict[str, bytes] = field(default_factory=dict)

    def header(self, ns: str, tag: str) -> etree._Element | None:
        """The first header child with this name."""
        return self.root.find(f"{_q(SOAP, 'Header')}/{_q(ns, tag)}")


def _parse_multipart(content_type: str, body: bytes) -> tuple[bytes, dict[str, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ProtocolError("multipart response without a boundary")
    start_m = re.search(r'start="?<?([^">;]+)>?"?', content_type)
    delim = b"--" + m.group(1).encode("ascii")
    parts = body.split(delim)
    root_part: bytes | None = None
    attachments: dict[str, bytes] = {}
    first: bytes | None = None
    for raw in parts[1:]:
        if raw.startswith(b"--"):
            break
        raw = raw[2:] if raw.startswith(b"\r\n") else raw.lstrip(b"\n")
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = raw.partition(b"\n\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        cte = headers.get("content-transfer-encoding", "binary").lower()
        if cte == "base64":
            content = base64.b64decode(content)
        cid = headers.get("content-id", "").strip("<>")
        if first is None:
            first = content
        if start_m and cid == start_m.group(1):
            root_part = content
        elif cid:
            attachments[cid] = content
    root_part = root_part if root_part is not None else first
    if root_part is None:
        raise ProtocolError("multipart response without a root part")
    return root_part, attachments


def parse_soap(
    body: bytes, content_type: str = "application/soap+xml", *, max_bytes: int = DEFAULT_MAX_BYTES
) -> SoapMessage:
    """Parse a SOAP 1.2 message (plain or MTOM/XOP multipart); raise :class:`SoapFault` on a Fault."""
    attachments: dict[str, bytes] = {}
    if len(body) > max_bytes:
        raise UnsafeXMLError(f"SOAP message: {len(body)} bytes is over the {max_bytes}-byte limit")
    if content_type.lower().startswith("multipart/related"):
        body, attachments = _parse_multipart(content_type, body)
    root = parse_untrusted(body, max_bytes=max_bytes, what="SOAP message")
    if root.tag != _q(SOAP, "Envelope"):
        raise ProtocolError(f"not a SOAP 1.2 envelope (root {etree.QName(root).localname!r})")
    sbody = root.find(_q(SOAP, "Body"))
    if sbody is None:
        raise ProtocolError("SOAP envelope without a Body")
    first = next((c for c in sbody if isinstance(c.tag, str)), None)
    if first is None:
        raise ProtocolError("empty SOAP Body")
    if first.tag == _q(SOAP, "Fault"):
        code = first.findtext(f"{_q(SOAP, 'Code')}/{_q(SOAP, 'Value')}")
        sub = first.findtext(f"{_q(SOAP, 'Code')}/{_q(SOAP, 'Subcode')}/{_q(SOAP, 'Value')}")
        fault = SoapFault(
            f"SOAP fault from gateway: code={code} subcode={sub}", code=code, subcode=sub
        )
        # Kept on the exception, never in its message: peers put anything in there.
        fault.reason = (first.findtext(f"{_q(SOAP, 'Reason')}/{_q(SOAP, 'Text')}") or "")[:500]
        raise fault
    action = root.findtext(f"{_q(SOAP, 'Header')}/{_q(WSA, 'Action')}")
    return SoapMessage(root, action.strip() if action else None, first, attachments)

"""The sandbox responding gateway is as strict as the spec: SOAP 1.2 media type, WS-Addressing,
a signed SAML assertion for this endpoint with a TEFCA purpose of use, ``home`` and a quoted patient
id on XCA queries. Requests are crafted with our builders and then broken one rule at a time."""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from lxml import etree

from medblocks_pipelines.lib.errors import SoapFault
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.certs import generate_signing_identity

RIVERSIDE = "urn:oid:2.16.840.1.113883.3.9999.4"


def _sec(signing: tuple[bytes, bytes], **kw: Any) -> ihe.SecurityContext:
    key, cert = signing
    base = ihe.SecurityContext(
        subject_id="dr-x",
        organization="Acme",
        organization_id="urn:oid:1.2.3",
        home_community_id="urn:oid:1.2.3.4",
        purpose="T-TREAT",
        key_pem=key,
        cert_pem=cert,
    )
    return replace(base, **kw)


def _post(
    url: str,
    action: str,
    body: etree._Element,
    sec: ihe.SecurityContext | None,
    *,
    audience: str | None = None,
    ctype: str | None = None,
    mutate: Callable[[etree._Element], None] | None = None,
    sign_ts: bool = True,
) -> httpx.Response:
    assertion = ihe.build_assertion(sec, audience=audience or url) if sec else None
    signing = (
        (sec.key_pem, sec.cert_pem) if sec and sec.key_pem and sec.cert_pem and sign_ts else None
    )
    data = ihe.envelope(action, url, body, assertion, signing=signing)
    if mutate:
        root = etree.fromstring(data)
        mutate(root)
        data = etree.tostring(root)
    return httpx.post(
        url,
        content=data,
        headers={"Content-Type": ctype or ihe.soap_content_type(action)},
        timeout=5,
    )


def _query_body(
    pid: str = "'rv-1^^^&2.16.840.1.113883.3.9999.4.1&ISO'", home: str | None = RIVERSIDE
) -> etree._Element:
    m = ihe.PatientMatch("rv-1", "2.16.840.1.113883.3.9999.4.1", RIVERSIDE)
    body = ihe.build_find_documents(m)
    aq = body.find(f"{{{ihe.RIM}}}AdhocQuery")
    if home is None:
        del aq.attrib["home"]
    else:
        aq.set("home", home)
    for slot in aq:
        if slot.get("name") == "$XDSDocumentEntryPatientId":
            slot.find(f".//{{{ihe.RIM}}}Value").text = pid
    return body


def _fault_subcode(resp: httpx.Response) -> str | None:
    with pytest.raises(SoapFault) as err:
        ihe.parse_soap(resp.content, resp.headers["content-type"])
    return err.value.subcode


def _registry_errors(resp: httpx.Response) -> list[str]:
    msg = ihe.parse_soap(resp.content, resp.headers["content-type"])
    qr = ihe.parse_query_response(msg.body)
    return [e.code for e in qr.errors]


def test_valid_query_answers(gateway_server: Any, signing_identity: tuple[bytes, bytes]) -> None:
    gw = gateway_server()
    url = f"{gw.url}/riverside-health/xca/query"
    resp = _post(url, ihe.ACTION_XCA_QUERY, _query_body(), _sec(signing_identity))
    assert resp.status_code == 200 and _registry_errors(resp) == []


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no_security", "wsse:InvalidSecurity"),  # no wsse:Security header at all
        ("untrusted_signer", "wsse:FailedCheck"),  # signed by a key the gateway does not trust
        ("wrong_audience", "wsse:FailedCheck"),  # assertion minted for another endpoint
        ("nhin_purpose", "wsse:FailedCheck"),  # purpose under the NHIN OID: code systems never mix
        ("tampered", "wsse:FailedCheck"),  # purpose changed after signing
        ("wrong_action", "wsa:ActionNotSupported"),
        ("no_message_id", "wsa:MessageAddressingHeaderRequired"),
        ("soap11", "env:VersionMismatch"),  # text/xml is SOAP 1.1
        ("unsigned_timestamp", "wsse:MessageExpired"),  # signed assertion but no signed Timestamp
        (
            "expired_timestamp",
            "wsse:MessageExpired",
        ),  # Expires in the past (changing it breaks the signature too)
    ],
)
def test_security_and_addressing_rules(
    case: str, expected: str, gateway_server: Any, signing_identity: tuple[bytes, bytes]
) -> None:
    gw = gateway_server()
    url = f"{gw.url}/riverside-health/xca/query"
    sec: ihe.SecurityContext | None = _sec(signing_identity)
    kw: dict[str, Any] = {}
    if case == "no_security":
        sec = None
    elif case == "untrusted_signer":
        sec = _sec(generate_signing_identity("intruder"))
    elif case == "wrong_audience":
        kw["audience"] = f"{gw.url}/valley-medical/xca/query"
    elif case == "tampered":

        def tamper(root: etree._Element) -> None:
            root.find(f".//{{{ihe.HL7}}}PurposeOfUse").set("code", "T-IAS")

        kw["mutate"] = tamper
    elif case == "nhin_purpose":

        def nhin(root: etree._Element) -> None:
            root.find(f".//{{{ihe.HL7}}}PurposeOfUse").set(
                "codeSystem", "2.16.840.1.113883.3.18.7.1"
            )

        kw["mutate"] = nhin
        sec = _sec(
            signing_identity, key_pem=None, cert_pem=None
        )  # unsigned so the change is not tampering
        gw = gateway_server(verify=False)
        url = f"{gw.url}/riverside-health/xca/query"
    elif case == "wrong_action":
        kw["ctype"] = ihe.soap_content_type(ihe.ACTION_XCA_RETRIEVE)
    elif case == "no_message_id":

        def drop(root: etree._Element) -> None:
            mid = root.find(f".//{{{ihe.WSA}}}MessageID")
            mid.getparent().remove(mid)

        kw["mutate"] = drop
    elif case == "unsigned_timestamp":
        kw["sign_ts"] = False
    elif case == "expired_timestamp":

        def expire(root: etree._Element) -> None:
            root.find(f".//{{{ihe.WSU}}}Expires").text = "2001-01-01T00:00:00Z"

        kw["mutate"] = expire
    elif case == "soap11":
        kw["ctype"] = "text/xml; charset=UTF-8"
    resp = _post(url, ihe.ACTION_XCA_QUERY, _query_body(), sec, **kw)
    assert resp.status_code in (400, 415)
    assert _fault_subcode(resp) == expected
    assert resp.headers["content-type"].startswith("application/soap+xml")


@pytest.mark.parametrize(
    "body,expected",
    [
        (lambda: _query_body(home=None), "XDSMissingHomeCommunityId"),  # XCA requires home
        (lambda: _query_body(home="urn:oid:9.9.9"), "XDSUnknownCommunity"),
        (
            lambda: _query_body(pid="rv-1^^^&2.16.840.1.113883.3.9999.4.1&ISO"),
            "XDSStoredQueryParamNumber",
        ),  # unquoted
        (
            lambda: _query_body(pid="'nobody^^^&2.16.840.1.113883.3.9999.4.1&ISO'"),
            "XDSUnknownPatientId",
        ),
    ],
)
def test_xca_query_rules(
    body: Callable[[], etree._Element],
    expected: str,
    gateway_server: Any,
    signing_identity: tuple[bytes, bytes],
) -> None:
    gw = gateway_server()
    url = f"{gw.url}/riverside-health/xca/query"
    resp = _post(url, ihe.ACTION_XCA_QUERY, body(), _sec(signing_identity))
    assert resp.status_code == 200 and _registry_errors(resp) == [expected]


def test_xml_attack_on_gateway_refused(gateway_server: Any) -> None:
    gw = gateway_server()
    attack = (
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&x;</s:Body></s:Envelope>'
    )
    resp = httpx.post(
        f"{gw.url}/riverside-health/xcpd",
        content=attack,
        headers={"Content-Type": ihe.soap_content_type(ihe.ACTION_XCPD)},
        timeout=5,
    )
    assert resp.status_code == 400 and b"root:" not in resp.content
    assert _fault_subcode(resp) == "wsse:InvalidSecurity"

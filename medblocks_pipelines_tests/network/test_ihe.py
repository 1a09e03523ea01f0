"""IHE message unit tests: envelope/assertion shape, MTOM parsing, error paths via MockTransport
(HTML instead of SOAP, SOAP faults, oversize responses, bad base64)."""

import base64

import httpx
import pytest
from lxml import etree

from medblocks_pipelines.lib.errors import ProtocolError
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.client import GatewayClient, GatewayConfig
from medblocks_pipelines.lib.network.errors import SoapFault

SEC = ihe.SecurityContext(
    subject_id="dr-x",
    organization="Acme",
    organization_id="urn:oid:1.2.3",
    home_community_id="urn:oid:1.2.3.4",
    purpose="T-TREAT",
    npi="1234567893",
)
GW = GatewayConfig(
    id="g1",
    home_community_id="urn:oid:9.9",
    xcpd_url="http://gw/x",
    xca_query_url="http://gw/q",
    xca_retrieve_url="http://gw/r",
    timeout_s=1.0,
)
DEMO = ihe.Demographics(given=("Ana",), family="Rivera", gender="female", birth_date="1980-04-12")


def test_envelope_headers_and_purpose_of_use() -> None:
    a = ihe.build_assertion(SEC, audience="http://gw/q")
    env = etree.fromstring(ihe.envelope(ihe.ACTION_XCA_QUERY, "http://gw/q", etree.Element("b"), a))
    ns = {"s": ihe.SOAP, "wsa": ihe.WSA, "wsse": ihe.WSSE, "saml": ihe.SAML, "hl7": ihe.HL7}
    assert env.findtext("s:Header/wsa:Action", namespaces=ns) == ihe.ACTION_XCA_QUERY
    assert env.find("s:Header/wsa:To", ns).get(f"{{{ihe.SOAP}}}mustUnderstand") == "1"
    assert env.findtext("s:Header/wsa:MessageID", namespaces=ns).startswith("urn:uuid:")
    pou = env.find(".//hl7:PurposeOfUse", ns)
    assert (
        pou.get("code") == "T-TREAT" and pou.get("codeSystem") == "2.16.840.1.113883.3.7204.1.5.2.1"
    )
    npi = [x for x in env.iter(f"{{{ihe.SAML}}}Attribute") if x.get("FriendlyName") == "NPI"][0]
    assert npi.get("NameFormat") == "urn:oasis:names:tc:xspa:2.0:subject:npi"
    assert env.findtext(".//saml:Audience", namespaces=ns) == "http://gw/q"


def test_find_documents_quotes_patient_id_and_sets_home() -> None:
    m = ihe.PatientMatch("p 1", "1.2.840.1", "urn:oid:9.9")
    q = ihe.build_find_documents(m)
    aq = q.find(f"{{{ihe.RIM}}}AdhocQuery")
    assert aq.get("home") == "urn:oid:9.9" and aq.get("id") == ihe.FIND_DOCUMENTS
    vals = {s.get("name"): [v.text for v in s.iter(f"{{{ihe.RIM}}}Value")] for s in aq}
    assert vals["$XDSDocumentEntryPatientId"] == ["'p 1^^^&1.2.840.1&ISO'"]
    assert ihe.ON_DEMAND_ENTRY in vals["$XDSDocumentEntryType"][0]


def _retrieve_body(doc: str) -> bytes:
    resp = (
        f'<x:RetrieveDocumentSetResponse xmlns:x="{ihe.XDSB}" xmlns:rs="{ihe.RS}" xmlns:xop="{ihe.XOP}">'
        f'<rs:RegistryResponse status="{ihe.RESPONSE_SUCCESS}"/><x:DocumentResponse>'
        f"<x:HomeCommunityId>urn:oid:9.9</x:HomeCommunityId><x:RepositoryUniqueId>1</x:RepositoryUniqueId>"
        f"<x:DocumentUniqueId>2</x:DocumentUniqueId><x:mimeType>text/plain</x:mimeType>"
        f"<x:Document>{doc}</x:Document></x:DocumentResponse></x:RetrieveDocumentSetResponse>"
    )
    return (f'<s:Envelope xmlns:s="{ihe.SOAP}"><s:Body>{resp}</s:Body></s:Envelope>').encode()


def test_mtom_multipart_parsed() -> None:
    env = _retrieve_body('<xop:Include href="cid:part%401"/>')
    payload = b"\x00\x01binary\r\n--not-a-boundary\r\n"
    body = (
        b"--B\r\nContent-Type: application/xop+xml\r\nContent-ID: <root>\r\n\r\n"
        + env
        + b"\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-ID: <part@1>\r\n\r\n"
        + payload
        + b"\r\n--B--\r\n"
    )
    msg = ihe.parse_soap(
        body, 'multipart/related; boundary="B"; type="application/xop+xml"; start="<root>"'
    )
    rr = ihe.parse_retrieve_response(msg.body, msg.attachments)
    assert rr.documents[0].content == payload


def test_inline_base64_and_bad_base64() -> None:
    msg = ihe.parse_soap(_retrieve_body(base64.b64encode(b"hello").decode()))
    assert ihe.parse_retrieve_response(msg.body, msg.attachments).documents[0].content == b"hello"
    msg = ihe.parse_soap(_retrieve_body("!!!not base64"))
    with pytest.raises(ProtocolError, match="base64"):
        ihe.parse_retrieve_response(msg.body, msg.attachments)


def test_missing_xop_part() -> None:
    msg = ihe.parse_soap(_retrieve_body('<xop:Include href="cid:gone"/>'))
    with pytest.raises(ProtocolError, match="MIME part"):
        ihe.parse_retrieve_response(msg.body, {})


def test_soap_fault_parsed() -> None:
    fault = (
        f'<s:Envelope xmlns:s="{ihe.SOAP}"><s:Body><s:Fault><s:Code><s:Value>s:Receiver</s:Value>'
        f"<s:Subcode><s:Value>x:Busy</s:Value></s:Subcode></s:Code><s:Reason><s:Text>busy</s:Text></s:Reason>"
        f"</s:Fault></s:Body></s:Envelope>"
    ).encode()
    with pytest.raises(SoapFault) as err:
        ihe.parse_soap(fault)
    assert err.value.code == "s:Receiver" and err.value.subcode == "x:Busy"


@pytest.mark.parametrize(
    "response,status,error",
    [
        (
            httpx.Response(
                502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"}
            ),
            "error",
            "ProtocolError",
        ),  # an HTML error page instead of SOAP
        (
            httpx.Response(
                200, content=b"<not-soap/>", headers={"content-type": "application/soap+xml"}
            ),
            "error",
            "ProtocolError",
        ),  # XML but not an envelope
        (
            httpx.Response(
                200,
                content=b"<a>" + b"x" * 5000 + b"</a>",
                headers={"content-type": "application/soap+xml"},
            ),
            "error",
            "UnsafeXMLError",
        ),  # too big
    ],
)
def test_bad_gateway_answers_become_outcomes(
    response: httpx.Response, status: str, error: str
) -> None:
    client = GatewayClient(
        SEC, transport=httpx.MockTransport(lambda _r: response), max_response_bytes=4000
    )
    [out] = client.run_sync([GW], DEMO)
    assert out.status == status and out.errors == [error]


def test_transport_error_is_reported_not_raised() -> None:
    def boom(_r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    [out] = GatewayClient(SEC, transport=httpx.MockTransport(boom)).run_sync([GW], DEMO)
    assert out.status == "error" and out.errors == ["TransientError"]


def test_timestamp_signature_round_trip(signing_identity: tuple[bytes, bytes]) -> None:
    key, cert = signing_identity
    sec = ihe.SecurityContext(**{**SEC.__dict__, "key_pem": key, "cert_pem": cert})
    a = ihe.build_assertion(sec, audience="http://gw/q")
    env = etree.fromstring(
        ihe.envelope(
            ihe.ACTION_XCA_QUERY, "http://gw/q", etree.Element("b"), a, signing=(key, cert)
        )
    )
    assert ihe.verify_timestamp_signature(env, cert)
    from medblocks_pipelines.lib.network.certs import generate_signing_identity

    assert not ihe.verify_timestamp_signature(env, generate_signing_identity("other")[1])
    env.find(f".//{{{ihe.WSU}}}Created").text = "2001-01-01T00:00:00Z"  # tampered after signing
    assert not ihe.verify_timestamp_signature(env, cert)

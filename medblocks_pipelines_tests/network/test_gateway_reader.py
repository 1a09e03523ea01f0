"""The sandbox gateway reads requests with its own reader, not the product client's parser.

Requests are built with the product's builders and read with the sandbox's reader: the two
implementations must agree on a well-formed request, and the reader must refuse what the spec
refuses even where the client's own parser is lenient (a misplaced ``parameterList``)."""

from dataclasses import replace

import pytest
from lxml import etree

from medblocks_pipelines.lib.network import ihe
from medblocks_sandbox.gateway.reader import (
    UnreadableRequest,
    read_soap_request,
    read_xcpd_demographics,
    timestamp_signature_ok,
)

URL = "http://127.0.0.1:9/riverside/xcpd"
DEMO = ihe.Demographics(
    given=("Ada", "M"),
    family="Lovelace",
    gender="female",
    birth_date="1961-12-10",
    postal_code="02139",
)


def _security(signing: tuple[bytes, bytes]) -> ihe.SecurityContext:
    key, cert = signing
    return ihe.SecurityContext(
        subject_id="dr-x",
        organization="Acme",
        organization_id="urn:oid:1.2.3",
        home_community_id="urn:oid:1.2.3.4",
        purpose="T-TREAT",
        key_pem=key,
        cert_pem=cert,
    )


def _xcpd(demo: ihe.Demographics = DEMO) -> etree._Element:
    return ihe.build_xcpd_request(demo, sender_hcid="1.2.3.4", receiver_hcid="2.3.4.5")


def test_reader_agrees_with_the_client_builder(signing_identity: tuple[bytes, bytes]) -> None:
    sec = _security(signing_identity)
    data = ihe.envelope(
        ihe.ACTION_XCPD,
        URL,
        _xcpd(),
        ihe.build_assertion(sec, audience=URL),
        signing=signing_identity,
    )
    msg = read_soap_request(data)
    assert msg.action == ihe.ACTION_XCPD
    demo = read_xcpd_demographics(msg.body)
    assert (demo.given, demo.family, demo.gender, demo.birth_date, demo.postal_code) == (
        DEMO.given,
        DEMO.family,
        DEMO.gender,
        DEMO.birth_date,
        DEMO.postal_code,
    )
    assert timestamp_signature_ok(msg.root, signing_identity[1])


def test_timestamp_signed_by_another_key_is_refused(signing_identity: tuple[bytes, bytes]) -> None:
    from medblocks_pipelines.lib.network.certs import generate_signing_identity

    other = generate_signing_identity("someone-else")
    data = ihe.envelope(ihe.ACTION_XCPD, URL, _xcpd(), None, signing=other)
    assert not timestamp_signature_ok(read_soap_request(data).root, signing_identity[1])
    unsigned = ihe.envelope(ihe.ACTION_XCPD, URL, _xcpd(), None)
    assert not timestamp_signature_ok(read_soap_request(unsigned).root, signing_identity[1])


def test_doctype_and_oversize_are_unsafe() -> None:
    data = ihe.envelope(ihe.ACTION_XCPD, URL, _xcpd(), None)
    hostile = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>' + data.split(b"?>", 1)[1]
    with pytest.raises(UnreadableRequest) as caught:
        read_soap_request(hostile)
    assert caught.value.unsafe
    with pytest.raises(UnreadableRequest) as caught:
        read_soap_request(data, max_bytes=len(data) - 1)
    assert caught.value.unsafe


def test_not_an_envelope_or_two_body_children_is_malformed() -> None:
    with pytest.raises(UnreadableRequest) as caught:
        read_soap_request(b"<Envelope/>")
    assert not caught.value.unsafe
    root = etree.fromstring(ihe.envelope(ihe.ACTION_XCPD, URL, _xcpd(), None))
    root.find(f"{{{ihe.SOAP}}}Body").append(_xcpd())
    with pytest.raises(UnreadableRequest, match="exactly one element"):
        read_soap_request(etree.tostring(root))


def test_misplaced_parameter_list_is_refused_where_the_client_parser_accepts_it() -> None:
    request = _xcpd()
    params = request.find(f".//{{{ihe.HL7}}}parameterList")
    params.getparent().remove(params)
    request.append(params)  # directly under the message root: not where ITI-55 puts it
    assert ihe.parse_xcpd_request(request).family == DEMO.family  # the client's reader is lenient
    with pytest.raises(UnreadableRequest, match="parameterList"):
        read_xcpd_demographics(request)


def test_name_and_birth_time_are_required() -> None:
    with pytest.raises(UnreadableRequest, match="livingSubjectBirthTime"):
        read_xcpd_demographics(_xcpd(replace(DEMO, birth_date="")))
    with pytest.raises(UnreadableRequest, match="family"):
        read_xcpd_demographics(_xcpd(replace(DEMO, family="")))

"""Untrusted XML: XXE, entity expansion, huge documents and garbage are refused with a clear error,
both by the parser and at the gateway client/converter boundaries."""

import pytest

from medblocks_pipelines.lib.network.ccda import SourceDocument, convert_ccda
from medblocks_pipelines.lib.network.errors import UnsafeXMLError
from medblocks_pipelines.lib.network.ihe import parse_soap
from medblocks_pipelines.lib.network.safexml import parse_untrusted

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<r>&xxe;</r>"""
XXE_NET = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "http://127.0.0.1:9/evil">]><r>&xxe;</r>"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<lolz>&lol4;</lolz>"""
PARAM_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]><r/>"""
UTF16_XXE = (
    XXE.decode().replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16")
)


@pytest.mark.parametrize(
    "payload",
    [
        XXE,  # external entity to a local file
        XXE_NET,  # external entity over the network
        LAUGHS,  # billion laughs (nested entity expansion)
        PARAM_ENTITY,  # parameter entity loading an external DTD
        UTF16_XXE,  # the same attack in another encoding (byte scans would miss it)
    ],
)
def test_entity_attacks_refused(payload: bytes) -> None:
    with pytest.raises(UnsafeXMLError) as err:
        parse_untrusted(payload)
    assert "passwd" not in str(err.value) and "root:" not in str(err.value)


def test_size_limit_refused_before_parsing() -> None:
    big = b"<r>" + b"a" * 2_000 + b"</r>"
    with pytest.raises(UnsafeXMLError, match="over the 1000-byte limit"):
        parse_untrusted(big, max_bytes=1000)


def test_malformed_refused() -> None:
    with pytest.raises(UnsafeXMLError, match="not well-formed"):
        parse_untrusted(b"<r><unclosed></r>")


def test_deep_nesting_refused() -> None:
    # libxml2 refuses depth over 256 without huge_tree: a cheap stack-exhaustion guard.
    deep = b"<a>" * 5000 + b"</a>" * 5000
    with pytest.raises(UnsafeXMLError):
        parse_untrusted(deep)


def test_plain_xml_parses() -> None:
    assert parse_untrusted(b"<r a='1'><b>x</b></r>").find("b").text == "x"


def test_soap_with_doctype_refused() -> None:
    env = (
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x "y">]>'
        b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body><a>&x;</a></e:Body></e:Envelope>'
    )
    with pytest.raises(UnsafeXMLError):
        parse_soap(env)


def test_ccda_attack_refused_by_converter() -> None:
    src = SourceDocument("urn:oid:1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(UnsafeXMLError):
        convert_ccda(LAUGHS, src)

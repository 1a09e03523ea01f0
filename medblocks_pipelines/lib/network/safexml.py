"""Parse untrusted XML (SOAP envelopes, C-CDA documents) safely.

A hardened lxml parser never resolves entities, never touches the network, never loads a DTD and keeps
libxml2's ``huge_tree`` limits on. On top of that we refuse any document that carries a DOCTYPE at all:
SOAP 1.2 (Part 1, 5) forbids a Document Type Declaration in a message, and a C-CDA document has no use
for one, so every external-entity and entity-expansion attack is refused before it can do anything.
A size limit is checked before a single byte is parsed.
"""

from lxml import etree

from medblocks_pipelines.lib.network.errors import UnsafeXMLError

#: Default ceiling for a SOAP message or a C-CDA document (bytes).
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_untrusted(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "XML"
) -> etree._Element:
    """Parse ``data`` and return the root element, or raise :class:`UnsafeXMLError`.

    Refused: more than ``max_bytes``; any DOCTYPE (internal subsets declare the entities that XXE and
    "billion laughs" need); entity references left in the tree; malformed XML. ``what`` names the
    document kind in the message (never its content).
    """
    if not isinstance(data, bytes | bytearray):
        raise UnsafeXMLError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise UnsafeXMLError(f"{what}: {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        root = etree.fromstring(bytes(data), parser=_parser())
    except etree.XMLSyntaxError as exc:
        # libxml2 reports amplification ("entity amplification", "huge") as syntax errors too.
        raise UnsafeXMLError(
            f"{what}: not well-formed or refused by the parser ({exc.msg})"
        ) from None
    if root is None:
        raise UnsafeXMLError(f"{what}: empty document")
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise UnsafeXMLError(f"{what}: a DOCTYPE is not allowed (entity declarations are refused)")
    for _ in root.iter(etree.Entity):
        raise UnsafeXMLError(f"{what}: entity references are not allowed")
    return root

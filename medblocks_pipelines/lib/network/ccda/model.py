"""C-CDA conversion: where a document came from, what it produced, the section map."""

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from medblocks_pipelines.lib.network.ccda.common import (
    Flags,
    stable_id,
)

T = "2.16.840.1.113883.10.20.22"
SOURCE_DOCUMENT_EXT = "https://medblocks.dev/fhir/StructureDefinition/source-document"
CDA_ENTRY_EXT = "https://medblocks.dev/fhir/StructureDefinition/cda-entry-id"

#: domain -> (section templateId roots, LOINC section code)
SECTIONS: dict[str, tuple[frozenset[str], str]] = {
    "problems": (frozenset({f"{T}.2.5.1", f"{T}.2.5"}), "11450-4"),
    "allergies": (frozenset({f"{T}.2.6.1", f"{T}.2.6"}), "48765-2"),
    "medications": (frozenset({f"{T}.2.1.1", f"{T}.2.1"}), "10160-0"),
    "results": (frozenset({f"{T}.2.3.1", f"{T}.2.3"}), "30954-2"),
    "vitals": (frozenset({f"{T}.2.4.1", f"{T}.2.4"}), "8716-3"),
    "immunizations": (frozenset({f"{T}.2.2.1", f"{T}.2.2"}), "11369-6"),
    "procedures": (frozenset({f"{T}.2.7.1", f"{T}.2.7"}), "47519-4"),
    "encounters": (frozenset({f"{T}.2.22.1", f"{T}.2.22"}), "46240-8"),
    "social": (frozenset({f"{T}.2.17"}), "29762-2"),
}
_BY_LOINC = {loinc: dom for dom, (_, loinc) in SECTIONS.items()}


@dataclass(frozen=True)
class SourceDocument:
    """Where a document came from (XCA coordinates) and what it was called."""

    home_community_id: str
    repository_unique_id: str
    document_unique_id: str
    mime_type: str = "text/xml"
    organization: str | None = None

    @property
    def uri(self) -> str:
        """A URI for ``meta.source``: the document unique id as an OID/UUID URN."""
        doc = self.document_unique_id
        if re.fullmatch(r"[0-2](\.\d+)+", doc):
            return f"urn:oid:{doc}"
        if re.fullmatch(r"(urn:uuid:)?[0-9a-fA-F-]{36}", doc):
            return doc.lower() if doc.startswith("urn:") else f"urn:uuid:{doc.lower()}"
        return f"urn:ihe:xds:document:{doc}"

    @property
    def reference_id(self) -> str:
        """The id of the DocumentReference (and Binary) describing this document."""
        return stable_id(
            "doc", self.home_community_id, self.repository_unique_id, self.document_unique_id
        )


@dataclass(frozen=True)
class Quarantined:
    """An entry (or document) that could not be converted, with the reason."""

    raw: str
    reason: str
    resource_type: str | None
    origin: str


@dataclass
class ConversionResult:
    """What one document produced."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    flags: Flags = field(default_factory=Flags)
    sections_found: list[str] = field(default_factory=list)

    def counts_by_type(self) -> dict[str, int]:
        """Resource counts per resourceType."""
        out: dict[str, int] = {}
        for r in self.resources:
            out[r["resourceType"]] = out.get(r["resourceType"], 0) + 1
        return out


def binary_resources(
    content: bytes, source: SourceDocument, *, patient_ref: str | None, title: str | None = None
) -> list[dict[str, Any]]:
    """DocumentReference + Binary for a stored document (any mime type: C-CDA, PDF, TIFF...)."""
    doc_id = source.reference_id
    binary = {
        "resourceType": "Binary",
        "id": doc_id,
        "meta": {"source": source.uri},
        "contentType": source.mime_type,
        "data": base64.b64encode(content).decode("ascii"),
    }
    docref: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "meta": {"source": source.uri},
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": source.uri},
        "identifier": [
            {"system": "urn:ihe:iti:xca:2010:homeCommunityId", "value": source.home_community_id},
            {
                "system": "urn:ihe:iti:xds:2007:repositoryUniqueId",
                "value": source.repository_unique_id,
            },
        ],
        "status": "current",
        "content": [
            {
                "attachment": {
                    "contentType": source.mime_type,
                    "url": f"Binary/{doc_id}",
                    "size": len(content),
                    **({"title": title} if title else {}),
                }
            }
        ],
    }
    if patient_ref:
        docref["subject"] = {"reference": patient_ref}
    if source.organization:
        docref["custodian"] = {"display": source.organization}
    return [docref, binary]

"""The converter state and the helpers every section uses (ids, resource base, quarantine)."""

from typing import Any

from lxml import etree

from medblocks_pipelines.lib.network.ccda.common import (
    Flags,
    Narrative,
    attr,
    effective,
    entry_key,
    identifiers,
    q,
    stable_id,
    ts_offset,
    ts_to_fhir,
)
from medblocks_pipelines.lib.network.ccda.model import (
    SOURCE_DOCUMENT_EXT,
    ConversionResult,
    Quarantined,
    SourceDocument,
)


class ConverterBase:
    """One document being converted: its state and the shared helpers."""

    def __init__(self, root: etree._Element, source: SourceDocument) -> None:
        self.root = root
        self.source = source
        self.flags = Flags()
        self.result = ConversionResult(flags=self.flags)
        self.narrative = Narrative(root)
        eff = root.find(q("effectiveTime"))
        self.tz = ts_offset(attr(eff, "value"))
        self.doc_time = ts_to_fhir(attr(eff, "value"), default_tz=self.tz, flags=self.flags)
        self.patient_ref: str | None = None
        self.scope = source.home_community_id

    # -- helpers -----------------------------------------------------------------------------
    def _id(self, kind: str, el: etree._Element) -> str:
        key = entry_key(el)
        if key is not None:
            return stable_id(self.scope, kind, key)
        # No CDA id: stable within this document only (its path inside the document).
        self.flags.add("entry_without_id")
        return stable_id(self.scope, kind, self.source.document_unique_id, self._path(el))

    def _base(self, rtype: str, rid: str, el: etree._Element) -> dict[str, Any]:
        res: dict[str, Any] = {
            "resourceType": rtype,
            "id": rid,
            "meta": {"source": self.source.uri},
            "extension": [
                {
                    "url": SOURCE_DOCUMENT_EXT,
                    "valueReference": {
                        "reference": f"DocumentReference/{self.source.reference_id}"
                    },
                }
            ],
        }
        ids = identifiers(el)
        if ids:
            res["identifier"] = ids
        if self.patient_ref:
            key = "patient" if rtype in ("AllergyIntolerance", "Immunization") else "subject"
            res[key] = {"reference": self.patient_ref}
        return res

    def _quarantine(self, el: etree._Element, reason: str, rtype: str | None, domain: str) -> None:
        raw = etree.tostring(el, encoding="unicode")
        self.result.quarantined.append(
            Quarantined(raw, reason, rtype, f"{self.source.uri}#{domain}")
        )
        self.flags.add(f"quarantined_{domain}")

    def _eff(self, el: etree._Element) -> tuple[str | None, str | None, str | None, bool]:
        return effective(el.find(q("effectiveTime")), default_tz=self.tz, flags=self.flags)

    def _author_time(self, *els: etree._Element) -> str | None:
        for el in els:
            t = el.find(f"{q('author')}/{q('time')}")
            if t is not None and t.get("value"):
                return ts_to_fhir(t.get("value"), default_tz=self.tz, flags=self.flags)
        return None

    def _rel(self, el: etree._Element, type_code: str | None = None) -> list[etree._Element]:
        out: list[etree._Element] = []
        for er in el.findall(q("entryRelationship")):
            if type_code and er.get("typeCode") != type_code:
                continue
            out.extend(c for c in er if isinstance(c.tag, str))
        return out

    def _path(self, el: etree._Element) -> str:
        return str(el.getroottree().getpath(el))

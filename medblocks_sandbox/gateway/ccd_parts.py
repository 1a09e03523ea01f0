"""The CDA building blocks the CCD renderer shares: namespaces, code-system OIDs, element,
templateId and timestamp helpers, `_Doc` (ids, codes, times per document) and the narrative table.
"""

from datetime import datetime
from typing import Any

from lxml import etree

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
SDTC = "urn:hl7-org:sdtc"
T = "2.16.840.1.113883.10.20.22"

URI_TO_OID = {
    "http://loinc.org": "2.16.840.1.113883.6.1",
    "http://snomed.info/sct": "2.16.840.1.113883.6.96",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "2.16.840.1.113883.6.88",
    "http://hl7.org/fhir/sid/cvx": "2.16.840.1.113883.12.292",
    "http://hl7.org/fhir/sid/icd-10-cm": "2.16.840.1.113883.6.90",
    "http://www.ama-assn.org/go/cpt": "2.16.840.1.113883.6.12",
    "http://hl7.org/fhir/sid/ndc": "2.16.840.1.113883.6.69",
    "http://terminology.hl7.org/CodeSystem/v3-ActCode": "2.16.840.1.113883.5.4",
}


def _e(parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, f"{{{V3}}}{tag}")
    for k, v in attrs.items():
        if k == "xsi_type":
            el.set(f"{{{XSI}}}type", v)
        else:
            el.set(k, v)
    return el


def _tid(parent: etree._Element, root: str, ext: str | None = "2015-08-01") -> None:
    if ext:
        _e(parent, "templateId", root=root, extension=ext)
    else:
        _e(parent, "templateId", root=root)


def _ts(value: str | None) -> str | None:
    """FHIR date/dateTime -> HL7 TS (keeps precision and offset)."""
    if not value:
        return None
    if "T" not in value:
        return value.replace("-", "")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    off = dt.strftime("%z") or "+0000"
    return dt.strftime("%Y%m%d%H%M%S") + off


def _oid(system: str | None) -> str:
    if not system:
        return "2.16.840.1.113883.6.96"
    if system in URI_TO_OID:
        return URI_TO_OID[system]
    if system.startswith("urn:oid:"):
        return system[8:]
    # An unknown code system URI: keep it as an opaque, made-up-but-stable OID under our arc.
    return "2.16.840.1.113883.3.9999." + str(abs(hash(system)) % 100000)


class _Doc:
    def __init__(self, org: dict[str, Any], flaws: frozenset[str]) -> None:
        self.org = org
        self.flaws = flaws
        self.n = 0

    def ref_id(self) -> str:
        self.n += 1
        return f"ref{self.n}"

    def ii(self, parent: etree._Element, kind: str, fhir_id: str) -> None:
        _e(parent, "id", root=f"{self.org['oid']}.{kind}", extension=fhir_id)

    def cd(
        self,
        parent: etree._Element,
        tag: str,
        cc: dict[str, Any] | None,
        *,
        narrative: etree._Element | None = None,
        xsi: bool = False,
        null_root: bool = False,
    ) -> etree._Element:
        codings = (cc or {}).get("coding") or []
        el = _e(parent, tag, **({"xsi_type": "CD"} if xsi else {}))
        if not codings or null_root:
            el.set("nullFlavor", "OTH" if codings else "UNK")
        else:
            c = codings[0]
            el.set("code", str(c.get("code")))
            el.set("codeSystem", _oid(c.get("system")))
            if c.get("display"):
                el.set("displayName", c["display"])
        text = (cc or {}).get("text") or (codings[0].get("display") if codings else None)
        if text and narrative is not None:
            rid = self.ref_id()
            td = etree.SubElement(narrative, f"{{{V3}}}td", ID=rid)
            td.text = text
            ot = _e(el, "originalText")
            _e(ot, "reference", value=f"#{rid}")
        for c in codings[(0 if null_root else 1) :]:
            _e(
                el,
                "translation",
                code=str(c.get("code")),
                codeSystem=_oid(c.get("system")),
                **({"displayName": c["display"]} if c.get("display") else {}),
            )
        return el

    def time(
        self, parent: etree._Element, tag: str, value: str | None, **attrs: str
    ) -> etree._Element:
        ts = _ts(value)
        if ts and "no_tz" in self.flaws and len(ts) > 8:
            ts = ts[:14]  # drop the offset: a common real-world flaw
        return (
            _e(parent, tag, value=ts, **attrs) if ts else _e(parent, tag, nullFlavor="UNK", **attrs)
        )

    def ivl(
        self,
        parent: etree._Element,
        start: str | None,
        end: str | None,
        *,
        unknown_end: bool = False,
    ) -> None:
        et = _e(parent, "effectiveTime")
        self.time(et, "low", start)
        if end:
            self.time(et, "high", end)
        elif unknown_end:
            _e(et, "high", nullFlavor="UNK")


def _section(
    body: etree._Element, root: str, loinc: str, title: str
) -> tuple[etree._Element, etree._Element]:
    comp = _e(body, "component")
    sec = _e(comp, "section")
    _tid(sec, root, "2015-08-01")
    _tid(sec, root, None)
    _e(sec, "code", code=loinc, codeSystem="2.16.840.1.113883.6.1", codeSystemName="LOINC")
    t = _e(sec, "title")
    t.text = title
    text = _e(sec, "text")
    table = etree.SubElement(text, f"{{{V3}}}table")
    tbody = etree.SubElement(table, f"{{{V3}}}tbody")
    return sec, tbody


def _row(tbody: etree._Element) -> etree._Element:
    return etree.SubElement(tbody, f"{{{V3}}}tr")


def _category(res: dict[str, Any]) -> set[str]:
    return {
        c.get("code", "")
        for cat in res.get("category", []) or []
        for c in (cat.get("coding") or [])
    }


def _ref_id(ref: dict[str, Any] | None) -> str | None:
    r = (ref or {}).get("reference") or ""
    return r.split("/")[-1] if r else None

"""Shared C-CDA data-type helpers: TS dates, CD codes, II ids, stable resource ids (SPECS 6.3)."""

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
SDTC = "urn:hl7-org:sdtc"
NS = {"v3": V3, "xsi": XSI, "sdtc": SDTC}
XSI_TYPE = f"{{{XSI}}}type"


def q(tag: str) -> str:
    """Clark name of an HL7 v3 element."""
    return f"{{{V3}}}{tag}"


#: Code system OIDs mapped to FHIR canonical URIs (SPECS 6.3); anything else becomes ``urn:oid:``.
OID_TO_URI: dict[str, str] = {
    "2.16.840.1.113883.6.1": "http://loinc.org",
    "2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "2.16.840.1.113883.6.69": "http://hl7.org/fhir/sid/ndc",
    "2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
    "2.16.840.1.113883.6.285": "urn:oid:2.16.840.1.113883.6.285",
    "2.16.840.1.113883.6.4": "http://www.cms.gov/Medicare/Coding/ICD10",
    "2.16.840.1.113883.4.9": "http://fdasis.nlm.nih.gov",
    "2.16.840.1.113883.5.4": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "2.16.840.1.113883.5.1": "http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender",
    "2.16.840.1.113883.5.83": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    "2.16.840.1.113883.5.8": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "2.16.840.1.113883.5.1063": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "2.16.840.1.113883.3.26.1.1": "http://ncithesaurus-stage.nci.nih.gov",
    "2.16.840.1.113883.4.1": "http://hl7.org/fhir/sid/us-ssn",
    "2.16.840.1.113883.4.6": "http://hl7.org/fhir/sid/us-npi",
}


@dataclass
class Flags:
    """Conversion notes counted per document (never patient data)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        """Count one occurrence of ``name``."""
        self.counts[name] = self.counts.get(name, 0) + n


_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?P<f>\.\d+)?(?P<tz>[+-]\d{4})?$"
)


def ts_offset(value: str | None) -> str | None:
    """The ``+hhmm`` offset of a TS, if it has one."""
    m = _TS.match(value or "")
    return m.group("tz") if m else None


def ts_to_fhir(value: str | None, *, default_tz: str | None, flags: Flags) -> str | None:
    """Convert an HL7 TS to a FHIR date/dateTime keeping its precision.

    ``20230531`` -> ``2023-05-31`` (never midnight UTC). A time without an offset takes the
    document's offset; without one either, the time is dropped and the date kept (flagged).
    """
    if not value:
        return None
    m = _TS.match(value.strip())
    if not m:
        flags.add("invalid_date")
        return None
    y, mo, d, h, mi, s, frac, tz = m.group("y", "mo", "d", "h", "mi", "s", "f", "tz")
    if mo and not 1 <= int(mo) <= 12 or d and not 1 <= int(d) <= 31:
        flags.add("invalid_date")
        return None
    date = y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")
    if not (h and d):
        return date
    if not tz and default_tz:
        flags.add("time_zone_from_document")
    tz = tz or default_tz
    if not tz:
        flags.add("time_without_zone")
        return date
    clock = f"{h}:{mi or '00'}:{s or '00'}{frac or ''}"
    return f"{date}T{clock}{tz[:3]}:{tz[3:]}"


def attr(el: etree._Element | None, name: str) -> str | None:
    """An attribute value, or ``None`` for a missing element/attribute."""
    if el is None:
        return None
    v = el.get(name)
    return v if v not in (None, "") else None


def has_null(el: etree._Element | None) -> bool:
    """True when ``el`` is missing or carries a nullFlavor."""
    return el is None or el.get("nullFlavor") is not None


def template_roots(el: etree._Element) -> set[str]:
    """The templateId roots of an element (extensions ignored, SPECS 6.1)."""
    return {t.get("root", "") for t in el.findall(q("templateId"))}


def system_uri(oid: str | None) -> str | None:
    """FHIR system URI for a code-system OID (or a UUID/URI passed through)."""
    if not oid:
        return None
    if oid in OID_TO_URI:
        return OID_TO_URI[oid]
    if re.fullmatch(r"[0-2](\.\d+)+", oid):
        return f"urn:oid:{oid}"
    if re.fullmatch(r"[0-9a-fA-F-]{36}", oid):
        return f"urn:uuid:{oid.lower()}"
    return oid


def _coding(el: etree._Element) -> dict[str, Any] | None:
    code = attr(el, "code")
    if code is None or el.get("nullFlavor") is not None:
        return None
    c: dict[str, Any] = {"code": code}
    sys = system_uri(attr(el, "codeSystem"))
    if sys:
        c["system"] = sys
    if attr(el, "displayName"):
        c["display"] = el.get("displayName")
    return c


class Narrative:
    """Resolves ``reference/@value="#id"`` pointers into the section narrative."""

    def __init__(self, root: etree._Element) -> None:
        self._ids: dict[str, etree._Element] = {}
        for el in root.iter():
            if not isinstance(el.tag, str):
                continue
            ident = el.get("ID")
            if ident:
                self._ids[ident] = el

    def text_of(self, el: etree._Element | None) -> str | None:
        """The text of an ``originalText``/``text`` element, following its reference."""
        if el is None:
            return None
        ref = el.find(q("reference"))
        if ref is not None and (ref.get("value") or "").startswith("#"):
            target = self._ids.get(ref.get("value", "")[1:])
            if target is not None:
                txt = " ".join("".join(target.itertext()).split())
                return txt or None
        own = " ".join((el.text or "").split())
        return own or None


def codeable(
    el: etree._Element | None, narrative: Narrative | None = None
) -> dict[str, Any] | None:
    """CD/CE -> CodeableConcept with translations and originalText; ``None`` if nothing usable.

    A root ``nullFlavor="OTH"`` with real codes only in ``translation`` is common: the
    translations still become codings. Codes are never invented.
    """
    if el is None:
        return None
    codings = []
    root = _coding(el)
    if root:
        codings.append(root)
    for t in el.findall(q("translation")):
        c = _coding(t)
        if c and c not in codings:
            codings.append(c)
    cc: dict[str, Any] = {}
    if codings:
        cc["coding"] = codings
    text = narrative.text_of(el.find(q("originalText"))) if narrative else None
    if text:
        cc["text"] = text
    elif root and root.get("display"):
        cc["text"] = root["display"]
    return cc or None


def identifiers(el: etree._Element) -> list[dict[str, Any]]:
    """``id`` children -> FHIR Identifiers (root+extension, or root only as a URI)."""
    out = []
    for i in el.findall(q("id")):
        root = attr(i, "root")
        if root is None or i.get("nullFlavor") is not None:
            continue
        ext = attr(i, "extension")
        if ext is not None:
            out.append({"system": system_uri(root), "value": ext})
        else:
            uri = system_uri(root) or root
            if re.fullmatch(r"[0-9a-fA-F-]{36}", root):
                uri = f"urn:uuid:{root.lower()}"
            out.append({"system": "urn:ietf:rfc:3986", "value": uri})
    return out


def stable_id(*parts: str) -> str:
    """A FHIR id (<= 64 chars, ``[A-Za-z0-9-.]``) derived from stable parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"cda-{digest[:40]}"


def entry_key(el: etree._Element) -> str | None:
    """The CDA identity of a clinical statement (first usable id), for de-duplication."""
    for i in el.findall(q("id")):
        root = attr(i, "root")
        if root and i.get("nullFlavor") is None:
            return f"{root.lower()}|{attr(i, 'extension') or ''}"
    return None


def effective(
    el: etree._Element | None, *, default_tz: str | None, flags: Flags
) -> tuple[str | None, str | None, str | None, bool]:
    """``effectiveTime`` -> (point, low, high, high_unknown).

    A point comes from ``@value``; an interval from ``low``/``high``. ``high_unknown`` marks
    ``high@nullFlavor`` (e.g. resolved, date unknown).
    """
    if el is None or el.get("nullFlavor") is not None and len(el) == 0:
        return None, None, None, False
    point = ts_to_fhir(attr(el, "value"), default_tz=default_tz, flags=flags)
    low_el, high_el = el.find(q("low")), el.find(q("high"))
    low = ts_to_fhir(attr(low_el, "value"), default_tz=default_tz, flags=flags)
    high = ts_to_fhir(attr(high_el, "value"), default_tz=default_tz, flags=flags)
    high_unknown = high_el is not None and high_el.get("nullFlavor") is not None
    return point, low, high, high_unknown


def quantity(el: etree._Element) -> dict[str, Any] | None:
    """PQ -> Quantity (UCUM); ``None`` if the value is absent or not a number."""
    raw = attr(el, "value")
    if raw is None:
        return None
    try:
        value: float | int = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        return None
    out: dict[str, Any] = {"value": value}
    unit = attr(el, "unit")
    if unit and unit != "1":
        out.update({"unit": unit, "system": "http://unitsofmeasure.org", "code": unit})
    return out

"""C-CDA R2.1 -> FHIR R4 resources (SPECS 6.1-6.3; C-CDA on FHIR mapping IG, CF-*.html).

One call converts one document. Sections are found by ``templateId/@root`` (entries-required and
entries-optional roots, extension ignored) with the LOINC section code as fallback; sections may be
nested. Every resource gets a deterministic id from its CDA ``id`` (scoped by the community that
sent it), so the same problem repeated in every CCD lands as the same resource, and carries the
source document in ``meta.source`` plus an extension pointing at the document's DocumentReference.

Nothing is dropped silently: an entry that cannot become a valid resource (no usable code, an
unrecognised entry in a known section) is returned in ``quarantined`` with a reason; missing and
narrative-only sections are counted in ``flags``.
"""

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from medblocks_pipelines.lib.network.ccda.common import (
    XSI_TYPE,
    Flags,
    Narrative,
    attr,
    codeable,
    effective,
    entry_key,
    has_null,
    identifiers,
    q,
    quantity,
    stable_id,
    system_uri,
    template_roots,
    ts_offset,
    ts_to_fhir,
)
from medblocks_pipelines.lib.network.safexml import parse_untrusted

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


class _Converter:
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
        return el.getroottree().getpath(el)

    # -- document ------------------------------------------------------------------------------
    def run(self) -> ConversionResult:
        if self.root.tag != q("ClinicalDocument"):
            raise ValueError("not a CDA ClinicalDocument")
        self._patient()
        self._document()
        body = self.root.find(f"{q('component')}/{q('structuredBody')}")
        if body is None:
            self.flags.add("no_structured_body")
            return self.result
        for section in body.iter(q("section")):
            domain = self._domain(section)
            if domain is None:
                self.flags.add("section_not_converted")
                continue
            self.result.sections_found.append(domain)
            entries = section.findall(q("entry"))
            if section.get("nullFlavor") is not None or not entries:
                self.flags.add(f"section_empty_{domain}")
                continue
            for entry in entries:
                stmt = next((c for c in entry if isinstance(c.tag, str)), None)
                if stmt is None:
                    continue
                if stmt.get("nullFlavor") is not None:
                    # "No information" / "unknown" on the whole entry (e.g. an immunization status
                    # or a pregnancy observation of nullFlavor UNK): its codes assert nothing.
                    self._quarantine(
                        stmt, f"entry has nullFlavor {stmt.get('nullFlavor')}", None, domain
                    )
                    continue
                try:
                    getattr(self, f"_do_{domain}")(stmt)
                except (ValueError, TypeError, KeyError) as exc:
                    self._quarantine(stmt, f"conversion error: {type(exc).__name__}", None, domain)
        for dom in SECTIONS:
            if dom not in self.result.sections_found:
                self.flags.add(f"section_missing_{dom}")
        self._provenance()
        return self.result

    def _domain(self, section: etree._Element) -> str | None:
        roots = template_roots(section)
        for dom, (tids, _) in SECTIONS.items():
            if roots & tids:
                return dom
        code = section.find(q("code"))
        if code is not None and code.get("code") in _BY_LOINC:
            self.flags.add("section_by_loinc")
            return _BY_LOINC[code.get("code", "")]
        return None

    def _patient(self) -> None:
        role = self.root.find(f"{q('recordTarget')}/{q('patientRole')}")
        if role is None:
            self.flags.add("no_record_target")
            return
        pid = self._id("Patient", role)
        pat: dict[str, Any] = {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"source": self.source.uri},
        }
        ids = identifiers(role)
        if ids:
            pat["identifier"] = ids
        person = role.find(q("patient"))
        if person is not None:
            names = []
            for n in person.findall(q("name")):
                given = [" ".join((g.text or "").split()) for g in n.findall(q("given"))]
                fam = n.find(q("family"))
                name: dict[str, Any] = {}
                if fam is not None and fam.text:
                    name["family"] = fam.text.strip()
                if any(given):
                    name["given"] = [g for g in given if g]
                if name:
                    names.append(name)
            if names:
                pat["name"] = names
            gender = attr(person.find(q("administrativeGenderCode")), "code")
            g = {"M": "male", "F": "female", "UN": "other"}.get(gender or "")
            pat["gender"] = g or "unknown"
            exts = []
            for tag, url in (
                ("raceCode", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"),
                (
                    "ethnicGroupCode",
                    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                ),
            ):
                codes = person.findall(q(tag)) + person.findall(f"{{urn:hl7-org:sdtc}}{tag}")
                subs: list[dict[str, Any]] = []
                for c in codes:
                    if c.get("code") and c.get("codeSystem") == "2.16.840.1.113883.6.238":
                        coding = {
                            "system": "urn:oid:2.16.840.1.113883.6.238",
                            "code": c.get("code"),
                        }
                        if c.get("displayName"):
                            coding["display"] = c.get("displayName")
                        # OMB categories sit in raceCode; detailed ones in sdtc:raceCode.
                        kind = "ombCategory" if c.tag == q(tag) else "detailed"
                        subs.append({"url": kind, "valueCoding": coding})
                if subs:
                    text = next(
                        (
                            s["valueCoding"].get("display")
                            for s in subs
                            if s["valueCoding"].get("display")
                        ),
                        subs[0]["valueCoding"]["code"],
                    )
                    # us-core-race/-ethnicity require the text sub-extension.
                    exts.append(
                        {"url": url, "extension": [*subs, {"url": "text", "valueString": text}]}
                    )
            if exts:
                pat["extension"] = exts
            bt = attr(person.find(q("birthTime")), "value")
            if bt:
                bd = ts_to_fhir(bt[:8], default_tz=None, flags=self.flags)
                if bd:
                    pat["birthDate"] = bd
        addrs = []
        for a in role.findall(q("addr")):
            if a.get("nullFlavor") is not None:
                continue
            ad: dict[str, Any] = {}
            lines = [x.text.strip() for x in a.findall(q("streetAddressLine")) if x.text]
            if lines:
                ad["line"] = lines
            for tag, key in (("city", "city"), ("state", "state"), ("postalCode", "postalCode")):
                x = a.find(q(tag))
                if x is not None and x.text:
                    ad[key] = x.text.strip()
            if ad:
                addrs.append(ad)
        if addrs:
            pat["address"] = addrs
        tels = []
        for t in role.findall(q("telecom")):
            v = attr(t, "value")
            if not v:
                continue
            if v.startswith("tel:"):
                tels.append({"system": "phone", "value": v[4:]})
            elif v.startswith("mailto:"):
                tels.append({"system": "email", "value": v[7:]})
        if tels:
            pat["telecom"] = tels
        self.patient_ref = f"Patient/{pid}"
        self.result.resources.append(pat)

    def _document(self) -> None:
        docref, _binary = binary_resources(b"", self.source, patient_ref=self.patient_ref)
        # The C-CDA itself is stored as Binary by the caller; here we describe the document.
        t = codeable(self.root.find(q("code")), self.narrative)
        if t:
            docref["type"] = t
        if self.doc_time and "T" in self.doc_time:
            # DocumentReference.date is an instant: only a full time with an offset fits.
            docref["date"] = self.doc_time
        title = self.root.find(q("title"))
        docref["content"][0]["attachment"].pop("size", None)
        if title is not None and title.text:
            docref["description"] = title.text.strip()
        docref["content"][0]["format"] = {
            "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
            "code": "urn:hl7-org:sdwg:ccda-structuredBody:2.1",
        }
        self.result.resources.append(docref)

    def _provenance(self) -> None:
        targets = [
            {"reference": f"{r['resourceType']}/{r['id']}"}
            for r in self.result.resources
            if r["resourceType"] not in ("DocumentReference",)
        ]
        if not targets:
            return
        recorded = self.doc_time if self.doc_time and "T" in self.doc_time else None
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": stable_id("prov", self.source.reference_id),
            "meta": {"source": self.source.uri},
            "target": targets,
            "recorded": recorded or "1970-01-01T00:00:00Z",
            "agent": [{"who": {"display": self.source.organization or self.scope}}],
            "entity": [
                {
                    "role": "source",
                    "what": {"reference": f"DocumentReference/{self.source.reference_id}"},
                }
            ],
        }
        if recorded is None:
            self.flags.add("provenance_without_document_time")
        self.result.resources.append(prov)

    # -- problems --------------------------------------------------------------------------------
    def _do_problems(self, stmt: etree._Element, category: str = "problem-list-item") -> list[str]:
        roots = template_roots(stmt)
        if stmt.tag == q("act") and (
            f"{T}.4.3" in roots or attr(stmt.find(q("code")), "code") == "CONC"
        ):
            obs = [o for o in self._rel(stmt, "SUBJ") if o.tag == q("observation")]
            if not obs:
                self._quarantine(
                    stmt, "problem concern without a problem observation", "Condition", "problems"
                )
                return []
            ids = []
            for o in obs:
                cid = self._condition(o, stmt, category)
                if cid:
                    ids.append(cid)
            return ids
        if stmt.tag == q("observation") and (
            f"{T}.4.4" in roots or stmt.find(q("value")) is not None
        ):
            cid = self._condition(stmt, None, category)
            return [cid] if cid else []
        self._quarantine(stmt, "unrecognised entry in problem section", None, "problems")
        return []

    def _condition(
        self, obs: etree._Element, concern: etree._Element | None, category: str
    ) -> str | None:
        value = obs.find(q("value"))
        code = codeable(value, self.narrative)
        negated = obs.get("negationInd") == "true"
        if code is None:
            text = self.narrative.text_of(obs.find(q("text")))
            if text and not negated:
                code = {"text": text}
                self.flags.add("problem_text_only")
        if code is None and not negated:
            self._quarantine(
                obs, "problem observation without a diagnosis code or text", "Condition", "problems"
            )
            return None
        cid = self._id("Condition", obs)
        cond = self._base("Condition", cid, obs)
        cond["category"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": category,
                    }
                ]
            }
        ]
        if code is not None:
            cond["code"] = code
        point, low, high, high_unknown = self._eff(obs)
        onset = low or point
        if onset:
            cond["onsetDateTime"] = onset
        if high:
            cond["abatementDateTime"] = high
        elif high_unknown:
            cond["abatementString"] = "unknown"
        status = None
        for so in self._rel(obs, "REFR"):
            if f"{T}.4.6" in template_roots(so) or attr(so.find(q("code")), "code") == "33999-4":
                status = {
                    "55561003": "active",
                    "73425007": "inactive",
                    "413322009": "resolved",
                }.get(attr(so.find(q("value")), "code") or "")
        if status is None:
            if high or high_unknown:
                status = "resolved"
            elif concern is not None:
                sc = attr(concern.find(q("statusCode")), "code")
                status = {
                    "active": "active",
                    "completed": "resolved",
                    "suspended": "inactive",
                    "aborted": "inactive",
                }.get(sc or "")
            else:
                status = "active"
        if negated:
            cond["verificationStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "refuted",
                    }
                ]
            }
            if code is None:
                # "No known problems": keep the fact, no invented code.
                cond["code"] = {"text": "no known problems"}
        elif status:
            cond["clinicalStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": status,
                    }
                ]
            }
        else:
            self.flags.add("condition_status_unknown")
        recorded = self._author_time(obs, *(c for c in [concern] if c is not None))
        if recorded:
            cond["recordedDate"] = recorded
        self.result.resources.append(cond)
        return cid

    # -- allergies -------------------------------------------------------------------------------
    _ALLERGY_TYPE = {
        "419199007": ("allergy", None),
        "416098002": ("allergy", "medication"),
        "414285001": ("allergy", "food"),
        "232347008": ("allergy", "environment"),
        "59037007": ("intolerance", "medication"),
        "235719002": ("intolerance", "food"),
        "419511003": (None, "medication"),
        "418471000": (None, "food"),
        "420134006": (None, None),
        "418038007": (None, None),
    }

    def _do_allergies(self, stmt: etree._Element) -> None:
        if stmt.tag == q("act"):
            obs = [o for o in self._rel(stmt, "SUBJ") if o.tag == q("observation")]
            if not obs:
                self._quarantine(
                    stmt,
                    "allergy concern without an allergy observation",
                    "AllergyIntolerance",
                    "allergies",
                )
            for o in obs:
                self._allergy(o, stmt)
        elif stmt.tag == q("observation"):
            self._allergy(stmt, None)
        else:
            self._quarantine(stmt, "unrecognised entry in allergy section", None, "allergies")

    def _allergy(self, obs: etree._Element, concern: etree._Element | None) -> None:
        negated = obs.get("negationInd") == "true"
        pe = obs.find(f"{q('participant')}/{q('participantRole')}/{q('playingEntity')}")
        substance = codeable(pe.find(q("code")), self.narrative) if pe is not None else None
        if substance is None and pe is not None:
            name = pe.find(q("name"))
            if name is not None and name.text and name.text.strip():
                substance = {"text": name.text.strip()}
        aid = self._id("AllergyIntolerance", obs)
        res = self._base("AllergyIntolerance", aid, obs)
        ver_sys = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
        if substance is None:
            if negated:
                # No known allergy: the C-CDA on FHIR mapping uses SNOMED 716186003.
                res["code"] = {
                    "coding": [
                        {
                            "system": "http://snomed.info/sct",
                            "code": "716186003",
                            "display": "No known allergy",
                        }
                    ]
                }
                res["verificationStatus"] = {"coding": [{"system": ver_sys, "code": "confirmed"}]}
                self.result.resources.append(res)
                return
            self._quarantine(
                obs, "allergy without a substance code", "AllergyIntolerance", "allergies"
            )
            return
        res["code"] = substance
        if negated:
            res["verificationStatus"] = {"coding": [{"system": ver_sys, "code": "refuted"}]}
        vcode = attr(obs.find(q("value")), "code")
        typ, cat = self._ALLERGY_TYPE.get(vcode or "", (None, None))
        if typ:
            res["type"] = typ
        if cat:
            res["category"] = [cat]
        point, low, high, _ = self._eff(obs)
        if low or point:
            res["onsetDateTime"] = low or point
        status = None
        for so in self._rel(obs, "SUBJ") + self._rel(obs, "REFR"):
            if f"{T}.4.28" in template_roots(so):
                status = {
                    "55561003": "active",
                    "73425007": "inactive",
                    "413322009": "resolved",
                }.get(attr(so.find(q("value")), "code") or "")
        if status is None and concern is not None:
            sc = attr(concern.find(q("statusCode")), "code")
            status = {"active": "active", "completed": "resolved", "suspended": "inactive"}.get(
                sc or ""
            )
        if status is None and high:
            status = "resolved"
        if status and not negated:
            res["clinicalStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "code": status,
                    }
                ]
            }
        reactions = []
        for ro in self._rel(obs, "MFST"):
            man = codeable(ro.find(q("value")), self.narrative)
            if man is None:
                self.flags.add("reaction_without_code")
                continue
            reaction: dict[str, Any] = {"manifestation": [man]}
            for so in self._rel(ro, "SUBJ"):
                sev = {"255604002": "mild", "6736007": "moderate", "24484000": "severe"}.get(
                    attr(so.find(q("value")), "code") or ""
                )
                if sev:
                    reaction["severity"] = sev
            reactions.append(reaction)
        if reactions:
            res["reaction"] = reactions
        for co in self._rel(obs, "SUBJ"):
            if f"{T}.4.145" in template_roots(co):
                crit = {"CRITL": "low", "CRITH": "high", "CRITU": "unable-to-assess"}.get(
                    attr(co.find(q("value")), "code") or ""
                )
                if crit:
                    res["criticality"] = crit
        recorded = self._author_time(obs, *(c for c in [concern] if c is not None))
        if recorded:
            res["recordedDate"] = recorded
        self.result.resources.append(res)

    # -- medications -----------------------------------------------------------------------------
    _PERIOD_UNITS = {"s": "s", "min": "min", "h": "h", "d": "d", "wk": "wk", "mo": "mo", "a": "a"}

    def _dosage(self, sa: etree._Element) -> dict[str, Any]:
        dosage: dict[str, Any] = {}
        for et in sa.findall(q("effectiveTime")):
            xt = et.get(XSI_TYPE, "")
            if xt.endswith("PIVL_TS"):
                period = et.find(q("period"))
                try:
                    val = float(attr(period, "value") or "")
                except ValueError:
                    continue
                unit = self._PERIOD_UNITS.get(attr(period, "unit") or "")
                if unit:
                    repeat = {"period": val, "periodUnit": unit}
                    dosage.setdefault("timing", {})["repeat"] = repeat
            elif xt.endswith("EIVL_TS"):
                ev = attr(et.find(q("event")), "code")
                if ev:
                    dosage.setdefault("timing", {}).setdefault("repeat", {})["when"] = [ev]
        dose = sa.find(q("doseQuantity"))
        if dose is not None:
            qty = quantity(dose)
            if qty:
                dosage["doseAndRate"] = [{"doseQuantity": qty}]
        route = codeable(sa.find(q("routeCode")), self.narrative)
        if route:
            dosage["route"] = route
        text = self.narrative.text_of(sa.find(q("text")))
        if text:
            dosage["text"] = text
        return dosage

    def _interval(self, sa: etree._Element) -> tuple[str | None, str | None, str | None]:
        for et in sa.findall(q("effectiveTime")):
            xt = et.get(XSI_TYPE, "")
            if xt.endswith("PIVL_TS") or xt.endswith("EIVL_TS"):
                continue
            point, low, high, _ = effective(et, default_tz=self.tz, flags=self.flags)
            return point, low, high
        return None, None, None

    def _do_medications(self, sa: etree._Element) -> None:
        if sa.tag == q("organizer"):
            # A cluster of Medication Activities (e.g. one course with varied dosing): each one.
            acts = [
                c
                for comp in sa.findall(q("component"))
                for c in comp
                if isinstance(c.tag, str) and c.tag == q("substanceAdministration")
            ]
            if not acts:
                self._quarantine(
                    sa, "medication organizer without medication activities", None, "medications"
                )
            for act in acts:
                self._do_medications(act)
            return
        if sa.tag != q("substanceAdministration"):
            self._quarantine(sa, "unrecognised entry in medication section", None, "medications")
            return
        mat = sa.find(f"{q('consumable')}/{q('manufacturedProduct')}/{q('manufacturedMaterial')}")
        med = codeable(mat.find(q("code")), self.narrative) if mat is not None else None
        if med is None and mat is not None:
            name = mat.find(q("name"))
            if name is not None and name.text and name.text.strip():
                med = {"text": name.text.strip()}
        negated = sa.get("negationInd") == "true"
        intended = sa.get("moodCode") in ("INT", "RQO", "PRMS", "PRP")
        rtype = "MedicationRequest" if intended else "MedicationStatement"
        if med is None:
            self._quarantine(
                sa, "medication activity without a medication code", rtype, "medications"
            )
            return
        mid = self._id(rtype, sa)
        res = self._base(rtype, mid, sa)
        res["medicationCodeableConcept"] = med
        sc = attr(sa.find(q("statusCode")), "code") or ""
        dosage = self._dosage(sa)
        point, low, high = self._interval(sa)
        if intended:
            res["status"] = {
                "active": "active",
                "completed": "completed",
                "aborted": "stopped",
                "suspended": "on-hold",
                "cancelled": "cancelled",
                "nullified": "entered-in-error",
                "new": "draft",
            }.get(sc, "unknown")
            res["intent"] = "order" if sa.get("moodCode") == "RQO" else "plan"
            if negated:
                res["doNotPerform"] = True
            authored = self._author_time(sa)
            if authored:
                res["authoredOn"] = authored
            if low or high:
                bounds = {k: v for k, v in (("start", low), ("end", high)) if v}
                dosage.setdefault("timing", {}).setdefault("repeat", {})["boundsPeriod"] = bounds
            if dosage:
                res["dosageInstruction"] = [dosage]
        else:
            res["status"] = (
                "not-taken"
                if negated
                else {
                    "active": "active",
                    "completed": "completed",
                    "aborted": "stopped",
                    "suspended": "on-hold",
                    "cancelled": "not-taken",
                    "nullified": "entered-in-error",
                }.get(sc, "unknown")
            )
            if low or high:
                res["effectivePeriod"] = {k: v for k, v in (("start", low), ("end", high)) if v}
            elif point:
                res["effectiveDateTime"] = point
            asserted = self._author_time(sa)
            if asserted:
                res["dateAsserted"] = asserted
            if dosage:
                res["dosage"] = [dosage]
        self.result.resources.append(res)

    # -- results and vitals ----------------------------------------------------------------------
    def _observation(
        self, obs: etree._Element, category: str, domain: str
    ) -> dict[str, Any] | None:
        code = codeable(obs.find(q("code")), self.narrative)
        if code is None:
            self._quarantine(obs, f"{domain} observation without a code", "Observation", domain)
            return None
        oid = self._id("Observation", obs)
        res = self._base("Observation", oid, obs)
        sc = attr(obs.find(q("statusCode")), "code") or ""
        res["status"] = {
            "completed": "final",
            "active": "preliminary",
            "aborted": "cancelled",
            "cancelled": "cancelled",
            "nullified": "entered-in-error",
        }.get(sc, "unknown" if has_null(obs.find(q("statusCode"))) else "final")
        res["category"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                    }
                ]
            }
        ]
        res["code"] = code
        point, low, _high, _ = self._eff(obs)
        if point or low:
            res["effectiveDateTime"] = point or low
        value = obs.find(q("value"))
        if value is not None and value.get("nullFlavor") is None:
            xt = value.get(XSI_TYPE, "").split(":")[-1]
            if xt == "PQ":
                qty = quantity(value)
                if qty:
                    res["valueQuantity"] = qty
            elif xt in ("CD", "CE", "CO", "CV"):
                cc = codeable(value, self.narrative)
                if cc:
                    res["valueCodeableConcept"] = cc
            elif xt in ("ST", "ED"):
                txt = " ".join("".join(value.itertext()).split())
                if txt:
                    res["valueString"] = txt
            elif xt == "IVL_PQ":
                rng = {}
                open_side = None
                for side in ("low", "high"):
                    e = value.find(q(side))
                    qty = quantity(e) if e is not None else None
                    if qty:
                        rng[side] = qty
                        open_side = (side, e.get("inclusive") != "false")
                if len(rng) == 1 and open_side is not None:
                    # "> 500 mg/dL": one bound is a value with a comparator, not a half Range.
                    side, inclusive = open_side
                    comparator = (">" if side == "low" else "<") + ("=" if inclusive else "")
                    res["valueQuantity"] = {**rng[side], "comparator": comparator}
                elif rng:
                    res["valueRange"] = rng
            elif xt == "INT":
                try:
                    res["valueInteger"] = int(value.get("value", ""))
                except ValueError:
                    self.flags.add("bad_value")
            elif xt == "REAL":
                try:
                    res["valueQuantity"] = {"value": float(value.get("value", ""))}
                except ValueError:
                    self.flags.add("bad_value")
            elif xt == "BL":
                res["valueBoolean"] = value.get("value") == "true"
            else:
                self.flags.add("value_type_not_converted")
        elif value is not None:
            res["dataAbsentReason"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                        "code": "unknown"
                        if value.get("nullFlavor") in ("UNK", "NI")
                        else "not-performed"
                        if value.get("nullFlavor") == "NA"
                        else "unknown",
                    }
                ]
            }
        interp = [
            cc
            for cc in (codeable(i, self.narrative) for i in obs.findall(q("interpretationCode")))
            if cc
        ]
        if interp:
            res["interpretation"] = interp
        ranges = []
        for rr in obs.findall(f"{q('referenceRange')}/{q('observationRange')}"):
            r: dict[str, Any] = {}
            v = rr.find(q("value"))
            if v is not None:
                for side in ("low", "high"):
                    e = v.find(q(side))
                    qty = quantity(e) if e is not None else None
                    if qty:
                        r[side] = qty
            range_text = self.narrative.text_of(rr.find(q("text")))
            if range_text:
                r["text"] = range_text
            if r:
                ranges.append(r)
        if ranges:
            res["referenceRange"] = ranges
        return res

    def _do_results(self, stmt: etree._Element) -> None:
        if stmt.tag == q("organizer"):
            members = []
            for comp in stmt.findall(f"{q('component')}/{q('observation')}"):
                o = self._observation(comp, "laboratory", "results")
                if o:
                    self.result.resources.append(o)
                    members.append(o)
            panel = codeable(stmt.find(q("code")), self.narrative)
            if panel is None and not members:
                self._quarantine(
                    stmt,
                    "result organizer without a code or results",
                    "DiagnosticReport",
                    "results",
                )
                return
            rid = self._id("DiagnosticReport", stmt)
            rep = self._base("DiagnosticReport", rid, stmt)
            sc = attr(stmt.find(q("statusCode")), "code") or ""
            rep["status"] = {
                "completed": "final",
                "active": "preliminary",
                "aborted": "cancelled",
            }.get(sc, "unknown")
            rep["category"] = [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}
                    ]
                }
            ]
            rep["code"] = panel or {"text": "laboratory results"}
            if panel is None:
                self.flags.add("report_without_code")
            point, low, _h, _ = self._eff(stmt)
            when = (
                point
                or low
                or next(
                    (m.get("effectiveDateTime") for m in members if m.get("effectiveDateTime")),
                    None,
                )
            )
            if when:
                rep["effectiveDateTime"] = when
            if members:
                rep["result"] = [{"reference": f"Observation/{m['id']}"} for m in members]
            self.result.resources.append(rep)
        elif stmt.tag == q("observation"):
            o = self._observation(stmt, "laboratory", "results")
            if o:
                self.result.resources.append(o)
        else:
            self._quarantine(stmt, "unrecognised entry in results section", None, "results")

    def _do_vitals(self, stmt: etree._Element) -> None:
        if stmt.tag == q("organizer"):
            obs = stmt.findall(f"{q('component')}/{q('observation')}")
        elif stmt.tag == q("observation"):
            obs = [stmt]
        else:
            self._quarantine(stmt, "unrecognised entry in vital signs section", None, "vitals")
            return
        converted = [(o, self._observation(o, "vital-signs", "vitals")) for o in obs]
        by_loinc: dict[str, dict[str, Any]] = {}
        for _o, res in converted:
            if res is None:
                continue
            for c in res["code"].get("coding", []):
                if c.get("system") == "http://loinc.org":
                    by_loinc[c["code"]] = res
        sbp, dbp = by_loinc.get("8480-6"), by_loinc.get("8462-4")
        skip: set[int] = set()
        if sbp and dbp:
            # One FHIR blood-pressure panel (85354-9) with systolic and diastolic components.
            bp = dict(sbp)
            bp["id"] = stable_id(self.scope, "bp", sbp["id"], dbp["id"])
            bp["code"] = {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": "85354-9",
                        "display": "Blood pressure panel",
                    }
                ]
            }
            bp.pop("valueQuantity", None)
            bp["component"] = [
                {
                    "code": part["code"],
                    **({"valueQuantity": part["valueQuantity"]} if "valueQuantity" in part else {}),
                }
                for part in (sbp, dbp)
            ]
            bp["identifier"] = sbp.get("identifier", []) + dbp.get("identifier", [])
            if not bp["identifier"]:
                bp.pop("identifier")
            self.result.resources.append(bp)
            skip = {id(sbp), id(dbp)}
        for _o, res in converted:
            if res is not None and id(res) not in skip:
                self.result.resources.append(res)

    # -- social history ---------------------------------------------------------------------------
    def _do_social(self, stmt: etree._Element) -> None:
        if stmt.tag != q("observation"):
            self._quarantine(stmt, "unrecognised entry in social history section", None, "social")
            return
        res = self._observation(stmt, "social-history", "social")
        if res is not None:
            self.result.resources.append(res)

    # -- immunizations -----------------------------------------------------------------------------
    def _do_immunizations(self, sa: etree._Element) -> None:
        if sa.tag != q("substanceAdministration"):
            self._quarantine(
                sa, "unrecognised entry in immunization section", None, "immunizations"
            )
            return
        mat = sa.find(f"{q('consumable')}/{q('manufacturedProduct')}/{q('manufacturedMaterial')}")
        vaccine = codeable(mat.find(q("code")), self.narrative) if mat is not None else None
        if vaccine is None:
            self._quarantine(
                sa, "immunization without a vaccine code", "Immunization", "immunizations"
            )
            return
        iid = self._id("Immunization", sa)
        res = self._base("Immunization", iid, sa)
        res["vaccineCode"] = vaccine
        negated = sa.get("negationInd") == "true"
        sc = attr(sa.find(q("statusCode")), "code") or ""
        res["status"] = (
            "not-done" if negated else ("entered-in-error" if sc == "nullified" else "completed")
        )
        if negated:
            for ro in self._rel(sa, "RSON"):
                reason = codeable(ro.find(q("code")), self.narrative)
                if reason:
                    res["statusReason"] = reason
        point, low, _h = self._interval(sa)
        if point or low:
            res["occurrenceDateTime"] = point or low
        else:
            # occurrence[x] is required in R4; say honestly that it is unknown.
            res["occurrenceString"] = "unknown"
            self.flags.add("immunization_date_unknown")
        if mat is not None:
            lot = mat.find(q("lotNumberText"))
            if lot is not None and lot.text and lot.text.strip():
                res["lotNumber"] = lot.text.strip()
        manu = sa.find(
            f"{q('consumable')}/{q('manufacturedProduct')}/{q('manufacturerOrganization')}/{q('name')}"
        )
        if manu is not None and manu.text:
            res["manufacturer"] = {"display": manu.text.strip()}
        dose = sa.find(q("doseQuantity"))
        if dose is not None:
            qty = quantity(dose)
            if qty:
                res["doseQuantity"] = qty
        route = codeable(sa.find(q("routeCode")), self.narrative)
        if route:
            res["route"] = route
        res["primarySource"] = True
        self.result.resources.append(res)

    # -- procedures ----------------------------------------------------------------------------------
    def _do_procedures(self, stmt: etree._Element) -> None:
        if stmt.tag not in (q("procedure"), q("observation"), q("act")):
            self._quarantine(stmt, "unrecognised entry in procedure section", None, "procedures")
            return
        code = codeable(stmt.find(q("code")), self.narrative)
        if code is None:
            self._quarantine(stmt, "procedure without a code", "Procedure", "procedures")
            return
        pid = self._id("Procedure", stmt)
        res = self._base("Procedure", pid, stmt)
        sc = attr(stmt.find(q("statusCode")), "code") or ""
        negated = stmt.get("negationInd") == "true"
        res["status"] = (
            "not-done"
            if negated
            else {
                "completed": "completed",
                "active": "in-progress",
                "aborted": "stopped",
                "cancelled": "not-done",
                "new": "preparation",
                "nullified": "entered-in-error",
            }.get(sc, "unknown")
        )
        res["code"] = code
        point, low, high, _ = self._eff(stmt)
        if low or high:
            res["performedPeriod"] = {k: v for k, v in (("start", low), ("end", high)) if v}
        elif point:
            res["performedDateTime"] = point
        sites = [
            c for c in (codeable(s, self.narrative) for s in stmt.findall(q("targetSiteCode"))) if c
        ]
        if sites:
            res["bodySite"] = sites
        self.result.resources.append(res)

    # -- encounters ----------------------------------------------------------------------------------
    def _do_encounters(self, enc: etree._Element) -> None:
        if enc.tag != q("encounter"):
            self._quarantine(enc, "unrecognised entry in encounter section", None, "encounters")
            return
        eid = self._id("Encounter", enc)
        res = self._base("Encounter", eid, enc)
        typ = codeable(enc.find(q("code")), self.narrative)
        act_class = None
        if typ:
            res["type"] = [typ]
            act_class = next(
                (c for c in typ.get("coding", []) if c.get("system", "").endswith("v3-ActCode")),
                None,
            )
        # class is required in R4; without an ActCode we say "unknown", never guess.
        res["class"] = act_class or {
            "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
            "code": "UNK",
        }
        point, low, high, _ = self._eff(enc)
        sc = attr(enc.find(q("statusCode")), "code")
        if low or high or point:
            res["period"] = {k: v for k, v in (("start", low or point), ("end", high)) if v}
        res["status"] = {
            "completed": "finished",
            "active": "in-progress",
            "cancelled": "cancelled",
        }.get(sc or "", "finished" if high else "unknown")
        locs = []
        for p in enc.findall(q("participant")):
            if p.get("typeCode") != "LOC":
                continue
            name = p.find(f"{q('participantRole')}/{q('playingEntity')}/{q('name')}")
            if name is not None and name.text:
                locs.append({"location": {"display": name.text.strip()}})
        if locs:
            res["location"] = locs
        diags = []
        for act in self._rel(enc):
            if f"{T}.4.80" in template_roots(act) or (
                act.tag == q("act") and attr(act.find(q("code")), "code") == "29308-4"
            ):
                for obs in [o for o in self._rel(act, "SUBJ") if o.tag == q("observation")]:
                    cid = self._condition(obs, act, "encounter-diagnosis")
                    if cid:
                        diags.append({"condition": {"reference": f"Condition/{cid}"}})
        if diags:
            res["diagnosis"] = diags
        disp = codeable(enc.find("{urn:hl7-org:sdtc}dischargeDispositionCode"), self.narrative)
        if disp:
            res["hospitalization"] = {"dischargeDisposition": disp}
        self.result.resources.append(res)


def convert_ccda(data: bytes | etree._Element, source: SourceDocument) -> ConversionResult:
    """Convert one C-CDA document into FHIR R4 resources plus quarantined entries.

    ``data`` is the raw document (parsed with the hardened parser) or an already-parsed root.
    Raises :class:`~medblocks_pipelines.lib.network.errors.UnsafeXMLError` for refused XML and
    ``ValueError`` if the root is not a ``ClinicalDocument``.
    """
    root = (
        parse_untrusted(bytes(data), what="C-CDA") if isinstance(data, bytes | bytearray) else data
    )
    return _Converter(root, source).run()


__all__ = [
    "ConversionResult",
    "Quarantined",
    "SourceDocument",
    "binary_resources",
    "convert_ccda",
    "system_uri",
]

"""Render a C-CDA R2.1 CCD from one patient's FHIR R4 resources (the sandbox's document source).

The renderer writes what a typical EHR sends: templateIds with extensions, LOINC section codes,
a narrative table per section whose rows carry ``ID``s referenced from ``originalText``, CDA ids
derived from the FHIR ids (so the same fact has the same CDA id in every CCD), nested concern acts,
status observations and BP pairs. ``flaws`` adds the things real documents do wrong (nullFlavors,
missing sections, unknown code systems, a time without an offset).
"""

from datetime import UTC, datetime
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


def render_ccd(
    patient: dict[str, Any],
    resources: list[dict[str, Any]],
    *,
    org: dict[str, Any],
    document_id: str,
    effective: datetime | None = None,
    flaws: frozenset[str] = frozenset(),
) -> bytes:
    """Render a CCD (US Realm Header + CCD templates) for ``patient`` from ``resources``.

    ``org`` needs ``name`` and ``oid`` (the community's OID arc for ids). ``flaws`` may hold
    ``null_codes`` (some codes only in translations under ``nullFlavor="OTH"``, one problem with
    no code at all), ``missing_sections`` (no immunizations/procedures sections), ``no_tz``
    (times without offsets) and ``unknown_entry`` (an entry the converter cannot know).
    """
    when = effective or datetime.now(UTC)
    d = _Doc(org, flaws)
    nsmap = {None: V3, "xsi": XSI, "sdtc": SDTC}
    root = etree.Element(f"{{{V3}}}ClinicalDocument", nsmap=nsmap)
    _e(root, "realmCode", code="US")
    _e(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    _tid(root, "2.16.840.1.113883.10.20.22.1.1", "2015-08-01")
    _tid(root, "2.16.840.1.113883.10.20.22.1.2", "2015-08-01")
    _e(root, "id", root=document_id)
    _e(
        root,
        "code",
        code="34133-9",
        codeSystem="2.16.840.1.113883.6.1",
        displayName="Summarization of Episode Note",
    )
    _e(root, "title").text = f"Continuity of Care Document - {org['name']}"
    _e(root, "effectiveTime", value=when.strftime("%Y%m%d%H%M%S+0000"))
    _e(root, "confidentialityCode", code="N", codeSystem="2.16.840.1.113883.5.25")
    _e(root, "languageCode", code="en-US")
    rt = _e(root, "recordTarget")
    role = _e(rt, "patientRole")
    mrns = [
        i for i in patient.get("identifier") or [] if i.get("system") == f"urn:oid:{org['oid']}.1"
    ]
    if mrns:
        _e(role, "id", root=f"{org['oid']}.1", extension=str(mrns[0]["value"]))
    else:
        d.ii(role, "100", patient["id"])
    for ident in patient.get("identifier") or []:
        if ident.get("system") == "http://hl7.org/fhir/sid/us-ssn" and ident.get("value"):
            _e(role, "id", root="2.16.840.1.113883.4.1", extension=str(ident["value"]))
    for a in patient.get("address", []) or []:
        ad = _e(role, "addr", use="HP")
        for line in a.get("line", []) or []:
            _e(ad, "streetAddressLine").text = line
        for k in ("city", "state", "postalCode"):
            if a.get(k):
                _e(ad, k).text = a[k]
    for t in patient.get("telecom", []) or []:
        prefix = {"phone": "tel:", "email": "mailto:"}.get(t.get("system", ""), "")
        if prefix and t.get("value"):
            _e(role, "telecom", value=prefix + t["value"])
    pat = _e(role, "patient")
    for n in patient.get("name", []) or []:
        nm = _e(pat, "name", use="L")
        for g in n.get("given", []) or []:
            _e(nm, "given").text = g
        if n.get("family"):
            _e(nm, "family").text = n["family"]
    g = {"male": "M", "female": "F"}.get(patient.get("gender", ""), "UN")
    _e(pat, "administrativeGenderCode", code=g, codeSystem="2.16.840.1.113883.5.1")
    if patient.get("birthDate"):
        _e(pat, "birthTime", value=patient["birthDate"].replace("-", ""))
    for tag, url in (
        ("raceCode", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"),
        ("ethnicGroupCode", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"),
    ):
        for ext in patient.get("extension") or []:
            if ext.get("url") != url:
                continue
            for sub in ext.get("extension") or []:
                if sub.get("url") == "ombCategory" and sub.get("valueCoding"):
                    c = sub["valueCoding"]
                    _e(
                        pat,
                        tag,
                        code=c["code"],
                        codeSystem="2.16.840.1.113883.6.238",
                        displayName=c.get("display", ""),
                    )
                    break
    author = _e(root, "author")
    _e(author, "time", value=when.strftime("%Y%m%d%H%M%S+0000"))
    aa = _e(author, "assignedAuthor")
    _e(aa, "id", root=org["oid"])
    dev = _e(aa, "assignedAuthoringDevice")
    _e(dev, "softwareName").text = "medblocks sandbox gateway"
    cust = _e(root, "custodian")
    rco = _e(_e(cust, "assignedCustodian"), "representedCustodianOrganization")
    _e(rco, "id", root=org["oid"])
    _e(rco, "name").text = org["name"]
    body = _e(_e(root, "component"), "structuredBody")

    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in resources:
        by_type.setdefault(r.get("resourceType", ""), []).append(r)

    _problems(
        d,
        body,
        [c for c in by_type.get("Condition", []) if "encounter-diagnosis" not in _category(c)],
    )
    _allergies(d, body, by_type.get("AllergyIntolerance", []))
    _medications(
        d, body, by_type.get("MedicationRequest", []) + by_type.get("MedicationStatement", [])
    )
    obs = by_type.get("Observation", [])
    _results(d, body, [o for o in obs if "laboratory" in _category(o)])
    _vitals(d, body, [o for o in obs if "vital-signs" in _category(o)])
    _social(d, body, [o for o in obs if "social-history" in _category(o)])
    if "missing_sections" not in flaws:
        _immunizations(d, body, by_type.get("Immunization", []))
        _procedures(d, body, by_type.get("Procedure", []))
    _encounters(d, body, by_type.get("Encounter", []), by_type.get("Condition", []))
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _problems(d: _Doc, body: etree._Element, conds: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.5.1", "11450-4", "Problems")
    if not conds:
        sec.set("nullFlavor", "NI")
        return
    for i, c in enumerate(conds):
        status = ((c.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code", "active")
        entry = _e(sec, "entry", typeCode="DRIV")
        act = _e(entry, "act", classCode="ACT", moodCode="EVN")
        _tid(act, f"{T}.4.3")
        d.ii(act, "200", c["id"])
        _e(act, "code", code="CONC", codeSystem="2.16.840.1.113883.5.6")
        _e(act, "statusCode", code="active" if status == "active" else "completed")
        d.ivl(act, c.get("recordedDate") or c.get("onsetDateTime"), None)
        er = _e(act, "entryRelationship", typeCode="SUBJ")
        obs = _e(er, "observation", classCode="OBS", moodCode="EVN")
        _tid(obs, f"{T}.4.4")
        d.ii(obs, "201", c["id"])
        _e(obs, "code", code="55607006", codeSystem="2.16.840.1.113883.6.96", displayName="Problem")
        _e(obs, "statusCode", code="completed")
        d.ivl(
            obs,
            c.get("onsetDateTime"),
            c.get("abatementDateTime"),
            unknown_end=status == "resolved",
        )
        row = _row(tbody)
        null_code = "null_codes" in d.flaws and i == 0
        if "null_codes" in d.flaws and i == 1:
            # A problem with no code and no text at all: the converter must quarantine it.
            _e(obs, "value", xsi_type="CD", nullFlavor="UNK")
        else:
            d.cd(obs, "value", c.get("code"), narrative=row, xsi=True, null_root=null_code)
        if c.get("recordedDate"):
            author = _e(obs, "author")
            _tid(author, f"{T}.4.119", None)
            d.time(author, "time", c.get("recordedDate"))
            _e(_e(author, "assignedAuthor"), "id", root=d.org["oid"])
        er2 = _e(obs, "entryRelationship", typeCode="REFR")
        so = _e(er2, "observation", classCode="OBS", moodCode="EVN")
        _tid(so, f"{T}.4.6", None)
        _e(so, "code", code="33999-4", codeSystem="2.16.840.1.113883.6.1")
        _e(so, "statusCode", code="completed")
        code = {"active": "55561003", "inactive": "73425007", "resolved": "413322009"}.get(
            status, "55561003"
        )
        _e(so, "value", xsi_type="CD", code=code, codeSystem="2.16.840.1.113883.6.96")
    if "unknown_entry" in d.flaws:
        entry = _e(sec, "entry")
        supply = _e(entry, "supply", classCode="SPLY", moodCode="EVN")
        _e(supply, "id", root="2.16.840.1.113883.3.9999.77", extension="odd-1")


_ALLERGY_VALUE = {"medication": "416098002", "food": "414285001", "environment": "232347008"}


def _allergies(d: _Doc, body: etree._Element, items: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.6.1", "48765-2", "Allergies")
    if not items:
        # "No known allergies" is a negated observation with a null substance.
        entry = _e(sec, "entry", typeCode="DRIV")
        act = _e(entry, "act", classCode="ACT", moodCode="EVN")
        _tid(act, f"{T}.4.30")
        _e(act, "id", root=f"{d.org['oid']}.300", extension="nka")
        _e(act, "code", code="CONC", codeSystem="2.16.840.1.113883.5.6")
        _e(act, "statusCode", code="active")
        obs = _e(
            _e(act, "entryRelationship", typeCode="SUBJ"),
            "observation",
            classCode="OBS",
            moodCode="EVN",
            negationInd="true",
        )
        _tid(obs, f"{T}.4.7")
        _e(obs, "id", root=f"{d.org['oid']}.301", extension="nka")
        _e(obs, "code", code="ASSERTION", codeSystem="2.16.840.1.113883.5.4")
        _e(obs, "statusCode", code="completed")
        _e(obs, "value", xsi_type="CD", code="419199007", codeSystem="2.16.840.1.113883.6.96")
        pr = _e(_e(obs, "participant", typeCode="CSM"), "participantRole", classCode="MANU")
        _e(_e(pr, "playingEntity", classCode="MMAT"), "code", nullFlavor="NA")
        return
    for a in items:
        status = ((a.get("clinicalStatus") or {}).get("coding") or [{}])[0].get("code", "active")
        entry = _e(sec, "entry", typeCode="DRIV")
        act = _e(entry, "act", classCode="ACT", moodCode="EVN")
        _tid(act, f"{T}.4.30")
        d.ii(act, "300", a["id"])
        _e(act, "code", code="CONC", codeSystem="2.16.840.1.113883.5.6")
        _e(act, "statusCode", code="active" if status == "active" else "completed")
        d.ivl(act, a.get("recordedDate") or a.get("onsetDateTime"), None)
        obs = _e(
            _e(act, "entryRelationship", typeCode="SUBJ"),
            "observation",
            classCode="OBS",
            moodCode="EVN",
        )
        _tid(obs, f"{T}.4.7")
        d.ii(obs, "301", a["id"])
        _e(obs, "code", code="ASSERTION", codeSystem="2.16.840.1.113883.5.4")
        _e(obs, "statusCode", code="completed")
        d.ivl(obs, a.get("onsetDateTime"), None)
        cat = (a.get("category") or ["medication"])[0]
        _e(
            obs,
            "value",
            xsi_type="CD",
            code=_ALLERGY_VALUE.get(cat, "419199007"),
            codeSystem="2.16.840.1.113883.6.96",
        )
        row = _row(tbody)
        pr = _e(_e(obs, "participant", typeCode="CSM"), "participantRole", classCode="MANU")
        d.cd(_e(pr, "playingEntity", classCode="MMAT"), "code", a.get("code"), narrative=row)
        for rx in a.get("reaction", []) or []:
            for man in rx.get("manifestation", []) or []:
                ro = _e(
                    _e(obs, "entryRelationship", typeCode="MFST", inversionInd="true"),
                    "observation",
                    classCode="OBS",
                    moodCode="EVN",
                )
                _tid(ro, f"{T}.4.9")
                _e(ro, "id", root=f"{d.org['oid']}.302", extension=f"{a['id']}-{d.ref_id()}")
                _e(ro, "code", code="ASSERTION", codeSystem="2.16.840.1.113883.5.4")
                _e(ro, "statusCode", code="completed")
                d.cd(ro, "value", man, xsi=True)
                if rx.get("severity"):
                    so = _e(
                        _e(ro, "entryRelationship", typeCode="SUBJ", inversionInd="true"),
                        "observation",
                        classCode="OBS",
                        moodCode="EVN",
                    )
                    _tid(so, f"{T}.4.8")
                    _e(so, "code", code="SEV", codeSystem="2.16.840.1.113883.5.4")
                    _e(so, "statusCode", code="completed")
                    sev = {"mild": "255604002", "moderate": "6736007", "severe": "24484000"}[
                        rx["severity"]
                    ]
                    _e(so, "value", xsi_type="CD", code=sev, codeSystem="2.16.840.1.113883.6.96")
        if a.get("criticality") in ("low", "high"):
            co = _e(
                _e(obs, "entryRelationship", typeCode="SUBJ", inversionInd="true"),
                "observation",
                classCode="OBS",
                moodCode="EVN",
            )
            _tid(co, f"{T}.4.145", None)
            _e(co, "code", code="82606-5", codeSystem="2.16.840.1.113883.6.1")
            _e(co, "statusCode", code="completed")
            _e(
                co,
                "value",
                xsi_type="CD",
                code={"low": "CRITL", "high": "CRITH"}[a["criticality"]],
                codeSystem="2.16.840.1.113883.5.1063",
            )


def _medications(d: _Doc, body: etree._Element, meds: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.1.1", "10160-0", "Medications")
    if not meds:
        sec.set("nullFlavor", "NI")
        return
    for m in meds:
        is_req = m["resourceType"] == "MedicationRequest"
        entry = _e(sec, "entry", typeCode="DRIV")
        sa = _e(
            entry, "substanceAdministration", classCode="SBADM", moodCode="INT" if is_req else "EVN"
        )
        _tid(sa, f"{T}.4.16", "2014-06-09")
        d.ii(sa, "400", m["id"])
        st = m.get("status", "active")
        _e(
            sa,
            "statusCode",
            code={
                "active": "active",
                "completed": "completed",
                "stopped": "aborted",
                "on-hold": "suspended",
            }.get(st, "active"),
        )
        dosage = ((m.get("dosageInstruction") or m.get("dosage")) or [{}])[0]
        bounds = (
            ((dosage.get("timing") or {}).get("repeat") or {}).get("boundsPeriod")
            or m.get("effectivePeriod")
            or {}
        )
        start = bounds.get("start") or m.get("authoredOn") or m.get("effectiveDateTime")
        et = _e(sa, "effectiveTime", xsi_type="IVL_TS")
        d.time(et, "low", start)
        if bounds.get("end"):
            d.time(et, "high", bounds["end"])
        rep = (dosage.get("timing") or {}).get("repeat") or {}
        if rep.get("period") and rep.get("periodUnit"):
            pe = _e(
                sa, "effectiveTime", xsi_type="PIVL_TS", institutionSpecified="true", operator="A"
            )
            _e(pe, "period", value=str(rep["period"]), unit=rep["periodUnit"])
        dq = ((dosage.get("doseAndRate") or [{}])[0]).get("doseQuantity")
        if dq and dq.get("value") is not None:
            _e(
                sa,
                "doseQuantity",
                value=str(dq["value"]),
                **({"unit": dq["unit"]} if dq.get("unit") else {}),
            )
        mp = _e(_e(sa, "consumable"), "manufacturedProduct", classCode="MANU")
        _tid(mp, f"{T}.4.23", "2014-06-09")
        mm = _e(mp, "manufacturedMaterial")
        row = _row(tbody)
        d.cd(
            mm,
            "code",
            m.get("medicationCodeableConcept"),
            narrative=row,
            null_root="null_codes" in d.flaws,
        )
        if is_req and m.get("authoredOn"):
            author = _e(sa, "author")
            d.time(author, "time", m["authoredOn"])
            _e(_e(author, "assignedAuthor"), "id", root=d.org["oid"])


def _obs_value(d: _Doc, obs: etree._Element, o: dict[str, Any], row: etree._Element) -> None:
    if "valueQuantity" in o:
        vq = o["valueQuantity"]
        _e(
            obs,
            "value",
            xsi_type="PQ",
            value=str(vq.get("value")),
            unit=vq.get("code") or vq.get("unit") or "1",
        )
    elif "valueCodeableConcept" in o:
        d.cd(obs, "value", o["valueCodeableConcept"], xsi=True)
    elif "valueString" in o:
        _e(obs, "value", xsi_type="ST").text = o["valueString"]
    else:
        _e(obs, "value", xsi_type="PQ", nullFlavor="UNK")


def _observation(
    d: _Doc,
    parent: etree._Element,
    o: dict[str, Any],
    tid: str,
    row: etree._Element,
    code: dict[str, Any] | None = None,
    value: dict[str, Any] | None = None,
    suffix: str = "",
) -> None:
    obs = _e(_e(parent, "component"), "observation", classCode="OBS", moodCode="EVN")
    _tid(obs, tid)
    d.ii(obs, "500", o["id"] + suffix)
    d.cd(obs, "code", code or o.get("code"), narrative=row)
    _e(obs, "statusCode", code="completed")
    d.time(
        obs,
        "effectiveTime",
        o.get("effectiveDateTime") or (o.get("effectivePeriod") or {}).get("start"),
    )
    _obs_value(d, obs, value if value is not None else o, row)
    for interp in o.get("interpretation", []) or []:
        d.cd(obs, "interpretationCode", interp)
    for rr in o.get("referenceRange", []) or []:
        orng = _e(_e(obs, "referenceRange"), "observationRange")
        v = _e(orng, "value", xsi_type="IVL_PQ")
        for side in ("low", "high"):
            if side in rr:
                _e(
                    v,
                    side,
                    value=str(rr[side].get("value")),
                    unit=rr[side].get("code") or rr[side].get("unit") or "1",
                )


def _results(d: _Doc, body: etree._Element, obs: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.3.1", "30954-2", "Results")
    if not obs:
        sec.set("nullFlavor", "NI")
        return
    groups: dict[str, list[dict[str, Any]]] = {}
    for o in obs:
        groups.setdefault((o.get("effectiveDateTime") or "")[:10], []).append(o)
    for day, items in groups.items():
        entry = _e(sec, "entry", typeCode="DRIV")
        org = _e(entry, "organizer", classCode="BATTERY", moodCode="EVN")
        _tid(org, f"{T}.4.1")
        d.ii(org, "510", f"{items[0]['id']}-panel")
        _e(
            org,
            "code",
            code="24323-8",
            codeSystem="2.16.840.1.113883.6.1",
            displayName="Comprehensive metabolic panel",
        )
        _e(org, "statusCode", code="completed")
        d.time(org, "effectiveTime", items[0].get("effectiveDateTime") or day)
        for o in items:
            _observation(d, org, o, f"{T}.4.2", _row(tbody))


def _social(d: _Doc, body: etree._Element, obs: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.17", "29762-2", "Social History")
    if not obs:
        sec.set("nullFlavor", "NI")
        return
    for o in obs:
        entry = _e(sec, "entry", typeCode="DRIV")
        smoking = any(c.get("code") == "72166-2" for c in (o.get("code") or {}).get("coding", []))
        ob = _e(entry, "observation", classCode="OBS", moodCode="EVN")
        _tid(ob, f"{T}.4.78" if smoking else f"{T}.4.38", "2014-06-09" if smoking else "2015-08-01")
        d.ii(ob, "900", o["id"])
        row = _row(tbody)
        d.cd(ob, "code", o.get("code"), narrative=row)
        _e(ob, "statusCode", code="completed")
        d.time(ob, "effectiveTime", o.get("effectiveDateTime"))
        _obs_value(d, ob, o, row)


def _vitals(d: _Doc, body: etree._Element, obs: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.4.1", "8716-3", "Vital Signs")
    if not obs:
        sec.set("nullFlavor", "NI")
        return
    groups: dict[str, list[dict[str, Any]]] = {}
    for o in obs:
        groups.setdefault(o.get("effectiveDateTime") or "", []).append(o)
    for when, items in groups.items():
        entry = _e(sec, "entry", typeCode="DRIV")
        org = _e(entry, "organizer", classCode="CLUSTER", moodCode="EVN")
        _tid(org, f"{T}.4.26")
        d.ii(org, "520", f"{items[0]['id']}-vitals")
        _e(
            org,
            "code",
            code="46680005",
            codeSystem="2.16.840.1.113883.6.96",
            displayName="Vital signs",
        )
        _e(org, "statusCode", code="completed")
        d.time(org, "effectiveTime", when)
        for o in items:
            if o.get("component"):
                # A FHIR BP panel becomes the two CDA vital sign observations.
                for i, comp in enumerate(o["component"]):
                    _observation(
                        d,
                        org,
                        o,
                        f"{T}.4.27",
                        _row(tbody),
                        code=comp.get("code"),
                        value=comp,
                        suffix=f"-c{i}",
                    )
            else:
                _observation(d, org, o, f"{T}.4.27", _row(tbody))


def _immunizations(d: _Doc, body: etree._Element, items: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.2.1", "11369-6", "Immunizations")
    if not items:
        sec.set("nullFlavor", "NI")
        return
    for im in items:
        entry = _e(sec, "entry", typeCode="DRIV")
        not_done = im.get("status") == "not-done"
        sa = _e(
            entry,
            "substanceAdministration",
            classCode="SBADM",
            moodCode="EVN",
            negationInd="true" if not_done else "false",
        )
        _tid(sa, f"{T}.4.52")
        d.ii(sa, "600", im["id"])
        _e(sa, "statusCode", code="completed")
        d.time(sa, "effectiveTime", im.get("occurrenceDateTime"))
        mp = _e(_e(sa, "consumable"), "manufacturedProduct", classCode="MANU")
        _tid(mp, f"{T}.4.54")
        mm = _e(mp, "manufacturedMaterial")
        d.cd(mm, "code", im.get("vaccineCode"), narrative=_row(tbody))
        if im.get("lotNumber"):
            _e(mm, "lotNumberText").text = im["lotNumber"]


def _procedures(d: _Doc, body: etree._Element, items: list[dict[str, Any]]) -> None:
    sec, tbody = _section(body, f"{T}.2.7.1", "47519-4", "Procedures")
    if not items:
        sec.set("nullFlavor", "NI")
        return
    for p in items:
        entry = _e(sec, "entry", typeCode="DRIV")
        pr = _e(entry, "procedure", classCode="PROC", moodCode="EVN")
        _tid(pr, f"{T}.4.14")
        d.ii(pr, "700", p["id"])
        d.cd(pr, "code", p.get("code"), narrative=_row(tbody))
        _e(
            pr,
            "statusCode",
            code="completed" if p.get("status", "completed") == "completed" else "active",
        )
        period = p.get("performedPeriod")
        if period:
            d.ivl(pr, period.get("start"), period.get("end"))
        else:
            d.time(pr, "effectiveTime", p.get("performedDateTime"))


def _encounters(
    d: _Doc, body: etree._Element, items: list[dict[str, Any]], conds: list[dict[str, Any]]
) -> None:
    sec, tbody = _section(body, f"{T}.2.22.1", "46240-8", "Encounters")
    if not items:
        sec.set("nullFlavor", "NI")
        return
    dx_by_enc: dict[str, list[dict[str, Any]]] = {}
    for c in conds:
        eid = _ref_id(c.get("encounter"))
        if eid and "encounter-diagnosis" in _category(c):
            dx_by_enc.setdefault(eid, []).append(c)
    for e in items:
        entry = _e(sec, "entry", typeCode="DRIV")
        enc = _e(entry, "encounter", classCode="ENC", moodCode="EVN")
        _tid(enc, f"{T}.4.49")
        d.ii(enc, "800", e["id"])
        typ = (e.get("type") or [None])[0]
        cls = e.get("class") or {}
        cc = typ or ({"coding": [cls]} if cls.get("code") else None)
        if typ and cls.get("code"):
            cc = {
                "coding": [
                    *typ.get("coding", []),
                    {**cls, "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode"},
                ],
                "text": typ.get("text"),
            }
        d.cd(enc, "code", cc, narrative=_row(tbody))
        period = e.get("period") or {}
        d.ivl(enc, period.get("start"), period.get("end"))
        for loc in e.get("location", []) or []:
            disp = (loc.get("location") or {}).get("display")
            if disp:
                pr = _e(
                    _e(enc, "participant", typeCode="LOC"), "participantRole", classCode="SDLOC"
                )
                _tid(pr, f"{T}.4.32", None)
                _e(_e(pr, "playingEntity", classCode="PLC"), "name").text = disp
        for c in dx_by_enc.get(e["id"], []):
            act = _e(
                _e(enc, "entryRelationship", typeCode="COMP"),
                "act",
                classCode="ACT",
                moodCode="EVN",
            )
            _tid(act, f"{T}.4.80")
            _e(act, "code", code="29308-4", codeSystem="2.16.840.1.113883.6.1")
            obs = _e(
                _e(act, "entryRelationship", typeCode="SUBJ"),
                "observation",
                classCode="OBS",
                moodCode="EVN",
            )
            _tid(obs, f"{T}.4.4")
            d.ii(obs, "201", c["id"])
            _e(obs, "code", code="282291009", codeSystem="2.16.840.1.113883.6.96")
            _e(obs, "statusCode", code="completed")
            d.ivl(obs, c.get("onsetDateTime"), c.get("abatementDateTime"))
            d.cd(obs, "value", c.get("code"), xsi=True)

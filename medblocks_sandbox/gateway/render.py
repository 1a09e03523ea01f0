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

from medblocks_sandbox.gateway.ccd_parts import SDTC, V3, XSI, _category, _Doc, _e, _tid
from medblocks_sandbox.gateway.ccd_sections import (
    _allergies,
    _encounters,
    _immunizations,
    _medications,
    _problems,
    _procedures,
    _results,
    _social,
    _vitals,
)


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

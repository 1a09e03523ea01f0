"""The CCD sections, one function each: problems, allergies, medications, results, social
history, vitals, immunizations, procedures and encounters (entries plus their narrative rows).
"""

from typing import Any

from lxml import etree

from medblocks_sandbox.gateway.ccd_parts import (
    T,
    _category,
    _Doc,
    _e,
    _ref_id,
    _row,
    _section,
    _tid,
)


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

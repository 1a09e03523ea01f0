"""Results, vital signs and social history sections -> Observation, DiagnosticReport."""

from typing import Any

from lxml import etree

from medblocks_pipelines.lib.network.ccda.base import ConverterBase
from medblocks_pipelines.lib.network.ccda.common import (
    XSI_TYPE,
    attr,
    codeable,
    has_null,
    q,
    quantity,
    stable_id,
)


class ObservationsMixin(ConverterBase):
    """Result Organizers, Vital Signs Organizers, Social History Observations."""

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

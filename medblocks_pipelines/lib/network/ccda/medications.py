"""Medications and immunizations sections -> MedicationStatement/Request, Immunization."""

from typing import Any

from lxml import etree

from medblocks_pipelines.lib.network.ccda.base import ConverterBase
from medblocks_pipelines.lib.network.ccda.common import (
    XSI_TYPE,
    attr,
    codeable,
    effective,
    q,
    quantity,
)


class MedicationsMixin(ConverterBase):
    """Medication Activities and Immunization Activities."""

    # UCUM units a PIVL_TS period may carry, as FHIR Timing.periodUnit
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

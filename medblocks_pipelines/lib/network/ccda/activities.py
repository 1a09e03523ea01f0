"""Procedures and encounters sections -> Procedure, Encounter (+ encounter diagnoses)."""

from lxml import etree

from medblocks_pipelines.lib.network.ccda.common import (
    attr,
    codeable,
    q,
    template_roots,
)
from medblocks_pipelines.lib.network.ccda.model import T
from medblocks_pipelines.lib.network.ccda.problems import ProblemsMixin


class ActivitiesMixin(ProblemsMixin):
    """Procedure Activities and Encounter Activities (diagnoses through the problems mixin)."""

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

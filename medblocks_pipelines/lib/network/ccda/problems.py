"""Problems and allergies sections -> Condition, AllergyIntolerance (SPECS 6.2)."""

from typing import Any

from lxml import etree

from medblocks_pipelines.lib.network.ccda.base import ConverterBase
from medblocks_pipelines.lib.network.ccda.common import (
    attr,
    codeable,
    q,
    template_roots,
)
from medblocks_pipelines.lib.network.ccda.model import T


class ProblemsMixin(ConverterBase):
    """Problem Concern Acts and Allergy Concern Acts."""

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

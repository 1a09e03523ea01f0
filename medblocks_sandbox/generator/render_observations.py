"""Observations at a care organization: vital signs (a BP panel with components) and lab results
(one DiagnosticReport per panel) with interpretation and reference ranges.
"""

from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import codes
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.history import Encounter
from medblocks_sandbox.generator.model import OrgInfo
from medblocks_sandbox.generator.render_common import (
    CareContext,
    OrgStore,
    Resource,
    instant,
    local,
    meta,
    quantity,
    ref,
)


def interpretation(loinc: str, value: float) -> dict[str, Any] | None:
    """H / L / N against the reference range."""
    lab = codes.LABS[loinc]
    if lab.high is not None and value > lab.high:
        c = ("H", "High")
    elif lab.low is not None and value < lab.low:
        c = ("L", "Low")
    else:
        c = ("N", "Normal")
    return {"coding": [coding(codes.INTERPRETATION, *c)], "text": c[1]}


def reference_range(loinc: str) -> list[dict[str, Any]]:
    """Observation.referenceRange with low/high Quantities and a text form."""
    lab = codes.LABS[loinc]
    rr: dict[str, Any] = {}
    if lab.low is not None:
        rr["low"] = quantity(lab.low, lab.unit)
    if lab.high is not None:
        rr["high"] = quantity(lab.high, lab.unit)
    if lab.low is not None and lab.high is not None:
        rr["text"] = f"{lab.low}-{lab.high} {lab.unit}"
    elif lab.low is not None:
        rr["text"] = f">={lab.low} {lab.unit}"
    elif lab.high is not None:
        rr["text"] = f"<{lab.high} {lab.unit}"
    return [rr] if rr else []


def _obs_base(
    st: OrgStore,
    ctx: CareContext,
    oid: str,
    category: tuple[str, str],
    code: dict,
    profile: str,
    when: datetime,
    enc_id: str | None,
) -> Resource:
    res: Resource = {
        "resourceType": "Observation",
        "id": oid,
        "meta": meta(when + timedelta(hours=2), profile),
        "status": "final",
        "category": [{"coding": [coding(codes.OBS_CATEGORY, *category)], "text": category[1]}],
        "code": code,
        "subject": ref("Patient", ctx.pid),
    }
    if enc_id:
        res["encounter"] = ref("Encounter", enc_id)
    return res


def render_vitals(st: OrgStore, ctx: CareContext, e: Encounter, enc_id: str) -> None:
    """The vital signs of one encounter: a BP panel with components and single vitals."""
    when = e.start + timedelta(minutes=10)
    vs = ("vital-signs", "Vital Signs")
    f = ctx.fact("enc", str(e.n), "obs")
    bp = _obs_base(
        st,
        ctx,
        st.rid("Observation", ctx.person_id, str(e.n), "85354-9"),
        vs,
        {
            "coding": [
                coding(codes.LOINC, "85354-9", "Blood pressure panel with all children optional")
            ],
            "text": "Blood pressure",
        },
        codes.US_CORE + "us-core-blood-pressure",
        when,
        enc_id,
    )
    bp["effectiveDateTime"] = local(when)
    bp["component"] = [
        {
            "code": {"coding": [coding(codes.LOINC, lo, codes.LABS[lo].display)]},
            "valueQuantity": quantity(e.vitals[lo], "mm[Hg]"),
            "interpretation": [interpretation(lo, e.vitals[lo])],
        }
        for lo in ("8480-6", "8462-4")
    ]
    st.put(bp, fact=f"{f}/85354-9")
    profiles = {
        "8867-4": "us-core-heart-rate",
        "9279-1": "us-core-respiratory-rate",
        "8310-5": "us-core-body-temperature",
        "8302-2": "us-core-body-height",
        "29463-7": "us-core-body-weight",
        "39156-5": "us-core-bmi",
        "59408-5": "us-core-pulse-oximetry",
    }
    for lo, prof in profiles.items():
        lab = codes.LABS[lo]
        codings = [coding(codes.LOINC, lo, lab.display)]
        if lo == "59408-5":
            codings.append(coding(codes.LOINC, "2708-6", "Oxygen saturation in Arterial blood"))
        o = _obs_base(
            st,
            ctx,
            st.rid("Observation", ctx.person_id, str(e.n), lo),
            vs,
            {"coding": codings, "text": lab.display},
            codes.US_CORE + prof,
            when,
            enc_id,
        )
        o["effectiveDateTime"] = local(when)
        o["valueQuantity"] = quantity(e.vitals[lo], lab.unit)
        st.put(o, fact=f"{f}/{lo}")


def render_labs(
    st: OrgStore, ctx: CareContext, e: Encounter, enc_id: str | None, performer: OrgInfo
) -> None:
    """Lab results of one encounter: one DiagnosticReport per panel with its Observations."""
    collected = e.start + timedelta(minutes=40)
    resulted = collected + timedelta(hours=5, minutes=12)
    lab_cat = ("laboratory", "Laboratory")
    copy = st.org.id != e.org
    perf = (
        {
            "identifier": {"system": codes.NPI_SYSTEM, "value": performer.npi},
            "display": performer.name,
        }
        if copy
        else ref("Organization", st.rid("Organization", "self"), performer.name)
    )
    for pkey in e.panels:
        panel = codes.PANELS[pkey]
        result_refs = []
        members = list(panel.members)
        for lo in members:
            lab = codes.LABS[lo]
            value = e.labs[lo]
            oid = st.rid("Observation", ctx.person_id, str(e.n), pkey, lo)
            o = _obs_base(
                st,
                ctx,
                oid,
                lab_cat,
                {"coding": [coding(codes.LOINC, lo, lab.display)], "text": lab.display},
                codes.US_CORE + "us-core-observation-lab",
                resulted,
                enc_id,
            )
            if lo == "9318-7" or st.org.id == "valley-medical":
                # a timed collection, or a source that always sends the collection window
                o["effectivePeriod"] = {
                    "start": local(collected),
                    "end": local(collected + timedelta(minutes=25)),
                }
            else:
                o["effectiveDateTime"] = local(collected)
            o["issued"] = instant(resulted)
            o["performer"] = [perf]
            o["valueQuantity"] = quantity(value, lab.unit)
            o["interpretation"] = [interpretation(lo, value)]
            rr = reference_range(lo)
            if rr:
                o["referenceRange"] = rr
            st.put(o, fact=ctx.fact("enc", str(e.n), "obs", lo))
            result_refs.append(ref("Observation", oid, lab.display))
        if pkey == "a1c" and e.urine_glucose_positive is not None:
            lo, disp = codes.URINE_GLUCOSE
            oid = st.rid("Observation", ctx.person_id, str(e.n), pkey, lo)
            o = _obs_base(
                st,
                ctx,
                oid,
                lab_cat,
                {"coding": [coding(codes.LOINC, lo, disp)], "text": "Urine glucose"},
                codes.US_CORE + "us-core-observation-lab",
                resulted,
                enc_id,
            )
            o["effectiveDateTime"] = local(collected)
            o["issued"] = instant(resulted)
            o["valueCodeableConcept"] = {
                "coding": [codes.POSITIVE if e.urine_glucose_positive else codes.NEGATIVE]
            }
            st.put(o, fact=ctx.fact("enc", str(e.n), "obs", lo))
            result_refs.append(ref("Observation", oid, disp))
        dr: Resource = {
            "resourceType": "DiagnosticReport",
            "id": st.rid("DiagnosticReport", ctx.person_id, str(e.n), pkey),
            "meta": meta(
                resulted + timedelta(minutes=5), codes.US_CORE + "us-core-diagnosticreport-lab"
            ),
            "status": "final",
            "category": [{"coding": [coding(codes.V2_0074, "LAB", "Laboratory")]}],
            "code": {
                "coding": [coding(codes.LOINC, panel.loinc, panel.display)],
                "text": panel.display,
            },
            "subject": ref("Patient", ctx.pid),
        }
        if enc_id:
            dr["encounter"] = ref("Encounter", enc_id)
        dr["effectiveDateTime"] = local(collected)
        dr["issued"] = instant(resulted)
        dr["performer"] = [perf]
        dr["result"] = result_refs
        st.put(dr, fact=ctx.fact("enc", str(e.n), "report", pkey))

"""One encounter at a care organization and what it records: immunizations, procedures, the
clinical note (DocumentReference and Binary), smoking status, and the Encounter itself.
"""

import base64
import hashlib
from datetime import datetime, timedelta

from medblocks_sandbox.generator import care_codes, codes
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.history import Encounter, History
from medblocks_sandbox.generator.model import OrgInfo
from medblocks_sandbox.generator.render_clinical import condition_code, render_medication_request
from medblocks_sandbox.generator.render_common import (
    CareContext,
    OrgStore,
    Resource,
    day,
    instant,
    local,
    meta,
    quantity,
    ref,
)
from medblocks_sandbox.generator.render_observations import _obs_base, render_labs, render_vitals


def render_immunization(
    st: OrgStore, ctx: CareContext, e: Encounter, vkey: str, enc_id: str | None
) -> Resource:
    """An Immunization: administered here (primarySource) or a historical record of it."""
    v = care_codes.VACCINES[vkey]
    given_here = enc_id is not None
    when = e.start + timedelta(minutes=35)
    res: Resource = {
        "resourceType": "Immunization",
        "id": st.rid("Immunization", ctx.person_id, str(e.n), vkey),
        "meta": meta(
            when + timedelta(hours=1) if given_here else when + timedelta(days=20),
            codes.US_CORE + "us-core-immunization",
        ),
        "status": "completed",
        "vaccineCode": {"coding": [coding(codes.CVX, v.cvx, v.display)], "text": v.display},
        "patient": ref("Patient", ctx.pid),
    }
    if enc_id is not None:
        res["encounter"] = ref("Encounter", enc_id)
    res["occurrenceDateTime"] = local(when) if given_here else day(when)
    res["primarySource"] = given_here
    if given_here:
        res["lotNumber"] = f"{vkey.upper()[:2]}{(e.n * 7919 + len(ctx.pid)) % 100000:05d}"
        res["site"] = {
            "coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ActSite", "LA", "left arm")]
        }
        res["route"] = {
            "coding": [
                coding(
                    "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
                    "IM",
                    "Injection, intramuscular",
                )
            ]
        }
        res["doseQuantity"] = quantity(0.5, "mL")
        c = ctx.clinicians[e.practitioner]
        res["performer"] = [{"actor": ref("Practitioner", st.rid("Practitioner", c.npi))}]
    else:
        res["reportOrigin"] = {
            "coding": [
                coding(
                    "http://terminology.hl7.org/CodeSystem/immunization-origin",
                    "record",
                    "Written Record",
                )
            ]
        }
    return st.put(res, fact=ctx.fact("imm", str(e.n), vkey))


def render_procedure(
    st: OrgStore, ctx: CareContext, e: Encounter, pkey: str, enc_id: str
) -> Resource:
    """A US Core Procedure with SNOMED CT and CPT/HCPCS codings."""
    p = care_codes.PROCEDURES[pkey]
    when = e.start + timedelta(minutes=20)
    res: Resource = {
        "resourceType": "Procedure",
        "id": st.rid("Procedure", ctx.person_id, str(e.n), pkey),
        "meta": meta(when + timedelta(hours=1), codes.US_CORE + "us-core-procedure"),
        "status": "completed",
        "code": {
            "coding": [
                coding(codes.SNOMED, p.snomed, p.snomed_display),
                coding(p.billing_system, p.billing_code, p.billing_display),
            ],
            "text": p.snomed_display.rsplit(" (", 1)[0],
        },
        "subject": ref("Patient", ctx.pid),
        "encounter": ref("Encounter", enc_id),
    }
    if pkey == "colonoscopy":
        res["performedPeriod"] = {"start": local(when), "end": local(when + timedelta(minutes=45))}
    else:
        res["performedDateTime"] = local(when)
    c = ctx.clinicians[e.practitioner]
    res["performer"] = [{"actor": ref("Practitioner", st.rid("Practitioner", c.npi))}]
    return st.put(res, fact=ctx.fact("enc", str(e.n), "proc", pkey))


def note_text(h: History, e: Encounter, org: OrgInfo) -> str:
    """A short plain-text clinical note consistent with the encounter."""
    k = care_codes.ENCOUNTER_KINDS[e.kind]
    lines = [
        f"{care_codes.NOTE_TYPES[e.note or 'progress'][1]} - {org.name}",
        f"Date: {day(e.start)}",
        f"Visit: {k.snomed_display.rsplit(' (', 1)[0]}",
        "",
    ]
    if e.acute:
        lines.append(f"Assessment: {codes.CONDITIONS[e.acute].snomed_display.rsplit(' (', 1)[0]}.")
    for r in e.reasons:
        lines.append(
            f"Chronic problem reviewed: {codes.CONDITIONS[r].snomed_display.rsplit(' (', 1)[0]}."
        )
    v = e.vitals
    lines.append(
        f"BP {v['8480-6']:.0f}/{v['8462-4']:.0f} mmHg, HR {v['8867-4']:.0f}/min, "
        f"T {v['8310-5']} C, SpO2 {v['59408-5']}%, BMI {v['39156-5']}."
    )
    for lo in ("4548-4", "2160-0", "18262-6", "3016-3"):
        if lo in e.labs:
            lines.append(f"{codes.LABS[lo].display}: {e.labs[lo]} {codes.LABS[lo].unit}.")
    if e.vaccines:
        lines.append(
            "Vaccines given: " + ", ".join(care_codes.VACCINES[x].display for x in e.vaccines) + "."
        )
    lines.append("Plan: continue current medications; follow up as scheduled.")
    return "\n".join(lines) + "\n"


def render_note(st: OrgStore, ctx: CareContext, e: Encounter, enc_id: str) -> None:
    """A DocumentReference whose attachment points at a Binary holding the note text."""
    assert e.note is not None
    code, display = care_codes.NOTE_TYPES[e.note]
    text = note_text(ctx.h, e, st.org).encode()
    bin_id = st.rid("Binary", ctx.person_id, str(e.n), "note")
    signed = e.end + timedelta(hours=1, minutes=17)
    st.put(
        {
            "resourceType": "Binary",
            "id": bin_id,
            "meta": meta(signed),
            "contentType": "text/plain",
            "data": base64.b64encode(text).decode(),
        }
    )
    c = ctx.clinicians[e.practitioner]
    st.put(
        {
            "resourceType": "DocumentReference",
            "id": st.rid("DocumentReference", ctx.person_id, str(e.n), "note"),
            "meta": meta(signed, codes.US_CORE + "us-core-documentreference"),
            "identifier": [
                {
                    "system": "urn:ietf:rfc:3986",
                    "value": f"urn:oid:{st.org.oid}.9.{abs(hash_int(bin_id)) % 10**9}",
                }
            ],
            "status": "current",
            "docStatus": "final",
            "type": {"coding": [coding(codes.LOINC, code, display)], "text": display},
            "category": [
                {"coding": [coding(codes.DOCREF_CATEGORY, "clinical-note", "Clinical Note")]}
            ],
            "subject": ref("Patient", ctx.pid),
            "date": instant(signed),
            "author": [ref("Practitioner", st.rid("Practitioner", c.npi), f"{c.given} {c.family}")],
            "custodian": ref("Organization", st.rid("Organization", "self")),
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "url": f"Binary/{bin_id}",
                        "size": len(text),
                        "hash": base64.b64encode(hashlib.sha1(text).digest()).decode(),
                        "title": display,
                        "creation": local(signed),
                    },
                    "format": {
                        "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                        "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient",
                        "display": "mimeType Sufficient",
                    },
                }
            ],
            "context": {
                "encounter": [ref("Encounter", enc_id)],
                "period": {"start": local(e.start), "end": local(e.end)},
            },
        },
        fact=ctx.fact("enc", str(e.n), "note"),
    )


def hash_int(s: str) -> int:
    """A stable integer hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


def render_encounter(st: OrgStore, ctx: CareContext, e: Encounter) -> str:
    """One encounter at this org and everything recorded during it; returns the Encounter id."""
    k = care_codes.ENCOUNTER_KINDS[e.kind]
    enc_id = st.rid("Encounter", ctx.person_id, str(e.n))
    ctx.encounter_ids[e.n] = enc_id
    c = ctx.clinicians[e.practitioner]
    type_codings = [coding(codes.SNOMED, k.snomed, k.snomed_display)]
    cpt = wellness_cpt(ctx.h.age) if e.kind == "wellness" else (k.cpt, k.cpt_display)
    type_codings.append(coding(codes.CPT, *cpt))
    res: Resource = {
        "resourceType": "Encounter",
        "id": enc_id,
        "meta": meta(e.end + timedelta(hours=6), codes.US_CORE + "us-core-encounter"),
        "identifier": [
            {
                "use": "usual",
                "system": f"urn:oid:{st.org.oid}.3",
                "value": str(hash_int(enc_id) % 10**10),
            }
        ],
        "status": "finished",
        "class": coding(codes.V3_ACTCODE, k.act_class, k.act_display),
        "type": [{"coding": type_codings, "text": k.snomed_display.rsplit(" (", 1)[0]}],
        "subject": ref("Patient", ctx.pid),
        "participant": [
            {
                "type": [{"coding": [coding(codes.PARTICIPATION_TYPE, "ATND", "attender")]}],
                "period": {"start": local(e.start), "end": local(e.end)},
                "individual": ref(
                    "Practitioner",
                    st.rid("Practitioner", c.npi),
                    f"{c.given} {c.family}, {c.qualification[0]}",
                ),
            }
        ],
        "period": {"start": local(e.start), "end": local(e.end)},
    }
    diagnoses = []
    reason_codes = []
    if e.acute:
        dx_id = st.rid("Condition", ctx.person_id, str(e.n), e.acute)
        diagnoses.append(dx_id)
        reason_codes.append(condition_code(e.acute, with_icd=False))
    for r in e.reasons:
        reason_codes.append(condition_code(r, with_icd=False))
    if reason_codes:
        res["reasonCode"] = reason_codes
    if diagnoses or e.reasons:
        res["diagnosis"] = [
            {"condition": ref("Condition", d), "rank": i + 1} for i, d in enumerate(diagnoses)
        ]
        res["diagnosis"] += [
            {
                "condition": ref("Condition", ctx.condition_ids[r]),
                "rank": len(res["diagnosis"]) + i + 1,
            }
            for i, r in enumerate(x for x in e.reasons if x in ctx.condition_ids)
        ]
        if not res["diagnosis"]:
            del res["diagnosis"]
    if e.kind == "inpatient":
        res["hospitalization"] = {
            "admitSource": {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/admit-source",
                        "emd",
                        "From accident/emergency department",
                    )
                ]
            },
            "dischargeDisposition": {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                        "home",
                        "Home",
                    )
                ]
            },
        }
    res["location"] = [{"location": ref("Location", st.rid("Location", str(e.location)))}]
    res["serviceProvider"] = ref("Organization", st.rid("Organization", "self"), st.org.name)
    st.put(res, fact=ctx.fact("enc", str(e.n)))

    if e.acute:
        st.put(
            {
                "resourceType": "Condition",
                "id": diagnoses[0],
                "meta": meta(
                    e.end + timedelta(hours=6),
                    codes.US_CORE + "us-core-condition-encounter-diagnosis",
                ),
                "clinicalStatus": {"coding": [coding(codes.COND_CLINICAL, "resolved", "Resolved")]},
                "verificationStatus": {
                    "coding": [coding(codes.COND_VER, "confirmed", "Confirmed")]
                },
                "category": [
                    {
                        "coding": [
                            coding(
                                codes.COND_CATEGORY, "encounter-diagnosis", "Encounter Diagnosis"
                            )
                        ]
                    }
                ],
                "code": condition_code(e.acute, with_icd=True),
                "subject": ref("Patient", ctx.pid),
                "encounter": ref("Encounter", enc_id),
                "onsetDateTime": local(e.start - timedelta(days=2)),
                "abatementDateTime": local(e.start + timedelta(days=12)),
                "recordedDate": local(e.start),
            },
            fact=ctx.fact("enc", str(e.n), "dx", e.acute),
        )
    render_vitals(st, ctx, e, enc_id)
    if e.panels:
        render_labs(st, ctx, e, enc_id, st.org)
    for p in e.procedures:
        render_procedure(st, ctx, e, p, enc_id)
    for v in e.vaccines:
        render_immunization(st, ctx, e, v, enc_id)
    for m in e.acute_meds:
        render_medication_request(
            st,
            ctx,
            m,
            f"enc/{e.n}/med/{m}",
            e.start + timedelta(minutes=50),
            encounter_id=enc_id,
            reason_condition=e.acute,
            status="completed",
            clinician=c,
        )
    if e.note:
        render_note(st, ctx, e, enc_id)
    return enc_id


def wellness_cpt(age: int) -> tuple[str, str]:
    """The preventive-visit CPT code for an age."""
    for upper, code, display in care_codes.WELLNESS_CPT:
        if age < upper:
            return code, display
    return care_codes.WELLNESS_CPT[-1][1], care_codes.WELLNESS_CPT[-1][2]


def render_smoking(st: OrgStore, ctx: CareContext, when: datetime) -> None:
    """US Core smoking status (valueCodeableConcept)."""
    o = _obs_base(
        st,
        ctx,
        st.rid("Observation", ctx.person_id, "smoking"),
        ("social-history", "Social History"),
        {"coding": [coding(codes.LOINC, *codes.SMOKING_STATUS)], "text": codes.SMOKING_STATUS[1]},
        codes.US_CORE + "us-core-smokingstatus",
        when,
        None,
    )
    o["effectiveDateTime"] = local(when)
    o["valueCodeableConcept"] = {"coding": [coding(codes.SNOMED, *ctx.h.smoking)]}
    st.put(o, fact=ctx.fact("smoking"))

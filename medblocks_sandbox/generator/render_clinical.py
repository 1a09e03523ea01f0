"""Problems, allergies and medication requests at a care organization (US Core): SNOMED CT
plus ICD-10-CM where the org sends both, Medication resources where the org references them.
"""

from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import care_codes, codes
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.render_common import (
    CareContext,
    Clinician,
    OrgStore,
    Resource,
    day,
    local,
    meta,
    ref,
)

# --------------------------------------------------------------------------------------------
# clinical rendering at a care organization (EHR or network)


def condition_code(key: str, *, with_icd: bool) -> dict[str, Any]:
    """Condition.code: SNOMED CT, plus ICD-10-CM as a second coding when the org sends both."""
    c = codes.CONDITIONS[key]
    codings = [coding(codes.SNOMED, c.snomed, c.snomed_display)]
    if with_icd:
        codings.append(coding(codes.ICD10CM, c.icd10, c.icd10_display))
    return {"coding": codings, "text": c.snomed_display.rsplit(" (", 1)[0]}


def render_problem(st: OrgStore, ctx: CareContext, key: str, first_seen: datetime) -> Resource:
    """A problem-list-item Condition for a chronic condition."""
    h = ctx.h
    onset = h.conditions[key]
    primary = h.care_orgs[0] == st.org.id
    cid = st.rid("Condition", ctx.person_id, key)
    ctx.condition_ids[key] = cid
    recorded = max(onset, first_seen) if not primary else onset
    res: Resource = {
        "resourceType": "Condition",
        "id": cid,
        "meta": meta(
            recorded + timedelta(hours=3),
            codes.US_CORE + "us-core-condition-problems-health-concerns",
        ),
        "clinicalStatus": {"coding": [coding(codes.COND_CLINICAL, "active", "Active")]},
        "verificationStatus": {"coding": [coding(codes.COND_VER, "confirmed", "Confirmed")]},
        "category": [
            {"coding": [coding(codes.COND_CATEGORY, "problem-list-item", "Problem List Item")]}
        ],
        "code": condition_code(key, with_icd=st.org.id_style != "numeric"),
        "subject": ref("Patient", ctx.pid),
        "onsetDateTime": local(onset)
        if primary
        else (day(onset) if st.org.kind == "ehr" else day(onset)[:4]),
        "recordedDate": local(recorded),
        "recorder": ref("Practitioner", st.rid("Practitioner", ctx.clinicians[0].npi)),
    }
    return st.put(res, fact=ctx.fact("cond", key))


def render_allergy(st: OrgStore, ctx: CareContext, key: str, when: datetime) -> Resource:
    """A US Core AllergyIntolerance."""
    a = care_codes.ALLERGIES[key]
    res: Resource = {
        "resourceType": "AllergyIntolerance",
        "id": st.rid("AllergyIntolerance", ctx.person_id, key),
        "meta": meta(when, codes.US_CORE + "us-core-allergyintolerance"),
        "clinicalStatus": {"coding": [coding(codes.ALLERGY_CLINICAL, "active", "Active")]},
        "verificationStatus": {"coding": [coding(codes.ALLERGY_VER, "confirmed", "Confirmed")]},
        "type": "allergy",
        "category": [a.category],
        "criticality": a.criticality,
        "code": {"coding": [coding(*c) for c in a.codings], "text": a.text},
        "patient": ref("Patient", ctx.pid),
        "recordedDate": local(when),
        "reaction": [
            {
                "manifestation": [
                    {
                        "coding": [coding(codes.SNOMED, *a.reaction)],
                        "text": a.reaction[1].rsplit(" (", 1)[0],
                    }
                ],
                "severity": "severe" if a.criticality == "high" else "mild",
            }
        ],
    }
    return st.put(res, fact=ctx.fact("allergy", key))


def render_medication_request(
    st: OrgStore,
    ctx: CareContext,
    med_key: str,
    fact: str,
    authored: datetime,
    *,
    encounter_id: str | None,
    reason_condition: str | None,
    status: str,
    clinician: Clinician,
) -> Resource:
    """A US Core MedicationRequest; Mercy General references a Medication resource."""
    m = codes.MEDS[med_key]
    med_codings = [coding(codes.RXNORM, m.rxnorm, m.display)]
    if m.ingredient != m.rxnorm:
        med_codings.append(coding(codes.RXNORM, m.ingredient, m.ingredient_display))
    med_cc: dict[str, Any] = {"coding": med_codings, "text": m.display}
    res: Resource = {
        "resourceType": "MedicationRequest",
        "id": st.rid("MedicationRequest", ctx.person_id, fact),
        "meta": meta(authored + timedelta(minutes=30), codes.US_CORE + "us-core-medicationrequest"),
        "status": status,
        "intent": "order",
        "category": [
            {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                        "outpatient",
                        "Outpatient",
                    )
                ]
            }
        ],
    }
    if st.org.id_style == "epic":
        med_id = st.rid("Medication", m.rxnorm)
        if ("Medication", med_id) not in st.resources:
            st.put(
                {
                    "resourceType": "Medication",
                    "id": med_id,
                    "meta": meta(
                        datetime(2020, 1, 6, 9, 0, 0, tzinfo=authored.tzinfo),
                        codes.US_CORE + "us-core-medication",
                    ),
                    "code": med_cc,
                    "form": {"coding": [coding(codes.SNOMED, *m.form_snomed)]},
                }
            )
        res["medicationReference"] = ref("Medication", med_id, m.display)
    else:
        res["medicationCodeableConcept"] = med_cc
    res["subject"] = ref("Patient", ctx.pid)
    if encounter_id:
        res["encounter"] = ref("Encounter", encounter_id)
    res["authoredOn"] = local(authored)
    res["requester"] = ref(
        "Practitioner",
        st.rid("Practitioner", clinician.npi),
        f"{clinician.given} {clinician.family}",
    )
    if reason_condition and reason_condition in ctx.condition_ids:
        res["reasonReference"] = [ref("Condition", ctx.condition_ids[reason_condition])]
    elif reason_condition:
        res["reasonCode"] = [condition_code(reason_condition, with_icd=False)]
    res["dosageInstruction"] = [
        {
            "sequence": 1,
            "text": m.sig,
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
            "route": {"coding": [coding(codes.SNOMED, "26643006", "Oral route")]}
            if m.form_snomed[1] != "Inhaler"
            else {"coding": [coding(codes.SNOMED, "447694001", "Respiratory tract route")]},
            "doseAndRate": [
                {
                    "doseQuantity": {
                        "value": 1,
                        "unit": m.form_snomed[1].lower(),
                        "system": codes.UCUM,
                        "code": "{" + m.form_snomed[1].lower() + "}",
                    }
                }
            ],
        }
    ]
    if status == "active":
        # a 90-day supply: 90 tablets/capsules, or one inhaler per month
        form = m.form_snomed[1].lower()
        supply = (3, "{inhaler}") if form == "inhaler" else (90, "{" + form + "}")
        res["dispenseRequest"] = {
            "numberOfRepeatsAllowed": 3,
            "quantity": {"value": supply[0], "unit": form, "system": codes.UCUM, "code": supply[1]},
            "expectedSupplyDuration": {
                "value": 90,
                "unit": "days",
                "system": codes.UCUM,
                "code": "d",
            },
        }
    return st.put(res, fact=ctx.fact(*fact.split("/")))

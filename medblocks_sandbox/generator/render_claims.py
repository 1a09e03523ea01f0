"""The payer's resources (CARIN Blue Button): Coverage, the providers claims point to, and
ExplanationOfBenefit with adjudication amounts.
"""

from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import care_codes, codes, demographics
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.history import Encounter
from medblocks_sandbox.generator.model import OrgInfo
from medblocks_sandbox.generator.render_common import (
    CareContext,
    Clinician,
    OrgStore,
    Resource,
    day,
    instant,
    local,
    meta,
    ref,
)
from medblocks_sandbox.generator.render_encounters import hash_int, wellness_cpt
from medblocks_sandbox.generator.render_org import practitioner

# --------------------------------------------------------------------------------------------
# payer: Coverage and ExplanationOfBenefit (CARIN Blue Button)


def _amount(v: float) -> dict[str, Any]:
    return {"value": round(v, 2), "currency": "USD"}


def _adjudication(
    code: str, display: str, amount: float, system: str = codes.ADJUDICATION
) -> dict[str, Any]:
    return {"category": {"coding": [coding(system, code, display)]}, "amount": _amount(amount)}


PRICES = {
    "99213": 128.0,
    "99214": 186.0,
    "99284": 412.0,
    "99223": 1890.0,
    "99393": 162.0,
    "99394": 171.0,
    "99395": 178.0,
    "99396": 191.0,
    "99397": 204.0,
    "83036": 21.5,
    "80048": 18.75,
    "80061": 27.4,
    "85025": 16.2,
    "84443": 31.1,
    "82043": 12.8,
    "93000": 42.0,
    "94010": 55.0,
    "71046": 89.0,
    "G0444": 24.0,
    "45378": 1210.0,
    "77067": 245.0,
    "90471": 25.0,
}


def render_coverage(st: OrgStore, ctx: CareContext, member_id: str, start: datetime) -> str:
    """The member's C4BB Coverage; returns its id."""
    cov_id = st.rid("Coverage", ctx.person_id)
    plan = (
        ("silver-ppo", "Summit Silver PPO")
        if hash_int(ctx.person_id) % 3
        else ("gold-hmo", "Summit Gold HMO")
    )
    st.put(
        {
            "resourceType": "Coverage",
            "id": cov_id,
            "meta": meta(start + timedelta(days=1), codes.C4BB + "C4BB-Coverage"),
            "identifier": [
                {
                    "type": {"coding": [coding(codes.V2_0203, "MB", "Member Number")]},
                    "system": st.org.mrn_system,
                    "value": member_id,
                }
            ],
            "status": "active",
            "type": {"coding": [coding(codes.V3_ACTCODE, "HIP", "health insurance plan policy")]},
            "subscriberId": member_id,
            "beneficiary": ref("Patient", ctx.pid),
            "relationship": {"coding": [coding(codes.SUBSCRIBER_REL, "self", "Self")]},
            "period": {"start": day(start)},
            "payor": [ref("Organization", st.rid("Organization", "self"), st.org.name)],
            "class": [
                {
                    "type": {"coding": [coding(codes.COVERAGE_CLASS, "group", "Group")]},
                    "value": f"GRP{hash_int(plan[0]) % 100000:05d}",
                    "name": "Oregon Employers Group",
                },
                {
                    "type": {"coding": [coding(codes.COVERAGE_CLASS, "plan", "Plan")]},
                    "value": plan[0],
                    "name": plan[1],
                },
            ],
        }
    )
    return cov_id


def ensure_provider(
    st: OrgStore, c: Clinician, care_org: OrgInfo, when: datetime
) -> tuple[str, str]:
    """Payer-side copies of the billing Practitioner and provider Organization; their ids."""
    prac = practitioner(st, c, when)
    if ("Practitioner", prac["id"]) not in st.resources:
        st.put(prac)
    org_id = st.rid("Organization", care_org.npi)
    if ("Organization", org_id) not in st.resources:
        st.put(
            {
                "resourceType": "Organization",
                "id": org_id,
                "meta": meta(when, codes.C4BB + "C4BB-Organization"),
                "identifier": [
                    {
                        "type": {
                            "coding": [coding(codes.V2_0203, "NPI", "National provider identifier")]
                        },
                        "system": codes.NPI_SYSTEM,
                        "value": care_org.npi,
                    }
                ],
                "active": True,
                "type": [{"coding": [coding(codes.ORG_TYPE, "prov", "Healthcare Provider")]}],
                "name": care_org.name,
                "address": [{"city": care_org.city, "state": demographics.STATE, "country": "US"}],
            }
        )
    return prac["id"], org_id


def render_eob(
    st: OrgStore,
    ctx: CareContext,
    e: Encounter,
    cov_id: str,
    care_org: OrgInfo,
    clinician: Clinician,
) -> Resource:
    """One adjudicated claim (C4BB EOB) for an encounter: ICD-10-CM diagnoses, CPT/HCPCS lines."""
    received = e.end + timedelta(days=min(3, e.claim_lag_days))
    processed = e.end + timedelta(days=e.claim_lag_days)
    prac_id, prov_org_id = ensure_provider(st, clinician, care_org, processed)
    inpatient = e.kind == "inpatient"
    eob_id = st.rid("ExplanationOfBenefit", ctx.person_id, str(e.n))
    dx_keys = ([e.acute] if e.acute else []) + [r for r in e.reasons if r not in (e.acute,)]
    diagnosis = []
    for i, key in enumerate(dx_keys):
        c = codes.CONDITIONS[key]
        if i == 0:
            dtype = coding(codes.DIAG_TYPE, "principal", "Principal Diagnosis")
        elif inpatient:
            dtype = coding(codes.C4BB_CS + "C4BBClaimDiagnosisType", "other", "Other")
        else:
            dtype = coding(codes.C4BB_CS + "C4BBClaimDiagnosisType", "secondary", "Secondary")
        diagnosis.append(
            {
                "sequence": i + 1,
                "diagnosisCodeableConcept": {
                    "coding": [coding(codes.ICD10CM, c.icd10, c.icd10_display)]
                },
                "type": [{"coding": [dtype]}],
            }
        )
    k = care_codes.ENCOUNTER_KINDS[e.kind]
    lines: list[tuple[str, str, str]] = []
    em = wellness_cpt(ctx.h.age) if e.kind == "wellness" else (k.cpt, k.cpt_display)
    lines.append((codes.CPT, *em))
    for p in e.panels:
        lines.append((codes.CPT, *care_codes.PANEL_CPT[p]))
    for p in e.procedures:
        pd = care_codes.PROCEDURES[p]
        lines.append((pd.billing_system, pd.billing_code, pd.billing_display))
    for v in e.vaccines:
        vd = care_codes.VACCINES[v]
        lines.append((codes.CPT, vd.cpt, vd.cpt_display))
    if e.vaccines:
        lines.append((codes.CPT, *care_codes.VACCINE_ADMIN_CPT))
    items = []
    sub_total = ben_total = 0.0
    for i, (system, code, display) in enumerate(lines):
        submitted = PRICES.get(code, 38.0) * (1 + (hash_int(f"{eob_id}{i}") % 30) / 100)
        allowed = round(submitted * 0.72, 2)
        copay = 25.0 if i == 0 and e.kind in ("acute", "followup") else 0.0
        paid = round(allowed - copay, 2)
        sub_total += submitted
        ben_total += paid
        item: dict[str, Any] = {
            "sequence": i + 1,
            "diagnosisSequence": [1] if diagnosis else None,
            "productOrService": {"coding": [coding(system, code, display)]},
            "servicedDate": day(e.start),
            "locationCodeableConcept": {"coding": [coding(codes.CMS_POS, k.pos, k.pos_display)]},
            "quantity": {"value": 1},
            "net": _amount(submitted),
            "adjudication": [
                _adjudication("submitted", "Submitted Amount", submitted),
                _adjudication("eligible", "Eligible Amount", allowed),
                _adjudication("copay", "CoPay", copay),
                _adjudication("benefit", "Benefit Amount", paid),
                _adjudication(
                    "paidtoprovider", "Paid to provider", paid, codes.C4BB_CS + "C4BBAdjudication"
                ),
            ],
        }
        if item["diagnosisSequence"] is None:
            del item["diagnosisSequence"]
        if inpatient:
            item["revenue"] = {
                "coding": [
                    {"system": "https://www.nubc.org/CodeSystem/RevenueCodes", "code": "0120"}
                ]
            }
        items.append(item)
    profile = (
        "C4BB-ExplanationOfBenefit-Inpatient-Institutional"
        if inpatient
        else "C4BB-ExplanationOfBenefit-Professional-NonClinician"
    )
    supporting: list[dict[str, Any]] = [
        {
            "sequence": 1,
            "category": {
                "coding": [
                    coding(
                        codes.C4BB_CS + "C4BBSupportingInfoType",
                        "clmrecvddate",
                        "Claim Received Date",
                    )
                ]
            },
            "timingDate": day(received),
        },
    ]
    if inpatient:
        supporting.append(
            {
                "sequence": 2,
                "category": {
                    "coding": [
                        coding(
                            codes.C4BB_CS + "C4BBSupportingInfoType",
                            "admissionperiod",
                            "Admission Period",
                        )
                    ]
                },
                "timingPeriod": {"start": local(e.start), "end": local(e.end)},
            }
        )
    else:
        supporting.append(
            {
                "sequence": 2,
                "category": {
                    "coding": [
                        coding(
                            codes.C4BB_CS + "C4BBSupportingInfoType",
                            "billingnetworkcontractingstatus",
                            "Billing Network Contracting Status",
                        )
                    ]
                },
                "code": {
                    "coding": [
                        coding(
                            codes.C4BB_CS + "C4BBPayerAdjudicationStatus",
                            "contracted",
                            "Contracted",
                        )
                    ]
                },
            }
        )
    res: Resource = {
        "resourceType": "ExplanationOfBenefit",
        "id": eob_id,
        "meta": meta(processed, codes.C4BB + profile),
        "identifier": [
            {
                "type": {
                    "coding": [
                        coding(codes.C4BB_CS + "C4BBIdentifierType", "uc", "Unique Claim ID")
                    ]
                },
                "system": f"https://{st.org.id}.example/fhir/sid/claim-id",
                "value": f"CLM{hash_int(eob_id) % 10**12:012d}",
            }
        ],
        "status": "active",
        "type": {
            "coding": [
                coding(
                    codes.CLAIM_TYPE,
                    "institutional" if inpatient else "professional",
                    "Institutional" if inpatient else "Professional",
                )
            ]
        },
        "use": "claim",
        "patient": ref("Patient", ctx.pid),
        "billablePeriod": {"start": day(e.start), "end": day(e.end)},
        "created": instant(received),
        "insurer": ref("Organization", st.rid("Organization", "self"), st.org.name),
        "provider": ref("Organization", prov_org_id, care_org.name)
        if inpatient
        else ref("Practitioner", prac_id),
        "payee": {
            "type": {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/payeetype", "provider", "Provider"
                    )
                ]
            },
            "party": ref("Organization", prov_org_id),
        },
        "outcome": "complete",
        "careTeam": [
            {
                "sequence": 1,
                "provider": ref("Practitioner", prac_id),
                "role": {
                    "coding": [
                        coding(
                            codes.C4BB_CS + "C4BBClaimCareTeamRole",
                            "performing",
                            "Performing provider",
                        )
                    ]
                },
            }
        ],
        "supportingInfo": supporting,
        "diagnosis": diagnosis,
        "insurance": [{"focal": True, "coverage": ref("Coverage", cov_id)}],
        "item": items,
        "total": [
            _adjudication("submitted", "Submitted Amount", sub_total),
            _adjudication("benefit", "Benefit Amount", ben_total),
        ],
        "payment": {"date": day(processed), "amount": _amount(ben_total)},
    }
    if not diagnosis:
        del res["diagnosis"]
    st.put(res, fact=ctx.fact("enc", str(e.n)))
    # the same facts seen on the claim
    for key in dx_keys:
        fact = (
            ctx.fact("cond", key)
            if codes.CONDITIONS[key].chronic
            else ctx.fact("enc", str(e.n), "dx", key)
        )
        st.facts.append((fact, st.org.id, "ExplanationOfBenefit", eob_id))
    for v in e.vaccines:
        st.facts.append((ctx.fact("imm", str(e.n), v), st.org.id, "ExplanationOfBenefit", eob_id))
    for p in e.procedures:
        st.facts.append(
            (ctx.fact("enc", str(e.n), "proc", p), st.org.id, "ExplanationOfBenefit", eob_id)
        )
    return res

"""Render histories into each organization's FHIR R4 resources (US Core on EHRs, CARIN BB at the
payer).

Each organization has its own id style, its own MRN system and a few habits of its own (Mercy
General references Medication resources, Valley Medical stamps labs with an effectivePeriod,
network orgs keep only year-precision onsets for problems they did not diagnose), so the same
fact looks a little different at each source, as it does in real life. Every rendered fact is
recorded in the fact ledger: (fact_id, org_id, resource_type, resource_id)."""

import base64
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from medblocks_sandbox.generator import codes
from medblocks_sandbox.generator.codes import coding
from medblocks_sandbox.generator.history import Encounter, History
from medblocks_sandbox.generator.model import Address, OrgInfo
from medblocks_sandbox.generator.people import SourceDemographics, npi_check_digit

Resource = dict[str, Any]
LOCAL_OFFSET = timedelta(hours=-7)


def local(dt: datetime) -> str:
    """A FHIR dateTime in the organizations' local zone (UTC-07:00)."""
    return (dt + LOCAL_OFFSET).strftime("%Y-%m-%dT%H:%M:%S-07:00")


def instant(dt: datetime) -> str:
    """A FHIR instant in UTC."""
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def day(dt: datetime) -> str:
    """A FHIR date (local calendar day)."""
    return (dt + LOCAL_OFFSET).strftime("%Y-%m-%d")


def make_id(org: OrgInfo, *parts: str) -> str:
    """A stable resource id in the org's style; depends only on the org and the fact key."""
    h = hashlib.blake2b("|".join((org.id, *parts)).encode(), digest_size=16).digest()
    if org.id_style == "epic":
        return "e" + base64.b32encode(h).decode().rstrip("=")
    if org.id_style == "numeric":
        return str(int.from_bytes(h[:6], "big"))
    return str(uuid.UUID(bytes=h, version=4))


@dataclass(frozen=True)
class Clinician:
    """A practitioner of one organization's roster."""

    given: str
    family: str
    npi: str
    qualification: tuple[str, str]
    key: str


def roster(org: OrgInfo, size: int = 6) -> list[Clinician]:
    """The org's clinicians; deterministic for the org id."""
    rng = random.Random(f"roster:{org.id}")
    out = []
    for i in range(size):
        nine = "1" + "".join(str(rng.randrange(10)) for _ in range(8))
        out.append(
            Clinician(
                given=rng.choice(codes.PRACTITIONER_GIVEN),
                family=rng.choice(codes.PRACTITIONER_FAMILY),
                npi=nine + npi_check_digit(nine),
                qualification=rng.choice(codes.PRACTITIONER_QUALIFICATIONS),
                key=f"clin{i}",
            )
        )
    return out


@dataclass
class OrgStore:
    """All resources held at one organization, in insertion order, plus its fact ledger rows."""

    org: OrgInfo
    resources: dict[tuple[str, str], Resource] = field(default_factory=dict)
    facts: list[tuple[str, str, str, str]] = field(default_factory=list)
    # no resource may claim to be updated after the world's reference instant
    ceiling: str | None = None

    def rid(self, *parts: str) -> str:
        """Stable id for a resource of this org."""
        return make_id(self.org, *parts)

    def put(self, resource: Resource, *, fact: str | None = None) -> Resource:
        """Store a resource (replacing one with the same type and id) and record its fact."""
        m = resource.get("meta")
        if self.ceiling is not None and m is not None and m["lastUpdated"] > self.ceiling:
            m["lastUpdated"] = self.ceiling
        self.resources[(resource["resourceType"], resource["id"])] = resource
        if fact is not None:
            self.facts.append((fact, self.org.id, resource["resourceType"], resource["id"]))
        return resource


def meta(last_updated: datetime, *profiles: str, version: int = 1) -> dict[str, Any]:
    """Resource.meta with versionId, lastUpdated and profiles."""
    m: dict[str, Any] = {"versionId": str(version), "lastUpdated": instant(last_updated)}
    if profiles:
        m["profile"] = list(profiles)
    return m


def ref(rtype: str, rid: str, display: str | None = None) -> dict[str, str]:
    """A literal reference."""
    r = {"reference": f"{rtype}/{rid}"}
    if display:
        r["display"] = display
    return r


def address(a: Address, *, period_end: str | None = None) -> dict[str, Any]:
    """FHIR Address."""
    out: dict[str, Any] = {
        "use": "home" if period_end is None else "old",
        "type": "physical",
        "line": [a.line],
        "city": a.city,
        "state": a.state,
        "postalCode": a.postal_code,
        "country": "US",
    }
    if period_end:
        out["period"] = {"end": period_end}
    return out


def quantity(value: float, unit: str) -> dict[str, Any]:
    """A UCUM Quantity."""
    return {"value": value, "unit": unit, "system": codes.UCUM, "code": unit}


# --------------------------------------------------------------------------------------------
# organization-level resources


def render_org_base(st: OrgStore, clinicians: list[Clinician], when: datetime) -> None:
    """The org's own Organization, its Locations and its Practitioners."""
    org = st.org
    kind_code = ("pay", "Payer") if org.kind == "payer" else ("prov", "Healthcare Provider")
    st.put(
        {
            "resourceType": "Organization",
            "id": st.rid("Organization", "self"),
            "meta": meta(
                when,
                codes.C4BB + "C4BB-Organization"
                if org.kind == "payer"
                else codes.US_CORE + "us-core-organization",
            ),
            "identifier": [
                {"system": codes.NPI_SYSTEM, "value": org.npi},
                {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{org.oid}"},
            ],
            "active": True,
            "type": [{"coding": [coding(codes.ORG_TYPE, *kind_code)]}],
            "name": org.name,
            "telecom": [
                {"system": "phone", "value": f"503-555-01{len(org.id) % 90 + 10}", "use": "work"}
            ],
            "address": [
                {
                    "line": [f"{100 + len(org.name) * 7} Main Street"],
                    "city": org.city,
                    "state": codes.STATE,
                    "postalCode": "97201",
                    "country": "US",
                }
            ],
        }
    )
    if org.kind != "payer":
        for i, (name, loc_type) in enumerate(
            (
                ("Emergency Department", ("ER", "Emergency room")),
                ("Outpatient Clinic", ("OF", "Outpatient facility")),
            )
        ):
            st.put(
                {
                    "resourceType": "Location",
                    "id": st.rid("Location", str(i)),
                    "meta": meta(when, codes.US_CORE + "us-core-location"),
                    "status": "active",
                    "name": f"{org.name} {name}",
                    "type": [
                        {
                            "coding": [
                                coding(
                                    "http://terminology.hl7.org/CodeSystem/v3-RoleCode", *loc_type
                                )
                            ]
                        }
                    ],
                    "address": {
                        "line": [f"{200 + i} Main Street"],
                        "city": org.city,
                        "state": codes.STATE,
                        "postalCode": "97201",
                        "country": "US",
                    },
                    "managingOrganization": ref("Organization", st.rid("Organization", "self")),
                }
            )
        for c in clinicians:
            st.put(practitioner(st, c, when))


def practitioner(st: OrgStore, c: Clinician, when: datetime) -> Resource:
    """A US Core / C4BB Practitioner."""
    profile = (
        codes.C4BB + "C4BB-Practitioner"
        if st.org.kind == "payer"
        else codes.US_CORE + "us-core-practitioner"
    )
    return {
        "resourceType": "Practitioner",
        "id": st.rid("Practitioner", c.npi),
        "meta": meta(when, profile),
        "identifier": [{"system": codes.NPI_SYSTEM, "value": c.npi}],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": c.family,
                "given": [c.given],
                "suffix": [c.qualification[0]],
            }
        ],
        "qualification": [
            {
                "code": {
                    "coding": [
                        coding("http://terminology.hl7.org/CodeSystem/v2-0360", *c.qualification)
                    ],
                    "text": c.qualification[1],
                }
            }
        ],
    }


# --------------------------------------------------------------------------------------------
# patient


def render_patient(
    st: OrgStore,
    h: History,
    demo: SourceDemographics,
    pid: str,
    mrn: str,
    gp: Clinician | None,
    when: datetime,
    version: int,
) -> Resource:
    """The org's Patient: MRN (or member id), noisy name/address/telecom, US Core extensions."""
    org = st.org
    p = h.person
    race = next(r for r in codes.RACES if r[0] == p.race)
    eth = next(e for e in codes.ETHNICITIES if e[0] == p.ethnicity)
    profiles = [codes.US_CORE + "us-core-patient"]
    id_type = ("MR", "Medical record number")
    if org.kind == "payer":
        profiles = [codes.C4BB + "C4BB-Patient"]
        id_type = ("MB", "Member Number")
    identifiers: list[dict[str, Any]] = [
        {
            "use": "usual",
            "type": {"coding": [coding(codes.V2_0203, *id_type)], "text": id_type[1]},
            "system": org.mrn_system,
            "value": mrn,
            "assigner": {"display": org.name},
        }
    ]
    if demo.ssn:
        identifiers.append(
            {
                "use": "official",
                "type": {"coding": [coding(codes.V2_0203, "SS", "Social Security number")]},
                "system": codes.SSN_SYSTEM,
                "value": demo.ssn.replace("-", "") if org.id_style == "numeric" else demo.ssn,
            }
        )
    given = [demo.given] + ([demo.middle] if demo.middle else [])
    names: list[dict[str, Any]] = [{"use": "official", "family": demo.family, "given": given}]
    if demo.maiden_recorded:
        names.append({"use": "maiden", "family": demo.maiden_recorded, "given": [demo.given]})
    telecom: list[dict[str, Any]] = []
    if demo.phone:
        telecom.append({"system": "phone", "value": demo.phone, "use": "home"})
    if demo.email:
        telecom.append({"system": "email", "value": demo.email})
    addresses = [address(demo.address)]
    if (
        demo.address == p.address
        and p.previous_address
        and org.kind == "ehr"
        and "old" not in demo.noise
    ):
        # some EHRs keep the address history
        addresses.append(address(p.previous_address, period_end=day(when - timedelta(days=400))))
    resource: Resource = {
        "resourceType": "Patient",
        "id": pid,
        "meta": meta(when, *profiles, version=version),
        "extension": [
            {
                "url": codes.US_CORE + "us-core-race",
                "extension": [
                    {"url": "ombCategory", "valueCoding": coding(codes.CDC_RACE, race[0], race[1])},
                    {"url": "text", "valueString": race[1]},
                ],
            },
            {
                "url": codes.US_CORE + "us-core-ethnicity",
                "extension": [
                    {"url": "ombCategory", "valueCoding": coding(codes.CDC_RACE, eth[0], eth[1])},
                    {"url": "text", "valueString": eth[1]},
                ],
            },
            {
                "url": codes.US_CORE + "us-core-birthsex",
                "valueCode": "F" if p.gender == "female" else "M",
            },
        ],
        "identifier": identifiers,
        "active": True,
        "name": names,
        "telecom": telecom,
        "gender": p.gender,
        "birthDate": demo.birth_date,
        "address": addresses,
        "maritalStatus": {
            "coding": [
                coding(
                    codes.MARITAL_STATUS_SYSTEM,
                    p.marital_status,
                    codes.MARITAL_STATUS[p.marital_status],
                )
            ]
        },
        "communication": [
            {
                "language": {
                    "coding": [coding("urn:ietf:bcp:47", p.language, codes.LANGUAGES[p.language])]
                },
                "preferred": True,
            }
        ],
    }
    if not telecom:
        del resource["telecom"]
    if gp is not None:
        resource["generalPractitioner"] = [
            ref(
                "Practitioner",
                st.rid("Practitioner", gp.npi),
                f"{gp.given} {gp.family}, {gp.qualification[0]}",
            )
        ]
    resource["managingOrganization"] = ref("Organization", st.rid("Organization", "self"), org.name)
    return st.put(resource)


# --------------------------------------------------------------------------------------------
# clinical rendering at a care organization (EHR or network)


@dataclass
class CareContext:
    """What a renderer needs about the patient at one org."""

    h: History
    pid: str
    clinicians: list[Clinician]
    encounter_ids: dict[int, str] = field(default_factory=dict)
    condition_ids: dict[str, str] = field(default_factory=dict)

    @property
    def person_id(self) -> str:
        """The person behind this source patient."""
        return self.h.person.person_id

    def fact(self, *parts: str) -> str:
        """A fact id: person id + fact path."""
        return "/".join((self.person_id, *parts))


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
    a = codes.ALLERGIES[key]
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


def render_immunization(
    st: OrgStore, ctx: CareContext, e: Encounter, vkey: str, enc_id: str | None
) -> Resource:
    """An Immunization: administered here (primarySource) or a historical record of it."""
    v = codes.VACCINES[vkey]
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
    p = codes.PROCEDURES[pkey]
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
    k = codes.ENCOUNTER_KINDS[e.kind]
    lines = [
        f"{codes.NOTE_TYPES[e.note or 'progress'][1]} - {org.name}",
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
            "Vaccines given: " + ", ".join(codes.VACCINES[x].display for x in e.vaccines) + "."
        )
    lines.append("Plan: continue current medications; follow up as scheduled.")
    return "\n".join(lines) + "\n"


def render_note(st: OrgStore, ctx: CareContext, e: Encounter, enc_id: str) -> None:
    """A DocumentReference whose attachment points at a Binary holding the note text."""
    assert e.note is not None
    code, display = codes.NOTE_TYPES[e.note]
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
    k = codes.ENCOUNTER_KINDS[e.kind]
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
    for upper, code, display in codes.WELLNESS_CPT:
        if age < upper:
            return code, display
    return codes.WELLNESS_CPT[-1][1], codes.WELLNESS_CPT[-1][2]


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


def render_care_org(
    st: OrgStore,
    ctx: CareContext,
    orgs: dict[str, OrgInfo],
    reference: datetime,
    exclude: frozenset[int] = frozenset(),
) -> None:
    """Everything this care org holds about the patient (but encounters in `exclude`)."""
    h = ctx.h
    org_id = st.org.id
    own = [e for e in h.encounters if e.org == org_id and e.n not in exclude]
    first = own[0].start if own else reference - timedelta(days=400)
    for key in h.problem_lists.get(org_id, []):
        render_problem(st, ctx, key, first)
    for key in h.allergy_lists.get(org_id, []):
        render_allergy(st, ctx, key, first + timedelta(minutes=5))
    if own:
        render_smoking(st, ctx, own[-1].start + timedelta(minutes=8))
    for key in h.med_lists.get(org_id, []):
        med = h.meds[key]
        onset = h.conditions[key]
        after = [e for e in own if e.start >= onset]
        authored = after[0].start + timedelta(minutes=45) if after else max(onset, first)
        enc_id = st.rid("Encounter", ctx.person_id, str(after[0].n)) if after else None
        render_medication_request(
            st,
            ctx,
            med,
            f"med/{med}",
            authored,
            encounter_id=enc_id,
            reason_condition=key,
            status="active",
            clinician=ctx.clinicians[0],
        )
    for e in own:
        render_encounter(st, ctx, e)
    # results and vaccines from elsewhere that reached this org
    for e in h.encounters:
        if e.org != org_id and org_id in e.lab_copies:
            render_labs(st, ctx, e, None, orgs[e.org])
    for n, vkey, target in h.immunization_copies:
        if target == org_id:
            e = next(x for x in h.encounters if x.n == n)
            render_immunization(st, ctx, e, vkey, None)


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
                "address": [{"city": care_org.city, "state": codes.STATE, "country": "US"}],
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
    k = codes.ENCOUNTER_KINDS[e.kind]
    lines: list[tuple[str, str, str]] = []
    em = wellness_cpt(ctx.h.age) if e.kind == "wellness" else (k.cpt, k.cpt_display)
    lines.append((codes.CPT, *em))
    for p in e.panels:
        lines.append((codes.CPT, *codes.PANEL_CPT[p]))
    for p in e.procedures:
        pd = codes.PROCEDURES[p]
        lines.append((pd.billing_system, pd.billing_code, pd.billing_display))
    for v in e.vaccines:
        vd = codes.VACCINES[v]
        lines.append((codes.CPT, vd.cpt, vd.cpt_display))
    if e.vaccines:
        lines.append((codes.CPT, *codes.VACCINE_ADMIN_CPT))
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


def render_payer(
    st: OrgStore,
    ctx: CareContext,
    member_id: str,
    orgs: dict[str, OrgInfo],
    rosters: dict[str, list[Clinician]],
    reference: datetime,
) -> None:
    """Coverage and one EOB per covered encounter whose claim was processed by the ref date."""
    h = ctx.h
    assert h.coverage_start is not None
    cov_id = render_coverage(st, ctx, member_id, h.coverage_start)
    for e in h.encounters:
        if e.start < h.coverage_start:
            continue
        if e.end + timedelta(days=e.claim_lag_days) > reference:
            continue  # claims lag: not adjudicated yet
        render_eob(st, ctx, e, cov_id, orgs[e.org], rosters[e.org][e.practitioner])

"""Org-neutral care histories: what happened to a person, where and when.

A history is a list of encounters plus the person's chronic conditions, allergies and smoking
status. Rendering into each organization's FHIR resources happens in `render.py` and its
`render_*` modules; this module only decides the facts, so the same fact (a diagnosis, a lab
value, a vaccine) can be rendered at several organizations and traced back by fact id."""

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from medblocks_sandbox.generator import care_codes, codes
from medblocks_sandbox.generator.model import OrgInfo, PersonTruth

HOSPITALS = frozenset({"mercy-general", "riverside-health"})


@dataclass
class Encounter:
    """One visit at one organization with everything observed and done during it."""

    n: int
    org: str
    kind: str
    start: datetime
    end: datetime
    practitioner: int  # index into the org's roster
    location: int
    reasons: list[str] = field(default_factory=list)  # chronic conditions addressed
    acute: str | None = None  # acute condition diagnosed here
    vitals: dict[str, float] = field(default_factory=dict)
    panels: list[str] = field(default_factory=list)
    labs: dict[str, float] = field(default_factory=dict)
    urine_glucose_positive: bool | None = None
    procedures: list[str] = field(default_factory=list)
    vaccines: list[str] = field(default_factory=list)
    acute_meds: list[str] = field(default_factory=list)
    note: str | None = None  # key into care_codes.NOTE_TYPES
    lab_copies: list[str] = field(default_factory=list)  # other orgs that receive these results
    claim_lag_days: int = 14

    @property
    def fact_id(self) -> str:
        """Stable id of the encounter fact (person prefix added by the caller)."""
        return f"enc{self.n}"


@dataclass
class History:
    """Everything that is true about one person's care."""

    person: PersonTruth
    age: int
    care_orgs: list[str]  # EHR and network orgs that know the person, primary first
    payer_member: bool
    coverage_start: datetime | None
    conditions: dict[str, datetime]  # chronic condition -> onset
    meds: dict[str, str]  # chronic condition -> med key
    allergies: list[str]
    smoking: tuple[str, str]
    encounters: list[Encounter]
    # per care org: which chronic conditions / meds / allergies are on its lists
    problem_lists: dict[str, list[str]]
    med_lists: dict[str, list[str]]
    allergy_lists: dict[str, list[str]]
    # historical immunization copies: (encounter n, vaccine key, receiving org)
    immunization_copies: list[tuple[int, str, str]]
    height_cm: float
    bmi: float


def _value(rng: random.Random, loinc: str, shift: dict[str, tuple[float, float]]) -> float:
    lab = codes.LABS[loinc]
    mean, sd = shift.get(loinc, (lab.mean, lab.sd))
    v = rng.gauss(mean, sd)
    floor = (lab.low or lab.mean * 0.3) * 0.5
    v = max(v, floor)
    return round(v, lab.decimals) if lab.decimals else float(round(v))


def make_history(
    rng: random.Random,
    person: PersonTruth,
    orgs: list[OrgInfo],
    reference: datetime,
    years: int,
    next_encounter_n: int = 0,
    family_of: "History | None" = None,
) -> History:
    """Decide one person's conditions, care organizations and encounters.

    `family_of`: a twin's history; twins usually go to the same organizations on the same plan,
    which is what makes them hard to keep apart.
    """
    age = reference.year - int(person.birth_date[:4])
    care = [o.id for o in orgs if o.kind in ("ehr", "network")]
    payer = next((o.id for o in orgs if o.kind == "payer"), None)
    # where the person gets care: at least one EHR org so patient access has something to pull
    weights = {
        "mercy-general": 0.6,
        "lakeside-clinic": 0.55,
        "riverside-health": 0.35,
        "valley-medical": 0.3,
    }
    care_orgs = [o for o in care if rng.random() < weights.get(o, 0.3)]
    ehr_orgs = [o.id for o in orgs if o.kind == "ehr"]
    if not any(o in ehr_orgs for o in care_orgs) and ehr_orgs:
        care_orgs.insert(0, rng.choice(ehr_orgs))
    rng.shuffle(care_orgs)
    payer_member = payer is not None and rng.random() < 0.85
    coverage_start = None
    if payer_member:
        coverage_start = reference - timedelta(days=rng.randrange(200, 365 * 6))
    if family_of is not None and rng.random() < 0.8:
        care_orgs = list(family_of.care_orgs)
        payer_member = family_of.payer_member
        coverage_start = family_of.coverage_start

    conditions: dict[str, datetime] = {}
    shift: dict[str, tuple[float, float]] = {}
    for key in codes.CHRONIC:
        c = codes.CONDITIONS[key]
        p = c.prevalence * (1.6 if age > 55 else 1.0)
        if key == "prediabetes" and "diabetes" in conditions:
            continue
        if key == "diabetes" and "hypertension" in conditions:
            p *= 1.5  # metabolic conditions travel together
        if age >= c.min_age and rng.random() < p:
            max_years = max(1, min(15, age - c.min_age))
            conditions[key] = reference - timedelta(days=rng.randrange(60, 365 * max_years + 61))
            shift.update(c.lab_shift)
    meds = {}
    for key in conditions:
        options = codes.CONDITIONS[key].meds
        if options:
            meds[key] = options[0] if rng.random() < 0.7 else rng.choice(options)
    allergies = []
    if rng.random() < 0.25:
        allergies = rng.sample(list(care_codes.ALLERGIES), 2 if rng.random() < 0.2 else 1)
    smoking = _smoking(rng)
    height = round(rng.gauss(176 if person.gender == "male" else 163, 7), 1)
    if age < 16:
        height = round(80 + age * 6 + rng.gauss(0, 4), 1)
    bmi = shift.get("39156-5", (codes.LABS["39156-5"].mean, 4))[0] + rng.gauss(0, 3)
    bmi = max(16.0, bmi)

    # --- encounters ---
    start_window = reference - timedelta(days=365 * years)
    encs: list[Encounter] = []
    n = next_encounter_n
    primary = care_orgs[0]

    def when(lo: datetime, hi: datetime) -> datetime:
        span = max(1, int((hi - lo).total_seconds() // 86400))
        day = lo + timedelta(days=rng.randrange(span))
        # clinic hours, local time 08:00-17:00 at UTC-7 -> 15:00-24:00 UTC
        return day.replace(hour=15 + rng.randrange(9), minute=rng.choice((0, 15, 30, 45)), second=0)

    for y in range(years):
        lo = start_window + timedelta(days=365 * y)
        hi = lo + timedelta(days=364)
        plan: list[tuple[str, str]] = [("wellness", primary)]
        for _ in conditions:
            if rng.random() < 0.65:
                plan.append(("followup", rng.choice(care_orgs)))
        if rng.random() < 0.6:
            plan.append(("acute", rng.choice(care_orgs)))
        hospitals = [o for o in care_orgs if o in HOSPITALS]
        if hospitals and rng.random() < 0.12:
            plan.append(("emergency", rng.choice(hospitals)))
        if hospitals and conditions and rng.random() < 0.05:
            plan.append(("inpatient", rng.choice(hospitals)))
        for kind, org in plan:
            encs.append(
                _encounter(
                    rng,
                    n,
                    kind,
                    org,
                    when(lo, hi),
                    conditions,
                    shift,
                    age,
                    person,
                    care_orgs,
                    height,
                    bmi,
                )
            )
            n += 1
    # nothing before the reference date's claims horizon, nothing before the first weeks of life
    born = datetime.fromisoformat(person.birth_date).replace(tzinfo=reference.tzinfo)
    encs = [
        e
        for e in encs
        if e.end < reference - timedelta(hours=2) and e.start > born + timedelta(days=14)
    ]
    encs.sort(key=lambda e: (e.start, e.n))

    problem_lists: dict[str, list[str]] = {}
    med_lists: dict[str, list[str]] = {}
    allergy_lists: dict[str, list[str]] = {}
    for org in care_orgs:
        problem_lists[org] = [k for k in conditions if org == primary or rng.random() < 0.8]
        med_lists[org] = [k for k in problem_lists[org] if k in meds and rng.random() < 0.8]
        allergy_lists[org] = [a for a in allergies if org == primary or rng.random() < 0.75]
    imm_copies = []
    for e in encs:
        for v in e.vaccines:
            for org in care_orgs:
                if org != e.org and rng.random() < 0.4:
                    imm_copies.append((e.n, v, org))
    return History(
        person=person,
        age=age,
        care_orgs=care_orgs,
        payer_member=payer_member,
        coverage_start=coverage_start,
        conditions=conditions,
        meds=meds,
        allergies=allergies,
        smoking=smoking,
        encounters=encs,
        problem_lists=problem_lists,
        med_lists=med_lists,
        allergy_lists=allergy_lists,
        immunization_copies=imm_copies,
        height_cm=height,
        bmi=bmi,
    )


def _smoking(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    acc = 0.0
    for code, display, w in codes.SMOKING_VALUES:
        acc += w
        if r < acc:
            return code, display
    return codes.SMOKING_VALUES[-1][0], codes.SMOKING_VALUES[-1][1]


def _encounter(
    rng: random.Random,
    n: int,
    kind: str,
    org: str,
    start: datetime,
    conditions: dict[str, datetime],
    shift: dict[str, tuple[float, float]],
    age: int,
    person: PersonTruth,
    care_orgs: list[str],
    height: float,
    bmi: float,
) -> Encounter:
    k = care_codes.ENCOUNTER_KINDS[kind]
    end = start + timedelta(hours=k.hours, minutes=rng.choice((0, 20, 40)))
    e = Encounter(
        n=n,
        org=org,
        kind=kind,
        start=start,
        end=end,
        practitioner=rng.randrange(6),
        location=0 if kind in ("emergency", "inpatient") else 1,
    )
    active = [c for c, onset in conditions.items() if onset <= start]
    if kind == "followup":
        e.reasons = [rng.choice(active)] if active else []
        if not e.reasons:
            e.kind = kind = "acute"
    if kind in ("acute", "emergency"):
        e.acute = (
            "ankle_sprain"
            if kind == "emergency" and rng.random() < 0.5
            else rng.choice(
                [a for a in codes.ACUTE if a != "ankle_sprain"]
                if kind == "acute"
                else list(codes.ACUTE)
            )
        )
        e.acute_meds = list(codes.CONDITIONS[e.acute].meds[:1])
    if kind == "inpatient":
        e.reasons = active[:2] if active else []
        e.acute = "bronchitis"
    if kind == "wellness":
        e.reasons = active
    # vitals at every visit: coherent with height, BMI and the conditions' shifts
    weight = round(bmi * (height / 100) ** 2 + rng.gauss(0, 1.2), 2)
    e.vitals = {
        "8302-2": round(height + rng.gauss(0, 0.4), 1),
        "29463-7": weight,
        "39156-5": round(weight / (height / 100) ** 2, 3),
        "8480-6": _value(rng, "8480-6", shift),
        "8462-4": _value(rng, "8462-4", shift),
        "8867-4": _value(rng, "8867-4", shift),
        "9279-1": _value(rng, "9279-1", shift),
        "8310-5": _value(rng, "8310-5", shift if e.acute is None else {"8310-5": (37.9, 0.4)}),
        "59408-5": _value(rng, "59408-5", shift),
    }
    if e.vitals["8462-4"] >= e.vitals["8480-6"] - 20:
        e.vitals["8462-4"] = e.vitals["8480-6"] - 35
    panels: list[str] = []
    if kind == "wellness":
        panels = ["cbc", "lipid"] if age >= 20 else ["cbc"]
        if age >= 45:
            panels.append("a1c")
    for c in e.reasons:
        for p in codes.CONDITIONS[c].panels:
            if p not in panels and (kind != "followup" or rng.random() < 0.8):
                panels.append(p)
    if kind == "inpatient":
        panels = list(dict.fromkeys(["cbc", "bmp", *panels]))
    e.panels = panels
    for p in panels:
        for loinc in codes.PANELS[p].members:
            e.labs[loinc] = _value(rng, loinc, shift)
    if "a1c" in panels and "diabetes" in conditions:
        e.urine_glucose_positive = e.labs.get("4548-4", 6) > 8.0
    procs = []
    for c in e.reasons:
        for p in codes.CONDITIONS[c].procedures:
            if rng.random() < 0.25:
                procs.append(p)
    if kind == "wellness":
        if age >= 45 and rng.random() < 0.1:
            procs.append("colonoscopy")
        if person.gender == "female" and age >= 40 and rng.random() < 0.4:
            procs.append("mammography")
        if age >= 12 and rng.random() < 0.3:
            procs.append("depression_screen")
    e.procedures = list(dict.fromkeys(procs))
    if kind in ("wellness", "followup"):
        # flu season: September to March
        if start.month in (9, 10, 11, 12, 1, 2, 3) and rng.random() < 0.6:
            e.vaccines.append("flu")
        for key, v in care_codes.VACCINES.items():
            if key != "flu" and age >= v.min_age and rng.random() < 0.07:
                e.vaccines.append(key)
    note_p = 1.0 if kind == "inpatient" else 0.7
    if rng.random() < note_p:
        e.note = (
            "discharge" if kind == "inpatient" else ("hp" if kind == "emergency" else "progress")
        )
    if e.labs:
        others = [o for o in care_orgs if o != org]
        if others and rng.random() < 0.35:
            e.lab_copies = [rng.choice(others)]
    e.claim_lag_days = rng.randrange(9, 35)
    return e

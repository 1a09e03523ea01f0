"""Care codes the generator draws from (split from :mod:`codes`, which keeps the code systems,
labs, medications and conditions): procedures (SNOMED CT with their CPT/HCPCS billing codes),
vaccines (CVX), allergies, encounter kinds, note types and the CPT codes claims bill.

Every code is a real code in its system with its real display name."""

from dataclasses import dataclass

from medblocks_sandbox.generator.codes import (
    CPT,
    HCPCS,
    RXNORM,
    SNOMED,
)


@dataclass(frozen=True)
class ProcedureDef:
    """A procedure with its SNOMED code (clinical side) and CPT/HCPCS code (claims side)."""

    key: str
    snomed: str
    snomed_display: str
    billing_system: str
    billing_code: str
    billing_display: str


PROCEDURES: dict[str, ProcedureDef] = {
    p.key: p
    for p in (
        ProcedureDef(
            "ecg",
            "29303009",
            "Electrocardiographic procedure (procedure)",
            CPT,
            "93000",
            "Electrocardiogram, routine ECG with at least 12 leads; with interpretation and report",
        ),
        ProcedureDef(
            "spirometry",
            "127783003",
            "Spirometry (procedure)",
            CPT,
            "94010",
            "Spirometry, including graphic record, total and timed vital capacity, expiratory flow "
            "rate measurement(s), with or without maximal voluntary ventilation",
        ),
        ProcedureDef(
            "cxr",
            "399208008",
            "Plain chest X-ray (procedure)",
            CPT,
            "71046",
            "Radiologic examination, chest; 2 views",
        ),
        ProcedureDef(
            "depression_screen",
            "171207006",
            "Depression screening (procedure)",
            HCPCS,
            "G0444",
            "Annual depression screening, 5 to 15 minutes",
        ),
        ProcedureDef(
            "colonoscopy",
            "73761001",
            "Colonoscopy (procedure)",
            CPT,
            "45378",
            "Colonoscopy, flexible; diagnostic, including collection of specimen(s) by brushing or "
            "washing, when performed (separate procedure)",
        ),
        ProcedureDef(
            "mammography",
            "71651007",
            "Mammography (procedure)",
            CPT,
            "77067",
            "Screening mammography, bilateral (2-view study of each breast), including "
            "computer-aided detection (CAD) when performed",
        ),
    )
}


@dataclass(frozen=True)
class VaccineDef:
    """A vaccine: CVX for the clinical record, CPT for the claim."""

    key: str
    cvx: str
    display: str
    cpt: str
    cpt_display: str
    min_age: int
    yearly: bool = False


VACCINES: dict[str, VaccineDef] = {
    v.key: v
    for v in (
        VaccineDef(
            "flu",
            "140",
            "Influenza, seasonal, injectable, preservative free",
            "90686",
            "Influenza virus vaccine, quadrivalent (IIV4), split virus, preservative free, 0.5 mL "
            "dosage, for intramuscular use",
            1,
            yearly=True,
        ),
        VaccineDef(
            "tdap",
            "115",
            "Tdap",
            "90715",
            "Tetanus, diphtheria toxoids and acellular pertussis vaccine (Tdap), when administered "
            "to individuals 7 years or older, for intramuscular use",
            11,
        ),
        VaccineDef(
            "pcv13",
            "133",
            "Pneumococcal conjugate PCV 13",
            "90670",
            "Pneumococcal conjugate vaccine, 13 valent (PCV13), for intramuscular use",
            65,
        ),
        VaccineDef(
            "zoster",
            "187",
            "zoster vaccine recombinant",
            "90750",
            "Zoster (shingles) vaccine (HZV), recombinant, subunit, adjuvanted, for intramuscular "
            "use",
            50,
        ),
        VaccineDef(
            "hepb",
            "43",
            "Hep B, adult",
            "90746",
            "Hepatitis B vaccine (HepB), adult dosage, 3 dose schedule, for intramuscular use",
            19,
        ),
    )
}
VACCINE_ADMIN_CPT = (
    "90471",
    "Immunization administration (includes percutaneous, intradermal, "
    "subcutaneous, or intramuscular injections); 1 vaccine (single or combination "
    "vaccine/toxoid)",
)


@dataclass(frozen=True)
class AllergyDef:
    """An allergy or intolerance: substance codings plus a typical reaction."""

    key: str
    codings: tuple[tuple[str, str, str], ...]
    text: str
    category: str  # food | medication | environment
    reaction: tuple[str, str]
    criticality: str


ALLERGIES: dict[str, AllergyDef] = {
    a.key: a
    for a in (
        AllergyDef(
            "penicillin",
            ((RXNORM, "70618", "penicillin"), (SNOMED, "764146007", "Penicillin (substance)")),
            "Penicillin",
            "medication",
            ("271807003", "Eruption of skin (disorder)"),
            "high",
        ),
        AllergyDef(
            "peanut",
            ((SNOMED, "762952008", "Peanut (substance)"),),
            "Peanut",
            "food",
            ("39579001", "Anaphylaxis (disorder)"),
            "high",
        ),
        AllergyDef(
            "latex",
            ((SNOMED, "111088007", "Latex (substance)"),),
            "Latex",
            "environment",
            ("247472004", "Wheal (finding)"),
            "low",
        ),
        AllergyDef(
            "sulfa",
            ((RXNORM, "10180", "sulfamethoxazole"),),
            "Sulfamethoxazole",
            "medication",
            ("271807003", "Eruption of skin (disorder)"),
            "low",
        ),
        AllergyDef(
            "bee",
            ((SNOMED, "288328004", "Bee venom (substance)"),),
            "Bee venom",
            "environment",
            ("39579001", "Anaphylaxis (disorder)"),
            "high",
        ),
    )
}


@dataclass(frozen=True)
class EncounterKind:
    """An encounter flavour: FHIR class, SNOMED type, E/M CPT billed and place of service."""

    key: str
    act_class: str
    act_display: str
    snomed: str
    snomed_display: str
    cpt: str
    cpt_display: str
    pos: str
    pos_display: str
    hours: int


ENCOUNTER_KINDS: dict[str, EncounterKind] = {
    e.key: e
    for e in (
        EncounterKind(
            "wellness",
            "AMB",
            "ambulatory",
            "185349003",
            "Encounter for check up (procedure)",
            "99396",
            "Periodic comprehensive preventive medicine reevaluation and management of an "
            "individual, established patient; 40-64 years",
            "11",
            "Office",
            1,
        ),
        EncounterKind(
            "followup",
            "AMB",
            "ambulatory",
            "390906007",
            "Follow-up encounter (procedure)",
            "99214",
            "Office or other outpatient visit for the evaluation and management of an established "
            "patient, which requires a medically appropriate history and/or examination and "
            "moderate level of medical decision making",
            "11",
            "Office",
            1,
        ),
        EncounterKind(
            "acute",
            "AMB",
            "ambulatory",
            "185345009",
            "Encounter for symptom (procedure)",
            "99213",
            "Office or other outpatient visit for the evaluation and management of an established "
            "patient, which requires a medically appropriate history and/or examination and low "
            "level of medical decision making",
            "11",
            "Office",
            1,
        ),
        EncounterKind(
            "emergency",
            "EMER",
            "emergency",
            "50849002",
            "Emergency room admission (procedure)",
            "99284",
            "Emergency department visit for the evaluation and management of a patient, which "
            "requires a medically appropriate history and/or examination and moderate level of "
            "medical decision making",
            "23",
            "Emergency Room - Hospital",
            5,
        ),
        EncounterKind(
            "inpatient",
            "IMP",
            "inpatient encounter",
            "32485007",
            "Hospital admission (procedure)",
            "99223",
            "Initial hospital inpatient or observation care, per day, for the evaluation and "
            "management of a patient, which requires a medically appropriate history and/or "
            "examination and high level of medical decision making",
            "21",
            "Inpatient Hospital",
            72,
        ),
    )
}

NOTE_TYPES = {
    "progress": ("11506-3", "Progress note"),
    "discharge": ("18842-5", "Discharge summary"),
    "hp": ("34117-2", "History and physical note"),
}

# preventive visit E/M codes by age band (CPT 9938x/9939x: established patient)
WELLNESS_CPT = (
    (
        12,
        "99393",
        "Periodic comprehensive preventive medicine reevaluation and management of an "
        "individual, established patient; late childhood (age 5 through 11 years)",
    ),
    (
        18,
        "99394",
        "Periodic comprehensive preventive medicine reevaluation and management of an "
        "individual, established patient; adolescent (age 12 through 17 years)",
    ),
    (
        40,
        "99395",
        "Periodic comprehensive preventive medicine reevaluation and management of an "
        "individual, established patient; 18-39 years",
    ),
    (
        65,
        "99396",
        "Periodic comprehensive preventive medicine reevaluation and management of an "
        "individual, established patient; 40-64 years",
    ),
    (
        200,
        "99397",
        "Periodic comprehensive preventive medicine reevaluation and management of an "
        "individual, established patient; 65 years and older",
    ),
)

# lab panels as billed on claims (CPT)
PANEL_CPT = {
    "a1c": ("83036", "Hemoglobin; glycosylated (A1C)"),
    "bmp": ("80048", "Basic metabolic panel (Calcium, total)"),
    "lipid": ("80061", "Lipid panel"),
    "cbc": (
        "85025",
        "Blood count; complete (CBC), automated (Hgb, Hct, RBC, WBC and platelet count) "
        "and automated differential WBC count",
    ),
    "tsh": ("84443", "Thyroid stimulating hormone (TSH)"),
    "uacr": ("82043", "Albumin; urine (eg, microalbumin), quantitative"),
}

"""Terminology the generator draws from: code system URIs, labs and panels, medications and
conditions. Care codes (procedures, vaccines, allergies, encounter kinds, billing) are in
:mod:`care_codes`, the demographic pools in :mod:`demographics`.

Every code here is a real code in its system with its real display name (SNOMED CT, ICD-10-CM,
LOINC, RxNorm, UCUM units, HL7 v2/v3 code systems). Where a specific clinical drug (SCD) code
could not be confirmed, the RxNorm ingredient (IN) code is used instead, which US Core allows."""

from dataclasses import dataclass, field

# --- code system URIs (SPECS.md 6.3 gives the OID -> URI map) ---
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "urn:oid:2.16.840.1.113883.6.285"
UCUM = "http://unitsofmeasure.org"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
US_CORE_COND_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VER = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
C4BB = "http://hl7.org/fhir/us/carin-bb/StructureDefinition/"
C4BB_CS = "http://hl7.org/fhir/us/carin-bb/CodeSystem/"
CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
ADJUDICATION = "http://terminology.hl7.org/CodeSystem/adjudication"
DIAG_TYPE = "http://terminology.hl7.org/CodeSystem/ex-diagnosistype"
CMS_POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
SUBSCRIBER_REL = "http://terminology.hl7.org/CodeSystem/subscriber-relationship"
COVERAGE_CLASS = "http://terminology.hl7.org/CodeSystem/coverage-class"
DOCREF_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"


def coding(system: str, code: str, display: str) -> dict[str, str]:
    """One FHIR Coding."""
    return {"system": system, "code": code, "display": display}


@dataclass(frozen=True)
class Lab:
    """A quantitative or coded laboratory / vital-sign test."""

    loinc: str
    display: str
    unit: str  # UCUM code; also used as the human unit
    low: float | None  # reference range (None = open)
    high: float | None
    mean: float  # typical healthy value
    sd: float
    decimals: int
    unit_display: str = ""


@dataclass(frozen=True)
class Panel:
    """A lab panel: one DiagnosticReport with one Observation per member."""

    key: str
    loinc: str
    display: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Med:
    """A medication (RxNorm) with its usual sig."""

    key: str
    rxnorm: str
    display: str
    ingredient: str  # RxNorm IN code (a second coding)
    ingredient_display: str
    sig: str
    form_snomed: tuple[str, str] = ("385055001", "Tablet")


@dataclass(frozen=True)
class ConditionDef:
    """A chronic or acute condition and what care it implies."""

    key: str
    snomed: str
    snomed_display: str
    icd10: str
    icd10_display: str
    chronic: bool
    meds: tuple[str, ...] = ()
    panels: tuple[str, ...] = ()
    min_age: int = 18
    prevalence: float = 0.1
    # lab shifts this condition causes: loinc -> (mean, sd) for the sick value
    lab_shift: dict[str, tuple[float, float]] = field(default_factory=dict)
    procedures: tuple[str, ...] = ()


# --- labs (LOINC long common names, UCUM units, adult reference ranges) ---
LABS: dict[str, Lab] = {
    lab.loinc: lab
    for lab in (
        Lab("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 5.6, 5.2, 0.3, 1),
        Lab("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 99, 88, 8, 0),
        Lab(
            "2160-0",
            "Creatinine [Mass/volume] in Serum or Plasma",
            "mg/dL",
            0.6,
            1.3,
            0.94,
            0.15,
            2,
        ),
        Lab(
            "33914-3",
            "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma "
            "by Creatinine-based formula (MDRD)",
            "mL/min/{1.73_m2}",
            60,
            None,
            88,
            12,
            1,
        ),
        Lab(
            "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.1, 4.2, 0.3, 1
        ),
        Lab("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 136, 145, 140, 2, 0),
        Lab("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7, 20, 14, 3, 0),
        Lab("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", 8.5, 10.2, 9.4, 0.3, 1),
        Lab(
            "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", None, 200, 180, 20, 0
        ),
        Lab(
            "2571-8",
            "Triglyceride [Mass/volume] in Serum or Plasma",
            "mg/dL",
            None,
            150,
            120,
            30,
            0,
        ),
        Lab(
            "2085-9",
            "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
            "mg/dL",
            40,
            None,
            55,
            10,
            0,
        ),
        Lab(
            "18262-6",
            "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
            "mg/dL",
            None,
            100,
            105,
            20,
            0,
        ),
        Lab("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.0, 17.5, 14.1, 1.1, 1),
        Lab(
            "6690-2",
            "Leukocytes [#/volume] in Blood by Automated count",
            "10*3/uL",
            4.5,
            11.0,
            7.1,
            1.4,
            2,
        ),
        Lab(
            "777-3",
            "Platelets [#/volume] in Blood by Automated count",
            "10*3/uL",
            150,
            400,
            250,
            45,
            0,
        ),
        Lab(
            "4544-3",
            "Hematocrit [Volume Fraction] of Blood by Automated count",
            "%",
            36,
            50,
            42,
            3,
            1,
        ),
        Lab(
            "3016-3",
            "Thyrotropin [Units/volume] in Serum or Plasma",
            "m[IU]/L",
            0.4,
            4.0,
            1.9,
            0.7,
            3,
        ),
        Lab("9318-7", "Albumin/Creatinine [Mass Ratio] in Urine", "mg/g", None, 30, 12, 6, 1),
        # vital signs
        Lab("8480-6", "Systolic blood pressure", "mm[Hg]", None, 120, 118, 9, 0),
        Lab("8462-4", "Diastolic blood pressure", "mm[Hg]", None, 80, 76, 7, 0),
        Lab("8867-4", "Heart rate", "/min", 60, 100, 74, 9, 0),
        Lab("9279-1", "Respiratory rate", "/min", 12, 20, 15, 2, 0),
        Lab("8310-5", "Body temperature", "Cel", 36.1, 37.2, 36.8, 0.25, 2),
        Lab("8302-2", "Body height", "cm", None, None, 170, 9, 1),
        Lab("29463-7", "Body weight", "kg", None, None, 80, 14, 2),
        Lab("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 18.5, 25, 26, 4, 3),
        Lab(
            "59408-5",
            "Oxygen saturation in Arterial blood by Pulse oximetry",
            "%",
            95,
            100,
            97.6,
            1.1,
            1,
        ),
    )
}

PANELS: dict[str, Panel] = {
    p.key: p
    for p in (
        Panel("a1c", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", ("4548-4",)),
        Panel(
            "bmp",
            "51990-0",
            "Basic metabolic panel - Blood",
            ("2345-7", "6299-2", "2160-0", "33914-3", "2951-2", "2823-3", "17861-6"),
        ),
        Panel(
            "lipid",
            "57698-3",
            "Lipid panel with direct LDL - Serum or Plasma",
            ("2093-3", "2571-8", "2085-9", "18262-6"),
        ),
        Panel(
            "cbc",
            "58410-2",
            "CBC panel - Blood by Automated count",
            ("6690-2", "718-7", "4544-3", "777-3"),
        ),
        Panel("tsh", "3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", ("3016-3",)),
        Panel("uacr", "9318-7", "Albumin/Creatinine [Mass Ratio] in Urine", ("9318-7",)),
    )
}

# a qualitative result (valueCodeableConcept) ordered with the diabetic work-up
URINE_GLUCOSE = ("25428-4", "Glucose [Presence] in Urine by Test strip")
NEGATIVE = coding(SNOMED, "260385009", "Negative (qualifier value)")
POSITIVE = coding(SNOMED, "10828004", "Positive (qualifier value)")

SMOKING_STATUS = ("72166-2", "Tobacco smoking status")
SMOKING_VALUES = (
    ("266919005", "Never smoked tobacco (finding)", 0.6),
    ("8517006", "Ex-smoker (finding)", 0.25),
    ("449868002", "Smokes tobacco daily (finding)", 0.15),
)

MEDS: dict[str, Med] = {
    m.key: m
    for m in (
        Med(
            "metformin",
            "860975",
            "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
            "6809",
            "metformin",
            "Take 1 tablet by mouth daily with the evening meal.",
        ),
        Med(
            "lisinopril",
            "314076",
            "lisinopril 10 MG Oral Tablet",
            "29046",
            "lisinopril",
            "Take 1 tablet by mouth once daily.",
        ),
        Med(
            "amlodipine",
            "197361",
            "amlodipine 5 MG Oral Tablet",
            "17767",
            "amlodipine",
            "Take 1 tablet by mouth once daily.",
        ),
        Med(
            "hctz",
            "310798",
            "hydrochlorothiazide 25 MG Oral Tablet",
            "5487",
            "hydrochlorothiazide",
            "Take 1 tablet by mouth every morning.",
        ),
        Med(
            "atorvastatin",
            "259255",
            "atorvastatin 80 MG Oral Tablet",
            "83367",
            "atorvastatin",
            "Take 1 tablet by mouth at bedtime.",
        ),
        Med(
            "simvastatin",
            "312961",
            "simvastatin 20 MG Oral Tablet",
            "36567",
            "simvastatin",
            "Take 1 tablet by mouth every evening.",
        ),
        Med(
            "albuterol",
            "745679",
            "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
            "435",
            "albuterol",
            "Inhale 2 puffs every 4 to 6 hours as needed for wheezing.",
            ("420317006", "Inhaler"),
        ),
        Med(
            "fluticasone",
            "895994",
            "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
            "41126",
            "fluticasone",
            "Inhale 2 puffs twice daily. Rinse mouth after use.",
            ("420317006", "Inhaler"),
        ),
        # ingredient-level codes (see module docstring)
        Med(
            "levothyroxine",
            "10582",
            "levothyroxine",
            "10582",
            "levothyroxine",
            "Take 50 mcg by mouth every morning on an empty stomach.",
        ),
        Med(
            "sertraline",
            "36437",
            "sertraline",
            "36437",
            "sertraline",
            "Take 50 mg by mouth once daily.",
        ),
        Med(
            "omeprazole",
            "7646",
            "omeprazole",
            "7646",
            "omeprazole",
            "Take 20 mg by mouth once daily before breakfast.",
            ("385049006", "Capsule"),
        ),
        Med(
            "amoxicillin",
            "308182",
            "amoxicillin 250 MG Oral Capsule",
            "723",
            "amoxicillin",
            "Take 2 capsules by mouth three times daily for 10 days.",
            ("385049006", "Capsule"),
        ),
        Med(
            "acetaminophen",
            "313782",
            "acetaminophen 325 MG Oral Tablet",
            "161",
            "acetaminophen",
            "Take 2 tablets by mouth every 6 hours as needed for pain.",
        ),
    )
}

CONDITIONS: dict[str, ConditionDef] = {
    c.key: c
    for c in (
        ConditionDef(
            "hypertension",
            "59621000",
            "Essential hypertension (disorder)",
            "I10",
            "Essential (primary) hypertension",
            True,
            meds=("lisinopril", "amlodipine", "hctz"),
            panels=("bmp",),
            min_age=25,
            prevalence=0.32,
            lab_shift={"8480-6": (142, 11), "8462-4": (91, 7)},
            procedures=("ecg",),
        ),
        ConditionDef(
            "diabetes",
            "44054006",
            "Diabetes mellitus type 2 (disorder)",
            "E11.9",
            "Type 2 diabetes mellitus without complications",
            True,
            meds=("metformin",),
            panels=("a1c", "bmp", "uacr"),
            min_age=25,
            prevalence=0.14,
            lab_shift={"4548-4": (7.6, 0.9), "2345-7": (156, 30), "39156-5": (31.5, 4)},
        ),
        ConditionDef(
            "hyperlipidemia",
            "55822004",
            "Hyperlipidemia (disorder)",
            "E78.5",
            "Hyperlipidemia, unspecified",
            True,
            meds=("atorvastatin", "simvastatin"),
            panels=("lipid",),
            min_age=30,
            prevalence=0.22,
            lab_shift={"2093-3": (238, 25), "18262-6": (156, 22), "2571-8": (205, 45)},
        ),
        ConditionDef(
            "asthma",
            "195967001",
            "Asthma (disorder)",
            "J45.909",
            "Unspecified asthma, uncomplicated",
            True,
            meds=("albuterol", "fluticasone"),
            min_age=5,
            prevalence=0.08,
            procedures=("spirometry",),
        ),
        ConditionDef(
            "copd",
            "13645005",
            "Chronic obstructive lung disease (disorder)",
            "J44.9",
            "Chronic obstructive pulmonary disease, unspecified",
            True,
            meds=("albuterol",),
            min_age=45,
            prevalence=0.06,
            lab_shift={"59408-5": (93.1, 1.5)},
            procedures=("spirometry", "cxr"),
        ),
        ConditionDef(
            "hypothyroidism",
            "40930008",
            "Hypothyroidism (disorder)",
            "E03.9",
            "Hypothyroidism, unspecified",
            True,
            meds=("levothyroxine",),
            panels=("tsh",),
            min_age=20,
            prevalence=0.07,
            lab_shift={"3016-3": (5.8, 1.6)},
        ),
        ConditionDef(
            "depression",
            "370143000",
            "Major depressive disorder (disorder)",
            "F32.9",
            "Major depressive disorder, single episode, unspecified",
            True,
            meds=("sertraline",),
            min_age=14,
            prevalence=0.09,
            procedures=("depression_screen",),
        ),
        ConditionDef(
            "gerd",
            "235595009",
            "Gastroesophageal reflux disease (disorder)",
            "K21.9",
            "Gastro-esophageal reflux disease without esophagitis",
            True,
            meds=("omeprazole",),
            min_age=18,
            prevalence=0.1,
        ),
        ConditionDef(
            "ckd3",
            "433144002",
            "Chronic kidney disease stage 3 (disorder)",
            "N18.30",
            "Chronic kidney disease, stage 3 unspecified",
            True,
            panels=("bmp", "uacr"),
            min_age=50,
            prevalence=0.05,
            lab_shift={"2160-0": (1.62, 0.2), "33914-3": (44, 7), "9318-7": (68, 25)},
        ),
        ConditionDef(
            "prediabetes",
            "15777000",
            "Prediabetes (finding)",
            "R73.03",
            "Prediabetes",
            True,
            panels=("a1c",),
            min_age=25,
            prevalence=0.1,
            lab_shift={"4548-4": (6.0, 0.15)},
        ),
        # acute problems: encounter diagnoses
        ConditionDef(
            "bronchitis",
            "10509002",
            "Acute bronchitis (disorder)",
            "J20.9",
            "Acute bronchitis, unspecified",
            False,
            meds=("acetaminophen",),
            min_age=0,
            prevalence=0.3,
        ),
        ConditionDef(
            "sinusitis",
            "444814009",
            "Viral sinusitis (disorder)",
            "J01.90",
            "Acute sinusitis, unspecified",
            False,
            meds=("amoxicillin",),
            min_age=0,
            prevalence=0.3,
        ),
        ConditionDef(
            "pharyngitis",
            "363746003",
            "Acute pharyngitis (disorder)",
            "J02.9",
            "Acute pharyngitis, unspecified",
            False,
            meds=("amoxicillin",),
            min_age=0,
            prevalence=0.25,
        ),
        ConditionDef(
            "uti",
            "68566005",
            "Urinary tract infectious disease (disorder)",
            "N39.0",
            "Urinary tract infection, site not specified",
            False,
            min_age=0,
            prevalence=0.2,
        ),
        ConditionDef(
            "ankle_sprain",
            "44465007",
            "Sprain of ankle (disorder)",
            "S93.409A",
            "Sprain of unspecified ligament of unspecified ankle, initial encounter",
            False,
            meds=("acetaminophen",),
            min_age=0,
            prevalence=0.15,
        ),
    )
}
CHRONIC = tuple(k for k, c in CONDITIONS.items() if c.chronic)
ACUTE = tuple(k for k, c in CONDITIONS.items() if not c.chronic)

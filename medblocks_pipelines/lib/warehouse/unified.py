"""The unified record: clinical facts deduplicated across sources, each with all its provenance.

Every source record that states a fact is a *mention*: a Condition, an Encounter, an Observation, a
DiagnosticReport, an Immunization, a Procedure, a MedicationRequest, an AllergyIntolerance, or one
element of a claim (an ExplanationOfBenefit diagnosis, line item or the claim's encounter). DuckDB pulls
the mentions out of the landed JSON (not the view tables: matching needs every coding of a
CodeableConcept and every claim element); Polars matches them into *facts*; DuckDB stores the tables.

Matching (same person always required; ``person_id`` comes from identity):

see :data:`MATCHING_RULES` (one rule per kind, rendered into docs/DATA_DICTIONARY.md).

Events (everything but problem-list conditions, allergies, social history and active orders) also
obey: one source never states one event twice, so two same-day events at one source are two facts; the
k-th event of a source on that day (by time) pairs with the k-th of the others.

A *concept* is a connected set of codes: two codings in one CodeableConcept (SNOMED CT and ICD-10-CM on
a Condition, SNOMED CT and CPT on a Procedure, RxNorm product and ingredient on an order) are the same
concept, so a claim's ICD-10-CM diagnosis meets an EHR's SNOMED problem once any source of the tenant sent
both codes together. ICD-10 codes are compared without dots, systems by canonical URI (OIDs mapped).

Tables: ``fact_mentions`` (every mention, merged or not: the non-merged rows stay reachable),
``facts`` (one row per fact), ``fact_sources`` (fact -> resource_key, element, provenance) and the views
``facts_conditions``, ``facts_medications``, ``facts_allergies``, ``facts_immunizations``,
``facts_results``, ``facts_reports``, ``facts_encounters``, ``facts_procedures``. Facts are rebuilt
from the current ``resources`` table, where tombstones are already applied, so a fact disappears with
its last source.
"""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import duckdb
import polars as pl

from medblocks_pipelines.lib.errors import WarehouseError

MATCHING_RULES: dict[str, str] = {
    "condition": "same concept; a problem-list condition (or a claim diagnosis of a condition on "
    "the person's problem list) is one fact whatever the dates; otherwise (encounter diagnoses, other "
    "claim diagnoses) onset/billing dates chained within 7 days",
    "medication": "same concept; active orders are one fact; other orders chained within 7 days "
    "(authoredOn)",
    "allergy": "same concept, whatever the dates",
    "immunization": "same vaccine group (CVX, or the CPT of the vaccine product, grouped by vaccine "
    "family), occurrence dates within 1 day",
    "result": "same LOINC concept, same effective day, same value (numbers rounded to 3 decimals, "
    "else the coded/text value, panel components included); social-history observations (smoking "
    "status) are states: same concept and value, whatever the dates",
    "report": "same LOINC panel concept, same effective day",
    "encounter": "same type concept (a claim's first line, the E/M service, against the type codes) "
    "and same start day (a claim's billable period start counts as the start)",
    "procedure": "same concept (a claim line's CPT/HCPCS against the procedure's codes), dates within "
    "1 day",
}

KINDS = (
    "condition",
    "medication",
    "allergy",
    "immunization",
    "result",
    "report",
    "encounter",
    "procedure",
)
KIND_VIEWS = {
    "condition": "facts_conditions",
    "medication": "facts_medications",
    "allergy": "facts_allergies",
    "immunization": "facts_immunizations",
    "result": "facts_results",
    "report": "facts_reports",
    "encounter": "facts_encounters",
    "procedure": "facts_procedures",
}
# days between chained mentions of one fact (None: dates do not matter)
WINDOW_DAYS = {
    "condition": 7,
    "medication": 7,
    "allergy": None,
    "immunization": 1,
    "result": 0,
    "report": 0,
    "encounter": 0,
    "procedure": 1,
}
# the code system shown for a fact, in order of preference
PREFERRED_SYSTEMS = {
    "condition": ["http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"],
    "medication": ["http://www.nlm.nih.gov/research/umls/rxnorm"],
    "allergy": ["http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm"],
    "immunization": ["http://hl7.org/fhir/sid/cvx", "http://www.ama-assn.org/go/cpt"],
    "result": ["http://loinc.org"],
    "report": ["http://loinc.org"],
    "encounter": ["http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"],
    "procedure": ["http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"],
}

_OID_SYSTEMS = {
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "urn:oid:2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "http://www.ama-assn.org/go/cpt/": "http://www.ama-assn.org/go/cpt",
    "urn:oid:2.16.840.1.113883.6.285": "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": (
        "https://bluebutton.cms.gov/resources/codesystem/hcpcs"
    ),
}

# Vaccine families: CVX codes (CDC) and the CPT codes of the vaccine products (CDC CPT-CVX mapping)
# grouped so that a claim line meets the clinical record. Influenza products are many; a claim and a
# record of "an influenza vaccine on that day" are one fact.
_CVX = "http://hl7.org/fhir/sid/cvx"
_CPT = "http://www.ama-assn.org/go/cpt"
VACCINE_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "influenza": (
        (
            "88",
            "135",
            "140",
            "141",
            "144",
            "149",
            "150",
            "153",
            "155",
            "158",
            "161",
            "166",
            "168",
            "171",
            "185",
            "186",
            "197",
            "205",
        ),
        (
            "90630",
            "90653",
            "90654",
            "90655",
            "90656",
            "90657",
            "90658",
            "90660",
            "90661",
            "90662",
            "90672",
            "90673",
            "90674",
            "90682",
            "90685",
            "90686",
            "90687",
            "90688",
            "90689",
            "90694",
            "90756",
        ),
    ),
    "tdap": (("115",), ("90715",)),
    "td": (("09", "113", "138", "139"), ("90714", "90718")),
    "pneumococcal-conjugate": (("133", "152", "215", "216"), ("90670", "90671", "90677")),
    "pneumococcal-polysaccharide": (("33", "109"), ("90732",)),
    "zoster": (("121", "187", "188"), ("90736", "90750")),
    "hepatitis-b": (
        ("08", "43", "44", "45", "189"),
        ("90739", "90740", "90743", "90744", "90746", "90747"),
    ),
    "hpv": (("62", "118", "137", "165"), ("90649", "90650", "90651")),
    "mmr": (("03",), ("90707",)),
    "varicella": (("21",), ("90716",)),
    "covid-19": (
        (
            "207",
            "208",
            "210",
            "211",
            "212",
            "213",
            "217",
            "218",
            "219",
            "221",
            "228",
            "229",
            "300",
            "301",
            "302",
            "309",
            "310",
            "311",
            "312",
            "313",
        ),
        ("91300", "91301", "91303", "91304", "91318", "91319", "91320", "91321", "91322"),
    ),
}


def _vaccine_group_of() -> dict[str, str]:
    out: dict[str, str] = {}
    for group, (cvx, cpt) in VACCINE_GROUPS.items():
        for c in cvx:
            out[f"{_CVX}|{c}"] = f"vaccine-group|{group}"
        for c in cpt:
            out[f"{_CPT}|{c}"] = f"vaccine-group|{group}"
    return out


VACCINE_GROUP_OF = _vaccine_group_of()

_CODING = '[{"system":"VARCHAR","code":"VARCHAR","display":"VARCHAR"}]'
_CC = '{"coding":' + _CODING + ',"text":"VARCHAR"}'

# One SELECT per mention source; all produce the same columns. {cols} = provenance of `resources`.
_PROV = (
    "r.resource_key, r.resource_type, r.source, r.pattern, r.organization, r.connection, "
    "r.fetched_at, r.run_id, r.permitted_purpose, r.network_query_id"
)

_PATIENT_KEY = (
    "CASE WHEN regexp_matches({ref}, '(^|/)Patient/[^/]+$') THEN r.source || '/Patient/' || "
    "regexp_extract({ref}, '(^|/)Patient/([^/]+)$', 2) END"
)

MENTION_SQL: dict[str, str] = {
    "condition": f"""
        SELECT {_PROV}, '' AS element, 'condition' AS kind, false AS is_claim,
               {_PATIENT_KEY.format(ref="j.subject.reference")} AS patient_key,
               [j.code.coding] AS concept_codings, j.code.text AS text,
               coalesce(j.onsetDateTime, j.onsetPeriod.start, j.recordedDate) AS date_str,
               NULL::DOUBLE AS value_num, NULL::VARCHAR AS value_unit, NULL::VARCHAR AS value_text,
               j.clinicalStatus.coding[1].code AS status,
               list_contains(flatten(list_transform(j.category, lambda c: list_transform(c.coding,
                   lambda x: x.code))), 'problem-list-item')
               OR list_contains(flatten(list_transform(j.category, lambda c: list_transform(
                   c.coding, lambda x: x.code))), 'health-concern') AS chronic,
               j.category[1].coding[1].code AS category
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},"code":{_CC},
              "category":[{_CC}],"clinicalStatus":{_CC},"onsetDateTime":"VARCHAR",
              "onsetPeriod":{{"start":"VARCHAR"}},"recordedDate":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'Condition') r
    """,
    "allergy": f"""
        SELECT {_PROV}, '', 'allergy', false,
               {_PATIENT_KEY.format(ref="j.patient.reference")},
               [j.code.coding], j.code.text,
               coalesce(j.onsetDateTime, j.recordedDate),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR,
               j.clinicalStatus.coding[1].code, true, j.category[1]
        FROM (SELECT *, from_json(resource, '{{"patient":{{"reference":"VARCHAR"}},"code":{_CC},
              "category":["VARCHAR"],"clinicalStatus":{_CC},"onsetDateTime":"VARCHAR",
              "recordedDate":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'AllergyIntolerance') r
    """,
    "immunization": f"""
        SELECT {_PROV}, '', 'immunization', false,
               {_PATIENT_KEY.format(ref="j.patient.reference")},
               [j.vaccineCode.coding], j.vaccineCode.text,
               coalesce(j.occurrenceDateTime, j.recorded),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false, NULL
        FROM (SELECT *, from_json(resource, '{{"patient":{{"reference":"VARCHAR"}},
              "vaccineCode":{_CC},"occurrenceDateTime":"VARCHAR","recorded":"VARCHAR",
              "status":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'Immunization') r
    """,
    "procedure": f"""
        SELECT {_PROV}, '', 'procedure', false,
               {_PATIENT_KEY.format(ref="j.subject.reference")},
               [j.code.coding], j.code.text,
               coalesce(j.performedDateTime, j.performedPeriod.start),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false, NULL
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},"code":{_CC},
              "performedDateTime":"VARCHAR","performedPeriod":{{"start":"VARCHAR"}},
              "status":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'Procedure') r
    """,
    "result": f"""
        SELECT {_PROV}, '', 'result', false,
               {_PATIENT_KEY.format(ref="j.subject.reference")},
               [j.code.coding], j.code.text,
               coalesce(j.effectiveDateTime, j.effectivePeriod.start, j.effectiveInstant, j.issued),
               try_cast(json_extract_string(r.resource, '$.valueQuantity.value') AS DOUBLE),
               coalesce(j.valueQuantity.code, j.valueQuantity.unit),
               coalesce(j.valueCodeableConcept.coding[1].code, j.valueString,
                        j.valueCodeableConcept.text,
                        -- panels (blood pressure) carry their values in components
                        nullif(array_to_string(list_transform(j.component, lambda c:
                            c.code.coding[1].code || '=' || coalesce(c.valueQuantity.value, '')),
                            ';'), '')),
               j.status,
               -- social history (smoking status...) states a condition of the person, not an event
               j.category[1].coding[1].code = 'social-history',
               j.category[1].coding[1].code
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},"code":{_CC},
              "category":[{_CC}],"effectiveDateTime":"VARCHAR","effectivePeriod":{{"start":"VARCHAR"}},
              "effectiveInstant":"VARCHAR","issued":"VARCHAR",
              "valueQuantity":{{"unit":"VARCHAR","code":"VARCHAR"}},
              "valueCodeableConcept":{_CC},"valueString":"VARCHAR","status":"VARCHAR",
              "component":[{{"code":{_CC},"valueQuantity":{{"value":"VARCHAR"}}}}]}}') AS j
              FROM {{table}} WHERE resource_type = 'Observation') r
    """,
    "report": f"""
        SELECT {_PROV}, '', 'report', false,
               {_PATIENT_KEY.format(ref="j.subject.reference")},
               [j.code.coding], j.code.text,
               coalesce(j.effectiveDateTime, j.effectivePeriod.start, j.issued),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false,
               j.category[1].coding[1].code
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},"code":{_CC},
              "category":[{_CC}],"effectiveDateTime":"VARCHAR","effectivePeriod":{{"start":"VARCHAR"}},
              "issued":"VARCHAR","status":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'DiagnosticReport') r
    """,
    "encounter": f"""
        SELECT {_PROV}, '', 'encounter', false,
               {_PATIENT_KEY.format(ref="j.subject.reference")},
               list_transform(j.type, lambda t: t.coding), j.type[1].text,
               j.period.start, NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false,
               j.class.code
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},
              "type":[{_CC}],"period":{{"start":"VARCHAR"}},"status":"VARCHAR",
              "class":{{"code":"VARCHAR"}}}}') AS j
              FROM {{table}} WHERE resource_type = 'Encounter') r
    """,
    # an order names its drug inline or through a Medication resource at the same source
    "medication": f"""
        SELECT {_PROV}, '', 'medication', false,
               {_PATIENT_KEY.format(ref="j.subject.reference")},
               [coalesce(j.medicationCodeableConcept.coding, m.mj.code.coding)],
               coalesce(j.medicationCodeableConcept.text, m.mj.code.text),
               coalesce(j.authoredOn, NULL), NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status,
               j.status = 'active', NULL
        FROM (SELECT *, from_json(resource, '{{"subject":{{"reference":"VARCHAR"}},
              "medicationCodeableConcept":{_CC},"medicationReference":{{"reference":"VARCHAR"}},
              "authoredOn":"VARCHAR","status":"VARCHAR"}}') AS j
              FROM {{table}} WHERE resource_type = 'MedicationRequest') r
        LEFT JOIN (SELECT source AS m_source, resource_id AS m_id,
                          from_json(resource, '{{"code":{_CC}}}') AS mj
                   FROM {{table}} WHERE resource_type = 'Medication') m
          ON m.m_source = r.source
         AND m.m_id = regexp_extract(j.medicationReference.reference, '([^/]+)$', 1)
    """,
    # claims: each diagnosis, the encounter (first line) and the other lines
    "claim_diagnosis": f"""
        SELECT {_PROV}, 'diagnosis[' || (d.i - 1) || ']', 'condition', true,
               {_PATIENT_KEY.format(ref="j.patient.reference")},
               [d.dx.diagnosisCodeableConcept.coding], NULL, j.billablePeriod.start,
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false, 'claim-diagnosis'
        FROM (SELECT *, from_json(resource, '{{"patient":{{"reference":"VARCHAR"}},
              "billablePeriod":{{"start":"VARCHAR"}},"status":"VARCHAR",
              "diagnosis":[{{"diagnosisCodeableConcept":{_CC}}}]}}') AS j
              FROM {{table}} WHERE resource_type = 'ExplanationOfBenefit') r,
             (SELECT unnest(j.diagnosis) AS dx, generate_subscripts(j.diagnosis, 1) AS i) d
    """,
    "claim_encounter": f"""
        SELECT {_PROV}, 'billablePeriod', 'encounter', true,
               {_PATIENT_KEY.format(ref="j.patient.reference")},
               [j.item[1].productOrService.coding], NULL,
               coalesce(j.billablePeriod.start, j.item[1].servicedDate),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false, 'claim'
        FROM (SELECT *, from_json(resource, '{{"patient":{{"reference":"VARCHAR"}},
              "billablePeriod":{{"start":"VARCHAR"}},"status":"VARCHAR",
              "item":[{{"productOrService":{_CC},"servicedDate":"VARCHAR"}}]}}') AS j
              FROM {{table}} WHERE resource_type = 'ExplanationOfBenefit') r
    """,
    "claim_line": f"""
        SELECT {_PROV}, 'item[' || (it.i - 1) || ']', 'claim_line', true,
               {_PATIENT_KEY.format(ref="j.patient.reference")},
               [it.item.productOrService.coding], NULL,
               coalesce(it.item.servicedDate, it.item.servicedPeriod.start, j.billablePeriod.start),
               NULL::DOUBLE, NULL::VARCHAR, NULL::VARCHAR, j.status, false, 'claim-line'
        FROM (SELECT *, from_json(resource, '{{"patient":{{"reference":"VARCHAR"}},
              "billablePeriod":{{"start":"VARCHAR"}},"status":"VARCHAR",
              "item":[{{"productOrService":{_CC},"servicedDate":"VARCHAR",
                        "servicedPeriod":{{"start":"VARCHAR"}}}}]}}') AS j
              FROM {{table}} WHERE resource_type = 'ExplanationOfBenefit') r,
             (SELECT unnest(j.item) AS item, generate_subscripts(j.item, 1) AS i) it
        WHERE it.i > 1
    """,
}

MENTION_COLUMNS = [
    "resource_key",
    "resource_type",
    "source",
    "pattern",
    "organization",
    "connection",
    "fetched_at",
    "run_id",
    "permitted_purpose",
    "network_query_id",
    "element",
    "kind",
    "is_claim",
    "patient_key",
    "concept_codings",
    "text",
    "date_str",
    "value_num",
    "value_unit",
    "value_text",
    "status",
    "chronic",
    "category",
]


def extract_mentions(con: duckdb.DuckDBPyConnection, table: str = "resources") -> pl.DataFrame:
    """Every fact mention in ``table`` (Arrow from DuckDB into Polars, no copy)."""
    names = ", ".join(MENTION_COLUMNS)
    parts = [
        f"SELECT * FROM ({sql.replace('{table}', table)}) AS q({names})"
        for sql in MENTION_SQL.values()
    ]
    arrow = con.sql("\nUNION ALL\n".join(parts)).to_arrow_table()
    df = pl.from_arrow(arrow)
    assert isinstance(df, pl.DataFrame)
    return df


# --------------------------------------------------------------------------------------------
# codes and concepts


def _norm_system(system: pl.Expr) -> pl.Expr:
    return system.replace(_OID_SYSTEMS)


def _norm_code(system: pl.Expr, code: pl.Expr) -> pl.Expr:
    # ICD-10 codes arrive with and without the dot (E11.9 / E119)
    icd = system.str.contains("icd-10")
    code = code.str.strip_chars()
    return (
        pl.when(icd)
        .then(code.str.replace_all(".", "", literal=True).str.to_uppercase())
        .otherwise(code)
    )


def codes_long(mentions: pl.DataFrame) -> pl.DataFrame:
    """One row per (mention, CodeableConcept index, coding) with normalised ``system|code``."""
    df = (
        mentions.select("mention_id", "kind", "concept_codings")
        .explode("concept_codings")
        .with_columns(cc_idx=pl.int_range(pl.len()).over("mention_id"))
        .explode("concept_codings")
        .unnest("concept_codings")
        .filter(pl.col("code").is_not_null() & pl.col("system").is_not_null())
    )
    system = _norm_system(pl.col("system"))
    df = df.with_columns(system=system).with_columns(
        code=_norm_code(pl.col("system"), pl.col("code"))
    )
    return df.with_columns(sc=pl.col("system") + "|" + pl.col("code"))


def concept_map(codes: pl.DataFrame) -> dict[str, str]:
    """code -> concept id: codes sharing a CodeableConcept are connected; vaccine groups join in."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra

    # claim-line codes never join codes together: a line holds one service
    groups = (
        codes.group_by("kind", "mention_id", "cc_idx")
        .agg(pl.col("sc").unique().sort())
        .filter(pl.col("sc").list.len() > 1)
        .select(pl.col("kind") + "#" + pl.col("sc").list.join("\t"))
        .unique()
        .to_series()
        .to_list()
    )
    for sc in codes.select(pl.col("kind") + "#" + pl.col("sc")).unique().to_series().to_list():
        find(sc)
    for g in groups:
        kind, members = g.split("#", 1)
        items = members.split("\t")
        for other in items[1:]:
            union(f"{kind}#{items[0]}", f"{kind}#{other}")
    for sc, group in VACCINE_GROUP_OF.items():
        key = f"immunization#{sc}"
        if key in parent:
            union(key, f"immunization#{group}")
    return {k: find(k) for k in list(parent)}


# --------------------------------------------------------------------------------------------
# matching


def _fact_id(kind: str, first_mention: str) -> str:
    return "fact-" + hashlib.sha256(f"{kind}\x00{first_mention}".encode()).hexdigest()[:16]


def match_facts(mentions: pl.DataFrame, person_of: pl.DataFrame) -> pl.DataFrame:
    """Assign a ``fact_id`` to every mention with a person (rules in the module docstring).

    ``mentions`` as from :func:`extract_mentions`; ``person_of`` maps ``patient_key`` -> ``person_id``.
    Returns the mentions with ``mention_id``, ``person_id``, ``concept``, ``day``, ``fact_id``.
    """
    m = mentions.with_columns(
        mention_id=pl.col("resource_key")
        + pl.when(pl.col("element") != "").then("#" + pl.col("element")).otherwise(pl.lit("")),
        day=pl.col("date_str").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False),
    ).join(person_of, on="patient_key", how="left")

    codes = codes_long(m)
    # a claim line is an immunization when its code is a vaccine product, else a procedure
    line_kind = (
        codes.filter(pl.col("kind") == "claim_line")
        .with_columns(
            is_vaccine=pl.col("sc").is_in(list(VACCINE_GROUP_OF)),
        )
        .group_by("mention_id")
        .agg(pl.col("is_vaccine").any())
        .select(
            "mention_id",
            new_kind=pl.when("is_vaccine")
            .then(pl.lit("immunization"))
            .otherwise(pl.lit("procedure")),
        )
    )
    m = (
        m.join(line_kind, on="mention_id", how="left")
        .with_columns(
            kind=pl.when(pl.col("kind") == "claim_line")
            .then(pl.col("new_kind").fill_null("procedure"))
            .otherwise(pl.col("kind"))
        )
        .drop("new_kind")
    )
    codes = codes.drop("kind").join(m.select("mention_id", "kind"), on="mention_id")
    cmap = concept_map(codes)
    concept_of = (
        codes.with_columns(
            concept=(pl.col("kind") + "#" + pl.col("sc")).replace_strict(cmap, default=None)
        )
        .group_by("mention_id")
        .agg(pl.col("concept").drop_nulls().min())
    )
    m = m.join(concept_of, on="mention_id", how="left").with_columns(
        # an encounter without a type code can still meet one on the same day
        concept=pl.when((pl.col("kind") == "encounter") & pl.col("concept").is_null())
        .then(pl.lit("encounter#uncoded"))
        .otherwise(pl.col("concept").fill_null("uncoded:" + pl.col("mention_id"))),
        value_key=pl.when(pl.col("kind") == "result")
        .then(
            pl.coalesce(
                pl.col("value_num").round(3).cast(pl.String), pl.col("value_text"), pl.lit("")
            )
        )
        .otherwise(pl.lit("")),
    )
    # a claim diagnosis of a condition on the person's problem list is that problem
    chronic_keys = (
        m.filter(pl.col("chronic").fill_null(False) & pl.col("person_id").is_not_null())
        .select("kind", "person_id", "concept")
        .unique()
        .with_columns(has_chronic=pl.lit(True))
    )
    m = (
        m.join(chronic_keys, on=["kind", "person_id", "concept"], how="left")
        .with_columns(
            chronic_group=pl.col("has_chronic").fill_null(False)
            & (pl.col("chronic").fill_null(False) | pl.col("is_claim"))
            | (pl.col("kind") == "allergy")
            | ((pl.col("kind") == "result") & pl.col("chronic").fill_null(False))
        )
        .drop("has_chronic")
    )

    with_person = m.filter(pl.col("person_id").is_not_null())
    window = pl.col("kind").replace_strict(
        {k: (v if v is not None else -1) for k, v in WINDOW_DAYS.items()}, return_dtype=pl.Int64
    )
    group_cols = ["kind", "person_id", "concept", "value_key", "chronic_group"]
    ordered = with_person.with_columns(window=window).sort(
        [*group_cols, "day", "mention_id"], nulls_last=True
    )
    gap = pl.col("day").diff().over(group_cols).dt.total_days()
    new_cluster = (
        pl.col("chronic_group").not_()
        & (pl.col("window") >= 0)
        & (gap.is_null() & pl.col("day").is_null() | (gap > pl.col("window")))
    )
    ordered = ordered.with_columns(
        cluster_no=new_cluster.fill_null(False).cast(pl.Int32).cum_sum().over(group_cols)
    )
    # A source never states one event twice: two same-day events of one kind at one source (two
    # visits, two blood draws) are two facts. Within a cluster the k-th event of each source (by
    # time) pairs with the k-th of the others; states (problems, allergies, active orders) are exempt.
    cluster_cols = [*group_cols, "cluster_no"]
    ordered = ordered.with_columns(
        occurrence=pl.when(pl.col("chronic_group"))
        .then(pl.lit(0, dtype=pl.UInt32))
        .otherwise(
            # undated events rank by id, so they are never lost to a null rank
            pl.coalesce(pl.col("date_str"), pl.col("mention_id"))
            .rank("ordinal")
            .over([*cluster_cols, "source", "is_claim"], order_by="mention_id")
            .cast(pl.UInt32)
        )
    )
    cluster_cols = [*cluster_cols, "occurrence"]
    first = ordered.group_by(cluster_cols).agg(first_mention=pl.col("mention_id").min())
    ordered = ordered.join(first, on=cluster_cols, nulls_equal=True).with_columns(
        fact_id=pl.struct("kind", "first_mention").map_batches(
            lambda s: pl.Series(
                [_fact_id(r["kind"], r["first_mention"]) for r in s.to_list()], dtype=pl.String
            ),
            return_dtype=pl.String,
        )
    )
    no_person = m.filter(pl.col("person_id").is_null()).with_columns(
        fact_id=pl.lit(None, dtype=pl.String)
    )
    keep = [c for c in m.columns] + ["fact_id"]
    out = pl.concat([ordered.select(keep), no_person.select(keep)], how="vertical_relaxed")
    if out.height != mentions.height:
        # matching must never lose (or invent) a statement of a source
        raise WarehouseError(
            f"fact matching kept {out.height} of {mentions.height} mentions",
            hint="a bug in the matching rules; the previous warehouse stays published",
        )
    return out.join(
        codes.group_by("mention_id").agg(codes=pl.col("sc").unique().sort()),
        on="mention_id",
        how="left",
    ).sort("mention_id")


def _pick_code(mentions: pl.DataFrame) -> pl.DataFrame:
    """The code shown for each fact: the most common code of the preferred system."""
    rows = (
        mentions.filter(pl.col("fact_id").is_not_null())
        .select("fact_id", "kind", "concept_codings", "is_claim")
        .explode("concept_codings")
        .explode("concept_codings")
        .unnest("concept_codings")
        .filter(pl.col("code").is_not_null())
        .with_columns(system=_norm_system(pl.col("system")))
    )
    rank_map: dict[str, int] = {}
    rows = rows.with_columns(
        rank=pl.struct("kind", "system").map_batches(
            lambda s: pl.Series(
                [_rank(r["kind"], r["system"], rank_map) for r in s.to_list()], dtype=pl.Int64
            ),
            return_dtype=pl.Int64,
        )
    )
    return (
        rows.group_by("fact_id", "system", "code", "rank")
        .agg(n=pl.len(), display=pl.col("display").drop_nulls().first())
        .sort(["fact_id", "rank", "n", "code"], descending=[False, False, True, False])
        .unique(subset=["fact_id"], keep="first")
        .select("fact_id", code_system="system", code="code", display="display")
    )


def _rank(kind: str, system: str | None, cache: dict[str, int]) -> int:
    key = f"{kind}\x00{system}"
    if key not in cache:
        prefs = PREFERRED_SYSTEMS.get(kind, [])
        cache[key] = prefs.index(system) if system in prefs else len(prefs)
    return cache[key]


def build_facts(mentions: pl.DataFrame) -> pl.DataFrame:
    """One row per fact from the matched mentions."""
    matched = mentions.filter(pl.col("fact_id").is_not_null())
    facts = matched.group_by("fact_id").agg(
        kind=pl.col("kind").first(),
        person_id=pl.col("person_id").first(),
        concept=pl.col("concept").first(),
        text=pl.col("text").drop_nulls().mode().sort().first(),
        effective_date=pl.col("day").min(),
        last_date=pl.col("day").max(),
        value_num=pl.col("value_num").drop_nulls().first(),
        value_unit=pl.col("value_unit").drop_nulls().first(),
        value_text=pl.col("value_text").drop_nulls().first(),
        status=pl.col("status").filter(~pl.col("is_claim")).drop_nulls().first(),
        category=pl.col("category").filter(~pl.col("is_claim")).drop_nulls().first(),
        n_mentions=pl.len(),
        n_sources=pl.col("source").n_unique(),
        n_resources=pl.col("resource_key").n_unique(),
        sources=pl.col("source").unique().sort(),
        patterns=pl.col("pattern").unique().sort(),
        # the exchange purposes of its network sources (empty when none came by the network)
        permitted_purposes=pl.col("permitted_purpose").drop_nulls().unique().sort(),
        from_claims=pl.col("is_claim").any(),
        from_clinical=(~pl.col("is_claim")).any(),
        first_fetched_at=pl.col("fetched_at").min(),
        last_fetched_at=pl.col("fetched_at").max(),
    )
    return facts.join(_pick_code(matched), on="fact_id", how="left").sort("kind", "fact_id")


# --------------------------------------------------------------------------------------------
# the warehouse step


def unified_step(con: duckdb.DuckDBPyConnection, ctx: Any) -> dict[str, int]:
    """Warehouse step: fact mentions, facts, fact sources and the per-kind views."""
    raw = extract_mentions(con)
    person_of = pl.from_arrow(
        con.sql("SELECT patient_key, person_id FROM patient_links").to_arrow_table()
    )
    assert isinstance(person_of, pl.DataFrame)
    mentions = match_facts(raw, person_of)
    facts = build_facts(mentions)
    write_unified_tables(con, mentions, facts)
    return {
        "fact_mentions": mentions.height,
        "facts": facts.height,
    }


def write_unified_tables(
    con: duckdb.DuckDBPyConnection, mentions: pl.DataFrame, facts: pl.DataFrame
) -> None:
    """Create the unified-record tables and views in ``con``."""
    m_arrow = mentions.drop("concept_codings").to_arrow()  # noqa: F841 (used by name in SQL)
    f_arrow = facts.to_arrow()  # noqa: F841
    con.execute(
        """
        CREATE OR REPLACE TABLE fact_mentions AS
        SELECT mention_id, fact_id, kind, person_id, patient_key, resource_key, resource_type,
               element, is_claim, concept, codes, text, day AS mention_date, date_str,
               value_num, value_unit, value_text, status, category, chronic,
               source, pattern, organization, connection, fetched_at, run_id,
               permitted_purpose, network_query_id
        FROM m_arrow ORDER BY mention_id
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE facts AS
        SELECT fact_id, kind, person_id, code_system, code, display, text, concept,
               effective_date, last_date, value_num, value_unit, value_text, status, category,
               n_mentions, n_resources, n_sources, sources, patterns, permitted_purposes,
               from_clinical, from_claims, first_fetched_at, last_fetched_at
        FROM f_arrow ORDER BY kind, person_id, effective_date, fact_id
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE fact_sources AS
        SELECT DISTINCT fact_id, resource_key, element, resource_type, source, pattern,
               organization, connection, fetched_at, run_id, permitted_purpose, network_query_id
        FROM fact_mentions WHERE fact_id IS NOT NULL
        ORDER BY fact_id, resource_key, element
        """
    )
    # the same resource may have arrived through several patterns (see identity.landed_patterns)
    from medblocks_pipelines.lib.warehouse.identity import ensure_landed_patterns

    if ensure_landed_patterns(con):
        con.execute(
            """
            CREATE OR REPLACE TABLE fact_sources AS
            SELECT s.*, coalesce(lp.patterns, [s.pattern]) AS patterns_seen
            FROM fact_sources s LEFT JOIN landed_patterns lp USING (resource_key)
            ORDER BY s.fact_id, s.resource_key, s.element
            """
        )
        con.execute(
            """
            CREATE OR REPLACE TABLE facts AS
            SELECT f.* REPLACE (coalesce(x.patterns, f.patterns) AS patterns)
            FROM facts f LEFT JOIN (
                SELECT fact_id, list_sort(list_distinct(flatten(list(patterns_seen)))) AS patterns
                FROM fact_sources GROUP BY 1
            ) x USING (fact_id)
            ORDER BY f.kind, f.person_id, f.effective_date, f.fact_id
            """
        )
    else:
        con.execute(
            "CREATE OR REPLACE TABLE fact_sources AS SELECT *, [pattern] AS patterns_seen "
            "FROM fact_sources ORDER BY fact_id, resource_key, element"
        )
    for kind, view in KIND_VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM facts WHERE kind = '{kind}'")


def fact_pairs(groups: Iterable[Iterable[str]]) -> set[tuple[str, str]]:
    """Unordered pairs of distinct members within each group (for pairwise evaluation)."""
    out: set[tuple[str, str]] = set()
    for g in groups:
        members = sorted(set(g))
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                out.add((a, b))
    return out


def describe_rules() -> str:
    """The matching rules as markdown (for the data dictionary)."""
    doc = __doc__ or ""
    table = ["| kind | same fact when |", "|---|---|"]
    table += [f"| {kind} | {rule} |" for kind, rule in MATCHING_RULES.items()]
    head = "Matching (same person always required; `person_id` comes from identity):"
    rest = doc[doc.index("Events (everything but") : doc.index("Tables: ")].strip()
    return "\n".join([head, "", *table, "", rest])


def dumps(value: Any) -> str:
    """Stable JSON (sorted keys)."""
    return json.dumps(value, sort_keys=True, default=str)

"""Fact mentions out of the landed JSON: one DuckDB SELECT per kind of source record (and per claim
element), all with the same columns, so matching sees every coding of a CodeableConcept and every
claim element rather than the flattened view tables."""

import duckdb
import polars as pl

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

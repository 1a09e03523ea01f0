"""View build throughput: compiled ViewDefinitions beside hand-written DuckDB and fhirpathpy.

    .venv/bin/python benchmarks/bench_views.py [--resources N | --size N] [--sample K] [--repeat R]
        [--exact-decimals]

Generates N resources with the sandbox generator (``stream_bulk_ndjson``), loads them into an
in-memory DuckDB table shaped like the warehouse ``resources`` table (JSON text + provenance),
then for every core view measures, in the same run over the same data:

* compiled: the view compiled by ``compile_view`` (with provenance passthrough), materialised
  with ``CREATE TABLE AS`` (what a warehouse build does);
* hand-written: a DuckDB projection of the same fields written by hand with the JSON operators
  an analyst would use, materialised the same way;
* hand-written, parse once (observation, patient, explanation_of_benefit_line): the same
  fields projected from one explicit ``from_json`` structure, the idiom a DuckDB expert would use;
* fhirpathpy: the per-resource Python evaluation of the same view (reference.evaluate_view) on a
  sample of K resources of the view's type.

Each DuckDB timing is the best of R alternating runs. Rates are input resources of the view's
type per second. Prints ratios (compiled / hand-written, target >= 0.8; fhirpathpy / compiled)
and the process's peak RSS.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medblocks_pipelines.lib.warehouse.views import (  # noqa: E402
    PROVENANCE_COLUMNS,
    compile_view,
    load_core_views,
)
from medblocks_pipelines_tests.support.views_reference import evaluate_view  # noqa: E402

PROV = list(PROVENANCE_COLUMNS)
LOINC, SCT, CVX = "http://loinc.org", "http://snomed.info/sct", "http://hl7.org/fhir/sid/cvx"
ICD10, CPT = "http://hl7.org/fhir/sid/icd-10-cm", "http://www.ama-assn.org/go/cpt"
US = "http://hl7.org/fhir/us/core/StructureDefinition/"


# ---- hand-written SQL helpers (what someone writing the projection by hand would type) -------
def s(path: str, src: str = "resource") -> str:
    return f"json_extract_string({src}, '$.{path}')"


def b(path: str, src: str = "resource") -> str:
    return f"TRY_CAST(json_extract({src}, '$.{path}') AS BOOLEAN)"


def d(path: str, src: str = "resource") -> str:
    return f"TRY_CAST(json_extract_string({src}, '$.{path}') AS DECIMAL(38,18))"


def i(path: str, src: str = "resource") -> str:
    return f"TRY_CAST(json_extract_string({src}, '$.{path}') AS BIGINT)"


def arr(path: str, src: str = "resource") -> str:
    return f"CAST(json_extract({src}, '$.{path}') AS JSON[])"


def ref(path: str, rtype: str = "[A-Za-z]+", src: str = "resource") -> str:
    return f"nullif(regexp_extract({s(path + '.reference', src)}, '{rtype}/([^/]+)$', 1), '')"


def code_in(path: str, system: str, src: str = "resource") -> str:
    return (
        f"list_filter({arr(path + '.coding', src)}, lambda c: c->>'system' = '{system}')[1]"
        f"->>'code'"
    )


def cc(prefix: str, path: str, src: str = "resource") -> str:
    return (
        f"{s(path + '.coding[0].code', src)} AS {prefix}_code, "
        f"{s(path + '.coding[0].system', src)} AS {prefix}_system, "
        f"{s(path + '.coding[0].display', src)} AS {prefix}_display, "
        f"{s(path + '.text', src)} AS {prefix}_text"
    )


def where_typed(path: str, code: str, field: str, src: str = "resource") -> str:
    """The first element of an array whose type.coding has ``code``; its ``field``."""
    return (
        f"list_filter({arr(path, src)}, lambda x: list_contains("
        f"CAST(json_extract(x, '$.type.coding[*].code') AS VARCHAR[]), '{code}'))[1]"
        f"->>'{field}'"
    )


def where_cat(path: str, codes: tuple[str, ...], field: str, src: str = "resource") -> str:
    cond = " OR ".join(
        f"list_contains(CAST(json_extract(x, '$.category.coding[*].code') AS VARCHAR[]), '{c}')"
        for c in codes
    )
    return (
        f"TRY_CAST(json_extract_string(list_filter({arr(path, src)}, lambda x: {cond})[1], "
        f"'$.{field}') AS DECIMAL(38,18))"
    )


def ext(url: str) -> str:
    return f"list_filter({arr('extension')}, lambda e: e->>'url' = '{url}')[1]"


OBS_VALUE = (
    f"{d('valueQuantity.value')} AS value_quantity, {s('valueQuantity.unit')} AS "
    f"value_unit, {s('valueQuantity.code')} AS value_ucum, "
    f"{s('valueCodeableConcept.coding[0].code')} AS value_code, "
    f"{s('valueCodeableConcept.coding[0].system')} AS value_code_system, "
    f"{s('valueString')} AS value_string, {b('valueBoolean')} AS value_boolean, "
    f"{i('valueInteger')} AS value_integer, {s('valueDateTime')} AS value_date_time"
)

HAND: dict[str, tuple[str, str]] = {
    "patient": (
        "Patient",
        f"""
        {s("id")} AS id, {b("active")} AS active, {s("gender")} AS gender,
        {s("birthDate")} AS birth_date, {b("deceasedBoolean")} AS deceased,
        {s("deceasedDateTime")} AS deceased_date_time,
        coalesce(list_filter({arr("name")}, lambda n: n->>'use' = 'official')[1],
                 json_extract(resource, '$.name[0]'))->>'family' AS family_name,
        coalesce(array_to_string(CAST(coalesce(list_filter({arr("name")},
                 lambda n: n->>'use' = 'official')[1], json_extract(resource, '$.name[0]'))
                 ->'given' AS VARCHAR[]), ' '), '') AS given_names,
        {where_typed("identifier", "MR", "value")} AS mrn,
        {where_typed("identifier", "MR", "system")} AS mrn_system,
        list_filter({arr("telecom")}, lambda t: t->>'system' = 'phone')[1]->>'value' AS phone,
        list_filter({arr("telecom")}, lambda t: t->>'system' = 'email')[1]->>'value' AS email,
        coalesce(array_to_string(CAST(json_extract(resource, '$.address[0].line') AS VARCHAR[]),
                 ', '), '') AS address_line,
        {s("address[0].city")} AS city, {s("address[0].state")} AS state,
        {s("address[0].postalCode")} AS postal_code, {s("address[0].country")} AS country,
        {s("maritalStatus.coding[0].code")} AS marital_status,
        list_filter(CAST(json_extract({ext(US + "us-core-race")}, '$.extension') AS JSON[]),
                    lambda e: e->>'url' = 'ombCategory')[1]->>'$.valueCoding.code' AS race_code,
        list_filter(CAST(json_extract({ext(US + "us-core-ethnicity")}, '$.extension') AS JSON[]),
                    lambda e: e->>'url' = 'ombCategory')[1]->>'$.valueCoding.code'
                    AS ethnicity_code,
        {ext(US + "us-core-birthsex")}->>'valueCode' AS birth_sex,
        {ref("managingOrganization", "Organization")} AS managing_organization_id,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "encounter": (
        "Encounter",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id, {s("status")} AS status,
        {s("class.code")} AS class_code, {cc("type", "type[0]")},
        {s("period.start")} AS period_start, {s("period.end")} AS period_end,
        list_filter(list_transform({arr("participant")}, lambda p: regexp_extract(
            p->>'$.individual.reference', 'Practitioner/([^/]+)$', 1)), lambda x: x <> '')[1]
            AS practitioner_id,
        {s("reasonCode[0].coding[0].code")} AS reason_code,
        {s("reasonCode[0].text")} AS reason_text,
        {ref("serviceProvider", "Organization")} AS service_provider_id,
        nullif(regexp_extract({s("location[0].location.reference")}, 'Location/([^/]+)$', 1), '')
            AS location_id,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "condition": (
        "Condition",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id,
        {s("clinicalStatus.coding[0].code")} AS clinical_status,
        {s("verificationStatus.coding[0].code")} AS verification_status,
        {s("category[0].coding[0].code")} AS category, {cc("code", "code")},
        {code_in("code", SCT)} AS snomed_code, {code_in("code", ICD10)} AS icd10_code,
        {s("onsetDateTime")} AS onset_date_time, {s("abatementDateTime")} AS abatement_date_time,
        {s("recordedDate")} AS recorded_date, {s("meta.lastUpdated")} AS last_updated""",
    ),
    "observation": (
        "Observation",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id, {s("status")} AS status,
        {s("category[0].coding[0].code")} AS category, {cc("code", "code")},
        {code_in("code", LOINC)} AS loinc_code,
        {s("effectiveDateTime")} AS effective_date_time,
        {s("effectivePeriod.start")} AS effective_period_start, {s("issued")} AS issued,
        {OBS_VALUE}, {s("interpretation[0].coding[0].code")} AS interpretation,
        {d("referenceRange[0].low.value")} AS reference_range_low,
        {d("referenceRange[0].high.value")} AS reference_range_high,
        coalesce(json_array_length(resource, '$.component'), 0) AS component_count,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "medication_request": (
        "MedicationRequest",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id, {s("status")} AS status,
        {s("intent")} AS intent, {s("category[0].coding[0].code")} AS category,
        {s("medicationCodeableConcept.coding[0].code")} AS medication_code,
        {s("medicationCodeableConcept.coding[0].system")} AS medication_system,
        coalesce({s("medicationCodeableConcept.text")}, {s("medicationReference.display")})
            AS medication_text,
        {ref("medicationReference", "Medication")} AS medication_id,
        {s("authoredOn")} AS authored_on, {ref("requester")} AS requester_id,
        {s("reasonCode[0].coding[0].code")} AS reason_code,
        {s("dosageInstruction[0].text")} AS dosage_text,
        {d("dosageInstruction[0].doseAndRate[0].doseQuantity.value")} AS dose_value,
        {s("dosageInstruction[0].doseAndRate[0].doseQuantity.unit")} AS dose_unit,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "allergy_intolerance": (
        "AllergyIntolerance",
        f"""
        {s("id")} AS id, {ref("patient", "Patient")} AS patient_id,
        {s("clinicalStatus.coding[0].code")} AS clinical_status,
        {s("verificationStatus.coding[0].code")} AS verification_status, {s("type")} AS type,
        coalesce(array_to_string(CAST(json_extract(resource, '$.category') AS VARCHAR[]), ','),
                 '') AS category,
        {s("criticality")} AS criticality, {cc("code", "code")},
        {s("onsetDateTime")} AS onset_date_time, {s("recordedDate")} AS recorded_date,
        {s("reaction[0].manifestation[0].coding[0].code")} AS reaction_manifestation,
        {s("reaction[0].severity")} AS reaction_severity,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "immunization": (
        "Immunization",
        f"""
        {s("id")} AS id, {ref("patient", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id, {s("status")} AS status,
        {cc("vaccine", "vaccineCode")}, {code_in("vaccineCode", CVX)} AS cvx_code,
        {s("occurrenceDateTime")} AS occurrence_date_time,
        {b("primarySource")} AS primary_source, {s("lotNumber")} AS lot_number,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "procedure": (
        "Procedure",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id, {s("status")} AS status,
        {cc("code", "code")}, {code_in("code", SCT)} AS snomed_code,
        {code_in("code", CPT)} AS cpt_code, {s("performedDateTime")} AS performed_date_time,
        {s("performedPeriod.start")} AS performed_period_start,
        {ref("performer[0].actor")} AS performer_id, {s("meta.lastUpdated")} AS last_updated""",
    ),
    "diagnostic_report": (
        "DiagnosticReport",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id,
        {ref("encounter", "Encounter")} AS encounter_id, {s("status")} AS status,
        {s("category[0].coding[0].code")} AS category, {cc("code", "code")},
        {s("effectiveDateTime")} AS effective_date_time, {s("issued")} AS issued,
        coalesce(list_filter(list_transform({arr("result")}, lambda r: regexp_extract(
            r->>'reference', 'Observation/([^/]+)$', 1)), lambda x: x <> ''), [])
            AS result_observation_ids,
        {s("conclusion")} AS conclusion, {s("meta.lastUpdated")} AS last_updated""",
    ),
    "document_reference": (
        "DocumentReference",
        f"""
        {s("id")} AS id, {ref("subject", "Patient")} AS patient_id, {s("status")} AS status,
        {s("docStatus")} AS doc_status, {cc("type", "type")},
        {s("category[0].coding[0].code")} AS category, {s("date")} AS date,
        {ref("author[0]")} AS author_id,
        {s("content[0].attachment.contentType")} AS content_type,
        {s("content[0].attachment.url")} AS attachment_url,
        {s("content[0].attachment.title")} AS attachment_title,
        {s("content[0].format.code")} AS format_code,
        {ref("context.encounter[0]", "Encounter")} AS encounter_id,
        {s("context.period.start")} AS period_start, {s("meta.lastUpdated")} AS last_updated""",
    ),
    "coverage": (
        "Coverage",
        f"""
        {s("id")} AS id, {ref("beneficiary", "Patient")} AS patient_id, {s("status")} AS status,
        {s("type.coding[0].code")} AS type_code, {s("subscriberId")} AS subscriber_id,
        {where_typed("identifier", "MB", "value")} AS member_id,
        {s("relationship.coding[0].code")} AS relationship,
        {s("period.start")} AS period_start, {s("period.end")} AS period_end,
        {ref("payor[0]")} AS payor_id, {s("payor[0].display")} AS payor_name,
        {where_typed("class", "group", "value")} AS group_value,
        {where_typed("class", "group", "name")} AS group_name,
        {where_typed("class", "plan", "value")} AS plan_value,
        {where_typed("class", "plan", "name")} AS plan_name,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
    "explanation_of_benefit": (
        "ExplanationOfBenefit",
        f"""
        {s("id")} AS id, {ref("patient", "Patient")} AS patient_id,
        {s("identifier[0].value")} AS claim_identifier, {s("status")} AS status,
        {s("type.coding[0].code")} AS type_code, {s("use")} AS use, {s("outcome")} AS outcome,
        {s("billablePeriod.start")} AS billable_period_start,
        {s("billablePeriod.end")} AS billable_period_end, {s("created")} AS created,
        {ref("insurer", "Organization")} AS insurer_id, {ref("provider")} AS provider_id,
        nullif(regexp_extract(list_filter({arr("insurance")}, lambda x:
            TRY_CAST(x->'focal' AS BOOLEAN))[1]->>'$.coverage.reference',
            'Coverage/([^/]+)$', 1), '') AS coverage_id,
        list_filter({arr("diagnosis")}, lambda x: x->>'sequence' = '1')[1]
            ->>'$.diagnosisCodeableConcept.coding[0].code' AS principal_diagnosis_code,
        coalesce(list_filter(flatten(list_transform({arr("diagnosis")}, lambda x: CAST(
            json_extract(x, '$.diagnosisCodeableConcept.coding[*].code') AS VARCHAR[]))),
            lambda c: c IS NOT NULL), []) AS diagnosis_codes,
        {where_cat("total", ("submitted",), "amount.value")} AS total_submitted,
        {where_cat("total", ("paidtoprovider", "benefit"), "amount.value")} AS total_paid,
        {d("payment.amount.value")} AS payment_amount,
        {s("total[0].amount.currency")} AS currency,
        coalesce(json_array_length(resource, '$.item'), 0) AS item_count,
        {s("meta.lastUpdated")} AS last_updated""",
    ),
}

# Views with one row per element: hand-written with UNNEST over the JSON array.
HAND_UNNEST: dict[str, tuple[str, str, str, str]] = {
    "observation_component": (
        "Observation",
        "component",
        f"""
        {s("id")} AS observation_id, {ref("subject", "Patient")} AS patient_id,
        {s("effectiveDateTime")} AS effective_date_time,
        {s("code.coding[0].code")} AS panel_code""",
        f"""
        idx - 1 AS component_index, {cc("code", "code", "el")},
        {code_in("code", LOINC, "el")} AS loinc_code,
        {d("valueQuantity.value", "el")} AS value_quantity,
        {s("valueQuantity.unit", "el")} AS value_unit, {s("valueQuantity.code", "el")} AS value_ucum,
        {s("valueCodeableConcept.coding[0].code", "el")} AS value_code,
        {s("valueCodeableConcept.coding[0].system", "el")} AS value_code_system,
        {s("valueString", "el")} AS value_string,
        {s("interpretation[0].coding[0].code", "el")} AS interpretation""",
    ),
    "explanation_of_benefit_line": (
        "ExplanationOfBenefit",
        "item",
        f"""
        {s("id")} AS eob_id, {ref("patient", "Patient")} AS patient_id,
        {s("type.coding[0].code")} AS type_code""",
        f"""
        {i("sequence", "el")} AS sequence,
        {s("productOrService.coding[0].code", "el")} AS product_or_service_code,
        {s("productOrService.coding[0].system", "el")} AS product_or_service_system,
        {s("productOrService.coding[0].display", "el")} AS product_or_service_display,
        {s("servicedDate", "el")} AS serviced_date,
        {s("servicedPeriod.start", "el")} AS serviced_period_start,
        {s("locationCodeableConcept.coding[0].code", "el")} AS place_of_service,
        {d("quantity.value", "el")} AS quantity, {d("net.value", "el")} AS net_amount,
        {where_cat("adjudication", ("submitted",), "amount.value", "el")} AS submitted_amount,
        {where_cat("adjudication", ("eligible",), "amount.value", "el")} AS allowed_amount,
        {where_cat("adjudication", ("paidtoprovider", "benefit"), "amount.value", "el")}
            AS paid_amount,
        {where_cat("adjudication", ("copay",), "amount.value", "el")} AS copay_amount,
        coalesce(CAST(json_extract(el, '$.diagnosisSequence') AS BIGINT[]), [])
            AS diagnosis_sequences""",
    ),
}


# A second, stronger hand-written baseline for three views: parse each resource once with an
# explicit from_json structure (the idiom a DuckDB expert would use), then project.
_CODING = '[{"system":"VARCHAR","code":"VARCHAR","display":"VARCHAR"}]'
_CC = '{"coding":' + _CODING + ',"text":"VARCHAR"}'
_QTY = '{"value":"DECIMAL(38,18)","unit":"VARCHAR","code":"VARCHAR"}'
_REF = '{"reference":"VARCHAR"}'
PARSE_ONCE: dict[str, tuple[str, str, str]] = {
    "observation": (
        "Observation",
        (
            '{"id":"VARCHAR","subject":' + _REF + ',"encounter":' + _REF + ',"status":"VARCHAR",'
            '"category":[' + _CC + '],"code":' + _CC + ',"effectiveDateTime":"VARCHAR",'
            '"effectivePeriod":{"start":"VARCHAR"},"issued":"VARCHAR","valueQuantity":' + _QTY + ","
            '"valueCodeableConcept":' + _CC + ',"valueString":"VARCHAR","valueBoolean":"BOOLEAN",'
            '"valueInteger":"BIGINT","valueDateTime":"VARCHAR","interpretation":[' + _CC + "],"
            '"referenceRange":[{"low":' + _QTY + ',"high":' + _QTY + '}],"component":["JSON"],'
            '"meta":{"lastUpdated":"VARCHAR"}}'
        ),
        """
        r.id AS id, nullif(regexp_extract(r.subject.reference, 'Patient/([^/]+)$', 1), '')
        AS patient_id, nullif(regexp_extract(r.encounter.reference, 'Encounter/([^/]+)$', 1), '')
        AS encounter_id, r.status AS status, r.category[1].coding[1].code AS category,
        r.code.coding[1].code AS code_code, r.code.coding[1].system AS code_system,
        r.code.coding[1].display AS code_display, r.code.text AS code_text,
        list_filter(r.code.coding, lambda c: c.system = 'http://loinc.org')[1].code
        AS loinc_code, r.effectiveDateTime AS effective_date_time,
        r.effectivePeriod.start AS effective_period_start, r.issued AS issued,
        r.valueQuantity.value AS value_quantity, r.valueQuantity.unit AS value_unit,
        r.valueQuantity.code AS value_ucum, r.valueCodeableConcept.coding[1].code AS value_code,
        r.valueCodeableConcept.coding[1].system AS value_code_system,
        r.valueString AS value_string, r.valueBoolean AS value_boolean,
        r.valueInteger AS value_integer, r.valueDateTime AS value_date_time,
        r.interpretation[1].coding[1].code AS interpretation,
        r.referenceRange[1].low.value AS reference_range_low,
        r.referenceRange[1].high.value AS reference_range_high,
        coalesce(len(r.component), 0) AS component_count, r.meta.lastUpdated AS last_updated""",
    ),
    "patient": (
        "Patient",
        (
            '{"id":"VARCHAR","active":"BOOLEAN","gender":"VARCHAR","birthDate":"VARCHAR",'
            '"deceasedBoolean":"BOOLEAN","deceasedDateTime":"VARCHAR",'
            '"name":[{"use":"VARCHAR","family":"VARCHAR","given":["VARCHAR"]}],'
            '"identifier":[{"type":' + _CC + ',"system":"VARCHAR","value":"VARCHAR"}],'
            '"telecom":[{"system":"VARCHAR","value":"VARCHAR"}],'
            '"address":[{"line":["VARCHAR"],"city":"VARCHAR","state":"VARCHAR",'
            '"postalCode":"VARCHAR","country":"VARCHAR"}],"maritalStatus":' + _CC + ","
            '"extension":[{"url":"VARCHAR","valueCode":"VARCHAR","extension":[{"url":"VARCHAR",'
            '"valueCoding":{"code":"VARCHAR"}}]}],"managingOrganization":' + _REF + ","
            '"meta":{"lastUpdated":"VARCHAR"}}'
        ),
        f"""
        r.id AS id, r.active AS active, r.gender AS gender, r.birthDate AS birth_date,
        r.deceasedBoolean AS deceased, r.deceasedDateTime AS deceased_date_time,
        coalesce(list_filter(r.name, lambda n: n.use = 'official')[1], r.name[1]).family
        AS family_name, coalesce(array_to_string(coalesce(list_filter(r.name,
        lambda n: n.use = 'official')[1], r.name[1]).given, ' '), '') AS given_names,
        list_filter(r.identifier, lambda x: list_contains(list_transform(x.type.coding,
        lambda c: c.code), 'MR'))[1].value AS mrn,
        list_filter(r.identifier, lambda x: list_contains(list_transform(x.type.coding,
        lambda c: c.code), 'MR'))[1].system AS mrn_system,
        list_filter(r.telecom, lambda t: t.system = 'phone')[1].value AS phone,
        list_filter(r.telecom, lambda t: t.system = 'email')[1].value AS email,
        coalesce(array_to_string(r.address[1].line, ', '), '') AS address_line,
        r.address[1].city AS city, r.address[1].state AS state,
        r.address[1].postalCode AS postal_code, r.address[1].country AS country,
        r.maritalStatus.coding[1].code AS marital_status,
        list_filter(list_filter(r.extension, lambda e: e.url = '{US}us-core-race')[1].extension,
        lambda e: e.url = 'ombCategory')[1].valueCoding.code AS race_code,
        list_filter(list_filter(r.extension, lambda e: e.url = '{US}us-core-ethnicity')[1]
        .extension, lambda e: e.url = 'ombCategory')[1].valueCoding.code AS ethnicity_code,
        list_filter(r.extension, lambda e: e.url = '{US}us-core-birthsex')[1].valueCode
        AS birth_sex, nullif(regexp_extract(r.managingOrganization.reference,
        'Organization/([^/]+)$', 1), '') AS managing_organization_id,
        r.meta.lastUpdated AS last_updated""",
    ),
    "explanation_of_benefit_line": (
        "ExplanationOfBenefit",
        (
            '{"id":"VARCHAR","patient":'
            + _REF
            + ',"type":'
            + _CC
            + ',"item":[{"sequence":"BIGINT",'
            '"productOrService":' + _CC + ',"servicedDate":"VARCHAR","servicedPeriod":'
            '{"start":"VARCHAR"},"locationCodeableConcept":' + _CC + ',"quantity":' + _QTY + ","
            '"net":' + _QTY + ',"adjudication":[{"category":' + _CC + ',"amount":' + _QTY + "}],"
            '"diagnosisSequence":["BIGINT"]}]}'
        ),
        "UNNEST",
    ),
}


def _adj(codes: tuple[str, ...]) -> str:
    cond = " OR ".join(
        f"list_contains(list_transform(a.category.coding, lambda c: c.code), '{c}')" for c in codes
    )
    return f"list_filter(el.adjudication, lambda a: {cond})[1].amount.value"


def parse_once_sql(name: str) -> str:
    rtype, structure, cols = PARSE_ONCE[name]
    prov = ", ".join(PROV)
    src = (
        f"SELECT {prov}, from_json(resource, '{structure}') AS r FROM resources "
        f"WHERE resource_type = '{rtype}'"
    )
    if cols != "UNNEST":
        return f"SELECT {prov}, {cols} FROM ({src})"
    return f"""SELECT {prov}, r.id AS eob_id,
        nullif(regexp_extract(r.patient.reference, 'Patient/([^/]+)$', 1), '') AS patient_id,
        r.type.coding[1].code AS type_code, el.sequence AS sequence,
        el.productOrService.coding[1].code AS product_or_service_code,
        el.productOrService.coding[1].system AS product_or_service_system,
        el.productOrService.coding[1].display AS product_or_service_display,
        el.servicedDate AS serviced_date, el.servicedPeriod.start AS serviced_period_start,
        el.locationCodeableConcept.coding[1].code AS place_of_service,
        el.quantity.value AS quantity, el.net.value AS net_amount,
        {_adj(("submitted",))} AS submitted_amount, {_adj(("eligible",))} AS allowed_amount,
        {_adj(("paidtoprovider", "benefit"))} AS paid_amount,
        {_adj(("copay",))} AS copay_amount,
        coalesce(el.diagnosisSequence, []) AS diagnosis_sequences
        FROM ({src}), LATERAL (SELECT unnest(r.item) AS el)"""


def hand_sql(name: str) -> str:
    prov = ", ".join(PROV)
    if name in HAND:
        rtype, cols = HAND[name]
        return f"SELECT {prov}, {cols} FROM resources WHERE resource_type = '{rtype}'"
    rtype, array, parent, child = HAND_UNNEST[name]
    return (
        f"SELECT {prov}, {parent}, {child} FROM resources, "
        f"LATERAL (SELECT unnest({arr(array)}) AS el, "
        f"generate_subscripts({arr(array)}, 1) AS idx) WHERE resource_type = '{rtype}'"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    con.execute(f"CREATE OR REPLACE TEMP TABLE bench_out AS {sql}")
    elapsed = time.perf_counter() - t0
    rows = con.execute("SELECT count(*) FROM bench_out").fetchone()
    assert rows is not None
    return elapsed, int(rows[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--resources",
        "--size",
        type=int,
        default=1_000_000,
        help="resources to generate (default 1,000,000)",
    )
    ap.add_argument(
        "--sample", type=int, default=2000, help="resources per view for the fhirpathpy evaluation"
    )
    ap.add_argument("--repeat", type=int, default=3, help="best of R runs per DuckDB timing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--exact-decimals",
        action="store_true",
        help="compile with exact_decimals=True (the warehouse build's mode: <name>_text columns)",
    )
    args = ap.parse_args()

    from medblocks_sandbox.generator.ndjson import stream_bulk_ndjson

    with tempfile.TemporaryDirectory(prefix="bench_views_") as tmp:
        t0 = time.perf_counter()
        stats = stream_bulk_ndjson(tmp, resources=args.resources, seed=args.seed)
        gen_s = time.perf_counter() - t0
        con = duckdb.connect()
        t0 = time.perf_counter()
        con.execute(f"""
            CREATE TABLE resources AS
            SELECT CAST(json AS VARCHAR) AS resource,
                   json_extract_string(json, '$.resourceType') AS resource_type,
                   json_extract_string(json, '$.id') AS resource_id,
                   'tenant-a' AS tenant, 'backend' AS pattern, 'sandbox-ehr' AS source,
                   'org-1' AS organization, CAST(NULL AS VARCHAR) AS connection,
                   json_extract_string(json, '$.meta.versionId') AS version_id,
                   TIMESTAMPTZ '2024-06-01 00:00:00+00' AS fetched_at, 'run-1' AS run_id
                   , CAST(NULL AS VARCHAR) AS permitted_purpose,
                   CAST(NULL AS VARCHAR) AS network_query_id
            FROM read_ndjson_objects('{tmp}/*.ndjson')""")
        con.execute("ALTER TABLE resources ADD COLUMN resource_key VARCHAR")
        con.execute(
            "UPDATE resources SET resource_key = source || '/' || resource_type || '/' "
            "|| resource_id"
        )
        load_s = time.perf_counter() - t0
        counts = dict(
            con.execute("SELECT resource_type, count(*) FROM resources GROUP BY 1").fetchall()
        )
        samples: dict[str, list[dict[str, object]]] = {}
        for rtype in {HAND.get(n, HAND_UNNEST.get(n, ("",)))[0] for n in load_core_views()}:
            lines = con.execute(
                f"SELECT resource FROM resources WHERE resource_type = '{rtype}' "
                f"LIMIT {args.sample}"
            ).fetchall()
            samples[rtype] = [json.loads(r[0], parse_float=Decimal) for r in lines]

    total = sum(counts.values())
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]  # type: ignore[index]
    print(
        f"generated {stats['resources']:,} resources in {gen_s:.1f}s, loaded into DuckDB in "
        f"{load_s:.1f}s ({total:,} rows, {threads} threads)"
    )
    print(
        f"{'view':<28}{'input':>10}{'rows':>10}{'compiled/s':>13}{'hand/s':>13}"
        f"{'ratio':>7}{'fhirpathpy/s':>14}{'fp/comp':>9}"
    )
    ratios: list[float] = []
    strong: list[str] = []
    for name, view in load_core_views(user_dir="").items():
        compiled = compile_view(view, passthrough_columns=PROV, exact_decimals=args.exact_decimals)
        hand = hand_sql(name)
        best_c = best_h = float("inf")
        rows_c = rows_h = 0
        for _ in range(args.repeat):
            t, rows_h = timed(con, hand)
            best_h = min(best_h, t)
            t, rows_c = timed(con, compiled.sql)
            best_c = min(best_c, t)
        n_in = counts.get(compiled.resource, 0)
        sample = samples.get(compiled.resource, [])
        t0 = time.perf_counter()
        evaluate_view(view, sample)
        fp_s = time.perf_counter() - t0
        rate_c, rate_h = n_in / best_c, n_in / best_h
        if name in PARSE_ONCE:
            best_p = float("inf")
            rows_p = 0
            for _ in range(args.repeat):
                t, rows_p = timed(con, parse_once_sql(name))
                best_p = min(best_p, t)
            strong.append(
                f"{name:<28}{n_in / best_p:>13,.0f}/s  compiled/parse-once "
                f"{best_p / best_c:.2f}"
                + ("" if rows_p == rows_c else f"  (rows {rows_p} vs {rows_c})")
            )
        rate_fp = len(sample) / fp_s if fp_s > 0 else float("nan")
        ratio = rate_c / rate_h
        ratios.append(ratio)
        flag = "" if rows_c == rows_h else f"  (row counts differ: {rows_c} vs {rows_h})"
        print(
            f"{name:<28}{n_in:>10,}{rows_c:>10,}{rate_c:>13,.0f}{rate_h:>13,.0f}"
            f"{ratio:>7.2f}{rate_fp:>14,.0f}{rate_fp / rate_c:>9.4f}{flag}"
        )
    geo = 1.0
    for r in ratios:
        geo *= r
    geo **= 1 / len(ratios)
    print(
        f"compiled / hand-written: min {min(ratios):.2f}, geometric mean {geo:.2f} (target >= 0.8)"
    )
    print("stronger hand-written baseline (parse once with from_json, then project):")
    for line in strong:
        print("  " + line)
    print(f"peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()

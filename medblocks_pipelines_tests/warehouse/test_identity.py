"""Identity linking: accuracy on the generator's ground truth, twins, rules, stability, edge cases."""

import json
from collections import defaultdict

import duckdb
import polars as pl
import pytest

from medblocks_pipelines.lib.warehouse import identity
from medblocks_pipelines.lib.warehouse.identity import (
    connected_components,
    link_patients,
    pairwise_metrics,
)
from medblocks_sandbox.generator import Population, PopulationSpec, generate_population


def _raw_from(pop: Population, orgs: list[str] | None = None) -> pl.DataFrame:
    """Source patients of a population as the warehouse extracts them (through DuckDB JSON)."""
    rows = []
    for org in orgs or pop.org_ids:
        for p in pop.patients_for(org):
            rows.append(
                {
                    "resource_key": f"{org}/Patient/{p['id']}",
                    "resource_id": p["id"],
                    "resource_type": "Patient",
                    "source": org,
                    "pattern": "backend",
                    "organization": org,
                    "connection": None,
                    "fetched_at": None,
                    "resource": json.dumps(p),
                }
            )
    resources = pl.DataFrame(rows).to_arrow()  # noqa: F841 (used by name)
    con = duckdb.connect()
    con.execute("CREATE TABLE resources AS SELECT * FROM resources")
    return identity.extract_source_patients(con)


def _truth(pop: Population) -> dict[str, str]:
    return {f"{o}/Patient/{pid}": person for o, pid, person in pop.truth}


@pytest.fixture(scope="module")
def pop300() -> Population:
    return generate_population(PopulationSpec(seed=5, persons=300))


@pytest.fixture(scope="module")
def linked300(pop300: Population) -> identity.IdentityResult:
    return link_patients(_raw_from(pop300))


def test_pairwise_precision_and_recall_meet_targets(
    pop300: Population, linked300: identity.IdentityResult
) -> None:
    pred = dict(zip(linked300.links["patient_key"], linked300.links["person_id"], strict=True))
    m = pairwise_metrics(pred, _truth(pop300))
    assert m["records"] == len(pop300.truth)
    assert m["true_pairs"] > 500  # the population really repeats people across sources
    assert m["precision"] >= 0.99, m
    assert m["recall"] >= 0.95, m


def test_twins_are_never_merged(pop300: Population, linked300: identity.IdentityResult) -> None:
    twins = [(p.person_id, p.twin_of) for p in pop300.persons if p.twin_of]
    assert twins, "the population should contain twins"
    truth = _truth(pop300)
    person_of = dict(zip(linked300.links["patient_key"], linked300.links["person_id"], strict=True))
    persons_of_truth: dict[str, set[str]] = defaultdict(set)
    for key, true_person in truth.items():
        persons_of_truth[true_person].add(person_of[key])
    for a, b in twins:
        assert not (persons_of_truth[a] & persons_of_truth[b]), "twins share a person_id"


def test_twin_edges_are_vetoed_and_kept(linked300: identity.IdentityResult) -> None:
    vetoed = linked300.edges.filter(pl.col("veto").is_not_null())
    assert vetoed.height > 0
    assert not vetoed["accepted"].any()
    assert set(vetoed["veto"].unique()) <= {
        "given names conflict",
        "different SSNs",
        "birth dates conflict",
        "joins a vetoed pair",
    }


def test_every_link_has_score_rule_and_evidence(linked300: identity.IdentityResult) -> None:
    links = linked300.links
    assert links["person_id"].null_count() == 0
    assert links["score"].null_count() == 0
    assert set(links["rule"].unique()) <= {
        "singleton",
        "probabilistic",
        "ssn+dob",
        "patient_ref",
    } | {r for r in links["rule"].unique() if r.startswith("identifier:")}
    prob = linked300.edges.filter(pl.col("rule") == "probabilistic")
    ev = json.loads(prob["evidence"][0])
    assert set(ev) == {
        "given",
        "family",
        "dob",
        "sex",
        "address",
        "city",
        "postcode",
        "phone",
        "email",
        "ssn",
    }
    assert {"level", "weight"} <= set(ev["dob"])
    lowest = prob["match_probability"].min()
    assert isinstance(lowest, float) and lowest >= linked300.threshold >= 0.9
    assert linked300.trained  # enough data to estimate lambda, u and m
    # the fitted model and the chosen threshold are kept
    params = dict(
        linked300.model.filter(pl.col("value").is_not_null()).select("parameter", "value").rows()
    )
    assert params["threshold"] == linked300.threshold and params["trained"] == 1.0
    levels = linked300.model.filter(pl.col("parameter") == "level")
    assert levels["m_probability"].null_count() == 0 and levels.height > 20


def test_person_ids_are_stable_and_derived_from_smallest_member(
    pop300: Population, linked300: identity.IdentityResult
) -> None:
    again = link_patients(_raw_from(pop300))
    assert again.links.sort("patient_key").equals(linked300.links.sort("patient_key"))
    for person_id, keys in (
        linked300.links.group_by("person_id").agg(pl.col("patient_key")).iter_rows()
    ):
        assert person_id == identity.person_id_for(min(keys))


def test_person_ids_survive_a_new_source(pop300: Population) -> None:
    """Adding an organization's patients keeps the ids of persons whose smallest key stays."""
    without = link_patients(_raw_from(pop300, ["mercy-general", "lakeside-clinic"]))
    with_more = link_patients(
        _raw_from(pop300, ["mercy-general", "lakeside-clinic", "valley-medical"])
    )
    before = dict(zip(without.links["patient_key"], without.links["person_id"], strict=True))
    after = dict(zip(with_more.links["patient_key"], with_more.links["person_id"], strict=True))
    kept = sum(before[k] == after[k] for k in before)
    assert kept / len(before) > 0.9


def _patient(key: str, **fields: object) -> dict[str, object]:
    row: dict[str, object] = {c: None for c in identity.RAW_COLUMNS}
    row.update(patient_key=key, source=key.split("/")[0], pattern="backend", identifiers=[])
    row.update(fields)
    return row


def _frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    schema = {c: pl.String for c in identity.RAW_COLUMNS} | {"identifiers": pl.List(pl.String)}
    return pl.DataFrame(rows, schema=schema)


def test_patient_ref_links_records_that_look_different() -> None:
    rows = [
        _patient(
            "a/Patient/1",
            given="Ann",
            family="Lee",
            birth_date="1970-01-02",
            connection="c1",
            pattern="patient_access",
        ),
        _patient(
            "b/Patient/9",
            given="Zoe",
            family="Park",
            birth_date="1981-05-06",
            connection="c2",
            pattern="patient_access",
        ),
        _patient("c/Patient/5", given="Max", family="Roe", birth_date="1990-01-01"),
    ]
    res = link_patients(_frame(rows), patient_refs={"c1": "user-7", "c2": "user-7"})
    persons = dict(zip(res.links["patient_key"], res.links["person_id"], strict=True))
    assert persons["a/Patient/1"] == persons["b/Patient/9"] != persons["c/Patient/5"]
    rules = dict(zip(res.links["patient_key"], res.links["rule"], strict=True))
    assert rules["b/Patient/9"] == "patient_ref"
    assert rules["c/Patient/5"] == "singleton"
    assert not res.trained  # three records: the documented priors are used as they are


def test_same_identifier_system_and_value_links() -> None:
    rows = [
        _patient("a/Patient/1", given="Ann", identifiers=["urn:oid:1.2.3|MRN1"]),
        _patient("b/Patient/2", given="Bea", identifiers=["urn:oid:1.2.3|MRN1"]),
        _patient("c/Patient/3", given="Cid", identifiers=["urn:oid:9.9.9|MRN1"]),  # other system
    ]
    res = link_patients(_frame(rows))
    persons = dict(zip(res.links["patient_key"], res.links["person_id"], strict=True))
    assert persons["a/Patient/1"] == persons["b/Patient/2"] != persons["c/Patient/3"]
    assert "identifier:urn:oid:1.2.3" in set(res.links["rule"])


def test_same_ssn_with_different_birth_dates_is_not_a_deterministic_link() -> None:
    rows = [
        _patient(
            "a/Patient/1", given="Ann", family="Lee", ssn="900-11-2222", birth_date="1970-01-02"
        ),
        _patient(
            "b/Patient/2", given="Tom", family="Ray", ssn="900112222", birth_date="1988-07-07"
        ),
    ]
    res = link_patients(_frame(rows))
    assert res.persons.height == 2


def test_twins_in_a_small_household_stay_apart() -> None:
    common = dict(
        family="Hall",
        birth_date="1984-02-27",
        address_line="443 Oak Ave",
        postal_code="97201",
        phone="971-555-0437",
    )
    rows = [
        _patient("a/Patient/1", given="Alexander", gender="male", **common),
        _patient("b/Patient/2", given="Alexandra", gender="female", **common),
        _patient("c/Patient/3", given="Alex", gender="male", **common),
        _patient("d/Patient/4", given="Alexander", gender="male", **common),
    ]
    res = link_patients(_frame(rows))
    persons = dict(zip(res.links["patient_key"], res.links["person_id"], strict=True))
    assert persons["a/Patient/1"] == persons["d/Patient/4"]
    assert persons["b/Patient/2"] != persons["a/Patient/1"]


def test_no_patients_gives_empty_tables() -> None:
    res = link_patients(_frame([]))
    assert res.links.height == 0 and res.persons.height == 0 and res.edges.height == 0


def test_patients_without_demographics_are_singletons() -> None:
    res = link_patients(_frame([_patient(f"a/Patient/{i}") for i in range(3)]))
    assert res.persons.height == 3


@pytest.mark.parametrize(
    ("pred", "truth", "precision", "recall"),
    [
        ({"a": "1", "b": "1", "c": "2"}, {"a": "x", "b": "x", "c": "y"}, 1.0, 1.0),
        ({"a": "1", "b": "1", "c": "1"}, {"a": "x", "b": "x", "c": "y"}, 1 / 3, 1.0),  # over-merge
        ({"a": "1", "b": "2", "c": "3"}, {"a": "x", "b": "x", "c": "x"}, 1.0, 0.0),  # all split
    ],
)
def test_pairwise_metrics(
    pred: dict[str, str], truth: dict[str, str], precision: float, recall: float
) -> None:
    m = pairwise_metrics(pred, truth)
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)


def test_connected_components_root_is_the_smallest_key() -> None:
    roots = connected_components(["d", "c", "b", "a", "e"], [("d", "c"), ("c", "a"), ("b", "b")])
    assert roots == {"a": "a", "c": "a", "d": "a", "b": "b", "e": "e"}


def test_counting_metrics_equal_listing_metrics(
    pop300: Population, linked300: identity.IdentityResult
) -> None:
    pred = dict(zip(linked300.links["patient_key"], linked300.links["person_id"], strict=True))
    truth = _truth(pop300)
    frame = pl.DataFrame({"pred": [pred[k] for k in truth], "truth": list(truth.values())})
    assert identity.pairwise_metrics_frame(frame) == pairwise_metrics(pred, truth)


def test_patient_ref_goes_only_to_the_connected_patient() -> None:
    """A portal may return more than one Patient (a dependant); only the one who authorized the
    connection (its source_patient_id) carries the tenant's patient reference."""
    rows = [
        _patient(
            "a/Patient/1", given="Ann", family="Lee", birth_date="1970-01-02", connection="c1"
        ),
        _patient(
            "a/Patient/2", given="Tim", family="Lee", birth_date="2012-03-04", connection="c1"
        ),
        _patient(
            "b/Patient/9", given="Zoe", family="Park", birth_date="1981-05-06", connection="c2"
        ),
    ]
    res = link_patients(
        _frame(rows),
        patient_refs={"c1": "user-7", "c2": "user-7"},
        connection_patients={"c1": "a/Patient/1", "c2": "b/Patient/9"},
    )
    persons = dict(zip(res.links["patient_key"], res.links["person_id"], strict=True))
    assert persons["a/Patient/1"] == persons["b/Patient/9"] != persons["a/Patient/2"]


def test_identity_step_reads_patient_refs_from_the_control_plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from medblocks_pipelines.lib.settings import get_settings
    from medblocks_pipelines.lib.warehouse.build import build_warehouse
    from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
    from medblocks_pipelines_tests.support.rows import connection_row
    from medblocks_pipelines_tests.warehouse.conftest import FakeControlPlane

    settings = get_settings(tmp_path_factory.mktemp("refs") / "data")
    settings.ensure_dirs()
    for source, pid, given, conn in (
        ("portal-a", "1", "Ann", "c1"),
        ("portal-b", "9", "Zoe", "c2"),
    ):
        prov = Provenance("acme", "patient_access", source, None, conn, "r1")
        with LakeWriter(settings.lake_root, prov) as w:
            w.add(json.dumps({"resourceType": "Patient", "id": pid, "name": [{"given": [given]}]}))
    cp = FakeControlPlane(
        [
            connection_row(
                id=c,
                tenant_id="acme",
                pattern="patient_access",
                patient_ref="user-7",
                source_id=s,
                source_patient_id=p,
            )
            for c, s, p in (("c1", "portal-a", "1"), ("c2", "portal-b", "9"))
        ]
    )
    res = build_warehouse("acme", settings=settings, control_plane=cp)
    with duckdb.connect(str(res.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM persons").fetchone() == (1,)
        rules = {r[0] for r in con.execute("SELECT rule FROM patient_links").fetchall()}
    assert rules == {"patient_ref"}


def test_failed_training_falls_back_to_the_priors(
    pop300: Population, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splink.internals.linker_components.training import LinkerTraining

    def boom(self: object, **kwargs: object) -> None:
        raise RuntimeError("no comparisons sampled")

    monkeypatch.setattr(LinkerTraining, "estimate_u_using_random_sampling", boom)
    res = link_patients(_raw_from(pop300))
    assert not res.trained
    pred = dict(zip(res.links["patient_key"], res.links["person_id"], strict=True))
    m = pairwise_metrics(pred, _truth(pop300))
    assert m["precision"] >= 0.99 and m["recall"] >= 0.95

"""Rows remember the purpose that let them in, and every consumer reads by the read policy.

A small tenant lands through LakeWriter: a backend EHR (mercy) and network rows of two exchange
purposes (``T-TREAT`` from net-treat, ``T-PYMNT`` from net-pay). Covers the policy loader and its
operator override, the columns in the warehouse (and old lake files without them), the CDS index
(treatment only), exports by declared purpose (payment never carries treatment rows), the analyst
connection (no network rows by default, no way around its views) and the audit rows of each read.
"""

import gzip
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from medblocks_pipelines.lib.cds.index import load_snapshot
from medblocks_pipelines.lib.errors import ConfigError, QueryRefused
from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.registry.rows import AuditEntry
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse import read_policy as rp
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines.lib.warehouse.sandboxed import execute_confined, open_confined

SCT = "http://snomed.info/sct"
# source -> (pattern, purpose, query id, condition code)
SOURCES = {
    "mercy": ("backend", None, None, "44054006"),  # diabetes, from the EHR
    "net-treat": ("network", "T-TREAT", "101", "38341003"),  # hypertension, for treatment
    "net-pay": ("network", "T-PYMNT", "102", "195967001"),  # asthma, for payment
}


def _resources(source: str, code: str) -> list[dict[str, Any]]:
    pid = f"{source}-p1"
    return [
        {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [{"system": f"urn:mrn:{source}", "value": "m1"}],
            "name": [{"family": "Rivera", "given": ["Ana"]}],
            "birthDate": "1970-01-02",
            "gender": "female",
        },
        {
            "resourceType": "Condition",
            "id": f"{source}-c1",
            "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [{"system": SCT, "code": code}]},
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "onsetDateTime": "2024-01-01",
        },
    ]


@pytest.fixture
def cp(settings: Settings) -> ControlPlane:
    plane = open_control_plane(settings)
    plane.add_tenant("acme", "Acme Health Apps")
    return plane


@pytest.fixture
def tenant(cp: ControlPlane, settings: Settings) -> Settings:
    """The tenant's lake (three sources, two network purposes) and its built warehouse."""
    for source, (pattern, purpose, qid, code) in SOURCES.items():
        prov = Provenance("acme", pattern, source, source, None, f"run-{source}", purpose, qid)
        with LakeWriter(settings.lake_root, prov) as w:
            for r in _resources(source, code):
                w.add(json.dumps(r))
    build_warehouse("acme", settings=settings, control_plane=cp)
    return settings


def _audits(cp: ControlPlane, action: str) -> list[AuditEntry]:
    return [a for a in cp.list_audit(tenant_id="acme") if a.action == action]


# -- the policy ------------------------------------------------------------------------------


def test_shipped_policy_is_conservative() -> None:
    policy = rp.load_read_policy()
    assert policy.origin == "shipped" and policy.version == "1"
    assert policy.rule("cds").network_purposes == {"T-TREAT", "T-TRTMNT"}
    assert policy.rule("analyst").network_purposes == frozenset()
    # an export for payment or operations never takes treatment rows
    for declared in ("T-PYMNT", "T-HCO", "T-HCO-QAI"):
        assert not policy.rule("export", declared).network_purposes & {"T-TREAT", "T-TRTMNT"}
    assert policy.rule("export", None).network_purposes == frozenset()
    with pytest.raises(ConfigError):
        policy.rule("export", "T-NOPE")
    with pytest.raises(ConfigError):
        policy.rule("billing")


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ({"cds": {"network_purposes": ["T-TREATMENT"]}}, "unknown code"),  # not an XP code
        ({"analyst": {"patterns": ["network"]}}, "unknown code"),  # network is by purpose only
        ({"export": {"by_declared_purpose": {"X-1": []}}}, "unknown"),  # unknown declaration
    ],
)
def test_invalid_policies_are_refused(patch: dict[str, Any], error: str) -> None:
    from importlib import resources

    import yaml

    doc = yaml.safe_load(
        resources.files("medblocks_pipelines.lib.warehouse")
        .joinpath("read-policy-v1.yaml")
        .read_text()
    )
    for consumer, fields in patch.items():
        doc["consumers"][consumer].update(fields)
    with pytest.raises(ConfigError, match=error):
        rp.parse_read_policy(doc)


def test_rule_allows_by_pattern_purpose_and_query() -> None:
    rule = rp.load_read_policy().rule("cds")
    assert rule.allows("backend", None, None)
    assert rule.allows("network", "T-TREAT", "7")
    assert not rule.allows("network", "T-TREAT", None)  # no query: cannot be traced
    assert not rule.allows("network", "T-PYMNT", "7")
    assert not rule.allows("network", None, None)


# -- the warehouse ---------------------------------------------------------------------------


def test_network_rows_carry_purpose_and_query(tenant: Settings) -> None:
    con = open_warehouse("acme", settings=tenant)
    try:
        for table in ("resources", "resource_versions", "fact_sources", "condition"):
            rows = con.execute(
                f"SELECT source, pattern, permitted_purpose, network_query_id FROM {table} "
                "GROUP BY ALL ORDER BY ALL"
            ).fetchall()
            assert rows == [
                ("mercy", "backend", None, None),
                ("net-pay", "network", "T-PYMNT", "102"),
                ("net-treat", "network", "T-TREAT", "101"),
            ], table
        sightings = con.execute(
            "SELECT DISTINCT pattern, permitted_purpose FROM resource_sightings ORDER BY ALL"
        ).fetchall()
        assert sightings == [("backend", None), ("network", "T-PYMNT"), ("network", "T-TREAT")]
        purposes = con.execute(
            "SELECT DISTINCT permitted_purposes FROM facts ORDER BY ALL"
        ).fetchall()
        assert purposes == [([],), (["T-PYMNT"],), (["T-TREAT"],)]
    finally:
        con.close()


def test_old_lake_files_without_the_columns_still_build(
    cp: ControlPlane, settings: Settings
) -> None:
    """A lake file written before the purpose columns existed compacts and builds, with nulls."""
    from medblocks_pipelines.lib.warehouse.compaction import compact_tenant

    for run in ("old", "new"):
        prov = Provenance("acme", "backend", "mercy", "mercy", None, f"run-{run}")
        with LakeWriter(settings.lake_root, prov) as w:
            w.add(json.dumps({"resourceType": "Patient", "id": f"{run}-p1"}))
    (old,) = [f for f in (settings.lake_root / "resources").rglob("run-old-*.parquet")]
    table = pq.read_table(old).drop_columns(["permitted_purpose", "network_query_id"])
    pq.write_table(table, old)
    assert "permitted_purpose" not in pq.read_schema(old).names
    stats = compact_tenant(settings.lake, "acme", min_files=2)
    assert stats.files_in == 2 and stats.rows == 2
    result = build_warehouse("acme", settings=settings, control_plane=cp)
    con = duckdb.connect(str(result.path), read_only=True)
    try:
        assert con.execute(
            "SELECT count(*), count(permitted_purpose), count(network_query_id) FROM resources"
        ).fetchone() == (2, 0, 0)
    finally:
        con.close()
    # and without compaction: only old files in the lake
    for f in (settings.lake_root / "resources").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["permitted_purpose", "network_query_id"]), f)
    result = build_warehouse(
        "acme", settings=settings, control_plane=cp, options={"compact": False}
    )
    con = duckdb.connect(str(result.path), read_only=True)
    try:
        assert con.execute(
            "SELECT count(*), count(permitted_purpose) FROM resources"
        ).fetchone() == (
            2,
            0,
        )
    finally:
        con.close()


# -- consumers -------------------------------------------------------------------------------


def test_cds_index_serves_treatment_rows_only(tenant: Settings, cp: ControlPlane) -> None:
    from medblocks_pipelines.lib.cds.index import WarehouseIndexes
    from medblocks_pipelines.lib.warehouse.build import warehouse_path

    snap = load_snapshot(warehouse_path(tenant, "acme"))
    codes = {f["code"] for f in snap.facts.to_dicts()}
    assert {"44054006", "38341003"} <= codes  # the EHR's and the treatment query's
    assert "195967001" not in codes  # obtained for payment: never on a card
    assert all("net-pay" not in (f["sources"] or []) for f in snap.facts.to_dicts())
    # a person is not found by an identifier only a payment-purpose document revealed
    assert {"urn:mrn:mercy|m1", "urn:mrn:net-treat|m1"} <= set(snap.identifier_person)
    assert "urn:mrn:net-pay|m1" not in snap.identifier_person
    assert snap.read is not None
    assert snap.read.included == {"T-TREAT": 1} and snap.read.excluded == {"T-PYMNT": 1}
    # The CDS service's hook writes one audit row per index load.
    from medblocks_pipelines.lib.cds.service import CdsService

    service = CdsService(
        cp,
        public_base_url="http://127.0.0.1:1",
        warehouse_path_of=lambda t: warehouse_path(tenant, t),
    )
    assert isinstance(service.indexes, WarehouseIndexes)
    assert service.indexes.for_tenant("acme").current() is not None
    (row,) = _audits(cp, "read.cds")
    assert row.actor == "cds-index" and row.purpose == "T-TREAT"
    assert row.evidence["included_by_purpose"] == {"T-TREAT": 1}
    assert row.evidence["excluded_by_purpose"] == {"T-PYMNT": 1}
    assert row.reason == "network_rows_withheld" and row.person_id is None


def _exported(out: Path, dest: str) -> set[str]:
    ids = set()
    for f in (out / "acme" / dest / "000001").glob("*.ndjson.gz"):
        for line in gzip.decompress(f.read_bytes()).decode().splitlines():
            ids.add(json.loads(line)["id"])
    return ids


@pytest.mark.parametrize(
    ("purpose", "network_sources"),
    [
        ("T-PYMNT", {"net-pay"}),  # payment: never the treatment rows
        ("T-TREAT", {"net-treat"}),  # treatment: never the payment rows
        ("T-HCO", set()),  # operations: neither
        (None, set()),  # no declared purpose: no network row at all
    ],
)
def test_export_carries_only_its_declared_purpose(
    tenant: Settings, cp: ControlPlane, tmp_path: Path, purpose: str | None, network_sources: set
) -> None:
    out = tmp_path / "out"
    config = {"purpose": purpose} if purpose else {}
    ex.add_destination(cp, id="dest", tenant_id="acme", kind="ndjson", url=str(out), config=config)
    ex.run_export(cp, tenant, "dest")
    want = {f"{s}-{x}" for s in {"mercy", *network_sources} for x in ("p1", "c1")}
    assert _exported(out, "dest") == want
    (row,) = _audits(cp, "read.export")
    assert row.actor == "export:dest" and row.purpose == purpose
    ev = row.evidence
    assert sum(ev["included_by_purpose"].values()) == 2 * len(network_sources)
    assert sum(ev["excluded_by_purpose"].values()) == 4 - 2 * len(network_sources)
    if purpose == "T-PYMNT":
        assert "T-TREAT" not in ev["included_by_purpose"]


def test_export_with_unknown_purpose_is_refused(tenant: Settings, cp: ControlPlane) -> None:
    with pytest.raises(ConfigError):
        ex.add_destination(
            cp, id="d", tenant_id="acme", kind="ndjson", url="/tmp/x", config={"purpose": "T-X"}
        )


def test_analyst_sees_no_network_rows_by_default(tenant: Settings, cp: ControlPlane) -> None:
    con = open_confined("acme", settings=tenant, control_plane=cp)
    try:

        def q(sql: str) -> list[Any]:
            return execute_confined(con, sql).fetchall()

        assert q("SELECT DISTINCT source FROM resources ORDER BY 1") == [("mercy",)]
        assert q("SELECT DISTINCT source FROM condition ORDER BY 1") == [("mercy",)]
        assert q("SELECT count(*) FROM resource_sightings WHERE pattern = 'network'") == [(0,)]
        assert q("SELECT DISTINCT code FROM facts_conditions") == [("44054006",)]
        assert q("SELECT network_rows_shown, network_rows_withheld FROM read_policy_info") == [
            (0, 4)
        ]
        # no way around the views: the catalog, the schema, query()
        for sql in (
            "SELECT count(*) FROM acme.main.resources",
            "SELECT count(*) FROM acme.resources",
            'SELECT count(*) FROM "ACME"."main"."resources"',
            "SELECT count(*) FROM main.resources",
            "SELECT * FROM query_table('acme.main.resources')",
            "SELECT * FROM query('SELECT * FROM acme.main.resources')",
            "CREATE TEMP VIEW r2 AS SELECT * FROM acme.main.resources",
        ):
            with pytest.raises(QueryRefused):
                execute_confined(con, sql)
        q("CREATE TEMP TABLE scratch AS SELECT * FROM resources")  # scratch work still works
        assert q("SELECT count(*) FROM temp.scratch") == [(2,)]
    finally:
        con.close()
    (row,) = _audits(cp, "read.analyst")
    assert row.purpose is None and row.evidence["excluded_by_purpose"] == {
        "T-PYMNT": 2,
        "T-TREAT": 2,
    }


def test_operator_override_lets_analysts_see_a_purpose(
    tenant: Settings, cp: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import resources

    import yaml

    doc = yaml.safe_load(
        resources.files("medblocks_pipelines.lib.warehouse")
        .joinpath("read-policy-v1.yaml")
        .read_text()
    )
    doc["consumers"]["analyst"]["network_purposes"] = ["T-PYMNT"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv(rp.ENV_VAR, str(path))
    con = open_confined("acme", settings=tenant, control_plane=cp)
    try:
        rows = execute_confined(con, "SELECT DISTINCT source FROM resources ORDER BY 1").fetchall()
    finally:
        con.close()
    assert rows == [("mercy",), ("net-pay",)]
    (row,) = _audits(cp, "read.analyst")
    assert row.evidence["policy_origin"] == "override"
    assert row.evidence["included_by_purpose"] == {"T-PYMNT": 2}


def test_network_rows_cannot_land_without_purpose_and_query(settings: Settings) -> None:
    from medblocks_pipelines.lib.errors import LandingError

    for purpose, qid in ((None, "1"), ("T-TREAT", None), (None, None)):
        prov = Provenance("acme", "network", "net", "org", None, "r1", purpose, qid)
        with pytest.raises(LandingError):
            LakeWriter(settings.lake_root, prov)
    # the other patterns carry their relationship in `pattern`
    LakeWriter(settings.lake_root, Provenance("acme", "backend", "s", "o", None, "r1")).close()

"""End to end over real sockets: a treatment query's rows keep their purpose from the lake to the
consumers. The sandbox gateway answers a T-TREAT query; the warehouse's network rows name the
purpose and the audited query; the CDS index serves them; an export declared for payment carries
none of them, one declared for treatment does; each read leaves an audit row."""

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from medblocks_pipelines.lib.cds.index import load_snapshot
from medblocks_pipelines.lib.network.tables import network_queries
from medblocks_pipelines.lib.ops import exports as ex
from medblocks_pipelines.lib.warehouse import quality
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse
from medblocks_pipelines_tests.network.test_query import Env


@pytest.fixture
def env(
    tmp_path: Any, population: Any, signing_identity: tuple[bytes, bytes], gateway_server: Any
) -> Any:
    return Env(tmp_path, population, signing_identity, gateway_server)


def _exported(out: Path, dest: str) -> int:
    """How many resources the first export of ``dest`` wrote."""
    return sum(
        1
        for f in (out / "acme" / dest / "000001").glob("*.ndjson.gz")
        for line in gzip.decompress(f.read_bytes()).decode().splitlines()
        if json.loads(line)
    )


def test_treatment_rows_reach_cds_and_treatment_exports_only(env: Any, tmp_path: Path) -> None:
    env.start()
    env.launch()
    result = env.query("T-TREAT")
    assert result.allowed and result.documents_retrieved >= 1, result
    built = build_warehouse("acme", settings=env.settings, control_plane=env.cp)
    con = open_warehouse("acme", settings=env.settings)
    try:
        rows = con.execute(
            "SELECT permitted_purpose, network_query_id, count(*) FROM resources "
            "WHERE pattern = 'network' GROUP BY ALL"
        ).fetchall()
        facts = con.execute(
            "SELECT count(*) FROM fact_sources WHERE pattern = 'network' "
            "AND permitted_purpose = 'T-TREAT'"
        ).fetchone()
        check = quality.check_network_purpose(con)
    finally:
        con.close()
    (purpose, query_id, n_network), *rest = rows
    assert not rest and purpose == "T-TREAT" and query_id == str(result.query_id)
    assert n_network > 0 and facts is not None and facts[0] > 0
    assert check.passed
    # The query id is the audited query's.
    with env.cp.engine.connect() as c:
        q = c.execute(sa.select(network_queries).where(network_queries.c.id == result.query_id))
        assert q.one().audit_id == result.audit_id

    snap = load_snapshot(built.path)
    assert snap.read is not None and snap.read.included.get("T-TREAT", 0) > 0
    assert not snap.read.excluded
    assert any("network" in (f["patterns"] or []) for f in snap.facts.to_dicts())

    out = tmp_path / "out"
    for dest, purpose in (("payer", "T-PYMNT"), ("care", "T-TREAT")):
        ex.add_destination(
            env.cp,
            id=dest,
            tenant_id="acme",
            kind="ndjson",
            url=str(out),
            config={"purpose": purpose},
        )
        ex.run_export(env.cp, env.settings, dest)
    assert _exported(out, "payer") == 0  # only network rows here, all for treatment
    assert _exported(out, "care") == n_network
    audits = {a.actor: a for a in env.cp.list_audit(tenant_id="acme") if a.action == "read.export"}
    assert audits["export:payer"].evidence["excluded_by_purpose"] == {"T-TREAT": n_network}
    assert audits["export:payer"].evidence["included_by_purpose"] == {}
    assert audits["export:care"].evidence["included_by_purpose"] == {"T-TREAT": n_network}

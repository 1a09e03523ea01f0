"""The landing lake and the per-tenant warehouse: quarantine with reasons, both landing paths,
idempotent re-runs, a run killed mid-write, tombstones, and atomic publish under a reader."""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse, open_warehouse, warehouse_path
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance


def _obs(i: int, version: int = 1, value: str = "7.10") -> str:
    # Raw text: the decimal's trailing zero must survive landing.
    return (
        '{"resourceType":"Observation","id":"o%d","meta":{"versionId":"%d",'
        '"lastUpdated":"2026-01-0%dT00:00:00Z"},"status":"final","code":{"text":"pulse"},'
        '"valueQuantity":{"value":%s,"unit":"%%"}}' % (i, version, version, value)
    )


def _write_ndjson(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        path = path.with_suffix(path.suffix + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _prov(run: str, pattern: str = "backend", connection: str | None = None) -> Provenance:
    return Provenance("acme", pattern, "mercy-ehr", "mercy", connection, run)


def _snapshot(settings: Settings) -> dict[str, list[tuple]]:
    with open_warehouse("acme", settings=settings) as con:
        return {
            "resources": con.execute(
                "SELECT resource_key, version_id, content_hash, resource, fetched_at, run_id "
                "FROM resources ORDER BY resource_key"
            ).fetchall(),
            "versions": con.execute(
                "SELECT resource_key, content_hash FROM resource_versions ORDER BY ALL"
            ).fetchall(),
            "quarantine": con.execute(
                "SELECT source, origin, reason FROM quarantine ORDER BY ALL"
            ).fetchall(),
        }


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ('{"id":"x1"}', "missing resourceType"),
    ('{"resourceType":"Patient"}', "missing id"),
    ('{"resourceType":"Patient","id":""}', "missing id"),
    ('{"resourceType":"Patient","id":7}', "missing id"),
    ("[1,2,3]", "not a JSON object"),
    ('{"resourceType":"Observation","id":"trunc","valueQuantity":{"val', "malformed JSON"),
]


@pytest.mark.parametrize("gz", [False, True])
def test_bad_lines_quarantined_good_lines_kept(
    settings: Settings, tmp_path: Path, gz: bool
) -> None:
    lines = [_obs(i) for i in range(5)] + [b for b, _ in BAD_LINES]
    f = _write_ndjson(tmp_path / "Observation.ndjson", lines, gz=gz)
    with LakeWriter(settings.lake_root, _prov("r1")) as w:
        w.add_ndjson_file(f)
    assert w.stats.counts_by_type == {"Observation": 5}
    assert w.stats.quarantined == len(BAD_LINES)
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        reasons = sorted(
            r[0].split(":")[0] for r in con.execute("SELECT reason FROM quarantine").fetchall()
        )
        raws = {r[0] for r in con.execute("SELECT raw FROM quarantine").fetchall()}
        kept = con.execute("SELECT resource FROM resources WHERE resource_id = 'o1'").fetchone()
    assert reasons == sorted(r for _, r in BAD_LINES)
    assert {b for b, _ in BAD_LINES} <= raws  # the raw bytes are kept for diagnosis
    assert kept is not None and '"value":7.10' in kept[0]


def test_fast_and_slow_paths_land_the_same_rows(settings: Settings, tmp_path: Path) -> None:
    lines = [_obs(i, value="1.000") for i in range(20)] + ['{"id":"x1"}']
    f = _write_ndjson(tmp_path / "a.ndjson", lines)
    with LakeWriter(settings.lake_root, _prov("fast")) as w:
        w.add_ndjson_file(f)
    with LakeWriter(
        settings.lake_root, Provenance("acme", "backend", "other-src", None, None, "slow")
    ) as w2:
        for line in lines:
            w2.add(line)
    assert w.stats.counts_by_type == w2.stats.counts_by_type
    assert w.stats.quarantined == w2.stats.quarantined == 1
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        rows = con.execute(
            "SELECT source, resource_id, content_hash, resource FROM resources ORDER BY ALL"
        ).fetchall()
    fast = [r[1:] for r in rows if r[0] == "mercy-ehr"]
    slow = [r[1:] for r in rows if r[0] == "other-src"]
    assert fast == slow and len(fast) == 20


def test_rerunning_a_partition_gives_the_same_warehouse(settings: Settings, tmp_path: Path) -> None:
    f = _write_ndjson(tmp_path / "o.ndjson", [_obs(i) for i in range(50)] + ["{bad"])
    with LakeWriter(settings.lake_root, _prov("run-a")) as w:
        w.add_ndjson_file(f)
    build_warehouse("acme", settings=settings, steps=[])
    first = _snapshot(settings)
    with LakeWriter(settings.lake_root, _prov("run-b")) as w:
        w.add_ndjson_file(f)
    build_warehouse("acme", settings=settings, steps=[])
    assert _snapshot(settings) == first
    assert len(first["resources"]) == 50 and len(first["quarantine"]) == 1


def test_conflicting_versions_across_runs_are_flagged(settings: Settings) -> None:
    """Same versionId, other content, in two runs: flagged in version_conflicts, and the
    warehouse is the same whichever order the build reads the files in (re-run: same answer)."""
    with LakeWriter(settings.lake_root, _prov("r1")) as w:
        w.add(_obs(0, version=1))
        w.add(_obs(1, version=1))
    with LakeWriter(settings.lake_root, _prov("r2")) as w:
        w.add(_obs(0, version=1, value="9.5"))  # conflicts with r1's o0
        w.add(_obs(1, version=1))  # the same content again: no conflict
    build_warehouse("acme", settings=settings, steps=[])
    first = _snapshot(settings)
    with open_warehouse("acme", settings=settings) as con:
        conflicts = con.execute(
            "SELECT resource_id, version_id, contents, len(origins) FROM version_conflicts"
        ).fetchall()
        value = con.execute(
            "SELECT resource ->> '$.valueQuantity.value' FROM resources WHERE resource_id = 'o0'"
        ).fetchall()
    assert conflicts == [("o0", "1", 2, 2)]
    assert value == [("9.5",)]  # the latest fetch, deterministically
    build_warehouse("acme", settings=settings, steps=[])
    assert _snapshot(settings) == first


def test_versions_and_tombstones(settings: Settings) -> None:
    with LakeWriter(settings.lake_root, _prov("r1")) as w:
        for i in range(3):
            w.add(_obs(i, version=1))
    with LakeWriter(settings.lake_root, _prov("r2")) as w:
        w.add(_obs(0, version=2, value="8.25"))
        w.add_tombstone("Observation", "o1", deleted_at="2026-01-05T00:00:00Z")
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        latest = dict(con.execute("SELECT resource_id, version_id FROM resources").fetchall())
        n_versions = con.execute("SELECT count(*) FROM resource_versions").fetchone()[0]
    assert latest == {"o0": "2", "o2": "1"}
    assert n_versions == 4
    # A stale re-fetch of the deleted version (older lastUpdated) does not resurrect it.
    with LakeWriter(settings.lake_root, _prov("r3")) as w:
        w.add(_obs(1, version=1))
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        assert (
            con.execute("SELECT count(*) FROM resources WHERE resource_id='o1'").fetchone()[0] == 0
        )


def test_tenants_are_isolated(settings: Settings) -> None:
    with LakeWriter(settings.lake_root, _prov("r1")) as w:
        w.add(_obs(1))
    with LakeWriter(
        settings.lake_root, Provenance("globex", "backend", "s", None, None, "r1")
    ) as w:
        w.add(_obs(2))
    build_warehouse("acme", settings=settings, steps=[])
    build_warehouse("globex", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        assert con.execute("SELECT list(resource_id) FROM resources").fetchone()[0] == ["o1"]
    with open_warehouse("globex", settings=settings) as con:
        assert con.execute("SELECT list(tenant) FROM resources").fetchone()[0] == ["globex"]


N_KILLED = 300_000
KILL_SCRIPT = """
import sys, time
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
root, n = sys.argv[1], int(sys.argv[2])
w = LakeWriter(root, Provenance("acme", "backend", "mercy-ehr", "mercy", None, "doomed"), batch_rows=100)
for i in range(n):
    w.add('{"resourceType":"Patient","id":"o%d","meta":{"versionId":"1"}}' % i)
    if i == 1000:
        print("flushing", flush=True)
w.close()
"""


def test_run_killed_mid_write_then_rerun(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL a writer mid-run; the lake keeps only whole files and a rerun completes the set."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(settings.lake_root), str(N_KILLED)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "flushing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    files = list(settings.lake_root.rglob("*.parquet"))
    assert files, "the killed run flushed some whole files"
    with duckdb.connect() as con:  # every published file is readable: no partial Parquet
        landed = sum(
            con.execute(f"SELECT count(*) FROM read_parquet('{f}')").fetchall()[0][0] for f in files
        )
    assert 0 < landed < N_KILLED, "the run was killed mid-write"
    build_warehouse("acme", settings=settings, steps=[])  # a build over the partial run works

    # The rerun lands the whole set again; the warehouse holds each record exactly once.
    with LakeWriter(settings.lake_root, _prov("rerun"), batch_rows=20000) as w:
        for i in range(N_KILLED):
            w.add('{"resourceType":"Patient","id":"o%d","meta":{"versionId":"1"}}' % i)
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        n, distinct = con.execute(
            "SELECT count(*), count(DISTINCT resource_id) FROM resources"
        ).fetchone()
    assert n == distinct == N_KILLED


def test_publish_is_atomic_for_open_readers(settings: Settings) -> None:
    with LakeWriter(settings.lake_root, _prov("r1")) as w:
        w.add(_obs(1))
    build_warehouse("acme", settings=settings, steps=[])
    reader = open_warehouse("acme", settings=settings)
    with LakeWriter(settings.lake_root, _prov("r2")) as w:
        w.add(_obs(2))
    build_warehouse("acme", settings=settings, steps=[])
    # The old reader still sees its complete snapshot; a new reader sees the new one.
    assert reader.execute("SELECT count(*) FROM resources").fetchone()[0] == 1
    reader.close()
    with open_warehouse("acme", settings=settings) as con:
        assert con.execute("SELECT count(*) FROM resources").fetchone()[0] == 2
    leftovers = [p.name for p in settings.warehouse_dir.iterdir() if "building" in p.name]
    assert leftovers == []
    assert warehouse_path(settings, "acme").exists()


def test_empty_lake_builds_empty_tables(settings: Settings) -> None:
    result = build_warehouse("acme", settings=settings, steps=[])
    assert result.table_counts["resources"] == 0
    assert result.table_counts["quarantine"] == 0


def test_missing_warehouse_is_a_clear_error(settings: Settings) -> None:
    from medblocks_pipelines.lib.errors import WarehouseError

    with pytest.raises(WarehouseError, match="no warehouse for tenant nobody"):
        open_warehouse("nobody", settings=settings)


def test_sightings_keep_every_relationship_that_delivered_a_resource(settings: Settings) -> None:
    """The same EHR record via a backend export and a patient's connection: one current row,
    two sightings with their own provenance."""
    with LakeWriter(settings.lake_root, _prov("bulk-1")) as w:
        w.add(_obs(1))
        w.add(_obs(2))
    with LakeWriter(settings.lake_root, _prov("pull-1", "patient_access", "conn-9")) as w:
        w.add(_obs(1))
    build_warehouse("acme", settings=settings, steps=[])
    with open_warehouse("acme", settings=settings) as con:
        assert con.execute("SELECT count(*) FROM resources").fetchone()[0] == 2
        rows = con.execute(
            "SELECT resource_key, pattern, connection FROM resource_sightings ORDER BY ALL"
        ).fetchall()
    assert rows == [
        ("mercy-ehr/Observation/o1", "backend", None),
        ("mercy-ehr/Observation/o1", "patient_access", "conn-9"),
        ("mercy-ehr/Observation/o2", "backend", None),
    ]

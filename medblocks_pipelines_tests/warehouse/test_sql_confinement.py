"""Analyst SQL stays inside its tenant's warehouse, on every surface that runs user SQL.

Two tenants land real records into one lake and each gets a real published DuckDB warehouse. From
tenant ``acme``'s prompt every escape an attacker tried is refused with one line and exit code 1:
reading the other tenant's lake files, attaching its warehouse, reading host files and the vault's
key, writing files, extensions, changing settings, a second statement. Ordinary analyst SQL (views,
macros, temp tables, SQL files that start with a comment) keeps working. The ViewDefinition test
runner runs suite files (user input) on the same confinement.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.errors import QueryFailed, QueryRefused
from medblocks_pipelines.lib.settings import Settings, get_settings
from medblocks_pipelines.lib.warehouse.build import build_warehouse, warehouse_path
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance
from medblocks_pipelines.lib.warehouse.queries import QUERIES_DIR
from medblocks_pipelines.lib.warehouse.sandboxed import check_sql, open_confined, run_confined
from medblocks_pipelines.lib.warehouse.views import run_test_suite
from medblocks_pipelines_tests.warehouse.conftest import FakeControlPlane

RIVAL_NAME = "Rivalfamily"  # only in tenant rival's records
KEY_TEXT = "vault-master-key-do-not-leak"


def _patient(pid: str, family: str) -> str:
    return json.dumps(
        {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"versionId": "1", "lastUpdated": "2026-01-02T00:00:00Z"},
            "name": [{"family": family, "given": ["Pat"]}],
            "gender": "female",
            "birthDate": "1970-01-01",
        }
    )


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Tenants acme and rival, each with landed Patients and a published warehouse."""
    settings = get_settings(tmp_path_factory.mktemp("confine") / "data")
    settings.ensure_dirs()
    for tenant, family in (("acme", "Acmefamily"), ("rival", RIVAL_NAME)):
        prov = Provenance(tenant, "backend", "mercy-ehr", "mercy", None, f"run-{tenant}")
        with LakeWriter(settings.lake_root, prov) as w:
            for i in range(3):
                w.add(_patient(f"{tenant}-p{i}", family))
        build_warehouse(tenant, settings=settings, control_plane=FakeControlPlane())
    (settings.data_dir / "secret.key").write_text(KEY_TEXT)
    return settings


@pytest.fixture
def env(two_tenants: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The CLI's environment pointed at the two-tenant data folder."""
    for var in ("MEDBLOCKS_DATABASE_URL", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(two_tenants.data_dir))
    yield two_tenants


def _rival_lake_file(settings: Settings) -> Path:
    files = sorted(settings.lake_root.rglob("*.parquet"))
    rival = [f for f in files if "rival" in str(f.relative_to(settings.lake_root))]
    assert rival, files
    return rival[0]


def _escapes(settings: Settings, out_file: Path) -> list[tuple[str, str]]:
    """(name, SQL run from acme's prompt); each must be refused."""
    rival_wh = warehouse_path(settings, "rival")
    lake_file = _rival_lake_file(settings)
    key = settings.data_dir / "secret.key"
    return [
        ("read_parquet of rival's lake", f"SELECT * FROM read_parquet('{lake_file}')"),
        ("replacement scan of rival's lake", f"SELECT * FROM '{lake_file}'"),
        ("glob of the lake", f"SELECT * FROM glob('{settings.lake_root}/**')"),
        ("ATTACH rival's warehouse", f"ATTACH '{rival_wh}' AS r (READ_ONLY)"),
        ("host file", "SELECT * FROM read_csv('/etc/passwd')"),
        ("vault key", f"SELECT * FROM read_text('{key}')"),
        ("vault key as blob", f"SELECT * FROM read_blob('{key}')"),
        ("COPY TO", f"COPY (SELECT * FROM resources) TO '{out_file}'"),
        ("EXPORT DATABASE", f"EXPORT DATABASE '{out_file.parent / 'dump'}'"),
        ("INSTALL", "INSTALL sqlite"),
        ("LOAD", "LOAD sqlite"),
        ("SET external access", "SET enable_external_access = true"),
        ("RESET", "RESET enable_external_access"),
        ("PRAGMA", "PRAGMA enable_external_access = true"),
        ("a second statement", f"SELECT 1; COPY (SELECT 1) TO '{out_file}'"),
        ("a second statement attaching", f"SELECT 1;\nATTACH '{rival_wh}' AS r"),
        ("write to the warehouse", "CREATE TABLE stolen AS SELECT 1 AS x"),
        ("DELETE", "DELETE FROM resources"),
        ("remote URL", "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')"),
    ]


def test_each_escape_is_refused_in_lib(env: Settings, tmp_path: Path) -> None:
    out_file = tmp_path / "out.csv"
    for name, sql in _escapes(env, out_file):
        with pytest.raises(QueryRefused) as info:
            run_confined("acme", sql, settings=env)
        msg = str(info.value)
        assert msg.startswith("refused") and "\n" not in msg, (name, msg)
        assert KEY_TEXT not in msg and RIVAL_NAME not in msg, name
    assert not out_file.exists() and not (tmp_path / "dump").exists()


def test_each_escape_is_refused_by_the_cli_in_one_line(env: Settings, tmp_path: Path) -> None:
    out_file = tmp_path / "out.csv"
    for name, sql in _escapes(env, out_file):
        result = CliRunner().invoke(main, ["warehouse", "query", "--tenant", "acme", sql])
        assert result.exit_code == 1, (name, result.output)
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("error: refused"), (name, lines)
        assert len(lines) <= 2 and "Traceback" not in result.output, (name, result.output)
        assert KEY_TEXT not in result.output and RIVAL_NAME not in result.output, name
    assert not out_file.exists()


def test_duckdb_alone_blocks_each_escape(env: Settings, tmp_path: Path) -> None:
    """Defence in depth: with the statement check skipped, DuckDB's own settings still refuse."""
    out_file = tmp_path / "out.csv"
    for name, sql in _escapes(env, out_file):
        con = open_confined("acme", settings=env)
        try:
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
        except BaseException as exc:
            raise AssertionError(name) from exc
        finally:
            con.close()
    assert not out_file.exists()


def test_extensions_are_neither_downloaded_nor_autoloaded(env: Settings) -> None:
    # sqlite_scan lives in an extension DuckDB would fetch from the internet; it stays unknown.
    with pytest.raises((QueryRefused, QueryFailed)) as info:
        run_confined("acme", "SELECT * FROM sqlite_scan('x.db', 't')", settings=env)
    assert "sqlite_scan" in str(info.value)
    con = open_confined("acme", settings=env)
    try:
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN ("
                "'enable_external_access', 'autoinstall_known_extensions', "
                "'autoload_known_extensions', 'allow_community_extensions', "
                "'lock_configuration', 'python_enable_replacements')"
            ).fetchall()
        )
    finally:
        con.close()
    assert settings == {
        "enable_external_access": "false",
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "allow_community_extensions": "false",
        "lock_configuration": "true",
        "python_enable_replacements": "false",
    }


def test_python_variables_are_not_tables(env: Settings) -> None:
    """DuckDB's Python replacement scan would read a caller's DataFrame by name; not here."""
    import pyarrow as pa

    leaked_table = pa.table({"k": [KEY_TEXT]})  # noqa: F841 (what a replacement scan would read)
    with pytest.raises(QueryFailed):
        run_confined("acme", "SELECT * FROM leaked_table", settings=env)


def test_analyst_sql_stays_usable(env: Settings) -> None:
    res = run_confined(
        "acme",
        "SELECT count(*) AS n, min(resource_id) AS first FROM resources",
        settings=env,
    )
    assert res.rows == [(3, "acme-p0")]
    # A script: a temp table and a temp macro, then a query over them (and a warehouse view).
    res = run_confined(
        "acme",
        "-- scratch work\n"
        "CREATE TEMP TABLE ids AS SELECT resource_id FROM resources;\n"
        "CREATE TEMP MACRO twice(x) AS x * 2;\n"
        "SELECT twice(count(*)) FROM ids",
        settings=env,
    )
    assert res.rows == [(6,)]
    assert run_confined("acme", "DESCRIBE resources", settings=env).rows
    # The warehouse's own views (facts_* over the unified record) resolve in the attached file.
    # (the temp views of the same names are the read policy's analyst views over them)
    views = run_confined(
        "acme",
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND NOT temporary ORDER BY 1",
        settings=env,
    ).rows
    assert views and all(v[0].startswith("facts_") for v in views), views
    shadowed = run_confined(
        "acme",
        "SELECT view_name FROM duckdb_views() WHERE temporary ORDER BY 1",
        settings=env,
    ).rows
    assert {"resources", "facts", "read_policy_info"} <= {v[0] for v in shadowed}
    for (view,) in views:
        assert run_confined("acme", f'SELECT count(*) FROM "{view}"', settings=env).rows
    assert run_confined("acme", "EXPLAIN SELECT 1", settings=env).rows
    # The tenant's own data only.
    res = run_confined("rival", "SELECT DISTINCT resource_id FROM resources", settings=env)
    assert {r[0] for r in res.rows} == {"rival-p0", "rival-p1", "rival-p2"}


def test_confined_and_plain_readers_of_one_file_coexist(env: Settings) -> None:
    """An in-process reader (the CDS index) and an analyst query open the same file together."""
    plain = duckdb.connect(str(warehouse_path(env, "acme")), read_only=True)
    try:
        assert run_confined("acme", "SELECT count(*) FROM resources", settings=env).rows == [(3,)]
    finally:
        plain.close()


def test_cli_takes_sql_starting_with_a_comment_and_files(env: Settings, tmp_path: Path) -> None:
    runner = CliRunner()
    sql = "-- how many patients\nSELECT count(*) AS n FROM resources"
    result = runner.invoke(main, ["warehouse", "query", "--tenant", "acme", sql])
    assert result.exit_code == 0, result.output
    assert " 3 " in result.output
    path = tmp_path / "q.sql"
    path.write_text(sql + ";\n")
    result = runner.invoke(main, ["warehouse", "query", "--tenant", "acme", "-f", str(path)])
    assert result.exit_code == 0 and " 3 " in result.output, result.output
    result = runner.invoke(main, ["warehouse", "query", "--tenant", "acme", "-f", "-"], input=sql)
    assert result.exit_code == 0 and " 3 " in result.output, result.output


@pytest.mark.parametrize("name", sorted(p.name for p in QUERIES_DIR.glob("*.sql")))
def test_every_shipped_query_file_runs_through_the_cli(env: Settings, name: str) -> None:
    """The shipped example queries start with `--` comments: as an argument and with -f."""
    path = QUERIES_DIR / name
    runner = CliRunner()
    result = runner.invoke(main, ["warehouse", "query", "--tenant", "acme", path.read_text()])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["warehouse", "query", "--tenant", "acme", "-f", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("sql", "first_line"),
    [
        # a syntax error: DuckDB's first line, no traceback
        ("SELEC 1", "error: Parser Error: syntax error"),
        # an unknown table
        ("SELECT * FROM nope", "error: Catalog Error: Table with name nope does not exist!"),
        # only a comment
        ("-- nothing", "error: no SQL statement"),
    ],
)
def test_bad_sql_prints_one_line(env: Settings, sql: str, first_line: str) -> None:
    result = CliRunner().invoke(main, ["warehouse", "query", "--tenant", "acme", sql])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[0].startswith(first_line), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("flag", ["--verbose", "--debug"])
def test_verbose_shows_duckdbs_error_as_the_cause(env: Settings, flag: str) -> None:
    result = CliRunner().invoke(main, [flag, "warehouse", "query", "--tenant", "acme", "SELEC 1"])
    assert isinstance(result.exception, QueryFailed)
    assert isinstance(result.exception.__cause__, duckdb.ParserException)


def test_check_sql_refuses_the_whole_script_before_running() -> None:
    with pytest.raises(QueryRefused, match=r"statement 2 of 2\): ATTACH"):
        check_sql("SELECT 1; ATTACH 'x.duckdb'")
    assert len(check_sql("SELECT 1; SELECT 2")) == 2


def test_view_definition_suites_run_confined(tmp_path: Path, two_tenants: Settings) -> None:
    """A suite file is user input: a view reading a file through its SQL cannot, the rest runs."""
    key = two_tenants.data_dir / "secret.key"
    suite = {
        "title": "escape",
        "resources": [{"resourceType": "Patient", "id": "p1"}],
        "tests": [
            {
                "title": "ordinary view",
                "view": {
                    "resource": "Patient",
                    "status": "active",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [{"id": "p1"}],
            },
            {
                # A constant holding SQL stays a literal (quoted), never code.
                "title": "injected constant",
                "view": {
                    "resource": "Patient",
                    "status": "active",
                    "constant": [
                        {
                            "name": "k",
                            "valueString": f"x') UNION SELECT content FROM read_text('{key}",
                        }
                    ],
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                    "where": [{"path": "id = %k"}],
                },
                "expect": [],
            },
        ],
    }
    (tmp_path / "escape.json").write_text(json.dumps(suite))
    report = run_test_suite(tmp_path)
    results = [t["result"] for t in report["escape.json"]["tests"]]
    assert all(r["passed"] for r in results), results
    assert KEY_TEXT not in json.dumps(report)


_HOSTILE = "x'); COPY (SELECT 1) TO '/tmp/pwned.csv'; --"


@pytest.mark.parametrize(
    ("view", "compiles"),
    [
        # a column name carrying SQL: refused by the name rule
        ({"select": [{"column": [{"name": 'id" FROM resources; --', "path": "id"}]}]}, False),
        # a constant carrying SQL: a quoted literal
        (
            {
                "constant": [{"name": "k", "valueString": _HOSTILE}],
                "select": [{"column": [{"name": "id", "path": "id"}]}],
                "where": [{"path": "id = %k"}],
            },
            True,
        ),
        # a FHIRPath string literal carrying SQL (FHIRPath-escaped quotes): a quoted literal
        (
            {
                "select": [{"column": [{"name": "id", "path": "id"}]}],
                "where": [{"path": "id = '" + _HOSTILE.replace("'", "\\'") + "'"}],
            },
            True,
        ),
        # a function that is not FHIRPath (a DuckDB table function's name)
        ({"select": [{"column": [{"name": "k", "path": "read_text('/etc/passwd')"}]}]}, False),
        # a column type carrying SQL
        (
            {"select": [{"column": [{"name": "id", "path": "id", "type": "string) FROM x; --"}]}]},
            False,
        ),
        # a resource type carrying SQL
        (
            {
                "resource": "Patient' OR 1=1 --",
                "select": [{"column": [{"name": "id", "path": "id"}]}],
            },
            False,
        ),
    ],
)
def test_user_view_definitions_compile_to_one_select(
    view: dict[str, object], compiles: bool
) -> None:
    """What a build runs for a user ViewDefinition: one SELECT, the payload a literal, or a
    ViewDefinitionError before anything runs."""
    from medblocks_pipelines.lib.errors import ViewDefinitionError
    from medblocks_pipelines.lib.warehouse.views import compile_view

    full = {"resourceType": "ViewDefinition", "resource": "Patient", "status": "active", **view}
    try:
        compiled = compile_view(full)
    except ViewDefinitionError:
        assert not compiles
        return
    assert compiles
    statements = duckdb.extract_statements(compiled.sql)
    assert [s.type for s in statements] == [duckdb.StatementType.SELECT], compiled.sql


def test_view_suite_runner_is_confined_even_if_the_compiler_let_sql_through(
    tmp_path: Path, two_tenants: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth for `medblocks views test`: were a compiler bug to emit a file read, the
    suite's DuckDB connection refuses it."""
    from medblocks_pipelines.lib.warehouse.views import runner
    from medblocks_pipelines.lib.warehouse.views.compiler import CompiledView

    key = two_tenants.data_dir / "secret.key"
    real = runner.compile_view

    def leaky(view: dict[str, object]) -> CompiledView:
        compiled = real(view)
        return dataclasses.replace(compiled, sql=f"SELECT content AS id FROM read_text('{key}')")

    monkeypatch.setattr(runner, "compile_view", leaky)
    suite = {
        "title": "leak",
        "resources": [{"resourceType": "Patient", "id": "p1"}],
        "tests": [
            {
                "title": "leak",
                "view": {
                    "resource": "Patient",
                    "status": "active",
                    "select": [{"column": [{"name": "id", "path": "id"}]}],
                },
                "expect": [{"id": KEY_TEXT}],
            }
        ],
    }
    (tmp_path / "leak.json").write_text(json.dumps(suite))
    (result,) = [t["result"] for t in run_test_suite(tmp_path)["leak.json"]["tests"]]
    assert not result["passed"] and "PermissionException" in result["error"], result
    assert KEY_TEXT not in json.dumps(result.get("details", {}))


@pytest.mark.parametrize("tenant", ["temp", "memory", "system"])
def test_tenants_named_like_duckdb_catalogs(env: Settings, tenant: str) -> None:
    """A tenant id that is also one of DuckDB's catalog names still opens (as `warehouse`)."""
    import shutil

    shutil.copy(warehouse_path(env, "acme"), warehouse_path(env, tenant))
    try:
        res = run_confined(
            tenant, "SELECT current_database(), count(*) FROM resources", settings=env
        )
    finally:
        warehouse_path(env, tenant).unlink()
    assert res.rows == [("warehouse", 3)]


def test_the_real_command_in_a_subprocess(env: Settings) -> None:
    """The attack as typed at a shell: `medblocks warehouse query --tenant acme "..."`."""
    import os
    import subprocess
    import sys

    def medblocks(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medblocks_pipelines.cli", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=120,
        )

    lake_file = _rival_lake_file(env)
    stolen = medblocks(
        "warehouse", "query", "--tenant", "acme", f"SELECT * FROM read_parquet('{lake_file}')"
    )
    assert stolen.returncode == 1 and RIVAL_NAME not in stolen.stdout + stolen.stderr
    assert stolen.stderr.strip().splitlines()[0].startswith("error: refused: Permission Error")
    assert "Traceback" not in stolen.stderr
    shipped = QUERIES_DIR / "source_overlap.sql"
    ok = medblocks("warehouse", "query", "--tenant", "acme", shipped.read_text())
    assert ok.returncode == 0, ok.stderr

"""The control plane's engines and schema: one engine per URL per process, disposed on demand;
migrations as the explicit ``medblocks db upgrade`` step, on SQLite and on a real PostgreSQL
database; a store opened on a database behind head refuses with one line and the hint."""

import multiprocessing as mp
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.registry.db import (
    HEAD_REVISION,
    UPGRADE_HINT,
    _first_create_lock,
    _scripts,
    current_revision,
    dispose_engines,
    ensure_schema,
    head_revision,
    make_engine,
    upgrade,
)
from medblocks_pipelines.lib.settings import Settings, get_settings


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def test_head_constant_is_alembics_head() -> None:
    """The one-query open compares with HEAD_REVISION: it must be the shipped migrations' head."""
    assert head_revision() == HEAD_REVISION


def test_one_engine_per_url_across_threads(tmp_path: Path) -> None:
    url = _sqlite(tmp_path / "a.db")
    got: list[sa.Engine] = []
    barrier = threading.Barrier(8)

    def open_one() -> None:
        barrier.wait()
        got.append(make_engine(url))

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in got}) == 1
    assert make_engine(_sqlite(tmp_path / "b.db")) is not got[0]
    # postgres:// and postgresql+psycopg2:// name the same database: one engine.
    assert make_engine("postgres://u@h/db") is make_engine("postgresql+psycopg2://u@h/db")


def test_dispose_engines_closes_pools_and_forgets_them(tmp_path: Path) -> None:
    url = _sqlite(tmp_path / "a.db")
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    assert pool.checkedin() == 1  # the connection went back to the pool, still open
    dispose_engines()
    assert pool.checkedin() == 0
    assert make_engine(url) is not engine


def test_stores_share_the_engine(settings: Settings) -> None:
    assert open_control_plane(settings).engine is open_control_plane(settings).engine


def test_new_sqlite_file_is_created_at_head(settings: Settings) -> None:
    cp = open_control_plane(settings)
    assert current_revision(cp.engine) == head_revision()
    cp.add_tenant("acme", "Acme")


def test_db_upgrade_on_a_fresh_sqlite_file(settings: Settings) -> None:
    assert not (settings.data_dir / "control.db").exists()
    assert _run("db", "upgrade") == (
        0,
        f"{settings.database_url}: upgraded (empty) -> {head_revision()}\n",
    )
    assert _run("db", "upgrade") == (0, f"{settings.database_url}: already at {head_revision()}\n")
    code, out = _run("db", "current")
    assert code == 0 and f"current: {head_revision()}\n" in out and "(at head)" in out
    names = set(sa.inspect(make_engine(settings.database_url)).get_table_names())
    assert {"tenants", "connections", "alembic_version"} <= names


def test_store_behind_head_refuses_with_the_hint(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    upgrade(engine, "0003")
    with pytest.raises(ConfigError) as err:
        open_control_plane(settings)
    assert err.value.hint == UPGRADE_HINT == "run: medblocks db upgrade"
    assert "\n" not in str(err.value)
    assert "0003" in str(err.value) and head_revision() in str(err.value)
    # The CLI says it as one line plus the hint, exit 1; `db current` says where it stands.
    code, out = _run("tenants", "list")
    assert code == 1
    assert out.splitlines()[-1] == "hint: run: medblocks db upgrade"
    assert "current: 0003" in _run("db", "current")[1]
    assert _run("db", "upgrade")[0] == 0
    assert current_revision(engine) == head_revision()
    open_control_plane(settings).add_tenant("acme", "Acme")


def test_sqlite_with_tables_but_no_revision_is_not_bootstrapped(settings: Settings) -> None:
    """Only an empty file is created at head: tables of unknown origin need a person."""
    engine = make_engine(settings.database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE tenants (id TEXT)")
    with pytest.raises(ConfigError, match="has no schema") as err:
        open_control_plane(settings)
    assert err.value.hint == UPGRADE_HINT


@pytest.mark.postgres
def test_db_upgrade_on_a_fresh_postgres_database(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines_tests.conftest import fresh_pg_database

    with fresh_pg_database("db_upgrade", control_plane=False) as url:
        monkeypatch.setenv("MEDBLOCKS_DATABASE_URL", url)
        pg = get_settings()
        # Production never migrates on open: an empty PostgreSQL database needs the explicit step.
        with pytest.raises(ConfigError, match="has no schema") as err:
            open_control_plane(pg)
        assert err.value.hint == UPGRADE_HINT
        code, out = _run("db", "current")
        assert code == 0 and "current: (empty)" in out and "not at head" in out
        code, out = _run("db", "upgrade")
        assert code == 0 and out.endswith(f"upgraded (empty) -> {head_revision()}\n")
        assert "postgresql" in out
        cp = open_control_plane(pg)
        assert cp.engine.dialect.name == "postgresql"
        assert current_revision(cp.engine) == head_revision()
        cp.add_tenant("acme", "Acme")
        assert [t.id for t in cp.list_tenants()] == ["acme"]
        # Behind head on PostgreSQL too: downgrade one step and the store refuses.
        from alembic import command

        from medblocks_pipelines.lib.registry.db import alembic_config

        command.downgrade(alembic_config(cp.engine), "0003")
        with pytest.raises(ConfigError, match="behind head") as err:
            open_control_plane(pg)
        assert err.value.hint == UPGRADE_HINT


def _child_engine(url: str, parent_id: int, out: "mp.Queue[tuple[bool, int]]") -> None:
    engine = make_engine(url)
    with engine.connect() as conn:
        out.put(
            (id(engine) != parent_id, conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one())
        )


def test_a_forked_child_gets_its_own_engine(tmp_path: Path) -> None:
    """A fork (Celery prefork, multiprocessing) must not share the parent's pooled connections."""
    url = _sqlite(tmp_path / "a.db")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    ctx = mp.get_context("fork")
    out: mp.Queue[tuple[bool, int]] = ctx.Queue()
    child = ctx.Process(target=_child_engine, args=(url, id(engine), out))
    child.start()
    assert out.get(timeout=60) == (True, 1)
    child.join(timeout=30)
    assert child.exitcode == 0
    with engine.connect() as conn:  # the parent's pool still works
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1


def _open_fresh(data_dir: str, key: str, barrier: "mp.synchronize.Barrier") -> None:
    import os

    os.environ["MEDBLOCKS_SECRET_KEY"] = key
    settings = get_settings(data_dir)
    barrier.wait()
    open_control_plane(settings).add_tenant(f"t{os.getpid()}", "T")


def test_processes_opening_a_new_sqlite_file_at_once(settings: Settings) -> None:
    """Sensors, runs and web workers may all be first: the file is created at head once."""
    import os

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    key = os.environ["MEDBLOCKS_SECRET_KEY"]
    procs = [
        ctx.Process(target=_open_fresh, args=(str(settings.data_dir), key, barrier))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cp = open_control_plane(settings)
    assert current_revision(cp.engine) == head_revision()
    assert len(cp.list_tenants()) == 3


def test_a_new_sqlite_file_caught_mid_upgrade_is_waited_for(tmp_path: Path) -> None:
    """A process that reads the stamp while the creator is between two migrations (an earlier
    revision, not head) waits for the creator's lock instead of refusing the file as behind
    head (seen in CI: three processes opening one new file, one refused at 0003)."""
    engine = make_engine(_sqlite(tmp_path / "control.db"))
    previous = _scripts().get_revision(head_revision()).down_revision
    assert isinstance(previous, str)
    outcome: list[BaseException | None] = []
    with _first_create_lock(engine):  # the creator, part way
        upgrade(engine, previous)
        assert current_revision(engine) == previous

        def opener() -> None:
            try:
                ensure_schema(engine)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
                outcome.append(exc)

        other = threading.Thread(target=opener)
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive(), f"did not wait for the creator: {outcome}"
        upgrade(engine)  # the creator finishes
    other.join(timeout=30)
    assert outcome == [None]
    assert current_revision(engine) == head_revision()

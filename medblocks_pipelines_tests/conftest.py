"""Fixtures shared by every test package: temporary settings and a fresh PostgreSQL database.

PostgreSQL runs on 127.0.0.1:5432 with trust auth (see .ci/run). Each test session creates its own
database and drops it at the end. Where no server answers, PostgreSQL tests skip locally and fail in CI
(``MEDBLOCKS_REQUIRE_POSTGRES=1``). A control-plane database is migrated as production's is, by the
explicit ``medblocks db upgrade`` step (``db.upgrade``); SQLite ones are created at head on first open.
"""

import contextvars
import inspect
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from medblocks_pipelines.lib.settings import Settings, get_settings

PG_ADMIN_URL = os.environ.get(
    "MEDBLOCKS_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run each test body in a new, empty ``contextvars.Context``, as the CLI runs Dagster.

    Dagster keeps its defs-state storage in a context variable that an instance context sets on
    entry. A Dagster context left to the garbage collector by an earlier test resets it, when
    finalized, to a storage whose instance is gone, and the next repository build raises
    "undefined DagsterInstance weakref". The CLI and the tests both run Dagster in a fresh context
    (``cli.runtime.in_fresh_context``), where such a late reset cannot reach: public Python, no
    private Dagster API and no pinning of Dagster's variable.
    """
    if pyfuncitem.config.pluginmanager.hasplugin("asyncio"):
        return None  # async tests keep their event loop's context
    params = inspect.signature(pyfuncitem.obj).parameters
    args = {name: value for name, value in pyfuncitem.funcargs.items() if name in params}
    contextvars.Context().run(pyfuncitem.obj, **args)
    return True


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings rooted in a temporary data folder with SQLite control plane."""
    for var in ("MEDBLOCKS_DATABASE_URL", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDBLOCKS_SECRET_KEY", Fernet.generate_key().decode())
    s = get_settings()
    s.ensure_dirs()
    return s


def _pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    """Close the control-plane engines a test opened (one per URL per process, cached)."""
    yield
    from medblocks_pipelines.lib.registry.db import dispose_engines

    dispose_engines()


@contextmanager
def fresh_pg_database(tag: str, *, control_plane: bool = True) -> Iterator[str]:
    """Create a uniquely named PostgreSQL database, yield its URL, drop it afterwards.

    ``control_plane``: migrate it to head first (``medblocks db upgrade``); off for Dagster's own
    storage, which keeps its own ``alembic_version``.
    """
    if not _pg_available():
        if os.environ.get("MEDBLOCKS_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (MEDBLOCKS_REQUIRE_POSTGRES=1) but not reachable")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    name = f"medblocks_{tag}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        if control_plane:
            from medblocks_pipelines.lib.registry.db import make_engine, upgrade

            upgrade(make_engine(url))
        yield url
    finally:
        from medblocks_pipelines.lib.registry.db import dispose_engines

        dispose_engines()  # the DROP below needs no connection of ours left open
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the control plane in this session."""
    with fresh_pg_database("cp") as url:
        yield url


@pytest.fixture(scope="session")
def pg_dagster_url() -> Iterator[str]:
    """A separate fresh database for Dagster's own storage (it has its own alembic_version)."""
    with fresh_pg_database("dagster", control_plane=False) as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1 with an ephemeral port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    """A new bucket on the moto server, with the standard AWS environment pointing at it (what
    the lake and warehouse read) and a boto3 client to look at the bucket directly."""
    import boto3

    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "MEDBLOCKS_STORAGE_OPTIONS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    name = f"lake-{secrets.token_hex(4)}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name, client

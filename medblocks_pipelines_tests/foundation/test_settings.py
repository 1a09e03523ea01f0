"""One settings object: lib/settings.py is the only reader of the environment in lib, defs and web;
every variable it lists changes the field it documents; the Dagster resource shows the variables
that are set as ``dg.EnvVar`` config."""

import ast
from pathlib import Path

import dagster as dg
import pytest

import medblocks_pipelines
from medblocks_pipelines.defs.shared.resources import ENV_FIELDS, PlatformResource
from medblocks_pipelines.lib.errors import ConfigError
from medblocks_pipelines.lib.settings import ENV_VARS, Settings, Tuning

PACKAGE = Path(medblocks_pipelines.__file__).parent


def _reads_environment(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            lines.append(node.lineno)
    return lines


def test_only_settings_reads_the_environment() -> None:
    found = {}
    for folder in ("lib", "defs", "web"):
        for path in (PACKAGE / folder).rglob("*.py"):
            if path == PACKAGE / "lib" / "settings.py":
                continue
            lines = _reads_environment(ast.parse(path.read_text()))
            if lines:
                found[str(path.relative_to(PACKAGE))] = lines
    assert found == {}


# (variable, value, attribute path on Settings, expected)
CASES = [
    ("MEDBLOCKS_DATABASE_URL", "postgresql://h/db", "database_url", "postgresql://h/db"),
    ("MEDBLOCKS_PUBLIC_BASE_URL", "https://Host/x/", "public_base_url", "https://host/x"),
    ("MEDBLOCKS_SECRET_KEY", "k1,k2", "secret_key", "k1,k2"),
    ("MEDBLOCKS_REDIS_URL", " redis://r:6379/0 ", "redis_url", "redis://r:6379/0"),
    ("MEDBLOCKS_STORAGE_OPTIONS", '{"anon": true}', "storage_options", {"anon": True}),
    ("MEDBLOCKS_VIEWS_DIR", "/v", "views_dir", Path("/v")),
    ("MEDBLOCKS_READ_POLICY", "/p.yaml", "read_policy", "/p.yaml"),
    ("MEDBLOCKS_WEBHOOK_ALLOW_PRIVATE", "1", "webhook_allow_private", True),
    ("MEDBLOCKS_CDS_TERMINOLOGY_URL", "http://tx/fhir/", "cds_terminology_url", "http://tx/fhir"),
    ("MEDBLOCKS_CDS_INGREDIENT_CONCEPTMAP", "http://cm", "cds_ingredient_conceptmap", "http://cm"),
    ("MEDBLOCKS_CDS_PACKS_DIR", "/packs", "cds_packs_dir", Path("/packs")),
    ("MEDBLOCKS_CDS_DEFAULT_PACKS", "Off", "cds_default_packs", False),
    ("MEDBLOCKS_SOF_TESTS", "/sof", "sof_tests_dir", Path("/sof")),
    ("MEDBLOCKS_LANDING_MEMORY_LIMIT", "64MB", "tuning.landing_memory_limit", "64MB"),
    ("MEDBLOCKS_LANDING_CHUNK_BYTES", "1024", "tuning.landing_chunk_bytes", 1024),
    ("MEDBLOCKS_LANDING_THREADS", "2", "tuning.landing_threads", 2),
    ("MEDBLOCKS_MAX_LINE_BYTES", "99", "tuning.max_line_bytes", 99),
    ("MEDBLOCKS_BENCH_SKIP_VALIDATION", "1", "tuning.skip_validation", True),
    ("MEDBLOCKS_WAREHOUSE_MEMORY_LIMIT", "1GB", "tuning.warehouse_memory_limit", "1GB"),
    ("MEDBLOCKS_COMPACT_SMALL_BYTES", "7", "tuning.compact_small_bytes", 7),
    ("MEDBLOCKS_COMPACT_MIN_FILES", "8", "tuning.compact_min_files", 8),
    ("MEDBLOCKS_COMPACT_GROUP_BYTES", "9", "tuning.compact_group_bytes", 9),
    ("MEDBLOCKS_WAREHOUSE_POLL_SECONDS", "2.5", "tuning.warehouse_poll_seconds", 2.5),
    ("MEDBLOCKS_CDS_AUDIT_FLUSH_SECONDS", "0.5", "tuning.cds_audit_flush_seconds", 0.5),
    ("MEDBLOCKS_WEBHOOK_BATCH", "5", "tuning.webhook_batch", 5),
    ("MEDBLOCKS_WEBHOOK_TIMEOUT_S", "0.2", "tuning.webhook_timeout_s", 0.2),
    ("MEDBLOCKS_WEBHOOK_DEADLINE_S", "3", "tuning.webhook_deadline_s", 3.0),
    ("MEDBLOCKS_WAREHOUSE_DEBOUNCE_S", "4", "tuning.warehouse_debounce_s", 4.0),
    ("MEDBLOCKS_WAREHOUSE_MAX_WAIT_S", "40", "tuning.warehouse_max_wait_s", 40.0),
    ("MEDBLOCKS_RUN_HEARTBEAT_TIMEOUT_S", "30", "tuning.run_heartbeat_timeout_s", 30.0),
    ("MEDBLOCKS_CLI_FULL_EXIT", "1", "tuning.cli_full_exit", True),
]


def _get(settings: Settings, path: str) -> object:
    value: object = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("var", "value", "attr", "expected"), CASES)
def test_each_variable_sets_its_field(
    var: str, value: str, attr: str, expected: object, tmp_path: Path
) -> None:
    base = {"MEDBLOCKS_DATA_DIR": str(tmp_path)}
    before = _get(Settings.from_env(env=base), attr)
    after = _get(Settings.from_env(env={**base, var: value}), attr)
    assert after == expected != before
    assert var in ENV_VARS


def test_every_listed_variable_is_covered() -> None:
    paths = {"MEDBLOCKS_DATA_DIR", "MEDBLOCKS_LAKE_ROOT", "MEDBLOCKS_WAREHOUSE_DIR"}
    assert set(ENV_VARS) == {c[0] for c in CASES} | paths


def test_defaults_are_the_shipped_ones(tmp_path: Path) -> None:
    s = Settings.from_env(env={"MEDBLOCKS_DATA_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'control.db'}"
    assert (s.lake_root, s.warehouse_dir) == (tmp_path / "lake", tmp_path / "warehouse")
    assert s.tuning == Tuning()
    assert (s.secret_key, s.redis_url, s.storage_options, s.cds_default_packs) == (
        None,
        None,
        {},
        True,
    )


def test_bad_numbers() -> None:
    # The data-path knobs refuse a bad value; the sensors' bounds fall back to the default.
    with pytest.raises(ConfigError, match="MEDBLOCKS_COMPACT_MIN_FILES"):
        Tuning.from_env({"MEDBLOCKS_COMPACT_MIN_FILES": "many"})
    assert Tuning.from_env({"MEDBLOCKS_WEBHOOK_DEADLINE_S": "soon"}).webhook_deadline_s == 20.0
    with pytest.raises(ConfigError, match="not valid JSON"):
        Settings.from_env(env={"MEDBLOCKS_STORAGE_OPTIONS": "{"})


def test_secret_key_is_not_in_the_repr(tmp_path: Path) -> None:
    s = Settings.from_env(env={"MEDBLOCKS_DATA_DIR": str(tmp_path), "MEDBLOCKS_SECRET_KEY": "k9"})
    assert "k9" not in repr(s)


def test_resource_binds_set_variables_as_env_vars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ENV_FIELDS.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MEDBLOCKS_REDIS_URL", "redis://127.0.0.1:6379/3")
    resource = PlatformResource.from_env()
    bound = {
        f: getattr(resource, f) for f in ENV_FIELDS if isinstance(getattr(resource, f), dg.EnvVar)
    }
    assert bound == {
        "data_dir": dg.EnvVar("MEDBLOCKS_DATA_DIR"),
        "redis_url": dg.EnvVar("MEDBLOCKS_REDIS_URL"),
    }
    assert {f: getattr(resource, f) for f in ENV_FIELDS if f not in bound} == dict.fromkeys(
        set(ENV_FIELDS) - set(bound)
    )

    # The run resolves them: the settings the assets see are the environment's.
    @dg.asset
    def probe(platform: PlatformResource) -> tuple[str, str | None]:
        return str(platform.settings.data_dir), platform.settings.redis_url

    result = dg.materialize([probe], resources={"platform": resource})
    assert result.output_for_node("probe") == (
        str((tmp_path / "d").resolve()),
        "redis://127.0.0.1:6379/3",
    )


def test_settings_built_by_hand_read_the_rest_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tools and tests build Settings from paths alone; the vault key still comes from the
    environment, as when the vault read it itself."""
    monkeypatch.setenv("MEDBLOCKS_SECRET_KEY", "k1")
    monkeypatch.setenv("MEDBLOCKS_CDS_TERMINOLOGY_URL", "http://tx/")
    monkeypatch.setenv("MEDBLOCKS_COMPACT_MIN_FILES", "3")
    s = Settings(tmp_path, "sqlite://", tmp_path / "lake", tmp_path / "wh")
    assert (s.secret_key, s.cds_terminology_url, s.tuning.compact_min_files) == (
        "k1",
        "http://tx",
        3,
    )

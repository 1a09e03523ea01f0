"""The CI flake of ``run_job`` cannot come back: definitions load and runs execute in a fresh
``contextvars.Context``, so Dagster's defs-state variable left stale by a late-finalized context
(before the call or in the middle of a load) is never read. Public Dagster API only."""

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

import medblocks_pipelines.definitions as definitions_module
from medblocks_pipelines.cli import runtime
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import Settings


def _leave_late_finalizers() -> Callable[[], None]:
    """Two test instances entered and never exited, as a sensor or op context left to the garbage
    collector does. Returns what the collector does later: finalize the first, then the second,
    whose reset puts back the first one's storage, whose instance is gone: a stale variable."""
    held: dict[str, Any] = {}
    held["a_cm"] = dg.instance_for_test()
    held["a"] = held["a_cm"].__enter__()
    held["b_cm"] = dg.instance_for_test()
    held["b"] = held["b_cm"].__enter__()

    def finalize() -> None:
        for name in ("a", "b"):
            held.pop(name)
            held.pop(f"{name}_cm")
            gc.collect()

    return finalize


def _plain_load() -> dg.Definitions:
    definitions = definitions_module.defs()
    definitions.get_repository_def()
    return definitions


def test_the_stale_variable_breaks_a_plain_load() -> None:
    """The premise: loading outside a fresh context fails once the finalizers have run (what CI
    saw), so the tests below can fail."""
    _leave_late_finalizers()()
    with pytest.raises(dg.DagsterInvariantViolationError, match="weakref"):
        _plain_load()


def test_load_definitions_ignores_a_variable_stale_before_the_call() -> None:
    _leave_late_finalizers()()
    definitions = runtime.load_definitions()
    assert definitions.resolve_job_def("backend_land_job").name == "backend_land_job"


def test_load_definitions_ignores_finalizers_firing_mid_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    finalize = _leave_late_finalizers()
    real = definitions_module.defs

    def defs_with_gc_in_the_middle() -> dg.Definitions:
        finalize()  # the collector runs while the code location loads
        return real()

    monkeypatch.setattr(definitions_module, "defs", defs_with_gc_in_the_middle)
    definitions = runtime.load_definitions()
    assert definitions.resolve_job_def("tenant_warehouse_job").name == "tenant_warehouse_job"


def test_run_job_runs_with_the_variable_stale(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole CLI run (load, admission, execution, heartbeat) on a live instance, variable stale
    first."""
    from medblocks_pipelines.cli import admission

    monkeypatch.setattr(admission, "HEARTBEAT_SECONDS", 0.01)
    cp = open_control_plane(settings)
    cp.add_tenant("acme", "Acme")
    cp.add_source("mercy-ehr", "Mercy", "epic", "ehr", "http://x", ["backend"])
    cp.add_organization("mercy", "acme", "mercy-ehr", "Mercy General")
    folder = tmp_path / "export"
    folder.mkdir()
    lines = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3)]
    (folder / "Patient.ndjson").write_text("\n".join(lines) + "\n")
    with dg.instance_for_test() as instance:
        beats: list[str] = []
        add_run_tags = instance.add_run_tags

        def spy(run_id: str, new_tags: Any) -> None:
            beats.extend(v for k, v in new_tags.items() if k == "medblocks/heartbeat")
            add_run_tags(run_id, new_tags)

        monkeypatch.setattr(instance, "add_run_tags", spy)
        _leave_late_finalizers()()
        result = runtime.run_job(
            "ndjson_import_job",
            partition_key="acme.mercy",
            run_config={"ops": {"backend__ndjson_import": {"config": {"path": str(folder)}}}},
            tags={"medblocks/tenant": "acme"},
            instance=instance,
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.tags["medblocks/launched_by"] == "cli"
        assert beats and run.tags["medblocks/heartbeat"] == beats[-1]  # it beat while running
    cp.engine.dispose()

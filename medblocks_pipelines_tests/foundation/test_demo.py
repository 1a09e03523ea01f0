"""The README's first command runs `medblocks demo`: every pattern end to end against the sandbox.
This runs the same code on a small population and checks what a newcomer is promised."""

from pathlib import Path

import pytest
from rich.console import Console

from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import open_warehouse


@pytest.mark.slow
def test_demo_runs_every_pattern_into_one_warehouse(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medblocks_pipelines.demo import TENANT, run_demo

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MEDBLOCKS_SECRET_KEY", raising=False)
    with open(tmp_path / "demo.txt", "w") as fh:
        state = run_demo(persons=16, seed=7, fresh=True, console=Console(file=fh, width=160))
    out = (tmp_path / "demo.txt").read_text()

    cp = state.cp
    states = {c["state"] for c in cp.list_connections(tenant_id=TENANT, pattern="patient_access")}
    assert {"active", "refresh_failed"} <= states
    audit = cp.list_audit(tenant_id=TENANT)
    decisions = sorted(a["decision"] for a in audit if a["action"] == "network.query")
    assert decisions == ["allowed", "refused"]
    # The EHR's CDS Hooks calls were answered (and audited) for the launched patient.
    assert any(a["action"] == "cds.patient-view" and a["decision"] == "allowed" for a in audit)
    assert state.results["clinician"]["app_status"] == 200
    with open_warehouse(TENANT, settings=settings) as con:
        patterns = {
            r[0] for r in con.execute("SELECT DISTINCT pattern FROM resource_sightings").fetchall()
        }
        # The EHR launch's targeted sync lands under the launch's own pattern.
        assert patterns == {"backend", "patient_access", "network", "clinician_workflow"}
        assert con.execute("SELECT count(*) FROM tombstones").fetchone()[0] >= 1
        assert con.execute("SELECT count(*) FROM persons").fetchone()[0] > 0
    assert "persons linked across more than one pattern" in out
    assert str(settings.warehouse_dir / "acme.duckdb") in out

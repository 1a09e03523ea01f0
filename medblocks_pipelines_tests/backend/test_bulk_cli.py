"""The Bulk CLI (issue 14) end to end against the sandbox, through the Dagster jobs:
``medblocks sync backend`` listing the types a partial export missed (and the Dagster metadata
carrying them), ``--since`` and ``--patient``, ``medblocks bulk status`` on the last export and
``medblocks bulk set-since``.
"""

from click.testing import CliRunner

from medblocks_pipelines.lib.fhir import bulk_watermarks as wm
from medblocks_pipelines.lib.fhir.bulk import parse_manifest

from .conftest import TENANT, Env

ORG = "mercy-general"


def test_partial_sync_lists_missing_types_and_status_shows_them(
    env: Env, live_defs_state: object
) -> None:
    from medblocks_pipelines.cli import main

    ehr = env.add_org(ORG, org_config={"types": ["Patient", "Condition", "Observation"]})
    ehr.faults.add("manifest_errors_partial", types=["Condition"])
    runner = CliRunner()
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code == 0, out.output
    assert "status partial" in out.output
    assert "missing types (the server reported them failed): Condition" in out.output

    out = runner.invoke(main, ["bulk", "status", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code == 0, out.output
    assert "types held back" in out.output and "Condition" in out.output
    assert "completed" in out.output

    # the next sync re-delivers the held type; nothing is missing any more
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code == 0, out.output
    assert "status success" in out.output and "missing types" not in out.output
    assert wm.holds(env.cp, TENANT, ORG) == {}


def test_set_since_and_since_option_and_patient_list(env: Env, live_defs_state: object) -> None:
    from medblocks_pipelines.cli import main

    ehr = env.add_org(ORG, org_config={"types": ["Patient", "Condition"]})
    runner = CliRunner()
    out = runner.invoke(
        main, ["bulk", "set-since", "--tenant", TENANT, "--org", ORG, "2999-01-01T00:00:00Z"]
    )
    assert out.exit_code == 0, out.output
    assert env.cp.get_watermark(wm.watermark_key(TENANT, ORG)) == "2999-01-01T00:00:00Z"
    out = runner.invoke(main, ["bulk", "set-since", "--tenant", TENANT, "--org", ORG, "yesterday"])
    assert out.exit_code != 0 and "not an ISO instant" in out.output

    # a _since in the future: nothing changed since then
    out = runner.invoke(main, ["sync", "backend", "--tenant", TENANT, "--org", ORG])
    assert out.exit_code == 0, out.output
    assert "0 resources" in out.output

    # --since overrides the watermark; --patient makes a patient-list export of two patients
    two = sorted(p["id"] for p in ehr.store.iter_type("Patient"))[:2]
    args = ["sync", "backend", "--tenant", TENANT, "--org", ORG, "--since", "2000-01-01T00:00:00Z"]
    out = runner.invoke(main, [*args, "--patient", two[0], "--patient", two[1]])
    assert out.exit_code == 0, out.output
    (last,) = [r for r in env.cp.list_bulk_exports(tenant_id=TENANT)][-1:]
    assert last.since == "2000-01-01T00:00:00Z"
    assert last.request["method"] == "POST" and sorted(last.request["patients"]) == two
    assert parse_manifest(last.manifest).expected_counts["Patient"] == 2

    out = runner.invoke(main, ["bulk", "status", "--tenant", TENANT, "--org", ORG, "--json"])
    assert out.exit_code == 0, out.output
    assert '"status": "completed"' in out.output

"""The patient-access CLI commands end to end, the EHR-launch variant of launch.py, and the pulled
records reaching the tenant's warehouse.
"""

import re
import urllib.parse

import duckdb
import pytest
from click.testing import CliRunner

from medblocks_pipelines.cli import main
from medblocks_pipelines.lib.errors import LaunchError
from medblocks_pipelines.lib.smart.launch import begin_authorization, complete_authorization
from medblocks_pipelines.lib.warehouse.build import build_warehouse, warehouse_path
from medblocks_pipelines_tests.patient_access.conftest import RETURN_URL, PatientAccessEnv
from medblocks_sandbox.consent_browser import connect_via_consent_page


def test_cli_link_sync_refresh_revoke(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    runner = CliRunner()
    out = runner.invoke(
        main,
        [
            "connections",
            "link",
            "--tenant",
            "acme",
            "--patient-ref",
            "cli-1",
            "--source",
            sid,
            "--return-url",
            RETURN_URL,
            "--public-base-url",
            pa_env.web_base,
        ],
    )
    assert out.exit_code == 0, out.output
    found = re.search(r"connection (conn_\w+)", out.output)
    assert found is not None, out.output
    conn_id = found.group(1)
    url = out.output.strip().splitlines()[-1]
    login = pa_env.logins(org)[0]
    outcome = connect_via_consent_page(
        url, username=login.username, password=login.password, stop_at=RETURN_URL, http=pa_env.http
    )
    assert outcome.status == "active" and outcome.connection_id == conn_id

    out = runner.invoke(
        main, ["sync", "patient-access", "--tenant", "acme", "--source", sid, "--in-process"]
    )
    assert out.exit_code == 0, out.output
    assert "1 connections: {'success': 1}" in out.output

    before = pa_env.cp.get_connection(conn_id).token_expires_at
    out = runner.invoke(main, ["connections", "refresh", conn_id, "--tenant", "acme"])
    assert out.exit_code == 0, out.output
    assert pa_env.cp.get_connection(conn_id).token_expires_at >= before
    refreshed = [
        e.detail for e in pa_env.cp.connection_events(conn_id) if e.event_type == "token.refreshed"
    ]
    assert [d["reason"] for d in refreshed] == ["forced"]

    build_warehouse("acme", settings=pa_env.settings, control_plane=pa_env.cp)
    out = runner.invoke(
        main, ["connections", "revoke", conn_id, "--tenant", "acme", "--delete-data"]
    )
    assert out.exit_code == 0, out.output
    assert "revoked (also at the source)" in out.output
    assert "warehouse of acme rebuilt" in out.output
    con = duckdb.connect(str(warehouse_path(pa_env.settings, "acme")), read_only=True)
    try:
        left = con.execute(
            "SELECT count(*) FROM resources WHERE connection = ?", [conn_id]
        ).fetchone()
    finally:
        con.close()
    assert left == (0,)

    out = runner.invoke(main, ["connections", "show", conn_id, "--tenant", "acme"])
    assert out.exit_code == 0
    assert "revoked" in out.output


def test_pulled_records_reach_the_warehouse(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    runner = CliRunner()
    out = runner.invoke(
        main, ["sync", "patient-access", "--tenant", "acme", "--source", sid, "--in-process"]
    )
    assert out.exit_code == 0, out.output
    build_warehouse("acme", settings=pa_env.settings, control_plane=pa_env.cp)
    con = duckdb.connect(str(warehouse_path(pa_env.settings, "acme")), read_only=True)
    try:
        rows = dict(
            con.execute(
                "SELECT resource_type, count(*) FROM resources WHERE connection = ? "
                "AND pattern = 'patient_access' GROUP BY 1",
                [conn_id],
            ).fetchall()
        )
    finally:
        con.close()
    assert rows["Patient"] == 1 and rows["Observation"] > 0


def test_ehr_launch_is_the_same_api_with_launch_and_iss(pa_env: PatientAccessEnv) -> None:
    """What the clinician-workflow pattern will do: launch + iss from the EHR, aud = iss."""
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    patient = pa_env.logins(org)[0].patient_id
    minted = pa_env.sandbox.admin(
        org.org_id,
        "launch",
        {"patient": patient, "user": "Practitioner/dr-1", "auto_approve": True},
    )
    conn_id = pa_env.cp.create_connection(
        tenant_id="acme", pattern="clinician_workflow", source_id=sid
    )
    req = begin_authorization(
        pa_env.cp,
        conn_id,
        redirect_uri=pa_env.callback,
        http=pa_env.http,
        launch=minted["launch"],
        iss=minted["iss"],
        scopes=["launch", "openid", "fhirUser", "patient/Patient.rs", "patient/Observation.rs"],
    )
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(req.url).query))
    assert q["launch"] == minted["launch"] and q["aud"] == minted["iss"]
    # The EHR user is signed in already and the app is pre-approved: straight back to us.
    resp = pa_env.http.get(req.url)
    assert resp.status_code == 302
    callback = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(resp.headers["location"]).query))
    outcome = complete_authorization(pa_env.cp, params=callback, http=pa_env.http)
    assert outcome.ok, outcome
    assert outcome.patient == patient
    assert outcome.context.get("fhirUser", "").endswith("Practitioner/dr-1")
    assert pa_env.cp.get_connection(conn_id).state == "active"


def test_ehr_launch_with_an_unknown_iss_is_refused(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id = pa_env.cp.create_connection(
        tenant_id="acme", pattern="clinician_workflow", source_id=sid
    )
    with pytest.raises(LaunchError) as info:
        begin_authorization(
            pa_env.cp,
            conn_id,
            redirect_uri=pa_env.callback,
            http=pa_env.http,
            launch="abc",
            iss="https://attacker.example/fhir",
        )
    assert info.value.reason == "unknown_iss"
    assert pa_env.cp.get_connection(conn_id).state == "failed"


def test_demo_helpers_connect_and_refresh_failed(pa_env: PatientAccessEnv) -> None:
    """The two helpers the lead's demo calls: connect patients, then show refresh_failed."""
    from medblocks_sandbox.drivers.consent import connect_patients, simulate_portal_revocation

    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    outcomes = connect_patients(
        pa_env.cp,
        tenant_id="acme",
        source_id=sid,
        logins=pa_env.logins(org)[:2],
        public_base_url=pa_env.web_base,
        http=pa_env.http,
    )
    assert [o.status for o in outcomes] == ["active", "active"]
    victim, other = outcomes[0].connection_id, outcomes[1].connection_id
    assert victim is not None and other is not None
    assert simulate_portal_revocation(pa_env.sandbox, pa_env.cp, victim) == "refresh_failed"
    assert pa_env.cp.get_connection(other).state == "active"


def test_sandbox_consent_commands_connect_then_revoke(
    pa_env: PatientAccessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dev tool's consent commands: a patient connects through a link made by the product's
    CLI, then revokes in the portal; the product's next refresh finds the grant gone."""
    from medblocks_sandbox.cli import main as sandbox_cli

    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    runner = CliRunner()
    out = runner.invoke(
        main,
        ["connections", "link", "--tenant", "acme", "--patient-ref", "cli-2", "--source", sid]
        + ["--return-url", RETURN_URL, "--public-base-url", pa_env.web_base],
    )
    assert out.exit_code == 0, out.output
    url = out.output.strip().splitlines()[-1]
    args = ["consent", "connect", url, "--username", login.username, "--password", login.password]
    out = runner.invoke(sandbox_cli, [*args, "--stop-at", RETURN_URL])
    assert out.exit_code == 0, out.output
    found = re.search(r"status active connection (conn_\w+)", out.output)
    assert found is not None, out.output
    conn_id = found.group(1)

    revoke = ["consent", "revoke", "--admin-url", org.admin_url, "--patient", login.patient_id]
    monkeypatch.setenv("MEDBLOCKS_SANDBOX_ADMIN_SECRET", pa_env.sandbox.admin_secret)
    out = runner.invoke(sandbox_cli, [*revoke, "--client-id", pa_env.clients[sid]])
    assert out.exit_code == 0 and "revoked 1 grant(s)" in out.output, out.output
    out = runner.invoke(sandbox_cli, [*revoke, "--client-id", "nobody"])
    assert out.exit_code == 1 and "error: no grant of that client" in out.output, out.output

    out = runner.invoke(main, ["connections", "refresh", conn_id, "--tenant", "acme"])
    assert out.exit_code == 1, out.output
    assert pa_env.cp.get_connection(conn_id).state == "refresh_failed"


def test_cli_sync_runs_the_dagster_job(
    pa_env: PatientAccessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = pa_env.settings.data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    conn_id, outcome = pa_env.connect(sid, pa_env.logins(org)[0])
    assert outcome.status == "active"
    out = CliRunner().invoke(main, ["sync", "patient-access", "--tenant", "acme", "--source", sid])
    assert out.exit_code == 0, out.output
    assert "succeeded" in out.output
    assert pa_env.cp.list_pulls(tenant_id="acme")[0].connection_id == conn_id

"""Smoke: connect one patient through the real consent page and pull their records."""

from medblocks_pipelines.lib.fhir.pull import pull_batch
from medblocks_pipelines_tests.patient_access.conftest import PatientAccessEnv


def test_connect_and_pull(pa_env: PatientAccessEnv) -> None:
    org = pa_env.org("ehr")
    sid = pa_env.add_source(org)
    login = pa_env.logins(org)[0]
    conn_id, outcome = pa_env.connect(sid, login)
    print(outcome)
    conn = pa_env.cp.get_connection(conn_id)
    print(conn["state"], conn["state_reason"], conn["scopes_granted"])
    for e in pa_env.cp.connection_events(conn_id):
        print(e["event_type"], e["detail"])
    assert conn["state"] == "active"
    batch = pull_batch(pa_env.cp, [conn_id], lake_root=pa_env.settings.lake_root, run_id="t1")
    print(batch.as_metadata())
    print(batch.results[0])
    assert batch.results[0].status == "success"

"""start_sandbox wiring added by the lead: the presigned file host for Oracle-like orgs (another
origin) and the bulk admin API next to the fault admin API."""

import httpx

from medblocks_sandbox.run import start_sandbox


def test_oracle_org_gets_a_presigned_host_and_bulk_admin_is_guarded() -> None:
    with start_sandbox(
        base_port=0, persons=4, seed=1, profiles={"lakeside-clinic": "oracle"}, roles=["ehr"]
    ) as handle:
        org = handle.org("lakeside-clinic")
        oracle = handle.org_handles("lakeside-clinic")["bulk"]
        strict = handle.org_handles("mercy-general")["bulk"]
        assert oracle.storage_base_url and strict.storage_base_url is None
        # Another origin: a different port from the EHR itself.
        assert (
            oracle.storage_base_url.rsplit(":", 1)[1]
            != org.base_url.rsplit(":", 1)[1].split("/")[0]
        )
        # The host answers, and refuses an unsigned URL (no credentials in a presigned request).
        resp = httpx.get(f"{oracle.storage_base_url}/presigned/nojob/file.ndjson", timeout=10)
        assert 400 <= resp.status_code < 500
        url = f"{org.base_url}/_sandbox/bulk"
        assert httpx.get(url, timeout=10).status_code == 403
        ok = httpx.get(url, headers={"x-sandbox-admin": handle.admin_secret}, timeout=10)
        assert ok.status_code == 200 and ok.json()["profile"]

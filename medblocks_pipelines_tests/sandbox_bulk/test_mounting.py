"""Several organizations' bulk servers mounted side by side in one app (as run.py does): each
export's polling and file URLs stay under its own organization's FHIR base."""

from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from medblocks_sandbox.bulk import BulkServer, create_bulk_app
from medblocks_sandbox.bulk_auth import StaticTokens
from medblocks_sandbox.bulk_jobs import BulkConfig
from medblocks_sandbox.fhir_store import FhirStore

from .conftest import KICKOFF_HEADERS, population, serve


def test_urls_keep_each_org_prefix(tmp_path: Path) -> None:
    tokens = StaticTokens()
    servers = {
        org: BulkServer(
            FhirStore(population()),
            authenticator=tokens,
            config=BulkConfig(export_seconds=0.0),
            work_dir=tmp_path / org,
        )
        for org in ("org-a", "org-b")
    }
    app = Starlette(
        routes=[
            Mount(f"/{org}/fhir", app=create_bulk_app(server)) for org, server in servers.items()
        ]
    )
    auth = {"Authorization": f"Bearer {tokens.issue('c', ['system/*.read'])}"}
    try:
        with serve(app) as base:
            for org in ("org-b", "org-a"):
                fhir = f"{base}/{org}/fhir"
                kick = httpx.get(fhir + "/Group/g1/$export", headers={**KICKOFF_HEADERS, **auth})
                assert kick.status_code == 202
                location = kick.headers["content-location"]
                assert location.startswith(fhir + "/bulk-status/")
                status = httpx.get(location, headers=auth)
                while status.status_code == 202:
                    status = httpx.get(location, headers=auth)
                manifest = status.json()
                assert manifest["request"] == fhir + "/Group/g1/$export"
                assert all(o["url"].startswith(fhir + "/bulk-files/") for o in manifest["output"])
                assert httpx.get(manifest["output"][0]["url"], headers=auth).status_code == 200
    finally:
        for server in servers.values():
            server.close()


def test_one_presigned_storage_for_several_oracle_orgs(tmp_path: Path) -> None:
    from medblocks_sandbox.bulk import presigned_storage_app

    tokens = StaticTokens()
    servers = [
        BulkServer(
            FhirStore(population()),
            authenticator=tokens,
            profile="oracle",
            config=BulkConfig(export_seconds=0.0),
            work_dir=tmp_path / str(n),
        )
        for n in range(2)
    ]
    app = Starlette(
        routes=[
            Mount(f"/org{n}/fhir", app=create_bulk_app(server)) for n, server in enumerate(servers)
        ]
    )
    auth = {"Authorization": f"Bearer {tokens.issue('c', ['system/*.read'])}"}
    try:
        with serve(app) as base, serve(presigned_storage_app(servers)) as storage:
            for server in servers:
                server.storage_base_url = storage
            bodies = []
            for n in (1, 0):
                kick = httpx.get(
                    f"{base}/org{n}/fhir/Group/g1/$export",
                    params={"_type": "Patient"},
                    headers={**KICKOFF_HEADERS, **auth},
                )
                status = httpx.get(kick.headers["content-location"], headers=auth)
                while status.status_code == 202:
                    status = httpx.get(kick.headers["content-location"], headers=auth)
                url = status.json()["output"][0]["url"]
                redirect = httpx.get(url, headers=auth)
                assert redirect.status_code == 307
                assert redirect.headers["location"].startswith(storage + "/presigned/")
                fetched = httpx.get(redirect.headers["location"])
                assert fetched.status_code == 200
                bodies.append(fetched.text)
            assert bodies[0] == bodies[1] and bodies[0].count("\n") == 2
            assert (
                httpx.get(
                    storage + "/presigned/nope/x.ndjson?X-Expires=1&X-Signature=a", headers=auth
                ).status_code
                == 400
            )
    finally:
        for server in servers:
            server.close()


def test_a_server_removes_the_folder_it_made(tmp_path: Path) -> None:
    import gc

    closed = BulkServer(FhirStore(population()), authenticator=StaticTokens())
    folder = closed.work_dir
    assert folder.is_dir()
    closed.close()
    assert not folder.exists()
    # Never closed (a test app, an embedded server): removed once it is collected.
    forgotten = BulkServer(FhirStore(population()), authenticator=StaticTokens())
    folder = forgotten.work_dir
    del forgotten
    gc.collect()
    assert not folder.exists()
    # A folder given by the caller is the caller's: kept.
    given = BulkServer(
        FhirStore(population()), authenticator=StaticTokens(), work_dir=tmp_path / "given"
    )
    given.close()
    assert (tmp_path / "given").is_dir()

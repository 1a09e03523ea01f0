"""Status polling, manifest, cancel, deleted bundles, _typeFilter/_elements and file download
(Bulk Data 2.0, SPECS 3.2-3.4), over a live server."""

import email.utils
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import KICKOFF_HEADERS, BulkEnv


def test_in_progress_status_has_progress_and_retry_after(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(export_seconds=1.0, retry_after=3)
    location = env.kickoff().headers["content-location"]
    response = httpx.get(location, headers={"Accept": "application/json", **env.auth()})
    assert response.status_code == 202
    assert response.headers["retry-after"] == "3"
    progress = response.headers["x-progress"]
    assert 0 < len(progress) < 100
    assert "% complete" in progress
    final = env.wait(location)
    assert final.status_code == 200


def test_manifest_contents(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(max_lines_per_file=2)
    before = time.time()
    manifest = env.export(params={"_type": "Observation,Patient"})
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["requiresAccessToken"] is True
    assert manifest["error"] == []
    assert manifest["request"].startswith(env.base + "/$export?")
    # Six observations in files of at most two lines: three Observation files.
    obs_files = [o for o in manifest["output"] if o["type"] == "Observation"]
    assert len(obs_files) == 3
    for item in manifest["output"]:
        assert item["url"].startswith(env.base + "/")
        assert item["count"] == len(env.lines(item["url"]))
    assert sum(o["count"] for o in obs_files) == 6
    tt = email.utils.parsedate_to_datetime(
        httpx.get(
            env.wait(env.kickoff().headers["content-location"]).url, headers=env.auth()
        ).headers["expires"]
    )
    assert tt.timestamp() > before


def test_empty_export_has_empty_output(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Immunization"})
    assert manifest["output"] == []


def test_delete_cancels_in_progress_export(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(export_seconds=30)
    location = env.kickoff().headers["content-location"]
    deleted = httpx.delete(location, headers=env.auth())
    assert deleted.status_code == 202
    after = httpx.get(location, headers=env.auth())
    assert after.status_code == 404
    assert after.json()["resourceType"] == "OperationOutcome"
    assert httpx.delete(location, headers=env.auth()).status_code == 404


def test_delete_after_completion_removes_files(env: BulkEnv) -> None:
    response = env.kickoff()
    location = response.headers["content-location"]
    manifest = env.wait(location).json()
    url = manifest["output"][0]["url"]
    assert httpx.get(url, headers=env.auth()).status_code == 200
    assert httpx.delete(location, headers=env.auth()).status_code == 202
    assert httpx.get(url, headers=env.auth()).status_code == 404
    assert httpx.get(location, headers=env.auth()).status_code == 404


def test_since_reports_deleted_resources_as_bundles(env: BulkEnv) -> None:
    cut = env.store.now()
    env.store.delete("Observation", "p1-hba1c")
    env.store.delete("Condition", "p3-dm")
    env.store.delete("Practitioner", "dr1")
    manifest = env.export("/Group/g1/$export", params={"_since": cut.isoformat()})
    bundles = env.all_of(manifest, "deleted")["Bundle"]
    entries = [e for b in bundles for e in b["entry"]]
    assert all(b["type"] == "transaction" for b in bundles)
    assert all(e["request"]["method"] == "DELETE" for e in entries)
    # p3 is not in the group: its deletion is not reported; the practitioner is shared.
    assert sorted(e["request"]["url"] for e in entries) == [
        "Observation/p1-hba1c",
        "Practitioner/dr1",
    ]
    assert manifest["output"] == []  # nothing else changed


def test_deleted_only_with_since(env: BulkEnv) -> None:
    env.store.delete("Observation", "p1-hba1c")
    manifest = env.export()
    assert manifest["deleted"] == []
    ids = {o["id"] for o in env.all_of(manifest)["Observation"]}
    assert "p1-hba1c" not in ids


def test_group_member_who_joined_after_since_gets_full_history(env: BulkEnv) -> None:
    cut = env.store.now()
    group = json.loads(json.dumps(env.store.get("Group", "g1")))
    group["member"].append(
        {"entity": {"reference": "Patient/p3"}, "period": {"start": env.store.now().isoformat()}}
    )
    env.store.put(group)
    manifest = env.export("/Group/g1/$export", params={"_since": cut.isoformat()})
    data = env.all_of(manifest)
    # p3's old data comes in full; old data of p1/p2 does not.
    assert {p["id"] for p in data["Patient"]} == {"p3"}
    assert {o["subject"]["reference"] for o in data["Observation"]} == {"Patient/p3"}


@pytest.mark.parametrize(
    ("type_filter", "expected"),
    [
        # one query
        ("MedicationRequest?status=active", {"p1-mr0", "p2-mr0", "p3-mr0"}),
        # two queries for the same type are OR-ed
        (
            "Observation?category=laboratory,Observation?code=http://loinc.org|85354-9",
            {"p1-hba1c", "p2-hba1c", "p3-hba1c", "p1-bp", "p2-bp", "p3-bp"},
        ),
        # URL-encoded query, AND of two params
        ("Observation%3Fcategory%3Dlaboratory%26subject%3DPatient%2Fp2", {"p2-hba1c"}),
        # dates of clinical events, with prefixes (SPECS 3.1: use _typeFilter, not _since)
        ("Observation?date=ge2023-05-01&category=laboratory", {"p1-hba1c", "p2-hba1c", "p3-hba1c"}),
        ("Observation?date=lt2023-05-01", set()),
    ],
)
def test_type_filter(env: BulkEnv, type_filter: str, expected: set[str]) -> None:
    from urllib.parse import unquote

    rtype = type_filter.split("?")[0].split("%3F")[0]
    manifest = env.export(params={"_type": f"{rtype},Patient", "_typeFilter": unquote(type_filter)})
    data = env.all_of(manifest)
    assert {r["id"] for r in data.get(rtype, [])} == expected
    assert len(data["Patient"]) == 3  # a type without a filter comes whole


def test_elements_subsets_and_tags(env: BulkEnv) -> None:
    manifest = env.export(
        params={"_type": "Patient,Observation", "_elements": "Patient.gender,status"}
    )
    data = env.all_of(manifest)
    patient = data["Patient"][0]
    assert set(patient) == {"resourceType", "id", "meta", "gender"}
    assert any(t["code"] == "SUBSETTED" for t in patient["meta"]["tag"])
    assert set(data["Observation"][0]) == {"resourceType", "id", "meta", "status"}


def test_download_gzip_when_accepted(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Observation"})
    url = manifest["output"][0]["url"]
    headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": "gzip", **env.auth()}
    with httpx.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert response.headers["content-type"].startswith("application/fhir+ndjson")
        raw = b"".join(response.iter_raw())
    lines = gzip.decompress(raw).decode().splitlines()
    assert len(lines) == 6
    plain = httpx.get(url, headers={"Accept-Encoding": "identity", **env.auth()})
    assert "content-encoding" not in plain.headers
    assert plain.text.splitlines() == lines


def test_download_range_resume(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Observation"})
    url = manifest["output"][0]["url"]
    base = {"Accept": "application/fhir+ndjson", "Accept-Encoding": "identity", **env.auth()}
    full = httpx.get(url, headers=base)
    assert full.headers["accept-ranges"] == "bytes"
    body = full.content
    first = httpx.get(url, headers={**base, "Range": "bytes=0-99"})
    assert first.status_code == 206
    assert first.content == body[:100]
    rest = httpx.get(url, headers={**base, "Range": "bytes=100-", "If-Range": full.headers["etag"]})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes 100-{len(body) - 1}/{len(body)}"
    assert first.content + rest.content == body
    beyond = httpx.get(url, headers={**base, "Range": f"bytes={len(body) + 10}-"})
    assert beyond.status_code == 416


def test_download_range_on_gzip_representation(env: BulkEnv) -> None:
    manifest = env.export(params={"_type": "Observation"})
    url = manifest["output"][0]["url"]
    headers = {"Accept-Encoding": "gzip", **env.auth()}
    with httpx.stream("GET", url, headers=headers) as whole:
        raw = b"".join(whole.iter_raw())
    with httpx.stream("GET", url, headers={**headers, "Range": "bytes=10-"}) as part:
        assert part.status_code == 206
        assert b"".join(part.iter_raw()) == raw[10:]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # no token although requiresAccessToken is true
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Accept": "text/html"}, 406),  # NDJSON only
    ],
)
def test_download_refusals(env: BulkEnv, headers: dict[str, str], status: int) -> None:
    manifest = env.export(params={"_type": "Patient"})
    url = manifest["output"][0]["url"]
    if "Authorization" not in headers and status != 401:
        headers = {**headers, **env.auth()}
    assert httpx.get(url, headers=headers).status_code == status


def test_other_client_cannot_poll_or_download(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    manifest = env.wait(location).json()
    other = env.auth("client-b")
    assert httpx.get(location, headers=other).status_code == 403
    assert httpx.delete(location, headers=other).status_code == 403
    assert httpx.get(manifest["output"][0]["url"], headers=other).status_code == 403


def test_unknown_file_and_job(env: BulkEnv) -> None:
    location = env.kickoff().headers["content-location"]
    env.wait(location)
    assert (
        httpx.get(
            location.replace("bulk-status", "bulk-files") + "/x.ndjson", headers=env.auth()
        ).status_code
        == 404
    )
    assert httpx.get(env.base + "/bulk-status/nope", headers=env.auth()).status_code == 404


def test_files_not_available_before_completion(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(export_seconds=30)
    location = env.kickoff(params={"_type": "Patient"}).headers["content-location"]
    job = env.server.jobs()[0]
    deadline = time.monotonic() + 10
    while not job.work_done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.work_done and job.files  # written on disk already...
    url = location.replace("bulk-status", "bulk-files") + "/" + job.files[0].name
    assert httpx.get(url, headers=env.auth()).status_code == 404  # ...but not served yet
    assert httpx.get(location, headers={**KICKOFF_HEADERS, **env.auth()}).status_code == 202


def test_polling_too_fast_gets_429_and_then_cancels(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(
        export_seconds=30, retry_after=2, enforce_retry_after=True, cancel_after_early_polls=3
    )
    location = env.kickoff().headers["content-location"]
    headers = env.auth()
    assert httpx.get(location, headers=headers).status_code == 202
    early = [httpx.get(location, headers=headers) for _ in range(3)]
    assert [r.status_code for r in early] == [429, 429, 429]
    assert 1 <= int(early[0].headers["retry-after"]) <= 2
    assert early[0].json()["issue"][0]["code"] == "throttled"
    # The server gave up on a client that kept hammering.
    assert httpx.get(location, headers=headers).status_code == 404


def test_polling_at_retry_after_is_fine(make_env: Callable[..., BulkEnv]) -> None:
    env = make_env(export_seconds=1.2, retry_after=1, enforce_retry_after=True)
    location = env.kickoff().headers["content-location"]
    headers = env.auth()
    statuses = []
    for _ in range(4):
        response = httpx.get(location, headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        time.sleep(int(response.headers["retry-after"]))
    assert statuses[-1] == 200 and 429 not in statuses


def test_unknown_patient_in_post_is_refused_unless_lenient(env: BulkEnv) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patient", "valueReference": {"reference": "Patient/nobody"}},
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        ],
    }
    strict = httpx.post(
        env.base + "/Patient/$export", json=body, headers={**KICKOFF_HEADERS, **env.auth()}
    )
    assert strict.status_code == 400
    lenient = httpx.post(
        env.base + "/Patient/$export",
        json=body,
        headers={**KICKOFF_HEADERS, "Prefer": "respond-async, handling=lenient", **env.auth()},
    )
    assert lenient.status_code == 202
    manifest = env.wait(lenient.headers["content-location"]).json()
    assert [p["id"] for p in env.all_of(manifest)["Patient"]] == ["p1"]
    issues = env.all_of(manifest, "error")["OperationOutcome"]
    assert issues[0]["issue"][0]["code"] == "not-found"


def test_bulk_admin_api(env: BulkEnv) -> None:
    admin = env.base + "/_sandbox/bulk"
    changed = httpx.patch(admin, json={"export_seconds": 30, "retry_after": 7})
    assert changed.status_code == 200
    assert changed.json()["config"]["export_seconds"] == 30.0
    location = env.kickoff().headers["content-location"]
    status = httpx.get(location, headers=env.auth())
    assert status.status_code == 202 and status.headers["retry-after"] == "7"
    jobs = httpx.get(admin).json()["jobs"]
    assert [(j["client_id"], j["status"]) for j in jobs] == [("client-a", "in-progress")]
    for bad in (
        {"export_seconds": -1},
        {"nope": 1},
        {"enforce_retry_after": 1},
        {"max_lines_per_file": 2.5},
        [1],
    ):
        assert httpx.patch(admin, json=bad).status_code == 400
    assert env.server.config.retry_after == 7


def test_export_that_crashes_reports_failure(
    make_env: Callable[..., BulkEnv], tmp_path: Path
) -> None:
    from medblocks_sandbox.bulk_source import NdjsonDirSource

    (tmp_path / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"a"}\n{broken\n')
    env = make_env(source=NdjsonDirSource(tmp_path))
    # _since makes the server read every line (an unfiltered export passes files through).
    location = env.kickoff(params={"_since": "2020-01-01T00:00:00Z"}).headers["content-location"]
    failed = env.wait(location)
    assert failed.status_code == 500
    issue = failed.json()["issue"][0]
    assert issue["code"] == "exception" and "broken" not in issue["diagnostics"]


def test_concurrent_exports_of_several_clients(env: BulkEnv) -> None:
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        ("client-1", "/Group/g1/$export", 2),
        ("client-2", "/Patient/$export", 3),
        ("client-3", "/$export", 3),
        ("client-4", "/Group/g1/$export", 2),
    ]

    def run(job: tuple[str, str, int]) -> int:
        client_id, path, _ = job
        manifest = env.export(path, client_id=client_id, params={"_type": "Patient"})
        return len(env.all_of(manifest, client_id=client_id)["Patient"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, jobs)) == [n for _, _, n in jobs]


def test_since_in_the_future_exports_nothing(env: BulkEnv) -> None:
    manifest = env.export(params={"_since": "2999-01-01T00:00:00Z"})
    assert manifest["output"] == [] and manifest["deleted"] == []

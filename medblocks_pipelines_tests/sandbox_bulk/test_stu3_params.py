"""The sandbox's Bulk Data STU3 kick-off parameters (``bulk_stu3.py``) and the vendor quirks added
for issue 12, over HTTP: ``organizeOutputBy=Patient`` blocks (headers, no ``type``,
``continuesInFile``), ``includeAssociatedData`` Provenance, ``allowPartialManifests`` pages, typed
POST parameter values, and the strict refusals (lenient turns them into warnings).
"""

import json
from typing import Any

import httpx
import pytest

from medblocks_sandbox.fhir_store import FhirStore

from .conftest import KICKOFF_HEADERS, BulkEnv, population

LENIENT = {"Prefer": "respond-async, handling=lenient"}


def _lines(env: BulkEnv, url: str) -> list[dict[str, Any]]:
    return env.lines(url)


def test_organize_output_by_patient_blocks(make_env: Any) -> None:
    env: BulkEnv = make_env(max_lines_per_file=4)
    manifest = env.export(
        "/Group/g1/$export",
        params={"organizeOutputBy": "Patient", "_type": "Patient,Observation,Condition"},
    )
    assert manifest["output"] and all("type" not in item for item in manifest["output"])
    blocks: dict[str, list[str]] = {}
    current = None
    for item in manifest["output"]:
        for line in _lines(env, item["url"]):
            if line["resourceType"] == "Parameters":
                (param,) = line["parameter"]
                assert param["name"] == "header"
                current = param["valueReference"]["reference"].split("/")[1]
                blocks[current] = []
            else:
                assert current is not None
                blocks[current].append(f"{line['resourceType']}/{line['id']}")
    assert sorted(blocks) == ["p1", "p2"]  # the Group's members, one block each
    assert sorted(blocks["p1"]) == [
        "Condition/p1-dm",
        "Observation/p1-bp",
        "Observation/p1-hba1c",
        "Patient/p1",
    ]
    # 4 lines per file: each block (1 header + 4 resources) spills into the next file
    assert any("continuesInFile" in item for item in manifest["output"])


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"organizeOutputBy": "Encounter"}, "/Group/g1/$export"),  # only Patient is supported
        ({"organizeOutputBy": "Patient"}, "/$export"),  # a system export has no patient
        ({"includeAssociatedData": "_myCustomData"}, "/$export"),  # custom values unsupported
        ({"includeAssociatedData": "Everything"}, "/$export"),  # not a defined value
        ({"allowPartialManifests": "yes"}, "/$export"),  # a boolean
    ],
)
def test_unsupported_stu3_values_are_refused_unless_lenient(
    make_env: Any, params: dict[str, str], path: str
) -> None:
    env: BulkEnv = make_env()
    refused = env.kickoff(path, params=params)
    if "allowPartialManifests" in params:
        assert refused.status_code == 400  # malformed, lenient or not
        return
    assert refused.status_code == 400, refused.text
    lenient = env.kickoff(path, params=params, headers=LENIENT)
    assert lenient.status_code == 202, lenient.text
    manifest = env.wait(lenient.headers["content-location"]).json()
    issues = [i for item in manifest["error"] for o in _lines(env, item["url"]) for i in o["issue"]]
    assert any(i["severity"] == "warning" for i in issues)


def test_include_associated_provenance(make_env: Any) -> None:
    store = FhirStore(population())
    for n, (target, recorded) in enumerate(
        [
            ("Observation/p1-bp", "2024-01-01T00:00:00Z"),
            ("Observation/p1-bp", "2025-01-01T00:00:00Z"),
            ("Observation/p3-bp", "2025-01-01T00:00:00Z"),
        ]
    ):
        store.put(
            {
                "resourceType": "Provenance",
                "id": f"prov{n}",
                "target": [{"reference": target}],
                "recorded": recorded,
                "agent": [{"who": {"reference": "Practitioner/dr1"}}],
            }
        )
    env: BulkEnv = make_env(store=store)
    for value, expected in (
        ("RelevantProvenanceResources", {"prov0", "prov1"}),
        ("LatestProvenanceResources", {"prov1"}),
    ):
        manifest = env.export(
            "/Group/g1/$export", params={"_type": "Observation", "includeAssociatedData": value}
        )
        data = env.all_of(manifest)
        assert {p["id"] for p in data["Provenance"]} == expected  # p3 is not in the Group


def test_paged_manifest_only_when_allowed(make_env: Any) -> None:
    env: BulkEnv = make_env(max_lines_per_file=2)
    env.faults.add("paged_manifest", page_size=2)
    whole = env.export("/$export", params={"_type": "Patient,Observation"})
    assert "link" not in whole  # not asked for: one manifest
    first = env.export(
        "/$export", params={"_type": "Patient,Observation", "allowPartialManifests": "true"}
    )
    assert len(first["output"]) == 2 and first["link"][0]["relation"] == "next"
    files = list(first["output"])
    url = first["link"][0]["url"]
    while url:
        page = httpx.get(url, headers={"Accept": "application/json", **env.auth()}).json()
        files += page["output"]
        url = next((lk["url"] for lk in page.get("link", []) if lk["relation"] == "next"), None)
    # the pages together list the same files as the whole manifest
    names = sorted(f["url"].rsplit("/", 1)[1] for f in files)
    assert names == sorted(f["url"].rsplit("/", 1)[1] for f in whole["output"])


def test_post_parameters_take_the_ig_value_types(make_env: Any) -> None:
    env: BulkEnv = make_env()
    headers = {**KICKOFF_HEADERS, **env.auth(), "Content-Type": "application/fhir+json"}

    def post(params: list[dict[str, Any]]) -> httpx.Response:
        body = {"resourceType": "Parameters", "parameter": params}
        return httpx.post(env.base + "/Group/g1/$export", content=json.dumps(body), headers=headers)

    ok = post(
        [
            {"name": "_since", "valueInstant": "2000-01-01T00:00:00Z"},
            {"name": "allowPartialManifests", "valueBoolean": True},
            {"name": "includeAssociatedData", "valueCode": "LatestProvenanceResources"},
        ]
    )
    assert ok.status_code == 202, ok.text
    assert post([{"name": "_type", "valueBoolean": True}]).status_code == 400
    assert post([{"name": "allowPartialManifests", "valueString": "maybe"}]).status_code == 400


def test_quirks_epoch_retry_after_expiry_and_partial_errors(make_env: Any) -> None:
    env: BulkEnv = make_env(export_seconds=5)
    env.faults.add("retry_after_epoch")
    started = env.kickoff("/$export", params={"_type": "Patient"})
    status = httpx.get(
        started.headers["content-location"], headers={"Accept": "application/json", **env.auth()}
    )
    assert status.status_code == 202 and int(status.headers["retry-after"]) > 1_000_000_000

    env2: BulkEnv = make_env()
    env2.faults.add("manifest_errors_partial", types=["Observation"])
    env2.faults.add("export_expires", after_downloads=1)
    response = env2.kickoff("/$export", params={"_type": "Patient,Observation"})
    manifest = env2.wait(response.headers["content-location"]).json()
    assert {i["type"] for i in manifest["output"]} == {"Patient"}
    outcome = _lines(env2, manifest["error"][0]["url"])  # the one download allowed
    assert outcome[0]["issue"][0]["severity"] == "error"
    assert "Observation" in outcome[0]["issue"][0]["diagnostics"]
    gone = httpx.get(
        manifest["output"][0]["url"],
        headers={"Accept": "application/fhir+ndjson", **env2.auth()},
    )
    assert gone.status_code == 410
    status = httpx.get(
        response.headers["content-location"], headers={"Accept": "application/json", **env2.auth()}
    )
    assert status.status_code == 404

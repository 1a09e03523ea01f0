"""Parity with the reference Bulk Data client, end to end against the sandbox EHR: organization
config keys ``organize_output_by`` (per-patient blocks landed without their header lines),
``include_associated_data`` (Provenance), ``lenient`` (``Prefer: handling=lenient``); and the
pure pieces: ``Retry-After`` forms, the token renewal margin, paged-manifest merging.
"""

from typing import Any

import httpx
import pytest

from medblocks_pipelines.lib.fhir.bulk import BulkClient, parse_manifest, parse_retry_after
from medblocks_pipelines.lib.fhir.bulk_sync import sync_organization
from medblocks_pipelines.lib.smart.backend import renewal_margin

from .conftest import TENANT, Env
from .test_sync_sandbox import _compartment_counts

ORG = "mercy-general"


def _sync(env: Env, run_id: str = "run-1"):  # type: ignore[no-untyped-def]
    return sync_organization(
        env.cp, env.settings, TENANT, ORG, run_id=run_id, min_wait=0.05, timeout=40
    )


def test_organize_output_by_patient_lands_the_same_resources(env: Env) -> None:
    ehr = env.add_org(ORG, org_config={"organize_output_by": "Patient"})
    report = _sync(env)
    assert report.counts_by_type == dict(_compartment_counts(ehr))
    assert "Parameters" not in report.counts_by_type  # the block headers are not data
    assert report.quarantined == 0 and report.count_mismatches == {}
    row = env.cp.list_bulk_exports(tenant_id=TENANT)[-1]
    assert row.request["organize_output_by"] == "Patient"
    assert any(i.type is None for i in parse_manifest(row.manifest).outputs)


def test_include_associated_provenance(env: Env) -> None:
    ehr = env.add_org(
        ORG,
        org_config={
            "types": ["Observation"],
            "include_associated_data": ["RelevantProvenanceResources"],
        },
    )
    targets = [o["id"] for o in list(ehr.store.iter_type("Observation"))[:3]]
    for n, oid in enumerate(targets):
        ehr.store.put(
            {
                "resourceType": "Provenance",
                "id": f"prov-{n}",
                "target": [{"reference": f"Observation/{oid}"}],
                "recorded": "2025-01-01T00:00:00Z",
                "agent": [{"who": {"reference": "Organization/x"}}],
            }
        )
    report = _sync(env)
    assert report.counts_by_type["Provenance"] == 3
    assert report.status == "success"


def test_lenient_turns_a_refusal_into_a_warning(env: Env) -> None:
    env.add_org(ORG, org_config={"types": ["Patient", "NotAType"], "lenient": True})
    report = _sync(env)
    assert set(report.counts_by_type) == {"Patient"}
    assert report.error_entries.get("warning", 0) >= 1
    assert report.status == "success"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),  # delay-seconds
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # an HTTP-date in the past
        (str(1_700_000_100), 100.0),  # an absolute epoch in seconds (vendor quirk)
        (str(1_700_000_100_000), 100.0),  # ... or in milliseconds
        ("soon", None),  # garbage: fall back to backoff
    ],
)
def test_retry_after_forms(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_700_000_000.0) == expected


@pytest.mark.parametrize(
    ("life", "margin"),
    [(300, 30.0), (3600, 60.0), (60, 6.0), (8, 4.0)],  # a tenth, within 5..60, at most half
)
def test_renewal_margin_scales_with_lifetime(life: float, margin: float) -> None:
    assert renewal_margin(life) == margin


def test_paged_manifest_pages_are_merged_in_order() -> None:
    base = "https://ehr.test/fhir"
    pages = {
        f"{base}/status": {
            "transactionTime": "2026-01-01T00:00:00Z",
            "output": [{"type": "Patient", "url": f"{base}/f1"}],
            "link": [{"relation": "next", "url": f"{base}/status?page=2"}],
        },
        f"{base}/status?page=2": {
            "transactionTime": "2026-01-01T00:00:00Z",
            "output": [{"type": "Observation", "url": f"{base}/f2"}],
            "error": [{"type": "OperationOutcome", "url": f"{base}/e1"}],
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        body: Any = pages.get(str(request.url))
        return httpx.Response(200 if body else 404, json=body or {})

    client = BulkClient(base, http=httpx.Client(transport=httpx.MockTransport(handler)))
    st = client.status(f"{base}/status")
    manifest = parse_manifest(st.manifest)
    assert [i.url.rsplit("/", 1)[1] for i in manifest.items] == ["f1", "f2", "e1"]
    assert "link" not in (st.manifest or {})

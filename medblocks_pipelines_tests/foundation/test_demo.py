"""The README's first command runs `medblocks-sandbox demo`: every pattern end to end against the sandbox.
This runs the same code on a small population and checks what a newcomer is promised, and that no
secret (access or refresh token, private key, client secret) reaches the logs, the console or any
Dagster event of those runs."""

import json
import logging
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from rich.console import Console

from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.warehouse.build import open_warehouse

# Fields whose values are credentials (OAuth tokens, PKCE verifiers, private JWK members, secrets).
SECRET_FIELDS = {
    "access_token",
    "refresh_token",
    "id_token",
    "code_verifier",
    "client_secret",
    "secret",
    "d",
    "p",
    "q",
    "dp",
    "dq",
    "qi",
    "k",
}


def _pem_lines(text: str, *, private: bool) -> set[str]:
    """Body lines of the PEM blocks in ``text``: private keys, or (``private=False``) the rest."""
    out: set[str] = set()
    for block in text.split("-----BEGIN ")[1:]:
        label, _, rest = block.partition("-----")
        if ("PRIVATE KEY" in label) == private:
            body = rest.split("-----END")[0].split()
            out |= {ln for ln in body[1:] if len(ln) >= 16}
    return out


def _secret_strings(value: Any) -> set[str]:
    """The credentials inside one vault value: token fields, private key material, raw secrets.

    Public material (certificates, public JWK members) and our own ids or URLs are not secrets.
    """
    if isinstance(value, str):
        if "PRIVATE KEY-----" in value:
            return _pem_lines(value, private=True)
        try:
            return _secret_strings(json.loads(value))
        except ValueError:
            return set()
    if isinstance(value, dict):
        found: set[str] = set()
        for key, item in value.items():
            if key in SECRET_FIELDS and isinstance(item, str) and len(item) >= 16:
                found.add(item)
            elif isinstance(item, dict | list | str):
                found |= _secret_strings(item)
        return found
    if isinstance(value, list):
        return set().union(*(_secret_strings(v) for v in value)) if value else set()
    return set()


def test_secret_extraction_finds_credentials_only() -> None:
    blob = json.dumps(
        {"access_token": "a" * 40, "refresh_token": "r" * 40, "token_endpoint": "http://x/token"}
    )
    assert _secret_strings(blob) == {"a" * 40, "r" * 40}
    jwk = {"key": json.dumps({"kty": "EC", "x": "x" * 48, "y": "y" * 48, "d": "d" * 48})}
    assert _secret_strings(json.dumps(jwk)) == {"d" * 48}
    pem = (
        "-----BEGIN PRIVATE KEY-----\nHEADERHEADERHEADER\n"
        + "s" * 64
        + "\n-----END PRIVATE KEY-----\n"
    )
    cert = (
        "-----BEGIN CERTIFICATE-----\nHEADERHEADERHEADER\n"
        + "c" * 64
        + "\n-----END CERTIFICATE-----\n"
    )
    assert _secret_strings(pem) == {"s" * 64}
    assert _secret_strings(cert) == set()


@pytest.mark.slow
def test_demo_runs_every_pattern_into_one_warehouse(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from medblocks_pipelines.lib.registry.sandbox_sources import is_stopped_sandbox
    from medblocks_sandbox.drivers.demo import TENANT, run_demo

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.delenv("MEDBLOCKS_SECRET_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    with open(tmp_path / "demo.txt", "w") as fh:
        state = run_demo(persons=16, seed=7, fresh=True, console=Console(file=fh, width=160))
    out = (tmp_path / "demo.txt").read_text()

    cp = state.cp
    states = {c.state for c in cp.list_connections(tenant_id=TENANT, pattern="patient_access")}
    assert {"active", "refresh_failed"} <= states
    audit = cp.list_audit(tenant_id=TENANT)
    queries = [a for a in audit if a.action == "network.query"]
    fhir = [a for a in queries if a.evidence.get("transport") == "facilitated_fhir"]
    decisions = sorted(a.decision for a in queries if a not in fhir)
    assert decisions == ["allowed", "refused"]
    # One TEFCA Facilitated FHIR query (UDAP) beside the IHE ones, answered by a node.
    assert [a.decision for a in fhir] == ["allowed"] and fhir[0].responders
    assert "UDAP" in out
    # The EHR's CDS Hooks calls were answered (and audited) for the launched patient.
    assert any(a.action == "cds.patient-view" and a.decision == "allowed" for a in audit)
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
    # The demo's sandbox is gone: its flagged sources read as stopped, so `make ui` skips them.
    sources = cp.list_sources()
    assert sources and all(is_stopped_sandbox(s) for s in sources)
    assert str(settings.warehouse_dir / "acme.duckdb") in out

    # Security: collect every credential the vault holds, then look for each one everywhere the
    # runs wrote text: our logs, the console, and every Dagster event (metadata included).
    secrets: set[str] = set()
    for name in cp.vault.names():
        found = cp.vault.get(name)
        assert found is not None
        secrets |= _secret_strings(found.reveal())
    # A private key's PEM also encodes its public modulus: any part of it that a certificate
    # (public, embedded as one base64 string in every SAML assertion) contains is not secret.
    public = ""
    for name in cp.vault.names():
        found = cp.vault.get(name)
        assert found is not None
        public += (
            "".join(
                ln
                for block in found.reveal().split("-----BEGIN CERTIFICATE-----")[1:]
                for ln in block.split("-----END")[0].split()
            )
            + "|"
        )
    secrets = {x for x in secrets if x not in public}
    assert len(secrets) >= 10, "the demo stored tokens and keys"
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) >= 6
        # The network stage ran as Dagster runs: the UI shows its materializations.
        network_mats = instance.fetch_materializations(
            dg.AssetKey(["network", "query_results"]), limit=10
        ).records
        # IHE for the related and the unrelated person, Facilitated FHIR for the related one.
        assert len(network_mats) == 3
        events = "\n".join(repr(entry) for run in runs for entry in instance.all_logs(run.run_id))
    leaking = sorted(
        {
            f"{rec.name}: {rec.getMessage()[:80]}".replace(secret, "<secret>")
            for rec in caplog.records
            for secret in secrets
            if secret in rec.getMessage()
        }
    )
    assert not leaking, f"loggers wrote credentials: {leaking}"
    haystacks = {"logs": caplog.text, "console": out, "dagster events": events}
    for where, text in haystacks.items():
        leaked = [s[:6] + "..." for s in secrets if s in text]
        assert not leaked, f"secrets found in {where}: {leaked}"

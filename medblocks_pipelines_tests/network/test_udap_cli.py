"""``medblocks network udap`` (key in the vault -> CSR -> the sandbox CA signs -> install ->
status with chain and CRL checks) and ``medblocks sync network --transport fhir``."""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

from medblocks_pipelines.cli.network import network_sync
from medblocks_pipelines.cli.udap import network
from medblocks_pipelines.lib.network.udap.certs import chain_pem
from medblocks_pipelines.lib.network.udap.session import SHARED_TOKENS
from medblocks_pipelines_tests.network.udap_support import PERSON, UdapEnv


@pytest.fixture
def env(tmp_path: Any, monkeypatch: Any) -> Iterator[UdapEnv]:
    with contextlib.ExitStack() as stack:
        e = UdapEnv(tmp_path, stack)
        monkeypatch.setenv("MEDBLOCKS_DATA_DIR", str(e.settings.data_dir))
        yield e


def test_issue_renew_and_status(env: UdapEnv, tmp_path: Any) -> None:
    sb = env.start()
    run = CliRunner().invoke
    assert run(network, ["udap", "keygen", "--identity", "clinic", "--kind", "ec"]).exit_code == 0
    again = run(network, ["udap", "keygen", "--identity", "clinic"])
    assert again.exit_code != 0  # never replaces a key silently
    csr = tmp_path / "clinic.csr"
    res = run(
        network,
        [
            "udap",
            "csr",
            "--identity",
            "clinic",
            "--san",
            "https://acme.test/udap/clinic#T-TREAT",
            "--out",
            str(csr),
        ],
    )
    assert res.exit_code == 0, res.output
    chain = tmp_path / "chain.pem"
    issued = chain_pem(sb.ca.sign_csr(csr.read_bytes()))
    chain.write_bytes(issued)
    res = run(network, ["udap", "install", "--identity", "clinic", "--chain", str(chain)])
    assert res.exit_code == 0, res.output
    anchor = tmp_path / "anchor.pem"
    anchor.write_bytes(sb.ca.anchor_pem())
    args = ["udap", "status", "--identity", "clinic", "--anchor", str(anchor), "--json"]
    status = json.loads(run(network, args).output)
    assert status["chain"] == "valid" and status["san_uris"] == [
        "https://acme.test/udap/clinic#T-TREAT"
    ]
    assert status["renew"] is False
    # Renewal keeps the key: the CSR carries the installed certificate's SAN URIs.
    renew = run(network, ["udap", "csr", "--identity", "clinic"])
    assert "BEGIN CERTIFICATE REQUEST" in renew.output
    # A certificate for another key is refused at install.
    _key, other = sb.ca.issue(["https://acme.test/udap/clinic#T-TREAT"])
    chain.write_bytes(chain_pem(other))
    assert run(
        network, ["udap", "install", "--identity", "clinic", "--chain", str(chain)]
    ).exit_code
    # Revoked: status says so (the CRL is fetched from the sandbox CA's distribution point).
    sb.ca.revoke(x509.load_pem_x509_certificates(issued)[0])
    assert json.loads(run(network, args).output)["chain"] == "certificate revoked"


def test_sync_network_fhir_and_registrations(
    env: UdapEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sync is a Dagster run: the embedded instance of this test's data folder, never one an
    # earlier test left in DAGSTER_HOME (set, then removed, so teardown also drops the value the
    # CLI sets).
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("DAGSTER_HOME")
    env.start()
    runner = CliRunner()
    args = [
        "--tenant",
        "acme",
        "--person",
        PERSON,
        "--purpose",
        "T-TREAT",
        "--network",
        "sandbox-fhir",
        "--transport",
        "fhir",
        "--json",
    ]
    refused = runner.invoke(network_sync, args)
    assert refused.exit_code == 1 and refused.output, (refused.output, refused.exception)
    assert json.loads(refused.output)["reason"] == "no_treatment_relationship"
    env.launch()
    env.land_patient()
    SHARED_TOKENS._tokens.clear()
    ok = runner.invoke(network_sync, args)
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output)
    assert out["transport"] == "facilitated_fhir" and out["node_status"] == {"ok": 2}
    regs = runner.invoke(network, ["udap", "registrations", "--network", "sandbox-fhir"])
    assert regs.exit_code == 0 and "riverside-health" in regs.output

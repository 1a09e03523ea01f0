"""Helpers for the UDAP / Facilitated FHIR tests: a live UDAP sandbox and a tenant wired to it."""

import contextlib
from typing import Any

import duckdb

from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.facilitated import run_facilitated_query
from medblocks_pipelines.lib.network.udap.certs import chain_pem, store_identity
from medblocks_pipelines.lib.registry import open_control_plane
from medblocks_pipelines.lib.settings import get_settings
from medblocks_pipelines.lib.warehouse.lake import LakeWriter, Provenance, resources_glob
from medblocks_pipelines_tests.network.fixtures import patient_bundle
from medblocks_sandbox.run import serve
from medblocks_sandbox.udap import (
    NodeSpec,
    UdapSandbox,
    create_udap_app,
    facilitated_source_config,
)

PERSON = "person-1"
SAN = "https://medblocks.test/udap/acme"
PURPOSES = ("T-TREAT", "T-TRTMNT", "T-IAS", "T-PYMNT")


def node_resources(pid: str) -> list[dict[str, Any]]:
    """The test patient (as ``pid``), their records, and another patient."""
    patient, resources = patient_bundle(pid)
    other, other_res = patient_bundle(f"{pid}-other")
    other["name"] = [{"family": "Nguyen", "given": ["Bao"]}]
    other["birthDate"] = "1955-01-01"
    return [patient, *resources, other, *other_res]


def default_specs() -> list[NodeSpec]:
    """Two nodes holding the same person under different local ids."""
    return [
        NodeSpec("riverside-health", "Riverside Health", node_resources("rv-1")),
        NodeSpec("valley-medical", "Valley Medical", node_resources("vm-7")),
    ]


def start_sandbox(stack: contextlib.ExitStack, specs: list[NodeSpec], **kw: Any) -> UdapSandbox:
    """Serve a UDAP sandbox on loopback until ``stack`` closes."""
    holder: dict[str, UdapSandbox] = {}

    def factory(base: str) -> Any:
        holder["sb"] = create_udap_app(base, specs, **kw)
        return holder["sb"].app

    stack.enter_context(serve(factory))
    return holder["sb"]


class UdapEnv:
    """A control plane with one tenant and a network source using the UDAP sandbox."""

    def __init__(self, tmp_path: Any, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.settings = get_settings(tmp_path / "data")
        self.settings.ensure_dirs()
        self.cp = open_control_plane(self.settings)
        self.cp.add_tenant(
            "acme",
            "Acme Care",
            settings={
                "network": {
                    "purposes": ["T-TREAT", "T-TRTMNT", "T-IAS"],
                    "organization": "acme-clinic",
                    "organization_name": "Acme Clinic",
                    "rce_organization_id": "urn:oid:2.16.840.1.113883.3.9999.77",
                    "npi": "1234567893",
                }
            },
        )
        self.cp.add_source(
            "mercy",
            "Mercy EHR",
            "epic",
            "ehr",
            "http://127.0.0.1:1/fhir",
            ["clinician_workflow", "patient_access"],
        )
        self.cp.add_organization("acme-clinic", "acme", "mercy", "Acme Clinic")
        self.demo = ihe.Demographics.from_patient(node_resources("x")[0])
        self.sb: UdapSandbox | None = None

    def start(
        self,
        specs: list[NodeSpec] | None = None,
        *,
        timeout_s: float = 10.0,
        key_kind: str = "rsa",
        **kw: Any,
    ) -> UdapSandbox:
        """Start the sandbox, issue our certificate (one SAN URI per XP), register the source."""
        self.sb = sb = start_sandbox(self.stack, specs or default_specs(), **kw)
        key, chain = sb.ca.issue([f"{SAN}#{p}" for p in PURPOSES], key_kind=key_kind)
        assert key is not None
        store_identity(self.cp.vault, "acme", key, chain_pem(chain))
        block = facilitated_source_config(sb)
        block.update(
            {"identity": "acme", "timeout_s": timeout_s, "contacts": ["mailto:ops@acme.test"]}
        )
        self.cp.add_source(
            "sandbox-fhir",
            "Sandbox Facilitated FHIR",
            "sandbox",
            "network",
            None,
            ["network"],
            config={
                "home_community_id": "urn:oid:2.16.840.1.113883.3.9999.100",
                "facilitated_fhir": block,
            },
        )
        return sb

    def launch(self, person: str = PERSON) -> str:
        """An EHR launch: a documented treatment relationship for ``person``."""
        cid = self.cp.create_connection(
            tenant_id="acme",
            pattern="clinician_workflow",
            source_id="mercy",
            organization_id="acme-clinic",
            patient_ref=person,
        )
        self.cp.transition(cid, "active")
        return cid

    def land_patient(self, person: str = PERSON) -> None:
        """The person's own Patient (from the EHR) in the lake: where demographics come from."""
        patient = dict(node_resources("x")[0], id=person)
        prov = Provenance("acme", "clinician_workflow", "mercy", "acme-clinic", None, "r1")
        with LakeWriter(self.settings.lake_root, prov) as w:
            assert w.add(patient)

    def query(self, purpose: str = "T-TREAT", **kw: Any) -> Any:
        """One Facilitated FHIR query for ``person``."""
        return run_facilitated_query(
            self.cp,
            self.settings,
            tenant="acme",
            person=kw.pop("person", PERSON),
            purpose=purpose,
            actor="dr-house",
            demographics=kw.pop("demographics", self.demo),
            network="sandbox-fhir",
            **kw,
        )

    def lake(self, sql: str) -> list[tuple[Any, ...]]:
        """Query the tenant's landed rows as ``lake``."""
        glob = resources_glob(self.settings.lake_root, "acme")
        con = duckdb.connect()
        try:
            con.execute(
                f"CREATE VIEW lake AS SELECT * FROM read_parquet('{glob}', "
                "hive_partitioning=true, union_by_name=true)"
            )
            return con.execute(sql).fetchall()
        finally:
            con.close()

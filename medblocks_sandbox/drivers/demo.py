"""`medblocks-sandbox demo` (`make demo`): every pattern end to end on the embedded default.

1. Start the sandbox on loopback (two EHR organizations, a payer, an exchange gateway, an EHR that
   calls CDS Hooks when present) and our own web app (JWKS, connect links, SMART callbacks, CDS).
2. Register a tenant, its sources and organizations, our signing key, and our clients at the sandbox.
3. Backend: a Bulk Data export per organization (SMART Backend Services), then the sandbox changes
   and deletes records and a second, incremental sync picks up only those.
4. Patient access: patients connect through the real consent pages of an EHR and the payer; their
   records are pulled; one patient revokes in the portal and the connection goes ``refresh_failed``.
5. Network: a Treatment query for a person with a relationship lands C-CDA documents of two
   network organizations; a query without a relationship is refused and audited.
6. Clinician workflow: an EHR launch and CDS Hooks calls answered from the warehouse (when built).
7. The tenant warehouse is built (Dagster job) and a summary printed, with queries to paste.

Every sync runs the same Dagster jobs as the UI, in-process, on the instance under data/dagster_home.
"""

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane, utcnow
from medblocks_pipelines.lib.registry.db import make_engine, upgrade
from medblocks_pipelines.lib.registry.sandbox_sources import SANDBOX_FLAG
from medblocks_pipelines.lib.settings import Settings, get_settings

TENANT = "acme"
EHR_ORGS = ("mercy-general", "lakeside-clinic")
PAYER = "summit-health-plan"
NETWORK = "sandbox-qhin"
BACKEND_CLIENT = "medblocks-backend"
PATIENT_CLIENT = "medblocks-patient-app"
RETURN_URL = "https://app.acme.example/connected"

EXAMPLE_QUERIES = [
    (
        "Current resources by source and type",
        "SELECT source, resource_type, count(*) AS n FROM resources GROUP BY ALL ORDER BY ALL",
    ),
    (
        "Persons seen through more than one pattern",
        "SELECT p.person_id, count(DISTINCT r.pattern) AS patterns, "
        "list(DISTINCT r.pattern ORDER BY r.pattern) AS via "
        "FROM patient_links p JOIN resource_sightings r ON r.resource_key = p.patient_key "
        "GROUP BY ALL HAVING count(DISTINCT r.pattern) > 1 ORDER BY patterns DESC LIMIT 10",
    ),
]


@dataclass
class DemoState:
    """What the stages share."""

    settings: Settings
    cp: ControlPlane
    sandbox: Any
    web_base: str
    console: Console
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _stage(state: DemoState, title: str) -> Iterator[None]:
    state.console.rule(f"[bold]{title}")
    started = time.perf_counter()
    with state.console.status(title):
        yield
    took = time.perf_counter() - started
    state.timings[title] = took
    state.console.print(f"[dim]{title}: {took:.1f}s")


def _fresh_data_dir(settings: Settings) -> None:
    for name in ("control.db", "control.db-wal", "control.db-shm"):
        (settings.data_dir / name).unlink(missing_ok=True)
    for name in ("lake", "warehouse", "dagster_home", "sandbox"):
        shutil.rmtree(settings.data_dir / name, ignore_errors=True)


# -- setup -------------------------------------------------------------------------------------
def register(state: DemoState) -> None:
    """Tenant, sources, organizations, our key, our clients at the sandbox."""
    from medblocks_pipelines.lib.smart.keys import KeyStore
    from medblocks_pipelines.web.jwks import jwks_url

    cp, sb = state.cp, state.sandbox
    keys = KeyStore(cp.vault)
    if not keys.all():
        keys.generate("ES384")
    jwks = jwks_url(state.web_base)
    callback = f"{state.web_base}/connect/callback"
    sb.register_client(
        {
            "client_id": BACKEND_CLIENT,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": jwks,
            "scopes": ["system/*.rs", "system/*.read"],
        },
        kinds=("ehr",),
    )
    sb.register_client(
        {
            "client_id": PATIENT_CLIENT,
            "token_endpoint_auth_method": "none",
            "redirect_uris": [callback],
            "name": "Acme Health App",
        }
    )
    cp.add_tenant(
        TENANT,
        "Acme Health App",
        {
            "delete_on_revoke": False,
            "network": {
                "purposes": ["T-TREAT", "T-TRTMNT", "T-IAS"],
                "organization": EHR_ORGS[0],
                "npi": "1234567893",
            },
        },
    )
    for org_id in EHR_ORGS:
        endpoint = sb.org(org_id)
        cp.add_source(
            org_id,
            endpoint.name,
            "sandbox",
            "ehr",
            endpoint.fhir_base,
            ["backend", "patient_access", "clinician_workflow"],
            {
                "client_id": PATIENT_CLIENT,
                "backend_client_id": BACKEND_CLIENT,
                "jwks_url": jwks,
                "cadence": "0 2 * * *",
                SANDBOX_FLAG: True,
            },
        )
        cp.add_organization(org_id, TENANT, org_id, endpoint.name, {"group_id": None})
    payer = sb.org(PAYER)
    cp.add_source(
        PAYER,
        payer.name,
        "sandbox",
        "payer",
        payer.fhir_base,
        ["patient_access"],
        {"client_id": PATIENT_CLIENT, SANDBOX_FLAG: True},
    )
    _register_network(state)


def _register_network(state: DemoState) -> None:
    role = state.sandbox.roles.get("gateway")
    if role is None:
        return
    from medblocks_pipelines.lib.network.certs import generate_signing_identity

    cfg = dict(role.extra["source_config"])
    udap = state.sandbox.roles.get("udap")
    if udap is not None:
        cfg["facilitated_fhir"] = _udap_identity(state, udap.extra["sandbox"])
    key, cert = state.results.setdefault("network_identity", generate_signing_identity("acme"))
    state.cp.vault.put(f"network/{NETWORK}/key", key.decode())
    state.cp.vault.put(f"network/{NETWORK}/cert", cert.decode())
    cfg["signing_key_secret"] = f"network/{NETWORK}/key"
    cfg["signing_cert_secret"] = f"network/{NETWORK}/cert"
    cfg[SANDBOX_FLAG] = True
    state.cp.add_source(NETWORK, "Sandbox QHIN", "sandbox", "network", None, ["network"], cfg)


def _udap_identity(state: DemoState, sandbox: Any) -> dict[str, Any]:
    """Our UDAP client certificate: a key made in the vault, a CSR, the sandbox CA signs it."""
    from medblocks_pipelines.lib.network.udap.certs import (
        chain_pem,
        generate_key,
        make_csr,
        store_identity,
    )
    from medblocks_sandbox.udap import facilitated_source_config

    key = generate_key("rsa")
    uris = [f"https://acme.example/udap/{TENANT}#{xp}" for xp in ("T-TREAT", "T-TRTMNT", "T-IAS")]
    chain = sandbox.ca.sign_csr(make_csr(key, uris, "Acme Health App"))
    store_identity(state.cp.vault, TENANT, key, chain_pem(chain))
    block = facilitated_source_config(sandbox)
    block.update({"identity": TENANT, "client_name": "Acme Health App"})
    return block


# -- patterns ----------------------------------------------------------------------------------
def backend(state: DemoState) -> None:
    """Full export per organization, sandbox changes, incremental export per organization."""
    from medblocks_pipelines.cli.backend import run_backend_sync

    rows = []
    for org_id in EHR_ORGS:
        md = run_backend_sync(state.cp, state.settings, TENANT, org_id, full=True, min_wait=0.2)
        rows.append(("full", org_id, md))
    changed = state.sandbox.apply_changes(1)
    # And a record withdrawn at each EHR (an entered-in-error result), so the incremental export
    # always carries a deletion for the warehouse to apply.
    for org_id in EHR_ORGS:
        obs = next(
            r
            for r in state.sandbox.population.resources_for(org_id)
            if r["resourceType"] == "Observation"
        )
        state.sandbox.admin(
            org_id, "apply-changes", {"deletes": [{"resourceType": "Observation", "id": obs["id"]}]}
        )
    state.results["sandbox_changes"] = changed
    for org_id in EHR_ORGS:
        md = run_backend_sync(state.cp, state.settings, TENANT, org_id, min_wait=0.2)
        rows.append(("incremental", org_id, md))
    table = Table(title="backend: Bulk Data exports")
    for col in ("sync", "organization", "landed", "deleted", "quarantined", "next _since"):
        table.add_column(col)
    for kind, org_id, md in rows:
        table.add_row(
            kind,
            org_id,
            str(_md(md, "landed", "resources")),
            str(_md(md, "deleted")),
            str(_md(md, "quarantined")),
            str(_md(md, "watermark", "transaction_time")),
        )
    state.console.print(table)


def _md(md: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in md:
            value = md[name]
            return getattr(value, "value", value)
    return "-"


def patient_access(state: DemoState, *, patients: int = 4) -> None:
    """Patients connect through the consent pages of an EHR and the payer; pull; one revokes."""
    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.lib.partitions import partition_key
    from medblocks_sandbox.drivers.consent import connect_patients, simulate_portal_revocation

    pop = state.sandbox.population
    outcomes: list[Any] = []
    for source in (EHR_ORGS[0], PAYER):
        logins = [lg for lg in pop.logins if lg.org_id == source][:patients]
        outcomes += connect_patients(
            state.cp,
            tenant_id=TENANT,
            source_id=source,
            logins=logins,
            public_base_url=state.web_base,
            return_url=RETURN_URL,
        )
        run_job(
            "patient_access_pull_job",
            partition_key=partition_key(TENANT, source),
            run_config={"ops": {"patient_access__records": {"config": {"all_active": True}}}},
            tags={"medblocks/tenant": TENANT, "medblocks/source": source},
        )
    active = [o for o in outcomes if o.connection_id and o.status == "active"]
    revoked_state = None
    if active:
        revoked_state = simulate_portal_revocation(state.sandbox, state.cp, active[0].connection_id)
        state.results["refresh_failed_connection"] = active[0].connection_id
    table = Table(title="patient access: consents through the portal")
    for col in ("connection", "source", "state", "resources pulled"):
        table.add_column(col)
    pulls = {p.connection_id: p for p in state.cp.list_pulls(tenant_id=TENANT, limit=1000)}
    for o in outcomes:
        if not o.connection_id:
            continue
        conn = state.cp.get_connection(o.connection_id)
        pull = pulls.get(o.connection_id)
        pulled = sum(pull.counts.values()) if pull else 0
        table.add_row(o.connection_id, conn.source_id, conn.state, str(pulled))
    state.console.print(table)
    if revoked_state:
        state.console.print(
            f"one patient revoked access in the portal: connection {active[0].connection_id} "
            f"is now [bold]{revoked_state}[/bold] (see `medblocks connections show "
            f"{active[0].connection_id} --tenant {TENANT}`)"
        )


def _same_demographics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two Patients of one person carry the same name and birth date (no misspelling)."""
    na, nb = (a.get("name") or [{}])[0], (b.get("name") or [{}])[0]
    return (
        a.get("birthDate") == b.get("birthDate")
        and (na.get("family") or "").lower() == (nb.get("family") or "").lower()
        and [g.lower() for g in na.get("given") or []][:1]
        == [g.lower() for g in nb.get("given") or []][:1]
    )


def _network_persons(state: DemoState) -> tuple[str, str]:
    """A person seen at our EHR org and at a network community under the same demographics (so
    XCPD matches on what we landed), and a person known only to the network communities."""
    pop = state.sandbox.population
    by_person: dict[str, dict[str, str]] = {}
    for org_id, patient_id, person_id in pop.truth:
        by_person.setdefault(person_id, {})[org_id] = patient_id
    communities = ("riverside-health", "valley-medical")
    patients = {
        (org, r["id"]): r
        for org in (EHR_ORGS[0], *communities)
        for r in pop.resources_for(org)
        if r["resourceType"] == "Patient"
    }

    def matches(orgs: dict[str, str]) -> bool:
        ours = patients.get((EHR_ORGS[0], orgs[EHR_ORGS[0]]))
        return ours is not None and any(
            c in orgs and _same_demographics(ours, patients.get((c, orgs[c])) or {})
            for c in communities
        )

    networked = next(
        orgs for _, orgs in sorted(by_person.items()) if EHR_ORGS[0] in orgs and matches(orgs)
    )
    unrelated = next(
        orgs
        for _, orgs in sorted(by_person.items())
        if EHR_ORGS[0] not in orgs and any(c in orgs for c in communities)
    )
    net_org = next(c for c in communities if c in unrelated)
    return (
        f"{EHR_ORGS[0]}/Patient/{networked[EHR_ORGS[0]]}",
        f"{net_org}/Patient/{unrelated[net_org]}",
    )


def network(state: DemoState) -> None:
    """A Treatment query with a documented relationship, and one refused without: each a run of
    ``network_query_job`` (the UI shows both materializations of ``network/query_results``)."""
    if "gateway" not in state.sandbox.roles:
        state.console.print("[yellow]no exchange gateway in this sandbox; skipped")
        return
    from medblocks_pipelines.cli.network import run_network_sync
    from medblocks_pipelines.lib.network.evidence import record_relationship_event

    related, unrelated = _network_persons(state)
    # A recent encounter at the tenant's organization documents the relationship.
    record_relationship_event(
        state.cp,
        tenant=TENANT,
        person=related,
        kind="encounter",
        ref=f"demo-encounter-{related.rsplit('/', 1)[-1]}",
        organization=EHR_ORGS[0],
        at=utcnow() - timedelta(days=2),
    )
    rows = []
    for person_ref in (related, unrelated):
        # Demographics for XCPD come from the Patient the backend stage landed, inside the run.
        r = run_network_sync(
            state.cp,
            tenant=TENANT,
            person=person_ref,
            purpose="T-TREAT",
            actor="dr-grey@acme",
            network=NETWORK,
        )
        rows.append((person_ref, {**r, "via": "IHE"}))
    if "udap" in state.sandbox.roles:
        # The same related person through TEFCA Facilitated FHIR: directory -> UDAP registration
        # + B2B token -> $match -> US Core, under the same purpose gate and audit.
        r = run_network_sync(
            state.cp,
            tenant=TENANT,
            person=related,
            purpose="T-TREAT",
            actor="dr-grey@acme",
            network=NETWORK,
            transport="fhir",
        )
        rows.append((related, {**r, "via": "FHIR+UDAP"}))
    table = Table(title="network: TEFCA Treatment queries (IHE: XCPD -> XCA -> C-CDA; FHIR: UDAP)")
    for col in ("via", "person", "decision", "reason", "responders", "documents", "resources"):
        table.add_column(col)
    for person_ref, r in rows:
        table.add_row(
            r["via"],
            person_ref,
            "allowed" if r["allowed"] else "refused",
            r["reason"] or "-",
            str(r["responders"]),
            str(r["documents_retrieved"]),
            str(r["resources"]),
        )
    state.console.print(table)


def clinician(state: DemoState) -> None:
    """An EHR launches our app and calls our CDS services; cards come from the warehouse."""
    if "cds_ehr" not in state.sandbox.roles:
        state.console.print("[yellow]no CDS-calling EHR in this sandbox; skipped")
        return
    from medblocks_pipelines.cli.runtime import run_job
    from medblocks_pipelines.lib.partitions import partition_key
    from medblocks_sandbox.drivers.clinician import run_clinician_demo

    # A patient whose record also arrived through the other patterns, so the cards have news.
    patient = _cross_pattern_patient(state)
    out = run_clinician_demo(
        state.sandbox, state.cp, state.settings, tenant=TENANT, org=EHR_ORGS[0], patient=patient
    )
    state.results["clinician"] = out
    state.console.print(
        f"EHR launch of our app for patient {out['patient']}: connection {out['connection_id']}, "
        f"app page HTTP {out['app_status']}"
    )
    for hook in ("patient_view", "order_select"):
        cards = out[hook]["cards"]
        table = Table(title=f"CDS Hooks {hook.replace('_', '-')}: {len(cards)} cards")
        for col in ("indicator", "summary", "source"):
            table.add_column(col)
        for card in cards:
            table.add_row(
                card.get("indicator", ""),
                card.get("summary", ""),
                card.get("source", {}).get("label", ""),
            )
        state.console.print(table)
    # The launch is an event: the sensor would turn it into a targeted sync within seconds; the
    # demo runs that same job now, then rebuilds the warehouse.
    org_id = out["organization_id"]
    run_job(
        "clinician_sync_job",
        partition_key=partition_key(TENANT, org_id),
        run_config={
            "ops": {
                "clinician_workflow__records": {
                    "config": {"connection_ids": [out["connection_id"]]}
                }
            }
        },
        tags={"medblocks/tenant": TENANT},
    )
    build(state)


def _cross_pattern_patient(state: DemoState) -> str | None:
    from medblocks_pipelines.lib.warehouse.build import open_warehouse

    with open_warehouse(TENANT, settings=state.settings) as con:
        row = con.execute(
            "SELECT split_part(l.patient_key, '/', 3) FROM patient_links l "
            "JOIN resource_sightings s ON s.resource_key = l.patient_key "
            f"WHERE l.patient_key LIKE '{EHR_ORGS[0]}/Patient/%' "
            "AND l.person_id IN (SELECT l2.person_id FROM patient_links l2 "
            "  JOIN resource_sightings s2 ON s2.resource_key = l2.patient_key "
            "  GROUP BY 1 HAVING count(DISTINCT s2.pattern) >= 3) "
            "ORDER BY 1 LIMIT 1"
        ).fetchone()
    return row[0] if row else None


def build(state: DemoState) -> None:
    """The tenant warehouse, through the same Dagster job the UI runs."""
    from medblocks_pipelines.cli.runtime import run_job

    run_job("tenant_warehouse_job", partition_key=TENANT, tags={"medblocks/tenant": TENANT})


def summary(state: DemoState) -> None:
    """Counts, cross-pattern persons, audit, and where to go next."""
    from medblocks_pipelines.lib.warehouse.build import open_warehouse, warehouse_path

    path = warehouse_path(state.settings, TENANT)
    with open_warehouse(TENANT, settings=state.settings) as con:
        tables = {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema='main'"
            ).fetchall()
        }
        by_pattern = con.execute(
            "SELECT pattern, count(DISTINCT split_part(resource_key, '/', 1)) AS sources, "
            "count(DISTINCT resource_key) AS resources "
            "FROM resource_sightings GROUP BY pattern ORDER BY pattern"
        ).fetchall()
        table = Table(title=f"warehouse {TENANT}: what arrived through each pattern")
        for col in ("pattern", "sources", "resources"):
            table.add_column(col)
        for row in by_pattern:
            table.add_row(*(str(v) for v in row))
        state.console.print(table)
        counts = Table(title="warehouse tables")
        counts.add_column("table")
        counts.add_column("rows", justify="right")
        for name in sorted(tables):
            n = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()
            counts.add_row(name, f"{n[0] if n else 0:,}")
        state.console.print(counts)
        if {"patient_links", "resources"} <= tables:
            rows = con.execute(EXAMPLE_QUERIES[1][1]).fetchall()
            state.console.print(
                f"persons linked across more than one pattern: {len(rows)} (top: "
                + ", ".join(f"{r[0]} via {'+'.join(r[2])}" for r in rows[:3])
                + ")"
            )
    queries = [a for a in state.cp.list_audit(tenant_id=TENANT) if a.action == "network.query"]
    refused = [a for a in queries if a.decision == "refused"]
    state.console.print(
        f"network audit log: {len(queries)} queries, {len(refused)} refused "
        f"(`medblocks audit list --tenant {TENANT}`)"
    )
    state.console.rule("[bold]next")
    state.console.print(f"DuckDB warehouse: [bold]{path}[/bold]")
    for title, sql in EXAMPLE_QUERIES:
        state.console.print(
            f'  # {title}\n  .venv/bin/medblocks warehouse query --tenant {TENANT} "{sql}"'
        )
    state.console.print(
        "  (any DuckDB client works too, read-only: duckdb.connect(path, read_only=True))"
    )
    state.console.print(
        "Dagster UI on the same instance: [bold]make ui[/bold] -> http://127.0.0.1:3000 "
        "(runs, asset materializations with counts, checks)"
    )
    state.console.print(
        "Timings: " + ", ".join(f"{k.split(':')[0]} {v:.1f}s" for k, v in state.timings.items())
    )


STAGES: list[tuple[str, Callable[[DemoState], None]]] = [
    ("backend: SMART Backend Services + Bulk Data $export", backend),
    ("patient access: SMART standalone launch + consent + pulls", patient_access),
    ("network: TEFCA purpose-checked XCPD/XCA queries", network),
    ("warehouse: build and publish", build),
    ("clinician workflow: EHR launch + CDS Hooks", clinician),
]


def run_demo(*, persons: int, seed: int, fresh: bool, console: Console) -> DemoState:
    """Run every stage; raises on the first failure (the CLI turns it into one line + hint)."""
    from medblocks_pipelines.cli.runtime import ensure_dagster_home
    from medblocks_pipelines.web.app import create_app
    from medblocks_sandbox.run import serve, start_sandbox

    # Tables are wide; a pipe or a narrow terminal would fold every URL and id.
    console.width = max(console.width, 120)
    settings = get_settings()
    if fresh:
        _fresh_data_dir(settings)
    settings.ensure_dirs()
    # The bootstrap step a deployment runs once (`medblocks db upgrade`): a data folder kept from
    # an older release is brought to head, a new one is created at head.
    upgrade(make_engine(settings.database_url))
    ensure_dagster_home()
    os.environ.setdefault("MEDBLOCKS_SANDBOX_ADMIN_SECRET", "demo-admin-secret")
    with ExitStack() as stack:
        started = time.perf_counter()
        with console.status("starting the sandbox and our web app"):
            sandbox = stack.enter_context(start_sandbox(base_port=0, persons=persons, seed=seed))
            web_base = stack.enter_context(
                serve(lambda base: create_app(public_base_url=base, settings=settings))
            )
        cp = open_control_plane(settings)
        state = DemoState(
            settings=settings, cp=cp, sandbox=sandbox, web_base=web_base, console=console
        )
        state.timings["start"] = time.perf_counter() - started
        console.print(
            f"sandbox: {len(sandbox.orgs)} organizations, {persons} persons, "
            f"started in {sandbox.started_in:.1f}s; our web app at {web_base}"
        )
        register(state)
        for title, stage in STAGES:
            with _stage(state, title):
                stage(state)
        summary(state)
    return state


def data_dir_hint() -> Path:
    """Where the demo writes (for messages)."""
    return get_settings().data_dir

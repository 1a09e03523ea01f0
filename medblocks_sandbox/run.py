"""Start every sandbox server on loopback: one uvicorn server per role, in background threads.

`start_sandbox()` generates (or takes) a seeded population, binds one socket per role first (so an
ephemeral port is known before the apps, whose FHIR bases and `aud` checks need absolute URLs,
are built), builds each role's ASGI app from a registry of role factories, and serves them.

Roles built in: `ehr` (every EHR organization, each mounted at `/{org_id}` with its own store,
SMART authorization server, Bulk Data `$export` and fault injection) and `payer` (each payer org,
same shape, CMS Patient Access API). Other helpers add roles (the exchange gateway, the EHR that
calls CDS Hooks) with `register_role(name, factory)`; a factory gets a `RoleContext` (population,
its own base URL, the URLs of every role, the admin secret) and returns a `RoleApp`.
"""

import contextlib
import functools
import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from medblocks_sandbox.auth_model import Login
from medblocks_sandbox.ehr import create_ehr_app
from medblocks_sandbox.ehr_common import ADMIN_HEADER, ChangeSet, OrgConfig
from medblocks_sandbox.errors import SandboxConfigError
from medblocks_sandbox.fhir_params import Resource
from medblocks_sandbox.fhir_store import FhirStore


# ---------------------------------------------------------------------------------------------
# one server in a thread
# ---------------------------------------------------------------------------------------------
class ServerThread:
    """A uvicorn server on an already-bound loopback socket, running in a daemon thread."""

    def __init__(self, sock: socket.socket, app: ASGIApp, *, name: str = "sandbox") -> None:
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        # proxy_headers off: the admin guard must see the socket peer, not X-Forwarded-For.
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{name}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        """`http://host:port` of this server."""
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # surfaced by start(); a thread must not die silently
            self.error = exc

    def start(self, timeout: float = 10.0) -> "ServerThread":
        """Start serving and wait until uvicorn says it is started."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"sandbox server on port {self.port} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sandbox server on port {self.port} did not start in time")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: an ephemeral port chosen by the OS)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serve(
    app_factory: Callable[[str], ASGIApp], *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve `app_factory(base_url)` on loopback for the duration of a `with` (tests use this)."""
    sock = bind_socket(host, port)
    base = f"http://{host}:{sock.getsockname()[1]}"
    server = ServerThread(sock, app_factory(base)).start()
    try:
        yield base
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------
@dataclass
class OrgEndpoint:
    """Where one organization of the sandbox answers."""

    org_id: str
    name: str
    kind: str
    role: str
    base_url: str  # the org's mount point; admin API at {base_url}/_admin

    @property
    def fhir_base(self) -> str:
        """The org's FHIR base URL (the `aud` of its SMART requests)."""
        return f"{self.base_url}/fhir"

    @property
    def smart_configuration_url(self) -> str:
        """Its `.well-known/smart-configuration` URL."""
        return f"{self.fhir_base}/.well-known/smart-configuration"

    @property
    def admin_url(self) -> str:
        """Its admin API base (loopback + `X-Admin-Secret`)."""
        return f"{self.base_url}/_admin"


@dataclass
class RoleContext:
    """What a role factory gets: the population, its own URL, every role's URL, the secret."""

    name: str
    base_url: str
    population: Any = field(repr=False)
    admin_secret: str = field(repr=False)
    role_urls: Mapping[str, str]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Roles built before this one (start order: ehr, payer, gateway, cds_ehr, others), so a
    #: later role can reach, in process, e.g. an EHR org's `auth` to mint launch ids.
    built_roles: Mapping[str, "RoleApp"] = field(default_factory=dict)


@dataclass
class RoleApp:
    """What a role factory returns: the ASGI app, the orgs it serves and a cleanup hook."""

    app: ASGIApp
    orgs: list[OrgEndpoint] = field(default_factory=list)
    close: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # role-specific handles (stores, ...)


RoleFactory = Callable[[RoleContext], RoleApp]
_ROLES: dict[str, RoleFactory] = {}
_DEFAULT_ORDER = ["ehr", "payer", "gateway", "cds_ehr"]


def register_role(name: str, factory: RoleFactory) -> None:
    """Add (or replace) a sandbox role; `start_sandbox` starts every registered role."""
    _ROLES[name] = factory


#: Roles other helpers build, loaded on first use when their module imports ("module:factory").
#: Add a line here (or call `register_role`) to have `start_sandbox` start a new role.
OPTIONAL_ROLES: dict[str, str] = {
    "gateway": "medblocks_sandbox.gateway.app:gateway_role",
    "cds_ehr": "medblocks_sandbox.cds_ehr.app:cds_ehr_role",
    # TEFCA Facilitated FHIR: CA + CRLs, UDAP authorization servers, FHIR nodes, a directory.
    "udap": "medblocks_sandbox.udap.app:udap_role",
}


def _load_optional_roles() -> None:
    import importlib

    for name, target in OPTIONAL_ROLES.items():
        if name in _ROLES:
            continue
        module_name, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue  # that role's module has not landed (or was removed): start without it
        _ROLES[name] = factory


def registered_roles() -> list[str]:
    """Names of the registered roles (built-in, optional ones that import), in start order."""
    _load_optional_roles()
    known = [r for r in _DEFAULT_ORDER if r in _ROLES]
    return known + sorted(r for r in _ROLES if r not in known)


# ---------------------------------------------------------------------------------------------
# population adapter
# ---------------------------------------------------------------------------------------------
class PopulationChanges:
    """Applies generator `evolve()` steps once and hands each org its slice of the changes."""

    def __init__(self, population: Any) -> None:
        self.population = population
        self._lock = threading.Lock()
        self._steps: dict[int, dict[str, ChangeSet]] = {}

    def for_org(self, org_id: str, step: int) -> ChangeSet:
        """The upserts and deletions of one evolve step for one org (evolving once per step)."""
        with self._lock:
            if step not in self._steps:
                from medblocks_sandbox.generator import evolve

                changes = evolve(self.population, step)
                per_org: dict[str, ChangeSet] = {}
                for oid, resource in [*changes.created, *changes.updated]:
                    per_org.setdefault(oid, ([], []))[0].append(resource)
                for oid, rtype, rid in changes.deleted:
                    per_org.setdefault(oid, ([], []))[1].append((rtype, rid))
                self._steps[step] = per_org
            return self._steps[step].get(org_id, ([], []))


def _orgs_of(population: Any, kind: str) -> list[Any]:
    return [o for o in population.organizations if o.kind == kind]


def _logins_of(population: Any, org_id: str, store: FhirStore) -> tuple[Login, ...]:
    names = {}
    for patient in store.iter_type("Patient"):
        for name in patient.get("name") or []:
            names[patient["id"]] = " ".join([*(name.get("given") or []), name.get("family", "")])
            break
    return tuple(
        Login(
            username=lg.username,
            password=lg.password,
            patient_id=lg.patient_id,
            display=names.get(lg.patient_id, ""),
        )
        for lg in population.logins
        if lg.org_id == org_id
    )


def build_org_app(
    org: OrgConfig,
    store: FhirStore,
    *,
    base_url: str,
    admin_secret: str,
    profile: Any = None,
    payer: bool = False,
    evolver: Callable[[int], ChangeSet] | None = None,
    with_bulk: bool = True,
) -> tuple[Starlette, dict[str, Any]]:
    """One org's app with Bulk Data and fault injection wired in; returns it and its handles."""
    from medblocks_sandbox import bulk, bulk_auth, faults
    from medblocks_sandbox.profiles import get_profile

    vendor = get_profile(profile)
    injector = faults.FaultInjector()
    handles: dict[str, Any] = {"store": store, "faults": injector, "profile": vendor}
    holder: dict[str, Any] = {}

    def authenticate(request: Any) -> bulk_auth.TokenInfo:
        from medblocks_sandbox.auth import require_token

        info = require_token(request)
        return bulk_auth.TokenInfo(client_id=info.client_id, scopes=frozenset(info.scopes))

    def resolve_client(token: str) -> str | None:
        app = holder.get("app")
        return app.state.auth_server.client_of(token) if app is not None else None

    extra_routes: list[Any] = []
    bulk_server = None
    if with_bulk and not payer:
        bulk_server = bulk.BulkServer(
            store, authenticator=authenticate, profile=vendor, faults=injector
        )
        extra_routes = list(bulk_server.routes())
        handles["bulk"] = bulk_server
    admin_routes = list(
        faults.fault_admin_routes(injector, prefix="/_sandbox/faults", admin_token=admin_secret)
    )
    if bulk_server is not None:
        admin_routes += bulk.bulk_admin_routes(
            bulk_server, prefix="/_sandbox/bulk", admin_token=admin_secret
        )
    # Paths inside a mounted app keep the mount prefix: exempt `{mount}/_admin`, `{mount}/_sandbox`.
    mount = urllib.parse.urlsplit(base_url).path.rstrip("/")
    middleware = [
        Middleware(
            faults.FaultMiddleware,
            faults=injector,
            client_resolver=resolve_client,
            exempt_prefix=f"{mount}/_",
        )
    ]
    if payer:
        from medblocks_sandbox.payer import create_payer_app

        app = create_payer_app(
            org,
            store,
            base_url=base_url,
            admin_secret=admin_secret,
            middleware=middleware,
            evolver=evolver,
            extra_routes=extra_routes,
            root_routes=admin_routes,
            faults=injector,
        )
    else:
        app = create_ehr_app(
            org,
            store,
            base_url=base_url,
            admin_secret=admin_secret,
            middleware=middleware,
            profile=vendor,
            evolver=evolver,
            extra_routes=extra_routes,
            root_routes=admin_routes,
            faults=injector,
        )
    holder["app"] = app
    auth = app.state.auth_server
    injector.on_token_expired = auth.expire_access_token
    injector.on_refresh_revoked = auth.revoke_refresh_token
    handles["auth"] = auth
    handles["app"] = app
    return app, handles


def _org_changes(changes: PopulationChanges, org_id: str, step: int) -> ChangeSet:
    return changes.for_org(org_id, step)


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        close()


def _org_role(kind: str) -> RoleFactory:
    def factory(ctx: RoleContext) -> RoleApp:
        pop = ctx.population
        changes: PopulationChanges = ctx.options["changes"]
        routes: list[Any] = []
        endpoints: list[OrgEndpoint] = []
        handles: dict[str, Any] = {}
        closers: list[Callable[[], None]] = []
        presigning: list[Any] = []
        for org in _orgs_of(pop, kind):
            if kind == "payer":
                from medblocks_sandbox.payer import load_payer_store

                store = load_payer_store(pop.resources_for(org.id), copy=False)
            else:
                store = FhirStore()
                # No deep copy: the generator is copy-on-write (evolve() copies before editing).
                store.put_many(pop.resources_for(org.id), copy=False)
            cfg = OrgConfig(
                org_id=org.id, name=org.name, kind=kind, logins=_logins_of(pop, org.id, store)
            )
            base = f"{ctx.base_url}/{org.id}"
            app, h = build_org_app(
                cfg,
                store,
                base_url=base,
                admin_secret=ctx.admin_secret,
                profile=ctx.options.get("profiles", {}).get(org.id),
                payer=kind == "payer",
                evolver=functools.partial(_org_changes, changes, org.id),
            )
            if "bulk" in h:
                closers.append(h["bulk"].close)
                if h["bulk"].profile.presigned_redirects:
                    presigning.append(h["bulk"])
            routes.append(Mount(f"/{org.id}", app=app))
            endpoints.append(OrgEndpoint(org.id, org.name, kind, kind, base))
            handles[org.id] = h

        if presigning:
            # Oracle-like profiles answer file URLs with a 307 to a presigned URL on another
            # origin: one file host, on its own loopback port, for every such org.
            from medblocks_sandbox import bulk

            host = urllib.parse.urlsplit(ctx.base_url).hostname or "127.0.0.1"
            storage = ServerThread(
                bind_socket(host, 0), bulk.presigned_storage_app(presigning), name="presigned"
            ).start()
            for server in presigning:
                server.storage_base_url = storage.url
            closers.append(storage.stop)

        async def index(request: Any) -> JSONResponse:
            return JSONResponse(
                {
                    "orgs": [
                        {"id": e.org_id, "name": e.name, "fhir_base": e.fhir_base}
                        for e in endpoints
                    ]
                }
            )

        app = Starlette(routes=[Route("/", index), *routes])
        return RoleApp(
            app=app,
            orgs=endpoints,
            extra={"orgs": handles},
            close=functools.partial(_close_all, closers),
        )

    return factory


register_role("ehr", _org_role("ehr"))
register_role("payer", _org_role("payer"))


# ---------------------------------------------------------------------------------------------
# the sandbox
# ---------------------------------------------------------------------------------------------
@dataclass
class SandboxHandle:
    """A running sandbox: URLs, the admin secret, the population, and `stop()`."""

    host: str
    admin_secret: str = field(repr=False)
    population: Any = field(repr=False)
    role_urls: dict[str, str]
    orgs: list[OrgEndpoint]
    roles: dict[str, RoleApp]
    servers: dict[str, ServerThread]
    started_in: float = 0.0

    def org(self, org_id: str) -> OrgEndpoint:
        """One organization's endpoints (KeyError if unknown)."""
        for o in self.orgs:
            if o.org_id == org_id:
                return o
        raise KeyError(org_id)

    def orgs_of(self, kind: str) -> list[OrgEndpoint]:
        """Organizations of one kind (ehr, payer)."""
        return [o for o in self.orgs if o.kind == kind]

    def org_handles(self, org_id: str) -> dict[str, Any]:
        """In-process handles of one org (store, auth, faults, bulk, app) for tests."""
        for role in self.roles.values():
            found = role.extra.get("orgs", {}).get(org_id)
            if found is not None:
                return found
        raise KeyError(org_id)

    def admin(self, org_id: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """POST (or GET when `body` is None) to one org's admin API; returns the JSON answer."""
        url = f"{self.org(org_id).admin_url}/{path.lstrip('/')}"
        headers = {ADMIN_HEADER: self.admin_secret}
        with httpx.Client(timeout=10) as client:
            resp = (
                client.get(url, headers=headers)
                if body is None
                else client.post(url, json=dict(body), headers=headers)
            )
        resp.raise_for_status()
        return resp.json()

    def register_client(
        self, body: Mapping[str, Any], *, kinds: Sequence[str] = ("ehr", "payer")
    ) -> dict[str, Any]:
        """Register the same client at every org of the given kinds; returns answers by org."""
        return {
            o.org_id: self.admin(o.org_id, "clients", body) for o in self.orgs if o.kind in kinds
        }

    def apply_changes(self, step: int) -> dict[str, Any]:
        """Apply one population `evolve()` step at every EHR and payer org."""
        return {
            o.org_id: self.admin(o.org_id, "apply-changes", {"step": step})
            for o in self.orgs
            if o.kind in ("ehr", "payer")
        }

    def describe(self) -> list[dict[str, str]]:
        """Rows for a table of what runs where: role, org, kind, name, URL.

        The URL is the FHIR base for EHR and payer orgs, the org's base for the others.
        """
        rows = []
        for role, url in self.role_urls.items():
            orgs = [o for o in self.orgs if o.role == role]
            if not orgs:
                rows.append({"role": role, "org": "", "kind": "", "name": "", "url": url})
            for o in orgs:
                shown = o.fhir_base if o.kind in ("ehr", "payer") else o.base_url
                rows.append(
                    {"role": role, "org": o.org_id, "kind": o.kind, "name": o.name, "url": shown}
                )
        return rows

    def stop(self) -> None:
        """Stop every server and release role resources."""
        for server in self.servers.values():
            server.stop()
        for role in self.roles.values():
            if role.close:
                with contextlib.suppress(Exception):
                    role.close()

    def __enter__(self) -> "SandboxHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sandbox(
    *,
    host: str = "127.0.0.1",
    base_port: int = 8800,
    persons: int = 50,
    seed: int = 42,
    population: Any = None,
    roles: Sequence[str] | None = None,
    admin_secret: str | None = None,
    profiles: Mapping[str, str] | None = None,
    role_options: Mapping[str, Any] | None = None,
) -> SandboxHandle:
    """Start the sandbox: one uvicorn server per role on `host`, ports from `base_port` up.

    `base_port=0` takes ephemeral ports (tests). The admin secret is `admin_secret`, else
    `MEDBLOCKS_SANDBOX_ADMIN_SECRET`, else random (see `SandboxHandle.admin_secret`). `population` skips generation (a prepared
    population); otherwise `generate_population(PopulationSpec(seed, persons))`. `profiles` maps
    org ids to vendor profile names (`strict`, `epic`, `oracle`). `role_options` are passed to
    every role factory in `RoleContext.options` (e.g. `gateway_behaviours`). `roles` picks a
    subset of `registered_roles()`. Returns a `SandboxHandle`.
    """
    started = time.monotonic()
    if population is None:
        from medblocks_sandbox.generator import PopulationSpec, generate_population

        population = generate_population(PopulationSpec(seed=seed, persons=persons))
    # A fixed secret from the environment lets other processes (Dagster runs, the demo) call the
    # admin API of a sandbox started elsewhere.
    secret = (
        admin_secret
        or os.environ.get("MEDBLOCKS_SANDBOX_ADMIN_SECRET")
        or secrets.token_urlsafe(24)
    )
    known = registered_roles()
    names = list(roles) if roles is not None else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SandboxConfigError(f"unknown sandbox roles: {unknown}; known: {known}")
    socks: dict[str, socket.socket] = {}
    try:
        for n, name in enumerate(names):
            socks[name] = bind_socket(host, base_port + n if base_port else 0)
    except OSError as exc:
        for s in socks.values():
            s.close()
        port = base_port + len(socks) if base_port else 0
        raise SandboxConfigError(
            f"sandbox: cannot listen on {host}:{port} ({exc.strerror})",
            hint="another sandbox may be running; pick another --port, or 0 for free ports",
        ) from exc
    urls = {name: f"http://{host}:{s.getsockname()[1]}" for name, s in socks.items()}
    options = {
        **dict(role_options or {}),
        "changes": PopulationChanges(population),
        "profiles": dict(profiles or {}),
    }
    built: dict[str, RoleApp] = {}
    servers: dict[str, ServerThread] = {}
    try:
        for name in names:
            ctx = RoleContext(
                name=name,
                base_url=urls[name],
                population=population,
                admin_secret=secret,
                role_urls=urls,
                options=options,
                built_roles=dict(built),
            )
            built[name] = _ROLES[name](ctx)
        for name in names:
            servers[name] = ServerThread(socks[name], built[name].app, name=name).start()
    except BaseException:
        for server in servers.values():
            server.stop()
        for s in socks.values():
            with contextlib.suppress(OSError):
                s.close()
        raise
    return SandboxHandle(
        host=host,
        admin_secret=secret,
        population=population,
        role_urls=urls,
        orgs=[o for r in built.values() for o in r.orgs],
        roles=built,
        servers=servers,
        started_in=time.monotonic() - started,
    )


def resources_by_org(population: Any, org_id: str) -> list[Resource]:
    """The population's resources for one org (a thin adapter kept for other helpers)."""
    return list(population.resources_for(org_id))

"""The UDAP / Facilitated FHIR sandbox role: a CA, responding nodes with UDAP, a directory.

Layout under the role's base URL:

- ``/ca/crl/{root|intermediate}.crl``: the CRLs (DER); ``/ca/anchor.pem``: the trust anchor
- ``/directory/Organization``: the RCE-style directory of the nodes
- ``/nodes/{id}/fhir/...``: each node's FHIR API and UDAP endpoints (see :mod:`.nodes`)

:func:`create_udap_app` builds it for tests (any node list); :func:`udap_role` is the factory
``medblocks sandbox`` starts, with one node per network organization of the population.
"""

from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.udap.authz import UdapAuthServer
from medblocks_sandbox.udap.ca import SandboxCA
from medblocks_sandbox.udap.nodes import Node, NodeApp, NodeSpec, directory_bundle

TEFCA_COMMUNITY = "urn:oid:2.16.840.1.113883.3.7204.1.5"


@dataclass
class UdapSandbox:
    """Handles on a built UDAP sandbox: the app, the CA, the nodes, the URLs."""

    app: Starlette
    base_url: str
    ca: SandboxCA
    nodes: dict[str, Node]
    community: str

    @property
    def directory_url(self) -> str:
        """The FHIR base of the directory."""
        return f"{self.base_url}/directory"

    def node_base(self, node_id: str) -> str:
        """A node's FHIR base URL."""
        return self.nodes[node_id].base


def create_udap_app(
    base_url: str,
    specs: list[NodeSpec],
    *,
    community: str = TEFCA_COMMUNITY,
    token_lifetime: int = 300,
    ca: SandboxCA | None = None,
) -> UdapSandbox:
    """Build the role app at ``base_url`` serving ``specs``."""
    base = base_url.rstrip("/")
    ca = ca or SandboxCA(f"{base}/ca/crl")
    nodes: dict[str, Node] = {}
    for spec in specs:
        fhir = f"{base}/nodes/{spec.id}/fhir"
        auth = UdapAuthServer(
            ca,
            fhir,
            community=community,
            purposes=spec.purposes,
            token_lifetime=token_lifetime,
            grant_types=spec.grant_types,
            consent_policy=spec.consent_policy,
        )
        node = Node(spec, fhir, auth)
        for res in spec.resources:
            node.by_type.setdefault(res["resourceType"], []).append(res)
        nodes[spec.id] = node

    async def crl(request: Request) -> Response:
        slug = request.path_params["slug"]
        if slug not in ca.issuers:
            return JSONResponse({"error": "unknown issuer"}, status_code=404)
        return Response(ca.crl(slug), media_type="application/pkix-crl")

    async def anchor(_request: Request) -> Response:
        return Response(ca.anchor_pem(), media_type="application/x-pem-file")

    async def directory(_request: Request) -> Response:
        return JSONResponse(directory_bundle(nodes), media_type="application/fhir+json")

    routes = [
        Route("/ca/crl/{slug:str}.crl", crl, methods=["GET"]),
        Route("/ca/anchor.pem", anchor, methods=["GET"]),
        Route("/directory/Organization", directory, methods=["GET"]),
        *NodeApp(nodes).routes(),
    ]
    app = Starlette(routes=routes)
    return UdapSandbox(app, base, ca, nodes, community)


def population_nodes(population: Any) -> list[NodeSpec]:
    """One node per network organization of the population, holding its FHIR data."""
    specs = []
    for org in population.organizations:
        if getattr(org, "kind", None) != "network":
            continue
        specs.append(
            NodeSpec(
                id=org.id,
                name=org.name,
                resources=list(population.resources_for(org.id)),
                home_community_id=getattr(org, "home_community_id", None),
            )
        )
    return specs


def udap_role(ctx: Any) -> Any:
    """Role factory (``udap``): nodes from the population's network orgs; faults by option.

    Options: ``udap_faults`` (node id -> fault profile name). ``extra`` carries ``sandbox`` (the
    :class:`UdapSandbox`) and ``source_config`` (what a network source needs to use it).
    """
    from medblocks_sandbox.run import OrgEndpoint, RoleApp

    specs = population_nodes(ctx.population)
    for spec in specs:
        spec.fault = ctx.options.get("udap_faults", {}).get(spec.id, "ok")
    sandbox = create_udap_app(ctx.base_url, specs)
    endpoints = [
        OrgEndpoint(s.id, s.name, "network", ctx.name, f"{sandbox.base_url}/nodes/{s.id}")
        for s in specs
    ]
    return RoleApp(
        app=sandbox.app,
        orgs=endpoints,
        extra={"sandbox": sandbox, "source_config": facilitated_source_config(sandbox)},
    )


def facilitated_source_config(sandbox: UdapSandbox) -> dict[str, Any]:
    """The ``facilitated_fhir`` block of a network source's config for this sandbox."""
    return {
        "directory_url": sandbox.directory_url,
        "community": sandbox.community,
        "trust_anchor_pem": sandbox.ca.anchor_pem().decode(),
        "timeout_s": 10.0,
        "max_parallel": 8,
    }

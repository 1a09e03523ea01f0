"""Facilitated FHIR responding nodes and the directory that lists them.

A node is a FHIR R4 server at ``{role}/nodes/{id}/fhir`` with its own UDAP authorization server
(:mod:`.authz`). It answers ``POST Patient/$match`` (IDI-Patient input; searchset with
``search.score`` and the ``match-grade`` extension), ``GET Patient?family&given&birthdate`` and
US Core searches by ``patient``, only with a live token it issued. A token carries the purpose it
was issued for: a request whose ``X-Purpose-Of-Use`` header names another purpose is refused
(403): the sandbox's way to check that a client never reuses a token across purposes.

The directory (``GET {role}/directory/Organization``) returns RCE-style Organizations with a
contained ``Endpoint`` (connectionType ``hl7-fhir-rest``, the purposes-of-use extension).

Named fault profiles per node: ``ok``, ``slow`` (every FHIR answer after ``delay_s``), ``down``
(503 everywhere), ``no_match_op`` ($match not offered: 404 OperationOutcome, a demographics search
works), ``no_udap`` (discovery answers 404), ``leaky`` (a ``patient=`` search also returns one
resource of another patient: a server bug seen in practice).
"""

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.udap.authz import UdapAuthServer

FAULT_PROFILES = ("ok", "slow", "down", "no_match_op", "no_udap", "leaky")
PURPOSES_EXT = "http://sequoiaproject.org/fhir/StructureDefinition/purposesofuse"  # [verify]
MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
PATIENT_REF = {
    "AllergyIntolerance": "patient",
    "Immunization": "patient",
}
US_CORE_TYPES = (
    "AllergyIntolerance",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Immunization",
    "Procedure",
    "Encounter",
    "DiagnosticReport",
)


@dataclass
class NodeSpec:
    """One responding node: who, what it holds, which purposes it answers, how it misbehaves."""

    id: str
    name: str
    resources: list[dict[str, Any]]
    purposes: tuple[str, ...] = ("T-TREAT", "T-TRTMNT", "T-IAS")
    fault: str = "ok"
    delay_s: float = 3.0
    home_community_id: str | None = None
    grant_types: tuple[str, ...] = ("client_credentials",)
    #: A consent policy URI the node requires in hl7-b2b ``consent_policy`` (else
    #: ``invalid_grant`` with ``extensions.hl7-b2b.consent_required``).
    consent_policy: str | None = None


@dataclass
class Node:
    """A running node: its spec, its auth server and what it has been asked."""

    spec: NodeSpec
    base: str
    auth: UdapAuthServer
    by_type: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) only
    lock: threading.Lock = field(default_factory=threading.Lock)


def _outcome(code: str, status: int) -> Response:
    return JSONResponse(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code}]},
        status_code=status,
        media_type="application/fhir+json",
    )


def _bundle(entries: list[dict[str, Any]]) -> Response:
    return JSONResponse(
        {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries},
        media_type="application/fhir+json",
    )


def _names(patient: dict[str, Any]) -> tuple[str, set[str]]:
    for n in patient.get("name") or []:
        return str(n.get("family") or "").lower(), {g.lower() for g in n.get("given") or []}
    return "", set()


def _score(candidate: dict[str, Any], probe: dict[str, Any]) -> float:
    fam, giv = _names(candidate)
    pfam, pgiv = _names(probe)
    score = 0.0
    score += 0.35 if fam and fam == pfam else 0.0
    score += 0.2 if giv & pgiv else 0.0
    score += (
        0.35
        if candidate.get("birthDate") and candidate.get("birthDate") == probe.get("birthDate")
        else 0.0
    )
    score += (
        0.1 if candidate.get("gender") and candidate.get("gender") == probe.get("gender") else 0
    )
    return round(score, 2)


def _own_patient(request: Request, patient: str) -> bool:
    rtype = request.path_params.get("rtype")
    if request.method != "GET" or rtype is None:
        return False  # $match is for B2B clients
    if rtype == "Patient":
        return request.query_params.get("_id") == patient
    return request.query_params.get("patient", "").removeprefix("Patient/") == patient


def _grade(score: float) -> str:
    return "certain" if score >= 0.99 else "probable" if score >= 0.8 else "possible"


class NodeApp:
    """Handlers for every node mounted under one role app."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes

    async def _guard(self, request: Request) -> tuple[Node, Response | None]:
        node = self.nodes.get(request.path_params["node"])
        if node is None:
            return None, _outcome("not-found", 404)  # type: ignore[return-value]
        with node.lock:
            node.seen.append((request.method, request.url.path))
        if node.spec.fault == "down":
            return node, _outcome("transient", 503)
        if node.spec.fault == "slow":
            await asyncio.sleep(node.spec.delay_s)
        return node, None

    async def _authorized(self, request: Request) -> tuple[Node, Response | None]:
        node, fail = await self._guard(request)
        if fail is not None:
            return node, fail
        auth = request.headers.get("authorization", "")
        info = node.auth.token_info(auth[7:]) if auth.lower().startswith("bearer ") else None
        if info is None:
            return node, _outcome("login", 401)
        if info.patient is not None and not _own_patient(request, info.patient):
            # A patient's token (authorization_code) reads that patient only.
            return node, _outcome("forbidden", 403)
        asked = request.headers.get("x-purpose-of-use")
        if asked is not None and asked != info.purpose:
            node.auth.state.bump("refused:token_purpose")
            return node, _outcome("forbidden", 403)
        return node, None

    async def match(self, request: Request) -> Response:
        """``POST Patient/$match`` with a Parameters resource."""
        node, fail = await self._authorized(request)
        if fail is not None:
            return fail
        if node.spec.fault == "no_match_op":
            return _outcome("not-supported", 404)
        try:
            params = await request.json()
        except ValueError:
            return _outcome("structure", 400)
        probe = None
        for p in params.get("parameter") or [] if isinstance(params, dict) else []:
            if p.get("name") == "resource" and isinstance(p.get("resource"), dict):
                probe = p["resource"]
        if (
            params.get("resourceType") != "Parameters"
            or not probe
            or probe.get("resourceType") != "Patient"
        ):
            return _outcome("invalid", 400)
        entries: list[dict[str, Any]] = []
        for cand in node.by_type.get("Patient", []):
            score = _score(cand, probe)
            if score >= 0.7:
                entries.append(
                    {
                        "fullUrl": f"{node.base}/Patient/{cand['id']}",
                        "resource": cand,
                        "search": {
                            "mode": "match",
                            "score": score,
                            "extension": [{"url": MATCH_GRADE, "valueCode": _grade(score)}],
                        },
                    }
                )
        entries.sort(key=lambda e: -e["search"]["score"])
        return _bundle(entries)

    async def search(self, request: Request) -> Response:
        """``GET {Type}?...``: Patient by demographics, US Core types by ``patient``."""
        node, fail = await self._authorized(request)
        if fail is not None:
            return fail
        rtype = request.path_params["rtype"]
        q = request.query_params
        if rtype == "Patient" and q.get("_id"):
            hits = [p for p in node.by_type.get("Patient", []) if p.get("id") == q["_id"]]
            return _bundle([{"resource": p, "search": {"mode": "match"}} for p in hits])
        if rtype == "Patient":
            probe = {
                "name": [{"family": q.get("family", ""), "given": [q.get("given", "")]}],
                "birthDate": q.get("birthdate"),
                "gender": q.get("gender"),
            }
            hits = [p for p in node.by_type.get("Patient", []) if _score(p, probe) >= 0.9]
            return _bundle([{"resource": p, "search": {"mode": "match"}} for p in hits])
        if rtype not in US_CORE_TYPES:
            return _outcome("not-supported", 404)
        pid = q.get("patient")
        if not pid:
            return _outcome("required", 400)  # no unscoped searches at a responding node
        field_name = PATIENT_REF.get(rtype, "subject")
        ref = f"Patient/{pid.removeprefix('Patient/')}"
        hits = [
            r
            for r in node.by_type.get(rtype, [])
            if (r.get(field_name) or {}).get("reference") == ref
        ]
        if node.spec.fault == "leaky":
            others = [
                r
                for r in node.by_type.get(rtype, [])
                if (r.get(field_name) or {}).get("reference") not in (None, ref)
            ]
            hits += others[:1]
        return _bundle([{"resource": r, "search": {"mode": "match"}} for r in hits])

    async def discovery(self, request: Request) -> Response:
        """``GET .well-known/udap`` (404 when the node has no UDAP)."""
        node, fail = await self._guard(request)
        if fail is not None:
            return fail
        if node.spec.fault == "no_udap":
            return JSONResponse({"error": "not found"}, status_code=404)
        return await node.auth.discovery(request)

    async def authorize(self, request: Request) -> Response:
        """``GET udap/authorize`` (authorization_code, IAS Mode 1)."""
        from medblocks_sandbox.udap.authcode import authorize

        node, fail = await self._guard(request)
        if fail is not None:
            return fail
        patients = [str(p["id"]) for p in node.by_type.get("Patient", [])]
        return await authorize(node.auth, request, patients)

    async def udap(self, request: Request) -> Response:
        """Registration and token endpoints of the node."""
        from medblocks_sandbox.udap.authz_endpoints import register, token

        node, fail = await self._guard(request)
        if fail is not None:
            return fail
        if request.path_params["op"] == "register":
            return await register(node.auth, request)
        return await token(node.auth, request)

    def routes(self) -> list[Route]:
        """Routes for every node under ``/nodes/{node}/fhir``."""
        p = "/nodes/{node}/fhir"
        return [
            Route(f"{p}/.well-known/udap", self.discovery, methods=["GET"]),
            Route(f"{p}/udap/authorize", self.authorize, methods=["GET"]),
            Route(p + "/udap/{op:str}", self.udap, methods=["POST"]),
            Route(f"{p}/Patient/$match", self.match, methods=["POST"]),
            Route(p + "/{rtype:str}", self.search, methods=["GET"]),
        ]


def directory_bundle(nodes: dict[str, Node]) -> dict[str, Any]:
    """Organizations with a contained hl7-fhir-rest Endpoint and its purposes of use."""
    entries = []
    for node in nodes.values():
        ep = {
            "resourceType": "Endpoint",
            "id": "ep1",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "hl7-fhir-rest",
            },
            "payloadType": [{"text": "FHIR"}],
            "address": node.base,
            "extension": [
                {
                    "url": PURPOSES_EXT,
                    "valueCodeableConcept": {
                        "coding": [
                            {"system": "urn:oid:2.16.840.1.113883.3.7204.1.5.2.1", "code": code}
                        ]
                    },
                }
                for code in node.spec.purposes
            ],
        }
        hcid = node.spec.home_community_id
        entries.append(
            {
                "resource": {
                    "resourceType": "Organization",
                    "id": node.spec.id,
                    "name": node.spec.name,
                    "active": True,
                    "identifier": (
                        [{"type": {"text": "HCID"}, "system": "urn:ietf:rfc:3986", "value": hcid}]
                        if hcid
                        else []
                    ),
                    "contained": [ep],
                    "endpoint": [{"reference": "#ep1"}],
                }
            }
        )
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}

"""Facilitated FHIR, per responding node: the directory, patient matching, US Core pulls.

- :func:`find_nodes` reads the directory (RCE-style FHIR ``Organization`` resources with
  ``contained`` ``Endpoint``s): endpoints with connectionType ``hl7-fhir-rest`` whose
  purposes-of-use extension lists the purpose (SPECS 5.4).
- :func:`query_node` runs one node: a UDAP token bound to (requestor, purpose), ``POST
  Patient/$match`` with an IDI-Patient (a demographics search where ``$match`` is not offered),
  then US Core searches by ``patient`` through :class:`~medblocks_pipelines.lib.fhir.client.FhirClient`.
- :func:`fan_out` runs many nodes in threads under one deadline (the per-node timeout): a node
  that has not finished by then is reported ``timeout`` and nothing of it is kept.

Node outcomes carry counts, statuses and our own ids only; the resources go to the caller, which
lands them (never logged).
"""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx

from medblocks_pipelines.lib.errors import AuthError, MedblocksError, ProtocolError, TransientError
from medblocks_pipelines.lib.fhir.client import FhirClient, FhirRequestError, loads_exact
from medblocks_pipelines.lib.network.ihe import Demographics

FHIR_REST = "hl7-fhir-rest"
MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
IDI_PATIENT = "http://hl7.org/fhir/us/identity-matching/StructureDefinition/IDI-Patient"
#: US Core searches made for a matched patient (all by ``patient``).
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
#: Match grades accepted as the same person (``possible`` is never used to pull records).
ACCEPTED_GRADES = ("certain", "probable")


@dataclass(frozen=True)
class NodeEndpoint:
    """A responding node found in the directory."""

    id: str  # the directory Organization id
    name: str
    fhir_base: str
    purposes: tuple[str, ...]
    home_community_id: str | None = None


@dataclass
class NodeOutcome:
    """What happened at one node (PHI-free apart from ``resources``, which are landed)."""

    node: str
    status: str = (
        "pending"  # ok | no_match | ambiguous | mismatch | no_udap | refused | error | timeout
    )
    match_method: str | None = None  # $match | search
    patient_id: str | None = None
    resources: list[dict[str, Any]] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The audit / query-record form (no PHI)."""
        return {
            "node": self.node,
            "status": self.status,
            "match_method": self.match_method,
            "resources": len(self.resources),
            "errors": list(self.errors),
            "requests": self.requests,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _purposes(endpoint: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for ext in endpoint.get("extension") or []:
        if "purposesofuse" not in str(ext.get("url", "")).lower():
            continue
        for coding in (ext.get("valueCodeableConcept") or {}).get("coding") or []:
            if coding.get("code"):
                out.append(str(coding["code"]))
    return tuple(out)


def parse_directory(bundle: dict[str, Any]) -> list[NodeEndpoint]:
    """Nodes with an active hl7-fhir-rest endpoint, from a directory searchset Bundle."""
    nodes = []
    for entry in bundle.get("entry") or []:
        org = entry.get("resource") or {}
        if org.get("resourceType") != "Organization" or org.get("active") is False:
            continue
        contained = {f"#{r.get('id')}": r for r in org.get("contained") or []}
        hcid = next((i.get("value") for i in org.get("identifier") or [] if i.get("value")), None)
        for ref in org.get("endpoint") or []:
            ep = contained.get(str(ref.get("reference")))
            if not ep or ep.get("resourceType") != "Endpoint" or ep.get("status") != "active":
                continue
            ctype = ep.get("connectionType") or {}
            if ctype.get("code") != FHIR_REST or not ep.get("address"):
                continue
            nodes.append(
                NodeEndpoint(
                    id=str(org["id"]),
                    name=str(org.get("name") or org["id"]),
                    fhir_base=str(ep["address"]).rstrip("/"),
                    purposes=_purposes(ep),
                    home_community_id=hcid,
                )
            )
    return nodes


def find_nodes(
    http: httpx.Client,
    directory_url: str,
    purpose: str,
    *,
    api_key: str | None = None,
    timeout: float = 15.0,
) -> list[NodeEndpoint]:
    """Nodes of the directory that answer ``purpose`` over FHIR."""
    headers = {"Accept": "application/fhir+json"}
    if api_key:
        headers["X-API-Key"] = api_key  # the RCE Directory is reached through the QHIN
    resp = http.get(f"{directory_url.rstrip('/')}/Organization", headers=headers, timeout=timeout)
    if resp.status_code != 200:
        raise ProtocolError(f"directory answered HTTP {resp.status_code}")
    bundle = resp.json()
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ProtocolError("directory answer is not a Bundle")
    return [n for n in parse_directory(bundle) if purpose in n.purposes]


def idi_patient(demo: Demographics) -> dict[str, Any]:
    """An IDI-Patient for ``$match``: name, birth date, gender, address, phone."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": {"profile": [IDI_PATIENT]},
        "name": [{"family": demo.family, "given": list(demo.given)}],
        "birthDate": demo.birth_date,
        "gender": demo.gender,
    }
    if demo.line or demo.city or demo.postal_code:
        addr = {
            "line": [demo.line] if demo.line else [],
            "city": demo.city,
            "state": demo.state,
            "postalCode": demo.postal_code,
        }
        patient["address"] = [{k: v for k, v in addr.items() if v}]
    if demo.phone:
        patient["telecom"] = [{"system": "phone", "value": demo.phone}]
    return patient


def _grade(entry: dict[str, Any]) -> str:
    search = entry.get("search") or {}
    for ext in search.get("extension") or []:
        if ext.get("url") == MATCH_GRADE:
            return str(ext.get("valueCode"))
    score = search.get("score")
    if isinstance(score, (int, float)):
        return "certain" if score >= 0.99 else "probable" if score >= 0.8 else "possible"
    return "possible"


def pick_match(bundle: dict[str, Any], *, graded: bool) -> tuple[str, dict[str, Any] | None]:
    """``(status, patient)`` of a match answer: one accepted patient, none, or ambiguous."""
    hits = {}
    for entry in bundle.get("entry") or []:
        res = entry.get("resource") or {}
        if res.get("resourceType") != "Patient" or not res.get("id"):
            continue
        if graded and _grade(entry) not in ACCEPTED_GRADES:
            continue
        hits[res["id"]] = res
    if not hits:
        return "no_match", None
    if len(hits) > 1:
        return "ambiguous", None
    return "ok", next(iter(hits.values()))


def double_check(patient: dict[str, Any], demo: Demographics) -> bool:
    """IAS Demographics Double-Check: the returned patient's name and birth date are ours."""
    other = Demographics.from_patient(patient)
    return (
        other.family.lower() == demo.family.lower()
        and other.birth_date == demo.birth_date
        and bool({g.lower() for g in other.given} & {g.lower() for g in demo.given})
    )


def match_patient(
    fhir: FhirClient, http: httpx.Client, token: str, demo: Demographics, outcome: NodeOutcome
) -> dict[str, Any] | None:
    """``$match`` (else a demographics search); sets ``outcome.status`` when nothing is usable."""
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": idi_patient(demo)},
            {"name": "onlyCertainMatches", "valueBoolean": False},
            {"name": "count", "valueInteger": 5},
        ],
    }
    outcome.requests += 1
    resp = http.post(
        fhir.url("Patient/$match"),
        json=params,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/fhir+json",
            "Content-Type": "application/fhir+json",
        },
    )
    if resp.status_code == 200:
        outcome.match_method = "$match"
        status, patient = pick_match(loads_exact(resp.content), graded=True)
    elif resp.status_code in (400, 404, 405, 501):
        # $match not offered: an exact demographics search instead.
        outcome.match_method = "search"
        query = {"family": demo.family, "birthdate": demo.birth_date}
        if demo.given:
            query["given"] = demo.given[0]
        if demo.gender in ("male", "female"):
            query["gender"] = demo.gender
        bundles = list(fhir.search("Patient", query))
        merged = {"entry": [e for page in bundles for e in page.bundle.get("entry") or []]}
        status, patient = pick_match(merged, graded=False)
    elif resp.status_code in (401, 403):
        raise AuthError(f"$match refused: HTTP {resp.status_code}")
    else:
        raise FhirRequestError(f"$match: HTTP {resp.status_code}", status=resp.status_code)
    if patient is None:
        outcome.status = status
    return patient


def pull_us_core(
    fhir: FhirClient, patient_id: str, types: tuple[str, ...], outcome: NodeOutcome
) -> None:
    """US Core searches by ``patient``; resources appended to ``outcome.resources``."""
    for rtype in types:
        for page in fhir.search(rtype, {"patient": patient_id}):
            for entry in page.bundle.get("entry") or []:
                res = entry.get("resource")
                if isinstance(res, dict) and (entry.get("search") or {}).get("mode") != "include":
                    outcome.resources.append(res)


def fan_out(
    nodes: list[NodeEndpoint],
    work: Callable[[NodeEndpoint, NodeOutcome], None],
    *,
    timeout_s: float,
    max_parallel: int,
) -> list[NodeOutcome]:
    """Run ``work`` per node in threads; the whole fan-out ends at ``timeout_s``.

    A node still running at the deadline is ``timeout`` (its thread ends by itself: the HTTP
    timeout equals the deadline) and what it had gathered is dropped, so a late answer never lands.
    """
    outcomes = {n.id: NodeOutcome(n.id) for n in nodes}
    if not nodes:
        return []

    def one(node: NodeEndpoint) -> NodeOutcome:
        out = NodeOutcome(node.id)
        start = time.monotonic()
        try:
            work(node, out)
            if out.status == "pending":
                out.status = "ok"
        except AuthError as exc:
            out.status, out.errors = "refused", [_error_code(exc)]
        except httpx.TimeoutException:
            out.status, out.errors = "timeout", ["timeout"]
        except TransientError as exc:
            # FhirClient gave up retrying: a timeout stays a timeout in the per-node report.
            timed_out = "Timeout" in str(exc)
            out.status = "timeout" if timed_out else "error"
            out.errors = ["timeout" if timed_out else _error_code(exc)]
        except (MedblocksError, httpx.HTTPError, ValueError) as exc:
            out.status, out.errors = "error", [_error_code(exc)]
        out.elapsed_s = time.monotonic() - start
        return out

    pool = ThreadPoolExecutor(
        max_workers=max(1, min(max_parallel, len(nodes))), thread_name_prefix="udap-node"
    )
    try:
        futures = {pool.submit(one, n): n for n in nodes}
        done, _pending = wait(futures, timeout=timeout_s)
        for fut, node in futures.items():
            if fut in done:
                outcomes[node.id] = fut.result()
            else:
                outcomes[node.id] = NodeOutcome(
                    node.id, status="timeout", errors=["timeout"], elapsed_s=timeout_s
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [outcomes[n.id] for n in nodes]


def _error_code(exc: BaseException) -> str:
    """A stable, PHI-free error label."""
    if isinstance(exc, FhirRequestError):
        return f"http_{exc.status}"
    if isinstance(exc, AuthError):
        text = str(exc)
        for word in (
            "consent_required",
            "invalid_grant",
            "invalid_client",
            "unapproved_software_statement",
            "invalid_client_metadata",
            "revoked",
            "expired",
            "untrusted",
        ):
            if word in text:
                return word
        return "auth"
    return type(exc).__name__

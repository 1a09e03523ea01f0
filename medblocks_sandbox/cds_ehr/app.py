"""A sandbox EHR as a CDS Hooks *client* and SMART *launcher* (CDS Hooks 2.0, SMART App Launch 2).

It plays the EHR side of the clinician workflow against the sandbox EHR organizations (role
``ehr``), in process:

* **EHR launch**: mints a ``launch`` id at an organization's authorization server (with patient,
  encounter, user, fhirContext) and sends the browser to the app's launch URL with ``iss`` (that
  organization's FHIR base) and ``launch``;
* **CDS Hooks calls**: discovery, then a hook call signed with its own key (ES384, ``kid``,
  ``typ: JWT``, ``jti``, ``aud`` = the exact URL called), with prefetch filled from the
  organization's store per the service's templates (instance reads and searches), on request left
  out, sent as ``null`` or as an OperationOutcome (fault modes for tests);
* **JWKS**: publishes its public key at ``{base}/jwks.json`` (what a CDS service allow-lists).

Routes (admin ones need ``X-Admin-Secret``)::

    GET  /jwks.json
    GET  /launch?org=&patient=&app=[&encounter=&user=]   302 to {app}?iss=...&launch=...
    POST /_admin/launch  {"org", "patient", "app", "encounter"?, "user"?} -> {"url", "iss"}
    POST /_admin/fire    {"org", "service_base", "hook", "patient", "user"?, "orders"?,
                          "selections"?, "prefetch_mode"?: "fill"|"omit"|"null"|"outcome",
                          "service_id"?, "fhir_authorization"?: bool}
                         -> {"status", "body", "request"}
"""

import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from medblocks_sandbox.ehr_common import ADMIN_HEADER
from medblocks_sandbox.keys import JwtSigningKey, generate_actor_key
from medblocks_sandbox.run import RoleApp, RoleContext, register_role

HOOK_SERVICE_IDS = {
    "patient-view": "medblocks-patient-view",
    "order-select": "medblocks-order-select",
    "order-sign": "medblocks-order-sign",
}
_TOKEN = re.compile(r"\{\{\s*context\.([A-Za-z]+)\s*\}\}")
_USER_TOKEN = re.compile(r"\{\{\s*userPractitionerId\s*\}\}")


@dataclass
class CdsEhr:
    """The launcher/CDS client: its identity (iss, key) and the organizations it fronts."""

    base_url: str
    orgs: Mapping[str, Any] = field(repr=False)  # org id -> handles of the `ehr` role (store, auth)
    org_bases: Mapping[str, str] = field(default_factory=dict)  # org id -> FHIR base
    key: JwtSigningKey = field(
        default_factory=lambda: generate_actor_key("ES384", kid="cds-ehr-1"), repr=False
    )
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0), repr=False)
    #: The ``subject`` of the FHIR tokens handed to CDS services (their OAuth client id).
    cds_client_id: str = "cds-service"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def iss(self) -> str:
        """Our issuer URI (what CDS services allow-list)."""
        return self.base_url

    @property
    def jwks_url(self) -> str:
        """Where our public key is published."""
        return f"{self.base_url}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        """Our JWKS (public key only)."""
        return {"keys": [self.key.public_jwk()]}

    # -- SMART EHR launch -----------------------------------------------------------------------
    def launch_url(
        self,
        *,
        org: str,
        patient: str,
        app: str,
        encounter: str | None = None,
        user: str = "Practitioner/sandbox-clinician",
        fhir_context: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Mint a launch at ``org`` and return the app's launch URL with ``iss`` and ``launch``."""
        auth = self.orgs[org]["auth"]
        launch = auth.mint_launch(
            patient=patient,
            encounter=encounter,
            user=user,
            fhir_context=fhir_context,
            need_patient_banner=True,
            auto_approve=True,
        )
        query = urllib.parse.urlencode({"iss": self.org_bases[org], "launch": launch})
        return app + ("&" if "?" in app else "?") + query

    # -- CDS Hooks client -------------------------------------------------------------------------
    def sign(self, aud: str, *, lifetime: int = 300) -> str:
        """A CDS Hooks JWT for a call to ``aud`` (SPECS §4.6)."""
        now = int(time.time())
        claims = {
            "iss": self.iss,
            "aud": aud,
            "exp": now + lifetime,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims,
            self.key.private_pem,
            algorithm=self.key.alg,
            headers={"kid": self.key.kid, "typ": "JWT", "jku": self.jwks_url},
        )

    def discover(self, service_base: str) -> list[dict[str, Any]]:
        """The services a CDS service base offers (signed discovery call)."""
        url = f"{service_base.rstrip('/')}/cds-services"
        resp = self.http.get(
            url, headers={"Authorization": f"Bearer {self.sign(url)}", "Accept": "application/json"}
        )
        resp.raise_for_status()
        return list(resp.json().get("services") or [])

    def _fill(self, template: str, org: str, context: Mapping[str, Any], user: str) -> Any:
        store = self.orgs[org]["store"]
        missing = []

        def sub(m: re.Match[str]) -> str:
            value = context.get(m.group(1))
            if not isinstance(value, str):
                missing.append(m.group(1))
                return ""
            return value

        text = _TOKEN.sub(sub, template)
        text = _USER_TOKEN.sub(user.split("/", 1)[-1], text)
        if missing:
            raise KeyError(missing[0])
        path, _, query = text.partition("?")
        parts = path.strip("/").split("/")
        if len(parts) == 2 and not query:
            return store.get(parts[0], parts[1])  # None: no data, sent as null
        params = [(k, v) for k, v in urllib.parse.parse_qsl(query) if not k.startswith("_")]
        found = store.search(parts[0], params)
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [{"resource": r} for r in found],
        }

    def build_request(
        self,
        *,
        org: str,
        hook: str,
        patient: str,
        user: str,
        prefetch_templates: Mapping[str, str],
        prefetch_mode: str = "fill",
        orders: Sequence[Mapping[str, Any]] = (),
        selections: Sequence[str] | None = None,
        encounter: str | None = None,
        fhir_authorization: bool = False,
    ) -> dict[str, Any]:
        """The hook request body (context per hook, prefetch per mode).

        ``fhir_authorization`` adds ``fhirServer`` (the organization's FHIR base) and a
        ``fhirAuthorization`` access token for the patient, minted by that organization's
        authorization server with read-only patient scopes, so the service can fetch what the
        prefetch lacks (CDS Hooks 2.0 §3.2.2).
        """
        context: dict[str, Any] = {"userId": user, "patientId": patient}
        if encounter:
            context["encounterId"] = encounter
        if hook in ("order-select", "order-sign"):
            context["draftOrders"] = {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": dict(o)} for o in orders],
            }
            if hook == "order-select":
                context["selections"] = list(
                    selections or [f"{o['resourceType']}/{o['id']}" for o in orders]
                )
        body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
        if fhir_authorization:
            body["fhirServer"] = self.org_bases[org]
            body["fhirAuthorization"] = self.orgs[org]["auth"].mint_cds_token(
                client_id=self.cds_client_id, patient=patient, scopes=["patient/*.rs"], user=user
            )
        if prefetch_mode == "omit" or not prefetch_templates:
            return body
        prefetch: dict[str, Any] = {}
        for key, template in prefetch_templates.items():
            if prefetch_mode == "null":
                prefetch[key] = None
            elif prefetch_mode == "outcome":
                prefetch[key] = {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "exception", "diagnostics": "prefetch failed"}
                    ],
                }
            else:
                try:
                    prefetch[key] = self._fill(template, org, context, user)
                except KeyError:
                    continue  # a token we cannot fill: leave the key out (the service fetches)
        body["prefetch"] = prefetch
        return body

    def fire(
        self,
        *,
        org: str,
        service_base: str,
        hook: str,
        patient: str,
        user: str = "Practitioner/sandbox-clinician",
        orders: Sequence[Mapping[str, Any]] = (),
        selections: Sequence[str] | None = None,
        prefetch_mode: str = "fill",
        service_id: str | None = None,
        encounter: str | None = None,
        fhir_authorization: bool = False,
    ) -> dict[str, Any]:
        """Discover, build and send one hook call; returns status, body and the request sent."""
        services = self.discover(service_base)
        sid = service_id or HOOK_SERVICE_IDS.get(hook)
        service = next(
            (s for s in services if s.get("id") == sid and s.get("hook") == hook), None
        ) or next((s for s in services if s.get("hook") == hook), None)
        if service is None:
            return {"status": 404, "body": {"error": "no service for this hook"}, "request": {}}
        body = self.build_request(
            org=org,
            hook=hook,
            patient=patient,
            user=user,
            prefetch_templates=service.get("prefetch") or {},
            prefetch_mode=prefetch_mode,
            orders=orders,
            selections=selections,
            encounter=encounter,
            fhir_authorization=fhir_authorization,
        )
        url = f"{service_base.rstrip('/')}/cds-services/{service['id']}"
        resp = self.http.post(url, json=body, headers={"Authorization": f"Bearer {self.sign(url)}"})
        try:
            answer: Any = resp.json()
        except ValueError:
            answer = {"error": "not JSON"}
        return {"status": resp.status_code, "body": answer, "request": body}


def _admin_ok(request: Request, secret: str) -> bool:
    import hmac

    return hmac.compare_digest(request.headers.get(ADMIN_HEADER, ""), secret)


def cds_ehr_role(ctx: RoleContext) -> RoleApp:
    """Role factory: the launcher/CDS client over the ``ehr`` role's organizations."""
    ehr_role = ctx.built_roles.get("ehr")
    orgs = dict(ehr_role.extra.get("orgs", {})) if ehr_role else {}
    bases = {o.org_id: o.fhir_base for o in (ehr_role.orgs if ehr_role else [])}
    client = CdsEhr(base_url=ctx.base_url, orgs=orgs, org_bases=bases)

    async def jwks(_request: Request) -> JSONResponse:
        return JSONResponse(client.jwks(), headers={"Cache-Control": "max-age=300"})

    async def launch(request: Request) -> Response:
        q = request.query_params
        org, patient, app = q.get("org"), q.get("patient"), q.get("app")
        if not org or org not in orgs or not patient or not app:
            return JSONResponse({"error": "org, patient and app are required"}, status_code=400)
        url = client.launch_url(
            org=org,
            patient=patient,
            app=app,
            encounter=q.get("encounter"),
            user=q.get("user") or "Practitioner/sandbox-clinician",
        )
        return RedirectResponse(url, status_code=302)

    async def admin_launch(request: Request) -> Response:
        if not _admin_ok(request, ctx.admin_secret):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        body = await request.json()
        org = body.get("org")
        if org not in orgs or not body.get("patient") or not body.get("app"):
            return JSONResponse({"error": "org, patient and app are required"}, status_code=400)
        url = client.launch_url(
            org=org,
            patient=body["patient"],
            app=body["app"],
            encounter=body.get("encounter"),
            user=body.get("user") or "Practitioner/sandbox-clinician",
        )
        return JSONResponse({"url": url, "iss": bases[org]})

    def _fire(body: dict[str, Any]) -> dict[str, Any]:
        return client.fire(
            org=body["org"],
            service_base=body["service_base"],
            hook=body["hook"],
            patient=body["patient"],
            user=body.get("user") or "Practitioner/sandbox-clinician",
            orders=body.get("orders") or [],
            selections=body.get("selections"),
            prefetch_mode=body.get("prefetch_mode") or "fill",
            service_id=body.get("service_id"),
            encounter=body.get("encounter"),
            fhir_authorization=bool(body.get("fhir_authorization")),
        )

    async def admin_fire(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        if not _admin_ok(request, ctx.admin_secret):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "JSON body required"}, status_code=400)
        need = ("org", "service_base", "hook", "patient")
        if (
            not isinstance(body, dict)
            or any(not body.get(k) for k in need)
            or body["org"] not in orgs
        ):
            return JSONResponse({"error": f"{', '.join(need)} are required"}, status_code=400)
        try:
            result = await run_in_threadpool(_fire, body)
        except httpx.HTTPError as exc:
            return JSONResponse(
                {"error": f"CDS service unreachable ({type(exc).__name__})"}, status_code=502
            )
        return JSONResponse(result)

    app = Starlette(
        routes=[
            Route("/jwks.json", jwks),
            Route("/launch", launch),
            Route("/_admin/launch", admin_launch, methods=["POST"]),
            Route("/_admin/fire", admin_fire, methods=["POST"]),
        ]
    )
    return RoleApp(app=app, orgs=[], close=client.http.close, extra={"client": client})


def register() -> None:
    """Register the ``cds_ehr`` role with the sandbox (start order: after ``ehr``)."""
    register_role("cds_ehr", cds_ehr_role)


register()

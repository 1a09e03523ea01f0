"""The admin API of one sandbox EHR organization (loopback and a shared secret only): clients,
token expiry, grant revocation, EHR launches, server knobs and change sets.
"""

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medblocks_sandbox.auth import AuthServer
from medblocks_sandbox.ehr_common import ADMIN_HEADER, ChangeSet, _display_name
from medblocks_sandbox.errors import FhirHttpError
from medblocks_sandbox.fhir_store import FhirStore


# ---------------------------------------------------------------------------------------------
# Admin API (loopback + shared secret)
# ---------------------------------------------------------------------------------------------
def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Admin:
    def __init__(
        self,
        store: FhirStore,
        auth: AuthServer,
        secret: str,
        evolver: Callable[[int], ChangeSet] | None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.secret = secret
        self.evolver = evolver

    def routes(self) -> list[Route]:
        return [
            Route("/clients", self.add_client, methods=["POST"]),
            Route("/clients/{client_id}", self.get_client, methods=["GET"]),
            Route("/expire-tokens", self.expire_tokens, methods=["POST"]),
            Route("/revoke-grant", self.revoke_grant, methods=["POST"]),
            Route("/grants", self.list_grants, methods=["GET"]),
            Route("/launch", self.launch, methods=["POST"]),
            Route("/config", self.set_config, methods=["POST"]),
            Route("/apply-changes", self.apply_changes, methods=["POST"]),
        ]

    async def _guard(self, request: Request) -> dict[str, Any]:
        given = request.headers.get(ADMIN_HEADER, "")
        if (
            not _is_loopback(request)
            or not self.secret
            or not hmac.compare_digest(given.encode(), self.secret.encode())
        ):
            raise FhirHttpError(403, "forbidden", "admin API: loopback and admin secret only")
        if request.method != "POST":
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise FhirHttpError(400, "invalid", "admin API: the body must be JSON") from None
        if not isinstance(body, dict):
            raise FhirHttpError(400, "invalid", "admin API: the body must be a JSON object")
        return body

    async def add_client(self, request: Request) -> Response:
        body = await self._guard(request)
        try:
            reg, secret = self.auth.register_client(body)
        except ValueError as exc:
            raise FhirHttpError(400, "invalid", str(exc)) from None
        out = reg.public_view()
        if secret:
            out["client_secret"] = secret
        return JSONResponse(out, status_code=201)

    async def get_client(self, request: Request) -> Response:
        await self._guard(request)
        reg = self.auth.get_client(request.path_params["client_id"])
        if reg is None:
            raise FhirHttpError(404, "not-found", "no such client")
        return JSONResponse(reg.public_view())

    async def expire_tokens(self, request: Request) -> Response:
        body = await self._guard(request)
        n = self.auth.expire_tokens(client_id=body.get("client_id"), grant_id=body.get("grant_id"))
        return JSONResponse({"expired": n})

    async def revoke_grant(self, request: Request) -> Response:
        body = await self._guard(request)
        n = self.auth.revoke_grants(
            grant_id=body.get("grant_id"),
            client_id=body.get("client_id"),
            patient=body.get("patient"),
        )
        return JSONResponse({"revoked": n})

    async def list_grants(self, request: Request) -> Response:
        await self._guard(request)
        return JSONResponse({"grants": self.auth.grants()})

    async def launch(self, request: Request) -> Response:
        body = await self._guard(request)
        allowed = {
            "patient",
            "encounter",
            "user",
            "fhir_context",
            "intent",
            "need_patient_banner",
            "smart_style_url",
            "auto_approve",
        }
        unknown = set(body) - allowed
        if unknown:
            raise FhirHttpError(400, "invalid", f"unknown launch fields: {sorted(unknown)}")
        launch = self.auth.mint_launch(**body)
        return JSONResponse({"launch": launch, "iss": self.auth.fhir_base}, status_code=201)

    async def set_config(self, request: Request) -> Response:
        body = await self._guard(request)
        for key, value in body.items():
            if not hasattr(self.auth.config, key) or not isinstance(value, int | bool):
                raise FhirHttpError(400, "invalid", f"unknown or invalid config field {key!r}")
            setattr(self.auth.config, key, value)
        return JSONResponse({k: getattr(self.auth.config, k) for k in body})

    async def apply_changes(self, request: Request) -> Response:
        body = await self._guard(request)
        if "step" in body:
            if self.evolver is None:
                raise FhirHttpError(400, "not-supported", "no population evolver is attached")
            upserts, deletes = self.evolver(int(body["step"]))
        else:
            upserts = list(body.get("upserts") or [])
            deletes = [(d["resourceType"], d["id"]) for d in body.get("deletes") or []]
        stored = 0
        for resource in upserts:
            try:
                self.store.put(resource)
            except ValueError as exc:
                raise FhirHttpError(400, "invalid", str(exc)) from None
            stored += 1
            if resource.get("resourceType") == "Patient":
                self.auth.patient_names[resource["id"]] = _display_name(resource)
        deleted = sum(1 for t, i in deletes if self.store.delete(t, i))
        return JSONResponse({"upserted": stored, "deleted": deleted})

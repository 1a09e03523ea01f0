"""The browser side of the SMART authorization server: `authorize` (GET and POST), the login
page and the consent page (deny -> `error=access_denied&state=...`), SPECS §1.2-§1.6.
"""

import hmac
import html
import re
import secrets
import urllib.parse
from string import Template
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from medblocks_sandbox.auth_core import AuthCore, _error_page, _is_form, _redirect, _single_params
from medblocks_sandbox.auth_model import _PAGE_HEADERS, _TEMPLATES, _Code, _Pending
from medblocks_sandbox.smart_scopes import describe_scope, narrow_scopes, parse_scope


class AuthorizeEndpoints(AuthCore):
    """`/authorize`, `/login` and `/consent` of :class:`~medblocks_sandbox.auth.AuthServer`."""

    # -- authorize -----------------------------------------------------------------------------
    async def _authorize(self, request: Request) -> Response:
        if request.method == "POST":
            if not _is_form(request):
                return _error_page("invalid_request", "POST authorize needs a form body")
            params = _single_params(list((await request.form()).multi_items()))
        else:
            params = _single_params(list(request.query_params.multi_items()))
        if params is None:
            return _error_page("invalid_request", "a parameter was sent more than once")
        client = self.get_client(params.get("client_id", ""))
        if client is None:
            return _error_page("invalid_client", "unknown client_id")
        if client.token_endpoint_auth_method == "none" and not self.config.allow_public_clients:
            return _error_page("unauthorized_client", "this server accepts confidential clients")
        redirect_uri = params.get("redirect_uri", "")
        # Exact string match against a pre-registered URI (no prefix or pattern matching).
        if redirect_uri not in client.redirect_uris:
            return _error_page("invalid_request", "redirect_uri is not registered for this client")
        state = params.get("state")

        def fail(error: str, description: str) -> Response:
            return _redirect(
                redirect_uri, {"error": error, "error_description": description, "state": state}
            )

        if not state:
            return fail("invalid_request", "state is required")
        if params.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if params.get("aud") != self.fhir_base:
            return fail("invalid_request", "aud must be this server's FHIR base URL")
        method = params.get("code_challenge_method")
        challenge = params.get("code_challenge", "")
        if method != "S256":
            return fail("invalid_request", "code_challenge_method must be S256")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
            return fail("invalid_request", "code_challenge must be a base64url SHA-256 digest")
        requested = params.get("scope", "").split()
        if not requested:
            return fail("invalid_scope", "scope is required")
        launch_ctx = None
        launch_id = params.get("launch")
        if launch_id is not None or "launch" in requested:
            if launch_id is None or "launch" not in requested:
                return fail(
                    "invalid_request",
                    "EHR launch needs both the launch parameter and the launch scope",
                )
            with self._lock:
                entry = self._launches.get(launch_id)
            if entry is None or entry[0] <= self.clock():
                return fail("invalid_request", "unknown or expired launch")
            launch_ctx = entry[1]
        scopes = narrow_scopes(requested, client.scopes, contexts=("patient", "user"))
        if not any(parse_scope(s) for s in scopes) and "openid" not in scopes:
            return fail("invalid_scope", "none of the requested scopes can be granted")
        pending = _Pending(
            request_id=secrets.token_urlsafe(24),
            client=client,
            redirect_uri=redirect_uri,
            state=state,
            scopes=scopes,
            code_challenge=challenge,
            nonce=params.get("nonce"),
            launch=launch_ctx,
            created=self.clock(),
        )
        with self._lock:
            self._purge()
            self._pending[pending.request_id] = pending
        if launch_ctx and launch_ctx.get("user"):
            # EHR launch: the user is already signed in to the EHR that minted the launch.
            if launch_ctx.get("auto_approve"):
                return self._approve(pending, scopes, launch_id)
            return self._consent_page(pending)
        query = urllib.parse.urlencode({"request_id": pending.request_id})
        return RedirectResponse(f"{self.auth_base}/login?{query}", status_code=302)

    async def _login(self, request: Request) -> Response:
        if request.method == "GET":
            pending = self._get_pending(request.query_params.get("request_id", ""))
            if pending is None:
                return _error_page("invalid_request", "unknown or expired authorization request")
            return self._login_page(pending, "")
        if not _is_form(request):
            return _error_page("invalid_request", "login needs a form body")
        form = await request.form()
        pending = self._get_pending(str(form.get("request_id", "")))
        if pending is None:
            return _error_page("invalid_request", "unknown or expired authorization request")
        if form.get("decision") == "deny":
            return self._deny(pending)
        login = self.logins.get(str(form.get("username", "")))
        password = str(form.get("password", ""))
        if login is None or not hmac.compare_digest(login.password.encode(), password.encode()):
            return self._login_page(pending, "Wrong username or password.", status=401)
        with self._lock:
            pending.login = login
            pending.consent_token = secrets.token_urlsafe(24)
        return self._consent_page(pending)

    async def _consent(self, request: Request) -> Response:
        if not _is_form(request):
            return _error_page("invalid_request", "consent needs a form body")
        form = await request.form()
        pending = self._get_pending(str(form.get("request_id", "")))
        token = str(form.get("consent_token", ""))
        if (
            pending is None
            or not pending.consent_token
            or not hmac.compare_digest(pending.consent_token.encode(), token.encode())
        ):
            return _error_page("invalid_request", "unknown or expired consent")
        if form.get("decision") != "approve":
            return self._deny(pending)
        chosen = [str(s) for s in form.getlist("scope")]
        # The user can only take scopes away; anything not offered is ignored.
        scopes = [s for s in pending.scopes if s in chosen]
        if not any(parse_scope(s) for s in scopes) and "openid" not in scopes:
            with self._lock:
                self._pending.pop(pending.request_id, None)
            return _redirect(
                pending.redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": "no access was approved",
                    "state": pending.state,
                },
            )
        launch_id = None
        if pending.launch is not None:
            with self._lock:
                launch_id = next(
                    (k for k, v in self._launches.items() if v[1] is pending.launch), None
                )
        return self._approve(pending, scopes, launch_id)

    def _deny(self, pending: _Pending) -> Response:
        with self._lock:
            self._pending.pop(pending.request_id, None)
        return _redirect(
            pending.redirect_uri,
            {
                "error": "access_denied",
                "error_description": "the user denied access",
                "state": pending.state,
            },
        )

    def _approve(self, pending: _Pending, scopes: list[str], launch_id: str | None) -> Response:
        launch = pending.launch or {}
        patient = launch.get("patient")
        encounter = launch.get("encounter")
        fhir_user = launch.get("user")
        if pending.login is not None:
            fhir_user = fhir_user or f"Patient/{pending.login.patient_id}"
            patient = patient or pending.login.patient_id
        has_patient_scope = any(
            (s := parse_scope(t)) is not None and s.context == "patient" for t in scopes
        )
        if not (has_patient_scope or "launch/patient" in scopes or launch.get("patient")):
            patient = None
        if has_patient_scope and not patient:
            # A granted patient/ scope needs a patient context (SPECS §1.5).
            return _redirect(
                pending.redirect_uri,
                {
                    "error": "invalid_scope",
                    "error_description": "patient scopes need a patient",
                    "state": pending.state,
                },
            )
        context: dict[str, Any] = {}
        if pending.launch is not None:
            context["need_patient_banner"] = bool(launch.get("need_patient_banner"))
            context["tenant"] = self.org_id
            for key in ("intent", "smart_style_url"):
                if launch.get(key):
                    context[key] = launch[key]
            if launch.get("fhirContext"):
                context["fhirContext"] = launch["fhirContext"]
        code = secrets.token_urlsafe(32)
        record = _Code(
            client_id=pending.client.client_id,
            redirect_uri=pending.redirect_uri,
            code_challenge=pending.code_challenge,
            scopes=tuple(scopes),
            patient=patient,
            encounter=encounter,
            fhir_user=fhir_user,
            context=context,
            nonce=pending.nonce,
            expires_at=self.clock() + self.config.code_lifetime,
        )
        with self._lock:
            self._codes[code] = record
            self._pending.pop(pending.request_id, None)
            if launch_id:
                self._launches.pop(launch_id, None)  # a launch id is good for one authorization
        return _redirect(pending.redirect_uri, {"code": code, "state": pending.state})

    def _get_pending(self, request_id: str) -> _Pending | None:
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.created + self.config.pending_lifetime <= self.clock():
                return None
            return pending

    def _login_page(self, pending: _Pending, error: str, status: int = 200) -> Response:
        page = Template((_TEMPLATES / "login.html").read_text()).substitute(
            org_name=html.escape(self.org_name),
            client_name=html.escape(pending.client.name),
            error=html.escape(error),
            action=html.escape(f"{self.auth_base}/login"),
            request_id=html.escape(pending.request_id),
        )
        return HTMLResponse(page, status_code=status, headers=_PAGE_HEADERS)

    def _consent_page(self, pending: _Pending) -> Response:
        if pending.consent_token is None:
            pending.consent_token = secrets.token_urlsafe(24)
        user = (
            pending.login.username
            if pending.login
            else ((pending.launch or {}).get("user") or "EHR user")
        )
        patient = (
            pending.login.patient_id if pending.login else ((pending.launch or {}).get("patient"))
        )
        patient_line = ""
        if patient:
            name = self.patient_names.get(patient, f"Patient/{patient}")
            patient_line = f" to the record of <strong>{html.escape(name)}</strong>"
        items = "\n".join(
            f'  <li><label><input type="checkbox" name="scope" value="{html.escape(s)}" checked>'
            f" {html.escape(describe_scope(s))} <code>{html.escape(s)}</code></label></li>"
            for s in pending.scopes
        )
        page = Template((_TEMPLATES / "consent.html").read_text()).substitute(
            org_name=html.escape(self.org_name),
            client_name=html.escape(pending.client.name),
            user_display=html.escape(str(user)),
            patient_line=patient_line,
            action=html.escape(f"{self.auth_base}/consent"),
            scope_items=items,
            request_id=html.escape(pending.request_id),
            consent_token=html.escape(pending.consent_token),
        )
        return HTMLResponse(page, headers=_PAGE_HEADERS)

"""The back-channel side of the SMART authorization server: the token endpoint (authorization_code,
refresh_token, client_credentials), client authentication (`private_key_jwt` assertions per
RFC 7523 with keys from JWKS or an allow-listed `jku`, `client_secret_basic`), and RFC 7662
introspection and RFC 7009 revocation.
"""

import base64
import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx
import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from medblocks_sandbox.auth_core import AuthCore, _is_form, _max_age, _oauth_error, _single_params
from medblocks_sandbox.auth_model import (
    _NO_STORE,
    _VERIFIER_RE,
    ASSERTION_ALGS,
    JWT_BEARER,
    ClientRegistration,
    TokenInfo,
    _Grant,
)
from medblocks_sandbox.errors import OAuthProtocolError
from medblocks_sandbox.smart_scopes import narrow_scopes, parse_scope


class TokenEndpoints(AuthCore):
    """`/token`, `/introspect` and `/revoke` of :class:`~medblocks_sandbox.auth.AuthServer`."""

    # -- token endpoint ------------------------------------------------------------------------
    async def _token(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError(
                    "invalid_request", "the body must be application/x-www-form-urlencoded"
                )
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            client = await self._authenticate_client(request, params)
            grant_type = params.get("grant_type")
            if grant_type == "authorization_code":
                body = self._grant_code(client, params)
            elif grant_type == "refresh_token":
                body = self._grant_refresh(client, params)
            elif grant_type == "client_credentials":
                body = self._grant_client_credentials(client, params)
            else:
                raise OAuthProtocolError("unsupported_grant_type", "grant_type is not supported")
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    async def _authenticate_client(
        self, request: Request, params: Mapping[str, str]
    ) -> ClientRegistration:
        header = request.headers.get("authorization", "")
        assertion_type = params.get("client_assertion_type")
        used = [bool(header.lower().startswith("basic ")), assertion_type is not None]
        if sum(used) > 1:
            raise OAuthProtocolError("invalid_request", "use one client authentication method")
        if used[0]:
            return self._authenticate_basic(header)
        if assertion_type is not None:
            if assertion_type != JWT_BEARER:
                raise OAuthProtocolError(
                    "invalid_client", "unsupported client_assertion_type", status=401
                )
            client = await self.verify_client_assertion(params.get("client_assertion", ""))
            if params.get("client_id") not in (None, client.client_id):
                raise OAuthProtocolError(
                    "invalid_client", "client_id does not match the assertion", status=401
                )
            return client
        public = self.get_client(params.get("client_id", ""))
        if (
            public is None
            or public.token_endpoint_auth_method != "none"
            or not self.config.allow_public_clients
        ):
            raise OAuthProtocolError("invalid_client", "client authentication failed", status=401)
        return public

    def _authenticate_basic(self, header: str) -> ClientRegistration:
        challenge = {"WWW-Authenticate": f'Basic realm="{self.org_id}"'}
        try:
            raw = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True).decode()
            cid, _, secret = raw.partition(":")
            cid, secret = urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(secret)
        except (ValueError, IndexError):
            raise OAuthProtocolError(
                "invalid_client", "malformed Basic credentials", status=401, headers=challenge
            ) from None
        client = self.get_client(cid)
        if (
            client is None
            or client.token_endpoint_auth_method != "client_secret_basic"
            or not client.client_secret
            or not hmac.compare_digest(client.client_secret.encode(), secret.encode())
        ):
            raise OAuthProtocolError(
                "invalid_client", "client authentication failed", status=401, headers=challenge
            )
        return client

    async def verify_client_assertion(self, assertion: str) -> ClientRegistration:
        """Check a private_key_jwt client assertion (SPECS §2); return the client it proves.

        Every failure is `invalid_client` (401), as the spec asks: bad signature, unknown `kid`,
        replayed `jti`, expired or too long-lived, wrong `aud`, disallowed `alg` or `jku`.
        """

        def bad(why: str) -> OAuthProtocolError:
            return OAuthProtocolError("invalid_client", why, status=401)

        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise bad("client_assertion is not a JWT") from None
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise bad("client_assertion alg must be RS384 or ES384")
        if header.get("typ") != "JWT" or not header.get("kid"):
            raise bad("client_assertion header needs typ JWT and a kid")
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id:
            raise bad("client_assertion iss and sub must both be the client_id")
        client = self.get_client(client_id)
        if client is None or client.token_endpoint_auth_method != "private_key_jwt":
            raise bad("unknown client or client not registered for private_key_jwt")
        jwks = await self._client_keys(client, header.get("jku"))
        kty = "RSA" if alg.startswith("RS") else "EC"
        candidates = [
            k
            for k in jwks.get("keys", [])
            if isinstance(k, dict)
            and k.get("kid") == header["kid"]
            and k.get("kty") == kty
            and (kty != "EC" or k.get("crv") == "P-384")
        ]
        if len(candidates) != 1:
            raise bad("the kid does not select exactly one key of the right type")
        try:
            key = jwt.PyJWK(candidates[0], algorithm=alg)
            verified = jwt.decode(
                assertion,
                key=key.key,
                algorithms=[alg],
                audience=self.token_endpoint,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise bad("client_assertion has expired") from None
        except jwt.InvalidAudienceError:
            raise bad("client_assertion aud must be the token endpoint URL") from None
        except jwt.PyJWTError:
            raise bad("client_assertion failed verification") from None
        now = self.clock()
        exp = float(verified["exp"])
        if exp - now > self.config.assertion_max_lifetime:
            raise bad("client_assertion exp is more than five minutes ahead")
        iat = verified.get("iat")
        if isinstance(iat, int | float) and iat > now + self.config.clock_skew:
            raise bad("client_assertion iat is in the future")
        jti = verified["jti"]
        if not isinstance(jti, str) or not jti:
            raise bad("client_assertion jti must be a non-empty string")
        with self._lock:
            self._jtis = {k: v for k, v in self._jtis.items() if v > now}
            if (client_id, jti) in self._jtis:
                raise bad("client_assertion jti was already used")
            self._jtis[(client_id, jti)] = exp
        return client

    async def _client_keys(self, client: ClientRegistration, jku: str | None) -> dict[str, Any]:
        if jku is not None:
            if jku not in client.jku_allowlist:
                raise OAuthProtocolError(
                    "invalid_client", "jku is not allow-listed for this client", status=401
                )
            return await self._fetch_jwks(jku)
        if client.jwks_uri:
            return await self._fetch_jwks(client.jwks_uri)
        if client.jwks is not None and not self.config.require_jwks_url:
            return dict(client.jwks)
        raise OAuthProtocolError("invalid_client", "no keys registered for this client", status=401)

    async def _fetch_jwks(self, url: str) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            cached = self._jwks_cache.get(url)
        if cached and cached[0] > now:
            return cached[1]
        try:
            if self._http is not None:
                resp = await self._http.get(url, timeout=5)
            else:
                async with httpx.AsyncClient(timeout=5) as client:
                    resp = await client.get(url)
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            raise OAuthProtocolError(
                "invalid_client", "the client's JWKS URL could not be read", status=401
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise OAuthProtocolError(
                "invalid_client", "the client's JWKS URL is not a JWK Set", status=401
            )
        # Cache no longer than the client's Cache-Control allows (SPECS §2).
        max_age = _max_age(resp.headers.get("cache-control", ""))
        if max_age > 0:
            with self._lock:
                self._jwks_cache[url] = (now + max_age, body)
        return body

    def _grant_code(self, client: ClientRegistration, params: Mapping[str, str]) -> dict[str, Any]:
        code = params.get("code", "")
        with self._lock:
            record = self._codes.get(code)
            if record is None or record.client_id != client.client_id:
                raise OAuthProtocolError("invalid_grant", "unknown authorization code")
            if record.used:
                # A replayed code: revoke what it issued (RFC 6749 §4.1.2).
                grant = self._grants.get(record.grant_id or "")
                if grant:
                    self._revoke_grant(grant)
                raise OAuthProtocolError("invalid_grant", "authorization code was already used")
            record.used = True
        if record.expires_at <= self.clock():
            raise OAuthProtocolError("invalid_grant", "authorization code has expired")
        if params.get("redirect_uri") != record.redirect_uri:
            raise OAuthProtocolError("invalid_grant", "redirect_uri does not match")
        verifier = params.get("code_verifier", "")
        if not _VERIFIER_RE.match(verifier):
            raise OAuthProtocolError("invalid_grant", "code_verifier is missing or malformed")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
        if not hmac.compare_digest(digest.rstrip(b"=").decode(), record.code_challenge):
            raise OAuthProtocolError("invalid_grant", "code_verifier does not match")
        scopes = record.scopes
        refresh_life: float | None = None
        if "offline_access" in scopes:
            refresh_life = self.config.refresh_token_lifetime
        elif "online_access" in scopes:
            refresh_life = self.config.online_refresh_lifetime
        grant = _Grant(
            grant_id=secrets.token_hex(8),
            client_id=client.client_id,
            scopes=scopes,
            patient=record.patient,
            encounter=record.encounter,
            fhir_user=record.fhir_user,
            context=record.context,
            refresh_expires_at=None if refresh_life is None else self.clock() + refresh_life,
        )
        with self._lock:
            self._grants[grant.grant_id] = grant
            record.grant_id = grant.grant_id
        body = self._issue(grant, scopes, with_refresh=refresh_life is not None)
        if "openid" in scopes:
            body["id_token"] = self._id_token(
                client, grant, record.nonce, with_fhir_user="fhirUser" in scopes
            )
        return body

    def _grant_refresh(
        self, client: ClientRegistration, params: Mapping[str, str]
    ) -> dict[str, Any]:
        token = params.get("refresh_token", "")
        with self._lock:
            grant_id = self._refresh.get(token)
            grant = self._grants.get(grant_id or "")
            if grant is None or grant.client_id != client.client_id:
                raise OAuthProtocolError("invalid_grant", "unknown refresh token")
            if grant.revoked:
                raise OAuthProtocolError("invalid_grant", "the grant was revoked")
            if token != grant.current_refresh:
                # A rotated-out token came back: someone holds a copy. Kill the grant.
                self._revoke_grant(grant)
                raise OAuthProtocolError(
                    "invalid_grant", "refresh token reuse detected; the grant is revoked"
                )
            if grant.refresh_expires_at is not None and grant.refresh_expires_at <= self.clock():
                raise OAuthProtocolError("invalid_grant", "refresh token has expired")
            scopes = grant.scopes
            if "scope" in params:
                asked = params["scope"].split()
                if not asked or not set(asked) <= set(grant.scopes):
                    raise OAuthProtocolError(
                        "invalid_scope", "refresh scope must be a subset of the original grant"
                    )
                scopes = tuple(s for s in grant.scopes if s in asked)
            return self._issue(grant, scopes, with_refresh=True)

    def _grant_client_credentials(
        self, client: ClientRegistration, params: Mapping[str, str]
    ) -> dict[str, Any]:
        if client.token_endpoint_auth_method != "private_key_jwt":
            raise OAuthProtocolError(
                "unauthorized_client", "client_credentials needs private_key_jwt authentication"
            )
        asked = params.get("scope", "").split()
        if not asked:
            raise OAuthProtocolError("invalid_scope", "scope is required")
        granted = narrow_scopes(asked, client.scopes, contexts=("system",))
        # Backend Services: asking beyond what was pre-authorised fails (SPECS §2).
        if len(granted) != len(asked) or any(
            parse_scope(g) != parse_scope(a) for g, a in zip(granted, asked, strict=True)
        ):
            raise OAuthProtocolError("invalid_scope", "scope asks beyond what this client may have")
        now = self.clock()
        token = secrets.token_urlsafe(32)
        info = TokenInfo(
            token=token,
            client_id=client.client_id,
            scopes=tuple(granted),
            expires_at=now + self.config.backend_token_lifetime,
            issued_at=now,
        )
        with self._lock:
            self._access[token] = info
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.config.backend_token_lifetime,
            "scope": " ".join(granted),
        }

    # -- introspection and revocation ----------------------------------------------------------
    async def _introspect(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError("invalid_request", "form body required")
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            # The caller must be authorised: a live bearer token or client authentication.
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                if self.validate_access_token(auth[7:].strip()) is None:
                    return JSONResponse(
                        {"error": "invalid_token"},
                        status_code=401,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"', **_NO_STORE},
                    )
            else:
                await self._authenticate_client(request, params)
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        info = self.validate_access_token(params.get("token", ""))
        if info is None:
            return JSONResponse({"active": False}, headers=_NO_STORE)
        body: dict[str, Any] = {
            "active": True,
            "scope": " ".join(info.scopes),
            "client_id": info.client_id,
            "exp": int(info.expires_at),
            "iat": int(info.issued_at),
            "token_type": "Bearer",
            "iss": self.issuer,
            "aud": self.fhir_base,
        }
        if info.fhir_user:
            body["sub"] = info.fhir_user
            body["fhirUser"] = f"{self.fhir_base}/{info.fhir_user}"
        if info.patient:
            body["patient"] = info.patient
        if info.encounter:
            body["encounter"] = info.encounter
        body.update(info.context)
        return JSONResponse(body, headers=_NO_STORE)

    async def _revoke(self, request: Request) -> Response:
        try:
            if not _is_form(request):
                raise OAuthProtocolError("invalid_request", "form body required")
            params = _single_params(list((await request.form()).multi_items()))
            if params is None:
                raise OAuthProtocolError("invalid_request", "a parameter was sent more than once")
            client = await self._authenticate_client(request, params)
        except OAuthProtocolError as exc:
            return _oauth_error(exc)
        token = params.get("token", "")
        with self._lock:
            info = self._access.get(token)
            if info is not None and info.client_id == client.client_id:
                info.revoked = True
            grant = self._grants.get(self._refresh.get(token, ""))
            if grant is not None and grant.client_id == client.client_id:
                self._revoke_grant(grant)
        # RFC 7009 §2.2: 200 whether or not the token was known.
        return Response(status_code=200, headers=_NO_STORE)

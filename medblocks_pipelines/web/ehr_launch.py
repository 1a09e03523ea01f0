"""SMART EHR launch surface: launch URL, callback and the clinician app page (SPECS §1.2-1.6).

Routes (mounted by ``web/app.py``)::

    GET /ehr/launch?iss=...&launch=...   iss allow-listed per organization, discovery on iss, PKCE,
                                         state -> 302 to the EHR's authorize endpoint
    GET /ehr/callback                    state + browser-session check, code exchange, launch
                                         context stored on a clinician_workflow connection -> 302
                                         to the app page
    GET /ehr/app/{connection_id}         the app: patient banner (unless the EHR shows one) and
                                         the unified record summary with provenance

The launch URL is what an organization registers in its EHR (and what CDS cards link to as a
``smart`` link). The browser that started a launch holds a random session cookie; only its hash is
stored, and the callback and the app page require it. ``ctx.extra["http"]`` may hold an
``httpx.Client``.
"""

import html
import secrets
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from medblocks_pipelines.lib.cds.launch import PATTERN, finish_ehr_launch, start_ehr_launch
from medblocks_pipelines.lib.errors import LaunchError, MedblocksError, NotFound
from medblocks_pipelines.lib.registry import ControlPlane

LAUNCH_PATH = "/ehr/launch"
CALLBACK_PATH = "/ehr/callback"
SESSION_COOKIE = "mb_ehr_session"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
KIND_TITLES = {
    "condition": "Conditions",
    "medication": "Medications",
    "allergy": "Allergies",
    "result": "Results",
    "report": "Reports",
    "immunization": "Immunizations",
    "procedure": "Procedures",
    "encounter": "Encounters",
}
PATTERN_LABELS = {
    "backend": "EHR bulk sync",
    "patient_access": "patient-authorized access",
    "clinician_workflow": "EHR launch",
    "network": "exchange network",
}
ROWS_PER_KIND = 10


def _page(title: str, body_html: str, status: int = 200) -> HTMLResponse:
    doc = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:1rem}}"
        ".banner{background:#eef;padding:.5rem 1rem;border-radius:4px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:90%}</style></head>"
        f"<body>{body_html}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers=_NO_STORE)


def _message(title: str, message: str, status: int) -> HTMLResponse:
    return _page(title, f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>", status)


def _banner(patient: dict[str, Any]) -> str:
    name = ""
    for n in patient.get("name") or []:
        if isinstance(n, dict):
            name = " ".join([*(n.get("given") or []), n.get("family") or ""]).strip()
            break
    parts = [f"<strong>{html.escape(name or 'Unnamed patient')}</strong>"]
    if patient.get("birthDate"):
        parts.append(f"born {html.escape(str(patient['birthDate']))}")
    if patient.get("gender"):
        parts.append(html.escape(str(patient["gender"])))
    return f'<div class="banner" id="patient-banner">{" · ".join(parts)}</div>'


def _summary(facts: list[dict[str, Any]], names: dict[str, Any]) -> str:
    if not facts:
        return '<p id="record">The unified record holds nothing more for this patient yet.</p>'
    out = ['<div id="record"><h2>Unified record</h2>']
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for f in facts:
        by_kind.setdefault(str(f["kind"]), []).append(f)
    for kind in KIND_TITLES:
        rows = by_kind.get(kind)
        if not rows:
            continue
        out.append(
            f"<h3>{KIND_TITLES[kind]} ({len(rows)})</h3><table><tr><th>item</th>"
            "<th>value</th><th>date</th><th>sources</th><th>organizations</th>"
            "<th>patterns</th></tr>"
        )
        for f in rows[:ROWS_PER_KIND]:
            value = ""
            if f.get("value_num") is not None:
                value = f"{f['value_num']:g} {f.get('value_unit') or ''}".strip()
            elif f.get("value_text"):
                value = str(f["value_text"])
            srcs = ", ".join(names["source_names"].get(s, s) for s in f.get("sources") or [])
            orgs = ", ".join(
                names["organization_names"].get(o, o) for o in f.get("organizations") or []
            )
            pats = ", ".join(PATTERN_LABELS.get(p, p) for p in f.get("patterns") or [])
            cells = [
                str(f.get("display") or f.get("text") or f.get("code") or ""),
                value,
                str(f.get("last_date") or ""),
                srcs,
                orgs,
                pats,
            ]
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    out.append("</div>")
    return "".join(out)


def _partition_cookie(resp: Response, name: str) -> None:
    """Add the CHIPS ``Partitioned`` attribute to the ``name`` cookie the response sets
    (Starlette only writes it on Python 3.14+, where ``http.cookies`` knows it)."""
    prefix = f"{name}=".encode()
    resp.raw_headers = [
        (k, v + b"; Partitioned" if k == b"set-cookie" and v.startswith(prefix) else v)
        for k, v in resp.raw_headers
    ]


def routes(ctx: Any) -> list[BaseRoute]:
    """The EHR-launch routes bound to ``ctx`` (a ``web.app.WebContext``)."""
    redirect_uri = f"{ctx.public_base_url}{CALLBACK_PATH}"
    secure = ctx.secure

    def http() -> httpx.Client:
        client = ctx.extra.get("http")
        if client is None:
            client = ctx.extra["http"] = httpx.Client(timeout=20.0)
        return client

    def cds() -> Any:
        from medblocks_pipelines.web.cds import get_service

        return get_service(ctx)

    def person_of(tenant: str, source: str, patient: str) -> str | None:
        snap = cds().indexes.for_tenant(tenant).current()
        return snap.person_for(source, patient) if snap else None

    def launch(request: Request) -> Response:
        cp: ControlPlane = ctx.control_plane
        iss, launch_id = request.query_params.get("iss"), request.query_params.get("launch")
        if not iss or not launch_id:
            return _message("Cannot launch", "The EHR must send iss and launch.", 400)
        binding = secrets.token_urlsafe(32)
        try:
            req = start_ehr_launch(
                cp,
                iss=iss,
                launch=launch_id,
                redirect_uri=redirect_uri,
                http=http(),
                session_binding=binding,
            )
        except LaunchError as exc:
            return _message("Cannot launch", f"This launch is not accepted ({exc.reason}).", 400)
        except MedblocksError as exc:
            return _message(
                "Cannot launch", f"The EHR is not reachable now ({type(exc).__name__}).", 502
            )
        if req.method == "POST":
            fields = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in req.form.items()
            )
            resp: Response = _page(
                "Redirecting",
                f'<form method="post" '
                f'action="{html.escape(req.endpoint)}">{fields}<button>'
                "Continue</button></form>",
            )
        else:
            resp = RedirectResponse(req.url, status_code=302, headers=_NO_STORE)
        # EHRs open launched apps embedded (an iframe or an embedded browser), so the launch and
        # the callback run in a third-party context where only SameSite=None cookies are sent and
        # browsers that block third-party cookies still keep partitioned (CHIPS) ones. Both need
        # HTTPS; on plain http (loopback development) the cookie stays SameSite=Lax.
        resp.set_cookie(
            SESSION_COOKIE,
            binding,
            max_age=8 * 3600,
            path=f"{ctx.public_path}/ehr",
            httponly=True,
            samesite="none" if secure else "lax",
            secure=secure,
        )
        if secure:
            _partition_cookie(resp, SESSION_COOKIE)
        return resp

    def callback(request: Request) -> Response:
        cp: ControlPlane = ctx.control_plane
        try:
            result = finish_ehr_launch(
                cp,
                params=dict(request.query_params),
                http=http(),
                session_binding=request.cookies.get(SESSION_COOKIE),
                person_of=person_of,
            )
        except LaunchError as exc:
            return _message(
                "Launch refused", f"This sign-in response is not valid ({exc.reason}).", 400
            )
        if not result.ok:
            return _message(
                "Launch failed", f"The EHR did not authorize the app ({result.reason}).", 400
            )
        return RedirectResponse(
            f"{ctx.public_base_url}/ehr/app/{result.connection_id}",
            status_code=302,
            headers=_NO_STORE,
        )

    def app_page(request: Request) -> Response:
        import hashlib
        import hmac

        cp: ControlPlane = ctx.control_plane
        conn_id = request.path_params["connection_id"]
        try:
            conn = cp.get_connection(conn_id)
        except NotFound:
            conn = None
        cookie = request.cookies.get(SESSION_COOKIE) or ""
        expected = (conn.context.get("app_session_sha256") if conn else None) or ""
        # Same answer for unknown and not-yours: connection ids are not an oracle.
        if (
            conn is None
            or conn.pattern != PATTERN
            or not expected
            or not hmac.compare_digest(expected, hashlib.sha256(cookie.encode()).hexdigest())
        ):
            return _message("Not available", "Open this app from the EHR.", 403)
        if conn.state != "active":
            return _message("Not available", "This launch is no longer active.", 403)
        patient_id = conn.source_patient_id
        launch_ctx = (conn.context or {}).get("launch_context") or {}
        parts = ["<h1>Unified record</h1>"]
        if patient_id and launch_ctx.get("need_patient_banner", True):
            try:
                from medblocks_pipelines.lib.smart.tokens import TokenManager

                token = TokenManager(cp, conn_id, http=http()).access_token()
                base = str(cp.get_source(conn.source_id).fhir_base_url).rstrip("/")
                resp = http().get(
                    f"{base}/Patient/{patient_id}",
                    timeout=10.0,
                    headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"},
                )
                if resp.status_code == 200:
                    parts.append(_banner(resp.json()))
            except (MedblocksError, httpx.HTTPError, ValueError):
                parts.append(
                    '<div class="banner" id="patient-banner">Patient details are '
                    "not available now.</div>"
                )
        service = cds()
        snap = service.indexes.for_tenant(conn.tenant_id).current()
        facts: list[dict[str, Any]] = []
        if snap is not None and patient_id:
            person = snap.person_for(conn.source_id, patient_id)
            facts = snap.facts_of(person) if person else []
        parts.append(_summary(facts, service._registry_names()))
        return _page("Unified record", "".join(parts))

    return [
        Route(LAUNCH_PATH, launch, methods=["GET"]),
        Route(CALLBACK_PATH, callback, methods=["GET"]),
        Route("/ehr/app/{connection_id}", app_page, methods=["GET"]),
    ]

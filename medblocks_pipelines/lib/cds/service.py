"""The CDS Hooks 2.0 service: discovery, hook calls, feedback (SPECS §4), transport-free.

``web/cds.py`` puts this on HTTP; everything here takes the ``Authorization`` header, the exact URL
called and the raw body, and returns a JSON-able dict or raises :class:`CdsRequestError` carrying
the status (400 malformed, 401 refused JWT, 404 unknown service, 412 data not obtainable).

A hook call: verify the JWT (:mod:`lib.cds.security`: the issuer picks the organization, the
organization its tenant) -> validate the request for the hook -> find the person through the
caller's patient id at the organization's source (identity tables), else through the Patient's
identifiers (prefetch ``patient``, or fetched from ``fhirServer`` with ``fhirAuthorization``) ->
cards from the tenant's warehouse index (:mod:`lib.cds.index`, :mod:`lib.cds.cards`). Every
answered call is an audit-log row (counts and our ids only), written in batches off the request
path (:mod:`lib.cds.audit_writer`; :meth:`CdsService.close` writes what is still queued).

:meth:`CdsService.call_async` / :meth:`CdsService.discovery_async` answer on the web server's event
loop when nothing has to wait (:mod:`lib.cds.inline`), else in a thread: same checks, same answer.
"""

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa

from medblocks_pipelines.lib.cds import cards as card_rules
from medblocks_pipelines.lib.cds import order_cards
from medblocks_pipelines.lib.cds.audit_writer import AuditWriter
from medblocks_pipelines.lib.cds.index import WarehouseIndexes
from medblocks_pipelines.lib.cds.ingredients import TerminologyClient
from medblocks_pipelines.lib.cds.inline import MustOffload, inline_mode, may_block
from medblocks_pipelines.lib.cds.knowledge import KnowledgeBase, knowledge_from_env
from medblocks_pipelines.lib.cds.security import CdsAuthenticator, CdsClient
from medblocks_pipelines.lib.cds.tables import cds_feedback
from medblocks_pipelines.lib.errors import CdsRequestError

if TYPE_CHECKING:
    from medblocks_pipelines.lib.registry import ControlPlane

log = logging.getLogger(__name__)

PATIENT_PREFETCH = {"patient": "Patient/{{context.patientId}}"}
SERVICE_IDS = {
    "medblocks-patient-view": "patient-view",
    "medblocks-order-select": "order-select",
    "medblocks-order-sign": "order-sign",
}
PACKS_EXTENSION = "com.medblocks.knowledge-packs"


def describe_services(kb: KnowledgeBase) -> tuple[dict[str, Any], ...]:
    """Discovery's services, saying exactly which checks the active knowledge packs support."""
    gap = ""
    dm, a1c = kb.value_set("diabetes"), kb.value_set("hba1c")
    if dm is not None and a1c is not None:
        gap = (
            f", and an HbA1c care gap for diabetes (value sets {dm[1].oid} and {a1c[1].oid}, "
            f"{dm[0].label})"
        )
    allergy = "allergies recorded at other organizations to an ingredient of the drafted drug"
    if kb.has_allergy_classes:
        allergy += f" or to its drug class as listed in: {kb.labels('allergy_groups')}"
    if kb.has_interactions:
        inter = (
            f"interactions with medications recorded at other organizations, only the pairs "
            f"listed in: {kb.labels('interactions')}"
        )
    else:
        inter = "no interaction checking (no interaction knowledge pack is active)"
    order_checks = f"Duplicate tests done elsewhere; {allergy}; {inter}."
    extension = {PACKS_EXTENSION: kb.describe()} if kb.packs else None
    services: list[dict[str, Any]] = [
        {
            "hook": "patient-view",
            "id": "medblocks-patient-view",
            "title": "Unified record: beyond this chart",
            "description": "What other organizations, payers and the network hold for this "
            f"patient{gap}.",
            "prefetch": PATIENT_PREFETCH,
        },
        {
            "hook": "order-select",
            "id": "medblocks-order-select",
            "title": "Unified record: order checks",
            "description": order_checks,
            "prefetch": PATIENT_PREFETCH,
        },
        {
            "hook": "order-sign",
            "id": "medblocks-order-sign",
            "title": "Unified record: order checks at signing",
            "description": f"Over every draft order being signed: {order_checks}",
            "prefetch": PATIENT_PREFETCH,
        },
    ]
    if extension:
        for svc in services:
            svc["extension"] = extension
    return tuple(services)


BY_ID = {sid: {"id": sid, "hook": hook} for sid, hook in SERVICE_IDS.items()}
USER_RE = re.compile(
    r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}$"
)
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
MAX_BODY = 2_000_000
FETCH_TIMEOUT = 3.0
NAMES_TTL = 30.0


#: Hooks answered on the event loop when nothing has to wait (:meth:`CdsService.call_async`).
INLINE_HOOKS = frozenset({"patient-view"})
#: Runs a blocking callable in a thread and awaits it (``starlette.concurrency.run_in_threadpool``).
Offload = Callable[..., Awaitable[Any]]


def _service(service_id: str) -> dict[str, str]:
    service = BY_ID.get(service_id)
    if service is None:
        raise CdsRequestError("no such CDS service", status=404, reason="unknown_service")
    return service


def _bad(message: str, reason: str = "invalid_request") -> CdsRequestError:
    return CdsRequestError(message, status=400, reason=reason)


def _is_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


class CdsService:
    """Discovery, hook calls and feedback for every organization of every tenant."""

    def __init__(
        self,
        cp: "ControlPlane",
        *,
        public_base_url: str,
        warehouse_path_of: Callable[[str], Any],
        warehouse_refresh_of: Callable[[str], object] | None = None,
        http: httpx.Client | None = None,
        authenticator: CdsAuthenticator | None = None,
        today: Callable[[], date] | None = None,
        app_url: str | None = None,
        knowledge: KnowledgeBase | None = None,
        terminology: TerminologyClient | None = None,
        audit_writer: AuditWriter | None = None,
    ) -> None:
        self.cp = cp
        self.audit_writer = audit_writer or AuditWriter(cp.engine)
        self.base = public_base_url.rstrip("/")
        self.http = http or httpx.Client(timeout=FETCH_TIMEOUT)
        self.auth = authenticator or CdsAuthenticator(cp, http=self.http)
        # Each index load that met purpose-restricted (network) rows is an audit row.
        from medblocks_pipelines.lib.cds.index import audit_index_read

        self.indexes = WarehouseIndexes(
            warehouse_path_of,
            refresh_of=warehouse_refresh_of,
            on_load_of=lambda tenant, snap: audit_index_read(cp, tenant, snap),
        )
        self.today = today or (lambda: datetime.now(UTC).date())
        self.app_url = app_url if app_url is not None else f"{self.base}/ehr/launch"
        # Knowledge packs and the terminology server: as given, else as configured (env).
        self.knowledge = knowledge if knowledge is not None else knowledge_from_env()
        self.terminology = (
            terminology if terminology is not None else TerminologyClient.from_env(self.http)
        )
        self.services = describe_services(self.knowledge)
        self._names: tuple[float, dict[str, Any]] | None = None
        self._names_lock = threading.Lock()

    def warm(self) -> list[str]:
        """Load the warehouse index of every tenant with a CDS organization, and the registry
        names: a worker does this at startup, before it accepts calls, so the first hook calls
        after a deploy neither wait for a load nor answer without the warehouse."""
        tenants = sorted(
            {str(o.tenant_id) for o in self.cp.list_organizations() if (o.config or {}).get("cds")}
        )
        self._registry_names()
        for tenant in tenants:
            self.indexes.for_tenant(tenant).current()
        return tenants

    def close(self) -> None:
        """Write every queued audit row and release connections (the web app's shutdown)."""
        self.audit_writer.close()
        self.auth.close()

    # -- URLs -----------------------------------------------------------------------------------
    @property
    def discovery_url(self) -> str:
        """The exact URL of discovery (the ``aud`` a discovery JWT must carry)."""
        return f"{self.base}/cds-services"

    def service_url(self, service_id: str) -> str:
        """The exact URL of one service."""
        return f"{self.base}/cds-services/{service_id}"

    # -- discovery --------------------------------------------------------------------------------
    def discovery(self, authorization: str | None) -> dict[str, Any]:
        """``{"services": [...]}`` after verifying the caller's JWT."""
        self.auth.verify(authorization, url=self.discovery_url)
        return {"services": [dict(s) for s in self.services]}

    async def discovery_async(
        self, authorization: str | None, *, offload: Offload
    ) -> dict[str, Any]:
        """:meth:`discovery` on the event loop (``offload`` runs it in a thread when it must wait)."""
        try:
            await self.auth.verify_async(authorization, url=self.discovery_url, offload=offload)
        except MustOffload:
            result: dict[str, Any] = await offload(self.discovery, authorization)
            return result
        return {"services": [dict(s) for s in self.services]}

    # -- registry names (cached) -------------------------------------------------------------------
    def _registry_names(self) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._names
        if cached is not None and now - cached[0] < NAMES_TTL:
            return cached[1]
        may_block("registry")
        with self._names_lock:
            sources = self.cp.list_sources()
            orgs = self.cp.list_organizations()
            names = {
                "source_names": {s.id: s.name for s in sources},
                "source_kinds": {s.id: s.kind for s in sources},
                "source_bases": {s.id: s.fhir_base_url for s in sources},
                "organization_names": {o.id: o.name for o in orgs},
            }
            self._names = (now, names)
        return names

    # -- hook calls --------------------------------------------------------------------------------
    def call(self, service_id: str, authorization: str | None, raw: bytes) -> dict[str, Any]:
        """Answer one hook call; raises :class:`CdsRequestError` for every refusal."""
        _service(service_id)  # 404 before the JWT is looked at
        client = self.auth.verify(authorization, url=self.service_url(service_id))
        return self.answer(service_id, client, raw)

    async def call_async(
        self, service_id: str, authorization: str | None, raw: bytes, *, offload: Offload
    ) -> dict[str, Any]:
        """:meth:`call` on the event loop where nothing has to wait; ``offload`` (a thread) else.

        ``patient-view`` only: the order hooks may ask a terminology server. A step that would
        block raises :class:`MustOffload` before any side effect, and the call goes on in a thread
        from there: the whole call before the jti is remembered, :meth:`answer` after it.
        """
        service = _service(service_id)
        if service["hook"] not in INLINE_HOOKS:
            result: dict[str, Any] = await offload(self.call, service_id, authorization, raw)
            return result
        url = self.service_url(service_id)
        try:
            client = await self.auth.verify_async(authorization, url=url, offload=offload)
        except MustOffload:
            result = await offload(self.call, service_id, authorization, raw)
            return result
        try:
            with inline_mode():
                return self.answer(service_id, client, raw)
        except MustOffload:
            result = await offload(self.answer, service_id, client, raw)
            return result

    def answer(self, service_id: str, client: CdsClient, raw: bytes) -> dict[str, Any]:
        """The cards for a call whose JWT ``client`` was verified (and its jti remembered)."""
        service = _service(service_id)
        body = self._parse(raw)
        request = self._validate(service, body)
        names = self._registry_names()
        self._check_fhir_server(request, client, names)
        ctx = request["context"]
        index = self.indexes.for_tenant(client.tenant_id)
        snap = index.current()
        patient_id = ctx["patientId"]
        base = str(names["source_bases"].get(client.source_id) or "").rstrip("/")
        here = frozenset(
            {client.source_id}
            | {
                sid
                for sid, b in names["source_bases"].items()
                if base and str(b or "").rstrip("/") == base
            }
        )
        person = None
        for sid in sorted(here, key=lambda s: s != client.source_id):
            person = snap.person_for(sid, patient_id) if snap else None
            if person is not None:
                break
        if person is None and snap is not None:
            patient = self._prefetched("patient", f"Patient/{patient_id}", request, required=True)
            identifiers = [
                f"{i['system']}|{i['value']}"
                for i in (patient or {}).get("identifier") or []
                if isinstance(i, dict)
                and isinstance(i.get("system"), str)
                and isinstance(i.get("value"), str)
            ]
            person = snap.person_for(client.source_id, patient_id, identifiers)
        cards: list[dict[str, Any]] = []
        if person is not None and snap is not None:
            facts = snap.facts_of(person)
            cctx = card_rules.CardContext(
                service_id=service_id,
                person_id=person,
                here_source=client.source_id,
                here_sources=here,
                patient_id=patient_id,
                today=self.today(),
                source_names=names["source_names"],
                source_kinds=names["source_kinds"],
                organization_names=names["organization_names"],
                app_url=self.app_url,
                here_organizations=frozenset({client.organization_id}),
                knowledge=self.knowledge,
                terminology=self.terminology,
            )
            if service["hook"] == "patient-view":
                cards = card_rules.patient_view_cards(facts, cctx)
            else:
                cards = order_cards.order_cards(
                    request["orders"], facts, cctx, drafts=request["drafts"]
                )
        self.audit_writer.submit(
            tenant_id=client.tenant_id,
            actor=f"cds:{client.organization_id}",
            action=f"cds.{service['hook']}",
            person_id=person,
            purpose="treatment",
            evidence={
                "hook_instance": request["hookInstance"],
                "cards": len(cards),
                "person_found": person is not None,
                "warehouse": snap is not None,
            },
        )
        return {"cards": cards}

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_BODY:
            raise CdsRequestError("request body too large", status=413, reason="too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad("the body is not JSON") from exc
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def _validate(self, service: Mapping[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        hook = body.get("hook")
        if hook != service["hook"]:
            raise _bad(f"hook must be {service['hook']}")
        instance = body.get("hookInstance")
        try:
            uuid.UUID(str(instance))
        except ValueError as exc:
            raise _bad("hookInstance must be a UUID") from exc
        if not isinstance(instance, str):
            raise _bad("hookInstance must be a UUID")
        ctx = body.get("context")
        if not isinstance(ctx, dict):
            raise _bad("context is required and must be an object")
        user, patient = ctx.get("userId"), ctx.get("patientId")
        if not isinstance(user, str) or not USER_RE.match(user):
            raise _bad(
                "context.userId must be a Practitioner, PractitionerRole, Patient or "
                "RelatedPerson reference"
            )
        if not isinstance(patient, str) or not ID_RE.match(patient):
            raise _bad("context.patientId must be a FHIR id")
        enc = ctx.get("encounterId")
        if enc is not None and (not isinstance(enc, str) or not ID_RE.match(enc)):
            raise _bad("context.encounterId must be a FHIR id")
        auth = body.get("fhirAuthorization")
        server = body.get("fhirServer")
        if auth is not None:
            if not isinstance(auth, dict):
                raise _bad("fhirAuthorization must be an object")
            for key in ("access_token", "token_type", "scope", "subject"):
                if not isinstance(auth.get(key), str) or not auth.get(key):
                    raise _bad(f"fhirAuthorization.{key} is required")
            if not isinstance(auth.get("expires_in"), int):
                raise _bad("fhirAuthorization.expires_in is required")
            if str(auth["token_type"]).lower() != "bearer":
                raise _bad("fhirAuthorization.token_type must be Bearer")
            if auth.get("patient") is not None and auth.get("patient") != patient:
                # A token for another patient's record must not be used for this one.
                raise _bad("fhirAuthorization.patient is not context.patientId")
            if not isinstance(server, str) or not server:
                raise _bad("fhirServer is required with fhirAuthorization")
        if server is not None and (
            not isinstance(server, str) or not server.startswith(("https://", "http://"))
        ):
            raise _bad("fhirServer must be an absolute URL")
        prefetch = body.get("prefetch")
        if prefetch is not None and not isinstance(prefetch, dict):
            raise _bad("prefetch must be an object")
        out: dict[str, Any] = {
            "hookInstance": instance,
            "context": ctx,
            "fhirServer": server,
            "fhirAuthorization": auth,
            "prefetch": prefetch or {},
            "orders": [],
            "drafts": [],
        }
        if hook in ("order-select", "order-sign"):
            out["orders"], out["drafts"] = self._orders(hook, ctx)
        return out

    @staticmethod
    def _orders(
        hook: str, ctx: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the orders to check, every resource of draftOrders)."""
        bundle = ctx.get("draftOrders")
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise _bad("context.draftOrders must be a Bundle")
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise _bad("context.draftOrders.entry must be an array")
        resources = []
        for e in entries:
            res = e.get("resource") if isinstance(e, dict) else None
            if (
                not isinstance(res, dict)
                or not isinstance(res.get("resourceType"), str)
                or not isinstance(res.get("id"), str)
            ):
                raise _bad("every draftOrders entry needs a resource with resourceType and id")
            resources.append(res)
        if hook == "order-sign":
            return resources, resources
        selections = ctx.get("selections")
        if (
            not isinstance(selections, list)
            or not selections
            or not all(isinstance(s, str) for s in selections)
        ):
            raise _bad("context.selections must be a non-empty array of references")
        by_ref = {f"{r['resourceType']}/{r['id']}": r for r in resources}
        missing = [s for s in selections if s not in by_ref]
        if missing:
            raise _bad("context.selections must reference resources in draftOrders")
        return [by_ref[s] for s in selections], resources

    def _check_fhir_server(
        self, request: Mapping[str, Any], client: CdsClient, names: Mapping[str, Any]
    ) -> None:
        server = request.get("fhirServer")
        if server is None or request.get("fhirAuthorization") is None:
            return
        base = str(names["source_bases"].get(client.source_id) or "").rstrip("/")
        if server.rstrip("/") != base:
            # The token would go to a server the organization never registered: refuse to use it.
            raise _bad(
                "fhirServer is not this organization's registered FHIR server",
                "unknown_fhir_server",
            )

    def _prefetched(
        self, key: str, path: str, request: Mapping[str, Any], *, required: bool
    ) -> dict[str, Any] | None:
        """A prefetch value: given, ``null`` (no data), else fetched; 412 when required and unobtainable."""
        prefetch = request["prefetch"]
        if key in prefetch:
            value = prefetch[key]
            if value is None:
                return None  # the EHR filled it: there is no data
            if isinstance(value, dict) and not _is_outcome(value):
                return value
            # An OperationOutcome (or junk) is a prefetch error: try the FHIR server ourselves.
        server, auth = request.get("fhirServer"), request.get("fhirAuthorization")
        if server and auth:
            may_block("prefetch")
            try:
                resp = self.http.get(
                    f"{server.rstrip('/')}/{path}",
                    timeout=FETCH_TIMEOUT,
                    headers={
                        "Authorization": f"Bearer {auth['access_token']}",
                        "Accept": "application/fhir+json",
                    },
                )
                if resp.status_code == 200:
                    value = resp.json()
                    if isinstance(value, dict) and value.get("resourceType") == path.split("/")[0]:
                        return value
                elif resp.status_code == 404:
                    return None
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("cds prefetch fetch failed: %s", type(exc).__name__)
        if required:
            raise CdsRequestError(
                f"prefetch {key} is needed and could not be obtained",
                status=412,
                reason="prefetch_unavailable",
            )
        return None

    # -- feedback ------------------------------------------------------------------------------------
    async def feedback_async(
        self, service_id: str, authorization: str | None, raw: bytes, *, offload: Offload
    ) -> dict[str, Any]:
        """:meth:`feedback` in a thread (it writes rows)."""
        result: dict[str, Any] = await offload(self.feedback, service_id, authorization, raw)
        return result

    def feedback(self, service_id: str, authorization: str | None, raw: bytes) -> dict[str, Any]:
        """Store card feedback (SPECS §4.5), de-duplicated; returns counts."""
        if service_id not in BY_ID:
            raise CdsRequestError("no such CDS service", status=404, reason="unknown_service")
        client = self.auth.verify(authorization, url=f"{self.service_url(service_id)}/feedback")
        body = self._parse(raw)
        items = body.get("feedback")
        if not isinstance(items, list) or not items:
            raise _bad("feedback must be a non-empty array")
        rows = []
        for item in items:
            if not isinstance(item, dict):
                raise _bad("each feedback item must be an object")
            card, outcome, ts = item.get("card"), item.get("outcome"), item.get("outcomeTimestamp")
            if not isinstance(card, str) or outcome not in ("accepted", "overridden"):
                raise _bad("feedback needs card and outcome accepted|overridden")
            if not isinstance(ts, str):
                raise _bad("feedback needs outcomeTimestamp")
            try:
                datetime.fromisoformat(ts.replace("Z", "+00:00"))
            except ValueError as exc:
                raise _bad("outcomeTimestamp must be an RFC 3339 date-time") from exc
            accepted = item.get("acceptedSuggestions")
            if outcome == "accepted" and (
                not isinstance(accepted, list)
                or not accepted
                or not all(isinstance(a, dict) and isinstance(a.get("id"), str) for a in accepted)
            ):
                raise _bad("accepted feedback needs acceptedSuggestions with ids")
            reason = item.get("overrideReason")
            if reason is not None and not isinstance(reason, dict):
                raise _bad("overrideReason must be an object")
            rows.append(
                {
                    "tenant_id": client.tenant_id,
                    "organization_id": client.organization_id,
                    "service_id": service_id,
                    "card": card[:100],
                    "outcome": outcome,
                    "outcome_timestamp": ts[:40],
                    "accepted_suggestions": [a["id"] for a in accepted or []],
                    "override_reason": reason,
                    "received_at": datetime.now(UTC),
                }
            )
        stored = 0
        for row in rows:
            try:
                with self.cp.engine.begin() as conn:
                    conn.execute(cds_feedback.insert().values(**row))
                stored += 1
            except sa.exc.IntegrityError:
                pass  # the same feedback again: already kept
        return {"stored": stored, "duplicates": len(rows) - stored}

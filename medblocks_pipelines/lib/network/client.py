"""The initiating-gateway client: XCPD -> XCA query -> XCA retrieve, fanned out over gateways.

Async httpx with an injectable transport (``httpx.MockTransport`` in unit tests, real sockets
against the sandbox gateway in integration tests). Each responding gateway gets its own timeout;
a gateway that times out, faults or answers garbage becomes an outcome with a status, and the
others still answer (SPECS 5.3/5.5: partial results at every fan-out step).
"""

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from lxml import etree

from medblocks_pipelines.lib.errors import ProtocolError, TransientError
from medblocks_pipelines.lib.network import ihe
from medblocks_pipelines.lib.network.errors import GatewayTimeout, SoapFault, UnsafeXMLError

#: Documents asked for in one RetrieveDocumentSetRequest.
RETRIEVE_BATCH = 10
#: Registry errors that say "try again later" (ITI TF-3 4.2.4.1): retried with backoff.
RETRYABLE_CODES = frozenset(
    {
        "XDSRegistryBusy",
        "XDSRepositoryBusy",
        "XDSRegistryOutOfResources",
        "XDSRepositoryOutOfResources",
    }
)
_R = TypeVar("_R")


@dataclass(frozen=True)
class GatewayConfig:
    """One responding gateway (a community) and how to reach it."""

    id: str
    home_community_id: str
    xcpd_url: str
    xca_query_url: str
    xca_retrieve_url: str
    name: str = ""
    organization: str | None = None
    timeout_s: float = 10.0
    name_format: str = ihe.NAME_FORMAT_URI

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GatewayConfig":
        """From a network source's ``config["gateways"]`` entry."""
        fmt = d.get("name_format", "uri")
        return cls(
            id=str(d["id"]),
            home_community_id=ihe.as_urn(str(d["home_community_id"])),
            xcpd_url=str(d["xcpd_url"]),
            xca_query_url=str(d["xca_query_url"]),
            xca_retrieve_url=str(d["xca_retrieve_url"]),
            name=str(d.get("name", d["id"])),
            organization=d.get("organization"),
            timeout_s=float(d.get("timeout_s", 10.0)),
            name_format=ihe.NAME_FORMAT_BASIC if fmt == "basic" else ihe.NAME_FORMAT_URI,
        )


@dataclass
class Exchange:
    """One SOAP round trip, for the audit trail (no patient data)."""

    gateway: str
    transaction: str  # ITI-55 | ITI-38 | ITI-39
    message_id: str
    assertion_id: str
    purpose: str
    status: str
    duration_ms: int


@dataclass
class GatewayOutcome:
    """What one responding gateway gave us."""

    gateway: str
    home_community_id: str
    organization: str | None
    status: str = "pending"  # ok | partial | no_match | timeout | fault | error
    matches: list[ihe.PatientMatch] = field(default_factory=list)
    entries: list[ihe.DocumentEntry] = field(default_factory=list)
    documents: list[ihe.RetrievedDocument] = field(default_factory=list)
    skipped: list[ihe.DocumentEntry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # error codes only
    exchanges: list[Exchange] = field(default_factory=list)
    assertion: str | None = None

    @property
    def responded(self) -> bool:
        """True when the gateway answered the discovery with a usable message."""
        return self.status in ("ok", "partial", "no_match")


def demographics_agree(ours: ihe.Demographics, theirs: ihe.Demographics | None) -> bool:
    """Family name, first given name and birth date agree (case-insensitive), as the IAS
    Demographics Double-Check needs; a match without demographics does not pass."""
    if theirs is None:
        return False
    return (
        ours.family.strip().lower() == theirs.family.strip().lower()
        and bool(ours.given)
        and bool(theirs.given)
        and ours.given[0].strip().lower() == theirs.given[0].strip().lower()
        and ours.birth_date == theirs.birth_date
    )


class GatewayClient:
    """Talks XCPD/XCA to responding gateways on behalf of one security context."""

    def __init__(
        self,
        security: ihe.SecurityContext,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_parallel: int = 4,
        max_response_bytes: int = 50 * 1024 * 1024,
        busy_retries: int = 2,
        busy_backoff_s: float = 0.2,
    ) -> None:
        self.security = security
        self.busy_retries = busy_retries
        self.busy_backoff_s = busy_backoff_s
        self.transport = transport
        self.max_parallel = max_parallel
        self.max_response_bytes = max_response_bytes

    async def _call(
        self,
        http: httpx.AsyncClient,
        gw: GatewayConfig,
        url: str,
        action: str,
        body: etree._Element,
        transaction: str,
        outcome: GatewayOutcome,
    ) -> ihe.SoapMessage:
        assertion = ihe.build_assertion(self.security, audience=url, name_format=gw.name_format)
        if outcome.assertion is None:
            outcome.assertion = etree.tostring(assertion, encoding="unicode")
        signing = (
            (self.security.key_pem, self.security.cert_pem)
            if self.security.key_pem and self.security.cert_pem
            else None
        )
        payload = ihe.envelope(action, url, body, assertion, signing=signing)
        msg_id = etree.fromstring(payload).findtext(f".//{{{ihe.WSA}}}MessageID") or ""
        started = time.monotonic()
        status = "error"
        try:
            try:
                async with http.stream(
                    "POST",
                    url,
                    content=payload,
                    headers={"Content-Type": ihe.soap_content_type(action)},
                    timeout=httpx.Timeout(gw.timeout_s),
                ) as resp:
                    chunks = []
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_response_bytes:
                            raise UnsafeXMLError(
                                f"gateway {gw.id}: response over {self.max_response_bytes} bytes"
                            )
                        chunks.append(chunk)
                    data = b"".join(chunks)
                    ctype = resp.headers.get("content-type", "")
                    http_status = resp.status_code
            except httpx.TimeoutException:
                status = "timeout"
                raise GatewayTimeout(
                    f"gateway {gw.id}: {transaction} timed out after {gw.timeout_s}s"
                ) from None
            except httpx.TransportError as exc:
                raise TransientError(
                    f"gateway {gw.id}: {transaction} transport error {type(exc).__name__}"
                ) from None
            looks_soap = "soap+xml" in ctype or "multipart/related" in ctype or "xml" in ctype
            if not looks_soap:
                raise ProtocolError(
                    f"gateway {gw.id}: {transaction} answered HTTP {http_status} {ctype.split(';')[0] or 'without content type'}"
                )
            msg = ihe.parse_soap(data, ctype, max_bytes=self.max_response_bytes)  # raises SoapFault
            if http_status >= 400:
                raise ProtocolError(
                    f"gateway {gw.id}: {transaction} HTTP {http_status} without a SOAP fault"
                )
            status = "ok"
            return msg
        except SoapFault:
            status = "fault"
            raise
        finally:
            outcome.exchanges.append(
                Exchange(
                    gw.id,
                    transaction,
                    msg_id,
                    assertion.get("ID", ""),
                    self.security.purpose,
                    status,
                    int((time.monotonic() - started) * 1000),
                )
            )

    async def patient_discovery(
        self,
        http: httpx.AsyncClient,
        gw: GatewayConfig,
        demo: ihe.Demographics,
        outcome: GatewayOutcome,
    ) -> ihe.XcpdResult:
        """ITI-55 to one gateway."""
        body = ihe.build_xcpd_request(
            demo,
            sender_hcid=self.security.home_community_id,
            receiver_hcid=gw.home_community_id,
            npi=self.security.npi,
        )
        msg = await self._call(http, gw, gw.xcpd_url, ihe.ACTION_XCPD, body, "ITI-55", outcome)
        return ihe.parse_xcpd_response(msg.body, home_community_id=gw.home_community_id)

    async def find_documents(
        self,
        http: httpx.AsyncClient,
        gw: GatewayConfig,
        match: ihe.PatientMatch,
        outcome: GatewayOutcome,
        *,
        date_from: str | None = None,
        date_to: str | None = None,
    ) -> ihe.QueryResponse:
        """ITI-38 FindDocuments for one matched patient."""
        body = ihe.build_find_documents(
            match, service_start_from=date_from, service_start_to=date_to
        )
        msg = await self._call(
            http, gw, gw.xca_query_url, ihe.ACTION_XCA_QUERY, body, "ITI-38", outcome
        )
        return ihe.parse_query_response(msg.body)

    async def retrieve(
        self,
        http: httpx.AsyncClient,
        gw: GatewayConfig,
        entries: list[ihe.DocumentEntry],
        outcome: GatewayOutcome,
    ) -> ihe.RetrieveResponse:
        """ITI-39 for a batch of entries (each with its own ``home``)."""
        body = ihe.build_retrieve(entries)
        msg = await self._call(
            http, gw, gw.xca_retrieve_url, ihe.ACTION_XCA_RETRIEVE, body, "ITI-39", outcome
        )
        return ihe.parse_retrieve_response(msg.body, msg.attachments)

    async def _retrying(self, call: Callable[[], Awaitable[_R]], out: GatewayOutcome) -> _R:
        """Repeat an XCA call answered with Failure and only busy/out-of-resources errors."""
        delay = self.busy_backoff_s
        for attempt in range(self.busy_retries + 1):
            resp = await call()
            status = getattr(resp, "status", "")
            codes = {e.code for e in getattr(resp, "errors", ()) if e.is_error}
            if status != ihe.RESPONSE_FAILURE or not codes or not codes <= RETRYABLE_CODES:
                return resp
            if attempt < self.busy_retries:
                out.errors.append(f"Retried:{sorted(codes)[0]}")
                await asyncio.sleep(delay)
                delay *= 2
        return resp

    async def _one(
        self,
        http: httpx.AsyncClient,
        gw: GatewayConfig,
        demo: ihe.Demographics,
        should_fetch: Callable[[ihe.DocumentEntry], bool],
        date_from: str | None,
        date_to: str | None,
    ) -> GatewayOutcome:
        out = GatewayOutcome(gw.id, gw.home_community_id, gw.organization)
        try:
            pd = await self.patient_discovery(http, gw, demo, out)
            if pd.ack != "AA" or pd.response_code != "OK" or not pd.matches:
                out.status = "no_match"
                if pd.detected_issue:
                    out.errors.append(f"DetectedIssue:{pd.detected_issue}")
                if pd.response_code in ("QE", "AE"):
                    out.errors.append(f"XCPD:{pd.response_code}")
                return out
            matches = list(pd.matches)
            if self.security.purpose == "T-IAS":
                # IAS XP SOP (Mode 2): double-check the responder's demographics against the
                # verified ones; on a mismatch the id is not kept.
                kept = [m for m in matches if demographics_agree(demo, m.demographics)]
                if len(kept) < len(matches):
                    out.errors.append("DemographicsDoubleCheckFailed")
                matches = kept
                if not matches:
                    out.status = "no_match"
                    return out
            out.matches = matches
            partial = False
            for match in out.matches:
                qr = await self._retrying(
                    functools.partial(
                        self.find_documents,
                        http,
                        gw,
                        match,
                        out,
                        date_from=date_from,
                        date_to=date_to,
                    ),
                    out,
                )
                out.errors.extend(e.code for e in qr.errors if e.is_error)
                if qr.status == ihe.RESPONSE_FAILURE:
                    partial = True
                    continue
                partial = partial or qr.status == ihe.RESPONSE_PARTIAL
                for entry in qr.entries:
                    if entry.key in {e.key for e in out.entries}:
                        continue
                    out.entries.append(entry)
            wanted: list[ihe.DocumentEntry] = []
            for entry in out.entries:
                (wanted if should_fetch(entry) else out.skipped).append(entry)
            for i in range(0, len(wanted), RETRIEVE_BATCH):
                batch = wanted[i : i + RETRIEVE_BATCH]
                rr = await self._retrying(
                    functools.partial(self.retrieve, http, gw, batch, out), out
                )
                out.errors.extend(e.code for e in rr.errors if e.is_error)
                partial = partial or rr.status != ihe.RESPONSE_SUCCESS
                out.documents.extend(rr.documents)
            out.status = "partial" if partial else "ok"
        except GatewayTimeout:
            out.status = "timeout" if not out.entries else "partial"
            out.errors.append("Timeout")
        except SoapFault as exc:
            out.status = "fault" if not out.entries else "partial"
            out.errors.append(f"SoapFault:{exc.subcode or exc.code}")
        except (ProtocolError, UnsafeXMLError) as exc:
            out.status = "error" if not out.entries else "partial"
            out.errors.append(type(exc).__name__)
        return out

    async def run(
        self,
        gateways: list[GatewayConfig],
        demo: ihe.Demographics,
        *,
        should_fetch: Callable[[ihe.DocumentEntry], bool] = lambda _e: True,
        date_from: str | None = None,
        date_to: str | None = None,
    ) -> list[GatewayOutcome]:
        """Discover, query and retrieve across ``gateways`` in parallel (at most ``max_parallel``)."""
        sem = asyncio.Semaphore(self.max_parallel)
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False) as http:

            async def guarded(gw: GatewayConfig) -> GatewayOutcome:
                async with sem:
                    return await self._one(http, gw, demo, should_fetch, date_from, date_to)

            return list(await asyncio.gather(*(guarded(gw) for gw in gateways)))

    def run_sync(
        self, gateways: list[GatewayConfig], demo: ihe.Demographics, **kw: Any
    ) -> list[GatewayOutcome]:
        """:meth:`run` from synchronous code (CLI, Dagster assets)."""
        return asyncio.run(self.run(gateways, demo, **kw))

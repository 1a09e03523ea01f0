"""A responding gateway (XCPD ITI-55, XCA ITI-38/ITI-39) for the sandbox's network organizations.

Each network organization of the synthetic population is one community with its own endpoints:
``POST /{org_id}/xcpd``, ``POST /{org_id}/xca/query``, ``POST /{org_id}/xca/retrieve``. Documents
are C-CDA CCDs rendered on the fly from that organization's FHIR resources, plus (per behaviour)
on-demand entries, a PDF, MTOM/XOP responses, PartialSuccess, slow answers and SOAP faults.

The gateway is as strict as the spec: SOAP 1.2 content type, WS-Addressing Action/To/MessageID,
a SAML assertion whose PurposeOfUse is a TEFCA XP code (signature verified when a trusted
certificate is configured), ``home`` on every XCA query, a single-quoted patient id. Every
request it sees is appended to ``app.state.seen`` so tests can prove a refused query never came.
"""

import asyncio
import base64
import uuid
from typing import Any

from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from medblocks_sandbox.gateway import spec
from medblocks_sandbox.gateway.community import (
    HOSTILE_DOCUMENT,
    STABLE_DOCUMENT_TIME,
    Behaviour,
    _Community,
    _load,
)
from medblocks_sandbox.gateway.reader import (
    UnreadableRequest,
    read_soap_request,
    read_xcpd_demographics,
)
from medblocks_sandbox.gateway.render import render_ccd
from medblocks_sandbox.gateway.respond import (
    _busy,
    _check_security,
    _extrinsic,
    _fault,
    _match,
    _pdf_bytes,
    _registry_error,
    _Reject,
    _reply,
    _soap_response,
    _xcpd_response,
)


def create_gateway_app(
    pop: Any,
    *,
    behaviours: dict[str, Behaviour] | None = None,
    trusted_cert: bytes | None = None,
    organizations: list[str] | None = None,
) -> Starlette:
    """Build the responding-gateway ASGI app for ``pop``'s network organizations.

    ``pop`` needs ``organizations`` (objects with id, name, kind, oid, home_community_id) and
    ``resources_for(org_id)``. ``behaviours`` maps org ids to :class:`Behaviour`.
    ``trusted_cert`` (PEM) turns on SAML signature verification.
    """
    communities = _load(pop, organizations)
    behaviours = behaviours or {}
    seen: list[dict[str, Any]] = []

    async def handle(request: Request) -> Response:
        org_id = request.path_params["org"]
        transaction = request.path_params["tx"]
        com = communities.get(org_id)
        if com is None:
            return Response("unknown community", status_code=404, media_type="text/plain")
        b = behaviours.get(org_id, Behaviour())
        tx = {"xcpd": "ITI-55", "xca/query": "ITI-38", "xca/retrieve": "ITI-39"}[transaction]
        expected = {
            "ITI-55": spec.ACTION_XCPD,
            "ITI-38": spec.ACTION_XCA_QUERY,
            "ITI-39": spec.ACTION_XCA_RETRIEVE,
        }[tx]
        body = await request.body()
        record: dict[str, Any] = {"org": org_id, "transaction": tx, "purpose": None}
        seen.append(record)
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/soap+xml"):
            return _fault(
                "Sender", "env:VersionMismatch", "SOAP 1.2 requires application/soap+xml", 415
            )
        try:
            msg = read_soap_request(body)
        except UnreadableRequest as exc:
            if exc.unsafe:
                return _fault("Sender", "wsse:InvalidSecurity", "XML refused", 400)
            return _fault("Sender", "env:Sender", "not a SOAP 1.2 request", 400)
        if msg.action != expected or ctype.find(expected) < 0:
            return _fault("Sender", "wsa:ActionNotSupported", "unexpected action", 400)
        to = msg.header(spec.WSA, "To")
        message_id = msg.header(spec.WSA, "MessageID")
        if to is None or message_id is None or not (message_id.text or "").startswith("urn:uuid:"):
            return _fault(
                "Sender",
                "wsa:MessageAddressingHeaderRequired",
                "wsa:To and wsa:MessageID are required",
                400,
            )
        try:
            record["purpose"] = _check_security(msg, request.url.path, trusted_cert)
        except _Reject as r:
            return _fault(r.code, r.subcode, r.reason, 400)
        if tx in b.fault_on:
            return _fault("Receiver", "env:Receiver", "responder temporarily unavailable", 500)
        if tx in b.malformed:
            return Response(
                b"<html><body>502 Bad Gateway</body></html>",
                status_code=502,
                media_type="text/html",
            )
        relates = (message_id.text or "").strip()
        if tx == "ITI-55":
            try:
                demo = read_xcpd_demographics(msg.body)
            except UnreadableRequest:
                return _fault("Sender", "env:Sender", "bad PRPA_IN201305UV02", 400)
            if b.detected_issue:
                resp = _xcpd_response(com, msg.body, [], issue="PatientAddressRequested")
            else:
                resp = _xcpd_response(
                    com, msg.body, _match(com, demo), shift_birth=b.wrong_demographics
                )
            return _soap_response(_reply(spec.ACTION_XCPD_RESPONSE, relates, resp))
        if tx in b.busy_first and tx not in com.busy_done:
            com.busy_done.add(tx)
            busy_action, busy_body = _busy(tx)
            return _soap_response(_reply(busy_action, relates, busy_body))
        if tx == "ITI-38":
            aq = msg.body.find(f"{{{spec.RIM}}}AdhocQuery")
            if aq is not None:
                record["slots"] = sorted(
                    str(x.get("name")) for x in aq.findall(f"{{{spec.RIM}}}Slot")
                )
            return _soap_response(
                _reply(spec.ACTION_XCA_QUERY_RESPONSE, relates, _query(com, msg.body, b))
            )
        return _retrieve(com, msg.body, b, relates)

    def _query(com: _Community, req: etree._Element, b: Behaviour) -> etree._Element:
        resp = etree.Element(
            f"{{{spec.QUERY}}}AdhocQueryResponse",
            nsmap={"query": spec.QUERY, "rim": spec.RIM, "rs": spec.RS},
        )
        aq = req.find(f"{{{spec.RIM}}}AdhocQuery")
        if req.tag != f"{{{spec.QUERY}}}AdhocQueryRequest" or aq is None:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSRegistryError", "not an AdhocQueryRequest")
            return resp
        if not aq.get("home"):
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSMissingHomeCommunityId", "home attribute is required in XCA")
            return resp
        if aq.get("home") != com.hcid:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownCommunity", "home is not this community")
            return resp
        if aq.get("id") != spec.FIND_DOCUMENTS:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownStoredQuery", "only FindDocuments is supported")
            return resp
        slots = {
            s.get("name"): [(v.text or "") for v in s.iter(f"{{{spec.RIM}}}Value")]
            for s in aq.findall(f"{{{spec.RIM}}}Slot")
        }
        pid_values = slots.get("$XDSDocumentEntryPatientId") or []
        if len(pid_values) != 1 or not (
            pid_values[0].startswith("'") and pid_values[0].endswith("'")
        ):
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(
                resp,
                "XDSStoredQueryParamNumber",
                "$XDSDocumentEntryPatientId must be one quoted value",
            )
            return resp
        if "$XDSDocumentEntryStatus" not in slots:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(
                resp, "XDSStoredQueryMissingParam", "$XDSDocumentEntryStatus is required"
            )
            return resp
        cx = pid_values[0][1:-1]
        mrn, _, aa = cx.partition("^^^&")
        pid = com.by_mrn(mrn) or ""
        if aa.split("&")[0] != f"{com.oid}.1" or pid not in com.patients:
            resp.set("status", spec.RESPONSE_FAILURE)
            _registry_error(resp, "XDSUnknownPatientId", "patient id not known here")
            return resp
        types = " ".join(slots.get("$XDSDocumentEntryType") or [spec.STABLE_ENTRY])
        rol = etree.SubElement(resp, f"{{{spec.RIM}}}RegistryObjectList")
        rol.append(_extrinsic(com, pid, "ccd"))
        if b.pdf and not b.partial_success:
            rol.append(_extrinsic(com, pid, "pdf"))
        if b.on_demand and spec.ON_DEMAND_ENTRY in types:
            rol.append(_extrinsic(com, pid, "od"))
        if b.partial_success:
            resp.set("status", spec.RESPONSE_PARTIAL)
            _registry_error(resp, "XDSRepositoryError", "one repository did not answer")
        else:
            resp.set("status", spec.RESPONSE_SUCCESS)
        # RegistryObjectList must come before RegistryErrorList (ebRS 3.0 schema order).
        rel = resp.find(f"{{{spec.RS}}}RegistryErrorList")
        if rel is not None:
            resp.remove(rel)
            resp.append(rel)
        return resp

    def _retrieve(com: _Community, req: etree._Element, b: Behaviour, relates: str) -> Response:
        resp = etree.Element(
            f"{{{spec.XDSB}}}RetrieveDocumentSetResponse",
            nsmap={"xdsb": spec.XDSB, "rs": spec.RS, "xop": spec.XOP},
        )
        rr = etree.SubElement(resp, f"{{{spec.RS}}}RegistryResponse")
        parts: list[tuple[str, bytes, str]] = []
        ok = failed = 0
        for dr in req.findall(f"{{{spec.XDSB}}}DocumentRequest"):
            home = dr.findtext(f"{{{spec.XDSB}}}HomeCommunityId") or ""
            repo = dr.findtext(f"{{{spec.XDSB}}}RepositoryUniqueId") or ""
            uid = dr.findtext(f"{{{spec.XDSB}}}DocumentUniqueId") or ""
            if not home:
                _registry_error(rr, "XDSMissingHomeCommunityId", "HomeCommunityId is required")
                failed += 1
                continue
            if home != com.hcid or repo != com.repository or uid not in com.documents:
                _registry_error(rr, "XDSMissingDocument", "document not found")
                failed += 1
                continue
            pid, kind = com.documents[uid]
            org = {"name": com.org.name, "oid": com.oid}
            out = etree.SubElement(resp, f"{{{spec.XDSB}}}DocumentResponse")
            etree.SubElement(out, f"{{{spec.XDSB}}}HomeCommunityId").text = com.hcid
            etree.SubElement(out, f"{{{spec.XDSB}}}RepositoryUniqueId").text = repo
            etree.SubElement(out, f"{{{spec.XDSB}}}DocumentUniqueId").text = uid
            if kind == "pdf":
                content, mime = _pdf_bytes("Visit summary"), "application/pdf"
            elif kind == "od":
                com.on_demand_counter += 1
                new_uid = f"{com.oid}.7.{com.on_demand_counter}"
                etree.SubElement(out, f"{{{spec.XDSB}}}NewRepositoryUniqueId").text = repo
                etree.SubElement(out, f"{{{spec.XDSB}}}NewDocumentUniqueId").text = new_uid
                content = render_ccd(
                    com.patients[pid],
                    com.resources.get(pid, []),
                    org=org,
                    document_id=new_uid,
                    flaws=b.flaws,
                )
                mime = "text/xml"
            elif b.hostile_document:
                content, mime = HOSTILE_DOCUMENT, "text/xml"
            elif b.foreign_document:
                other = next((p for p in com.patients if p != pid), None)
                someone = (
                    com.patients[other]
                    if other
                    else {**com.patients[pid], "id": f"{pid}-other", "identifier": []}
                )
                content = render_ccd(
                    someone,
                    com.resources.get(other or pid, []),
                    org=org,
                    document_id=uid,
                    effective=STABLE_DOCUMENT_TIME,
                )
                mime = "text/xml"
            else:
                content = render_ccd(
                    com.patients[pid],
                    com.resources.get(pid, []),
                    org=org,
                    document_id=uid,
                    effective=STABLE_DOCUMENT_TIME,
                    flaws=b.flaws,
                )
                mime = "text/xml"
            etree.SubElement(out, f"{{{spec.XDSB}}}mimeType").text = mime
            doc = etree.SubElement(out, f"{{{spec.XDSB}}}Document")
            if b.mtom:
                cid = f"doc{len(parts)}@sandbox.medblocks"
                etree.SubElement(doc, f"{{{spec.XOP}}}Include", href=f"cid:{cid}")
                parts.append((cid, content, mime))
            else:
                doc.text = base64.b64encode(content).decode("ascii")
            ok += 1
        status = (
            spec.RESPONSE_SUCCESS
            if not failed
            else spec.RESPONSE_PARTIAL
            if ok
            else spec.RESPONSE_FAILURE
        )
        rr.set("status", status)
        # DocumentResponses follow the RegistryResponse; errors stay inside it.
        envelope = _reply(spec.ACTION_XCA_RETRIEVE_RESPONSE, relates, resp)
        if not b.mtom:
            return _soap_response(envelope)
        boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        root_cid = "root.message@sandbox.medblocks"
        chunks = [
            f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{root_cid}>\r\n\r\n".encode()
            + envelope
            + b"\r\n"
        ]
        for cid, content, mime in parts:
            chunks.append(
                f"--{boundary}\r\nContent-Type: {mime}\r\nContent-Transfer-Encoding: binary\r\n"
                f"Content-ID: <{cid}>\r\n\r\n".encode()
                + content
                + b"\r\n"
            )
        chunks.append(f"--{boundary}--\r\n".encode())
        ctype = (
            f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
            f'start="<{root_cid}>"; start-info="application/soap+xml"'
        )
        return Response(b"".join(chunks), media_type=ctype)

    app = Starlette(
        routes=[Route("/{org}/{tx:path}", handle, methods=["POST"])],
    )
    app.state.seen = seen
    app.state.communities = communities
    return app


def network_source_config(
    base_url: str,
    pop: Any,
    *,
    our_home_community_id: str = "urn:oid:2.16.840.1.113883.3.9999.100",
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The ``sources.config`` of a network source pointing at this gateway mounted at ``base_url``."""
    base = base_url.rstrip("/")
    gateways = []
    for org in pop.organizations:
        if getattr(org, "kind", None) != "network":
            continue
        gateways.append(
            {
                "id": org.id,
                "name": org.name,
                "organization": org.id,
                "home_community_id": org.home_community_id or f"urn:oid:{org.oid}",
                "xcpd_url": f"{base}/{org.id}/xcpd",
                "xca_query_url": f"{base}/{org.id}/xca/query",
                "xca_retrieve_url": f"{base}/{org.id}/xca/retrieve",
                "timeout_s": timeout_s,
            }
        )
    return {"home_community_id": our_home_community_id, "gateways": gateways, "max_parallel": 4}


#: What the demo's communities do by default: one offers on-demand CCDs, one answers in MTOM with a PDF.
DEFAULT_BEHAVIOURS = {
    "riverside-health": Behaviour(on_demand=True),
    "valley-medical": Behaviour(mtom=True, pdf=True),
}


def gateway_role(ctx: Any) -> Any:
    """Role factory for ``sandbox.run.register_role("gateway", gateway_role)``.

    ``ctx`` is a ``RoleContext``; options ``gateway_behaviours`` (org id -> :class:`Behaviour`) and
    ``gateway_trusted_cert`` (PEM bytes) are honoured. ``extra`` carries ``seen`` (requests log)
    and ``source_config`` (the network source's registry config for these endpoints).
    """
    from medblocks_sandbox.run import OrgEndpoint, RoleApp

    behaviours = ctx.options.get("gateway_behaviours", DEFAULT_BEHAVIOURS)
    app = create_gateway_app(
        ctx.population, behaviours=behaviours, trusted_cert=ctx.options.get("gateway_trusted_cert")
    )
    base = ctx.base_url.rstrip("/")
    endpoints = [
        OrgEndpoint(org.id, org.name, "network", ctx.name, f"{base}/{org.id}")
        for org in ctx.population.organizations
        if getattr(org, "kind", None) == "network"
    ]
    return RoleApp(
        app=app,
        orgs=endpoints,
        extra={
            "seen": app.state.seen,
            "source_config": network_source_config(base, ctx.population),
        },
    )

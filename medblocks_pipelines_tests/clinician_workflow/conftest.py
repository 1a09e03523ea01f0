"""Fixtures for the clinician-workflow tests: our web app and a stub EHR (JWKS + FHIR) on real
loopback sockets, a control plane and a small published warehouse in a temporary folder."""

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from medblocks_pipelines.lib.registry import ControlPlane, open_control_plane
from medblocks_pipelines.lib.settings import Settings
from medblocks_pipelines.lib.smart.assertion import SigningKey, generate_signing_key
from medblocks_pipelines.lib.warehouse.build import warehouse_path
from medblocks_pipelines.web.app import create_app
from medblocks_pipelines_tests.support.cds_synthetic import write_warehouse
from medblocks_sandbox.run import serve

TODAY = date(2026, 6, 1)
ISS = "https://ehr-a.example/cds-client"
TENANT = "acme"
ORG = "mercy"
SOURCE = "ehr-a"
FHIR_TOKEN = "ehr-issued-access-token"
LOINC = "http://loinc.org"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
SCT = "http://snomed.info/sct"


@dataclass
class StubEhr:
    """The EHR side: JWKS and a FHIR server needing its bearer token; counts every hit."""

    base: str
    keys: list[SigningKey]
    hits: list[str] = field(default_factory=list)
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def jwks_url(self) -> str:
        return f"{self.base}/jwks.json"

    @property
    def fhir_base(self) -> str:
        return f"{self.base}/fhir"


def stub_ehr_app(stub_holder: dict[str, StubEhr]) -> Starlette:
    async def jwks(request: Request) -> JSONResponse:
        stub = stub_holder["stub"]
        stub.hits.append(request.url.path)
        return JSONResponse({"keys": [k.public_jwk() for k in stub.keys]})

    async def evil(request: Request) -> JSONResponse:
        stub_holder["stub"].hits.append(request.url.path)
        return JSONResponse({"keys": []})

    async def patient(request: Request) -> JSONResponse:
        stub = stub_holder["stub"]
        stub.hits.append(request.url.path)
        if request.headers.get("authorization") != f"Bearer {FHIR_TOKEN}":
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=401)
        pid = request.path_params["pid"]
        if pid not in stub.patients:
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
        return JSONResponse(stub.patients[pid])

    return Starlette(
        routes=[
            Route("/jwks.json", jwks),
            Route("/evil/jwks.json", evil),
            Route("/fhir/Patient/{pid}", patient),
        ]
    )


def fact(
    fid: str,
    person: str,
    kind: str,
    codes: list[str],
    display: str,
    days_ago: int,
    sources: list[str],
    patterns: list[str],
    **extra: Any,
) -> dict[str, Any]:
    when = TODAY - timedelta(days=days_ago)
    system, _, code = codes[0].partition("|")
    return {
        "fact_id": fid,
        "person_id": person,
        "kind": kind,
        "code_system": system,
        "code": code,
        "display": display,
        "effective_date": when,
        "last_date": when,
        "sources": sources,
        "patterns": patterns,
        "organizations": sources,
        "codes": codes,
        "from_claims": False,
        **extra,
    }


def default_facts() -> list[dict[str, Any]]:
    """Person P1 (Patient/a1 at ehr-a): diabetic at ehr-a, HbA1c 200 days ago at ehr-b, a
    penicillin allergy at ehr-b, omeprazole per the payer, a lipid panel 10 days ago at ehr-b."""
    return [
        fact(
            "f-dm",
            "P1",
            "condition",
            [f"{SCT}|44054006"],
            "Diabetes mellitus type 2",
            900,
            ["ehr-a", "ehr-b"],
            ["backend"],
            status="active",
        ),
        fact(
            "f-a1c",
            "P1",
            "result",
            [f"{LOINC}|4548-4"],
            "Hemoglobin A1c",
            200,
            ["ehr-b"],
            ["backend"],
            value_num=7.9,
            value_unit="%",
        ),
        fact(
            "f-pen",
            "P1",
            "allergy",
            [f"{RX}|70618", f"{SCT}|764146007"],
            "penicillin",
            2000,
            ["ehr-b"],
            ["patient_access"],
            status="active",
        ),
        fact(
            "f-ppi",
            "P1",
            "medication",
            [f"{RX}|7646"],
            "omeprazole",
            20,
            ["payer-x"],
            ["patient_access"],
            status="active",
            from_claims=True,
        ),
        fact(
            "f-lipid",
            "P1",
            "result",
            [f"{LOINC}|2093-3"],
            "Cholesterol",
            10,
            ["ehr-b"],
            ["backend"],
            value_num=190.0,
            value_unit="mg/dL",
        ),
        fact(
            "f-own", "P1", "encounter", [f"{SCT}|185349003"], "Check up", 5, ["ehr-a"], ["backend"]
        ),
    ]


def default_links() -> list[dict[str, Any]]:
    return [
        {"patient_key": "ehr-a/Patient/a1", "source": "ehr-a", "person_id": "P1"},
        {"patient_key": "ehr-b/Patient/b1", "source": "ehr-b", "person_id": "P1"},
        {"patient_key": "payer-x/Patient/m1", "source": "payer-x", "person_id": "P1"},
    ]


def default_patients() -> list[dict[str, Any]]:
    return [
        {
            "patient_key": "ehr-b/Patient/b1",
            "resource": {
                "resourceType": "Patient",
                "id": "b1",
                "identifier": [{"system": "urn:mrn:ehr-b", "value": "MRN-B1"}],
            },
        }
    ]


@dataclass
class CdsEnv:
    settings: Settings
    cp: ControlPlane
    web: str
    stub: StubEhr
    http: httpx.Client

    def sign(
        self,
        aud: str,
        *,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        alg: str | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.stub.keys[0]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISS,
            "aud": aud,
            "exp": now + 300,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        hdr = {"kid": key.kid, "typ": "JWT", **(headers or {})}
        return jwt.encode(body, key.private_pem, algorithm=alg or key.alg, headers=hdr)

    def url(self, path: str) -> str:
        return f"{self.web}{path}"

    def hook(
        self, service: str, body: dict[str, Any], *, token: str | None = None, **kw: Any
    ) -> httpx.Response:
        url = self.url(f"/cds-services/{service}")
        token = token if token is not None else self.sign(url)
        return self.http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, **kw)

    def publish(
        self,
        *,
        facts: list[dict[str, Any]] | None = None,
        links: list[dict[str, Any]] | None = None,
    ) -> None:
        write_warehouse(
            warehouse_path(self.settings, TENANT),
            links=default_links() if links is None else links,
            facts=default_facts() if facts is None else facts,
            patients=default_patients(),
        )


def patient_view(patient: str = "a1", **extra: Any) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr1", "patientId": patient},
        **extra,
    }


def order_select(
    orders: list[dict[str, Any]], selections: list[str] | None = None, patient: str = "a1"
) -> dict[str, Any]:
    return {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/dr1",
            "patientId": patient,
            "selections": selections or [f"{o['resourceType']}/{o['id']}" for o in orders],
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": o} for o in orders],
            },
        },
    }


@pytest.fixture(scope="session")
def ehr_keys() -> list[SigningKey]:
    return [
        generate_signing_key("ES384", kid="ehr-es384"),
        generate_signing_key("RS384", kid="ehr-rs384"),
    ]


@pytest.fixture
def cds_env(settings: Settings, ehr_keys: list[SigningKey]) -> Iterator[CdsEnv]:
    holder: dict[str, StubEhr] = {}
    cp = open_control_plane(settings)
    with serve(lambda base: stub_ehr_app(holder)) as stub_base:
        stub = holder["stub"] = StubEhr(base=stub_base, keys=list(ehr_keys))
        cp.add_tenant(TENANT, "Acme Health")
        cp.add_source(SOURCE, "Mercy EHR", "sandbox", "ehr", stub.fhir_base, ["clinician_workflow"])
        cp.add_source(
            "ehr-b", "Riverside Clinic", "sandbox", "ehr", "http://b.example/fhir", ["backend"]
        )
        cp.add_source(
            "payer-x", "Blue Payer", "sandbox", "payer", "http://x.example/fhir", ["patient_access"]
        )
        cp.add_organization(
            ORG,
            TENANT,
            SOURCE,
            "Mercy Hospital",
            config={"cds": {"iss": ISS, "jwks_url": stub.jwks_url}},
        )
        cp.add_organization("riverside", TENANT, "ehr-b", "Riverside Clinic")
        with (
            httpx.Client(timeout=30.0) as http,
            serve(
                lambda base: create_app(
                    public_base_url=base, settings=settings, cds_today=lambda: TODAY
                )
            ) as web,
        ):
            env = CdsEnv(settings=settings, cp=cp, web=web, stub=stub, http=http)
            env.publish()
            yield env
    cp.engine.dispose()


MakeOrder = Callable[..., dict[str, Any]]

"""The gateway's communities: one per network organization of the population, with its OIDs,
MRNs, document ids and `Behaviour` (how it misbehaves: slow answers, SOAP faults, PartialSuccess,
MTOM, on-demand and PDF entries, flawed, hostile or foreign documents).
"""

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: A fixed instant for stable documents: the same patient gives the same bytes every time.
STABLE_DOCUMENT_TIME = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
#: An entity-expansion ("billion laughs") document a hostile responder might send.
HOSTILE_DOCUMENT = (
    b'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [<!ENTITY a "aaaaaaaaaa">'
    b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&c;</title></ClinicalDocument>'
)
SUPPORTED_PURPOSES = frozenset({"T-TREAT", "T-TRTMNT", "T-IAS", "T-PYMNT", "T-HCO", "T-PH"})


@dataclass(frozen=True)
class Behaviour:
    """How one community misbehaves (all off by default).

    delay_s: seconds before answering each request (per-gateway timeouts).
    fault_on: transactions ("ITI-55", "ITI-38", "ITI-39") answered with a SOAP Receiver fault.
    partial_success: ITI-38 answers PartialSuccess (documents plus a RegistryError).
    mtom: ITI-39 answers as MTOM/XOP multipart with the document in a MIME part.
    on_demand: offer an on-demand CCD entry beside the stable one.
    pdf: offer a stable PDF document too (stored as DocumentReference + Binary).
    flaws: C-CDA flaws passed to the renderer (null_codes, missing_sections, no_tz, unknown_entry).
    malformed: transactions answered with a body that is not a SOAP envelope.
    detected_issue: XCPD answers "no match" with a DetectedIssueEvent asking for an address.
    wrong_demographics: XCPD matches but returns a different birth date (IAS double-check).
    hostile_document: the CCD retrieve returns an entity-expansion attack instead of a C-CDA.
    foreign_document: the CCD retrieve returns another patient's CCD (a mixed-up document: its
        record target is not the patient XCPD matched).
    busy_first: transactions ("ITI-38", "ITI-39") whose first request answers Failure +
        XDSRegistryBusy / XDSRepositoryBusy (a retry succeeds).
    """

    delay_s: float = 0.0
    fault_on: frozenset[str] = frozenset()
    partial_success: bool = False
    mtom: bool = False
    on_demand: bool = False
    pdf: bool = False
    flaws: frozenset[str] = frozenset()
    malformed: frozenset[str] = frozenset()
    detected_issue: bool = False
    wrong_demographics: bool = False
    hostile_document: bool = False
    foreign_document: bool = False
    busy_first: frozenset[str] = frozenset()


@dataclass
class _Community:
    org: Any
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    documents: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # doc uid -> (patient id, kind)
    on_demand_counter: int = 0
    busy_done: set[str] = field(default_factory=set)

    @property
    def oid(self) -> str:
        return str(self.org.oid)

    @property
    def hcid(self) -> str:
        return str(self.org.home_community_id or f"urn:oid:{self.org.oid}")

    @property
    def repository(self) -> str:
        return f"{self.oid}.2"

    def mrn(self, patient_id: str) -> str:
        """The community's MRN for a patient (its ``urn:oid:<oid>.1`` identifier), else the id."""
        for ident in self.patients[patient_id].get("identifier") or []:
            if ident.get("system") == f"urn:oid:{self.oid}.1" and ident.get("value"):
                return str(ident["value"])
        return patient_id

    def by_mrn(self, mrn: str) -> str | None:
        """The patient id for an MRN this community assigned."""
        return next((pid for pid in self.patients if self.mrn(pid) == mrn), None)

    def doc_uid(self, patient_id: str, kind: str) -> str:
        n = int(hashlib.sha256(f"{kind}|{patient_id}".encode()).hexdigest()[:12], 16)
        arc = {"ccd": 9, "pdf": 10, "od": 8}[kind]
        return f"{self.oid}.{arc}.{n}"


def _patient_of(res: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = (res.get(key) or {}).get("reference") or ""
        if ref.startswith("Patient/"):
            return ref.split("/", 1)[1]
    return None


def _load(pop: Any, orgs: list[str] | None) -> dict[str, _Community]:
    out = {}
    for org in pop.organizations:
        if getattr(org, "kind", None) != "network" or (orgs and org.id not in orgs):
            continue
        com = _Community(org)
        for res in pop.resources_for(org.id):
            if res.get("resourceType") == "Patient":
                com.patients[res["id"]] = res
            else:
                pid = _patient_of(res)
                if pid:
                    com.resources.setdefault(pid, []).append(res)
        for pid in com.patients:
            com.documents[com.doc_uid(pid, "ccd")] = (pid, "ccd")
            com.documents[com.doc_uid(pid, "pdf")] = (pid, "pdf")
            com.documents[com.doc_uid(pid, "od")] = (pid, "od")
        out[org.id] = com
    return out

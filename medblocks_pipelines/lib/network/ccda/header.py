"""C-CDA header -> Patient, DocumentReference, Provenance (SPECS 6.1)."""

from typing import Any

from medblocks_pipelines.lib.network.ccda.base import ConverterBase
from medblocks_pipelines.lib.network.ccda.common import (
    attr,
    codeable,
    identifiers,
    q,
    stable_id,
    ts_to_fhir,
)
from medblocks_pipelines.lib.network.ccda.model import binary_resources


class HeaderMixin(ConverterBase):
    """recordTarget, the document itself and its author."""

    def _patient(self) -> None:
        role = self.root.find(f"{q('recordTarget')}/{q('patientRole')}")
        if role is None:
            self.flags.add("no_record_target")
            return
        pid = self._id("Patient", role)
        pat: dict[str, Any] = {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"source": self.source.uri},
        }
        ids = identifiers(role)
        if ids:
            pat["identifier"] = ids
        person = role.find(q("patient"))
        if person is not None:
            names = []
            for n in person.findall(q("name")):
                given = [" ".join((g.text or "").split()) for g in n.findall(q("given"))]
                fam = n.find(q("family"))
                name: dict[str, Any] = {}
                if fam is not None and fam.text:
                    name["family"] = fam.text.strip()
                if any(given):
                    name["given"] = [g for g in given if g]
                if name:
                    names.append(name)
            if names:
                pat["name"] = names
            gender = attr(person.find(q("administrativeGenderCode")), "code")
            g = {"M": "male", "F": "female", "UN": "other"}.get(gender or "")
            pat["gender"] = g or "unknown"
            exts = []
            for tag, url in (
                ("raceCode", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"),
                (
                    "ethnicGroupCode",
                    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                ),
            ):
                codes = person.findall(q(tag)) + person.findall(f"{{urn:hl7-org:sdtc}}{tag}")
                subs: list[dict[str, Any]] = []
                for c in codes:
                    if c.get("code") and c.get("codeSystem") == "2.16.840.1.113883.6.238":
                        coding = {
                            "system": "urn:oid:2.16.840.1.113883.6.238",
                            "code": c.get("code"),
                        }
                        if c.get("displayName"):
                            coding["display"] = c.get("displayName")
                        # OMB categories sit in raceCode; detailed ones in sdtc:raceCode.
                        kind = "ombCategory" if c.tag == q(tag) else "detailed"
                        subs.append({"url": kind, "valueCoding": coding})
                if subs:
                    text = next(
                        (
                            s["valueCoding"].get("display")
                            for s in subs
                            if s["valueCoding"].get("display")
                        ),
                        subs[0]["valueCoding"]["code"],
                    )
                    # us-core-race/-ethnicity require the text sub-extension.
                    exts.append(
                        {"url": url, "extension": [*subs, {"url": "text", "valueString": text}]}
                    )
            if exts:
                pat["extension"] = exts
            bt = attr(person.find(q("birthTime")), "value")
            if bt:
                bd = ts_to_fhir(bt[:8], default_tz=None, flags=self.flags)
                if bd:
                    pat["birthDate"] = bd
        addrs = []
        for a in role.findall(q("addr")):
            if a.get("nullFlavor") is not None:
                continue
            ad: dict[str, Any] = {}
            lines = [x.text.strip() for x in a.findall(q("streetAddressLine")) if x.text]
            if lines:
                ad["line"] = lines
            for tag, key in (("city", "city"), ("state", "state"), ("postalCode", "postalCode")):
                x = a.find(q(tag))
                if x is not None and x.text:
                    ad[key] = x.text.strip()
            if ad:
                addrs.append(ad)
        if addrs:
            pat["address"] = addrs
        tels = []
        for t in role.findall(q("telecom")):
            v = attr(t, "value")
            if not v:
                continue
            if v.startswith("tel:"):
                tels.append({"system": "phone", "value": v[4:]})
            elif v.startswith("mailto:"):
                tels.append({"system": "email", "value": v[7:]})
        if tels:
            pat["telecom"] = tels
        self.patient_ref = f"Patient/{pid}"
        self.result.resources.append(pat)

    def _document(self) -> None:
        docref, _binary = binary_resources(b"", self.source, patient_ref=self.patient_ref)
        # The C-CDA itself is stored as Binary by the caller; here we describe the document.
        t = codeable(self.root.find(q("code")), self.narrative)
        if t:
            docref["type"] = t
        if self.doc_time and "T" in self.doc_time:
            # DocumentReference.date is an instant: only a full time with an offset fits.
            docref["date"] = self.doc_time
        title = self.root.find(q("title"))
        docref["content"][0]["attachment"].pop("size", None)
        if title is not None and title.text:
            docref["description"] = title.text.strip()
        docref["content"][0]["format"] = {
            "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
            "code": "urn:hl7-org:sdwg:ccda-structuredBody:2.1",
        }
        self.result.resources.append(docref)

    def _provenance(self) -> None:
        targets = [
            {"reference": f"{r['resourceType']}/{r['id']}"}
            for r in self.result.resources
            if r["resourceType"] not in ("DocumentReference",)
        ]
        if not targets:
            return
        recorded = self.doc_time if self.doc_time and "T" in self.doc_time else None
        prov: dict[str, Any] = {
            "resourceType": "Provenance",
            "id": stable_id("prov", self.source.reference_id),
            "meta": {"source": self.source.uri},
            "target": targets,
            "recorded": recorded or "1970-01-01T00:00:00Z",
            "agent": [{"who": {"display": self.source.organization or self.scope}}],
            "entity": [
                {
                    "role": "source",
                    "what": {"reference": f"DocumentReference/{self.source.reference_id}"},
                }
            ],
        }
        if recorded is None:
            self.flags.add("provenance_without_document_time")
        self.result.resources.append(prov)

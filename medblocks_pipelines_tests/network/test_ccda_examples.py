"""C-CDA from the field: the HL7 C-CDA R2.1 examples (CC0, fixtures/ccda-examples) through the
converter. Every whole document converts to R4B-valid resources; every section/entry fragment,
wrapped in a document skeleton, converts each entry of a mapped section or quarantines it with a
reason; documents that are not namespace-well-formed are refused with a reason."""

import re
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

from medblocks_pipelines.lib.errors import UnsafeXMLError
from medblocks_pipelines.lib.network.ccda import ConversionResult, SourceDocument, convert_ccda
from medblocks_pipelines.lib.network.ccda.common import q, template_roots
from medblocks_pipelines.lib.network.ccda.convert import SECTIONS

EXAMPLES = Path(__file__).parents[1] / "fixtures" / "ccda-examples"
SRC = SourceDocument(
    "urn:oid:2.16.840.1.113883.3.9999.7",
    "2.16.840.1.113883.3.9999.7.2",
    "2.16.840.1.113883.3.9999.7.9.1",
    organization="hl7-examples",
)
#: example folder -> the section a bare entry of that folder belongs in (templateId, LOINC)
FOLDER_SECTIONS = {
    "Allergies": ("2.16.840.1.113883.10.20.22.2.6.1", "48765-2"),
    "Medications": ("2.16.840.1.113883.10.20.22.2.1.1", "10160-0"),
    "Problems": ("2.16.840.1.113883.10.20.22.2.5.1", "11450-4"),
    "Results": ("2.16.840.1.113883.10.20.22.2.3.1", "30954-2"),
    "Vital Signs": ("2.16.840.1.113883.10.20.22.2.4.1", "8716-3"),
    "Immunizations": ("2.16.840.1.113883.10.20.22.2.2.1", "11369-6"),
    "Procedures": ("2.16.840.1.113883.10.20.22.2.7.1", "47519-4"),
    "Encounters": ("2.16.840.1.113883.10.20.22.2.22.1", "46240-8"),
    "Social History": ("2.16.840.1.113883.10.20.22.2.17", "29762-2"),
}
NOT_CLINICAL = {"Patient", "DocumentReference", "Provenance", "Binary"}


def _root_tag(text: str) -> str | None:
    bare = re.sub(r"<\?.*?\?>|<!--.*?-->", "", text, flags=re.S)
    m = re.search(r"<([A-Za-z_][\w:.-]*)", bare)
    return m.group(1).split(":")[-1] if m else None


def _examples() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix.lower() == ".xml")


def _text(p: Path) -> str:
    return p.read_text(encoding="utf-8-sig")


WHOLE = [
    p
    for p in _examples()
    if _root_tag(_text(p)) == "ClinicalDocument" and "Guide Examples" not in p.parts
]
FRAGMENTS = [
    p
    for p in _examples()
    if p.relative_to(EXAMPLES).parts[0] in FOLDER_SECTIONS
    and _root_tag(_text(p)) != "ClinicalDocument"
]
REFUSED = [p for p in _examples() if "Guide Examples" in p.parts]


def _id(p: Path) -> str:
    return str(p.relative_to(EXAMPLES))


def wrap(text: str, folder: str) -> bytes:
    """A fragment inside a minimal US Realm Header document (namespaces declared on the root)."""
    frag = re.sub(r"<\?xml.*?\?>", "", text, count=1, flags=re.S)
    tag = _root_tag(text)
    if tag == "component":
        inner = frag
    elif tag == "section":
        inner = f"<component>{frag}</component>"
    else:
        if tag != "entry":
            frag = f"<entry>{frag}</entry>"
        tid, code = FOLDER_SECTIONS[folder]
        inner = (
            f'<component><section><templateId root="{tid}"/>'
            f'<code code="{code}" codeSystem="2.16.840.1.113883.6.1"/><title>{folder}</title>'
            f"<text>fragment</text>{frag}</section></component>"
        )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xmlns:sdtc="urn:hl7-org:sdtc" xmlns:pharm="urn:hl7-org:pharm">
<realmCode code="US"/><typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
<templateId root="2.16.840.1.113883.10.20.22.1.1" extension="2015-08-01"/>
<templateId root="2.16.840.1.113883.10.20.22.1.2" extension="2015-08-01"/>
<id root="2.16.840.1.113883.19.5.99999.1" extension="fragment-test"/>
<code code="34133-9" codeSystem="2.16.840.1.113883.6.1"/><title>Fragment</title>
<effectiveTime value="20240101120000-0500"/>
<confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>
<recordTarget><patientRole><id root="2.16.840.1.113883.19.5.99999.2" extension="p1"/>
<patient><name><given>Test</given><family>Fragment</family></name>
<administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/>
<birthTime value="19700101"/></patient></patientRole></recordTarget>
<component><structuredBody>{inner}</structuredBody></component></ClinicalDocument>""".encode()


def assert_r4b_valid(result: ConversionResult) -> None:
    for res in result.resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)
    for item in result.quarantined:
        assert item.reason and item.raw


def test_the_fixture_set_is_what_the_readme_says() -> None:
    assert len(WHOLE) >= 18 and len(FRAGMENTS) >= 70 and len(REFUSED) == 2
    assert (EXAMPLES / "LICENSE").read_text().startswith("Creative Commons Legal Code")


@pytest.mark.parametrize("path", WHOLE, ids=_id)
def test_whole_document_converts_to_valid_r4b(path: Path) -> None:
    result = convert_ccda(path.read_bytes(), SRC)
    assert_r4b_valid(result)
    types = result.counts_by_type()
    assert types.get("Patient") == 1 and types.get("DocumentReference") == 1
    # Deterministic: the same document again gives the same resources (de-duplication).
    again = convert_ccda(path.read_bytes(), SRC)
    assert again.resources == result.resources


def _mapped_entries(doc: bytes) -> int:
    root = etree.fromstring(doc)
    roots = set().union(*(tids for tids, _ in SECTIONS.values()))
    codes = {loinc for _, loinc in SECTIONS.values()}
    n = 0
    for section in root.iter(q("section")):
        code = section.find(q("code"))
        if template_roots(section) & roots or (code is not None and code.get("code") in codes):
            n += len(section.findall(q("entry")))
    return n


@pytest.mark.parametrize("path", FRAGMENTS, ids=_id)
def test_fragment_entries_convert_or_are_quarantined_with_a_reason(path: Path) -> None:
    doc = wrap(_text(path), path.relative_to(EXAMPLES).parts[0])
    result = convert_ccda(doc, SRC)
    assert_r4b_valid(result)
    clinical = sum(n for t, n in result.counts_by_type().items() if t not in NOT_CLINICAL)
    entries = _mapped_entries(doc)
    # Each entry of a mapped section became a resource or a quarantined item with a reason.
    assert clinical + len(result.quarantined) >= entries, (result.counts_by_type(), entries)
    counts = result.flags.counts
    if entries == 0:
        # No entry: an empty ("no information") section or a section we do not map, said so.
        assert any(k.startswith("section_empty_") for k in counts) or counts.get(
            "section_not_converted"
        )


@pytest.mark.parametrize("path", REFUSED, ids=_id)
def test_not_namespace_well_formed_documents_are_refused_with_a_reason(path: Path) -> None:
    with pytest.raises((UnsafeXMLError, ValueError)) as info:
        convert_ccda(path.read_bytes(), SRC)
    assert str(info.value)


def test_a_cluster_of_medication_activities_becomes_one_resource_each() -> None:
    path = next(p for p in FRAGMENTS if "Withdrawn Anitbiotics" in str(p))
    result = convert_ccda(wrap(_text(path), "Medications"), SRC)
    meds = [r for r in result.resources if r["resourceType"].startswith("Medication")]
    assert len(meds) == 2 and not result.quarantined
    assert len({m["id"] for m in meds}) == 2


@pytest.mark.parametrize(
    "name, rtype",
    [
        ("Unknown Immunization Status", "Immunization"),  # substanceAdministration nullFlavor NI
        ("Unknown if Pregnant", "Observation"),  # observation nullFlavor UNK, value "Pregnancy"
    ],
)
def test_an_entry_of_nullflavor_asserts_nothing(name: str, rtype: str) -> None:
    path = next(p for p in FRAGMENTS if name in str(p))
    result = convert_ccda(wrap(_text(path), path.relative_to(EXAMPLES).parts[0]), SRC)
    assert not [r for r in result.resources if r["resourceType"] == rtype]
    assert [x.reason for x in result.quarantined] == [
        f"entry has nullFlavor {'NI' if 'Immunization' in name else 'UNK'}"
    ]


def test_a_one_sided_interval_result_is_a_quantity_with_a_comparator() -> None:
    path = next(p for p in FRAGMENTS if "greater than a specified value" in str(p))
    result = convert_ccda(wrap(_text(path), "Results"), SRC)
    glucose = next(r for r in result.resources if r["resourceType"] == "Observation")
    # <low value="500" unit="mg/dL" inclusive="false"/>: strictly greater than 500.
    assert glucose["valueQuantity"]["comparator"] == ">"
    assert glucose["valueQuantity"]["value"] == 500 and "valueRange" not in glucose

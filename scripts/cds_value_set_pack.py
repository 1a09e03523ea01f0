"""Regenerate lib/cds/packs/vsac-ecqm-2025.json from the VSAC expansions a PyPI package ships.

The PyPI package ``canvas`` (MIT) carries the eCQM value set expansions as Python classes
(``canvas_sdk/value_set/v2026/*.py``: ``OID``, ``EXPANSION_VERSION``, one set of codes per code
system). Download it with the ordinary client and point this script at that folder:

    pip download --no-deps canvas==0.261.0 -d /tmp/canvas && unzip -q /tmp/canvas/*.whl -d /tmp/canvas
    .venv/bin/python scripts/cds_value_set_pack.py /tmp/canvas/canvas_sdk/value_set/v2026

The classes are read as text (no import: the package is not a dependency of ours). The pack is
then validated by the same loader the service uses.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medblocks_pipelines.lib.cds.knowledge import PACKS_DIR, load_pack  # noqa: E402

CANVAS_VERSION = "0.261.0"
SYSTEMS = {
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "SNOMEDCT": "http://snomed.info/sct",
    "LOINC": "http://loinc.org",
}
#: (file, OID, the card rule it serves)
WANTED = (
    ("condition.py", "2.16.840.1.113883.3.464.1003.103.12.1001", "diabetes"),
    ("laboratory_test.py", "2.16.840.1.113883.3.464.1003.198.12.1013", "hba1c"),
)


def read_value_set(folder: Path, fname: str, oid: str, purpose: str) -> dict[str, object]:
    """One value set class of the canvas source, as a pack ``value_sets`` entry."""
    src = (folder / fname).read_text()
    at = src.index(f'OID = "{oid}"')
    start = src.rfind("\nclass ", 0, at)
    end = src.find("\nclass ", at)
    block = src[start : end if end > 0 else None]
    name = re.search(r'VALUE_SET_NAME = "([^"]+)"', block)
    expansion = re.search(r'EXPANSION_VERSION = "([^"]+)"', block)
    if name is None or expansion is None:
        raise SystemExit(f"{oid}: no VALUE_SET_NAME/EXPANSION_VERSION in {fname}")
    codes = {
        SYSTEMS[m.group(1)]: sorted(set(re.findall(r'"([^"]+)"', m.group(2))))
        for m in re.finditer(r"\n    (\w+) = \{(.*?)\n    \}", block, re.S)
        if m.group(1) in SYSTEMS
    }
    return {
        "oid": oid,
        "name": name.group(1),
        "purpose": purpose,
        "expansion": expansion.group(1),
        "codes": codes,
    }


def main(folder: Path) -> None:
    """Write the pack next to the others and check it loads."""
    value_sets = [read_value_set(folder, f, oid, purpose) for f, oid, purpose in WANTED]
    expansion = str(value_sets[0]["expansion"])
    out = PACKS_DIR / "vsac-ecqm-2025.json"
    pack = json.loads(out.read_text())
    pack["version"] = expansion
    pack["codes_checked_against"] = (
        f"Copied from the expansions shipped in the PyPI package canvas {CANVAS_VERSION} "
        "(canvas_sdk/value_set/v2026: condition.py class Diabetes, laboratory_test.py class "
        "HbA1cLaboratoryTest), which carry the VSAC OID and expansion version."
    )
    pack["value_sets"] = value_sets
    out.write_text(json.dumps(pack, indent=1) + "\n")
    load_pack(out)
    print(
        f"{out.name}: {[(v['name'], {s: len(c) for s, c in v['codes'].items()}) for v in value_sets]}"
    )  # type: ignore[attr-defined]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))

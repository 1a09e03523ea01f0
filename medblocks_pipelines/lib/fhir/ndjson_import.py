"""Import a folder of NDJSON files (a Bulk Data export on disk) into the lake."""

import re
from pathlib import Path

from medblocks_pipelines.lib.errors import LandingError
from medblocks_pipelines.lib.fhir.validate import R4_RESOURCE_TYPES
from medblocks_pipelines.lib.warehouse.lake import LakeWriter

# Bulk Data exports name files after their type: Patient.ndjson, Patient.000.ndjson,
# Patient-2.ndjson, Patient_2.ndjson.gz.
_TYPE_PREFIX = re.compile(r"([A-Za-z]+)(?:[.\-_][^/]*)?\.ndjson(?:\.gz)?")


def ndjson_files(folder: Path) -> list[Path]:
    """The ``*.ndjson`` / ``*.ndjson.gz`` files under ``folder`` (or ``folder`` itself), sorted."""
    if folder.is_file():
        return [folder]
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".ndjson", ".ndjson.gz"))
    )
    if not files:
        raise LandingError(
            f"no .ndjson files under {folder}", hint="point --path at a Bulk Data export folder"
        )
    return files


def file_type(path: Path) -> str | None:
    """The resource type a file's name states (``Patient.000.ndjson`` holds Patients), if any."""
    m = _TYPE_PREFIX.fullmatch(path.name)
    return m.group(1) if m and m.group(1) in R4_RESOURCE_TYPES else None


def import_ndjson_folder(folder: Path, writer: LakeWriter) -> int:
    """Land every NDJSON file under ``folder`` through ``writer``; returns the number of files.

    A resource of another type than its file's name states is quarantined (``type_mismatch``).
    """
    files = ndjson_files(folder)
    for path in files:
        writer.add_ndjson_file(path, origin=path.name, expected_type=file_type(path))
    return len(files)

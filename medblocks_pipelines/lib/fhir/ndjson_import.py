"""Import a folder of NDJSON files (a Bulk Data export on disk) into the lake."""

from pathlib import Path

from medblocks_pipelines.lib.errors import LandingError
from medblocks_pipelines.lib.warehouse.lake import LakeWriter


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


def import_ndjson_folder(folder: Path, writer: LakeWriter) -> int:
    """Land every NDJSON file under ``folder`` through ``writer``; returns the number of files."""
    files = ndjson_files(folder)
    for path in files:
        writer.add_ndjson_file(path, origin=path.name)
    return len(files)

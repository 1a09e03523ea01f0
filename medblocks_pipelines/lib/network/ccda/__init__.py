"""C-CDA R2.1 to FHIR R4 conversion."""

from medblocks_pipelines.lib.network.ccda.convert import (
    ConversionResult,
    Quarantined,
    SourceDocument,
    binary_resources,
    convert_ccda,
)

__all__ = ["ConversionResult", "Quarantined", "SourceDocument", "binary_resources", "convert_ccda"]

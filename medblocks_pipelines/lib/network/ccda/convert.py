"""C-CDA R2.1 -> FHIR R4 resources (SPECS 6.1-6.3; C-CDA on FHIR mapping IG, CF-*.html).

One call converts one document. Sections are found by ``templateId/@root`` (entries-required and
entries-optional roots, extension ignored) with the LOINC section code as fallback; sections may be
nested. Every resource gets a deterministic id from its CDA ``id`` (scoped by the community that
sent it), so the same problem repeated in every CCD lands as the same resource, and carries the
source document in ``meta.source`` plus an extension pointing at the document's DocumentReference.

Nothing is dropped silently: an entry that cannot become a valid resource (no usable code, an
unrecognised entry in a known section) is returned in ``quarantined`` with a reason; missing and
narrative-only sections are counted in ``flags``.
"""

from lxml import etree

from medblocks_pipelines.lib.network.ccda.activities import ActivitiesMixin
from medblocks_pipelines.lib.network.ccda.common import (
    q,
    system_uri,
    template_roots,
)
from medblocks_pipelines.lib.network.ccda.header import HeaderMixin
from medblocks_pipelines.lib.network.ccda.medications import MedicationsMixin
from medblocks_pipelines.lib.network.ccda.model import (
    _BY_LOINC,
    SECTIONS,
    ConversionResult,
    Quarantined,
    SourceDocument,
    binary_resources,
)
from medblocks_pipelines.lib.network.ccda.observations import ObservationsMixin
from medblocks_pipelines.lib.network.safexml import parse_untrusted


class _Converter(HeaderMixin, MedicationsMixin, ObservationsMixin, ActivitiesMixin):
    """The document walk; each section's entries go to its mixin's ``_do_<domain>``."""

    # -- document ------------------------------------------------------------------------------
    def run(self) -> ConversionResult:
        if self.root.tag != q("ClinicalDocument"):
            raise ValueError("not a CDA ClinicalDocument")
        self._patient()
        self._document()
        body = self.root.find(f"{q('component')}/{q('structuredBody')}")
        if body is None:
            self.flags.add("no_structured_body")
            return self.result
        for section in body.iter(q("section")):
            domain = self._domain(section)
            if domain is None:
                self.flags.add("section_not_converted")
                continue
            self.result.sections_found.append(domain)
            entries = section.findall(q("entry"))
            if section.get("nullFlavor") is not None or not entries:
                self.flags.add(f"section_empty_{domain}")
                continue
            for entry in entries:
                stmt = next((c for c in entry if isinstance(c.tag, str)), None)
                if stmt is None:
                    continue
                if stmt.get("nullFlavor") is not None:
                    # "No information" / "unknown" on the whole entry (e.g. an immunization status
                    # or a pregnancy observation of nullFlavor UNK): its codes assert nothing.
                    self._quarantine(
                        stmt, f"entry has nullFlavor {stmt.get('nullFlavor')}", None, domain
                    )
                    continue
                try:
                    getattr(self, f"_do_{domain}")(stmt)
                except (ValueError, TypeError, KeyError) as exc:
                    self._quarantine(stmt, f"conversion error: {type(exc).__name__}", None, domain)
        for dom in SECTIONS:
            if dom not in self.result.sections_found:
                self.flags.add(f"section_missing_{dom}")
        self._provenance()
        return self.result

    def _domain(self, section: etree._Element) -> str | None:
        roots = template_roots(section)
        for dom, (tids, _) in SECTIONS.items():
            if roots & tids:
                return dom
        code = section.find(q("code"))
        if code is not None and code.get("code") in _BY_LOINC:
            self.flags.add("section_by_loinc")
            return _BY_LOINC[code.get("code", "")]
        return None


def convert_ccda(data: bytes | etree._Element, source: SourceDocument) -> ConversionResult:
    """Convert one C-CDA document into FHIR R4 resources plus quarantined entries.

    ``data`` is the raw document (parsed with the hardened parser) or an already-parsed root.
    Raises :class:`~medblocks_pipelines.lib.network.errors.UnsafeXMLError` for refused XML and
    ``ValueError`` if the root is not a ``ClinicalDocument``.
    """
    root = (
        parse_untrusted(bytes(data), what="C-CDA") if isinstance(data, bytes | bytearray) else data
    )
    return _Converter(root, source).run()


__all__ = [
    "SECTIONS",
    "ConversionResult",
    "Quarantined",
    "SourceDocument",
    "binary_resources",
    "convert_ccda",
    "system_uri",
]

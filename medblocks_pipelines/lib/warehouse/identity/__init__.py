"""Identity: link source patients to persons (splink on DuckDB, deterministic rules first).

A *source patient* is one Patient resource at one source (key ``source/Patient/id``). A *person* is a
cluster of source patients that are the same human. Edges come from these places, strongest first:

1. ``patient_ref`` — patient-access connections already know their person: the Patient of every
   connection that carries the same tenant ``patient_ref`` is the same person (score 1.0). When the
   connection records its ``source_patient_id`` only that Patient gets the reference; otherwise every
   Patient landed through the connection does.
2. ``identifier:<system>`` — the same identifier system and value (an organization's MRN, a payer's member
   id): the same registration seen twice (score 1.0).
3. ``ssn+dob`` — the same SSN and the same birth date (score 1.0). An SSN alone is not enough: placeholder
   and recycled numbers exist, and a random 9-digit space collides at scale.
4. ``probabilistic`` — a Fellegi-Sunter model (splink) whose parameters are estimated on the tenant's own
   data: u by random sampling, m by EM over two blocking rules, the probability that two records match
   from deterministic rules. Comparisons (given and family name with nicknames from the public
   ``nicknames`` package, Jaro-Winkler and Metaphone levels; birth date by its digits with day/month
   swaps and digit edits; address tokens; city; postal code; sex, phone, e-mail, SSN) are null-aware,
   and a comparison whose fields the data never fills is left out. The acceptance threshold is chosen
   for a target precision (0.99) from the model's match probabilities, or set; it is recorded in
   ``identity_model`` with every level's m, u and match weight.

Probabilistic links are *vetoed* when the Fellegi-Sunter independence assumption would add up traits
that relatives share (twins share birth date, address, phone and family name):

- the given names conflict (no direct nickname relation, not swapped with the family name, more than
  one edit apart with Jaro-Winkler < 0.88) and the birth dates conflict too; or the given names differ
  and the sexes differ (a nickname shared across sexes, Alex, does not join Alexander and Alexandra);
- both SSNs are present and differ.

With the *household guard* on, also: conflicting given names with agreeing family names (twins,
siblings, spouses), and the same name with birth years a generation (15+ years) apart (parent and
child). The guard is ``auto`` by default: on when most records carry a sex (US Core requires it), off
otherwise, because without sex a twin and a record whose given name was garbled look alike and the
second is far more common in such data (FEBRL); ``household_guard`` = on/off fixes it. A matching SSN
overrides the name and date vetoes.

Clusters never join a vetoed pair: accepted edges are applied strongest first (deterministic, then by
match probability) and an edge that would put a vetoed pair into one person is refused (``joins a
vetoed pair``), so a nickname both twins' names have (Billy: William, Robert) joins one twin, not both.

Vetoed edges are kept (``accepted = false``, ``veto``) so the decision is auditable;
``persons.conflicts`` counts vetoed pairs that still ended in one person (only identifier links can
do that: a person to review). Each probabilistic edge keeps its explanation (``evidence``: level and match weight per
comparison).

Clusters are the connected components of the accepted edges. ``person_id`` is derived from the smallest
member key of the cluster (a hash of it), so it is stable across rebuilds as long as that member stays.

Modules: :mod:`.extract` (Patient JSON -> raw demographics), :mod:`.rules` (deterministic edges and
vetoes), :mod:`.comparisons` and :mod:`.model` (the Fellegi-Sunter model), :mod:`.cluster`
(``link_patients``), :mod:`.evaluate` (pairwise precision/recall), :mod:`.step` (the warehouse step),
:mod:`.febrl` (the FEBRL benchmark data as FHIR).
"""

from medblocks_pipelines.lib.warehouse.identity.cluster import (
    DEFAULT_SEED,
    IdentityOptions,
    IdentityResult,
    connected_components,
    link_patients,
    person_id_for,
)
from medblocks_pipelines.lib.warehouse.identity.evaluate import (
    evaluate_warehouse,
    pairwise_metrics,
    pairwise_metrics_frame,
)
from medblocks_pipelines.lib.warehouse.identity.extract import (
    PATIENT_SQL,
    RAW_COLUMNS,
    SSN_SYSTEM,
    connection_patient_keys,
    extract_source_patients,
    patient_refs_from_control_plane,
)
from medblocks_pipelines.lib.warehouse.identity.model import probabilistic_edges, splink_settings
from medblocks_pipelines.lib.warehouse.identity.rules import apply_vetoes, deterministic_edges
from medblocks_pipelines.lib.warehouse.identity.step import (
    apply_landed_patterns,
    empty_identity_result,
    ensure_landed_patterns,
    identity_step,
    to_arrow,
    write_identity_tables,
)

__all__ = [
    "DEFAULT_SEED",
    "PATIENT_SQL",
    "RAW_COLUMNS",
    "SSN_SYSTEM",
    "IdentityOptions",
    "IdentityResult",
    "apply_landed_patterns",
    "apply_vetoes",
    "connected_components",
    "connection_patient_keys",
    "deterministic_edges",
    "empty_identity_result",
    "ensure_landed_patterns",
    "evaluate_warehouse",
    "extract_source_patients",
    "identity_step",
    "link_patients",
    "pairwise_metrics",
    "pairwise_metrics_frame",
    "patient_refs_from_control_plane",
    "person_id_for",
    "probabilistic_edges",
    "splink_settings",
    "to_arrow",
    "write_identity_tables",
]

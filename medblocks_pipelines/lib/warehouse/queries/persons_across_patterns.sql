-- Persons linked across patterns: one row per person seen through at least two of the four
-- relationships (patient_access, clinician_workflow, backend, network), most patterns first.
-- The demo's headline query: `n_patterns = 4` are people whose record arrived four ways.
SELECT p.person_id,
       p.n_patterns,
       p.patterns,
       p.n_sources,
       p.sources,
       p.n_source_patients,
       (SELECT count(*) FROM facts f WHERE f.person_id = p.person_id) AS facts,
       (SELECT count(*) FROM facts f WHERE f.person_id = p.person_id AND f.n_sources > 1)
           AS facts_from_several_sources
FROM persons p
WHERE p.n_patterns >= 2
ORDER BY p.n_patterns DESC, p.n_sources DESC, p.person_id;

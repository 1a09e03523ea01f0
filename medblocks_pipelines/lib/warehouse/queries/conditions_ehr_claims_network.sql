-- Conditions stated by clinical records and by claims at once (deduplicated), with the patterns
-- that reported them: the same diagnosis from an EHR, a payer's EOB and a network C-CDA is one row.
SELECT f.person_id, f.code_system, f.code, f.display, f.effective_date,
       f.n_sources, f.patterns, f.from_clinical, f.from_claims
FROM facts_conditions f
WHERE f.from_claims AND f.from_clinical
ORDER BY f.n_sources DESC, f.person_id, f.code;

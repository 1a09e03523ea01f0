-- Every provenance link of the facts of the best-connected person: which source, pattern,
-- organization and connection stated each fact, in which resource (and claim element), and when.
WITH best AS (
    SELECT person_id FROM persons ORDER BY n_patterns DESC, n_sources DESC, person_id LIMIT 1
)
SELECT f.kind, f.code_system, f.code, f.display, f.effective_date, f.n_sources,
       s.pattern, s.source, s.organization, s.connection, s.resource_key, s.element, s.fetched_at
FROM facts f
JOIN fact_sources s USING (fact_id)
WHERE f.person_id = (SELECT person_id FROM best)
ORDER BY f.kind, f.effective_date, f.fact_id, s.pattern, s.resource_key;

-- How sources overlap: for each pair of sources, how many persons both know.
SELECT a.source AS source_a, b.source AS source_b, count(DISTINCT a.person_id) AS shared_persons
FROM patient_links a
JOIN patient_links b ON a.person_id = b.person_id AND a.source < b.source
GROUP BY 1, 2
ORDER BY shared_persons DESC, source_a, source_b;

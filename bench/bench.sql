-- Benchmark-only SQL, loaded by name like sql/queries.sql.

-- provision --
SELECT p.workspace_id, p.agent_token
FROM generate_series(1, $1) AS g, reinitd.create_prebuild('bench-' || g) AS p

-- claim_many --
SELECT reinitd.claim_prebuild(w, $2) FROM unnest($1::uuid[]) AS w

-- unclaim --
-- Turn claimed bench workspaces back into prebuilds, so that runs can repeat.
WITH gone AS (
    DELETE FROM reinitd.workspace_builds
    WHERE stage = 'claim' AND workspace_id = ANY($1::uuid[])
)
UPDATE reinitd.workspaces SET owner_id = reinitd.prebuilds_user_id()
WHERE id = ANY($1::uuid[])

-- claim_one --
SELECT reinitd.claim_prebuild($1, $2)

-- settle --
-- After a run's claims and unclaims: reclaim dead rows (presence's too: a stopped server's
-- rows), so that the next run neither races autovacuum for the CPU nor inserts into bloat.
VACUUM (ANALYZE) reinitd.workspaces, reinitd.workspace_builds, reinitd.presence, reinitd.replicas

-- forge --
-- Forged doorbells, each with a made-up owner (distinct payloads are not folded).
SELECT pg_notify('prebuild_claimed',
                 json_build_object('workspace_id', w, 'owner_id', gen_random_uuid())::text)
FROM unnest($1::text[]) AS w

-- kill_listener --
-- Terminate the server's LISTEN connection, as a failover or an idle-session killer would.
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE application_name = 'reinitd-listener'

-- owner --
-- The user every benchmark claim is made for.
SELECT reinitd.create_user('bench-owner')

-- statements_reset --
-- pg_stat_statements (preloaded by the bench for `--only presence`): from zero.
SELECT pg_stat_statements_reset()

-- server_statements --
-- What the server's role ran since the reset, by statement.
SELECT s.query, s.calls, s.total_exec_time
FROM pg_stat_statements AS s JOIN pg_roles AS r ON r.oid = s.userid
WHERE r.rolname = $1

-- presence_rows --
SELECT count(*) FROM reinitd.agent_presence

-- presence_sizes --
-- Bytes on disk (table, indexes, TOAST) and rows of the presence and receipt tables.
SELECT pg_total_relation_size('reinitd.presence') AS presence_bytes,
       pg_total_relation_size('reinitd.replicas') AS replicas_bytes,
       pg_total_relation_size('reinitd.delivery_receipts') AS receipts_bytes,
       (SELECT count(*) FROM reinitd.presence) AS presence_rows,
       (SELECT count(*) FROM reinitd.replicas) AS replicas_rows,
       (SELECT count(*) FROM reinitd.delivery_receipts) AS receipts_rows

-- last_receipt --
SELECT coalesce(max(id), 0) FROM reinitd.delivery_receipts

-- receipts_after --
-- Receipt rows committed since the last one seen (the bench polls: when each appeared).
SELECT id, workspace_id FROM reinitd.delivery_receipts WHERE id > $1 ORDER BY id

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
-- After a run's claims and unclaims: reclaim dead rows, so that the next run does not race
-- autovacuum for the CPU.
VACUUM (ANALYZE) reinitd.workspaces, reinitd.workspace_builds

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

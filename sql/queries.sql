-- Named queries, loaded once by reinitd.query: a block starts with a line `-- name --`.

-- agent_by_token_hash --
-- One agent token (its sha256) to the agent and its workspace (the benchmark's naive server).
SELECT agent_id, workspace_id FROM reinitd.agent_by_token_hash($1)

-- admit_many --
-- Connects that arrive together, in one round trip: the agent of each token hash ($1, an
-- array; `i` is a hash's position in it) and what the durable check needs about its
-- workspace (null columns: the workspace is gone). Unknown tokens have no row.
SELECT a.i, a.agent_id, a.workspace_id, s.owner_id, s.first_initiator_id,
       s.latest_stage, s.latest_status, s.latest_error, s.latest_build_id
FROM reinitd.agents_by_token_hashes($1::bytea[]) AS a
LEFT JOIN reinitd.claim_state AS s ON s.workspace_id = a.workspace_id

-- admit_one --
-- The same for a read of one connect (a connect at a low rate): the single-hash function
-- costs PostgreSQL ~80 µs less than the array one for a batch of one.
SELECT 1 AS i, a.agent_id, a.workspace_id, s.owner_id, s.first_initiator_id,
       s.latest_stage, s.latest_status, s.latest_error, s.latest_build_id
FROM reinitd.agent_by_token_hash($1) AS a
LEFT JOIN reinitd.claim_state AS s ON s.workspace_id = a.workspace_id

-- claim_states --
-- The durable check's columns for a batch of workspaces (doorbells, resyncs).
SELECT workspace_id, owner_id, first_initiator_id, latest_stage, latest_status, latest_error,
       latest_build_id
FROM reinitd.claim_state
WHERE workspace_id = ANY($1::uuid[])

-- migration_lock --
SELECT pg_advisory_xact_lock(hashtext('reinitd.migrate'))

-- migration_table --
CREATE SCHEMA IF NOT EXISTS reinitd;
CREATE TABLE IF NOT EXISTS reinitd.schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- applied_migrations --
SELECT name FROM reinitd.schema_migrations

-- migration_table_exists --
SELECT to_regclass('reinitd.schema_migrations') IS NOT NULL

-- record_migration --
INSERT INTO reinitd.schema_migrations (name) VALUES ($1)

-- ping --
SELECT 1

-- database_exists --
SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'reinitd')

-- create_database --
CREATE DATABASE reinitd

-- probe_notify --
-- Readiness: a NOTIFY that must come back through this process's own listener.
SELECT pg_notify('reinitd_probe', $1)

-- server_login_role --
-- The statements that create (or refresh) the embedded cluster's login role for `serve`,
-- quoted by format(): $1 the role, $2 its password.
SELECT format(
    CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)
        THEN 'ALTER ROLE %1$I LOGIN NOSUPERUSER PASSWORD %2$L; GRANT reinitd_server TO %1$I'
        ELSE 'CREATE ROLE %1$I LOGIN PASSWORD %2$L IN ROLE reinitd_server'
    END, $1::text, $2::text)

-- set_superuser_password --
-- Run by `postgres --single`, a statement a line and no parameters: the one placeholder is
-- replaced by the quoted hex password. SCRAM whatever the cluster's default (md5 before 14).
SET password_encryption = 'scram-sha-256';
ALTER ROLE postgres PASSWORD $1;

-- report_presence --
-- A replica's presence report (reinitd.server.presence): the requests that began and ended
-- since its last report, or everything it holds.
SELECT reinitd.report_presence($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)

-- retire_replica --
SELECT reinitd.retire_replica($1)

-- record_deliveries --
SELECT reinitd.record_deliveries($1, $2, $3, $4, $5, $6, $7)

-- prune_deliveries --
SELECT reinitd.prune_deliveries(make_interval(secs => $1), $2)

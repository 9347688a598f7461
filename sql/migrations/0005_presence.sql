-- The database sees its agents (docs/protocol.md §8): who is waiting now and on which replica,
-- which prebuilds of a pool have a listening agent, a claim of the longest-waiting one that
-- never waits on another caller's lock, and a receipt for every frame that told an agent.
--
-- Presence is UNLOGGED: it is a picture of live TCP connections, worth nothing after a crash
-- or on a promoted standby (both leave it empty, and every replica re-asserts all it holds on
-- its next report), and it costs no WAL however often agents come and go. Receipts are an
-- audit trail: an ordinary, logged table that survives a crash and a failover.
--
-- Clocks: a replica never sends a wall-clock time. It reports how long ago a request began
-- to wait, or a frame was written, on its own monotonic clock, and the database anchors that
-- on its own clock (now() - age). Replicas on hosts whose clocks disagree still agree here.

-- Pools of interchangeable prebuilds (Coder's presets). NULL for a regular workspace.
ALTER TABLE reinitd.workspaces ADD COLUMN pool text CHECK (pool <> '');
UPDATE reinitd.workspaces AS w SET pool = 'default'
    WHERE EXISTS (SELECT 1 FROM reinitd.workspace_builds AS b
                  WHERE b.workspace_id = w.id AND b.build_number = 1
                    AND b.initiator_id = reinitd.prebuilds_user_id());
CREATE INDEX workspaces_prebuild_pool_idx ON reinitd.workspaces (pool)
    WHERE owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0';

-- A one-argument call must keep working, and an overload beside the old function would make
-- it ambiguous: the old one goes, the new one takes a defaulted pool.
DROP FUNCTION reinitd.create_prebuild(text);
CREATE FUNCTION reinitd.create_prebuild(name text, pool text DEFAULT 'default')
    RETURNS TABLE (workspace_id uuid, agent_id uuid, agent_token text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    v_row record;
BEGIN
    IF pool IS NULL OR btrim(pool) = '' THEN
        RAISE EXCEPTION 'reinitd.create_prebuild: pool must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_row FROM reinitd.provision(name, reinitd.prebuilds_user_id(), 'prebuild');
    UPDATE reinitd.workspaces SET pool = create_prebuild.pool WHERE id = v_row.workspace_id;
    RETURN QUERY SELECT v_row.workspace_id, v_row.agent_id, v_row.agent_token;
END
$$;

-- The durable check also names the latest build, so that a receipt can say which claim build
-- it reported (a column added at the end: CREATE OR REPLACE keeps the others).
CREATE OR REPLACE VIEW reinitd.claim_state AS
SELECT w.id AS workspace_id,
       w.owner_id,
       first_build.initiator_id AS first_initiator_id,
       latest.stage AS latest_stage,
       latest.status AS latest_status,
       latest.error AS latest_error,
       latest.id AS latest_build_id
FROM reinitd.workspaces AS w
LEFT JOIN reinitd.workspace_builds AS first_build
       ON first_build.workspace_id = w.id AND first_build.build_number = 1
LEFT JOIN LATERAL (
    SELECT b.id, b.stage, b.status, b.error
    FROM reinitd.workspace_builds AS b
    WHERE b.workspace_id = w.id
    ORDER BY b.build_number DESC
    LIMIT 1
) AS latest ON true;

-- Connects that arrive together are read together: the agents of many token hashes in one
-- call (`i`: each hash's position in the array; the hashes themselves are not returned).
CREATE FUNCTION reinitd.agents_by_token_hashes(p_token_hashes bytea[])
    RETURNS TABLE (i integer, agent_id uuid, workspace_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT t.i::integer, a.id, a.workspace_id
        FROM unnest(p_token_hashes) WITH ORDINALITY AS t (token_hash, i)
        JOIN reinitd.workspace_agents AS a ON a.token_hash = t.token_hash
    $$;

-- One row per live server process. `replica` is host, pid and a random suffix chosen at the
-- process's start: a worker restarted under --workers, or a pid reused after a crash, is a
-- new replica, never the dead one's rows coming back. A replica's rows count while
-- `expires_at` (renewed by every report, a few report intervals ahead) is in the future.
CREATE UNLOGGED TABLE reinitd.replicas (
    replica    text PRIMARY KEY CHECK (replica <> '' AND octet_length(replica) <= 200),
    started_at timestamptz NOT NULL DEFAULT now(),
    reported_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE UNLOGGED TABLE reinitd.presence (
    replica      text NOT NULL REFERENCES reinitd.replicas (replica) ON DELETE CASCADE,
    seq          bigint NOT NULL,  -- the request's number within its replica
    agent_id     uuid NOT NULL,
    workspace_id uuid NOT NULL,
    mode         text NOT NULL CHECK (mode IN ('sse', 'json')),
    wait         boolean NOT NULL,
    connected_at timestamptz NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE INDEX presence_workspace_id_idx ON reinitd.presence (workspace_id);

CREATE VIEW reinitd.agent_presence AS
SELECT p.agent_id, p.workspace_id, p.replica, p.mode, p.wait, p.connected_at
FROM reinitd.presence AS p
JOIN reinitd.replicas AS r ON r.replica = p.replica
WHERE r.expires_at > now();

CREATE VIEW reinitd.ready_prebuilds AS
SELECT w.id AS workspace_id,
       w.pool,
       count(DISTINCT p.agent_id)::integer AS agents,
       min(p.connected_at) AS waiting_since
FROM reinitd.workspaces AS w
JOIN reinitd.agent_presence AS p ON p.workspace_id = w.id
JOIN reinitd.claim_state AS s ON s.workspace_id = w.id
WHERE w.owner_id = reinitd.prebuilds_user_id()
  AND s.latest_status = 'succeeded'
GROUP BY w.id, w.pool;

-- A replica's report, one statement per flush however many requests came and went: renew
-- the replica, forget the requests that ended, add the ones that began (`age`: seconds they
-- have waited). `full`: the report is everything the replica holds (its first, and after any
-- failure), so whatever the table had for it is replaced. Returns false when the replica was
-- unknown and the report was not full (a crash or a failover emptied the table, or it was
-- expired while it could not report): nothing is applied, and the replica sends everything.
CREATE FUNCTION reinitd.report_presence(
    p_replica text, p_ttl double precision, p_full boolean,
    p_seq bigint[], p_agent_id uuid[], p_workspace_id uuid[], p_mode text[],
    p_wait boolean[], p_age double precision[], p_left bigint[])
    RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    v_expires timestamptz := now() + make_interval(secs => least(greatest(p_ttl, 1), 300));
BEGIN
    UPDATE reinitd.replicas SET reported_at = now(), expires_at = v_expires
        WHERE replica = p_replica;
    IF NOT FOUND THEN
        IF NOT p_full THEN
            RETURN false;
        END IF;
        INSERT INTO reinitd.replicas (replica, expires_at) VALUES (p_replica, v_expires);
    ELSIF p_full THEN
        DELETE FROM reinitd.presence WHERE replica = p_replica;
    END IF;
    IF cardinality(p_left) > 0 THEN
        DELETE FROM reinitd.presence WHERE replica = p_replica AND seq = ANY (p_left);
    END IF;
    INSERT INTO reinitd.presence (replica, seq, agent_id, workspace_id, mode, wait, connected_at)
        SELECT p_replica, u.seq, u.agent_id, u.workspace_id, u.mode, u.wait,
               now() - make_interval(secs => greatest(u.age, 0))
        FROM unnest(p_seq, p_agent_id, p_workspace_id, p_mode, p_wait, p_age)
             AS u (seq, agent_id, workspace_id, mode, wait, age)
        ON CONFLICT (replica, seq) DO NOTHING;
    -- Replicas that stopped reporting long ago (killed, host lost): their rows already left
    -- agent_presence when they expired; now the rows themselves go. SKIP LOCKED: a row being
    -- renewed by its own replica right now is not waited for (two replicas back from a long
    -- outage would otherwise each wait for the other's row: a deadlock).
    DELETE FROM reinitd.replicas
        WHERE replica IN (SELECT r.replica FROM reinitd.replicas AS r
                          WHERE r.expires_at < now() - interval '60 seconds'
                          FOR UPDATE SKIP LOCKED);
    RETURN true;
END
$$;

-- A replica that stops cleanly takes its rows with it at once.
CREATE FUNCTION reinitd.retire_replica(p_replica text) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$ DELETE FROM reinitd.replicas WHERE replica = p_replica $$;

CREATE TABLE reinitd.delivery_receipts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id uuid NOT NULL,
    agent_id     uuid NOT NULL,
    build_id     uuid,  -- the claim build reported (for an error frame: the latest build)
    kind         text NOT NULL CHECK (kind IN ('event', 'error')),
    path         text NOT NULL CHECK (path IN ('notify', 'seeded', 'resync')),
    replica      text NOT NULL,
    delivered_at timestamptz NOT NULL
);
CREATE INDEX delivery_receipts_workspace_idx
    ON reinitd.delivery_receipts (workspace_id, delivered_at);
CREATE INDEX delivery_receipts_delivered_at_idx ON reinitd.delivery_receipts (delivered_at);

-- What a DBA reads: each receipt, and how long after its build completed the frame went out.
CREATE VIEW reinitd.deliveries AS
SELECT d.workspace_id, d.agent_id, d.build_id, d.kind, d.path, d.replica, d.delivered_at,
       d.delivered_at - b.completed_at AS after_build
FROM reinitd.delivery_receipts AS d
LEFT JOIN reinitd.workspace_builds AS b ON b.id = d.build_id;

CREATE FUNCTION reinitd.record_deliveries(
    p_replica text, p_workspace_id uuid[], p_agent_id uuid[], p_build_id uuid[],
    p_kind text[], p_path text[], p_age double precision[])
    RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        INSERT INTO reinitd.delivery_receipts
            (workspace_id, agent_id, build_id, kind, path, replica, delivered_at)
        SELECT u.workspace_id, u.agent_id, u.build_id, u.kind, u.path, p_replica,
               now() - make_interval(secs => greatest(u.age, 0))
        FROM unnest(p_workspace_id, p_agent_id, p_build_id, p_kind, p_path, p_age)
             AS u (workspace_id, agent_id, build_id, kind, path, age)
    $$;

-- Retention: receipts older than `p_keep` go, at most `p_limit` per call (a short
-- transaction; the caller repeats while it removes a full batch). Returns how many went.
CREATE FUNCTION reinitd.prune_deliveries(p_keep interval, p_limit integer DEFAULT 10000)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    v_gone integer;
BEGIN
    IF p_keep IS NULL OR p_keep < interval '1 minute' THEN
        RAISE EXCEPTION 'reinitd.prune_deliveries: keep receipts at least a minute (got %)',
            p_keep USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM reinitd.delivery_receipts
        WHERE id IN (SELECT id FROM reinitd.delivery_receipts
                     WHERE delivered_at < now() - p_keep
                     ORDER BY delivered_at LIMIT greatest(p_limit, 1));
    GET DIAGNOSTICS v_gone = ROW_COUNT;
    RETURN v_gone;
END
$$;

-- Claim the longest-waiting prebuild of `pool` whose agent listens now. SKIP LOCKED: callers
-- at once each take a different workspace, and none waits for another's transaction; the
-- owner is checked again on the locked row, so a workspace claimed by a caller that
-- committed meanwhile is passed over. NULL when no prebuild of the pool is ready.
CREATE FUNCTION reinitd.claim_ready_prebuild(pool text, new_owner_id uuid)
    RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    v_workspace uuid;
BEGIN
    IF pool IS NULL OR btrim(pool) = '' THEN
        RAISE EXCEPTION 'reinitd.claim_ready_prebuild: pool must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF new_owner_id IS NULL OR new_owner_id = reinitd.prebuilds_user_id()
       OR NOT EXISTS (SELECT 1 FROM reinitd.users WHERE id = new_owner_id) THEN
        RAISE EXCEPTION 'reinitd.claim_ready_prebuild: new owner % is not a user who can claim',
            new_owner_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT w.id INTO v_workspace
        FROM reinitd.ready_prebuilds AS r
        JOIN reinitd.workspaces AS w ON w.id = r.workspace_id
        WHERE r.pool = claim_ready_prebuild.pool
          AND w.owner_id = reinitd.prebuilds_user_id()
        ORDER BY r.waiting_since, r.workspace_id
        LIMIT 1
        FOR UPDATE OF w SKIP LOCKED;
    IF v_workspace IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM reinitd.claim_prebuild(v_workspace, new_owner_id, true);
    RETURN v_workspace;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA reinitd FROM PUBLIC;
REVOKE ALL ON reinitd.replicas, reinitd.presence, reinitd.agent_presence,
    reinitd.ready_prebuilds, reinitd.delivery_receipts, reinitd.deliveries FROM PUBLIC;

-- The server writes presence and receipts through these functions only: it still cannot claim,
-- provision or read token hashes.
GRANT EXECUTE ON FUNCTION
    reinitd.agents_by_token_hashes(bytea[]),
    reinitd.report_presence(text, double precision, boolean, bigint[], uuid[], uuid[], text[],
                            boolean[], double precision[], bigint[]),
    reinitd.retire_replica(text),
    reinitd.record_deliveries(text, uuid[], uuid[], uuid[], text[], text[],
                              double precision[]),
    reinitd.prune_deliveries(interval, integer)
    TO reinitd_server;

GRANT EXECUTE ON FUNCTION
    reinitd.create_prebuild(text, text),
    reinitd.claim_ready_prebuild(text, uuid)
    TO reinitd_operator;
GRANT SELECT ON reinitd.agent_presence, reinitd.ready_prebuilds, reinitd.deliveries,
    reinitd.replicas TO reinitd_operator;

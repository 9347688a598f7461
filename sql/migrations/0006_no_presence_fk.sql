-- Presence rows without a foreign key to their replica (docs/protocol.md §8.4).
--
-- The key's check was a lookup in `replicas` for every row a report inserted: half of what a
-- report cost PostgreSQL (17-27 µs per row with it, 10-15 without, 1 000 rows a report), paid
-- on every storm of connects. A replica's rows now go with it explicitly, in the same
-- statements that delete the replica: at a clean stop (`retire_replica`) and when a report
-- cleans up a replica that expired long ago. Rows of a replica that is not (or no longer)
-- in `replicas` were never visible: `agent_presence` joins the replica and requires it alive.

ALTER TABLE reinitd.presence DROP CONSTRAINT presence_replica_fkey;

-- The replica first, then its rows, as the clean-up below does (one lock order, no deadlock
-- between them). The replica's delete waits for a report of its own still running (the row
-- is locked by it); the rows' delete is a new statement with a new snapshot, so it sees and
-- takes that report's rows too: none is left behind.
CREATE OR REPLACE FUNCTION reinitd.retire_replica(p_replica text) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        DELETE FROM reinitd.replicas WHERE replica = p_replica;
        DELETE FROM reinitd.presence WHERE replica = p_replica;
    $$;

CREATE OR REPLACE FUNCTION reinitd.report_presence(
    p_replica text, p_ttl double precision, p_full boolean,
    p_seq bigint[], p_agent_id uuid[], p_workspace_id uuid[], p_mode text[],
    p_wait boolean[], p_age double precision[], p_left bigint[])
    RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    v_expires timestamptz := now() + make_interval(secs => least(greatest(p_ttl, 1), 300));
BEGIN
    -- The replica's row is renewed (or created) first, and stays locked to the end: a
    -- clean-up by another replica's report (below) skips it, so it never deletes rows that
    -- this report is adding.
    UPDATE reinitd.replicas SET reported_at = now(), expires_at = v_expires
        WHERE replica = p_replica;
    IF NOT FOUND THEN
        IF NOT p_full THEN
            RETURN false;
        END IF;
        -- Rows a dead replica of the same name could have left (none: names are unique per
        -- process start; but a report must never depend on that).
        DELETE FROM reinitd.presence WHERE replica = p_replica;
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
    -- agent_presence when they expired; now the rows themselves go, with the replica.
    -- SKIP LOCKED: a row being renewed by its own replica right now is not waited for (two
    -- replicas back from a long outage would otherwise each wait for the other's row).
    WITH gone AS (
        DELETE FROM reinitd.replicas
        WHERE replica IN (SELECT r.replica FROM reinitd.replicas AS r
                          WHERE r.expires_at < now() - interval '60 seconds'
                          FOR UPDATE SKIP LOCKED)
        RETURNING replica
    )
    DELETE FROM reinitd.presence WHERE replica IN (SELECT replica FROM gone);
    RETURN true;
END
$$;

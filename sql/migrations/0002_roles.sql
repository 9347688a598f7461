-- Least privilege. Two group roles (NOLOGIN; grant them to your login roles):
--   reinitd_server   what `reinitd serve` needs: resolve a token through one function, read
--                    the columns of the durable check, LISTEN/NOTIFY. It cannot claim,
--                    provision, or read token hashes.
--   reinitd_operator the SQL API (claim, provision, builds) for DBAs and provisioning.
-- Roles are cluster-wide, so they are created only where missing.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reinitd_server') THEN
        CREATE ROLE reinitd_server NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reinitd_operator') THEN
        CREATE ROLE reinitd_operator NOLOGIN;
    END IF;
END
$$;

-- The only way to read workspace_agents for the server: one agent by its token's hash.
CREATE FUNCTION reinitd.agent_by_token_hash(p_token_hash bytea)
    RETURNS TABLE (agent_id uuid, workspace_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT a.id, a.workspace_id FROM reinitd.workspace_agents AS a
        WHERE a.token_hash = p_token_hash
    $$;

-- The SQL API runs with its owner's rights, so callers need EXECUTE and nothing else.
ALTER FUNCTION reinitd.create_user(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reinitd.create_prebuild(text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reinitd.create_workspace(text, uuid)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reinitd.claim_prebuild(uuid, uuid, boolean)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reinitd.start_build(uuid, uuid)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION reinitd.complete_build(uuid, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA reinitd FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA reinitd FROM PUBLIC;

GRANT USAGE ON SCHEMA reinitd TO reinitd_server, reinitd_operator;

GRANT EXECUTE ON FUNCTION reinitd.agent_by_token_hash(bytea) TO reinitd_server;
GRANT SELECT (id, owner_id) ON reinitd.workspaces TO reinitd_server;
GRANT SELECT (workspace_id, build_number, initiator_id, stage, status, error)
    ON reinitd.workspace_builds TO reinitd_server;
GRANT SELECT ON reinitd.schema_migrations TO reinitd_server;

GRANT EXECUTE ON FUNCTION
    reinitd.prebuilds_user_id(),
    reinitd.create_user(text),
    reinitd.create_prebuild(text),
    reinitd.create_workspace(text, uuid),
    reinitd.claim_prebuild(uuid, uuid, boolean),
    reinitd.start_build(uuid, uuid),
    reinitd.complete_build(uuid, text)
    TO reinitd_operator;
GRANT SELECT ON reinitd.users, reinitd.workspaces, reinitd.workspace_builds,
    reinitd.schema_migrations TO reinitd_operator;
GRANT SELECT (id, workspace_id, name, created_at) ON reinitd.workspace_agents
    TO reinitd_operator;

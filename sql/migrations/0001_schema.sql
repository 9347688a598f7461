-- reinitd schema: users, workspaces, builds, agents, and the SQL API for DBAs and provisioning.
-- Applied by `reinitd migrate` inside one transaction under an advisory lock.

CREATE TABLE reinitd.users (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    username   text NOT NULL UNIQUE CHECK (username <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The prebuilds system user: a workspace is a prebuild while this user owns it.
INSERT INTO reinitd.users (id, username)
VALUES ('c42fdf75-3097-471c-8c33-fb52454d81c0', 'prebuilds');

CREATE FUNCTION reinitd.prebuilds_user_id() RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'c42fdf75-3097-471c-8c33-fb52454d81c0'::uuid $$;

CREATE TABLE reinitd.workspaces (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL CHECK (name <> ''),
    owner_id   uuid NOT NULL REFERENCES reinitd.users (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reinitd.workspace_builds (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES reinitd.workspaces (id) ON DELETE CASCADE,
    build_number integer NOT NULL CHECK (build_number >= 1),
    initiator_id uuid NOT NULL REFERENCES reinitd.users (id),
    stage        text NOT NULL CHECK (stage IN ('prebuild', 'claim', 'regular')),
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    UNIQUE (workspace_id, build_number),
    CHECK ((status = 'running') = (completed_at IS NULL)),
    CHECK ((status = 'failed') = (error IS NOT NULL))
);

CREATE TABLE reinitd.workspace_agents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id uuid NOT NULL REFERENCES reinitd.workspaces (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (name <> ''),
    -- sha256 of the token's canonical text; the token itself is never stored.
    token_hash   bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workspace_agents_workspace_id_idx ON reinitd.workspace_agents (workspace_id);

-- The NOTIFY payload is the wire event itself: compact JSON, keys in the order agents see them.
CREATE FUNCTION reinitd.announce(p_workspace_id uuid, p_reason text, p_owner_id uuid DEFAULT NULL)
    RETURNS void LANGUAGE sql VOLATILE
    AS $$
        SELECT pg_notify('prebuild_claimed',
            CASE WHEN p_owner_id IS NULL
                THEN format('{"workspace_id":"%s","reason":"%s"}', p_workspace_id, p_reason)
                ELSE format('{"workspace_id":"%s","reason":"%s","owner_id":"%s"}',
                            p_workspace_id, p_reason, p_owner_id)
            END)
    $$;

CREATE FUNCTION reinitd.create_user(username text) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_id uuid;
BEGIN
    IF username IS NULL OR btrim(username) = '' THEN
        RAISE EXCEPTION 'reinitd.create_user: username must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO reinitd.users (username) VALUES (create_user.username) RETURNING id INTO v_id;
    RETURN v_id;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'reinitd.create_user: user "%" already exists', create_user.username
        USING ERRCODE = 'unique_violation';
END
$$;

-- Shared body of create_prebuild and create_workspace: workspace, succeeded build 1, one agent.
CREATE FUNCTION reinitd.provision(p_name text, p_owner_id uuid, p_stage text)
    RETURNS TABLE (workspace_id uuid, agent_id uuid, agent_token text)
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_workspace uuid;
    v_agent uuid;
    v_token text := gen_random_uuid()::text;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'reinitd: workspace name must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM reinitd.users WHERE id = p_owner_id) THEN
        RAISE EXCEPTION 'reinitd: owner % does not exist', p_owner_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO reinitd.workspaces (name, owner_id) VALUES (p_name, p_owner_id)
        RETURNING id INTO v_workspace;
    INSERT INTO reinitd.workspace_builds
        (workspace_id, build_number, initiator_id, stage, status, completed_at)
        VALUES (v_workspace, 1, p_owner_id, p_stage, 'succeeded', now());
    INSERT INTO reinitd.workspace_agents (workspace_id, name, token_hash)
        VALUES (v_workspace, 'main', sha256(convert_to(v_token, 'UTF8')))
        RETURNING id INTO v_agent;
    RETURN QUERY SELECT v_workspace, v_agent, v_token;
END
$$;

CREATE FUNCTION reinitd.create_prebuild(name text)
    RETURNS TABLE (workspace_id uuid, agent_id uuid, agent_token text)
    LANGUAGE sql
    AS $$ SELECT * FROM reinitd.provision(name, reinitd.prebuilds_user_id(), 'prebuild') $$;

CREATE FUNCTION reinitd.create_workspace(name text, owner_id uuid)
    RETURNS TABLE (workspace_id uuid, agent_id uuid, agent_token text)
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF owner_id = reinitd.prebuilds_user_id() THEN
        RAISE EXCEPTION 'reinitd.create_workspace: use reinitd.create_prebuild for prebuilds'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM reinitd.provision(name, owner_id, 'regular');
END
$$;

-- Locks the workspace row and inserts its next build; refuses while another build runs.
CREATE FUNCTION reinitd.next_build(p_workspace_id uuid, p_initiator_id uuid, p_stage text,
                                   p_status text)
    RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_build uuid;
    v_number integer;
BEGIN
    SELECT coalesce(max(build_number), 0) + 1 INTO v_number
        FROM reinitd.workspace_builds WHERE workspace_id = p_workspace_id;
    IF EXISTS (SELECT 1 FROM reinitd.workspace_builds
               WHERE workspace_id = p_workspace_id AND status = 'running') THEN
        RAISE EXCEPTION 'reinitd: workspace % has a build in progress', p_workspace_id
            USING ERRCODE = 'object_in_use';
    END IF;
    INSERT INTO reinitd.workspace_builds
        (workspace_id, build_number, initiator_id, stage, status, completed_at)
        VALUES (p_workspace_id, v_number, p_initiator_id, p_stage, p_status,
                CASE WHEN p_status = 'running' THEN NULL ELSE now() END)
        RETURNING id INTO v_build;
    RETURN v_build;
END
$$;

CREATE FUNCTION reinitd.lock_workspace(p_workspace_id uuid) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_owner uuid;
BEGIN
    SELECT owner_id INTO v_owner FROM reinitd.workspaces WHERE id = p_workspace_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reinitd: workspace % does not exist', p_workspace_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_owner;
END
$$;

CREATE FUNCTION reinitd.claim_prebuild(workspace_id uuid, new_owner_id uuid,
                                       complete boolean DEFAULT true)
    RETURNS uuid
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_owner uuid := reinitd.lock_workspace(claim_prebuild.workspace_id);
    v_build uuid;
BEGIN
    IF v_owner <> reinitd.prebuilds_user_id() THEN
        RAISE EXCEPTION 'reinitd.claim_prebuild: workspace % is not a prebuild (owner %)',
            claim_prebuild.workspace_id, v_owner
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF new_owner_id IS NULL OR new_owner_id = reinitd.prebuilds_user_id()
       OR NOT EXISTS (SELECT 1 FROM reinitd.users WHERE id = new_owner_id) THEN
        RAISE EXCEPTION 'reinitd.claim_prebuild: new owner % is not a user who can claim',
            new_owner_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE reinitd.workspaces SET owner_id = new_owner_id
        WHERE id = claim_prebuild.workspace_id;
    v_build := reinitd.next_build(claim_prebuild.workspace_id, new_owner_id, 'claim',
        CASE WHEN complete THEN 'succeeded' ELSE 'running' END);
    IF complete THEN
        PERFORM reinitd.announce(claim_prebuild.workspace_id, 'prebuild_claimed', new_owner_id);
    END IF;
    RETURN v_build;
END
$$;

CREATE FUNCTION reinitd.start_build(workspace_id uuid, initiator_id uuid) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM reinitd.lock_workspace(start_build.workspace_id);
    IF NOT EXISTS (SELECT 1 FROM reinitd.users WHERE id = start_build.initiator_id) THEN
        RAISE EXCEPTION 'reinitd.start_build: initiator % does not exist', initiator_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN reinitd.next_build(start_build.workspace_id, initiator_id, 'regular', 'running');
END
$$;

CREATE FUNCTION reinitd.complete_build(build_id uuid, error text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_build reinitd.workspace_builds;
    v_owner uuid;
BEGIN
    SELECT * INTO v_build FROM reinitd.workspace_builds WHERE id = build_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reinitd.complete_build: build % does not exist', build_id
            USING ERRCODE = 'no_data_found';
    END IF;
    v_owner := reinitd.lock_workspace(v_build.workspace_id);
    SELECT * INTO v_build FROM reinitd.workspace_builds WHERE id = build_id FOR UPDATE;
    IF v_build.status <> 'running' THEN
        RAISE EXCEPTION 'reinitd.complete_build: build % is already %', build_id, v_build.status
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE reinitd.workspace_builds
        SET status = CASE WHEN complete_build.error IS NULL THEN 'succeeded' ELSE 'failed' END,
            error = complete_build.error,
            completed_at = now()
        WHERE id = build_id;
    IF v_build.stage = 'claim' THEN
        IF complete_build.error IS NULL THEN
            PERFORM reinitd.announce(v_build.workspace_id, 'prebuild_claimed', v_owner);
        ELSE
            PERFORM reinitd.announce(v_build.workspace_id, 'claim_failed');
        END IF;
    END IF;
END
$$;

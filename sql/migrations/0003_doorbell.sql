-- A NOTIFY is a doorbell: its payload only names the workspace, and the server reads the
-- builds to learn what happened. The owner leaves the payload: any role that can connect may
-- LISTEN on the channel, so a payload must carry nothing a stranger should read.
-- (p_owner_id stays in the signature so that claim_prebuild and complete_build need no change.)
CREATE OR REPLACE FUNCTION reinitd.announce(p_workspace_id uuid, p_reason text,
                                            p_owner_id uuid DEFAULT NULL)
    RETURNS void LANGUAGE sql VOLATILE
    AS $$
        SELECT pg_notify('prebuild_claimed',
            format('{"workspace_id":"%s","reason":"%s"}', p_workspace_id, p_reason))
    $$;

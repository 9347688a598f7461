-- What the durable check reads about a workspace, defined once: its owner, who initiated
-- build 1, and its latest build. The server reads it for a batch of workspaces (doorbells and
-- resyncs), and for one agent's workspace together with the token lookup (one round trip per
-- connect). A plain view: PostgreSQL pushes the workspace predicate down into it.
CREATE VIEW reinitd.claim_state AS
SELECT w.id AS workspace_id,
       w.owner_id,
       first_build.initiator_id AS first_initiator_id,
       latest.stage AS latest_stage,
       latest.status AS latest_status,
       latest.error AS latest_error
FROM reinitd.workspaces AS w
LEFT JOIN reinitd.workspace_builds AS first_build
       ON first_build.workspace_id = w.id AND first_build.build_number = 1
LEFT JOIN LATERAL (
    SELECT b.stage, b.status, b.error
    FROM reinitd.workspace_builds AS b
    WHERE b.workspace_id = w.id
    ORDER BY b.build_number DESC
    LIMIT 1
) AS latest ON true;

REVOKE ALL ON reinitd.claim_state FROM PUBLIC;
GRANT SELECT ON reinitd.claim_state TO reinitd_server, reinitd_operator;

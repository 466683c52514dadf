-- v7: the shared Zoho access token (zoho/auth.py PgTokenStore; docs/security.md "Access tokens").
--
-- Zoho Accounts creates at most 10 access tokens per refresh token per 10 minutes and then
-- blocks creation for the rest of the window. Every process (HA replicas, CLI verbs) reads the
-- current token here and only one of them mints a new one (SELECT ... FOR UPDATE on the row).
-- key: sha256 of accounts URL, client id, client secret and refresh token (neither secret is
--   stored; a process with other credentials never gets the token).
-- access_token: valid for one hour; readable by whoever can read this table, so no privilege
--   on it is granted to anyone but the owner (the connector's role).
-- mints: creation times inside the last 10 minutes (the client-side budget, crm.token_budget).
-- blocked_until: Zoho answered "too many requests": nobody asks again before then.
CREATE TABLE {schema}.oauth_tokens (
    key           text PRIMARY KEY,
    access_token  text,
    api_domain    text,
    issued_at     timestamptz,
    expires_at    timestamptz,
    mints         timestamptz[] NOT NULL DEFAULT '{{}}',
    blocked_until timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON {schema}.oauth_tokens FROM PUBLIC;

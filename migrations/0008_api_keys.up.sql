-- API keys (eventfold-platform `auth::keys`): credentials of services and
-- scripts, sent as `x-api-key: KEY` or `authorization: ApiKey KEY`. The key
-- itself is never stored, only its SHA-256 (`key_hash`). A key is 32 bytes
-- from the operating system's CSPRNG (256 bits), so no guess or dictionary
-- can find it and a fast hash is the right one: a slow password hash
-- (argon2, bcrypt) protects guessable secrets, and here it would only slow
-- every verification down. `prefix` is the key's first characters
-- (`efk_` and 8 more), shown in lists so that a user can tell keys apart.
-- A revoked key keeps its row (`revoke_time` set): lists show it, and its
-- id, the subject `apikey:ID` of what it did, stays explained.
CREATE SCHEMA IF NOT EXISTS auth;

CREATE TABLE auth.api_keys (
    id            uuid PRIMARY KEY,
    name          text NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 128),
    key_hash      bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    prefix        text NOT NULL CHECK (octet_length(prefix) BETWEEN 1 AND 16),
    roles         text[] NOT NULL CHECK (cardinality(roles) BETWEEN 1 AND 32),
    create_time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Written at most once a minute per key (verification never waits for it).
    last_use_time timestamptz,
    revoke_time   timestamptz
);

-- ListApiKeys pages in creation order.
CREATE INDEX api_keys_by_create_time ON auth.api_keys (create_time, id);

-- The read side's bookkeeping: per projection and version, how far it has
-- applied the global log (updated in the same transaction as its read-model
-- rows), which version serves queries, and the events it had to park.
-- Read models themselves live in schema `read`, never beside the events.
CREATE SCHEMA IF NOT EXISTS projections;
CREATE SCHEMA IF NOT EXISTS read;

CREATE TABLE projections.checkpoints (
    name           text COLLATE "C" NOT NULL,
    version        integer NOT NULL,
    -- Every event up to this global position has been applied (or parked).
    position       bigint NOT NULL DEFAULT 0,
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (name, version)
);

-- The version whose tables the public views show.
CREATE TABLE projections.active (
    name        text COLLATE "C" PRIMARY KEY,
    version     integer NOT NULL,
    switched_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Events a projection failed to apply after its retries; it went on
-- without them. Replaying one applies it again and marks it replayed.
CREATE TABLE projections.parked (
    id              bigserial PRIMARY KEY,
    name            text COLLATE "C" NOT NULL,
    version         integer NOT NULL,
    global_position bigint NOT NULL,
    event_id        uuid NOT NULL,
    stream_id       text NOT NULL,
    event_type      text NOT NULL,
    error           text NOT NULL,
    attempts        integer NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    replayed_at     timestamptz,
    UNIQUE (name, version, global_position)
);

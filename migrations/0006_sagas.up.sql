-- Saga instances (eventfold-saga): one row per saga, with its progress
-- (`state`, the orchestrator's SagaState as JSON) and its own data, written
-- after every step with the version it read (a second orchestrator that
-- raced it fails instead of overwriting). The current step's due time and
-- deadline are stored, so a restart resumes retries and timeouts where they
-- stood. One saga per (type, correlation): a redelivered starting event
-- starts none.
CREATE SCHEMA IF NOT EXISTS saga;

CREATE TABLE saga.saga_instances (
    saga_id        text COLLATE "C" PRIMARY KEY,
    saga_type      text NOT NULL,
    correlation_id text COLLATE "C" NOT NULL,
    status         text NOT NULL,
    current_step   text,
    state          jsonb NOT NULL,
    data           jsonb NOT NULL,
    -- When the current step is due (after a retry's pause).
    due_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When the current step times out.
    deadline_at    timestamptz,
    version        bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (saga_type, correlation_id)
);

CREATE INDEX saga_instances_due ON saga.saga_instances (due_at)
    WHERE status IN ('RUNNING', 'COMPENSATING');
CREATE INDEX saga_instances_by_type ON saga.saga_instances (saga_type, status, created_at, saga_id);

-- Every step attempt and how it ended, in order.
CREATE TABLE saga.saga_steps (
    saga_id    text COLLATE "C" NOT NULL REFERENCES saga.saga_instances ON DELETE CASCADE,
    seq        integer NOT NULL,
    step       text NOT NULL,
    outcome    text NOT NULL,
    detail     text,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

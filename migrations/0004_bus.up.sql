-- The event bus's bookkeeping. The outbox relay's checkpoint moves only
-- after the broker acknowledged everything up to it. Kafka consumers keep
-- their partition offsets here, in the same transaction as their own
-- writes, and the last applied version per stream, which makes a
-- redelivered event (at-least-once) a no-op.
CREATE SCHEMA IF NOT EXISTS bus;

CREATE TABLE bus.relay_checkpoints (
    name       text COLLATE "C" PRIMARY KEY,
    -- Every event up to this global position is on the broker.
    position   bigint NOT NULL DEFAULT 0,
    produced   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE bus.consumer_offsets (
    consumer    text COLLATE "C" NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    partition   integer NOT NULL,
    -- The next offset to fetch.
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, topic, partition)
);

CREATE TABLE bus.consumer_streams (
    consumer  text COLLATE "C" NOT NULL,
    stream_id text COLLATE "C" NOT NULL,
    -- The stream version last applied by the consumer.
    version   bigint NOT NULL,
    PRIMARY KEY (consumer, stream_id)
);

-- Dead letters applied again (`eventfold dlq replay`), by their origin, so
-- that a replay applies each once (a consumer that crashed between sending
-- a dead letter and committing its offset sends it again: the dead-letter
-- topic may hold it twice).
CREATE TABLE bus.dead_letters_replayed (
    consumer    text COLLATE "C" NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    partition   integer NOT NULL,
    msg_offset  bigint NOT NULL,
    replayed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, topic, partition, msg_offset)
);

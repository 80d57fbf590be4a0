-- The events a generic Kafka consumer has handled, by event id (the
-- record's `event_id` header), inserted in the handler's transaction: the
-- relay delivers at least once, and a re-sent event arrives at a new
-- offset, so offsets alone cannot tell it was handled. Rows older than the
-- consumer's retention are deleted as it goes.
CREATE TABLE bus.consumer_events (
    consumer text COLLATE "C" NOT NULL,
    event_id uuid NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX consumer_events_seen_at ON bus.consumer_events (consumer, seen_at);

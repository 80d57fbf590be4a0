-- The catalog of topics (eventfold-topics): each topic's configuration,
-- its adapter and where its events are. `connection` may hold a password,
-- an account key or a SAS token: the TopicService never returns it and
-- never logs it, and this table is readable by the platform's role only.
-- Topics created at run time are reopened from here on every start. (Not
-- schema `eventfold`: a schema named like the connecting role comes first
-- in the default search_path, where the migration changelog is looked for.)
CREATE SCHEMA IF NOT EXISTS topic_catalog;

CREATE TABLE topic_catalog.topics (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    adapter     text NOT NULL CHECK (adapter IN ('memory', 'fs', 'postgres', 'blob')),
    spec        jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The event store: streams, the append-only event log, snapshots and the
-- AIP-155 request log of appends. Read models live in other schemas.
CREATE SCHEMA IF NOT EXISTS eventstore;

-- Global positions start at 1 and are handed out in call order (CACHE 1):
-- the gap-safe tail relies on "a lower position was allocated earlier".
CREATE SEQUENCE eventstore.global_position_seq AS bigint START WITH 1 CACHE 1;

CREATE TABLE eventstore.streams (
    stream_id        text PRIMARY KEY,
    -- Version of the last event (-1: no event yet). For a branch, the
    -- shared prefix counts: a branch at version 5 starts at version 5.
    version          bigint NOT NULL DEFAULT -1,
    -- Hash of the last link of the chain (NULL: empty stream).
    head_hash        bytea,
    first_position   bigint,
    last_position    bigint,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted_at       timestamptz,
    parent_stream_id text REFERENCES eventstore.streams (stream_id),
    parent_version   bigint,
    CHECK ((parent_stream_id IS NULL) = (parent_version IS NULL))
);

CREATE TABLE eventstore.events (
    global_position bigint PRIMARY KEY,
    stream_id       text NOT NULL,
    version         bigint NOT NULL,
    event_id        uuid NOT NULL UNIQUE,
    event_type      text NOT NULL,
    schema_version  integer NOT NULL,
    data            jsonb NOT NULL,
    metadata        jsonb NOT NULL,
    created_at      timestamptz NOT NULL,
    -- SHA-256 link: covers the previous link and this event's content.
    hash            bytea NOT NULL,
    -- The writing transaction; assigned before the position (see append).
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (stream_id, version)
);

CREATE INDEX events_type_position ON eventstore.events (event_type, global_position);

CREATE TABLE eventstore.snapshots (
    stream_id      text NOT NULL,
    version        bigint NOT NULL,
    schema_version integer NOT NULL,
    state          jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (stream_id, version)
);

CREATE TABLE eventstore.append_requests (
    request_id text PRIMARY KEY,
    stream_id  text NOT NULL,
    -- The first answer: {"first_version", "last_version", "positions"}.
    result     jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Appends a batch of appends (group commit) in one call and one transaction.
-- Each append is checked against its own expected version, so one append's
-- conflict never fails another. Arguments are parallel arrays: one entry per
-- append (p_*), then one entry per event (e_*), events of append i following
-- those of append i-1 (p_counts gives how many).
--
-- p_expected: -1 any, -2 no stream, -3 stream exists, >= 0 exact version.
-- e_content: SHA-256 of the event's canonical content, computed by the
-- client; the link is sha256(prev link || version || created_at micros ||
-- stream id || content), prev link of version 0 being 32 zero bytes.
--
-- Returns one row per append: status 'ok', 'duplicate' (a request id seen
-- before: the stored answer), 'wrong_version' (with the actual version),
-- 'deleted' or 'duplicate_event_id'.
CREATE FUNCTION eventstore.append_batch(
    p_streams     text[],
    p_expected    bigint[],
    p_request_ids text[],
    p_counts      integer[],
    e_ids         uuid[],
    e_types       text[],
    e_schema      integer[],
    e_data        jsonb[],
    e_metadata    jsonb[],
    e_content     bytea[],
    -- Look for already stored event ids first. Off on the hot path: the
    -- unique index rejects a duplicate anyway (the whole call fails), and the
    -- caller then repeats the call with the check on to fail only the
    -- offending append.
    p_check_event_ids boolean DEFAULT false
) RETURNS TABLE (
    idx            integer,
    status         text,
    first_version  bigint,
    last_version   bigint,
    actual_version bigint,
    positions      bigint[]
)
LANGUAGE plpgsql AS $$
DECLARE
    v_now       timestamptz;
    v_offset    integer := 0;
    v_count     integer;
    v_stream    text;
    v_expected  bigint;
    v_version   bigint;
    v_head      bytea;
    v_deleted   timestamptz;
    v_first_pos bigint;
    v_positions bigint[];
    v_hashes    bytea[];
    v_micros    bigint;
    v_pos       bigint;
    v_result    jsonb;
    v_dup       boolean;
    i           integer;
    j           integer;
BEGIN
    -- The transaction id must exist before any position is allocated: the
    -- gap-safe tail reasons "whoever holds a missing position got its
    -- transaction id before a later position was handed out".
    PERFORM pg_current_xact_id();

    -- Make sure every stream row exists, then lock them all, in id order so
    -- that concurrent batches cannot deadlock.
    INSERT INTO eventstore.streams (stream_id)
        SELECT DISTINCT s FROM unnest(p_streams) AS s ORDER BY 1
        ON CONFLICT (stream_id) DO NOTHING;
    PERFORM 1 FROM eventstore.streams
        WHERE stream_id = ANY (p_streams) ORDER BY stream_id FOR UPDATE;

    v_now := date_trunc('microseconds', clock_timestamp());
    v_micros := (extract(epoch FROM v_now) * 1000000)::bigint;

    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        v_stream := p_streams[i];
        v_expected := p_expected[i];
        v_count := p_counts[i];
        v_dup := false;

        IF p_request_ids[i] <> '' THEN
            INSERT INTO eventstore.append_requests (request_id, stream_id)
                VALUES (p_request_ids[i], v_stream)
                ON CONFLICT (request_id) DO NOTHING;
            IF NOT FOUND THEN
                SELECT r.result INTO v_result FROM eventstore.append_requests r
                    WHERE r.request_id = p_request_ids[i];
                IF v_result IS NOT NULL THEN
                    idx := i;
                    status := 'duplicate';
                    first_version := (v_result ->> 'first_version')::bigint;
                    last_version := (v_result ->> 'last_version')::bigint;
                    actual_version := NULL;
                    positions := ARRAY(SELECT jsonb_array_elements_text(v_result -> 'positions')::bigint);
                    RETURN NEXT;
                    v_offset := v_offset + v_count;
                    CONTINUE;
                END IF;
            END IF;
        END IF;

        SELECT s.version, s.head_hash, s.deleted_at INTO v_version, v_head, v_deleted
            FROM eventstore.streams s WHERE s.stream_id = v_stream;

        idx := i;
        first_version := NULL;
        last_version := NULL;
        actual_version := NULL;
        positions := NULL;

        IF v_deleted IS NOT NULL THEN
            status := 'deleted';
        ELSIF (v_expected = -2 AND v_version >= 0)
           OR (v_expected = -3 AND v_version < 0)
           OR (v_expected >= 0 AND v_expected <> v_version) THEN
            status := 'wrong_version';
            actual_version := v_version;
        ELSIF p_check_event_ids AND EXISTS (
                  SELECT 1 FROM unnest(e_ids[v_offset + 1 : v_offset + v_count]) AS n (id)
                  JOIN eventstore.events e ON e.event_id = n.id) THEN
            status := 'duplicate_event_id';
        ELSE
            status := 'ok';
        END IF;

        IF status <> 'ok' THEN
            IF p_request_ids[i] <> '' THEN
                DELETE FROM eventstore.append_requests WHERE request_id = p_request_ids[i] AND result IS NULL;
            END IF;
            RETURN NEXT;
            v_offset := v_offset + v_count;
            CONTINUE;
        END IF;

        IF v_head IS NULL THEN
            v_head := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
        END IF;
        first_version := v_version + 1;
        v_positions := ARRAY(SELECT nextval('eventstore.global_position_seq')
                             FROM generate_series(1, v_count));
        v_hashes := ARRAY[]::bytea[];
        FOR j IN 1 .. v_count LOOP
            v_version := v_version + 1;
            v_head := sha256(v_head || int8send(v_version) || int8send(v_micros)
                             || convert_to(v_stream, 'UTF8') || e_content[v_offset + j]);
            v_hashes := v_hashes || v_head;
        END LOOP;
        v_pos := v_positions[v_count];
        INSERT INTO eventstore.events (global_position, stream_id, version, event_id, event_type,
                                       schema_version, data, metadata, created_at, hash)
            SELECT u.pos, v_stream, first_version + u.ord - 1, u.id, u.typ, u.sv, u.dat, u.meta,
                   v_now, u.hash
            FROM unnest(v_positions,
                        e_ids[v_offset + 1 : v_offset + v_count],
                        e_types[v_offset + 1 : v_offset + v_count],
                        e_schema[v_offset + 1 : v_offset + v_count],
                        e_data[v_offset + 1 : v_offset + v_count],
                        e_metadata[v_offset + 1 : v_offset + v_count],
                        v_hashes)
                 WITH ORDINALITY AS u (pos, id, typ, sv, dat, meta, hash, ord);

        UPDATE eventstore.streams s SET
            version = v_version,
            head_hash = v_head,
            first_position = coalesce(s.first_position, v_positions[1]),
            last_position = v_pos,
            updated_at = v_now
        WHERE s.stream_id = v_stream;

        last_version := v_version;
        positions := v_positions;
        IF p_request_ids[i] <> '' THEN
            UPDATE eventstore.append_requests SET result = jsonb_build_object(
                'first_version', first_version, 'last_version', last_version,
                'positions', to_jsonb(v_positions))
            WHERE request_id = p_request_ids[i];
        END IF;
        RETURN NEXT;
        v_offset := v_offset + v_count;
    END LOOP;

    -- Rows made only to be locked, for appends that failed, go again.
    DELETE FROM eventstore.streams s
        WHERE s.stream_id = ANY (p_streams) AND s.version = -1 AND s.parent_stream_id IS NULL;

    IF v_pos IS NOT NULL THEN
        PERFORM pg_notify('eventstore_appended', v_pos::text);
    END IF;
END;
$$;

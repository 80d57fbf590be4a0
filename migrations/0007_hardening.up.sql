-- Hardening against hostile requests (issue 13).
--
-- Snapshots: a snapshot records the stream's hash-chain link at its version
-- (readers use it only while the chain still has that link there), and
-- lives in a namespace: 'client' for snapshots saved through the public
-- API, 'aggregate' for the command side's own, which never loads a client's.
-- Snapshots saved before this migration have no link and are client ones:
-- the command side folds those streams from their events and snapshots
-- them anew.
ALTER TABLE eventstore.snapshots
    ADD COLUMN namespace text NOT NULL DEFAULT 'client' CHECK (namespace IN ('client', 'aggregate')),
    ADD COLUMN head_hash bytea;
ALTER TABLE eventstore.snapshots DROP CONSTRAINT snapshots_pkey;
ALTER TABLE eventstore.snapshots ADD PRIMARY KEY (stream_id, namespace, version);

-- AIP-155 request ids: unique per scope ('stream/<id>' for raw appends,
-- 'command/<service>/<principal>' for commands), stored with a fingerprint
-- of the request they answered, and forgotten after a retention period
-- (created_at is indexed for the pruning).
ALTER TABLE eventstore.append_requests
    ADD COLUMN scope text COLLATE "C",
    ADD COLUMN fingerprint bytea;
UPDATE eventstore.append_requests SET scope = 'stream/' || stream_id;
ALTER TABLE eventstore.append_requests ALTER COLUMN scope SET NOT NULL;
ALTER TABLE eventstore.append_requests DROP CONSTRAINT append_requests_pkey;
ALTER TABLE eventstore.append_requests ADD PRIMARY KEY (scope, request_id);
CREATE INDEX append_requests_created_at ON eventstore.append_requests (created_at);

DROP FUNCTION eventstore.append_batch(text[], bigint[], text[], integer[], uuid[], text[], integer[], jsonb[],
                                      jsonb[], bytea[], boolean);

-- Appends a batch of appends (group commit) in one call and one transaction.
-- Each append is checked against its own expected version, so one append's
-- conflict never fails another; appends to the same stream within a batch
-- apply in batch order. Arguments are parallel arrays: one entry per append
-- (p_*), then one entry per event (e_*), events of append i following those
-- of append i-1 (p_counts gives how many, at least 1).
--
-- p_expected: -1 any, -2 no stream, -3 stream exists, >= 0 exact version.
-- e_content: SHA-256 of the event's canonical content, computed by the
-- client; the link is sha256(prev link || version || created_at micros ||
-- stream id || content), prev link of version 0 being 32 zero bytes.
--
-- p_scopes / p_fingerprints: per append, where its request id is unique and
-- what identifies the request (AIP-155); a request id seen before in the
-- same scope with another fingerprint is refused ('request_reused'), never
-- answered with the other request's result.
--
-- Returns one row per append: status 'ok', 'duplicate' (a request id seen
-- before: the first answer, with the stream it appended to in
-- stored_stream), 'request_reused', 'wrong_version' (with the actual
-- version), 'deleted' or 'duplicate_event_id'.
--
-- Set-based: a fixed handful of statements per batch whatever its size (the
-- checks and the hash chain run over arrays in memory). Waking subscribers
-- is the caller's job, after the commit: a NOTIFY here would hold a
-- cluster-wide lock until the commit is flushed and serialise all writers.
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
    p_check_event_ids boolean DEFAULT false,
    p_scopes       text[] DEFAULT NULL,
    p_fingerprints bytea[] DEFAULT NULL
) RETURNS TABLE (
    idx            integer,
    status         text,
    first_version  bigint,
    last_version   bigint,
    actual_version bigint,
    positions      bigint[],
    stored_stream  text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n_appends  constant integer := coalesce(array_length(p_streams, 1), 0);
    n_events   constant integer := coalesce(array_length(e_ids, 1), 0);
    zero_link  constant bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    -- The batch's streams (sorted) and their state as the batch proceeds.
    s_ids      text[];
    s_version  bigint[];
    s_head     bytea[];
    s_deleted  boolean[];
    s_new      text[] := '{}';  -- stream rows made by this batch
    -- Per append: the answer.
    a_status   text[] := array_fill(NULL::text, ARRAY[n_appends]);
    a_first    bigint[] := array_fill(NULL::bigint, ARRAY[n_appends]);
    a_last     bigint[] := array_fill(NULL::bigint, ARRAY[n_appends]);
    a_actual   bigint[] := array_fill(NULL::bigint, ARRAY[n_appends]);
    a_pfrom    integer[] := array_fill(NULL::integer, ARRAY[n_appends]);
    a_pto      integer[] := array_fill(NULL::integer, ARRAY[n_appends]);
    a_stored   jsonb[] := array_fill(NULL::jsonb, ARRAY[n_appends]);
    a_stream   text[] := array_fill(NULL::text, ARRAY[n_appends]);
    -- Per event: where it goes (NULL version: not written).
    e_stream   text[] := array_fill(NULL::text, ARRAY[n_events]);
    e_version  bigint[] := array_fill(NULL::bigint, ARRAY[n_events]);
    e_hash     bytea[] := array_fill(NULL::bytea, ARRAY[n_events]);
    -- Per append: its request key (scope, unit separator, request id; ''
    -- without a request id) and fingerprint.
    k_keys     text[] := array_fill(''::text, ARRAY[n_appends]);
    k_prints   bytea[] := array_fill(NULL::bytea, ARRAY[n_appends]);
    -- Request keys seen before, with their stored answers.
    r_claimed  text[] := '{}';
    r_seen     text[] := '{}';
    r_results  jsonb[] := '{}';
    r_prints   bytea[] := '{}';
    r_streams  text[] := '{}';
    v_requests constant boolean := array_to_string(p_request_ids, '') <> '';
    v_seen_ids uuid[] := '{}';
    v_positions bigint[];
    v_written  integer := 0;
    v_failed   boolean := false;
    v_now      timestamptz;
    v_micros   bigint;
    v_offset   integer := 0;
    v_count    integer;
    v_stream   text;
    v_expected bigint;
    v_version  bigint;
    v_head     bytea;
    v_tail     bytea;
    v_request  text;
    i integer;
    j integer;
    k integer;
    attempt integer;
BEGIN
    -- The transaction id must exist before any position is allocated: the
    -- gap-safe tail reasons "whoever holds a missing position got its
    -- transaction id before a later position was handed out".
    PERFORM pg_current_xact_id();

    -- Lock the batch's streams in id order (concurrent batches cannot
    -- deadlock on existing streams); make the missing ones and lock again.
    -- Statements are few on purpose: each costs far more than the
    -- in-memory work on arrays.
    FOR attempt IN 1 .. 2 LOOP
        SELECT coalesce(array_agg(l.stream_id ORDER BY l.stream_id), '{}'),
               array_agg(l.version ORDER BY l.stream_id), array_agg(l.head_hash ORDER BY l.stream_id),
               array_agg(l.deleted_at IS NOT NULL ORDER BY l.stream_id)
          INTO s_ids, s_version, s_head, s_deleted
          FROM (SELECT t.stream_id, t.version, t.head_hash, t.deleted_at FROM eventstore.streams t
                WHERE t.stream_id = ANY (p_streams) ORDER BY t.stream_id FOR UPDATE) AS l;
        EXIT WHEN attempt = 2 OR cardinality(s_ids) = n_appends;
        FOR i IN 1 .. n_appends LOOP
            IF array_position(s_ids, p_streams[i]) IS NULL AND array_position(s_new, p_streams[i]) IS NULL THEN
                s_new := s_new || p_streams[i];
            END IF;
        END LOOP;
        EXIT WHEN cardinality(s_new) = 0;
        WITH made AS (
            INSERT INTO eventstore.streams (stream_id) SELECT n FROM unnest(s_new) AS n ORDER BY 1
            ON CONFLICT (stream_id) DO NOTHING RETURNING stream_id)
        SELECT coalesce(array_agg(stream_id), '{}') INTO s_new FROM made;
    END LOOP;

    IF v_requests THEN
        FOR i IN 1 .. n_appends LOOP
            IF p_request_ids[i] <> '' THEN
                k_keys[i] := coalesce(p_scopes[i], 'stream/' || p_streams[i]) || chr(31) || p_request_ids[i];
                k_prints[i] := p_fingerprints[i];
            END IF;
        END LOOP;
        -- Claim the new request ids; the others were answered before (a
        -- claim is made and answered, or removed, in one transaction). The
        -- stored answers are read by a second statement: its snapshot sees a
        -- claim whose transaction committed while this INSERT waited on it.
        WITH claimed AS (
            INSERT INTO eventstore.append_requests (scope, request_id, stream_id, fingerprint)
            SELECT split_part(k, chr(31), 1), split_part(k, chr(31), 2), s, f
              FROM unnest(k_keys, p_streams, k_prints) AS u (k, s, f) WHERE k <> ''
            ON CONFLICT (scope, request_id) DO NOTHING RETURNING scope || chr(31) || request_id AS k)
        SELECT coalesce(array_agg(k), '{}') INTO r_claimed FROM claimed;
        -- Only when some key was not claimed (a repeat): looked up by
        -- primary key (a join on the split keys, not a comparison of
        -- concatenations, which would scan the whole table).
        IF cardinality(r_claimed) < (SELECT count(DISTINCT x.k) FROM unnest(k_keys) AS x (k) WHERE x.k <> '') THEN
            SELECT coalesce(array_agg(u.k), '{}'), coalesce(array_agg(q.result), '{}'),
                   coalesce(array_agg(q.fingerprint), '{}'), coalesce(array_agg(q.stream_id), '{}')
              INTO r_seen, r_results, r_prints, r_streams
              FROM (SELECT DISTINCT x.k FROM unnest(k_keys) AS x (k)
                     WHERE x.k <> '' AND NOT x.k = ANY (r_claimed)) AS u
              JOIN eventstore.append_requests q
                ON q.scope = split_part(u.k, chr(31), 1) AND q.request_id = split_part(u.k, chr(31), 2);
        END IF;
    END IF;
    IF p_check_event_ids THEN
        SELECT coalesce(array_agg(e.event_id), '{}') INTO v_seen_ids
          FROM eventstore.events e WHERE e.event_id = ANY (e_ids);
    END IF;

    v_now := date_trunc('microseconds', clock_timestamp());
    v_micros := (extract(epoch FROM v_now) * 1000000)::bigint;

    FOR i IN 1 .. n_appends LOOP
        v_count := p_counts[i];
        v_stream := p_streams[i];
        v_expected := p_expected[i];
        v_request := k_keys[i];
        IF v_request <> '' THEN
            k := array_position(r_seen, v_request);
            IF k IS NOT NULL AND r_results[k] IS NOT NULL THEN
                IF r_prints[k] IS NOT NULL AND r_prints[k] IS DISTINCT FROM k_prints[i] THEN
                    a_status[i] := 'request_reused';
                    v_failed := true;
                ELSE
                    a_status[i] := 'duplicate';
                    a_stored[i] := r_results[k];
                    a_stream[i] := r_streams[k];
                END IF;
                v_offset := v_offset + v_count;
                CONTINUE;
            END IF;
            -- The same request earlier in this batch: the answer of the
            -- occurrence that succeeded.
            j := array_position(k_keys, v_request);
            WHILE j < i AND a_status[j] NOT IN ('ok', 'duplicate') LOOP
                j := array_position(k_keys, v_request, j + 1);
            END LOOP;
            IF j < i AND k_prints[j] IS DISTINCT FROM k_prints[i] THEN
                a_status[i] := 'request_reused';
                v_failed := true;
                v_offset := v_offset + v_count;
                CONTINUE;
            END IF;
            IF j < i THEN
                a_stream[i] := coalesce(a_stream[j], p_streams[j]);
                a_status[i] := 'duplicate';
                a_first[i] := a_first[j];
                a_last[i] := a_last[j];
                a_pfrom[i] := a_pfrom[j];
                a_pto[i] := a_pto[j];
                a_stored[i] := a_stored[j];
                v_offset := v_offset + v_count;
                CONTINUE;
            END IF;
        END IF;

        k := array_position(s_ids, v_stream);
        IF k IS NULL THEN
            -- Cannot happen (every stream row exists and is locked above);
            -- a serialization failure makes the caller retry the batch.
            RAISE EXCEPTION 'stream % of the batch is not locked', v_stream USING ERRCODE = '40001';
        END IF;
        v_version := s_version[k];
        IF s_deleted[k] THEN
            a_status[i] := 'deleted';
        ELSIF (v_expected = -2 AND v_version >= 0)
           OR (v_expected = -3 AND v_version < 0)
           OR (v_expected >= 0 AND v_expected <> v_version) THEN
            a_status[i] := 'wrong_version';
            a_actual[i] := v_version;
        ELSIF p_check_event_ids AND e_ids[v_offset + 1 : v_offset + v_count] && v_seen_ids THEN
            a_status[i] := 'duplicate_event_id';
        ELSE
            a_status[i] := 'ok';
        END IF;
        IF a_status[i] <> 'ok' THEN
            v_failed := true;
            v_offset := v_offset + v_count;
            CONTINUE;
        END IF;

        v_head := coalesce(s_head[k], zero_link);
        a_first[i] := v_version + 1;
        a_pfrom[i] := v_written + 1;
        v_tail := int8send(v_micros) || convert_to(v_stream, 'UTF8');
        FOR j IN v_offset + 1 .. v_offset + v_count LOOP
            v_version := v_version + 1;
            v_head := sha256(v_head || int8send(v_version) || v_tail || e_content[j]);
            e_stream[j] := v_stream;
            e_version[j] := v_version;
            e_hash[j] := v_head;
        END LOOP;
        v_written := v_written + v_count;
        a_last[i] := v_version;
        a_pto[i] := v_written;
        s_version[k] := v_version;
        s_head[k] := v_head;
        IF p_check_event_ids THEN
            v_seen_ids := v_seen_ids || e_ids[v_offset + 1 : v_offset + v_count];
        END IF;
        v_offset := v_offset + v_count;
    END LOOP;

    IF v_written > 0 THEN
        -- Positions come from the column default, taken row by row in the
        -- order of the arrays, so they ascend through the batch.
        WITH written AS (
            INSERT INTO eventstore.events (stream_id, version, event_id, event_type, schema_version,
                                           data, metadata, created_at, hash)
            SELECT u.stream, u.ver, u.id, u.typ, u.sv, u.dat, u.meta, v_now, u.hash
              FROM unnest(e_stream, e_version, e_ids, e_types, e_schema, e_data, e_metadata, e_hash)
                   AS u (stream, ver, id, typ, sv, dat, meta, hash)
             WHERE u.ver IS NOT NULL
            RETURNING global_position, stream_id
        ), spans AS (
            SELECT w.stream_id, min(w.global_position) AS lo, max(w.global_position) AS hi
              FROM written w GROUP BY w.stream_id
        ), moved AS (
            UPDATE eventstore.streams t SET
                version = u.ver,
                head_hash = u.head,
                first_position = coalesce(t.first_position, p.lo),
                last_position = p.hi,
                updated_at = v_now
              FROM unnest(s_ids, s_version, s_head) AS u (id, ver, head)
              JOIN spans p ON p.stream_id = u.id
             WHERE t.stream_id = u.id
        )
        SELECT array_agg(w.global_position ORDER BY w.global_position) INTO v_positions FROM written w;
    END IF;

    IF v_requests THEN
        IF v_written > 0 THEN
            UPDATE eventstore.append_requests q SET result = jsonb_build_object(
                'first_version', u.f, 'last_version', u.l, 'positions', to_jsonb(v_positions[u.pf : u.pt]))
              FROM unnest(k_keys, a_status, a_first, a_last, a_pfrom, a_pto) AS u (r, st, f, l, pf, pt)
             WHERE u.st = 'ok' AND u.r <> ''
               AND q.scope = split_part(u.r, chr(31), 1) AND q.request_id = split_part(u.r, chr(31), 2);
        END IF;
        IF v_failed THEN
            DELETE FROM eventstore.append_requests q
             USING unnest(r_claimed) AS u (k)
             WHERE q.scope = split_part(u.k, chr(31), 1) AND q.request_id = split_part(u.k, chr(31), 2)
               AND q.result IS NULL;
        END IF;
    END IF;

    -- Rows made only to be locked, for appends that failed, go again.
    IF v_failed AND cardinality(s_new) > 0 THEN
        DELETE FROM eventstore.streams t
         WHERE t.stream_id = ANY (s_new) AND t.version = -1 AND t.parent_stream_id IS NULL;
    END IF;

    FOR i IN 1 .. n_appends LOOP
        idx := i;
        status := a_status[i];
        actual_version := a_actual[i];
        stored_stream := a_stream[i];
        IF a_stored[i] IS NOT NULL THEN
            first_version := (a_stored[i] ->> 'first_version')::bigint;
            last_version := (a_stored[i] ->> 'last_version')::bigint;
            positions := ARRAY(SELECT jsonb_array_elements_text(a_stored[i] -> 'positions')::bigint);
        ELSE
            first_version := a_first[i];
            last_version := a_last[i];
            IF a_pfrom[i] IS NULL THEN
                positions := NULL;
            ELSE
                positions := v_positions[a_pfrom[i] : a_pto[i]];
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

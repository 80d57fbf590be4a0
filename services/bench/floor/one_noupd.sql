WITH locked AS (SELECT t.stream_id, t.version, t.head_hash, t.deleted_at FROM eventstore.streams t WHERE t.stream_id = ANY (ARRAY['s-' || :client_id]) ORDER BY t.stream_id FOR UPDATE),
ok AS (SELECT pg_current_xact_id() IS NOT NULL AND count(*) = 1 AS ok FROM locked l),
written AS (INSERT INTO eventstore.events (stream_id, version, event_id, event_type, schema_version, data, metadata, created_at, hash)
  SELECT u.s, u.v, u.id, u.t, u.sv, u.d, u.m, now(), u.h FROM unnest(ARRAY['s-' || :client_id], ARRAY[nextval('floor_version')], ARRAY[gen_random_uuid()], ARRAY['OrderCreated'], ARRAY[1], ARRAY['{"order_id":"abc","amount":100,"items":[1,2,3]}'::jsonb], ARRAY['{"correlation_id":"x"}'::jsonb], ARRAY[sha256('x')]) AS u(s, v, id, t, sv, d, m, h)
  WHERE (SELECT ok FROM ok) RETURNING global_position, stream_id, version)

SELECT (SELECT ok FROM ok), array_agg(global_position) FROM written;

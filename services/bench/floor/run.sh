#!/usr/bin/env bash
# What PostgreSQL itself spends on one single-event append of each shape, with
# no client work: pgbench, prepared statements, 5 s per shape and client count,
# two rounds interleaved. Beside `eventfold-bench append`, this is the floor a
# path can reach (docs/benchmarks.md, "Issue 21 (performance): the append path
# in Rust").
#
#   services/bench/floor/run.sh postgresql://postgres@127.0.0.1:55432/postgres
#
# The URL's server gets a database `floor` (dropped and made again) with the
# migrations applied by psql, and the raw tables the shapes write to.
set -euo pipefail
url=${1:?a PostgreSQL URL of a throw-away server}
here=$(cd "$(dirname "$0")" && pwd)
migrations=$(cd "$here/../../../migrations" && pwd)
base=${url%/*}
psql -q "$url" -c "DROP DATABASE IF EXISTS floor" -c "CREATE DATABASE floor"
db="$base/floor"
for m in "$migrations"/0*.up.sql; do psql -q -v ON_ERROR_STOP=1 "$db" -f "$m"; done
psql -q -v ON_ERROR_STOP=1 "$db" <<'SQL'
CREATE SEQUENCE floor_version;
CREATE TABLE floor_raw (global_position bigserial PRIMARY KEY, stream_id text, version bigint, event_id uuid,
    event_type text, data jsonb, metadata jsonb, created_at timestamptz DEFAULT now(), UNIQUE (stream_id, version));
CREATE TABLE floor_events_shaped (global_position bigserial PRIMARY KEY, stream_id text COLLATE "C", version bigint,
    event_id uuid UNIQUE, event_type text, data jsonb, metadata jsonb, created_at timestamptz DEFAULT now(),
    hash bytea, UNIQUE (stream_id, version));
INSERT INTO eventstore.streams (stream_id) SELECT 's-' || g FROM generate_series(0, 63) g;  -- pgbench's client ids start at 0
SQL
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
for round in 1 2; do
  for clients in 1 8; do
    for shape in raw raw3 one_noupd one fn; do
      psql -q "$db" -c "TRUNCATE eventstore.events, floor_raw, floor_events_shaped; \
        UPDATE eventstore.streams SET version = -1, head_hash = NULL, first_position = NULL, last_position = NULL; \
        CHECKPOINT" >/dev/null
      out=$("$pgbench" -n -M prepared -c "$clients" -j 2 -T 5 -f "$here/$shape.sql" "$db" 2>&1)
      latency=$(awk '/latency average/ {print $4}' <<<"$out")
      done_=$(awk '/actually processed/ {print $NF}' <<<"$out")
      case $shape in raw) table=floor_raw ;; raw3) table=floor_events_shaped ;; *) table=eventstore.events ;; esac
      rows=$(psql -Atq "$db" -c "SELECT count(*) FROM $table")
      # A shape that wrote fewer rows than it ran transactions did not append.
      echo "round $round, $clients clients, $shape: $latency ms ($done_ transactions, $rows rows written)"
    done
  done
done

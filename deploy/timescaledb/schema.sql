-- deploy/timescaledb/schema.sql: the vietmarket candle store on TimescaleDB.
--
-- Apply it through pgleader, as the runbook does (psql, not a driver: the file uses psql
-- meta-commands):
--
--   psql "postgres://vietmarket:vietmarket@<node>:5433/vietmarket?sslmode=disable" \
--        -f deploy/timescaledb/schema.sql
--
-- Requirements
--   * TimescaleDB 2.11 or newer (2.x API). 2.11 is the first release that fires row triggers
--     for rows written into compressed chunks (and takes INSERT .. ON CONFLICT DO UPDATE and
--     UPDATE on them); on older releases a late candle or a rewrite landing in a compressed
--     chunk would be refused or would bypass candles_latest. create_hypertable uses the
--     legacy signature, which 2.11 needs and later 2.x releases still accept.
--   * PostgreSQL 13+ (what TimescaleDB 2.11 supports); tested on 15.
--   * Everything lives in schema public, named explicitly, so the trigger does not depend on
--     the writer's search_path.
--
-- Idempotent: every statement creates-if-missing, replaces with an identical definition, or
-- is guarded, so applying the file again changes nothing (tests compare pg_dump
-- --schema-only after the first and second apply). It runs in one transaction: on any error
-- nothing is left behind (ON_ERROR_STOP is set below, so psql also exits non-zero).
--
-- Test-only opt-out: `psql -v skip_timescaledb=1 ...` applies only the plain PostgreSQL part
-- (tables, constraints, functions, trigger, indexes) so tests can run it on a server without
-- TimescaleDB. Never use it in production: candles would be a plain table, never chunked or
-- compressed. Without the variable, a server lacking TimescaleDB fails the whole file and
-- nothing is created. A value psql cannot read as a boolean counts as false (psql reports
-- it), i.e. it never skips.

\set ON_ERROR_STOP on

\if :{?skip_timescaledb}
\else
\set skip_timescaledb false
\endif

BEGIN;

\if :skip_timescaledb
\echo 'schema.sql: skip_timescaledb is set: plain PostgreSQL part only (TESTS ONLY, not for production)'
\else
-- Errors (and rolls the whole file back) when the server does not have TimescaleDB.
CREATE EXTENSION IF NOT EXISTS timescaledb;
\endif

-- One row per (ticker, timeframe, bar start).
--
-- Prices are numeric, not double precision: quotes are decimal (VND ticks, index points with
-- two decimals) and must round-trip exactly, so a chart, a backtest and the exchange agree
-- to the last digit and equality/CHECK comparisons never meet binary rounding. The price is
-- a worse fit for TimescaleDB's Gorilla float compression, an accepted cost at candle volume
-- (a few thousand tickers, a few rows per bar). Volume is bigint: shares and contracts are
-- whole units, and integers compress well (delta-of-delta).
CREATE TABLE IF NOT EXISTS public.candles (
    ticker text    NOT NULL,
    tf     text    NOT NULL,
    ts     bigint  NOT NULL,  -- bar start, epoch milliseconds UTC
    open   numeric NOT NULL,
    high   numeric NOT NULL,
    low    numeric NOT NULL,
    close  numeric NOT NULL,
    volume bigint  NOT NULL,
    -- Includes the time column, as a hypertable requires of every unique index, and only
    -- segment-by and order-by columns, as compression requires of unique constraints. It
    -- also serves chart paging: WHERE ticker = $1 AND tf = $2 AND ts < $3 ORDER BY ts DESC
    -- LIMIT n is a backward scan of this index, so no second (ticker, tf, ts DESC) index is
    -- kept to slow down every write.
    CONSTRAINT candles_pkey PRIMARY KEY (ticker, tf, ts),
    CONSTRAINT candles_ticker_check CHECK (ticker <> '' AND ticker !~ '[[:space:]]'),
    -- A count and a unit: s, m(inute), h, d, w, M(onth); e.g. '1m', '15m', '1h', '1d'.
    CONSTRAINT candles_tf_check CHECK (tf ~ '^[1-9][0-9]*[smhdwM]$'),
    -- Epoch milliseconds between 1973-03-03 and 2286-11-20. An epoch-seconds value (any
    -- date before the year 5138) is below the floor and a microseconds value above the
    -- ceiling, so a unit mix-up is rejected instead of stored.
    CONSTRAINT candles_ts_check CHECK (ts >= 100000000000 AND ts < 10000000000000),
    -- low > 0 rules out zero, negatives and -Infinity; high < 'Infinity' rules out +Infinity
    -- and NaN (PostgreSQL sorts NaN above Infinity), and since every price lies between low
    -- and high, none of them can be NaN or infinite either.
    CONSTRAINT candles_price_check CHECK (
        low > 0 AND high < 'Infinity'
        AND low <= open AND low <= close
        AND high >= open AND high >= close),
    CONSTRAINT candles_volume_check CHECK (volume >= 0)
);

-- One row per (ticker, tf): the candle with the greatest ts. Derived only from rows that
-- passed candles' constraints, so it repeats NOT NULL but not the CHECKs.
CREATE TABLE IF NOT EXISTS public.candles_latest (
    ticker text    NOT NULL,
    tf     text    NOT NULL,
    ts     bigint  NOT NULL,
    open   numeric NOT NULL,
    high   numeric NOT NULL,
    low    numeric NOT NULL,
    close  numeric NOT NULL,
    volume bigint  NOT NULL,
    CONSTRAINT candles_latest_pkey PRIMARY KEY (ticker, tf)
);

-- The cross-sectional query: the latest bar of every ticker for one timeframe
-- (WHERE tf = $1 ORDER BY ticker). The primary key leads with ticker, so it cannot serve it.
CREATE INDEX IF NOT EXISTS candles_latest_tf_ticker_idx ON public.candles_latest (tf, ticker);

-- The integer-now function TimescaleDB needs for an integer time column: without it,
-- add_compression_policy is accepted but its job fails on every run and compresses nothing.
-- No arguments, returns the column's type (bigint epoch ms), STABLE (now() is fixed for the
-- transaction), as set_integer_now_func requires.
CREATE OR REPLACE FUNCTION public.candles_now_ms() RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::bigint $$;

-- Keeps candles_latest at the newest candle of each (ticker, tf).
--
-- Older never replaces newer: the upsert's WHERE only lets a candle with ts >= the stored one
-- through; an equal ts is a rewrite of the latest bar and must land.
--
-- Concurrent writers: the INSERT .. ON CONFLICT DO UPDATE locks the candles_latest row (or,
-- for a brand-new (ticker, tf), waits on the other writer's speculative insert). A second
-- writer blocks until the first commits, then re-evaluates the WHERE against the committed
-- row, so a check-then-write race that lets an older candle overwrite a newer one cannot
-- happen. (Under REPEATABLE READ or SERIALIZABLE the loser gets a serialization failure to
-- retry instead.)
--
-- Not handled, by design: deleting candles, or an UPDATE that moves the latest bar to an older
-- ts or to another (ticker, tf), does not recompute candles_latest; such repairs rebuild it
-- from candles explicitly.
CREATE OR REPLACE FUNCTION public.candles_latest_sync() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO public.candles_latest AS cur (ticker, tf, ts, open, high, low, close, volume)
    VALUES (NEW.ticker, NEW.tf, NEW.ts, NEW.open, NEW.high, NEW.low, NEW.close, NEW.volume)
    ON CONFLICT (ticker, tf) DO UPDATE
        SET ts     = EXCLUDED.ts,
            open   = EXCLUDED.open,
            high   = EXCLUDED.high,
            low    = EXCLUDED.low,
            close  = EXCLUDED.close,
            volume = EXCLUDED.volume
        WHERE EXCLUDED.ts >= cur.ts;
    RETURN NULL;
END
$$;

-- AFTER INSERT OR UPDATE: an INSERT .. ON CONFLICT DO UPDATE that hits an existing candle
-- fires the UPDATE trigger, not the INSERT one. DROP + CREATE rather than CREATE OR REPLACE
-- TRIGGER, which fails on a hypertable with chunks before TimescaleDB 2.12
-- (timescale/timescaledb#6319); inside this transaction no write can slip between the two.
DROP TRIGGER IF EXISTS candles_latest_sync ON public.candles;
CREATE TRIGGER candles_latest_sync
    AFTER INSERT OR UPDATE ON public.candles
    FOR EACH ROW EXECUTE FUNCTION public.candles_latest_sync();

\if :skip_timescaledb
\else
-- 7-day chunks: 604800000 ms (for a bigint column the default is only 1,000,000 units, a
-- chunk every 17 minutes). No default (ts DESC) index: every query names ticker and tf, which
-- the primary key serves, and chunk exclusion works from chunk constraints, not indexes.
SELECT create_hypertable('public.candles', 'ts',
    chunk_time_interval => 604800000::bigint,
    create_default_indexes => false,
    if_not_exists => true);

SELECT set_integer_now_func('public.candles', 'public.candles_now_ms', replace_if_exists => true);

-- TimescaleDB before 2.14 refuses ALTER TABLE .. SET (timescaledb.compress ..) once any chunk
-- is compressed, even with identical settings (timescale/timescaledb#6137), so it only runs
-- while compression is off. (2.14 and later accept it and keep each compressed chunk on the
-- settings it was compressed with; the tests saw 2.23 do so.) A later change of these
-- settings is a migration, not a re-apply: before 2.14 decompress first; from 2.14 only
-- chunks compressed afterwards use the new settings.
SELECT NOT compression_enabled AS candles_enable_compression
  FROM timescaledb_information.hypertables
 WHERE hypertable_schema = 'public' AND hypertable_name = 'candles'
\gset
\if :candles_enable_compression
ALTER TABLE public.candles SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'ticker, tf',
    timescaledb.compress_orderby = 'ts DESC');
\endif

-- Compress chunks whose data is older than 14 days (1209600000 ms) by candles_now_ms().
-- if_not_exists leaves an existing policy alone (with a warning if its settings differ).
SELECT add_compression_policy('public.candles',
    compress_after => 1209600000::bigint,
    if_not_exists => true);
\endif

COMMIT;

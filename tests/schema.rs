//! `deploy/timescaledb/schema.sql` against real servers, and its TimescaleDB calls against
//! PostgreSQL's own parser.
//!
//! What runs where:
//! - **Real PostgreSQL 15** (one `common::pg::PgNode` per test, no TimescaleDB): the plain part
//!   of the file, applied with psql exactly as shipped plus the test-only opt-out
//!   `-v skip_timescaledb=1`. Checked: latest-row semantics (in order, out of order, upserts
//!   and updates rewriting the latest bar), concurrent writers on two real connections with
//!   deterministically interleaved transactions plus a randomized two-writer run, constraint
//!   violations with their SQLSTATEs, idempotency (`pg_dump --schema-only` identical after
//!   the first and second apply), the planner serving chart paging and the cross-sectional
//!   query from indexes, the integer-now function, and that a *normal* apply on a server
//!   without TimescaleDB fails and leaves nothing behind.
//! - **Through pgleader** (`common::proxy::ProxyBuilder`): the file applied with psql via the
//!   proxy's port, as the runbook does.
//! - **TimescaleDB** ([`timescaledb`], `tests/schema/timescaledb.rs`): the whole file, as
//!   shipped, on a PGlite engine with TimescaleDB 2.23 from npm (`tests/timescaledb/`), or on
//!   the server `TIMESCALEDB_URL` names: applied twice, its settings read back from
//!   TimescaleDB's views, the trigger on the hypertable, the compression policy's job and late
//!   candles into a compressed chunk. What only a server can do is an `#[ignore]`d test that
//!   runs there; nothing is skipped by passing.
//! - **PostgreSQL's parser** (`timescale_calls_parse_as_intended`): parses the file with the
//!   real PostgreSQL grammar (`pg_query`) and checks each TimescaleDB call and its arguments,
//!   the integer-now function the file registers, and the `\if` structure (TimescaleDB
//!   statements only on the normal path, everything else on both). psql meta-commands are not
//!   SQL, so the file is cut into segments at every line that starts with a backslash and each
//!   segment is parsed on its own; a backslash anywhere else fails the test, so nothing can
//!   hide from the parser.

mod common;
#[path = "schema/timescaledb.rs"]
mod timescaledb;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::pg::{pg_bin, PgNode};
use pg_query::protobuf::{self, a_const};
use pg_query::{NodeEnum, NodeRef};
use tokio_postgres::Client;

/// Every test here works in the node's default database.
const DB: &str = "postgres";
/// 2023-11-14T22:13:20Z in epoch ms: an arbitrary bar start inside `candles_ts_check`.
const T0: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

fn schema_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/timescaledb/schema.sql")
}

fn schema_text() -> String {
    std::fs::read_to_string(schema_path()).expect("read deploy/timescaledb/schema.sql")
}

/// `psql -X -d <conn> <args> -f schema.sql`, the runbook's command (plus `-X`, so no psqlrc
/// interferes). Deliberately no `-v ON_ERROR_STOP=1`: the file must stop on errors by itself.
fn apply_with(conn: &str, args: &[&str]) -> Output {
    Command::new(pg_bin().join("psql"))
        .args(["-X", "-d", conn])
        .args(args)
        .arg("-f")
        .arg(schema_path())
        .output()
        .expect("run psql")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Applies the plain PostgreSQL part (the tests' opt-out) and asserts it succeeded.
fn apply_plain(node: &PgNode) -> Output {
    let out = apply_with(&node.connstr(DB), &["-v", "skip_timescaledb=1"]);
    assert!(out.status.success(), "applying schema.sql with skip_timescaledb=1 failed:\n{}", show(&out));
    out
}

/// `pg_dump --schema-only`, minus the `\restrict` key lines newer pg_dump releases randomize.
fn dump_schema(node: &PgNode) -> String {
    let out = Command::new(pg_bin().join("pg_dump"))
        .args(["--schema-only", "-d", &node.connstr(DB)])
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "pg_dump failed:\n{}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One candle as a VALUES tuple: a bar around `close` (high = close + 1, low = close - 1).
fn bar(ticker: &str, tf: &str, ts: i64, close: i64) -> String {
    format!("('{ticker}', '{tf}', {ts}, {close}, {}, {}, {close}, {})", close + 1, close - 1, ts % 1000 + 7)
}

/// What `latest()` returns for `bar(_, _, ts, close)`.
fn bar_text(ts: i64, close: i64) -> String {
    format!("{ts} {close} {} {} {close} {}", close + 1, close - 1, ts % 1000 + 7)
}

const UPSERT: &str = "ON CONFLICT (ticker, tf, ts) DO UPDATE SET open = EXCLUDED.open, high = EXCLUDED.high, \
                      low = EXCLUDED.low, close = EXCLUDED.close, volume = EXCLUDED.volume";

fn insert_sql(rows: &[String]) -> String {
    format!("INSERT INTO public.candles VALUES {}", rows.join(", "))
}

fn upsert_sql(row: &str) -> String {
    format!("INSERT INTO public.candles VALUES {row} {UPSERT}")
}

async fn exec(c: &Client, sql: &str) {
    if let Err(e) = c.batch_execute(sql).await {
        // tokio-postgres' Display says only "db error"; the server's message is in the source.
        panic!("{sql}: {e}: {:?}", e.as_db_error().map(|d| (d.code().code(), d.message())));
    }
}

/// candles_latest for one key as "ts open high low close volume".
async fn latest(c: &Client, ticker: &str, tf: &str) -> Option<String> {
    c.query_opt(
        "SELECT concat_ws(' ', ts, open, high, low, close, volume) FROM public.candles_latest \
         WHERE ticker = $1 AND tf = $2",
        &[&ticker, &tf],
    )
    .await
    .expect("read candles_latest")
    .map(|r| r.get(0))
}

/// Asserts candles_latest holds exactly the newest candle of every (ticker, tf) in candles.
async fn assert_latest_matches_candles(c: &Client) {
    let q = "SELECT concat_ws(' ', ticker, tf, ts, open, high, low, close, volume) FROM ";
    let want: Vec<String> = c
        .query(
            &format!(
                "{q} (SELECT DISTINCT ON (ticker, tf) * FROM public.candles ORDER BY ticker, tf, ts DESC) t ORDER BY 1"
            ),
            &[],
        )
        .await
        .expect("newest per key")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let got: Vec<String> = c
        .query(&format!("{q} public.candles_latest ORDER BY 1"), &[])
        .await
        .expect("candles_latest")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got, want, "candles_latest (left) differs from the newest candle per key (right)");
}

#[test]
fn applying_twice_changes_nothing() {
    let node = PgNode::start_primary("schema-idem");
    let first = apply_plain(&node);
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("TESTS ONLY"),
        "the opt-out must announce itself:\n{}",
        show(&first)
    );
    let before = dump_schema(&node);
    for object in [
        "CREATE TABLE public.candles ",
        "CREATE TABLE public.candles_latest ",
        "CREATE FUNCTION public.candles_now_ms() RETURNS bigint",
        "CREATE FUNCTION public.candles_latest_sync() RETURNS trigger",
        "CREATE TRIGGER candles_latest_sync AFTER INSERT OR UPDATE ON public.candles FOR EACH ROW",
        "CREATE INDEX candles_latest_tf_ticker_idx ON public.candles_latest USING btree (tf, ticker)",
    ] {
        assert!(before.contains(object), "pg_dump lacks {object:?}:\n{before}");
    }
    node.sql_ok(
        DB,
        &format!("{}; {}", insert_sql(&[bar("VNM", "1d", T0, 50)]), insert_sql(&[bar("VNM", "1d", T0 - DAY, 40)])),
    );

    apply_plain(&node);
    let after = dump_schema(&node);
    if before != after {
        let diff: Vec<String> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!("the second apply changed the schema (first differing lines):\n{}", diff.join("\n"));
    }
    assert_eq!(node.sql_ok(DB, "SELECT count(*) FROM public.candles"), "2", "data survives a re-apply");
    assert_eq!(
        node.sql_ok(DB, "SELECT ts FROM public.candles_latest WHERE ticker = 'VNM' AND tf = '1d'"),
        T0.to_string()
    );
}

#[test]
fn normal_apply_without_timescaledb_fails_and_creates_nothing() {
    let node = PgNode::start_primary("schema-no-tsdb");
    // No opt-out, and a value psql cannot read as a boolean: both must take the normal path.
    for args in [&[][..], &["-v", "skip_timescaledb=maybe"][..]] {
        let out = apply_with(&node.connstr(DB), args);
        assert!(!out.status.success(), "psql {args:?} must fail without TimescaleDB:\n{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("extension \"timescaledb\" is not available"),
            "psql {args:?} must fail on the missing extension:\n{}",
            show(&out)
        );
        assert_eq!(
            node.sql_ok(
                DB,
                "SELECT concat_ws(',', to_regclass('public.candles'), to_regclass('public.candles_latest'), \
                 to_regprocedure('public.candles_now_ms()'), to_regprocedure('public.candles_latest_sync()'))"
            ),
            "",
            "a failed apply must leave nothing behind (no silent plain table)"
        );
    }
}

/// The candles_latest cases on one key, bars at `t0` and the six days after it: in order, late,
/// newer-first in one statement, upserts and UPDATEs of the latest and of an older bar, and
/// other keys. Run on plain PostgreSQL and on a TimescaleDB hypertable.
async fn latest_row_cases(c: &Client, t0: i64) {
    // In order.
    exec(c, &insert_sql(&[bar("VNM", "1d", t0, 10)])).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0, 10)));
    exec(c, &insert_sql(&[bar("VNM", "1d", t0 + DAY, 20)])).await;
    exec(c, &insert_sql(&[bar("VNM", "1d", t0 + 3 * DAY, 40)])).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 3 * DAY, 40)));

    // Out of order: a late, older candle is stored but does not replace the newer one.
    exec(c, &insert_sql(&[bar("VNM", "1d", t0 + 2 * DAY, 30)])).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 3 * DAY, 40)));

    // One statement, newer row first: the row trigger sees the older one last.
    exec(c, &insert_sql(&[bar("VNM", "1d", t0 + 5 * DAY, 60), bar("VNM", "1d", t0 + 4 * DAY, 50)])).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 5 * DAY, 60)));

    // An upsert that hits the latest bar fires the UPDATE trigger, and the rewrite lands.
    exec(c, &upsert_sql(&bar("VNM", "1d", t0 + 5 * DAY, 61))).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 5 * DAY, 61)));
    // Rewriting an older bar does not.
    exec(c, &upsert_sql(&bar("VNM", "1d", t0 + 4 * DAY, 51))).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 5 * DAY, 61)));
    // A plain UPDATE of the latest bar lands; of an older one, does not.
    exec(
        c,
        &format!(
            "UPDATE public.candles SET close = 62, high = 63 WHERE ticker = 'VNM' AND tf = '1d' AND ts = {}",
            t0 + 5 * DAY
        ),
    )
    .await;
    exec(c, &format!("UPDATE public.candles SET close = 1, low = 1 WHERE ticker = 'VNM' AND tf = '1d' AND ts = {t0}"))
        .await;
    let ts = t0 + 5 * DAY;
    assert_eq!(latest(c, "VNM", "1d").await, Some(format!("{ts} 61 63 60 62 {}", ts % 1000 + 7)));
    // An upsert that arrives as a brand-new newest bar goes through the INSERT path.
    exec(c, &upsert_sql(&bar("VNM", "1d", t0 + 6 * DAY, 70))).await;
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 6 * DAY, 70)));

    // Other timeframes and tickers are independent keys.
    exec(c, &insert_sql(&[bar("VNM", "1h", t0 + DAY, 11), bar("FPT", "1d", t0, 90)])).await;
    assert_eq!(latest(c, "VNM", "1h").await, Some(bar_text(t0 + DAY, 11)));
    assert_eq!(latest(c, "FPT", "1d").await, Some(bar_text(t0, 90)));
    assert_eq!(latest(c, "VNM", "1d").await, Some(bar_text(t0 + 6 * DAY, 70)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_row_follows_the_newest_candle() {
    let node = PgNode::start_primary("schema-latest");
    apply_plain(&node);
    let c = node.connect(DB).await;
    latest_row_cases(&c, T0).await;

    // Decimal prices round-trip exactly (numeric, not binary floating point).
    exec(&c, "INSERT INTO public.candles VALUES ('E1VFVN30', '1m', 1700000060000, 0.1, 0.3, 0.1, 0.2, 5)").await;
    assert_eq!(latest(&c, "E1VFVN30", "1m").await.as_deref(), Some("1700000060000 0.1 0.3 0.1 0.2 5"));
    let sum: String = c
        .query_one("SELECT (open + close)::text FROM public.candles_latest WHERE ticker = 'E1VFVN30'", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum, "0.3");

    assert_latest_matches_candles(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_violations_are_rejected() {
    let node = PgNode::start_primary("schema-checks");
    apply_plain(&node);
    let c = node.connect(DB).await;
    exec(&c, &insert_sql(&[bar("VNM", "1d", T0, 10)])).await;

    let ts = T0 + DAY;
    // (what, VALUES tuple, SQLSTATE, constraint or NOT NULL column)
    let cases: &[(&str, String, &str, &str)] = &[
        ("high below low", format!("('VNM', '1d', {ts}, 10, 9, 11, 10, 1)"), "23514", "candles_price_check"),
        ("open above high", format!("('VNM', '1d', {ts}, 12, 11, 9, 10, 1)"), "23514", "candles_price_check"),
        ("close below low", format!("('VNM', '1d', {ts}, 10, 11, 9, 8, 1)"), "23514", "candles_price_check"),
        ("zero prices", format!("('VNM', '1d', {ts}, 0, 0, 0, 0, 1)"), "23514", "candles_price_check"),
        ("negative low", format!("('VNM', '1d', {ts}, 10, 11, -1, 10, 1)"), "23514", "candles_price_check"),
        (
            "NaN everywhere",
            format!("('VNM', '1d', {ts}, 'NaN', 'NaN', 'NaN', 'NaN', 1)"),
            "23514",
            "candles_price_check",
        ),
        ("NaN close", format!("('VNM', '1d', {ts}, 10, 11, 9, 'NaN', 1)"), "23514", "candles_price_check"),
        ("infinite high", format!("('VNM', '1d', {ts}, 10, 'Infinity', 9, 10, 1)"), "23514", "candles_price_check"),
        ("-infinite low", format!("('VNM', '1d', {ts}, 10, 11, '-Infinity', 10, 1)"), "23514", "candles_price_check"),
        ("negative volume", format!("('VNM', '1d', {ts}, 10, 11, 9, 10, -1)"), "23514", "candles_volume_check"),
        ("ts in seconds", "('VNM', '1d', 1700000000, 10, 11, 9, 10, 1)".into(), "23514", "candles_ts_check"),
        ("ts in microseconds", "('VNM', '1d', 1700000000000000, 10, 11, 9, 10, 1)".into(), "23514", "candles_ts_check"),
        ("empty ticker", format!("('', '1d', {ts}, 10, 11, 9, 10, 1)"), "23514", "candles_ticker_check"),
        ("ticker with a space", format!("('VN M', '1d', {ts}, 10, 11, 9, 10, 1)"), "23514", "candles_ticker_check"),
        ("tf without a count", format!("('VNM', 'd', {ts}, 10, 11, 9, 10, 1)"), "23514", "candles_tf_check"),
        ("tf zero", format!("('VNM', '0m', {ts}, 10, 11, 9, 10, 1)"), "23514", "candles_tf_check"),
        ("tf as a word", format!("('VNM', 'daily', {ts}, 10, 11, 9, 10, 1)"), "23514", "candles_tf_check"),
        ("null close", format!("('VNM', '1d', {ts}, 10, 11, 9, NULL, 1)"), "23502", "close"),
        ("null ts", "('VNM', '1d', NULL, 10, 11, 9, 10, 1)".into(), "23502", "ts"),
        ("null ticker", format!("(NULL, '1d', {ts}, 10, 11, 9, 10, 1)"), "23502", "ticker"),
        ("null volume", format!("('VNM', '1d', {ts}, 10, 11, 9, 10, NULL)"), "23502", "volume"),
        ("duplicate key", bar("VNM", "1d", T0, 99), "23505", "candles_pkey"),
    ];
    for (what, row, code, name) in cases {
        let err = c
            .batch_execute(&insert_sql(std::slice::from_ref(row)))
            .await
            .expect_err(&format!("{what}: {row} was accepted"));
        let db = err.as_db_error().unwrap_or_else(|| panic!("{what}: not a server error: {err}"));
        assert_eq!(db.code().code(), *code, "{what}: {}", db.message());
        let got = if *code == "23502" { db.column() } else { db.constraint() };
        assert_eq!(got, Some(*name), "{what}: {}", db.message());
    }
    // The control: a valid bar is accepted, and nothing rejected left a trace.
    exec(&c, &insert_sql(&[bar("VNM", "1d", ts, 10)])).await;
    assert_eq!(node.sql_ok(DB, "SELECT count(*) FROM public.candles"), "2");
    assert_eq!(latest(&c, "VNM", "1d").await, Some(bar_text(ts, 10)));
    assert_eq!(node.sql_ok(DB, "SELECT count(*) FROM public.candles_latest"), "1");
}

/// Runs `first` in an open transaction on `w1`, then `second` on `w2` in its own
/// transaction, proves `second` is blocked on a lock held by `w1` (pg_stat_activity, polled
/// with a bound), commits `w1`, and lets `w2` finish and commit. Returns `w2`.
async fn interleave(w1: &Client, w2: Client, observer: &Client, first: &str, second: &str) -> Client {
    let w2_pid: i32 = w2.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0);
    exec(w1, "BEGIN").await;
    exec(w1, first).await;
    exec(&w2, "BEGIN").await;
    let second_sql = second.to_owned();
    let handle = tokio::spawn(async move {
        let r = w2.batch_execute(&second_sql).await;
        (w2, r)
    });
    common::eventually(Duration::from_secs(15), "the second writer waits on the first one's lock", || async {
        let row = observer
            .query_one("SELECT coalesce(wait_event_type, '') FROM pg_stat_activity WHERE pid = $1", &[&w2_pid])
            .await
            .expect("pg_stat_activity");
        (row.get::<_, String>(0) == "Lock").then_some(())
    })
    .await;
    assert!(!handle.is_finished(), "the second writer must still be blocked");
    exec(w1, "COMMIT").await;
    let (w2, r) = handle.await.expect("second writer task");
    r.unwrap_or_else(|e| panic!("second writer failed after the first committed: {e}\n{second}"));
    exec(&w2, "COMMIT").await;
    w2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_cannot_leave_latest_stale() {
    let node = PgNode::start_primary("schema-race");
    apply_plain(&node);
    let w1 = node.connect(DB).await;
    let mut w2 = node.connect(DB).await;
    let observer = node.connect(DB).await;

    // Existing key; the newer candle's writer holds the latest row, the older one's waits.
    // A check-then-write trigger would let the waiting older candle overwrite the newer one.
    exec(&observer, &insert_sql(&[bar("AAA", "1d", T0, 10)])).await;
    w2 = interleave(
        &w1,
        w2,
        &observer,
        &insert_sql(&[bar("AAA", "1d", T0 + 2 * DAY, 30)]),
        &insert_sql(&[bar("AAA", "1d", T0 + DAY, 20)]),
    )
    .await;
    assert_eq!(latest(&observer, "AAA", "1d").await, Some(bar_text(T0 + 2 * DAY, 30)));

    // Existing key, older first: the newer one, waiting, still lands.
    exec(&observer, &insert_sql(&[bar("BBB", "1d", T0, 10)])).await;
    w2 = interleave(
        &w1,
        w2,
        &observer,
        &insert_sql(&[bar("BBB", "1d", T0 + DAY, 20)]),
        &insert_sql(&[bar("BBB", "1d", T0 + 2 * DAY, 30)]),
    )
    .await;
    assert_eq!(latest(&observer, "BBB", "1d").await, Some(bar_text(T0 + 2 * DAY, 30)));

    // Brand-new key in both writers: the second waits on the first one's speculative insert
    // and then takes the update path (no unique violation, older never wins).
    w2 = interleave(
        &w1,
        w2,
        &observer,
        &insert_sql(&[bar("CCC", "1d", T0 + DAY, 20)]),
        &insert_sql(&[bar("CCC", "1d", T0, 10)]),
    )
    .await;
    assert_eq!(latest(&observer, "CCC", "1d").await, Some(bar_text(T0 + DAY, 20)));
    w2 = interleave(
        &w1,
        w2,
        &observer,
        &insert_sql(&[bar("DDD", "1d", T0, 10)]),
        &insert_sql(&[bar("DDD", "1d", T0 + DAY, 20)]),
    )
    .await;
    assert_eq!(latest(&observer, "DDD", "1d").await, Some(bar_text(T0 + DAY, 20)));

    // Two rewrites of the latest bar: the one that commits last is what both tables hold.
    exec(&observer, &insert_sql(&[bar("EEE", "1d", T0, 10)])).await;
    w2 = interleave(&w1, w2, &observer, &upsert_sql(&bar("EEE", "1d", T0, 11)), &upsert_sql(&bar("EEE", "1d", T0, 12)))
        .await;
    assert_eq!(latest(&observer, "EEE", "1d").await, Some(bar_text(T0, 12)));

    // A newer bar committed first; a concurrent rewrite of the now-older bar must not win.
    exec(&observer, &insert_sql(&[bar("FFF", "1d", T0, 10)])).await;
    w2 = interleave(
        &w1,
        w2,
        &observer,
        &insert_sql(&[bar("FFF", "1d", T0 + DAY, 20)]),
        &upsert_sql(&bar("FFF", "1d", T0, 15)),
    )
    .await;
    assert_eq!(latest(&observer, "FFF", "1d").await, Some(bar_text(T0 + DAY, 20)));
    // And the reverse: the rewrite first, the newer bar waiting.
    exec(&observer, &insert_sql(&[bar("GGG", "1d", T0, 10)])).await;
    let _w2 = interleave(
        &w1,
        w2,
        &observer,
        &upsert_sql(&bar("GGG", "1d", T0, 15)),
        &insert_sql(&[bar("GGG", "1d", T0 + DAY, 20)]),
    )
    .await;
    assert_eq!(latest(&observer, "GGG", "1d").await, Some(bar_text(T0 + DAY, 20)));

    assert_latest_matches_candles(&observer).await;
}

/// A tiny deterministic generator, so a failing run can be replayed (no `rand` dependency).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_random_writers_leave_latest_correct() {
    const TXNS: usize = 300;
    let node = PgNode::start_primary("schema-random");
    apply_plain(&node);
    let mut writers = Vec::new();
    for seed in [0x9E37_79B9_7F4A_7C15_u64, 0xD1B5_4A32_D192_ED03] {
        let c = node.connect(DB).await;
        writers.push(tokio::spawn(async move {
            let mut rng = XorShift(seed);
            for _ in 0..TXNS {
                let ticker = ["VNM", "FPT"][rng.below(2) as usize];
                let tf = ["1d", "1h"][rng.below(2) as usize];
                let ts = T0 + rng.below(40) as i64 * DAY;
                let close = 10 + rng.below(1000) as i64;
                // BEGIN, write, COMMIT as separate round trips, so the two writers'
                // transactions stay open across each other's statements.
                exec(&c, "BEGIN").await;
                exec(&c, &upsert_sql(&bar(ticker, tf, ts, close))).await;
                exec(&c, "COMMIT").await;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer task");
    }
    let c = node.connect(DB).await;
    assert_eq!(node.sql_ok(DB, "SELECT count(*) FROM public.candles_latest"), "4");
    assert_latest_matches_candles(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_serve_paging_and_the_cross_section() {
    let node = PgNode::start_primary("schema-plans");
    apply_plain(&node);
    let c = node.connect(DB).await;
    exec(
        &c,
        &format!(
            "INSERT INTO public.candles \
             SELECT 'T' || t, tf, {T0} + d::bigint * {DAY}, 10, 11, 9, 10, 100 \
             FROM generate_series(1, 300) t, unnest(ARRAY['1d', '1h', '15m', '5m', '1m']) tf, generate_series(0, 3) d; \
             ANALYZE public.candles; ANALYZE public.candles_latest"
        ),
    )
    .await;
    assert_eq!(node.sql_ok(DB, "SELECT count(*) FROM public.candles_latest"), "1500");

    // With the alternatives priced out, a plan without Sort that uses the index proves the
    // index can serve the query in its order.
    let plan = |sql: String| {
        let c = &c;
        async move {
            let rows = c
                .simple_query(&format!(
                    "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off; EXPLAIN (COSTS OFF) {sql}"
                ))
                .await
                .expect("explain");
            rows.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let paging = plan(format!(
        "SELECT * FROM public.candles WHERE ticker = 'T7' AND tf = '1d' AND ts < {} ORDER BY ts DESC LIMIT 20",
        T0 + 3 * DAY
    ))
    .await;
    assert!(paging.contains("Index Scan Backward using candles_pkey on candles"), "chart paging plan:\n{paging}");
    assert!(!paging.contains("Sort"), "chart paging must not sort:\n{paging}");

    let cross = plan("SELECT * FROM public.candles_latest WHERE tf = '1d' ORDER BY ticker".into()).await;
    assert!(cross.contains("using candles_latest_tf_ticker_idx"), "cross-sectional plan:\n{cross}");
    assert!(cross.contains("Index Cond: (tf = '1d'::text)"), "cross-sectional plan:\n{cross}");
    assert!(!cross.contains("Sort"), "the cross-section must not sort:\n{cross}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_now_function_is_epoch_ms_with_the_timescaledb_signature() {
    let node = PgNode::start_primary("schema-now");
    apply_plain(&node);
    let c = node.connect(DB).await;
    let row = c
        .query_one(
            "SELECT public.candles_now_ms(), p.pronargs::int, p.prorettype::regtype::text, p.provolatile::text \
             FROM pg_proc p WHERE p.oid = 'public.candles_now_ms()'::regprocedure",
            &[],
        )
        .await
        .expect("candles_now_ms");
    let (now_ms, nargs, returns, volatility): (i64, i32, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((nargs, returns.as_str(), volatility.as_str()), (0, "bigint", "s"), "no args, bigint, STABLE");
    assert_epoch_ms(now_ms);
}

/// Asserts `candles_now_ms()`'s value is this machine's clock in epoch ms (within a minute).
fn assert_epoch_ms(now_ms: i64) {
    let wall_ms = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis(),
    )
    .expect("ms fit i64");
    assert!((now_ms - wall_ms).abs() < 60_000, "candles_now_ms() = {now_ms}, wall clock = {wall_ms}: not epoch ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_through_pgleader_like_the_runbook() {
    let node = PgNode::start_primary("schema-proxy");
    let running = common::proxy::ProxyBuilder::new(&[&node]).start().await;
    let proxy = running.proxy_addr;
    let url = format!("postgres://postgres@{proxy}/{DB}?sslmode=disable");
    // psql blocks; keep it off the runtime that runs the proxy.
    let out =
        tokio::task::spawn_blocking(move || apply_with(&url, &["-v", "skip_timescaledb=1"])).await.expect("psql task");
    assert!(out.status.success(), "applying schema.sql through pgleader failed:\n{}", show(&out));
    assert_eq!(
        node.sql_ok(DB, "SELECT count(*) FROM pg_trigger WHERE tgname = 'candles_latest_sync' AND tgrelid = 'public.candles'::regclass"),
        "1",
        "the schema landed on the primary"
    );
    let client = common::proxy::connect_via(proxy, DB).await.expect("connect through pgleader");
    exec(&client, &insert_sql(&[bar("VNM", "1d", T0, 10)])).await;
    assert_eq!(latest(&client, "VNM", "1d").await, Some(bar_text(T0, 10)));
    drop(client);
    running.shutdown().await.expect("pgleader shuts down cleanly");
}

// ---------------------------------------------------------------------------------------
// The TimescaleDB calls, checked with PostgreSQL's parser.

/// Which `\if :skip_timescaledb` branch a line is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branch {
    /// Outside that `\if`: applied on both paths.
    Both,
    /// Its `\else`: the normal (TimescaleDB) path only.
    TimescaleOnly,
    /// Its then-branch: the tests' opt-out only.
    SkipOnly,
}

/// One SQL statement of the file, with the branch it is in and its first line (1-based).
struct Stmt {
    branch: Branch,
    line: usize,
    node: NodeEnum,
}

/// Cuts the file at every psql meta-command line (those start with a backslash; each one is a
/// statement boundary here: `\gset` ends the query before it, the rest sit between
/// statements), tracks the `\if :skip_timescaledb` branches, and parses every segment with
/// pg_query.
fn parse_schema(text: &str) -> Vec<Stmt> {
    // (is the skip_timescaledb \if, in its \else)
    let mut frames: Vec<(bool, bool)> = Vec::new();
    let mut segments: Vec<(Branch, usize, String)> = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    let branch_of = |frames: &[(bool, bool)]| {
        let skip: Vec<bool> = frames.iter().filter(|f| f.0).map(|f| f.1).collect();
        match skip.as_slice() {
            [] => Branch::Both,
            [true] => Branch::TimescaleOnly,
            [false] => Branch::SkipOnly,
            _ => panic!("nested \\if :skip_timescaledb"),
        }
    };
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if !trimmed.starts_with('\\') {
            // A backslash in a `--` comment is inert; anywhere else in SQL, refuse it.
            let code = line.split("--").next().unwrap_or("");
            assert!(
                !code.contains('\\'),
                "line {}: a backslash inside SQL would hide a meta-command from the parser: {line}",
                i + 1
            );
            if current.trim().is_empty() {
                start = i + 1;
            }
            current.push_str(line);
            current.push('\n');
            continue;
        }
        segments.push((branch_of(&frames), start, std::mem::take(&mut current)));
        let mut words = trimmed.split_whitespace();
        match words.next() {
            Some("\\if") => frames.push((words.next() == Some(":skip_timescaledb"), false)),
            Some("\\else") => frames.last_mut().expect("\\else without \\if").1 = true,
            Some("\\endif") => {
                frames.pop().expect("\\endif without \\if");
            }
            Some("\\elif") => panic!("line {}: \\elif is not handled by this test", i + 1),
            _ => {}
        }
    }
    assert!(frames.is_empty(), "unterminated \\if");
    segments.push((branch_of(&frames), start, current));

    let mut stmts = Vec::new();
    for (branch, line, sql) in segments {
        let parsed =
            pg_query::parse(&sql, 0).unwrap_or_else(|e| panic!("line {line}: PostgreSQL cannot parse:\n{sql}\n{e}"));
        for raw in parsed.protobuf.stmts {
            let node = raw.stmt.and_then(|n| n.node).expect("statement node");
            stmts.push(Stmt { branch, line, node });
        }
    }
    stmts
}

fn unbox(node: &protobuf::Node) -> &NodeEnum {
    node.node.as_ref().expect("empty node")
}

/// A literal, seen through any `::type` casts.
fn literal(node: &protobuf::Node) -> Option<&a_const::Val> {
    match unbox(node) {
        NodeEnum::AConst(c) => c.val.as_ref(),
        NodeEnum::TypeCast(t) => literal(t.arg.as_deref()?),
        _ => None,
    }
}

fn lit_str(node: &protobuf::Node) -> Option<&str> {
    match literal(node)? {
        a_const::Val::Sval(s) => Some(&s.sval),
        _ => None,
    }
}

fn lit_int(node: &protobuf::Node) -> Option<i64> {
    match literal(node)? {
        a_const::Val::Ival(i) => Some(i64::from(i.ival)),
        a_const::Val::Fval(f) => f.fval.parse().ok(),
        _ => None,
    }
}

fn lit_bool(node: &protobuf::Node) -> Option<bool> {
    match literal(node)? {
        a_const::Val::Boolval(b) => Some(b.boolval),
        _ => None,
    }
}

fn names(nodes: &[protobuf::Node]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| match unbox(n) {
            NodeEnum::String(s) => s.sval.clone(),
            other => panic!("not a name: {other:?}"),
        })
        .collect()
}

/// "public.candles" for 'candles' or 'public.candles' (the file names everything in public).
fn qualified(name: &str) -> String {
    if name.contains('.') {
        name.to_owned()
    } else {
        format!("public.{name}")
    }
}

/// A function call's positional and named arguments.
struct Call<'a> {
    line: usize,
    branch: Branch,
    index: usize,
    positional: Vec<&'a protobuf::Node>,
    named: BTreeMap<String, &'a protobuf::Node>,
}

impl Call<'_> {
    fn named_int(&self, name: &str) -> Option<i64> {
        self.named.get(name).and_then(|n| lit_int(n))
    }
    fn named_bool(&self, name: &str) -> Option<bool> {
        self.named.get(name).and_then(|n| lit_bool(n))
    }
}

/// Every call of the function `fname` (any schema) anywhere in the statements.
fn calls<'a>(stmts: &'a [Stmt], fname: &str) -> Vec<Call<'a>> {
    let mut found = Vec::new();
    for (index, s) in stmts.iter().enumerate() {
        for (node, ..) in s.node.nodes() {
            let NodeRef::FuncCall(fc) = node else { continue };
            if names(&fc.funcname).last().map(String::as_str) != Some(fname) {
                continue;
            }
            let mut call =
                Call { line: s.line, branch: s.branch, index, positional: Vec::new(), named: BTreeMap::new() };
            for arg in &fc.args {
                match unbox(arg) {
                    NodeEnum::NamedArgExpr(na) => {
                        call.named.insert(na.name.clone(), na.arg.as_deref().expect("named arg value"));
                    }
                    _ => call.positional.push(arg),
                }
            }
            found.push(call);
        }
    }
    found
}

fn one<'a>(stmts: &'a [Stmt], fname: &str) -> Call<'a> {
    let mut found = calls(stmts, fname);
    assert_eq!(found.len(), 1, "expected exactly one {fname}() call in schema.sql");
    found.remove(0)
}

/// `timescaledb.*` reloptions of an ALTER TABLE .. SET (..): name to value (None for a bare flag).
type TimescaleOptions = BTreeMap<String, Option<String>>;

#[test]
fn timescale_calls_parse_as_intended() {
    let text = schema_text();
    assert!(text.contains("TimescaleDB 2.11 or newer"), "the minimum TimescaleDB version is named");
    let stmts = parse_schema(&text);

    // create_hypertable on ts, integer interval of 7 days, re-runnable. Either signature:
    // legacy create_hypertable(rel, 'ts', chunk_time_interval => n) or (2.13+)
    // create_hypertable(rel, by_range('ts', n)).
    let ch = one(&stmts, "create_hypertable");
    assert_eq!(ch.positional.first().and_then(|n| lit_str(n)).map(qualified).as_deref(), Some("public.candles"));
    let (column, interval) = match ch.positional.get(1).map(|n| unbox(n)) {
        Some(NodeEnum::FuncCall(by)) if names(&by.funcname).last().map(String::as_str) == Some("by_range") => {
            (by.args.first().and_then(lit_str), by.args.get(1).and_then(lit_int))
        }
        _ => (ch.positional.get(1).and_then(|n| lit_str(n)), ch.named_int("chunk_time_interval")),
    };
    assert_eq!(column, Some("ts"), "hypertable time column");
    assert_eq!(interval, Some(604_800_000), "7-day chunks in epoch ms");
    assert_eq!(ch.named_bool("if_not_exists"), Some(true), "create_hypertable must be re-runnable");

    // set_integer_now_func registers the file's own integer-now function.
    let now = one(&stmts, "set_integer_now_func");
    assert_eq!(now.positional.first().and_then(|n| lit_str(n)).map(qualified).as_deref(), Some("public.candles"));
    let now_fn =
        now.positional.get(1).and_then(|n| lit_str(n)).map(qualified).expect("integer-now function name literal");
    assert_eq!(now.named_bool("replace_if_exists"), Some(true), "re-registering on a re-apply must not fail");
    let defs: Vec<&protobuf::CreateFunctionStmt> = stmts
        .iter()
        .filter_map(|s| match &s.node {
            NodeEnum::CreateFunctionStmt(f) if qualified(&names(&f.funcname).join(".")) == now_fn => {
                assert_eq!(s.branch, Branch::Both, "{now_fn} belongs to the plain part");
                Some(&**f)
            }
            _ => None,
        })
        .collect();
    assert_eq!(defs.len(), 1, "{now_fn} is defined exactly once in schema.sql");
    let def = defs[0];
    assert!(def.parameters.is_empty(), "{now_fn} takes no arguments");
    let returns = def.return_type.as_ref().map(|t| names(&t.names));
    assert_eq!(returns, Some(vec!["pg_catalog".to_owned(), "int8".to_owned()]), "{now_fn} returns bigint");
    let volatility = def.options.iter().find_map(|o| match unbox(o) {
        NodeEnum::DefElem(d) if d.defname == "volatility" => d.arg.as_deref().map(|a| match unbox(a) {
            NodeEnum::String(s) => s.sval.clone(),
            other => panic!("volatility: {other:?}"),
        }),
        _ => None,
    });
    assert_eq!(volatility.as_deref(), Some("stable"), "{now_fn} is STABLE");

    // ALTER TABLE public.candles SET (timescaledb.compress, segmentby (ticker, tf), orderby ts).
    let alters: Vec<(usize, &Stmt, TimescaleOptions)> = stmts
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let NodeEnum::AlterTableStmt(a) = &s.node else { return None };
            let mut opts = BTreeMap::new();
            for cmd in &a.cmds {
                let NodeEnum::AlterTableCmd(cmd) = unbox(cmd) else { continue };
                if cmd.subtype != protobuf::AlterTableType::AtSetRelOptions as i32 {
                    continue;
                }
                let Some(NodeEnum::List(list)) = cmd.def.as_deref().map(unbox) else { continue };
                for item in &list.items {
                    let NodeEnum::DefElem(d) = unbox(item) else { continue };
                    if d.defnamespace == "timescaledb" {
                        let value = d.arg.as_deref().map(|a| match unbox(a) {
                            NodeEnum::String(s) => s.sval.clone(),
                            NodeEnum::Boolean(b) => b.boolval.to_string(),
                            other => panic!("timescaledb.{}: {other:?}", d.defname),
                        });
                        opts.insert(d.defname.clone(), value);
                    }
                }
            }
            let rel = a.relation.as_ref().expect("relation");
            let target = if rel.schemaname.is_empty() {
                qualified(&rel.relname)
            } else {
                format!("{}.{}", rel.schemaname, rel.relname)
            };
            (!opts.is_empty()).then(|| {
                assert_eq!(target, "public.candles", "line {}: compression on the wrong table", s.line);
                (i, s, opts)
            })
        })
        .collect();
    assert_eq!(alters.len(), 1, "exactly one ALTER TABLE .. SET (timescaledb.*)");
    let (alter_index, alter_stmt, opts) = &alters[0];
    assert!(
        matches!(opts.get("compress"), Some(None)) || matches!(opts.get("compress"), Some(Some(v)) if v == "true"),
        "timescaledb.compress enabled: {opts:?}"
    );
    let list = |key: &str| -> Vec<String> {
        opts.get(key)
            .and_then(Option::as_deref)
            .unwrap_or_else(|| panic!("timescaledb.{key} missing: {opts:?}"))
            .split(',')
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(list("compress_segmentby"), ["ticker", "tf"], "segment by (ticker, tf)");
    let orderby = list("compress_orderby");
    assert!(
        matches!(orderby.as_slice(), [o] if ["ts", "ts ASC", "ts DESC"].contains(&o.as_str())),
        "order by ts: {orderby:?}"
    );

    // The compression policy: 14 days in epoch ms, re-runnable, after compression is enabled.
    let policy = one(&stmts, "add_compression_policy");
    assert_eq!(policy.positional.first().and_then(|n| lit_str(n)).map(qualified).as_deref(), Some("public.candles"));
    let after = policy.named_int("compress_after").or_else(|| policy.positional.get(1).and_then(|n| lit_int(n)));
    assert_eq!(after, Some(1_209_600_000), "compress chunks older than 14 days, in epoch ms");
    assert_eq!(policy.named_bool("if_not_exists"), Some(true), "add_compression_policy must be re-runnable");

    // Order: extension, hypertable, integer-now, compression settings, policy.
    let ext_index = stmts
        .iter()
        .position(
            |s| matches!(&s.node, NodeEnum::CreateExtensionStmt(e) if e.extname == "timescaledb" && e.if_not_exists),
        )
        .expect("CREATE EXTENSION IF NOT EXISTS timescaledb");
    assert!(ext_index < ch.index && ch.index < now.index && now.index < policy.index, "call order");
    assert!(
        ch.index < *alter_index && *alter_index < policy.index,
        "compression is enabled between the hypertable and the policy"
    );

    // The \if structure: every TimescaleDB statement on the normal path only, everything else
    // on both paths, so the tests' opt-out applies the same DDL production gets.
    let timescale_stmt = |i: usize, s: &Stmt| {
        i == ext_index
            || i == *alter_index
            || [&ch, &now, &policy].iter().any(|c| c.index == i)
            || s.node
                .nodes()
                .iter()
                .any(|(n, ..)| matches!(n, NodeRef::RangeVar(r) if r.schemaname == "timescaledb_information"))
    };
    assert_eq!(alter_stmt.branch, Branch::TimescaleOnly);
    for (i, s) in stmts.iter().enumerate() {
        let want = if timescale_stmt(i, s) { Branch::TimescaleOnly } else { Branch::Both };
        assert_eq!(s.branch, want, "line {}: {:?} is in the wrong \\if branch", s.line, s.node);
    }
    for c in [&ch, &now, &policy] {
        assert_eq!(c.branch, Branch::TimescaleOnly, "line {}", c.line);
    }
    // One transaction: BEGIN first, COMMIT last, both unconditional.
    let tx_kind = |s: &Stmt| match &s.node {
        NodeEnum::TransactionStmt(t) => Some(t.kind),
        _ => None,
    };
    assert_eq!(tx_kind(&stmts[0]), Some(protobuf::TransactionStmtKind::TransStmtBegin as i32), "BEGIN first");
    assert_eq!(
        tx_kind(stmts.last().expect("statements")),
        Some(protobuf::TransactionStmtKind::TransStmtCommit as i32),
        "COMMIT last"
    );
    assert_eq!(stmts.iter().filter(|s| tx_kind(s).is_some()).count(), 2, "exactly one transaction");
}

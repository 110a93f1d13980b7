//! The client workload of the failover scenarios (issue 3): two writers against one address
//! (pgleader, an HAProxy, or a node), every attempt recorded.
//!
//! - Writer `new_conn` opens a NEW plaintext connection for every attempt, about every
//!   `interval` (attempts are sequential: the next starts `interval` after the previous started,
//!   or at once if that one took longer), asks the server who it is (`inet_server_port()`,
//!   `pg_is_in_recovery()`), then inserts the next id. This is how the runbook's apps connect.
//! - Writer `long_lived` keeps ONE connection, inserts every `interval`, and reconnects after an
//!   error (the reconnect is part of the next attempt).
//!
//! Ids come from one shared counter, so they are unique and increase with time across writers.
//! An attempt is "ok" only when the INSERT's CommandComplete arrived: that id is *acknowledged*,
//! and must be on the final leader afterwards (checked by [`Run::missing_on`]).
//!
//! Each attempt records times relative to the start, the outcome class ([`Outcome`]) with the
//! SQLSTATE when there is one, and the node that answered (port and recovery state) when the
//! connection got that far. [`Run`] is serde-serialisable (JSON, CSV) for the failover report.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The table the writers insert into (in the app database).
pub const TABLE: &str = "pgleader_failover_writes";

/// Where the writers connect and how long they are patient.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// Between the starts of two attempts of one writer.
    pub interval: Duration,
    /// TCP connect timeout (tokio-postgres applies it to the socket connect only).
    pub connect_timeout: Duration,
    /// Bound on one whole attempt (connect, startup, queries); past it the attempt is `timeout`.
    /// Keep it above pgleader's `leader_wait_timeout` so a held client is not counted as failed.
    pub attempt_timeout: Duration,
    pub new_conn_writer: bool,
    pub long_lived_writer: bool,
    /// The first id this workload inserts (several workloads can share one table with disjoint ids).
    pub first_id: i64,
}

impl WorkloadOptions {
    /// Both writers, every 50 ms, against `host:port` as the app role.
    pub fn new(host: &str, port: u16, user: &str, password: &str, dbname: &str) -> WorkloadOptions {
        WorkloadOptions {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            password: password.to_owned(),
            dbname: dbname.to_owned(),
            interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(40),
            new_conn_writer: true,
            long_lived_writer: true,
            first_id: 1,
        }
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name("pgleader-failover-workload")
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(self.connect_timeout);
        c
    }
}

/// Which writer made an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Writer {
    NewConn,
    LongLived,
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Writer::NewConn => "new_conn",
            Writer::LongLived => "long_lived",
        })
    }
}

/// The result class of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The INSERT was acknowledged.
    Ok,
    /// TCP connect refused.
    Refused,
    /// Connection reset or broken pipe.
    Reset,
    /// The server (or proxy) closed the connection without an error message.
    Closed,
    /// SQLSTATE 57P03 cannot_connect_now (pgleader with no leader; a starting/stopping server).
    CannotConnectNow,
    /// SQLSTATE 25006 read_only_sql_transaction: the write reached a replica.
    ReadOnly,
    /// SQLSTATE 57P01 admin_shutdown: the server terminated the session (planned shutdown).
    AdminShutdown,
    /// Connect timeout or `attempt_timeout`.
    Timeout,
    /// Any other server error; see `sqlstate`.
    OtherSqlstate,
    /// Anything else; see `message`.
    Other,
}

impl Outcome {
    /// What a fast shutdown does to a session that is live at that instant, mid-handshake or
    /// mid-query: 57P01, a close without a message (authentication in progress) or a reset. A
    /// proxy cannot save that session (it has authenticated, and SCRAM cannot be replayed), so a
    /// switchover may break it; every other failure is one a proxy must prevent.
    pub fn is_shutdown_break(self) -> bool {
        matches!(self, Outcome::Closed | Outcome::Reset | Outcome::AdminShutdown)
    }

    /// The outcome whose [`Outcome::label`] is `label`.
    pub fn from_label(label: &str) -> Option<Outcome> {
        [
            Outcome::Ok,
            Outcome::Refused,
            Outcome::Reset,
            Outcome::Closed,
            Outcome::CannotConnectNow,
            Outcome::ReadOnly,
            Outcome::AdminShutdown,
            Outcome::Timeout,
            Outcome::OtherSqlstate,
            Outcome::Other,
        ]
        .into_iter()
        .find(|o| o.label() == label)
    }

    /// A short stable label (used in summaries and the report).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed",
            Outcome::CannotConnectNow => "57P03",
            Outcome::ReadOnly => "25006",
            Outcome::AdminShutdown => "57P01",
            Outcome::Timeout => "timeout",
            Outcome::OtherSqlstate => "sqlstate",
            Outcome::Other => "other",
        }
    }
}

/// How far an attempt got: the step it was in when it ended (for a success: `Insert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// TCP connect and the startup/authentication exchange, up to ReadyForQuery.
    #[default]
    Connect,
    /// The identity query (`inet_server_port()`, `pg_is_in_recovery()`) on a fresh session.
    Identify,
    /// The INSERT.
    Insert,
}

/// One attempt of one writer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub writer: Writer,
    /// The id it tried to insert.
    pub id: i64,
    /// Milliseconds since the workload started.
    pub start_ms: f64,
    pub end_ms: f64,
    pub outcome: Outcome,
    /// Where it ended: a failure in `Connect` is a failed connection attempt; later ones are a
    /// session that broke after it was established.
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `inet_server_port()` of the node that answered, when known.
    pub node_port: Option<u16>,
    /// `pg_is_in_recovery()` of that node when asked (for `long_lived`: at connect time).
    pub in_recovery: Option<bool>,
    /// This attempt (re)connected (always true for `new_conn`).
    pub connected: bool,
}

/// A moment the scenario marked (fault injected, leader changed, ...), for reports and checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mark {
    pub at_ms: f64,
    pub label: String,
}

/// Everything one workload run recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Unix time of the start, in milliseconds (to line runs up with logs).
    pub started_unix_ms: u128,
    pub duration_ms: f64,
    pub attempts: Vec<Attempt>,
    pub marks: Vec<Mark>,
}

#[derive(Default)]
struct Log {
    attempts: Vec<Attempt>,
    marks: Vec<Mark>,
}

/// A running workload; [`Workload::stop`] ends it and returns the [`Run`].
pub struct Workload {
    started: Instant,
    started_unix_ms: u128,
    log: Arc<Mutex<Log>>,
    /// Cancels both writers; they finish their current attempt's bookkeeping and exit.
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Creates the workload's table (idempotent). Run it once against the leader before starting.
///
/// # Errors
/// Whatever the DDL returns.
pub async fn prepare(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                 id bigint PRIMARY KEY,
                 writer text NOT NULL,
                 node_port int NOT NULL DEFAULT inet_server_port(),
                 at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ))
        .await
}

impl Workload {
    /// Starts the writers on the current runtime.
    pub fn start(opts: WorkloadOptions) -> Workload {
        let started = Instant::now();
        let started_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = CancellationToken::new();
        let next_id = Arc::new(AtomicI64::new(opts.first_id));
        let mut tasks = Vec::new();
        let ctx = WriterCtx { opts: Arc::new(opts), started, log: log.clone(), stop: stop.clone(), next_id };
        if ctx.opts.new_conn_writer {
            tasks.push(tokio::spawn(ctx.clone().run_new_conn()));
        }
        if ctx.opts.long_lived_writer {
            tasks.push(tokio::spawn(ctx.run_long_lived()));
        }
        Workload { started, started_unix_ms, log, stop, tasks }
    }

    /// Records a named moment (for the report's timeline and for checks).
    pub fn mark(&self, label: &str) -> f64 {
        let at_ms = ms_since(self.started);
        self.log.lock().expect("log").marks.push(Mark { at_ms, label: label.to_owned() });
        at_ms
    }

    /// Milliseconds since the start.
    pub fn now_ms(&self) -> f64 {
        ms_since(self.started)
    }

    /// Successful attempts of `writer` that started at or after `since_ms`.
    pub fn ok_since(&self, writer: Writer, since_ms: f64) -> usize {
        self.count_since(writer, Outcome::Ok, since_ms)
    }

    /// Attempts of `writer` with `outcome` that started at or after `since_ms` (to wait for an
    /// event, such as the workload meeting an outage, instead of for wall-clock time).
    pub fn count_since(&self, writer: Writer, outcome: Outcome, since_ms: f64) -> usize {
        let log = self.log.lock().expect("log");
        log.attempts.iter().filter(|a| a.writer == writer && a.outcome == outcome && a.start_ms >= since_ms).count()
    }

    /// Failed attempts of `writer` that started at or after `since_ms`.
    pub fn failed_since(&self, writer: Writer, since_ms: f64) -> usize {
        let log = self.log.lock().expect("log");
        log.attempts.iter().filter(|a| a.writer == writer && a.outcome != Outcome::Ok && a.start_ms >= since_ms).count()
    }

    /// Waits until `writer` has `n` successes that started at or after `since_ms`.
    pub async fn wait_ok_since(&self, writer: Writer, since_ms: f64, n: usize, patience: Duration) {
        super::eventually(patience, &format!("{n} successful {writer} writes after {since_ms:.0} ms"), || async {
            (self.ok_since(writer, since_ms) >= n).then_some(())
        })
        .await;
    }

    /// Stops both writers (the attempts in flight are abandoned, not recorded) and returns the run.
    pub async fn stop(mut self) -> Run {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let duration_ms = ms_since(self.started);
        let log = std::mem::take(&mut *self.log.lock().expect("log"));
        let mut attempts = log.attempts;
        attempts.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        Run { started_unix_ms: self.started_unix_ms, duration_ms, attempts, marks: log.marks }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[derive(Clone)]
struct WriterCtx {
    opts: Arc<WorkloadOptions>,
    started: Instant,
    log: Arc<Mutex<Log>>,
    stop: CancellationToken,
    next_id: Arc<AtomicI64>,
}

/// What an attempt learned before it failed or succeeded.
#[derive(Default)]
struct Seen {
    phase: Phase,
    node_port: Option<u16>,
    in_recovery: Option<bool>,
}

impl WriterCtx {
    fn record(
        &self,
        writer: Writer,
        id: i64,
        start: Instant,
        seen: &Seen,
        connected: bool,
        result: Result<(), Failure>,
    ) {
        let (outcome, sqlstate, message) = match result {
            Ok(()) => (Outcome::Ok, None, None),
            Err(f) => (f.outcome, f.sqlstate, Some(f.message)),
        };
        let attempt = Attempt {
            writer,
            id,
            start_ms: (start - self.started).as_secs_f64() * 1000.0,
            end_ms: ms_since(self.started),
            outcome,
            phase: seen.phase,
            sqlstate,
            message,
            node_port: seen.node_port,
            in_recovery: seen.in_recovery,
            connected,
        };
        self.log.lock().expect("log").attempts.push(attempt);
    }

    async fn connect(&self, seen: &mut Seen) -> Result<tokio_postgres::Client, Failure> {
        let (client, conn) = self.opts.pg_config().connect(tokio_postgres::NoTls).await.map_err(Failure::from)?;
        tokio::spawn(conn);
        seen.phase = Phase::Identify;
        let row =
            client.query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[]).await.map_err(Failure::from)?;
        seen.node_port = row.get::<_, Option<i32>>(0).and_then(|p| u16::try_from(p).ok());
        seen.in_recovery = Some(row.get(1));
        Ok(client)
    }

    async fn insert(client: &tokio_postgres::Client, id: i64, writer: Writer) -> Result<(), Failure> {
        // Simple query: one round trip, and the values are integers and a fixed word.
        client.simple_query(&format!("INSERT INTO {TABLE} (id, writer) VALUES ({id}, '{writer}')")).await?;
        Ok(())
    }

    async fn run_new_conn(self) {
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            let start = Instant::now();
            next = start + self.opts.interval;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut seen = Seen::default();
            let attempt = async {
                let client = self.connect(&mut seen).await?;
                seen.phase = Phase::Insert;
                Self::insert(&client, id, Writer::NewConn).await
            };
            let result = tokio::select! {
                () = self.stop.cancelled() => return,
                r = tokio::time::timeout(self.opts.attempt_timeout, attempt) => r.unwrap_or_else(|_| Err(Failure::timeout())),
            };
            self.record(Writer::NewConn, id, start, &seen, true, result);
        }
    }

    async fn run_long_lived(self) {
        let mut next = Instant::now();
        let mut session: Option<(tokio_postgres::Client, Seen)> = None;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            let start = Instant::now();
            next = start + self.opts.interval;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let connected = session.is_none();
            let mut fresh = Seen::default();
            let attempt = async {
                if session.is_none() {
                    let client = self.connect(&mut fresh).await?;
                    session = Some((client, std::mem::take(&mut fresh)));
                }
                let (client, _) = session.as_ref().expect("session just set");
                Self::insert(client, id, Writer::LongLived).await
            };
            let result = tokio::select! {
                () = self.stop.cancelled() => return,
                r = tokio::time::timeout(self.opts.attempt_timeout, attempt) => r.unwrap_or_else(|_| Err(Failure::timeout())),
            };
            let seen = match &session {
                Some((_, s)) => Seen { phase: Phase::Insert, node_port: s.node_port, in_recovery: s.in_recovery },
                None => fresh,
            };
            let failed = result.is_err();
            self.record(Writer::LongLived, id, start, &seen, connected, result);
            if failed {
                session = None; // reconnect on the next attempt
            }
        }
    }
}

/// A classified failure.
#[derive(Debug)]
struct Failure {
    outcome: Outcome,
    sqlstate: Option<String>,
    message: String,
}

impl Failure {
    fn timeout() -> Failure {
        Failure { outcome: Outcome::Timeout, sqlstate: None, message: "attempt timed out".to_owned() }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        let message = error_chain(&e);
        if let Some(code) = e.code() {
            let outcome = match code.code() {
                "57P03" => Outcome::CannotConnectNow,
                "25006" => Outcome::ReadOnly,
                "57P01" => Outcome::AdminShutdown,
                _ => Outcome::OtherSqlstate,
            };
            return Failure { outcome, sqlstate: Some(code.code().to_owned()), message };
        }
        Failure { outcome: classify_io(&e), sqlstate: None, message }
    }
}

/// Classifies a non-database error by the first `io::Error` in its source chain.
fn classify_io(e: &tokio_postgres::Error) -> Outcome {
    use std::io::ErrorKind;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused => Outcome::Refused,
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => Outcome::Reset,
                ErrorKind::UnexpectedEof => Outcome::Closed,
                ErrorKind::TimedOut => Outcome::Timeout,
                _ => Outcome::Other,
            };
        }
        source = s.source();
    }
    if e.is_closed() {
        return Outcome::Closed;
    }
    // tokio-postgres's Kind::Timeout ("timeout waiting for server") carries no io::Error.
    if e.to_string().starts_with("timeout") {
        return Outcome::Timeout;
    }
    Outcome::Other
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Per-writer numbers of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WriterSummary {
    pub attempts: usize,
    pub successes: usize,
    /// Failed attempts by [`Outcome::label`] (SQLSTATE-qualified for `sqlstate`).
    pub errors: BTreeMap<String, usize>,
    /// The longest time without an acknowledged write, counting from the start and to the end.
    pub longest_gap_ms: f64,
    /// When that gap began (ms since the start).
    pub longest_gap_from_ms: f64,
    /// Attempts that reached a node in recovery (identity says so, or SQLSTATE 25006).
    pub read_only_hits: usize,
}

impl WriterSummary {
    pub fn failures(&self) -> usize {
        self.attempts - self.successes
    }
}

/// The numbers of a run, per writer and in total.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub per_writer: BTreeMap<Writer, WriterSummary>,
    /// Acknowledged ids missing on the final leader.
    pub lost: Vec<i64>,
}

impl Summary {
    /// The summary of one writer (empty if it did not run).
    pub fn writer(&self, w: Writer) -> WriterSummary {
        self.per_writer.get(&w).cloned().unwrap_or_default()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (w, s) in &self.per_writer {
            writeln!(
                f,
                "  {w:<10} attempts {:>4}  ok {:>4}  errors {:?}  longest gap {:.2} s (from {:.2} s)  read-only hits {}",
                s.attempts,
                s.successes,
                s.errors,
                s.longest_gap_ms / 1000.0,
                s.longest_gap_from_ms / 1000.0,
                s.read_only_hits
            )?;
        }
        write!(f, "  lost acknowledged writes: {} {:?}", self.lost.len(), &self.lost[..self.lost.len().min(20)])
    }
}

impl Run {
    /// Acknowledged ids.
    pub fn acked(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| a.outcome == Outcome::Ok)
    }

    /// Attempts of `writer`.
    pub fn of(&self, writer: Writer) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(move |a| a.writer == writer)
    }

    /// Failed attempts of `writer`.
    pub fn failed(&self, writer: Writer) -> impl Iterator<Item = &Attempt> {
        self.of(writer).filter(|a| a.outcome != Outcome::Ok)
    }

    /// The switchover rule (docs/failover.md, "The one broken session of a switchover"): every
    /// failed attempt of `writer` is a shutdown break ([`Outcome::is_shutdown_break`]), and there
    /// is at most one (attempts are sequential). `Err` says which part failed, with the attempts.
    pub fn only_the_shutdown_broke(&self, writer: Writer) -> Result<(), String> {
        let failed: Vec<&Attempt> = self.failed(writer).collect();
        let other: Vec<&&Attempt> = failed.iter().filter(|a| !a.outcome.is_shutdown_break()).collect();
        if !other.is_empty() {
            return Err(format!("{writer}: failures other than the shutdown of its live session: {other:#?}"));
        }
        if failed.len() > 1 {
            return Err(format!("{writer}: more than the one session the shutdown broke: {failed:#?}"));
        }
        Ok(())
    }

    /// Acknowledged ids that `leader` (a direct connection to the final leader) does not have.
    ///
    /// # Errors
    /// The read-back query failed.
    pub async fn missing_on(&self, leader: &tokio_postgres::Client) -> Result<Vec<i64>, tokio_postgres::Error> {
        let rows = leader.query(&format!("SELECT id FROM {TABLE}"), &[]).await?;
        let present: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let mut missing: Vec<i64> = self.acked().map(|a| a.id).filter(|id| !present.contains(id)).collect();
        missing.sort_unstable();
        Ok(missing)
    }

    /// Counts per writer; `lost` comes from [`Run::missing_on`].
    pub fn summary(&self, lost: Vec<i64>) -> Summary {
        let mut per_writer = BTreeMap::new();
        for w in [Writer::NewConn, Writer::LongLived] {
            let attempts: Vec<&Attempt> = self.of(w).collect();
            if attempts.is_empty() {
                continue;
            }
            let mut s = WriterSummary { attempts: attempts.len(), ..WriterSummary::default() };
            let mut last_ok = 0.0_f64;
            let mut oks: Vec<f64> = Vec::new();
            for a in &attempts {
                if a.outcome == Outcome::Ok {
                    s.successes += 1;
                    oks.push(a.end_ms);
                } else {
                    let key = match (&a.outcome, &a.sqlstate) {
                        (Outcome::OtherSqlstate, Some(code)) => format!("sqlstate {code}"),
                        (o, _) => o.label().to_owned(),
                    };
                    *s.errors.entry(key).or_default() += 1;
                }
                if a.in_recovery == Some(true) || a.outcome == Outcome::ReadOnly {
                    s.read_only_hits += 1;
                }
            }
            oks.sort_by(f64::total_cmp);
            oks.push(self.duration_ms);
            for t in oks {
                if t - last_ok > s.longest_gap_ms {
                    s.longest_gap_ms = t - last_ok;
                    s.longest_gap_from_ms = last_ok;
                }
                last_ok = t;
            }
            per_writer.insert(w, s);
        }
        Summary { per_writer, lost }
    }

    /// The run as pretty JSON (the raw log for the report).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a run serialises")
    }

    /// The attempts back from [`Run::to_csv`] (messages are not in the CSV).
    ///
    /// # Errors
    /// A line that does not have the columns `to_csv` writes.
    pub fn attempts_from_csv(text: &str) -> Result<Vec<Attempt>, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate().skip(1).filter(|(_, l)| !l.is_empty()) {
            let bad = || format!("line {}: `{line}`", n + 1);
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 10 {
                return Err(bad());
            }
            let writer = match f[0] {
                "new_conn" => Writer::NewConn,
                "long_lived" => Writer::LongLived,
                _ => return Err(bad()),
            };
            let phase = match f[5] {
                "Connect" => Phase::Connect,
                "Identify" => Phase::Identify,
                "Insert" => Phase::Insert,
                _ => return Err(bad()),
            };
            out.push(Attempt {
                writer,
                id: f[1].parse().map_err(|_| bad())?,
                start_ms: f[2].parse().map_err(|_| bad())?,
                end_ms: f[3].parse().map_err(|_| bad())?,
                outcome: Outcome::from_label(f[4]).ok_or_else(bad)?,
                phase,
                sqlstate: (!f[6].is_empty()).then(|| f[6].to_owned()),
                message: None,
                node_port: if f[7].is_empty() { None } else { Some(f[7].parse().map_err(|_| bad())?) },
                in_recovery: if f[8].is_empty() { None } else { Some(f[8] == "true") },
                connected: f[9] == "true",
            });
        }
        Ok(out)
    }

    /// One CSV line per attempt, with a header.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("writer,id,start_ms,end_ms,outcome,phase,sqlstate,node_port,in_recovery,connected\n");
        for a in &self.attempts {
            s.push_str(&format!(
                "{},{},{:.1},{:.1},{},{:?},{},{},{},{}\n",
                a.writer,
                a.id,
                a.start_ms,
                a.end_ms,
                a.outcome.label(),
                a.phase,
                a.sqlstate.as_deref().unwrap_or(""),
                a.node_port.map(|p| p.to_string()).unwrap_or_default(),
                a.in_recovery.map(|r| r.to_string()).unwrap_or_default(),
                a.connected
            ));
        }
        s
    }
}

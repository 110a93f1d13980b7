//! One health checker task per backend: a persistent tokio-postgres connection that runs the
//! probe every `interval` (`fast_interval` while there is no leader) under `timeout`, and reports
//! each result to the elector as a [`Report`]. It never decides anything: hysteresis and the leader
//! rules live in `topology`.
//!
//! What each outcome reports (DESIGN.md rule 2):
//! - the probe answered: [`Observation::Checked`];
//! - connecting or the probe failed or timed out: [`Observation::Failed`] (counts toward `fall`);
//!   a timed-out connection is dropped, since a hung server would queue the next probe behind it;
//! - the connection ended by itself (EOF, reset, the server terminating us):
//!   [`Observation::Lost`] at once, then an immediate re-check (a reconnect).
//!
//! - a client could not be connected (the elector pokes `recheck`): the established connection
//!   is dropped and the check runs on a new one, since an old connection can outlive what new
//!   clients meet (a smart shutdown answers 57P03 to new connections only).
//!
//! Connect failures back off from `fast_interval` doubling up to the check interval; while there is
//! no leader the check interval *is* `fast_interval`, so a promotion is seen within ~100 ms.
//!
//! Addresses: every check resolves the configured `host:port` once (an IP literal costs nothing).
//! The health connection is made to one resolved address, kept while the name still resolves to
//! it, and each probe reports that address ([`Probe::address`]): clients are connected to exactly
//! the server that was checked, never to a fresh resolution of the name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postgres_native_tls::MakeTlsConnector;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

use crate::config::{HostPort, Secret, SslMode};
use crate::metrics::Metrics;
use crate::topology::read::{parse_lsn, Wal};
use crate::topology::{BackendId, Observation, Probe, Report, RoutingTable, Source};

/// The probe. `pg_is_in_recovery()` is read once (the subquery with a volatile function is not
/// flattened), so the timeline column cannot disagree with it; `pg_walfile_name` raises an error
/// on a standby, hence the CASE. The timeline is the first 8 hex digits of the current WAL file
/// name (DESIGN.md rule 6): `pg_control_checkpoint()` lags a promotion until the next checkpoint.
/// For lag (rule 10) it also reads the WAL position: a primary's current LSN (read after its
/// timeline, so never older than it), a replica's replay (else receive) LSN, and its WAL
/// receiver's state and timeline (visible with pg_monitor; otherwise NULL: not streaming).
const PROBE_SQL: &str =
    "SELECT r, CASE WHEN r THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
                         (CASE WHEN r THEN COALESCE(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn()) \
                         ELSE pg_current_wal_lsn() END)::text, w.status = 'streaming', w.received_tli \
                         FROM (SELECT pg_is_in_recovery() AS r) AS s \
                         LEFT JOIN (SELECT status, received_tli FROM pg_stat_wal_receiver) AS w ON true";
/// Read once per connection: timelines are comparable only within one system.
const SYSTEM_ID_SQL: &str = "SELECT system_identifier FROM pg_control_system()";

/// What one checker needs to know, taken from `[health]` and its `[[backend]]`.
#[derive(Clone)]
pub struct CheckSettings {
    pub name: String,
    pub address: HostPort,
    pub user: String,
    pub database: String,
    pub password: Option<Secret>,
    pub interval: Duration,
    pub fast_interval: Duration,
    pub timeout: Duration,
    pub sslmode: SslMode,
    /// The TLS connector for every sslmode but `disable` (built once by `app`).
    pub tls: Option<MakeTlsConnector>,
}

/// Builds the TLS connector for `sslmode` (`None` for `disable`): `prefer` and `require` encrypt
/// without verifying, as libpq does; `verify-full` checks the chain against `ca_file` (or the
/// system roots) and the host name.
///
/// # Errors
/// `ca_file` cannot be read or holds no certificate; the message names the file.
pub fn tls_connector(sslmode: SslMode, ca_file: Option<&std::path::Path>) -> Result<Option<MakeTlsConnector>, String> {
    let mut builder = native_tls::TlsConnector::builder();
    match sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => {
            builder.danger_accept_invalid_certs(true).danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {
            if let Some(path) = ca_file {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| format!("health.ca_file: cannot read {}: {e}", path.display()))?;
                let mut found = 0;
                for block in
                    pem.split_inclusive("-----END CERTIFICATE-----").filter(|b| b.contains("BEGIN CERTIFICATE"))
                {
                    let cert = native_tls::Certificate::from_pem(block.as_bytes())
                        .map_err(|e| format!("health.ca_file: {} holds an invalid certificate: {e}", path.display()))?;
                    builder.add_root_certificate(cert);
                    found += 1;
                }
                if found == 0 {
                    return Err(format!("health.ca_file: {} holds no PEM certificate", path.display()));
                }
            }
        }
    }
    let connector = builder.build().map_err(|e| format!("cannot set up TLS for health checks: {e}"))?;
    Ok(Some(MakeTlsConnector::new(connector)))
}

/// A checker task for one backend. Cloned to restart it (see `task::restart_on_failure`).
#[derive(Clone)]
pub struct Checker {
    pub id: BackendId,
    pub settings: CheckSettings,
    /// To the elector; closing it (elector gone) ends the checker.
    pub reports: mpsc::Sender<Report>,
    /// Read to pick the interval: fast while there is no leader.
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    /// Poked (by the elector) when a client could not be connected: check now.
    pub recheck: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Stops the checker (shutdown, or the backend removed by a reload).
    pub cancel: CancellationToken,
}

/// A live health connection.
struct Session {
    /// The resolved address it was made to.
    address: SocketAddr,
    client: Client,
    probe: Statement,
    system_id: Option<u64>,
    /// The tokio-postgres connection future; it completes when the connection is gone, and is
    /// aborted when the session is dropped.
    conn: AbortOnDrop,
}

/// The spawned tokio-postgres connection task, aborted when its owner goes.
struct AbortOnDrop(JoinHandle<Result<(), tokio_postgres::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The configured `host:port` resolved, duplicates removed, in resolver order.
async fn resolve(target: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for a in tokio::net::lookup_host((target.host.as_str(), target.port)).await? {
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    if addresses.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address"));
    }
    Ok(addresses)
}

/// Why a checker woke up between checks.
enum Wake {
    Timer,
    /// A client could not be connected to this backend.
    ClientFailed,
    /// The health connection ended by itself.
    Lost(String),
}

/// The result of one check attempt.
enum Outcome {
    Probe(Probe),
    Failed(String),
    Lost(String),
}

impl Checker {
    /// Runs until cancelled or the elector goes away. Cancel safe.
    pub async fn run(mut self) {
        let mut session: Option<Session> = None;
        let mut connect_failures: u32 = 0;
        // The previous check was an immediate re-check: never two in a row, so a server that
        // drops every connection cannot make the checker spin.
        let mut rechecked = false;
        loop {
            let started = Instant::now();
            let outcome = match timeout(self.settings.timeout, self.check(&mut session)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    session = None;
                    Outcome::Failed(format!("health check timed out after {:?}", self.settings.timeout))
                }
            };
            let recheck_now = matches!(outcome, Outcome::Lost(_)) && !rechecked;
            rechecked = recheck_now;
            connect_failures = if session.is_some() { 0 } else { connect_failures.saturating_add(1) };
            if !self.report(outcome, started).await {
                return;
            }
            if recheck_now {
                continue;
            }
            let delay = self.next_delay(connect_failures);
            let has_leader = self.has_leader();
            let wake = tokio::select! {
                () = self.cancel.cancelled() => return,
                () = sleep(delay) => Wake::Timer,
                () = self.recheck.notified() => Wake::ClientFailed,
                lost = wait_lost(&mut session) => Wake::Lost(lost),
                // A leader just disappeared: switch to fast checks at once.
                Ok(_) = self.routing.wait_for(|t| t.leader.is_none()), if has_leader => Wake::Timer,
            };
            match wake {
                Wake::Timer => {}
                // Check what a new client would meet: a new connection.
                Wake::ClientFailed => session = None,
                Wake::Lost(lost) => {
                    session = None;
                    rechecked = true;
                    if !self.report(Outcome::Lost(lost), Instant::now()).await {
                        return;
                    }
                }
            }
        }
    }

    fn has_leader(&self) -> bool {
        self.routing.borrow().leader.is_some()
    }

    /// The pause before the next check: the interval, fast while there is no leader, and a
    /// backoff from `fast_interval` for repeated connect failures.
    fn next_delay(&self, connect_failures: u32) -> Duration {
        let s = &self.settings;
        let interval = if self.has_leader() { s.interval } else { s.fast_interval.min(s.interval) };
        if connect_failures == 0 {
            return interval;
        }
        let backoff = s.fast_interval.saturating_mul(1 << connect_failures.min(16).saturating_sub(1));
        backoff.min(interval)
    }

    /// One check: resolve, connect if needed, then probe. Not cancel safe as to the session (a
    /// cancelled check leaves `session` as it was; the caller drops it on timeout).
    async fn check(&self, session: &mut Option<Session>) -> Outcome {
        let target = &self.settings.address;
        let addresses = match resolve(target).await {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(format!("cannot resolve {target}: {e}")),
        };
        if let Some(s) = session.as_ref().filter(|s| !addresses.contains(&s.address)) {
            tracing::info!(backend = %self.settings.name, old = %s.address, new = ?addresses,
                "the backend's name resolves elsewhere now; reconnecting the health check");
            *session = None;
        }
        if session.is_none() {
            let mut failure = None;
            for address in &addresses {
                match self.connect(*address).await {
                    Ok(s) => {
                        tracing::info!(backend = %self.settings.name, %address, system_id = ?s.system_id,
                            "health connection established");
                        *session = Some(s);
                        break;
                    }
                    Err(e) => failure = Some(format!("cannot connect to {address} for health check: {}", describe(&e))),
                }
            }
            if let Some(error) = failure.filter(|_| session.is_none()) {
                return Outcome::Failed(error);
            }
        }
        let Some(s) = session.as_ref() else { return Outcome::Failed("no health connection".to_owned()) };
        let (address, system_id) = (s.address, s.system_id);
        match s.client.query_one(&s.probe, &[]).await {
            Ok(row) => match parse_probe(&row) {
                Ok((in_recovery, timeline, wal)) => {
                    Outcome::Probe(Probe { address, in_recovery, timeline, system_id, wal })
                }
                Err(e) => Outcome::Failed(e),
            },
            Err(e) if s.client.is_closed() || e.is_closed() => {
                *session = None;
                Outcome::Lost(format!("health connection lost: {}", describe(&e)))
            }
            Err(e) => {
                *session = None;
                Outcome::Failed(format!("health check query failed: {}", describe(&e)))
            }
        }
    }

    /// A health connection to one resolved `address` (the configured host name still names the
    /// server for TLS verification).
    async fn connect(&self, address: SocketAddr) -> Result<Session, tokio_postgres::Error> {
        let s = &self.settings;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&s.address.host)
            .hostaddr(address.ip())
            .port(address.port())
            .user(&s.user)
            .dbname(&s.database)
            .application_name("pgleader-health")
            .connect_timeout(s.timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .tcp_user_timeout(s.timeout.max(Duration::from_secs(1)) * 3);
        if let Some(p) = &s.password {
            cfg.password(p.expose());
        }
        cfg.ssl_mode(match s.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let (client, conn) = match &s.tls {
            Some(tls) => {
                let (client, connection) = cfg.connect(tls.clone()).await?;
                (client, tokio::spawn(connection))
            }
            None => {
                let (client, connection) = cfg.connect(NoTls).await?;
                (client, tokio::spawn(connection))
            }
        };
        // From here the connection task is owned by a guard: a failed setup aborts it.
        let conn = AbortOnDrop(conn);
        let probe = client.prepare(PROBE_SQL).await?;
        let system_id = match client.query_one(SYSTEM_ID_SQL, &[]).await {
            Ok(row) => row.try_get::<_, i64>(0).ok().map(|v| v as u64),
            Err(e) => {
                // Without it two primaries cannot be compared, so the decision fails closed.
                tracing::warn!(backend = %s.name, error = %describe(&e),
                    "cannot read the system identifier; grant pg_monitor to the health-check user");
                None
            }
        };
        Ok(Session { address, client, probe, system_id, conn })
    }

    /// Sends one observation; `false` when the elector is gone.
    async fn report(&self, outcome: Outcome, started: Instant) -> bool {
        let name = self.settings.name.as_str();
        let mut latency = None;
        let (observation, result) = match outcome {
            Outcome::Probe(p) => {
                let took = started.elapsed();
                self.metrics.health_check_duration.with_label_values(&[name]).observe(took.as_secs_f64());
                latency = Some(took);
                (Observation::Checked(p), "ok")
            }
            Outcome::Failed(error) => {
                tracing::debug!(backend = name, %error, "health check failed");
                (Observation::Failed { error }, "failed")
            }
            Outcome::Lost(error) => {
                tracing::warn!(backend = name, %error, "health connection lost; holding new sessions and re-checking");
                (Observation::Lost { error }, "lost")
            }
        };
        self.metrics.health_checks.with_label_values(&[name, result]).inc();
        let report = Report {
            backend: self.id,
            observation,
            at: Instant::now().into_std(),
            latency,
            source: Source::HealthCheck,
        };
        self.reports.send(report).await.is_ok()
    }
}

/// Completes when the session's connection ends; pending forever without a session.
async fn wait_lost(session: &mut Option<Session>) -> String {
    match session {
        Some(s) => match (&mut s.conn.0).await {
            Ok(Ok(())) => "the server closed the health connection".to_owned(),
            Ok(Err(e)) => describe(&e),
            Err(e) => format!("health connection task ended: {e}"),
        },
        None => std::future::pending().await,
    }
}

/// An error with its database message, if any, without the password or other secrets (the
/// tokio-postgres errors carry no connection parameters).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            msg
        }
    }
}
/// The probe's row: recovery, a primary's timeline, and the WAL position (`None` when the row
/// has none: the check still counts, the backend just takes no read sessions).
fn parse_probe(row: &tokio_postgres::Row) -> Result<(bool, Option<u32>, Option<Wal>), String> {
    let bad = |e: tokio_postgres::Error| format!("unexpected probe result: {e}");
    let in_recovery: bool = row.try_get(0).map_err(bad)?;
    let timeline = match row.try_get::<_, Option<String>>(1).map_err(bad)? {
        _ if in_recovery => None,
        Some(hex) => {
            Some(u32::from_str_radix(&hex, 16).map_err(|_| format!("unexpected timeline `{hex}` from the probe"))?)
        }
        None => return Err("the probe returned no timeline for a primary".to_owned()),
    };
    let lsn = row.try_get::<_, Option<String>>(2).map_err(bad)?.as_deref().and_then(parse_lsn);
    let streaming = row.try_get::<_, Option<bool>>(3).map_err(bad)?.unwrap_or(false);
    let receive_timeline = row.try_get::<_, Option<i32>>(4).map_err(bad)?.and_then(|t| u32::try_from(t).ok());
    Ok((in_recovery, timeline, lsn.map(|lsn| Wal { lsn, streaming, receive_timeline })))
}

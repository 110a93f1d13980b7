//! The composition root: builds every task from a [`Config`], wires their channels, and runs the
//! drain and reload sequences. `main` and the integration tests share [`start`].
//!
//! Startup: bind the proxy, read-only (`[read_only]`) and admin listeners first (fail fast), then
//! spawn one health checker per backend, the elector, the admin server and the accept loops (one
//! per listener, in one task: the end of either is fatal).
//!
//! Layout (thread-per-core): each client listener is bound once per worker (`[proxy] workers`,
//! by default one per CPU this process may use) with `SO_REUSEPORT`, and each worker is an OS
//! thread running a single-threaded runtime with one set of accept loops; a session lives on the
//! thread that accepted it, so its two sockets and its task never cross threads. Health checks,
//! the elector, the spare filler, the admin server and this supervisor run on the main runtime
//! (one thread). The drain: the workers stop accepting on one token, their sessions are in one
//! tracker, and each worker keeps its runtime until the tracker is empty; any worker's accept
//! loop ending outside a drain is fatal.
//!
//! Fencing (`[etcd]`): one etcd reader task ([`EtcdWatcher`]) reports what it reads; `app`
//! turns each report into a [`LeaseEvent`] for the elector (and times the reads). A reload that
//! changes how to read (`[etcd]`'s credentials, TLS files, timeout, or `[health]`'s pace)
//! restarts the reader and keeps the etcd view, so no session is cut for it; only another
//! cluster (other endpoints, namespace or scope) starts the view afresh.
//!
//! Supervision: health checkers and the etcd reader run under [`task::restart_on_failure`] (a task that panics is
//! restarted with backoff, logged at ERROR and counted); the end of the elector, the admin server
//! or the accept loop is fatal: pgleader drains and exits non-zero so the orchestrator restarts
//! it, rather than run on with a frozen routing table or no listener.
//!
//! Drain ([`Running::begin_shutdown`], SIGTERM/SIGINT):
//! 1. mark not ready: `/readyz` answers 503;
//! 2. stop accepting: the accept loop ends and the listener is dropped;
//! 3. wait for open sessions up to `shutdown_grace`;
//! 4. then close the remaining sessions;
//! 5. stop health checkers, the elector and the admin server last, so `/metrics` stays
//!    scrapeable during the drain.
//!
//! Reload ([`Running::reload`], SIGHUP): the new config is diffed against the running one.
//! Backends, `[health]` and the `[proxy]` timeouts and limit apply at once; a backend keeps its
//! identity (and its sessions) while its name and address stay the same. Listen addresses and
//! `[log]` need a restart: they are logged and ignored. An invalid file changes nothing.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, AdminReload, AdminState};
use crate::config::{Config, ConfigDiff};
use crate::elector::{Elector, EtcdEvent, Member, Membership};
use crate::etcd::{EtcdReport, EtcdSettings, EtcdWatcher, WatchEvent};
use crate::health::{self, CheckSettings, Checker};
use crate::metrics::Metrics;
use crate::proxy::balance::{Balance, Handoff};
use crate::proxy::spares::Spares;
use crate::proxy::{self, Proxy, ProxySettings, Sessions, Shared};
use crate::signals::{SignalEvent, Signals};
use crate::task;
use crate::topology::lease::{LeaderLease, LeaseEvent, LeaseRead, MemberEntry, PatroniConfig};
use crate::topology::read::{ReadFallback, ReadPolicy};
use crate::topology::{BackendId, FenceMode, FencePolicy, Observation, Policy, Report, Route, RoutingTable, Source};

/// A running pgleader. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    /// The address the proxy listener bound (useful with port 0).
    pub proxy_addr: SocketAddr,
    /// The read-only listener's address, with `[read_only]`.
    pub read_only_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    draining: CancellationToken,
    reload_tx: mpsc::Sender<ReloadRequest>,
    supervisor: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts the drain (see the module docs); returns at once.
    pub fn begin_shutdown(&self) {
        self.draining.cancel();
    }

    /// Waits until pgleader has stopped, by drain or by a fatal task failure.
    ///
    /// # Errors
    /// A background task ended unexpectedly.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.await.context("join the supervisor task")?
    }

    /// Drains and waits.
    ///
    /// # Errors
    /// As [`Running::wait`].
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.wait().await
    }

    /// Re-reads the config file pgleader was started with ([`start_with_file`]) and applies it.
    ///
    /// # Errors
    /// The file is invalid or cannot be applied; the running config is untouched.
    pub async fn reload_file(&self) -> Result<ConfigDiff, String> {
        request_reload(&self.reload_tx, ReloadSource::File).await
    }

    /// Applies a new, already validated config; returns what changed.
    ///
    /// # Errors
    /// pgleader is stopping, or the config could not be applied (the old one keeps running).
    pub async fn reload(&self, config: Config) -> Result<ConfigDiff, String> {
        request_reload(&self.reload_tx, ReloadSource::Config(Box::new(config))).await
    }
}

/// Where a reload takes its configuration from.
enum ReloadSource {
    /// The file pgleader was started with.
    File,
    Config(Box<Config>),
}

type ReloadRequest = (ReloadSource, oneshot::Sender<Result<ConfigDiff, String>>);

async fn request_reload(tx: &mpsc::Sender<ReloadRequest>, source: ReloadSource) -> Result<ConfigDiff, String> {
    let (reply, rx) = oneshot::channel();
    tx.send((source, reply)).await.map_err(|_| "pgleader is shutting down".to_owned())?;
    rx.await.map_err(|_| "pgleader is shutting down".to_owned())?
}

/// Binds, spawns everything, and returns at once. Without a file, `POST /reload` and SIGHUP are
/// refused; [`Running::reload`] still works.
///
/// # Errors
/// A listener cannot be bound, or the health-check password cannot be read.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_inner(config, None).await
}

/// [`start`] for a config read from `path`, which SIGHUP and `POST /reload` re-read.
///
/// # Errors
/// As [`start`].
pub async fn start_with_file(config: Config, path: PathBuf) -> anyhow::Result<Running> {
    start_inner(config, Some(path)).await
}

async fn start_inner(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Running> {
    // A Config changed in code after validation must still respect the bounds.
    let bad = config.out_of_bounds();
    if !bad.is_empty() {
        anyhow::bail!("invalid configuration: {}", bad.join("; "));
    }
    let client_listeners = bind_clients(&config)?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("bind admin listener {}", config.admin.listen))?;
    let (first, first_read) = &client_listeners[0];
    let proxy_addr = first.local_addr().context("read proxy listener address")?;
    let read_only_addr =
        first_read.as_ref().map(StdListener::local_addr).transpose().context("read read-only listener address")?;
    let admin_addr = admin_listener.local_addr().context("read admin listener address")?;
    let password = config.health_password().map_err(anyhow::Error::msg).context("read the health-check password")?;
    let tls = health::tls_connector(config.health.sslmode, config.health.ca_file.as_deref())
        .map_err(anyhow::Error::msg)
        .context("set up TLS for health checks")?;

    let names: Vec<String> = config.backend.iter().map(|b| b.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    metrics.set_read_enabled(config.read_only.is_some());
    let (table_tx, table_rx) = watch::channel(Arc::new(RoutingTable::initial()));
    let (reports_tx, reports_rx) = mpsc::channel::<Report>(1024);
    let (settings_tx, settings_rx) = watch::channel(Arc::new(proxy_settings(&config)));
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (admin_reload_tx, admin_reload_rx) = mpsc::channel(4);
    let draining = CancellationToken::new();
    let background = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let limit = Arc::new(Semaphore::new(config.proxy.max_connections));
    let config_generation = Arc::new(AtomicU64::new(1));

    let members: Vec<Member> = config
        .backend
        .iter()
        .zip(0..)
        .map(|(b, i)| Member::new(BackendId(i), &b.name, &b.address.to_string(), b.member(), b.verify_conn_url))
        .collect();
    let (membership_tx, membership_rx) =
        watch::channel(Arc::new(Membership { members: members.clone(), policy: policy(&config), etcd_generation: 0 }));
    let (lease_tx, lease_rx) = mpsc::channel::<EtcdEvent>(64);
    let mut sup = Supervisor {
        config: config.clone(),
        config_path,
        password,
        tls,
        members: members.clone(),
        next_id: members.len() as u32,
        checkers: Vec::new(),
        tasks: JoinSet::new(),
        reports_tx: reports_tx.clone(),
        table_rx: table_rx.clone(),
        membership_tx,
        settings_tx,
        limit: Arc::clone(&limit),
        current_max: config.proxy.max_connections,
        metrics: Arc::clone(&metrics),
        background: background.clone(),
        config_generation: Arc::clone(&config_generation),
        lease_tx,
        etcd: None,
        etcd_generation: 0,
    };
    for m in &members {
        sup.spawn_checker(m);
    }
    sup.start_etcd(0).map_err(anyhow::Error::msg).context("set up the etcd reader")?;
    let elector = Elector::new(membership_rx, reports_rx, lease_rx, table_tx, Arc::clone(&metrics), background.clone());
    sup.tasks.spawn(async move {
        elector.run().await;
        "elector"
    });
    let admin = Admin {
        listener: admin_listener,
        state: Arc::new(AdminState {
            routing: table_rx.clone(),
            metrics: Arc::clone(&metrics),
            draining: draining.clone(),
            config_generation,
            reload: admin_reload_tx,
            read_only_listen: read_only_addr,
        }),
        stop: background.clone(),
    };
    sup.tasks.spawn(async move {
        admin.run().await;
        "admin server"
    });
    let tracker = TaskTracker::new();
    let spares = Arc::new(Spares::new(Arc::clone(&metrics)));
    spawn_spare_filler(&spares, &table_rx, &settings_rx, &metrics, draining.clone());
    let shared = Arc::new(Shared {
        routing: table_rx,
        settings: settings_rx,
        reports: reports_tx,
        metrics,
        hard_stop: hard_stop.clone(),
        sessions: Sessions::default(),
        spares,
        next_id: AtomicU64::new(1),
    });
    let acceptors = Acceptors {
        shared,
        limit,
        stop_accepting: draining.clone(),
        tracker: tracker.clone(),
        refusals: proxy::refusals_in_flight(),
    };
    let workers = client_listeners.len();
    let accept_loop = spawn_workers(client_listeners, &acceptors)?;
    tracing::info!(proxy = %proxy_addr, read_only = ?read_only_addr, admin = %admin_addr, backends = ?names, workers, "pgleader started");

    let drain = Drain { draining: draining.clone(), hard_stop, tracker, accept_loop, accept_done: false };
    let supervisor = tokio::spawn(sup.run(drain, reload_rx, admin_reload_rx));
    Ok(Running { proxy_addr, read_only_addr, admin_addr, draining, reload_tx, supervisor })
}

/// Runs pgleader until SIGTERM/SIGINT, reloading `config_path` on SIGHUP. Used by `main`.
///
/// # Errors
/// Startup failed, or a background task ended unexpectedly.
pub async fn run_with_signals(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let mut signals = Signals::install().context("install signal handlers")?;
    let running = start_with_file(config, config_path).await?;
    loop {
        tokio::select! {
            event = signals.recv() => match event {
                SignalEvent::Shutdown(name) => {
                    tracing::info!(signal = name, "draining: not ready, no new clients, sessions may finish");
                    running.begin_shutdown();
                    break;
                }
                // The supervisor logs and counts the result.
                SignalEvent::Reload => drop(running.reload_file().await),
            },
            () = running.draining.cancelled() => break,
        }
    }
    let mut wait = std::pin::pin!(running.wait());
    loop {
        tokio::select! {
            r = &mut wait => return r,
            event = signals.recv() => if let SignalEvent::Shutdown(name) = event {
                anyhow::bail!("{name} received again during the drain: exiting at once");
            },
        }
    }
}

/// The spare connections' filler (`[proxy] spare_connections`), on the main runtime, restarted
/// if it fails; every spare is closed when the drain begins.
fn spawn_spare_filler(
    spares: &Arc<Spares>,
    routing: &watch::Receiver<Arc<crate::topology::RoutingTable>>,
    settings: &watch::Receiver<Arc<ProxySettings>>,
    metrics: &Arc<crate::metrics::Metrics>,
    draining: CancellationToken,
) {
    let (spares, routing, settings) = (Arc::clone(spares), routing.clone(), settings.clone());
    let (metrics, stop) = (Arc::clone(metrics), draining.clone());
    tokio::spawn(async move {
        let fill = {
            let spares = Arc::clone(&spares);
            move || Arc::clone(&spares).fill(routing.clone(), settings.clone(), stop.clone())
        };
        task::restart_on_failure("spare_filler", "leader".to_owned(), metrics, draining, fill, |_| {}).await;
        spares.clear();
    });
}

/// One main listener and, with `[read_only]`, one read-only listener, not yet registered with a
/// runtime.
type ListenerSet = (StdListener, Option<StdListener>);

/// `[proxy] workers` when unset: one per CPU this process may use (its affinity mask and cgroup
/// quota, as `std::thread::available_parallelism` reads them).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Binds the client listeners, one set per worker, all on the same addresses with
/// `SO_REUSEPORT` (the first set fixes a port 0 for the others). `SO_REUSEPORT` would also let a
/// second pgleader of the same user share the port and take half its clients unnoticed: each
/// configured port is first bound once without it, which fails if anything else holds the port.
/// A port 0 is not probed: the kernel gives the first set a port nobody holds, and probing it
/// would free it for a moment, for any outgoing connection to take as its ephemeral port.
fn bind_clients(config: &Config) -> anyhow::Result<Vec<ListenerSet>> {
    let max = config.proxy.max_connections;
    let workers = config.proxy.workers.unwrap_or_else(default_workers);
    let reuse_port = workers > 1;
    let probe = |at: SocketAddr, what: &str| -> anyhow::Result<Option<StdListener>> {
        (reuse_port && at.port() != 0)
            .then(|| StdListener::bind(at).with_context(|| format!("bind {what} {at}")))
            .transpose()
    };
    let mut main_at = config.proxy.listen;
    let mut read_at = config.read_only.as_ref().map(|r| r.listen);
    {
        // Both probes are held until both have bound, so that two overlapping addresses of this
        // process (0.0.0.0:P and 127.0.0.1:P) fail as they would without SO_REUSEPORT; both are
        // closed before the SO_REUSEPORT binds, which they would block.
        let _main = probe(main_at, "proxy listener")?;
        let _read = read_at.map(|at| probe(at, "read-only listener")).transpose()?;
    }
    let mut sets = Vec::new();
    for _ in 0..workers {
        let main =
            proxy::bind_std(main_at, max, reuse_port).with_context(|| format!("bind proxy listener {main_at}"))?;
        main_at = main.local_addr().context("read proxy listener address")?;
        let read = match read_at {
            Some(at) => {
                let read =
                    proxy::bind_std(at, max, reuse_port).with_context(|| format!("bind read-only listener {at}"))?;
                read_at = Some(read.local_addr().context("read read-only listener address")?);
                Some(read)
            }
            None => None,
        };
        sets.push((main, read));
    }
    Ok(sets)
}

/// Where a worker receives the connections other workers hand it ([`proxy::balance`]).
type Inbox = mpsc::UnboundedReceiver<Handoff>;

/// What every accept loop shares, whichever runtime it runs on.
#[derive(Clone)]
struct Acceptors {
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    stop_accepting: CancellationToken,
    tracker: TaskTracker,
    refusals: Arc<Semaphore>,
}

impl Acceptors {
    /// Runs one set's accept loops and takes the connections other workers hand over; either
    /// loop ending ends both (the supervisor treats it as fatal unless draining), and then the
    /// handoffs already sent here still run.
    async fn run(self, main: TcpListener, read: Option<TcpListener>, balance: Balance, mut inbox: Inbox) {
        let balance = Arc::new(balance);
        let accept = |listener, route| Proxy {
            listener,
            route,
            shared: Arc::clone(&self.shared),
            limit: Arc::clone(&self.limit),
            stop_accepting: self.stop_accepting.clone(),
            tracker: self.tracker.clone(),
            refusals: Arc::clone(&self.refusals),
            balance: Arc::clone(&balance),
        };
        let main = accept(main, Route::Write);
        let read = read.map(|l| accept(l, Route::Read));
        let accepting = async {
            match &read {
                Some(read) => tokio::select! {
                    () = main.run() => {}
                    () = read.run() => {}
                },
                None => main.run().await,
            }
        };
        tokio::select! {
            () = accepting => {}
            () = main.take_handoffs(&mut inbox) => {}
        }
        main.close_inbox(&mut inbox).await;
    }
}

/// One OS thread per listener set (`[proxy] workers`), each with a single-threaded runtime that
/// registers its listeners and accepts on them, so a session's client and backend sockets (and
/// its task) never leave that thread. The returned task ends when a worker's accept loop ends
/// outside a drain, or when all of them have ended in one.
fn spawn_workers(
    sets: Vec<ListenerSet>,
    acceptors: &Acceptors,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), String>>> {
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let count = sets.len();
    let balances = Balance::for_workers(&acceptors.shared.metrics, count);
    for (i, (set, balance)) in sets.into_iter().zip(balances).enumerate() {
        let (mine, ended) = (acceptors.clone(), ended_tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("pgleader-worker-{i}"))
            .spawn(move || run_worker(i, set, balance, mine, &ended));
        if let Err(e) = spawned {
            // The workers already running stop accepting and end once their sessions have.
            acceptors.stop_accepting.cancel();
            acceptors.tracker.close();
            return Err(e).with_context(|| format!("start worker thread {i}"));
        }
    }
    let draining = acceptors.stop_accepting.clone();
    Ok(tokio::spawn(async move {
        let mut open = count;
        while let Some(ended) = ended_rx.recv().await {
            open -= 1;
            if ended.is_err() || !draining.is_cancelled() || open == 0 {
                return ended;
            }
        }
        Err("the worker threads are gone".to_owned())
    }))
}

/// One worker thread: its accept loops, then its sessions until the drain has closed them all
/// (they run on this thread's runtime, which must outlive them).
fn run_worker(
    i: usize,
    (main, read): ListenerSet,
    (balance, inbox): (Balance, Inbox),
    acceptors: Acceptors,
    ended: &mpsc::UnboundedSender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = ended.send(Err(format!("worker {i} cannot start its runtime: {e}")));
            return;
        }
    };
    let tracker = acceptors.tracker.clone();
    let accepting = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let main =
                TcpListener::from_std(main).map_err(|e| format!("worker {i}: register the proxy listener: {e}"))?;
            let read = read
                .map(TcpListener::from_std)
                .transpose()
                .map_err(|e| format!("worker {i}: register the read-only listener: {e}"))?;
            acceptors.run(main, read, balance, inbox).await;
            Ok(())
        })
    }));
    let result = accepting
        .unwrap_or_else(|p| Err(format!("worker {i}'s accept loop panicked: {}", task::panic_message(p.as_ref()))));
    let _ = ended.send(result);
    runtime.block_on(tracker.wait());
}

fn proxy_settings(config: &Config) -> ProxySettings {
    ProxySettings {
        leader_wait_timeout: config.proxy.leader_wait_timeout,
        connect_timeout: config.proxy.connect_timeout,
        client_hello_timeout: config.proxy.client_hello_timeout,
        allow: config.proxy.allow.clone(),
        access_log: config.log.access,
        max_connections: config.proxy.max_connections,
        spare_connections: config.proxy.spare_connections,
        spare_max_age: config.proxy.spare_max_age,
    }
}

fn policy(config: &Config) -> Policy {
    let h = &config.health;
    // A checker reports at least every interval + timeout; allow a few missed beats. Saturating:
    // config validation bounds these, and arithmetic on them must not panic regardless.
    let stale_after = h.interval.saturating_add(h.timeout).saturating_mul(h.fall.saturating_add(2));
    let fence = config.etcd.as_ref().map(|e| FencePolicy {
        mode: match e.mode {
            crate::config::EtcdMode::Enforce => FenceMode::Enforce,
            crate::config::EtcdMode::Observe => FenceMode::Observe,
        },
        max_staleness: e.max_staleness,
    });
    let read = config.read_only.as_ref().map(|r| ReadPolicy {
        max_lag_bytes: r.max_lag_bytes,
        max_lag: r.max_lag,
        fallback: match r.fallback {
            crate::config::ReadFallbackConfig::Leader => ReadFallback::Leader,
            crate::config::ReadFallbackConfig::Refuse => ReadFallback::Refuse,
        },
    });
    Policy { rise: h.rise, fall: h.fall, stale_after, fence, read }
}

/// The etcd reader's settings from `[etcd]` and `[health]`'s pace.
///
/// # Errors
/// The etcd password cannot be read.
fn etcd_settings(config: &Config) -> Result<Option<EtcdSettings>, String> {
    let Some(e) = &config.etcd else { return Ok(None) };
    Ok(Some(EtcdSettings {
        endpoints: e.endpoints.clone(),
        namespace: e.namespace.clone(),
        scope: e.scope.clone(),
        timeout: e.timeout,
        interval: config.health.interval,
        fast_interval: config.health.fast_interval.min(config.health.interval),
        username: e.username.clone(),
        password: e.password()?,
        ca_file: e.ca_file.clone(),
        cert_file: e.cert_file.clone(),
        key_file: e.key_file.clone(),
    }))
}

/// What the elector needs of an etcd report (topology's own types); times successful reads.
fn lease_event(report: EtcdReport, metrics: &Metrics) -> LeaseEvent {
    match report {
        EtcdReport::Read(r) => {
            metrics.etcd_read_duration.observe(r.duration.as_secs_f64());
            LeaseEvent::Read(LeaseRead {
                read_start: r.read_start.into_std(),
                revision: r.revision,
                endpoint: r.endpoint,
                leader: r.leader.map(|l| LeaderLease { member: l.member, remaining: l.lease_remaining }),
                patroni: r.config.map(|c| PatroniConfig {
                    ttl: c.ttl,
                    loop_wait: c.loop_wait,
                    retry_timeout: c.retry_timeout,
                    failsafe_mode: c.failsafe_mode,
                    pause: c.pause,
                }),
                members: r.members.into_iter().map(|m| MemberEntry { name: m.name, conn_url: m.conn_url }).collect(),
            })
        }
        EtcdReport::ReadFailed { read_start, error } => LeaseEvent::ReadFailed { at: read_start.into_std(), error },
        EtcdReport::Watch(WatchEvent::Put { revision, member }) => {
            LeaseEvent::Changed { revision, member: Some(member) }
        }
        EtcdReport::Watch(WatchEvent::Delete { revision }) => LeaseEvent::Changed { revision, member: None },
        EtcdReport::Watch(WatchEvent::Ended { reason }) => LeaseEvent::WatchEnded { reason },
    }
}

/// The drain's handles.
struct Drain {
    draining: CancellationToken,
    /// Cancelled when the grace period ends: sessions close.
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    /// Ends when a listener's accept loop ends (any worker's, or all of
    /// them during the drain); `Err` says why when it was not a plain return.
    accept_loop: tokio::task::JoinHandle<Result<(), String>>,
    /// The accept loop's handle has already completed (a JoinHandle must not be polled again).
    accept_done: bool,
}

/// Owns the background tasks, applies reloads, and runs the drain.
struct Supervisor {
    config: Config,
    /// The file reloads re-read, if pgleader was started from one.
    config_path: Option<PathBuf>,
    password: Option<crate::config::Secret>,
    tls: Option<postgres_native_tls::MakeTlsConnector>,
    members: Vec<Member>,
    next_id: u32,
    /// One stop token per running checker, by backend.
    checkers: Vec<(BackendId, CancellationToken)>,
    tasks: JoinSet<&'static str>,
    reports_tx: mpsc::Sender<Report>,
    table_rx: watch::Receiver<Arc<RoutingTable>>,
    /// The elector's backend set and policy.
    membership_tx: watch::Sender<Arc<Membership>>,
    settings_tx: watch::Sender<Arc<ProxySettings>>,
    limit: Arc<Semaphore>,
    /// The size `limit` was last set to.
    current_max: usize,
    metrics: Arc<Metrics>,
    /// Stops checkers, the elector and the admin server: the drain's last step.
    background: CancellationToken,
    config_generation: Arc<AtomicU64>,
    /// To the elector: what the etcd reader saw.
    lease_tx: mpsc::Sender<EtcdEvent>,
    /// The running etcd reader's stop token and the `[etcd]` it runs with.
    etcd: Option<(CancellationToken, crate::config::EtcdConfig)>,
    etcd_generation: u64,
}

impl Supervisor {
    /// A member with an id never used before.
    fn new_member(&mut self, name: &str, address: &str, member: &str, verify_conn_url: bool) -> Member {
        self.next_id += 1;
        Member::new(BackendId(self.next_id - 1), name, address, member, verify_conn_url)
    }

    /// Starts the etcd reader for the current `[etcd]` (stopping the previous one), or stops it
    /// when the section is gone. Its reports reach the elector through `lease_event`, tagged
    /// with `generation`.
    ///
    /// # Errors
    /// The etcd settings are not usable (an unreadable password, TLS file or a bad endpoint).
    fn start_etcd(&mut self, generation: u64) -> Result<(), String> {
        let settings = etcd_settings(&self.config)?;
        if let Some(s) = &settings {
            s.validate()?;
        }
        if let Some((token, _)) = self.etcd.take() {
            token.cancel();
        }
        let members: Vec<String> = self.members.iter().map(|m| m.member.clone()).collect();
        self.metrics.set_etcd_enabled(settings.is_some(), &members);
        let (Some(settings), Some(section)) = (settings, self.config.etcd.clone()) else { return Ok(()) };
        let cancel = self.background.child_token();
        self.etcd = Some((cancel.clone(), section.clone()));
        let (reports_tx, mut reports_rx) = mpsc::channel::<EtcdReport>(64);
        let (lease_tx, metrics, stop) = (self.lease_tx.clone(), Arc::clone(&self.metrics), cancel.clone());
        tokio::spawn(async move {
            loop {
                let report = tokio::select! {
                    () = stop.cancelled() => return,
                    r = reports_rx.recv() => match r { Some(r) => r, None => return },
                };
                let event = EtcdEvent { generation, event: lease_event(report, &metrics) };
                if lease_tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let (routing, metrics) = (self.table_rx.clone(), Arc::clone(&self.metrics));
        tokio::spawn(task::restart_on_failure(
            "etcd_reader",
            section.scope.clone(),
            metrics,
            cancel.clone(),
            move || {
                let watcher = EtcdWatcher {
                    settings: settings.clone(),
                    reports: reports_tx.clone(),
                    routing: routing.clone(),
                    cancel: cancel.child_token(),
                };
                watcher.run()
            },
            |_| {},
        ));
        Ok(())
    }

    fn spawn_checker(&mut self, member: &Member) {
        let Some(backend) = self.config.backend.iter().find(|b| b.name == member.name) else { return };
        let h = &self.config.health;
        let cancel = self.background.child_token();
        let checker = Checker {
            id: member.id,
            settings: CheckSettings {
                name: member.name.clone(),
                address: backend.address.clone(),
                user: h.user.clone(),
                database: h.database.clone(),
                password: self.password.clone(),
                interval: h.interval,
                fast_interval: h.fast_interval,
                timeout: h.timeout,
                sslmode: h.sslmode,
                tls: self.tls.clone(),
            },
            reports: self.reports_tx.clone(),
            routing: self.table_rx.clone(),
            recheck: Arc::clone(&member.recheck),
            metrics: Arc::clone(&self.metrics),
            cancel: cancel.clone(),
        };
        self.checkers.push((member.id, cancel.clone()));
        // Checkers are not in `tasks`: a reload stops them on purpose. A checker that dies is
        // restarted, and the elector hears why (the backend is not routable meanwhile).
        let (id, reports) = (member.id, self.reports_tx.clone());
        let on_restart = move |why: &str| {
            let error = format!("the health checker stopped ({why}) and is being restarted");
            let observation = Observation::Failed { error };
            let at = tokio::time::Instant::now().into_std();
            let _ =
                reports.try_send(Report { backend: id, observation, at, latency: None, source: Source::HealthCheck });
        };
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(task::restart_on_failure(
            "health_checker",
            member.name.clone(),
            metrics,
            cancel,
            move || checker.clone().run(),
            on_restart,
        ));
    }

    async fn run(
        mut self,
        mut drain: Drain,
        mut reload_rx: mpsc::Receiver<ReloadRequest>,
        mut admin_reload_rx: mpsc::Receiver<AdminReload>,
    ) -> anyhow::Result<()> {
        let mut failure = None;
        loop {
            tokio::select! {
                biased;
                () = drain.draining.cancelled() => break,
                Some(ended) = self.tasks.join_next() => {
                    let what = match ended {
                        Ok(name) => format!("{name} stopped"),
                        Err(e) if e.is_panic() => format!("a task panicked: {}", task::panic_message(e.into_panic().as_ref())),
                        Err(e) => format!("a task failed: {e}"),
                    };
                    tracing::error!(what, "internal failure; shutting down so the orchestrator restarts pgleader");
                    failure = Some(what);
                    drain.draining.cancel();
                    break;
                }
                ended = &mut drain.accept_loop => {
                    drain.accept_done = true;
                    if drain.draining.is_cancelled() {
                        break; // it stopped because the drain began
                    }
                    let what = match ended {
                        Ok(Ok(())) => "the accept loop stopped".to_owned(),
                        Ok(Err(what)) => what,
                        Err(e) if e.is_panic() => format!("the accept loop panicked: {}", task::panic_message(e.into_panic().as_ref())),
                        Err(e) => format!("the accept loop failed: {e}"),
                    };
                    tracing::error!(what, "internal failure: no client can connect; shutting down so the orchestrator restarts pgleader");
                    failure = Some(what);
                    drain.draining.cancel();
                    break;
                }
                Some((source, reply)) = reload_rx.recv() => {
                    let _ = reply.send(self.reload(source));
                }
                Some(reply) = admin_reload_rx.recv() => {
                    let result = self.reload(ReloadSource::File).map(|diff| format!("{diff:?}"));
                    let _ = reply.send(result);
                }
            }
        }
        // Steps 2-4 (step 1 is the cancelled `draining` token itself).
        if !drain.accept_done {
            let _ = (&mut drain.accept_loop).await;
        }
        drain.tracker.close();
        let grace = self.config.proxy.shutdown_grace;
        if tokio::time::timeout(grace, drain.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = drain.tracker.len(),
                ?grace,
                "shutdown grace period over: closing the remaining sessions"
            );
            drain.hard_stop.cancel();
            drain.tracker.wait().await;
        }
        // Step 5.
        self.background.cancel();
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("pgleader stopped");
        match failure {
            Some(what) => anyhow::bail!("internal failure: {what}"),
            None => Ok(()),
        }
    }

    /// Reads the new config, applies it, logs and counts the result.
    fn reload(&mut self, source: ReloadSource) -> Result<ConfigDiff, String> {
        let result = match source {
            ReloadSource::Config(config) => self.apply(*config),
            ReloadSource::File => match &self.config_path {
                None => Err("pgleader was started without a config file; nothing to re-read".to_owned()),
                Some(path) => Config::load(path).map_err(|e| e.to_string()).and_then(|c| self.apply(c)),
            },
        };
        match &result {
            Ok(diff) => {
                tracing::info!(changed = ?diff.hot, restart_required = ?diff.restart_required, "configuration reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reload rejected; the previous configuration stays"),
        }
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.config_reloads.with_label_values(&[label]).inc();
        result
    }

    /// Applies a validated config (see the module docs).
    fn apply(&mut self, new: Config) -> Result<ConfigDiff, String> {
        let bad = new.out_of_bounds();
        if !bad.is_empty() {
            return Err(format!("invalid configuration: {}", bad.join("; ")));
        }
        let password = new.health_password()?;
        let tls = health::tls_connector(new.health.sslmode, new.health.ca_file.as_deref())?;
        if let Some(etcd) = etcd_settings(&new)? {
            etcd.validate()?;
        }
        let diff = self.config.diff(&new);
        for key in &diff.restart_required {
            tracing::warn!(key, "changed in the config file but needs a restart; keeping the running value");
        }
        let mut applied = new.clone();
        applied.proxy.listen = self.config.proxy.listen;
        applied.proxy.workers = self.config.proxy.workers;
        applied.admin.listen = self.config.admin.listen;
        applied.log = self.config.log.clone();
        // The read-only listener stays as it was bound; only its bounds and fallback change.
        match (&mut applied.read_only, &self.config.read_only) {
            (Some(new), Some(old)) => new.listen = old.listen,
            _ => applied.read_only = self.config.read_only.clone(),
        }
        let health_changed = self.config.health != applied.health || self.password != password;
        self.config = applied;
        self.password = password;
        self.tls = tls;

        // Backends keep their id while name and address are unchanged.
        let mut members = Vec::new();
        for b in &self.config.backend.clone() {
            let address = b.address.to_string();
            let kept = self.members.iter().find(|m| m.name == b.name && m.address == address).cloned();
            let mut member = kept.unwrap_or_else(|| self.new_member(&b.name, &address, b.member(), b.verify_conn_url));
            (member.member, member.verify_conn_url) = (b.member().to_owned(), b.verify_conn_url);
            members.push(member);
        }
        let removed: Vec<Member> =
            self.members.iter().filter(|m| !members.iter().any(|n| n.id == m.id)).cloned().collect();
        let mut restart: Vec<Member> =
            members.iter().filter(|m| !self.members.iter().any(|o| o.id == m.id)).cloned().collect();
        if health_changed {
            restart = members.clone();
        }
        let stopping: Vec<BackendId> = removed.iter().map(|m| m.id).chain(restart.iter().map(|m| m.id)).collect();
        self.checkers.retain(|(id, token)| {
            let stop = stopping.contains(id);
            if stop {
                token.cancel();
            }
            !stop
        });
        self.metrics.add_backends(&members.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
        self.members = members.clone();
        for m in &restart {
            self.spawn_checker(m);
        }
        // The mode and max_staleness are policy (below); anything else in [etcd] is how to read.
        let how = |e: &crate::config::EtcdConfig| crate::config::EtcdConfig {
            mode: crate::config::EtcdMode::Enforce,
            max_staleness: std::time::Duration::ZERO,
            ..e.clone()
        };
        if self.etcd.as_ref().map(|(_, e)| how(e)) != self.config.etcd.as_ref().map(how) || health_changed {
            // A new reader. Its view starts over only for another cluster, whose revisions do not
            // compare with the old one's; for the same keys read another way (credentials, TLS,
            // timeout, pace) the confirmations stand and lapse by themselves, so a password
            // rotation cuts no session.
            let cluster = |e: &crate::config::EtcdConfig| {
                (e.endpoints.clone(), crate::etcd::normalise_prefix(&e.namespace, &e.scope))
            };
            let same = self.etcd.as_ref().map(|(_, e)| cluster(e)) == self.config.etcd.as_ref().map(cluster);
            let generation = self.etcd_generation + u64::from(!same);
            self.start_etcd(generation)?;
            self.etcd_generation = generation;
        }
        let etcd_generation = self.etcd_generation;
        self.membership_tx.send_replace(Arc::new(Membership {
            members,
            policy: policy(&self.config),
            etcd_generation,
        }));

        self.settings_tx.send_replace(Arc::new(proxy_settings(&self.config)));
        self.resize_limit(self.config.proxy.max_connections);
        self.config_generation.fetch_add(1, Ordering::Relaxed);
        Ok(diff)
    }

    /// Adjusts the semaphore to a new `max_connections` without touching held permits.
    fn resize_limit(&mut self, new_max: usize) {
        let old_max = self.current_max;
        if new_max > old_max {
            self.limit.add_permits(new_max - old_max);
        } else if new_max < old_max {
            let removed = self.limit.forget_permits(old_max - new_max);
            if removed < old_max - new_max {
                // Permits still held by open sessions: take them back as they are released.
                // Bounded by the shutdown: the task never outlives pgleader's background work.
                let (limit, stop) = (Arc::clone(&self.limit), self.background.clone());
                let owed = u32::try_from(old_max - new_max - removed).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        Ok(p) = limit.acquire_many(owed) => p.forget(),
                    }
                });
            }
        }
        self.current_max = new_max;
    }
}

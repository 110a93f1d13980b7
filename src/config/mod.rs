//! The TOML configuration: schema, defaults, validation, and the reload diff.
//!
//! Two steps, as pingora does: [`RawConfig`] is what serde reads (unknown keys are errors,
//! durations are humantime strings such as `"250ms"`), and [`RawConfig::validate`] consumes it
//! into a [`Config`] so an unvalidated value cannot leak. Errors name the file, the key and the
//! line. This module must not depend on tokio or on any other module of the crate.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod etcd;
mod read_only;

pub use etcd::{parse_endpoint, EtcdConfig, EtcdMode};
pub use read_only::{ReadFallbackConfig, ReadOnlyConfig};

/// A configuration problem, phrased for the operator who must fix the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Syntax, unknown keys, bad values: toml reports the key and the line.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// Cross-field rules, each naming its key and line.
    #[error("{path}: invalid configuration:\n{}", .problems.join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

/// A secret whose `Debug` and `Serialize` never show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself; call it only where it is handed to a library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

/// `host:port`, where host is an IP address or a DNS name resolved at each connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<HostPort, String> {
        let (host, port) =
            s.rsplit_once(':').ok_or_else(|| format!("`{s}` is not host:port (for example \"10.0.0.5:5432\")"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{s}` has an empty host"));
        }
        let port: u16 = port.parse().map_err(|_| format!("`{s}` has an invalid port `{port}`"))?;
        if port == 0 {
            return Err(format!("`{s}`: port 0 is not a backend port"));
        }
        Ok(HostPort { host: host.to_owned(), port })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[proxy]`: the client-facing listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address clients connect to.
    #[serde(default = "default_proxy_listen")]
    pub listen: SocketAddr,
    /// How long a new client waits for a leader before it gets 57P03.
    #[serde(default = "default_leader_wait", with = "humantime_serde")]
    pub leader_wait_timeout: Duration,
    /// TCP connect to a backend.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// For the client's first packet (and the StartupMessage after an SSLRequest answered `N`).
    #[serde(default = "default_hello_timeout", with = "humantime_serde")]
    pub client_hello_timeout: Duration,
    /// Concurrent client connections, including those still in the startup phase.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM, how long open sessions may continue before they are closed.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Client networks allowed to connect (CIDRs); others get 28000. Default: everyone.
    #[serde(default = "default_allow")]
    pub allow: Vec<ipnet::IpNet>,
    /// Thread-per-core: this many single-threaded runtimes, each with its own `SO_REUSEPORT`
    /// listener(s) and accept loop, so both sockets of a session stay on one thread. Unset: one
    /// per CPU the process may use. Needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// TCP connections to the leader kept open ahead of time, so a new client's startup packet
    /// goes into a backend PostgreSQL has already forked. Per process; 0 turns them off.
    #[serde(default = "default_spare_connections")]
    pub spare_connections: usize,
    /// A spare unused this long is closed (without a byte) and replaced; keep it well below the
    /// server's `authentication_timeout` (1 minute by default).
    #[serde(default = "default_spare_max_age", with = "humantime_serde")]
    pub spare_max_age: Duration,
}

/// `[admin]`: the HTTP listener for /metrics, /healthz, /readyz and /status.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

/// `[health]`: how backends are checked.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Between checks while a leader is routable.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Between checks while there is no leader, so a promotion is seen quickly.
    #[serde(default = "default_fast_interval", with = "humantime_serde")]
    pub fast_interval: Duration,
    /// For one check, including (re)connecting.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive primary checks before a backend takes new sessions.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failed checks before a backend is down and its sessions are cut.
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "default_health_user")]
    pub user: String,
    #[serde(default = "default_health_database")]
    pub database: String,
    /// At most one of `password`, `password_env`, `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS for health checks: `disable`, `prefer`, `require` (encrypted, not verified) or
    /// `verify-full` (certificate chain against `ca_file`, and the host name).
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM CA certificate(s) for `sslmode = "verify-full"`; the system roots when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// `[health] sslmode`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `"info"` or `"pgleader=debug"`; `RUST_LOG` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default)]
    pub format: LogFormat,
    /// One INFO line per client session (target `pgleader::access`): client address, backend,
    /// bytes each way, duration and how it ended. Postgres sees pgleader's address, not the
    /// client's, so this is where client addresses are recorded.
    #[serde(default = "default_true")]
    pub access: bool,
}

/// One `[[backend]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// A short unique name, used in metrics labels, logs and /status.
    pub name: String,
    pub address: HostPort,
    /// Patroni's member name for this backend (fencing); defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Fencing: the member's `conn_url` in etcd must match `address`, or the backend is never
    /// confirmed.
    #[serde(default = "default_true")]
    pub verify_conn_url: bool,
}

impl BackendConfig {
    /// Patroni's member name: `member`, or the backend's `name`.
    pub fn member(&self) -> &str {
        self.member.as_deref().unwrap_or(&self.name)
    }
}

/// The file as read, before cross-field validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_proxy")]
    pub proxy: ProxyConfig,
    #[serde(default = "default_admin")]
    pub admin: AdminConfig,
    #[serde(default = "default_health")]
    pub health: HealthConfig,
    #[serde(default = "default_log")]
    pub log: LogConfig,
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    #[serde(default)]
    pub read_only: Option<ReadOnlyConfig>,
    #[serde(default)]
    pub backend: Vec<toml::Spanned<BackendConfig>>,
}

/// A validated configuration. Only [`RawConfig::validate`] makes one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<ReadOnlyConfig>,
    pub backend: Vec<BackendConfig>,
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors (a path, or "<inline>").
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`], naming the key and the line.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        raw.validate(text, origin)
    }

    /// Reads, parses and validates a file.
    ///
    /// # Errors
    /// As [`Config::from_toml`], plus [`ConfigError::Read`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The [`bounds`] problems of a configuration changed in code after validation (a file's
    /// are reported by [`Config::from_toml`] with their lines); empty when every key is in range.
    pub fn out_of_bounds(&self) -> Vec<String> {
        let lines = KeyLines::default();
        let mut problems = bound_problems(&self.proxy, &self.health, &lines);
        if let Some(e) = &self.etcd {
            problems.extend(e.problems(self.health.interval, &lines));
        }
        if let Some(r) = &self.read_only {
            problems.extend(
                r.problems(&[("proxy.listen", self.proxy.listen), ("admin.listen", self.admin.listen)], &lines),
            );
        }
        problems
    }

    /// The effective configuration as TOML, secrets masked (for `check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The health-check password, from `password`, `password_env` or `password_file`.
    ///
    /// # Errors
    /// The variable is unset or the file unreadable; the message names which.
    pub fn health_password(&self) -> Result<Option<Secret>, String> {
        let h = &self.health;
        read_secret("health", h.password.as_ref(), h.password_env.as_deref(), h.password_file.as_deref())
    }
}

/// A secret given inline, by environment variable, or by file (one line, newline trimmed).
fn read_secret(
    section: &str,
    inline: Option<&Secret>,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Secret>, String> {
    if let Some(p) = inline {
        return Ok(Some(p.clone()));
    }
    if let Some(var) = env {
        return std::env::var(var)
            .map(|v| Some(Secret(v)))
            .map_err(|_| format!("{section}.password_env: environment variable {var} is not set"));
    }
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|v| Some(Secret(v.trim_end_matches(['\n', '\r']).to_owned())))
            .map_err(|e| format!("{section}.password_file: cannot read {}: {e}", path.display()));
    }
    Ok(None)
}

impl RawConfig {
    /// Applies the cross-field rules, collecting every problem.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each problem with its key and line.
    pub fn validate(self, text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        if self.backend.is_empty() {
            problems.push("backend: at least one [[backend]] is required".to_owned());
        }
        for (i, b) in self.backend.iter().enumerate() {
            let line = line_at(text, b.span().start);
            let b = b.get_ref();
            if b.name.is_empty() || !b.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                problems.push(format!(
                    "backend[{i}].name (line {line}): `{}` must be non-empty letters, digits, '-', '_' or '.'",
                    b.name
                ));
            }
            for (j, other) in self.backend.iter().enumerate().take(i) {
                let other = other.get_ref();
                if other.name == b.name {
                    problems.push(format!("backend[{i}].name (line {line}): `{}` is also backend[{j}]'s name", b.name));
                }
                if other.address == b.address {
                    problems.push(format!(
                        "backend[{i}].address (line {line}): {} is also backend[{j}]'s address",
                        b.address
                    ));
                }
                if other.member() == b.member() {
                    problems.push(format!(
                        "backend[{i}].member (line {line}): `{}` is also backend[{j}]'s member (name it with `member`)",
                        b.member()
                    ));
                }
            }
        }
        let h = &self.health;
        let p = &self.proxy;
        let lines = KeyLines::read(text);
        problems.extend(bound_problems(p, h, &lines));
        if let Some(e) = &self.etcd {
            problems.extend(e.problems(h.interval, &lines));
        }
        if let Some(r) = &self.read_only {
            problems.extend(r.problems(&[("proxy.listen", p.listen), ("admin.listen", self.admin.listen)], &lines));
        }
        let secrets = [h.password.is_some(), h.password_env.is_some(), h.password_file.is_some()];
        if secrets.iter().filter(|s| **s).count() > 1 {
            problems.push("health: set at most one of password, password_env, password_file".to_owned());
        }
        if p.listen == self.admin.listen && p.listen.port() != 0 {
            problems.push(format!("admin.listen: {} is also proxy.listen", p.listen));
        }
        if p.allow.is_empty() {
            problems.push(format!(
                "proxy.allow{}: an empty list refuses every client; remove the key to allow all",
                lines.at("proxy", "allow")
            ));
        }
        if h.ca_file.is_some() && h.sslmode != SslMode::VerifyFull {
            problems.push(format!(
                "health.ca_file{}: only used with sslmode = \"verify-full\"",
                lines.at("health", "ca_file")
            ));
        }
        if let Some(filter) = &self.log.filter {
            if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
                problems.push(format!("log.filter{}: `{filter}` is not a valid filter", lines.at("log", "filter")));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { path: origin.to_owned(), problems });
        }
        Ok(Config {
            proxy: self.proxy,
            admin: self.admin,
            health: self.health,
            log: self.log,
            etcd: self.etcd,
            read_only: self.read_only,
            backend: self.backend.into_iter().map(toml::Spanned::into_inner).collect(),
        })
    }
}

/// What a reload changes, classified: hot changes are applied, the rest need a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDiff {
    /// Keys that take effect without a restart.
    pub hot: Vec<&'static str>,
    /// Keys that are ignored until a restart (listen addresses).
    pub restart_required: Vec<&'static str>,
}

impl Config {
    /// Compares a new config against the running one.
    pub fn diff(&self, new: &Config) -> ConfigDiff {
        let mut d = ConfigDiff::default();
        let mut check = |changed: bool, key: &'static str, hot: bool| {
            if changed {
                if hot {
                    d.hot.push(key)
                } else {
                    d.restart_required.push(key)
                }
            }
        };
        check(self.proxy.listen != new.proxy.listen, "proxy.listen", false);
        check(self.admin.listen != new.admin.listen, "admin.listen", false);
        check(self.log != new.log, "log", false);
        check(self.proxy.workers != new.proxy.workers, "proxy.workers", false);
        let proxy_rest =
            |c: &ProxyConfig| ProxyConfig { listen: new.proxy.listen, workers: new.proxy.workers, ..c.clone() };
        check(proxy_rest(&self.proxy) != proxy_rest(&new.proxy), "proxy", true);
        check(self.health != new.health, "health", true);
        check(self.etcd != new.etcd, "etcd", true);
        // The read-only listener is bound at start: adding or removing it, or moving it, needs a
        // restart; its bounds and fallback apply at once.
        match (&self.read_only, &new.read_only) {
            (Some(old), Some(r)) => {
                check(old.listen != r.listen, "read_only.listen", false);
                check(ReadOnlyConfig { listen: r.listen, ..old.clone() } != *r, "read_only", true);
            }
            (old, r) => check(old.is_some() != r.is_some(), "read_only", false),
        }
        check(self.backend != new.backend, "backend", true);
        d
    }
}

/// 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |s| s.matches('\n').count()) + 1
}

/// Where each key of `[proxy]`, `[admin]`, `[health]` and `[log]` is set, from toml's own spans,
/// so errors name the right line whatever the syntax (`[health]` then `timeout = ..`, a dotted
/// `health.timeout = ..`, or an inline table) and whichever section shares a key name.
#[derive(Debug, Default, Deserialize)]
struct KeyLines {
    #[serde(default)]
    proxy: BTreeMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    admin: BTreeMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    health: BTreeMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    log: BTreeMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    etcd: BTreeMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    read_only: BTreeMap<String, toml::Spanned<toml::Value>>,
    /// The text the spans point into.
    #[serde(skip)]
    text: String,
}

impl KeyLines {
    /// The spans of `text` (which has already parsed as a [`RawConfig`]); none if it does not parse.
    fn read(text: &str) -> KeyLines {
        let mut lines: KeyLines = toml::from_str(text).unwrap_or_default();
        lines.text = text.to_owned();
        lines
    }

    /// `" (line N)"` for the line that sets `section.key`, or `""` when the key is not in the file.
    fn at(&self, section: &str, key: &str) -> String {
        let table = match section {
            "proxy" => &self.proxy,
            "admin" => &self.admin,
            "health" => &self.health,
            "etcd" => &self.etcd,
            "read_only" => &self.read_only,
            _ => &self.log,
        };
        table.get(key).map(|v| format!(" (line {})", line_at(&self.text, v.span().start))).unwrap_or_default()
    }
}

/// Upper bounds of the numeric and duration keys, each with the reason it is where it is. Every
/// lower bound is "above zero" (`shutdown_grace` may be zero: close at once). Together they keep
/// every sum and product pgleader makes of these values (deadlines `Instant::now() + d`, the
/// elector's `(interval + timeout) * (fall + 2)`, the checker's TCP user timeout `3 * timeout`,
/// backoffs) many orders of magnitude below `Duration` and `Instant` overflow, and
/// `max_connections` far below tokio's `Semaphore::MAX_PERMITS` (`usize::MAX >> 3`) and `i32`
/// (a listen backlog). The README's configuration table lists them.
pub mod bounds {
    use std::time::Duration;

    /// PostgreSQL's own ceiling for its `max_connections` (`MAX_BACKENDS` = 2^18 - 1,
    /// `src/include/postmaster/postmaster.h`): pgleader sends every client to one PostgreSQL, so
    /// more clients than that can never all be served.
    pub const MAX_CONNECTIONS: usize = 262_143;
    /// `rise` and `fall`: at the default 1 s interval, 100 checks are 100 s; more is not a health
    /// check but an outage nobody is told about.
    pub const MAX_RISE_FALL: u32 = 100;
    /// `[proxy] spare_connections`: each is a server process; more than a few hundred idle
    /// forks is a pool, not a head start.
    pub const MAX_SPARE_CONNECTIONS: usize = 256;
    /// `[proxy] spare_max_age`: PostgreSQL's maximum `authentication_timeout` (600 s).
    pub const SPARE_MAX_AGE: Duration = Duration::from_secs(600);
    /// `[proxy] workers`: one runtime thread each; past a thousand cores there is no machine to
    /// fill, only threads to schedule.
    pub const MAX_WORKERS: usize = 1024;
    /// A client waiting longer than this for a leader holds a `max_connections` slot for
    /// nothing: drivers give up much sooner (libpq's `connect_timeout` is usually seconds).
    pub const LEADER_WAIT_TIMEOUT: Duration = Duration::from_secs(600);
    /// One TCP connect and the first reply: the kernel itself gives up a SYN after about 127 s
    /// (`tcp_syn_retries = 6`); a minute is already a dead backend.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
    /// PostgreSQL's maximum `authentication_timeout` (600 s): no client needs longer to say hello.
    pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(600);
    /// A drain longer than an hour is a hung deploy; orchestrators kill much sooner (Nomad's
    /// default `max_kill_timeout` is 30 s).
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
    /// `interval`, `fast_interval` and `timeout`: a frozen leader keeps new sessions for up to
    /// about `timeout x fall`, and a promotion is seen within `interval`; past a minute neither
    /// is a health check (Patroni's own loop is 10 s by default).
    pub const HEALTH_DURATION: Duration = Duration::from_secs(60);
}

/// Every numeric and duration key against its bounds (see [`bounds`]), with its line.
fn bound_problems(p: &ProxyConfig, h: &HealthConfig, lines: &KeyLines) -> Vec<String> {
    let mut problems = Vec::new();
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let durations = [
        ("proxy", "leader_wait_timeout", p.leader_wait_timeout, bounds::LEADER_WAIT_TIMEOUT, false),
        ("proxy", "connect_timeout", p.connect_timeout, bounds::CONNECT_TIMEOUT, false),
        ("proxy", "client_hello_timeout", p.client_hello_timeout, bounds::CLIENT_HELLO_TIMEOUT, false),
        ("proxy", "shutdown_grace", p.shutdown_grace, bounds::SHUTDOWN_GRACE, true),
        ("proxy", "spare_max_age", p.spare_max_age, bounds::SPARE_MAX_AGE, false),
        ("health", "interval", h.interval, bounds::HEALTH_DURATION, false),
        ("health", "fast_interval", h.fast_interval, bounds::HEALTH_DURATION, false),
        ("health", "timeout", h.timeout, bounds::HEALTH_DURATION, false),
    ];
    for (section, key, value, max, zero_ok) in durations {
        let at = lines.at(section, key);
        if value.is_zero() && !zero_ok {
            problems.push(format!("{section}.{key}{at}: must be greater than zero"));
        } else if value > max {
            problems.push(format!("{section}.{key}{at}: {} is above the maximum of {}", show(value), show(max)));
        }
    }
    let counts = [
        ("proxy", "max_connections", p.max_connections as u64, bounds::MAX_CONNECTIONS as u64),
        ("health", "rise", u64::from(h.rise), u64::from(bounds::MAX_RISE_FALL)),
        ("health", "fall", u64::from(h.fall), u64::from(bounds::MAX_RISE_FALL)),
    ];
    let workers = p.workers.map(|w| ("proxy", "workers", w as u64, bounds::MAX_WORKERS as u64));
    let spares = p.spare_connections;
    if spares > bounds::MAX_SPARE_CONNECTIONS {
        let (at, max) = (lines.at("proxy", "spare_connections"), bounds::MAX_SPARE_CONNECTIONS);
        problems.push(format!("proxy.spare_connections{at}: {spares} is above the maximum of {max}"));
    }
    for (section, key, value, max) in counts.into_iter().chain(workers) {
        let at = lines.at(section, key);
        if value == 0 {
            problems.push(format!("{section}.{key}{at}: must be at least 1"));
        } else if value > max {
            problems.push(format!("{section}.{key}{at}: {value} is above the maximum of {max}"));
        }
    }
    problems
}

fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5433))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9543))
}
fn default_leader_wait() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_hello_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    2000
}
fn default_spare_connections() -> usize {
    0
}
fn default_spare_max_age() -> Duration {
    Duration::from_secs(20)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_fast_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_check_timeout() -> Duration {
    Duration::from_millis(800)
}
fn default_allow() -> Vec<ipnet::IpNet> {
    vec![ipnet::IpNet::V4(Default::default()), ipnet::IpNet::V6(Default::default())]
}
fn default_true() -> bool {
    true
}
fn default_rise() -> u32 {
    1
}
fn default_fall() -> u32 {
    3
}
fn default_health_user() -> String {
    "pgleader".to_owned()
}
fn default_health_database() -> String {
    "postgres".to_owned()
}
fn default_proxy() -> ProxyConfig {
    toml::from_str("").expect("every [proxy] key has a default")
}
fn default_admin() -> AdminConfig {
    toml::from_str("").expect("every [admin] key has a default")
}
fn default_log() -> LogConfig {
    toml::from_str("").expect("every [log] key has a default")
}
fn default_health() -> HealthConfig {
    toml::from_str("").expect("every [health] key has a default")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:5432\"\n";

    #[test]
    fn defaults_fill_everything_but_backends() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.proxy.listen, "0.0.0.0:5433".parse().unwrap());
        assert_eq!(c.health.timeout, Duration::from_millis(800));
        assert_eq!((c.health.rise, c.health.fall), (1, 3));
        assert_eq!(c.backend[0].address, HostPort { host: "127.0.0.1".into(), port: 5432 });
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("[proxy]\nlisten = \"0.0.0.0:5433\"\nleader_wait_timout = \"1s\"\n{MINIMAL}");
        let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("leader_wait_timout") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let text = format!("[health]\ninterval = \"soon\"\n{MINIMAL}");
        let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("interval") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn cross_field_problems_are_collected() {
        let text = "[health]\nrise = 0\npassword = \"a\"\npassword_env = \"B\"\n\
                    [[backend]]\nname = \"a\"\naddress = \"h:1\"\n[[backend]]\nname = \"a\"\naddress = \"h:1\"\n";
        let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("health.rise (line 2)"), "{err}");
        assert!(err.contains("backend[1].name (line 8)"), "{err}");
        assert!(err.contains("backend[1].address"), "{err}");
        assert!(err.contains("at most one of password"), "{err}");
    }

    #[test]
    fn every_numeric_and_duration_key_has_bounds_named_with_key_and_line() {
        let text = format!(
            "[proxy]\nmax_connections = 262144\nleader_wait_timeout = \"601s\"\nconnect_timeout = \"0s\"\n\
             client_hello_timeout = \"11m\"\nshutdown_grace = \"2h\"\n[admin]\n[health]\ninterval = \"61s\"\n\
             fast_interval = \"100years\"\ntimeout = \"1h\"\nrise = 101\nfall = 4000000000\n{MINIMAL}"
        );
        let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
        for want in [
            "proxy.max_connections (line 2): 262144 is above the maximum of 262143",
            "proxy.leader_wait_timeout (line 3): 10m 1s is above the maximum of 10m",
            "proxy.connect_timeout (line 4): must be greater than zero",
            "proxy.client_hello_timeout (line 5): 11m is above the maximum of 10m",
            "proxy.shutdown_grace (line 6): 2h is above the maximum of 1h",
            "health.interval (line 9): 1m 1s is above the maximum of 1m",
            "health.fast_interval (line 10):",
            "health.timeout (line 11): 1h is above the maximum of 1m",
            "health.rise (line 12): 101 is above the maximum of 100",
            "health.fall (line 13): 4000000000 is above the maximum of 100",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let at_the_bounds = format!(
            "[proxy]\nmax_connections = 262143\nleader_wait_timeout = \"10m\"\nconnect_timeout = \"1m\"\n\
             client_hello_timeout = \"10m\"\nshutdown_grace = \"0s\"\n[health]\ninterval = \"1m\"\n\
             fast_interval = \"1m\"\ntimeout = \"1m\"\nrise = 100\nfall = 100\n{MINIMAL}"
        );
        let c = Config::from_toml(&at_the_bounds, "t").unwrap();
        assert!(c.out_of_bounds().is_empty());
        let mut changed = c.clone();
        changed.proxy.max_connections = usize::MAX;
        assert_eq!(changed.out_of_bounds().len(), 1, "{:?}", changed.out_of_bounds());
    }

    #[test]
    fn lines_come_from_the_right_section_whatever_the_syntax() {
        // Keys can be dotted or in an inline table, and `timeout` is also the end of other keys.
        let text = format!(
            "proxy.connect_timeout = \"1s\"\nproxy.max_connections = 0\nhealth = {{ timeout = \"2m\" }}\n{MINIMAL}"
        );
        let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("health.timeout (line 3): 2m is above"), "{err}");
        assert!(err.contains("proxy.max_connections (line 2): must be at least 1"), "{err}");
    }

    #[test]
    fn allow_list_and_tls_settings() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.proxy.allow.len(), 2, "everyone by default");
        assert!(c.log.access);
        assert_eq!(c.health.sslmode, SslMode::Disable);
        let text = format!("[proxy]\nallow = [\"100.64.0.0/10\", \"127.0.0.1/32\"]\n[health]\nsslmode = \"verify-full\"\nca_file = \"/ca.pem\"\n{MINIMAL}");
        let c = Config::from_toml(&text, "t").unwrap();
        assert_eq!(c.proxy.allow[0].to_string(), "100.64.0.0/10");
        let err =
            Config::from_toml(&format!("[proxy]\nallow = [\"10.0.0.0/33\"]\n{MINIMAL}"), "t").unwrap_err().to_string();
        assert!(err.contains("allow") && err.contains("line 2"), "{err}");
        let err = Config::from_toml(&format!("[health]\nsslmode = \"maybe\"\n{MINIMAL}"), "t").unwrap_err().to_string();
        assert!(err.contains("sslmode") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn addresses_accept_names_and_ipv6() {
        assert_eq!("db.local:5432".parse::<HostPort>().unwrap().host, "db.local");
        assert_eq!("[::1]:5432".parse::<HostPort>().unwrap().to_string(), "[::1]:5432");
        assert!("nope".parse::<HostPort>().is_err());
        assert!("h:99999".parse::<HostPort>().is_err());
    }

    #[test]
    fn secrets_are_masked() {
        let text = format!("[health]\npassword = \"hunter2\"\n{MINIMAL}");
        let c = Config::from_toml(&text, "t").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.to_toml().contains("hunter2"));
        assert_eq!(c.health_password().unwrap().unwrap().expose(), "hunter2");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        assert_eq!(Config::from_toml(&c.to_toml(), "t").unwrap(), c);
    }

    #[test]
    fn diff_classifies_changes() {
        let a = Config::from_toml(MINIMAL, "t").unwrap();
        let mut b = a.clone();
        b.health.interval = Duration::from_secs(2);
        b.proxy.listen = "127.0.0.1:1".parse().unwrap();
        let d = a.diff(&b);
        assert_eq!(d.hot, vec!["health"]);
        assert_eq!(d.restart_required, vec!["proxy.listen"]);
    }

    #[test]
    fn workers_are_bounded_and_need_a_restart() {
        let with = |n: &str| Config::from_toml(&format!("[proxy]\nworkers = {n}\n{MINIMAL}"), "t.toml");
        assert_eq!(Config::from_toml(MINIMAL, "t.toml").unwrap().proxy.workers, None, "unset by default");
        assert_eq!(with("1").unwrap().proxy.workers, Some(1));
        assert_eq!(with("1024").unwrap().proxy.workers, Some(1024));
        for bad in ["0", "1025"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("proxy.workers (line 2)"), "{err}");
        }
        let (a, b) = (with("2").unwrap(), with("4").unwrap());
        let d = a.diff(&b);
        assert!(d.hot.is_empty(), "{d:?}");
        assert_eq!(d.restart_required, vec!["proxy.workers"]);
        assert!(!Config::from_toml(MINIMAL, "t.toml").unwrap().to_toml().contains("workers"));
    }
}

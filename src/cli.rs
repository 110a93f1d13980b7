//! `pgleader status`: asks a running pgleader for its `/status` document and prints it the way
//! `patronictl list` users expect — one row per backend, then the leader and why, the etcd view
//! and the read-only listener when the document has them.
//!
//! It owns the command's arguments, the choice of the admin address, a tiny blocking HTTP/1.1
//! GET, and the rendering, which is a pure function from the parsed document to text. It must not
//! need anything a running pgleader needs: no runtime, no PostgreSQL, no secrets (the config file,
//! when given, is read only for `[admin] listen`).
//!
//! The document is parsed into structs of this module with every field optional or defaulted, so
//! a pgleader older or newer than this binary still renders; only a body that is not a JSON object
//! with a `backends` array is rejected as "not a status document".
//!
//! Exit codes: [`EXIT_LEADER`] 0, [`EXIT_NO_LEADER`] 1, [`EXIT_UNREACHABLE`] 2.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::Config;

/// The admin address without `--config` or `--admin` (the default of `[admin] listen`).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9543";
/// There is a leader.
pub const EXIT_LEADER: u8 = 0;
/// pgleader answered, and there is no leader.
pub const EXIT_NO_LEADER: u8 = 1;
/// pgleader could not be asked, or its answer was not a status document.
pub const EXIT_UNREACHABLE: u8 = 2;
/// More than any real `/status` (a few KiB per backend); a cap so a wrong port cannot make the
/// command read without end.
const MAX_RESPONSE: usize = 8 << 20;

/// `pgleader status [--admin ADDR] [--timeout 2s] [--json]`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The admin listener to ask (HOST:PORT). Without it: `[admin] listen` of `--config` /
    /// `PGLEADER_CONFIG` when given, else 127.0.0.1:9543.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Bound on connecting, and separately on reading the answer.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print the `/status` JSON document unchanged.
    #[arg(long)]
    pub json: bool,
}

/// Where the admin address came from; named in error messages so the operator knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminSource {
    Flag,
    Config(PathBuf),
    Default,
}

/// The address `status` asks, and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTarget {
    pub addr: String,
    pub source: AdminSource,
}

/// Picks the admin address: an explicit `--admin` wins (it is typed on purpose, while
/// `PGLEADER_CONFIG` may just be set in the environment), then the config's `[admin] listen`, then
/// the default. A wildcard listen address is asked on the loopback of its family.
pub fn choose_admin(flag: Option<&str>, config: Option<(&Path, SocketAddr)>) -> AdminTarget {
    match (flag, config) {
        (Some(addr), _) => AdminTarget { addr: addr.to_owned(), source: AdminSource::Flag },
        (None, Some((path, listen))) => {
            AdminTarget { addr: connectable(listen).to_string(), source: AdminSource::Config(path.to_owned()) }
        }
        (None, None) => AdminTarget { addr: DEFAULT_ADMIN.to_owned(), source: AdminSource::Default },
    }
}

/// A listen address as a client reaches it: `0.0.0.0` and `[::]` become the loopback address of
/// the same family, with the same port.
pub fn connectable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

/// Runs the command: stdout gets the table (or the raw JSON), stderr says what went wrong.
pub fn status(args: &StatusArgs, config: Option<&Path>) -> ExitCode {
    let listen = match (args.admin.as_deref(), config) {
        (None, Some(path)) => match Config::load(path) {
            Ok(c) => Some((path, c.admin.listen)),
            Err(e) => {
                eprintln!(
                    "pgleader status: configuration error: {e}\n\
                     (the admin address is read from [admin] listen; pass --admin HOST:PORT to ask one directly)"
                );
                return ExitCode::from(EXIT_UNREACHABLE);
            }
        },
        _ => None,
    };
    let target = choose_admin(args.admin.as_deref(), listen);
    let body = match fetch_status(&target.addr, args.timeout) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("pgleader status: {}", explain(&target, &e));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let doc = match parse_document(&body) {
        Ok(doc) => doc,
        Err(why) => {
            eprintln!("pgleader status: {}", explain(&target, &FetchError::NotStatus(why)));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let out = if args.json { body } else { render(&doc) };
    // A closed stdout (`| head`) is not the status's failure; the exit code still tells it.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::from(exit_code(&doc))
}

/// 0 with a leader, 1 without.
pub fn exit_code(doc: &StatusDoc) -> u8 {
    if doc.leader.is_some() {
        EXIT_LEADER
    } else {
        EXIT_NO_LEADER
    }
}

/// Why asking the admin listener failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection failed: {0}")]
    Io(std::io::Error),
    #[error("not a pgleader /status document: {0}")]
    NotStatus(String),
}

/// The whole stderr message: what failed, at which address, and what to try.
fn explain(target: &AdminTarget, e: &FetchError) -> String {
    let from = match &target.source {
        AdminSource::Flag => "from --admin".to_owned(),
        AdminSource::Config(path) => format!("[admin] listen in {}", path.display()),
        AdminSource::Default => "the default; no --config, PGLEADER_CONFIG or --admin given".to_owned(),
    };
    let hint = match e {
        FetchError::NotStatus(_) => {
            "something answered there, but not pgleader's admin listener; check the address against \
             [admin] listen in pgleader's config"
        }
        _ => {
            "is pgleader running? Its admin listener is set by [admin] listen in its config: pass \
             --config PATH (or set PGLEADER_CONFIG), or --admin HOST:PORT"
        }
    };
    format!("cannot read pgleader's status from http://{}/status ({from}): {e}\n{hint}", target.addr)
}

/// `GET /status` over one blocking HTTP/1.1 connection; the body, de-chunked.
///
/// # Errors
/// The address does not resolve, no address accepts within `timeout`, the answer does not come
/// within `timeout` of the request, or it is not a 200 HTTP response.
pub fn fetch_status(addr: &str, timeout: Duration) -> Result<String, FetchError> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| FetchError::Resolve(addr.to_owned(), e.to_string()))?.collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        return Err(match last {
            Some(e) if e.kind() == std::io::ErrorKind::TimedOut => FetchError::Timeout(timeout),
            Some(e) => FetchError::Connect(e),
            None => FetchError::Resolve(addr.to_owned(), "no addresses".to_owned()),
        });
    };
    let deadline = Instant::now() + timeout;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => FetchError::Timeout(timeout),
        _ => FetchError::Io(e),
    };
    stream.set_write_timeout(Some(timeout)).map_err(FetchError::Io)?;
    let request =
        format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    // One deadline for the whole answer, so a server that trickles bytes cannot stretch it.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left)).map_err(FetchError::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A server that closes with our request unread resets instead of FIN; what it sent
            // before still counts (PostgreSQL on the admin port does this).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => return Err(io(e)),
        }
        if raw.len() > MAX_RESPONSE {
            return Err(FetchError::NotStatus(format!("the answer is over {MAX_RESPONSE} bytes")));
        }
    }
    http_body(&raw).map_err(FetchError::NotStatus)
}

/// The body of a complete HTTP/1.1 response, if its status is 200.
fn http_body(raw: &[u8]) -> Result<String, String> {
    if raw.is_empty() {
        return Err("the connection was closed without an answer".to_owned());
    }
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err("the answer is not HTTP".to_owned());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err("the answer is not HTTP".to_owned());
    }
    if code != "200" {
        return Err(format!("HTTP {}", status_line.split_once(' ').map_or("", |(_, s)| s)));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or("the answer was cut short")?.to_vec()
    } else {
        rest.to_vec()
    };
    String::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())
}

/// Decodes a chunked body (RFC 9112 §7.1); trailers are ignored.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or("a chunk size line is cut short")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("a chunk is cut short")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunk is cut short")?;
    }
}

/// The parts of `/status` the command shows. Every field is optional or defaulted.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusDoc {
    pub leader: Option<String>,
    pub reason: Option<String>,
    pub reason_text: Option<String>,
    pub split_brain: bool,
    pub draining: bool,
    pub epoch: Option<u64>,
    pub backends: Vec<BackendDoc>,
    pub etcd: Option<EtcdDoc>,
    pub read_only: Option<ReadOnlyDoc>,
}

/// One backend's row.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BackendDoc {
    pub name: String,
    pub address: String,
    pub role: Option<String>,
    pub routable: bool,
    pub leader: bool,
    pub timeline: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub in_read_bounds: Option<bool>,
    pub sessions_active: Option<i64>,
    pub read_sessions_active: Option<i64>,
    pub last_check_ms: Option<f64>,
    pub last_error: Option<String>,
}

/// The fencing view.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct EtcdDoc {
    pub mode: Option<String>,
    pub reachable: Option<bool>,
    pub leader_member: Option<String>,
    pub confirmation: Option<ConfirmationDoc>,
    pub last_confirmed_age_ms: Option<u64>,
    pub failsafe_fallback: bool,
    pub paused: bool,
    pub last_error: Option<String>,
}

/// The current leader confirmation.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConfirmationDoc {
    pub member: Option<String>,
    pub age_ms: Option<u64>,
    pub valid_for_ms: Option<i64>,
}

/// The read-only listener.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ReadOnlyDoc {
    pub listen: Option<String>,
    pub target: Option<String>,
    pub fallback: Option<String>,
    pub max_lag_bytes: Option<u64>,
    pub max_lag_ms: Option<u64>,
    pub replicas_in_bounds: Option<u64>,
}

/// Parses a body as a status document: a JSON object with a `backends` array, the rest optional.
///
/// # Errors
/// Not JSON, not an object with `backends`, or a field of the wrong type.
pub fn parse_document(body: &str) -> Result<StatusDoc, String> {
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| {
        let start: String = body.chars().take(60).collect();
        format!("not JSON ({e}); it starts with {start:?}")
    })?;
    if !value.get("backends").is_some_and(serde_json::Value::is_array) {
        return Err("a JSON document without a \"backends\" list".to_owned());
    }
    serde_json::from_value(value).map_err(|e| format!("unexpected field type: {e}"))
}

/// The human view of a status document: the backend table, then the summary lines.
pub fn render(doc: &StatusDoc) -> String {
    let read_sessions = doc.read_only.is_some() || doc.backends.iter().any(|b| b.read_sessions_active.is_some());
    let bounds = doc.backends.iter().any(|b| b.in_read_bounds.is_some());
    let mut header = vec!["BACKEND", "ADDRESS", "ROLE", "ROUTABLE", "LEADER", "TL", "LAG", "SESSIONS"];
    if read_sessions {
        header.push("READ SESSIONS");
    }
    if bounds {
        header.push("IN READ BOUNDS");
    }
    header.extend(["CHECK", "LAST ERROR"]);
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for b in &doc.backends {
        let mut row = vec![
            one_line(&b.name),
            one_line(&b.address),
            one_line(b.role.as_deref().unwrap_or("unknown")),
            yes_no(b.routable).to_owned(),
            if b.leader { "*" } else { "" }.to_owned(),
            b.timeline.map_or_else(dash, |t| t.to_string()),
            lag(b.lag_bytes, b.lag_seconds),
            b.sessions_active.map_or_else(dash, |n| n.to_string()),
        ];
        if read_sessions {
            row.push(b.read_sessions_active.map_or_else(dash, |n| n.to_string()));
        }
        if bounds {
            row.push(b.in_read_bounds.map_or_else(dash, |v| yes_no(v).to_owned()));
        }
        row.push(b.last_check_ms.map_or_else(dash, |ms| format!("{ms:.1} ms")));
        row.push(b.last_error.as_deref().map_or_else(dash, one_line));
        rows.push(row);
    }
    let mut out = table(&rows);
    if doc.backends.is_empty() {
        out.push_str("(no backends reported yet)\n");
    }
    let why = doc.reason_text.as_deref().or(doc.reason.as_deref()).map(one_line);
    let why = why.map_or_else(String::new, |w| format!(": {w}"));
    match &doc.leader {
        Some(leader) => {
            let _ = writeln!(out, "leader: {}{why}", one_line(leader));
        }
        None => {
            let _ = writeln!(out, "no leader{why}");
        }
    }
    if doc.draining {
        out.push_str("draining: pgleader is shutting down and takes no new clients\n");
    }
    if let Some(etcd) = &doc.etcd {
        out.push_str(&etcd_line(etcd));
    }
    if let Some(ro) = &doc.read_only {
        out.push_str(&read_only_line(ro));
    }
    out
}

fn etcd_line(etcd: &EtcdDoc) -> String {
    let holder = etcd.leader_member.as_deref().map_or_else(|| "no member".to_owned(), one_line);
    let age = etcd.confirmation.as_ref().and_then(|c| c.age_ms).or(etcd.last_confirmed_age_ms);
    let confirmed = match (&etcd.confirmation, age) {
        (Some(_), Some(ms)) => format!("confirmed {ms} ms ago"),
        (None, Some(ms)) => format!("not confirmed now; last confirmed {ms} ms ago"),
        (_, None) => "never confirmed".to_owned(),
    };
    let mut line = format!(
        "etcd: lock held by {holder}; {confirmed}; fail-safe fallback {}",
        if etcd.failsafe_fallback { "ACTIVE (routing on SQL alone)" } else { "inactive" }
    );
    if let Some(mode) = etcd.mode.as_deref().filter(|m| *m != "enforce") {
        let _ = write!(line, "; mode {}", one_line(mode));
    }
    if etcd.paused {
        line.push_str("; Patroni paused");
    }
    if etcd.reachable == Some(false) {
        let error = etcd.last_error.as_deref().map_or_else(String::new, |e| format!(" ({})", one_line(e)));
        let _ = write!(line, "; etcd unreachable{error}");
    }
    line + "\n"
}

fn read_only_line(ro: &ReadOnlyDoc) -> String {
    let listen = ro.listen.as_deref().map_or_else(|| "?".to_owned(), one_line);
    let target = ro.target.as_deref().map_or_else(|| "no backend".to_owned(), one_line);
    let in_bounds = ro.replicas_in_bounds.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let limits = match (ro.max_lag_bytes, ro.max_lag_ms) {
        (Some(b), Some(ms)) => format!(" (max lag {} or {ms} ms)", bytes(b)),
        (Some(b), None) => format!(" (max lag {})", bytes(b)),
        (None, Some(ms)) => format!(" (max lag {ms} ms)"),
        (None, None) => String::new(),
    };
    let fallback = ro.fallback.as_deref().map_or_else(|| "?".to_owned(), one_line);
    format!("read-only {listen}: reads go to {target}; {in_bounds} replicas in bounds{limits}; fallback {fallback}\n")
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn lag(bytes_behind: Option<u64>, seconds: Option<f64>) -> String {
    match (bytes_behind, seconds) {
        (Some(b), Some(s)) => format!("{} {s:.1}s", bytes(b)),
        (Some(b), None) => bytes(b),
        (None, Some(s)) => format!("{s:.1}s"),
        (None, None) => dash(),
    }
}

/// Exact below 1 KiB, one decimal above.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss, reason = "one decimal is shown")]
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn yes_no(v: bool) -> &'static str {
    if v {
        "yes"
    } else {
        "no"
    }
}

fn dash() -> String {
    "-".to_owned()
}

/// A value from the document as one table cell: control characters (an error message's newline)
/// would break the row.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(json: &str) -> StatusDoc {
        parse_document(json).unwrap()
    }

    const TWO_NODES: &str = r#"{
        "leader": "pg1", "reason": "sole_primary", "reason_text": "the only routable primary",
        "split_brain": false, "epoch": 3, "draining": false, "config_generation": 1,
        "backends": [
            {"name": "pg1", "address": "10.0.0.1:5432", "role": "primary", "routable": true, "leader": true,
             "timeline": 2, "last_error": null, "last_check_ms": 0.84, "sessions_active": 12},
            {"name": "pg2", "address": "10.0.0.2:5432", "role": "replica", "routable": false, "leader": false,
             "timeline": null, "last_error": null, "last_check_ms": 1.26, "sessions_active": 0}
        ],
        "events": []
    }"#;

    fn row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in:\n{out}"))
            .split_whitespace()
            .collect()
    }

    #[test]
    fn a_leader_is_marked_and_named_with_its_reason() {
        let d = doc(TWO_NODES);
        let out = render(&d);
        assert_eq!(exit_code(&d), EXIT_LEADER);
        let header = out.lines().next().unwrap();
        assert!(header.starts_with("BACKEND  ") && header.contains("LAST ERROR"), "{out}");
        assert!(!header.contains("READ"), "no read-only columns without read-only data: {out}");
        assert_eq!(row(&out, "pg1"), ["pg1", "10.0.0.1:5432", "primary", "yes", "*", "2", "-", "12", "0.8", "ms", "-"]);
        assert_eq!(row(&out, "pg2"), ["pg2", "10.0.0.2:5432", "replica", "no", "-", "-", "0", "1.3", "ms", "-"]);
        assert!(out.contains("\nleader: pg1: the only routable primary\n"), "{out}");
        assert!(!out.contains("etcd") && !out.contains("read-only"), "{out}");
        // Columns line up: every row's address starts where the header's ADDRESS does.
        let col = header.find("ADDRESS").unwrap();
        assert!(out.lines().skip(1).take(2).all(|l| l[col..].starts_with("10.0.0.")), "{out}");
    }

    #[test]
    fn without_a_leader_the_reason_and_errors_show_and_the_exit_code_is_one() {
        let d = doc(r#"{"leader": null, "reason": "no_primary",
            "reason_text": "no backend is a healthy primary (failover in progress, or all primaries down)",
            "draining": true,
            "backends": [{"name": "pg1", "address": "h1:5432", "role": "down", "routable": false, "leader": false,
                          "last_error": "connect: connection refused\nretrying", "sessions_active": 0}]}"#);
        let out = render(&d);
        assert_eq!(exit_code(&d), EXIT_NO_LEADER);
        assert!(out.contains("\nno leader: no backend is a healthy primary"), "{out}");
        assert!(out.contains("connect: connection refused retrying\n"), "one line per row: {out}");
        assert!(out.contains("draining"), "{out}");
        assert!(!out.contains('*'), "{out}");
    }

    #[test]
    fn the_etcd_view_names_the_lock_holder_the_confirmation_age_and_the_fallback() {
        let with = |etcd: &str| render(&doc(&format!(r#"{{"leader": "pg1", "backends": [], "etcd": {etcd}}}"#)));
        let out = with(
            r#"{"mode": "enforce", "reachable": true, "leader_member": "node-a",
                "confirmation": {"member": "node-a", "revision": 7, "age_ms": 420, "valid_for_ms": 2500},
                "last_confirmed_age_ms": 420, "failsafe_fallback": false}"#,
        );
        assert!(
            out.contains("etcd: lock held by node-a; confirmed 420 ms ago; fail-safe fallback inactive\n"),
            "{out}"
        );
        let out = with(
            r#"{"mode": "observe", "reachable": false, "leader_member": "node-a", "confirmation": null,
                "last_confirmed_age_ms": 9000, "failsafe_fallback": true, "last_error": "timeout"}"#,
        );
        assert!(out.contains("last confirmed 9000 ms ago"), "{out}");
        assert!(out.contains("fail-safe fallback ACTIVE"), "{out}");
        assert!(out.contains("mode observe") && out.contains("etcd unreachable (timeout)"), "{out}");
        let out = with("{}");
        assert!(out.contains("etcd: lock held by no member; never confirmed; fail-safe fallback inactive"), "{out}");
    }

    #[test]
    fn the_read_only_section_adds_columns_and_a_line() {
        let d = doc(r#"{"leader": "pg1", "backends": [
            {"name": "pg1", "address": "a:1", "role": "primary", "routable": true, "leader": true, "timeline": 1,
             "sessions_active": 3, "read_sessions_active": 1, "in_read_bounds": false},
            {"name": "pg2", "address": "b:1", "role": "replica", "routable": false, "leader": false,
             "lag_bytes": 3145728, "lag_seconds": 0.25, "sessions_active": 0, "read_sessions_active": 7,
             "in_read_bounds": true}],
            "read_only": {"listen": "0.0.0.0:5434", "target": "pg2", "fallback": "leader",
                          "max_lag_bytes": 16777216, "max_lag_ms": 5000, "replicas_in_bounds": 1}}"#);
        let out = render(&d);
        assert!(out.lines().next().unwrap().contains("READ SESSIONS  IN READ BOUNDS"), "{out}");
        assert_eq!(
            row(&out, "pg2"),
            ["pg2", "b:1", "replica", "no", "-", "3.0", "MiB", "0.2s", "0", "7", "yes", "-", "-"]
        );
        assert_eq!(row(&out, "pg1")[6..10], ["-", "3", "1", "no"]);
        assert!(
            out.contains("read-only 0.0.0.0:5434: reads go to pg2; 1 replicas in bounds (max lag 16.0 MiB or 5000 ms); fallback leader\n"),
            "{out}"
        );
        let out = render(&doc(r#"{"leader": null, "backends": [], "read_only": {"fallback": "refuse"}}"#));
        assert!(out.contains("read-only ?: reads go to no backend; ? replicas in bounds; fallback refuse"), "{out}");
    }

    #[test]
    fn missing_fields_are_tolerated_and_shown_as_unknown() {
        let d = doc(r#"{"backends": [{"name": "x"}], "future_field": {"anything": [1, 2]}}"#);
        assert_eq!(exit_code(&d), EXIT_NO_LEADER);
        let out = render(&d);
        assert_eq!(row(&out, "x"), ["x", "unknown", "no", "-", "-", "-", "-", "-"]);
        assert!(out.ends_with("no leader\n"), "{out}");
        assert!(render(&doc(r#"{"backends": []}"#)).contains("(no backends reported yet)"));
    }

    #[test]
    fn a_body_that_is_not_a_status_document_is_rejected() {
        assert!(parse_document("<html>").unwrap_err().contains("not JSON"));
        assert!(parse_document(r#"{"leader": "a"}"#).unwrap_err().contains("backends"));
        assert!(parse_document("[1]").unwrap_err().contains("backends"));
        assert!(parse_document(r#"{"backends": 3}"#).unwrap_err().contains("backends"));
        assert!(parse_document(r#"{"backends": [], "leader": 5}"#).unwrap_err().contains("type"));
    }

    #[test]
    fn lag_and_sizes_read_naturally() {
        assert_eq!(lag(Some(0), Some(0.0)), "0 B 0.0s");
        assert_eq!(lag(Some(1023), None), "1023 B");
        assert_eq!(lag(None, Some(12.34)), "12.3s");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn the_admin_address_comes_from_the_flag_then_the_config_then_the_default() {
        let path = Path::new("/etc/pgleader/pgleader.toml");
        let listen: SocketAddr = "100.83.150.39:9543".parse().unwrap();
        assert_eq!(
            choose_admin(None, None),
            AdminTarget { addr: "127.0.0.1:9543".into(), source: AdminSource::Default }
        );
        assert_eq!(
            choose_admin(None, Some((path, listen))),
            AdminTarget { addr: "100.83.150.39:9543".into(), source: AdminSource::Config(path.into()) }
        );
        assert_eq!(
            choose_admin(Some("db1:9000"), Some((path, listen))),
            AdminTarget { addr: "db1:9000".into(), source: AdminSource::Flag }
        );
        let wildcard = |s: &str| choose_admin(None, Some((path, s.parse().unwrap()))).addr;
        assert_eq!(wildcard("0.0.0.0:9600"), "127.0.0.1:9600");
        assert_eq!(wildcard("[::]:9600"), "[::1]:9600");
        assert_eq!(wildcard("[::1]:9600"), "[::1]:9600");
    }

    #[test]
    fn http_answers_are_read_by_length_or_chunks_and_non_200_is_an_error() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}trailing";
        assert_eq!(http_body(plain).unwrap(), "{}");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked).unwrap(), r#"{"a":1}"#);
        assert_eq!(http_body(b"HTTP/1.1 200 OK\r\n\r\nbody").unwrap(), "body");
        assert!(http_body(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .unwrap_err()
            .contains("404 Not Found"));
        assert!(http_body(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}").unwrap_err().contains("cut short"));
        assert!(http_body(b"EFATAL invalid startup packet").unwrap_err().contains("not HTTP"));
        assert!(http_body(b"").unwrap_err().contains("closed"));
    }

    #[test]
    fn errors_name_the_address_its_source_and_what_to_do() {
        let t = AdminTarget { addr: "127.0.0.1:1".into(), source: AdminSource::Default };
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let msg = explain(&t, &FetchError::Connect(refused));
        assert!(msg.contains("http://127.0.0.1:1/status") && msg.contains("the default"), "{msg}");
        assert!(msg.contains("[admin] listen") && msg.contains("--admin"), "{msg}");
        let t = AdminTarget { addr: "h:2".into(), source: AdminSource::Config("/c.toml".into()) };
        let msg = explain(&t, &FetchError::NotStatus("HTTP 404 Not Found".into()));
        assert!(msg.contains("[admin] listen in /c.toml") && msg.contains("not pgleader's admin listener"), "{msg}");
    }
}

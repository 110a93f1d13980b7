//! pgleader in-process on `127.0.0.1:0`, shaped like linkerd's `proxy::new()...run()`:
//! `ProxyBuilder::new(&[&node_a, &node_b]).health("interval", "200ms").start().await`.
//! Also a minimal HTTP/1.1 GET for the admin endpoints (no client library needed).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pg::PgNode;

/// Builds the TOML for a test pgleader; every key can be overridden.
#[derive(Clone)]
pub struct ProxyBuilder {
    backends: Vec<(String, String)>,
    proxy: Vec<(String, String)>,
    health: Vec<(String, String)>,
    /// Whole sections added verbatim (e.g. `[etcd]`).
    sections: Vec<String>,
}

impl ProxyBuilder {
    pub fn new(nodes: &[&PgNode]) -> ProxyBuilder {
        ProxyBuilder::with_addresses(nodes.iter().map(|n| (n.name.clone(), n.addr())).collect())
    }

    /// Backends by (name, "host:port"), for addresses that are not harness nodes.
    pub fn with_addresses(backends: Vec<(String, String)>) -> ProxyBuilder {
        let mut b = ProxyBuilder { backends, proxy: Vec::new(), health: Vec::new(), sections: Vec::new() };
        b = b
            .proxy("shutdown_grace", "1s")
            .proxy("leader_wait_timeout", "5s")
            .proxy("connect_timeout", "1s")
            .proxy("client_hello_timeout", "5s");
        b = b.health("interval", "200ms").health("fast_interval", "50ms").health("timeout", "500ms");
        b.health("user", "postgres").health("fall", "3")
    }

    /// Sets a `[proxy]` key; `value` is a TOML value unless it is a bare duration/word.
    pub fn proxy(mut self, key: &str, value: &str) -> ProxyBuilder {
        self.proxy.retain(|(k, _)| k != key);
        self.proxy.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn health(mut self, key: &str, value: &str) -> ProxyBuilder {
        self.health.retain(|(k, _)| k != key);
        self.health.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds a whole section, verbatim (a `[table]` header and its keys).
    pub fn section(mut self, text: &str) -> ProxyBuilder {
        self.sections.push(text.to_owned());
        self
    }

    pub fn toml(&self) -> String {
        let value =
            |v: &str| if v.parse::<f64>().is_ok() || v.starts_with('[') { v.to_owned() } else { format!("{v:?}") };
        let mut t = String::from("[proxy]\n");
        if !self.proxy.iter().any(|(k, _)| k == "listen") {
            t += "listen = \"127.0.0.1:0\"\n";
        }
        for (k, v) in &self.proxy {
            t += &format!("{k} = {}\n", value(v));
        }
        t += "[admin]\nlisten = \"127.0.0.1:0\"\n[health]\n";
        for (k, v) in &self.health {
            t += &format!("{k} = {}\n", value(v));
        }
        for section in &self.sections {
            t += section;
            t += "\n";
        }
        for (name, addr) in &self.backends {
            t += &format!("[[backend]]\nname = {name:?}\naddress = {addr:?}\n");
        }
        t
    }

    pub fn config(&self) -> pgleader::Config {
        pgleader::Config::from_toml(&self.toml(), "<test>").expect("test config is valid")
    }

    pub async fn start(&self) -> pgleader::Running {
        init_test_tracing();
        pgleader::start(self.config()).await.expect("start pgleader")
    }
}

/// Logs to the test's captured output (`RUST_LOG` to change the level).
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pgleader=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A tokio-postgres connection string through the proxy.
pub fn via(proxy: SocketAddr, user: &str, dbname: &str) -> String {
    format!("host={} port={} user={user} dbname={dbname} sslmode=disable connect_timeout=30", proxy.ip(), proxy.port())
}

/// Connects through the proxy; the connection task is spawned.
pub async fn connect_via(proxy: SocketAddr, dbname: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(&via(proxy, "postgres", dbname), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// psql through the proxy as `postgres` (`extra`: more conninfo such as `sslmode=require`), run
/// on tokio's process driver so the runtime that hosts the in-process pgleader keeps running.
pub async fn psql_via(proxy: SocketAddr, extra: &str, sql: &str) -> std::process::Output {
    let conn = format!("host={} port={} user=postgres dbname=postgres {extra}", proxy.ip(), proxy.port());
    tokio::process::Command::new(super::pg::pg_bin().join("psql"))
        .args(["-X", "-At", "-d", &conn, "-c", sql])
        .output()
        .await
        .expect("run psql")
}

/// GET (or another method) over HTTP/1.1; returns status and body.
pub async fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("admin answered")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http("GET", addr, path).await
}

/// `/status` as JSON.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(admin, "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status is JSON")
}

/// Waits until `/status` names `leader` (a backend name, or None for no leader).
pub async fn wait_leader(admin: SocketAddr, leader: Option<&str>) -> serde_json::Value {
    super::eventually(Duration::from_secs(30), &format!("leader {leader:?}"), || async {
        let s = status(admin).await;
        (s["leader"].as_str() == leader).then_some(s)
    })
    .await
}

/// The value of one sample in `/metrics`, by its full series text (`name{labels}`).
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = get(admin, "/metrics").await;
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `pgleader_worker_connections` of every worker, in worker order: the connections each one runs
/// from accept to close. A connection is counted once it is admitted (its `max_connections` slot
/// taken, or a refusal being answered) and leaves the count after its result is counted.
pub async fn worker_connections(admin: SocketAddr) -> Vec<i64> {
    let (code, body) = get(admin, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let mut workers: Vec<(usize, i64)> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("pgleader_worker_connections{worker=\"")?;
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    workers.sort_unstable();
    assert!(!workers.is_empty(), "no pgleader_worker_connections in /metrics:\n{body}");
    workers.into_iter().map(|(_, n)| n).collect()
}

/// Waits until pgleader runs exactly `n` client connections, summed over its workers.
pub async fn wait_connections(admin: SocketAddr, n: i64) {
    super::eventually(Duration::from_secs(20), &format!("{n} connections in pgleader"), || async {
        (worker_connections(admin).await.iter().sum::<i64>() == n).then_some(())
    })
    .await;
}

/// Waits until a series reaches at least `want` and returns its value. Session results are
/// counted when pgleader finishes with a connection, a moment after the client has seen the end.
pub async fn metric_at_least(admin: SocketAddr, series: &str, want: f64) -> f64 {
    super::eventually(Duration::from_secs(10), &format!("{series} >= {want}"), || async {
        metric(admin, series).await.filter(|v| *v >= want)
    })
    .await
}

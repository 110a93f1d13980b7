//! A real etcd cluster on loopback for the etcd reader's tests: N members of Debian's
//! `etcd-server` (3.4), each on a free client and peer port, in one temp dir, plus `etcdctl`
//! (v3 API) to write keys the way Patroni does and to stop, restart and compact.
//!
//! Timings, given explicitly: `--heartbeat-interval=100 --election-timeout=1000` (ms), as in
//! the Patroni harness. With them a member that loses its quorum drops its raft leader within
//! about one election timeout, and cancels require-leader watches after three more.
//!
//! TLS ([`EtcdCluster::start_tls`]): a self-signed CA made with `openssl`, a server certificate
//! for IP 127.0.0.1 and a client certificate, all with PKCS#8 keys; client URLs are https and
//! etcd asks for client certificates (`--client-cert-auth`). Peers stay on http.
//!
//! What it owns: its etcd processes and the temp dir. `Drop` kills and reaps every member and
//! removes the dir; on a panic it prints the tail of each member's log first.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::patroni::etcd_bin;
use super::{eventually_blocking, free_port};

/// The timings every member gets (see the module doc).
pub const HEARTBEAT_MS: u64 = 100;
pub const ELECTION_TIMEOUT_MS: u64 = 1000;

/// How long to wait for etcd to come up, elect, or stop.
const PATIENCE: Duration = Duration::from_secs(30);

/// The files of the test CA, under the cluster's dir.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here (for "wrong CA" tests).
    pub other_ca: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Our child while it runs; killed and reaped on drop.
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<TlsFiles>,
    /// `user:password` for etcdctl once auth is on.
    root: Option<String>,
}

impl EtcdCluster {
    /// `n` members over http, started and healthy.
    pub fn start(n: usize) -> EtcdCluster {
        Self::launch(n, false)
    }

    /// `n` members whose client URLs are https with client-certificate auth.
    pub fn start_tls(n: usize) -> EtcdCluster {
        Self::launch(n, true)
    }

    fn launch(n: usize, tls: bool) -> EtcdCluster {
        let dir = tempfile::Builder::new().prefix("pgleader-etcd-").tempdir().expect("temp dir");
        let tls = tls.then(|| make_ca(dir.path()));
        let members: Vec<Member> = (0..n)
            .map(|i| Member { name: format!("e{i}"), client_port: free_port(), peer_port: free_port(), child: None })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster { dir, members, initial_cluster, tls, root: None };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn(&mut self, i: usize) {
        let bin = etcd_bin();
        let scheme = self.scheme();
        let m = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .arg(format!("--listen-client-urls={scheme}://127.0.0.1:{}", m.client_port))
            .arg(format!("--advertise-client-urls={scheme}://127.0.0.1:{}", m.client_port))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer_port))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", m.peer_port))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=pgleader-etcd-test")
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_TIMEOUT_MS}"));
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(&t.server_cert).arg("--key-file").arg(&t.server_key);
            cmd.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcd: {e} (apt-get install -y etcd-server etcd-client)"));
        self.members[i].child = Some(child);
    }

    /// Every member's client URL, member 0 first.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].client_port)
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Stops member `i` with SIGTERM (a graceful stop: a leader hands its leadership over) and
    /// waits until it has exited.
    pub fn stop(&mut self, i: usize) {
        let Some(mut child) = self.members[i].child.take() else { return };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if child.try_wait().expect("wait etcd").is_some() {
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("etcd member {i} did not stop within {PATIENCE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts member `i` again on its data dir and waits until it is healthy (it has a leader).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Waits until member `i` answers a quorum read.
    pub fn wait_healthy(&self, i: usize) {
        let ep = self.endpoint(i);
        eventually_blocking(PATIENCE, &format!("etcd member {i} healthy"), || {
            self.etcdctl_at(&ep, &["endpoint", "health", "--command-timeout=1s"]).is_ok()
        });
    }

    /// etcdctl against every member; stdout. Panics with stderr on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let eps = self.endpoints().join(",");
        self.etcdctl_at(&eps, args).unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    /// etcdctl against `endpoints` (comma-separated).
    ///
    /// # Errors
    /// etcdctl failed: its stderr.
    pub fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}")).arg("--dial-timeout=2s");
        if let Some(t) = &self.tls {
            cmd.arg("--cacert").arg(&t.ca).arg("--cert").arg(&t.client_cert).arg("--key").arg(&t.client_key);
        }
        if let Some(root) = &self.root {
            cmd.arg(format!("--user={root}"));
        }
        let out = cmd.args(args).output().map_err(|e| format!("run etcdctl: {e} (apt-get install -y etcd-client)"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `put key value`.
    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    /// `put --lease` of a lease from [`EtcdCluster::grant_lease`].
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) {
        self.ctl(&["put", &format!("--lease={lease:x}"), key, value]);
    }

    pub fn delete(&self, key: &str) {
        self.ctl(&["del", key]);
    }

    /// A new lease of `ttl_secs`; its id.
    pub fn grant_lease(&self, ttl_secs: u64) -> i64 {
        let out = self.ctl(&["lease", "grant", &ttl_secs.to_string()]);
        // "lease 694d7ea2b2c1c20b granted with TTL(20s)"
        let hex = out.split_whitespace().nth(1).unwrap_or_else(|| panic!("unexpected lease grant output: {out}"));
        i64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("lease id `{hex}`: {e}"))
    }

    /// The remaining TTL etcdctl sees for `lease`, in whole seconds; `None` when it is gone.
    pub fn lease_ttl(&self, lease: i64) -> Option<u64> {
        let out = self.ctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("timetolive JSON");
        v["ttl"].as_i64().and_then(|t| u64::try_from(t).ok()).filter(|t| *t > 0)
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "/pgleader-test/no-such-key", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("get JSON");
        v["header"]["revision"].as_i64().expect("revision")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        self.ctl(&["compact", &rev.to_string(), "--physical"]);
        rev
    }

    /// Turns authentication on, with `root` (password `root_password`) for the harness and
    /// `user`/`password` allowed to read keys under `prefix` only.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str, root_password: &str) {
        self.ctl(&["user", "add", &format!("root:{root_password}")]);
        self.ctl(&["user", "grant-role", "root", "root"]);
        self.ctl(&["user", "add", &format!("{user}:{password}")]);
        self.ctl(&["role", "add", "pgleader-read"]);
        self.ctl(&["role", "grant-permission", "pgleader-read", "--prefix=true", "read", prefix]);
        self.ctl(&["user", "grant-role", user, "pgleader-read"]);
        self.ctl(&["auth", "enable"]);
        self.root = Some(format!("root:{root_password}"));
    }

    /// The last lines of every member's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for m in &self.members {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            s.push_str(&format!("----- etcd {} (client port {}) -----\n", m.name, m.client_port));
            for l in &all[all.len().saturating_sub(lines)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(30));
        }
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, in `dir/tls/`. OpenSSL
/// 3 writes `-nodes` keys as PKCS#8 (`BEGIN PRIVATE KEY`), which is what pgleader asks for.
fn make_ca(dir: &Path) -> TlsFiles {
    let d = dir.join("tls");
    std::fs::create_dir_all(&d).expect("tls dir");
    for (name, subject) in [("ca", "/CN=pgleader etcd test CA"), ("other-ca", "/CN=someone else")] {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        openssl(&d, &["req", "-new", "-x509", "-days", "2", "-nodes", "-subj", subject, "-keyout", &key, "-out", &crt]);
    }
    std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
        .expect("ext");
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=pgleader")] {
        let (key, csr, crt, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        openssl(&d, &["req", "-new", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr]);
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }
    TlsFiles {
        ca: d.join("ca.crt"),
        server_cert: d.join("server.crt"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.crt"),
        client_key: d.join("client.key"),
        other_ca: d.join("other-ca.crt"),
    }
}

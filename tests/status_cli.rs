//! `pgleader status` (issue 13, item 5) as an operator runs it: the real binary against a real
//! pgleader in front of a real primary and streaming replica — with a leader (exit 0), after the
//! primary stops (exit 1), with nothing or PostgreSQL on the admin address (exit 2), `--json`, and
//! the admin address taken from `--config`.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::pg::{PgCluster, PgNode};
use common::proxy::{status, wait_leader, ProxyBuilder};

const BIN: &str = env!("CARGO_BIN_EXE_pgleader");

/// Runs `pgleader status ARGS` (without an inherited `PGLEADER_CONFIG`): exit code, stdout, stderr.
async fn pgleader_status(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("status")
        .args(args)
        .env_remove("PGLEADER_CONFIG")
        .output()
        .await
        .expect("run pgleader status");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("pgleader status {args:?} -> {:?}\n{stdout}{stderr}", out.status.code());
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The whitespace-separated cells of the row that starts with `name`.
fn row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{out}"))
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_exits_zero_and_without_one_exits_one() {
    let mut cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.replica, &cluster.primary])
        .section("[read_only]\nlisten = \"127.0.0.1:0\"\n")
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    common::eventually(std::time::Duration::from_secs(30), "the replica in read bounds", || async {
        let s = status(proxy.admin_addr).await;
        s["backends"].as_array()?.iter().any(|b| b["in_read_bounds"] == true).then_some(())
    })
    .await;
    let admin = proxy.admin_addr.to_string();

    let (code, out, _) = pgleader_status(&["--admin", &admin]).await;
    assert_eq!(code, 0, "{out}");
    let reads = format!("read-only {}: reads go to replica; 1 replicas in bounds", proxy.read_only_addr.unwrap());
    assert!(out.contains(&reads), "{out}");
    let primary = row(&out, "primary");
    assert_eq!(primary[..5], ["primary", cluster.primary.addr().as_str(), "primary", "yes", "*"], "{out}");
    assert_eq!(primary[5], "1", "timeline 1: {out}");
    let replica = row(&out, "replica");
    assert_eq!(replica[..4], ["replica", cluster.replica.addr().as_str(), "replica", "no"], "{out}");
    assert!(out.contains("\nleader: primary: the only routable primary\n"), "{out}");

    cluster.primary.stop_async().await;
    wait_leader(proxy.admin_addr, None).await;
    let (code, out, _) = pgleader_status(&["--admin", &admin]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("\nno leader: "), "{out}");
    assert!(!out.contains('*'), "no backend is marked the leader: {out}");
    let stopped = row(&out, "primary");
    assert_ne!(stopped[3], "yes", "the stopped primary is not routable: {out}");
    assert_ne!(stopped.last(), Some(&"-"), "its row carries the check's error: {out}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_the_status_document_and_other_answers_exit_two() {
    let node = PgNode::start_primary("json");
    let proxy = ProxyBuilder::new(&[&node]).start().await;
    wait_leader(proxy.admin_addr, Some("json")).await;

    let (code, out, _) = pgleader_status(&["--admin", &proxy.admin_addr.to_string(), "--json"]).await;
    assert_eq!(code, 0);
    let printed: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    let served = status(proxy.admin_addr).await;
    assert_eq!(keys(&printed), keys(&served));
    assert_eq!(keys(&printed["backends"][0]), keys(&served["backends"][0]));
    assert_eq!(printed["leader"], "json");

    // PostgreSQL's port is no admin listener: exit 2, and stderr says which address was tried.
    let (code, out, err) = pgleader_status(&["--admin", &node.addr()]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(err.contains(&format!("http://{}/status", node.addr())) && err.contains("--admin"), "{err}");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_exits_two_and_says_where_the_address_comes_from() {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let (code, out, err) = pgleader_status(&["--admin", &addr, "--timeout", "2s"]).await;
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains(&addr) && err.contains("cannot connect"), "{err}");
    assert!(err.contains("[admin] listen") && err.contains("--config"), "says what to do: {err}");

    let broken = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(broken.path(), "[admin]\nlisten = \"not an address\"\n").unwrap();
    let (code, _, err) = pgleader_status(&["--config", broken.path().to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("configuration error") && err.contains(&broken.path().display().to_string()), "{err}");
}

/// A pgleader process; killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_names_the_admin_address_and_a_wildcard_is_asked_on_loopback() {
    let node = PgNode::start_primary("cfg");
    let port = common::free_port();
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:{port}\"\n\
             [health]\nuser = \"postgres\"\ninterval = \"200ms\"\n[[backend]]\nname = \"cfg\"\naddress = \"{}\"\n",
            node.addr()
        ),
    )
    .unwrap();
    let _pgleader = Process(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(config.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start pgleader"),
    );
    let path = config.path().to_str().unwrap().to_owned();
    // Until the process listens and has checked its backend, the command exits 2 or 1.
    let out = common::eventually(Duration::from_secs(30), "pgleader status --config exits 0", || async {
        let (code, out, _) = pgleader_status(&["--config", &path]).await;
        (code == 0).then_some(out)
    })
    .await;
    assert_eq!(row(&out, "cfg")[..5], ["cfg", node.addr().as_str(), "primary", "yes", "*"], "{out}");
    assert!(out.contains("\nleader: cfg"), "{out}");

    // PGLEADER_CONFIG works as --config does; an explicit --admin still wins over it.
    let out = tokio::process::Command::new(BIN).arg("status").env("PGLEADER_CONFIG", &path).output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--admin", &nobody])
        .env("PGLEADER_CONFIG", &path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&nobody));
}

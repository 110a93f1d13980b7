//! The status page at `GET /` in a real browser (headless Chromium, Debian's `chromium`) against a
//! live pgleader on real PostgreSQL: it names the leader, and after a real failover it names the
//! new leader and lists the change. A screenshot is taken each time; with
//! `PGLEADER_SCREENSHOT=docs/status-page.png` it is written there (how the committed one was made).

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use common::pg::PgCluster;
use common::proxy::{wait_leader, ProxyBuilder};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with the flags this sandbox needs (no network, no first-run).
fn chromium(profile: &Path, args: &[&str]) -> String {
    assert!(Path::new(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (scripts/test does)");
    let out = Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM after Chromium loaded it, with tags removed.
fn page_text(profile: &Path, admin: SocketAddr) -> String {
    let dom = chromium(profile, &["--dump-dom", &format!("http://{admin}/")]);
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn screenshot(profile: &Path, admin: SocketAddr, to: &Path) {
    let target = format!("--screenshot={}", to.display());
    chromium(profile, &[&target, "--window-size=1280,720", "--hide-scrollbars", &format!("http://{admin}/")]);
    let png = std::fs::read(to).unwrap();
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG"), "a PNG screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_names_the_leader_and_lists_a_failover() {
    let cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let profile = tempfile::tempdir().unwrap();

    let before = page_text(profile.path(), proxy.admin_addr);
    assert!(before.contains("Leader: primary"), "{before}");
    assert!(before.contains(&cluster.replica.addr()) && before.contains("replica"), "{before}");

    cluster.replica.promote();
    wait_leader(proxy.admin_addr, Some("replica")).await;
    let after = page_text(profile.path(), proxy.admin_addr);
    assert!(after.contains("Leader: replica"), "{after}");
    assert!(after.contains("Recent leader changes"), "{after}");
    assert!(
        after.contains("primary replica the primary on the newest timeline; other primaries are stale"),
        "the change from primary to replica is listed with its reason: {after}"
    );

    let shot = std::env::var("PGLEADER_SCREENSHOT")
        .map(|p| Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
        .unwrap_or_else(|_| profile.path().join("status-page.png"));
    screenshot(profile.path(), proxy.admin_addr, &shot);
    proxy.shutdown().await.unwrap();
}

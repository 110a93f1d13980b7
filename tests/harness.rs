//! The test harness's own promises (issue 10, item 17): ports come from outside the kernel's
//! ephemeral range and are never handed out twice, and a PostgreSQL whose port was taken between
//! the pick and its bind starts on another one instead of failing the test.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use common::pg::PgNode;

#[test]
fn free_ports_are_distinct_and_below_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let ports: Vec<u16> = (0..200).map(|_| common::free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    assert!(ports.iter().all(|&p| (10_000..low).contains(&p)), "outside [10000, {low}): {ports:?}");
}

#[test]
fn a_server_whose_port_was_taken_starts_on_another() {
    let mut node = PgNode::init("port-thief");
    let taken = node.port();
    let thief = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
    node.start();
    assert_ne!(node.port(), taken);
    assert_eq!(node.sql_ok("postgres", "SELECT current_setting('port')"), node.port().to_string());
    drop(thief);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_start_retries_too() {
    let mut node = PgNode::init("port-thief-async");
    let taken = node.port();
    let thief = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
    node.start_async().await;
    assert_ne!(node.port(), taken);
    assert_eq!(node.sql_ok_async("postgres", "SELECT 1").await, "1");
    node.stop_async().await;
    drop(thief);
}

//! Issue 10, item 9: every numeric and duration key has bounds, and a configuration that
//! `check-config` (that is, `Config::from_toml`) accepts never panics the startup or the reload
//! path. Values are drawn around and far beyond each bound; the bounds are written here as
//! literals (the README's configuration table), not read from `pgleader::config::bounds`, so the
//! oracle is not the code under test.
//!
//! Each accepted configuration is started for real (`pgleader::start`, listeners on
//! 127.0.0.1:0, one backend at a loopback port nobody listens on), then reloaded with a second
//! generated configuration, then shut down. A panic fails the case: on this thread proptest
//! catches it, in a spawned task (which tokio would swallow) the worker-panic hook counts it.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;

/// A duration key: section, name, its upper bound, and whether zero is allowed.
const DURATIONS: [(&str, &str, Duration, bool); 9] = [
    ("proxy", "leader_wait_timeout", Duration::from_secs(600), false),
    ("proxy", "connect_timeout", Duration::from_secs(60), false),
    ("proxy", "client_hello_timeout", Duration::from_secs(600), false),
    ("proxy", "shutdown_grace", Duration::from_secs(3600), true),
    ("proxy", "spare_max_age", Duration::from_secs(600), false),
    ("health", "interval", Duration::from_secs(60), false),
    ("health", "fast_interval", Duration::from_secs(60), false),
    ("health", "timeout", Duration::from_secs(60), false),
    ("read_only", "max_lag", Duration::from_secs(86_400), false),
];

/// A count key: section, name, lower bound (0 or 1), upper bound.
const COUNTS: [(&str, &str, u64, u64); 6] = [
    ("proxy", "max_connections", 1, 262_143),
    ("proxy", "workers", 1, 1024),
    ("proxy", "spare_connections", 0, 256),
    ("health", "rise", 1, 100),
    ("health", "fall", 1, 100),
    ("read_only", "max_lag_bytes", 1, 1 << 40),
];

/// Values inside a duration key's bounds: the edges and anything between.
fn duration_inside(max: Duration, zero_ok: bool) -> BoxedStrategy<Duration> {
    let ns = Duration::from_nanos(1);
    let mut edges = vec![ns, Duration::from_millis(1), max - ns, max];
    if zero_ok {
        edges.push(Duration::ZERO);
    }
    prop_oneof![prop::sample::select(edges), (1..=max.as_millis() as u64).prop_map(Duration::from_millis)].boxed()
}

/// Values just and far beyond a duration key's bounds, up to `Duration::MAX`.
fn duration_outside(max: Duration, zero_ok: bool) -> BoxedStrategy<Duration> {
    let mut edges = vec![
        max + Duration::from_nanos(1),
        max + Duration::from_secs(1),
        max * 2,
        Duration::from_secs(86_400 * 365 * 1000),
        Duration::from_secs(u64::MAX / 2),
        Duration::MAX,
    ];
    if !zero_ok {
        edges.push(Duration::ZERO);
    }
    prop::sample::select(edges).boxed()
}

fn count_inside(min: u64, max: u64) -> BoxedStrategy<u64> {
    prop_oneof![prop::sample::select(vec![min, min + 1, max - 1, max]), min..=max].boxed()
}

fn count_outside(min: u64, max: u64) -> BoxedStrategy<u64> {
    let mut edges = vec![max + 1, 2 * max, u64::from(u32::MAX), u64::from(u32::MAX) + 1, i64::MAX as u64];
    if min > 0 {
        edges.push(min - 1);
    }
    prop::sample::select(edges).boxed()
}

/// One generated configuration: a value for every bounded key.
#[derive(Debug, Clone)]
struct Values {
    durations: Vec<Duration>,
    counts: Vec<u64>,
}

/// Each key is out of bounds one time in `1 + inside_weight`: with ten keys, about a third of
/// the configurations at weight 9 are valid and the others are rejected for one key or a few.
fn values(inside_weight: u32) -> impl Strategy<Value = Values> {
    let durations: Vec<_> = DURATIONS
        .iter()
        .map(|&(_, _, max, zero_ok)| {
            prop_oneof![inside_weight => duration_inside(max, zero_ok), 1 => duration_outside(max, zero_ok)]
        })
        .collect();
    let counts: Vec<_> = COUNTS
        .iter()
        .map(|&(_, _, min, max)| prop_oneof![inside_weight => count_inside(min, max), 1 => count_outside(min, max)])
        .collect();
    (durations, counts).prop_map(|(durations, counts)| Values { durations, counts })
}

/// Only values inside the bounds (the configuration a reload applies).
fn valid_values() -> impl Strategy<Value = Values> {
    let durations: Vec<_> = DURATIONS.iter().map(|&(_, _, max, zero_ok)| duration_inside(max, zero_ok)).collect();
    let counts: Vec<_> = COUNTS.iter().map(|&(_, _, min, max)| count_inside(min, max)).collect();
    (durations, counts).prop_map(|(durations, counts)| Values { durations, counts })
}

impl Values {
    fn toml(&self, backend_port: u16) -> String {
        let mut sections = std::collections::BTreeMap::from([
            ("proxy", String::from("[proxy]\nlisten = \"127.0.0.1:0\"\n")),
            ("health", String::from("[health]\nuser = \"postgres\"\n")),
            ("read_only", String::from("[read_only]\nlisten = \"127.0.0.1:0\"\n")),
        ]);
        for ((section, key, ..), d) in DURATIONS.iter().zip(&self.durations) {
            let line = format!("{key} = \"{}\"\n", humantime::format_duration(*d));
            sections.get_mut(section).unwrap().push_str(&line);
        }
        for ((section, key, ..), n) in COUNTS.iter().zip(&self.counts) {
            let line = format!("{key} = {n}\n");
            sections.get_mut(section).unwrap().push_str(&line);
        }
        let all: String = sections.into_values().collect();
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{all}[[backend]]\nname = \"nobody\"\n\
             address = \"127.0.0.1:{backend_port}\"\n"
        )
    }

    /// The keys whose value is outside the documented bounds.
    fn out_of_bounds(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for ((section, key, max, zero_ok), d) in DURATIONS.iter().zip(&self.durations) {
            if *d > *max || (d.is_zero() && !zero_ok) {
                bad.push(format!("{section}.{key}"));
            }
        }
        for ((section, key, min, max), n) in COUNTS.iter().zip(&self.counts) {
            if n < min || n > max {
                bad.push(format!("{section}.{key}"));
            }
        }
        bad
    }
}

/// Starts, reloads with `next`, and shuts down; any error is the case's failure.
async fn start_reload_stop(config: pgleader::Config, next: pgleader::Config) -> Result<(), String> {
    let running = pgleader::start(config).await.map_err(|e| format!("start: {e:#}"))?;
    running.reload(next).await.map_err(|e| format!("reload: {e}"))?;
    running.shutdown().await.map_err(|e| format!("shutdown: {e:#}"))
}

#[test]
fn accepted_configurations_never_panic_startup_or_reload() {
    common::watch_worker_panics();
    common::proxy::init_test_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let backend_port = common::free_port();
    let (accepted, rejected) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&(values(9), valid_values()), |(first, second)| {
        let bad = first.out_of_bounds();
        let parsed = pgleader::Config::from_toml(&first.toml(backend_port), "<generated>");
        let config = match parsed {
            Err(e) => {
                let e = e.to_string();
                prop_assert!(!bad.is_empty(), "rejected although every value is in bounds: {e}");
                let named = bad.iter().filter(|k| e.contains(k.rsplit('.').next().unwrap())).count();
                prop_assert!(named > 0, "the error names none of {bad:?}: {e}");
                rejected.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(config) => config,
        };
        prop_assert!(bad.is_empty(), "accepted although {bad:?} are out of bounds");
        let next = pgleader::Config::from_toml(&second.toml(backend_port), "<generated>");
        prop_assert!(next.is_ok(), "a configuration inside every bound was rejected: {}", next.unwrap_err());
        let next = next.unwrap();
        let outcome = runtime.block_on(start_reload_stop(config, next));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        prop_assert_eq!(common::WORKER_PANICS.load(Ordering::SeqCst), 0, "a task panicked (see above)");
        accepted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    eprintln!(
        "{} configurations started, reloaded and stopped, {} rejected, in {:?}",
        accepted.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed),
        started.elapsed()
    );
    result.unwrap();
    assert!(accepted.load(Ordering::Relaxed) > 0, "no generated configuration was accepted: the test tested nothing");
    assert!(rejected.load(Ordering::Relaxed) > 0, "no generated configuration was rejected");
}

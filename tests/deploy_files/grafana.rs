//! deploy/grafana/pgleader.json: it parses, and it queries only metrics pgleader exports.

use std::collections::BTreeSet;

use crate::read;

/// Every metric pgleader exports (README's metrics reference).
pub const EXPORTED_METRICS: &[&str] = &[
    "pgleader_backend_up",
    "pgleader_backend_role",
    "pgleader_leader",
    "pgleader_leader_changes_total",
    "pgleader_split_brain",
    "pgleader_clients_waiting",
    "pgleader_sessions_active",
    "pgleader_sessions_total",
    "pgleader_sessions_cut_total",
    "pgleader_task_restarts_total",
    "pgleader_session_bytes_total",
    "pgleader_health_checks_total",
    "pgleader_health_check_duration_seconds",
    "pgleader_leader_wait_seconds",
    "pgleader_config_reloads_total",
    "pgleader_build_info",
    "pgleader_etcd_up",
    "pgleader_etcd_leader",
    "pgleader_etcd_confirmation_age_seconds",
    "pgleader_etcd_read_duration_seconds",
    "pgleader_etcd_failsafe_fallback",
    "pgleader_read_sessions_active",
    "pgleader_replica_lag_bytes",
    "pgleader_replica_lag_seconds",
    "pgleader_replicas_in_bounds",
    "pgleader_spare_connections",
    "pgleader_spare_connections_total",
    "pgleader_worker_connections",
];

/// The histograms among [`EXPORTED_METRICS`], queried through `_bucket`, `_sum` and `_count`.
pub const HISTOGRAMS: &[&str] =
    &["pgleader_health_check_duration_seconds", "pgleader_leader_wait_seconds", "pgleader_etcd_read_duration_seconds"];

/// The metric families a dashboard queries: every `pgleader_*` name in its panel and template
/// queries (`expr`, `query`, `definition`), with a histogram's `_bucket`/`_sum`/`_count` mapped
/// to its family name. Compare the result with [`EXPORTED_METRICS`] or a live `/metrics`.
pub fn dashboard_metric_names(dashboard: &serde_json::Value) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(q)) => metric_tokens(q, out),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

fn metric_tokens(query: &str, out: &mut BTreeSet<String>) {
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(pos) = query[i..].find("pgleader_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end =
            start + query[start..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(query.len() - start);
        if boundary {
            let token = &query[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| token.strip_suffix(s).filter(|base| HISTOGRAMS.contains(base)))
                .unwrap_or(token);
            out.insert(family.to_owned());
        }
        i = end.max(start + 1);
    }
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let text = read("deploy/grafana/pgleader.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("deploy/grafana/pgleader.json is not JSON");
    assert_eq!(dashboard["uid"], "pgleader-overview");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "panel ids must be unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} has no queries", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {}: use the datasource variable", p["title"]);
        }
    }

    let used = dashboard_metric_names(&dashboard);
    let exported: BTreeSet<String> = EXPORTED_METRICS.iter().map(|s| (*s).to_owned()).collect();
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics pgleader does not export: {unknown:?}");
    let unused: Vec<&String> = exported.difference(&used).collect();
    assert!(unused.is_empty(), "exported metrics with no panel: {unused:?}");
}

#[test]
fn metric_extraction_is_not_fooled() {
    let q = serde_json::json!({"panels": [{"targets": [{"expr":
        "histogram_quantile(0.9, rate(pgleader_leader_wait_seconds_bucket[5m])) + pgleader_sessions_total + pgleader_leader_count + xpgleader_nope"
    }]}], "title": "pgleader_not_a_query"});
    let names = dashboard_metric_names(&q);
    let want: BTreeSet<String> =
        ["pgleader_leader_wait_seconds", "pgleader_sessions_total", "pgleader_leader_count"].map(String::from).into();
    assert_eq!(names, want, "a non-histogram's _count stays as is (and is then reported as unknown)");
}

/// The metric families a live pgleader in front of a real PostgreSQL exports (`# TYPE` lines),
/// with `[etcd]` configured (in observe mode, an endpoint nobody listens on) and `[read_only]`
/// with a streaming replica, so that the etcd, read and lag metrics are exported too.
async fn live_metric_families() -> BTreeSet<String> {
    let primary = crate::common::pg::PgNode::start_primary("metrics");
    let replica = crate::common::pg::PgNode::start_replica(&primary, "metrics-replica");
    let etcd = format!(
        "[etcd]\nendpoints = [\"http://127.0.0.1:{}\"]\nscope = \"s\"\ntimeout = \"100ms\"\nmode = \"observe\"\n\n\
         [read_only]\nlisten = \"127.0.0.1:0\"\n",
        crate::common::free_port()
    );
    let proxy = crate::common::proxy::ProxyBuilder::new(&[&primary, &replica]).section(&etcd).start().await;
    crate::common::proxy::wait_leader(proxy.admin_addr, Some("metrics")).await;
    // The lag series exist once the replica's lag has been measured.
    crate::common::eventually(std::time::Duration::from_secs(30), "the replica's lag is measured", || async {
        let (_, s) = crate::common::proxy::get(proxy.admin_addr, "/status").await;
        let s: serde_json::Value = serde_json::from_str(&s).ok()?;
        s["backends"].as_array()?.iter().any(|b| b["lag_bytes"].is_u64()).then_some(())
    })
    .await;
    let (code, body) = crate::common::proxy::get(proxy.admin_addr, "/metrics").await;
    assert_eq!(code, 200);
    proxy.shutdown().await.expect("pgleader drains");
    body.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_metrics_exist_on_a_live_pgleader() {
    let live = live_metric_families().await;
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/pgleader.json")).unwrap();
    let missing: Vec<String> = dashboard_metric_names(&dashboard).difference(&live).cloned().collect();
    assert!(missing.is_empty(), "the dashboard queries metrics a live pgleader does not export: {missing:?}");
    let listed: BTreeSet<String> = EXPORTED_METRICS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(listed, live, "EXPORTED_METRICS must match what pgleader exports");
}

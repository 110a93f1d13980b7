//! deploy/prometheus: promtool on the scrape config and the rules, and fire-and-resolve
//! coverage of every alert by the rule tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{assert_success, duration, read, repo, run};

fn promtool() -> PathBuf {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(
        path.exists(),
        "promtool is missing: apt-get install prometheus (Debian's package ships /usr/bin/promtool)"
    );
    path
}

/// The keys a `nomad_sd_configs` entry may have (Prometheus `discovery/nomad` SDConfig, plus the
/// inlined HTTP client config).
const NOMAD_SD_KEYS: &[&str] = &[
    "server",
    "namespace",
    "region",
    "allow_stale",
    "refresh_interval",
    "tag_separator",
    "authorization",
    "basic_auth",
    "oauth2",
    "tls_config",
    "proxy_url",
    "no_proxy",
    "proxy_from_environment",
    "proxy_connect_header",
    "follow_redirects",
    "enable_http2",
    "http_headers",
];

/// Replaces each `nomad_sd_configs:` block with a static target and returns the keys of its
/// entries, for a promtool built without Nomad service discovery (Debian's 2.42+ds).
fn without_nomad_sd(config: &str) -> (String, Vec<Vec<String>>) {
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = config.lines().collect();
    let (mut out, mut entries) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim() != "nomad_sd_configs:" {
            out.push(line.to_owned());
            i += 1;
            continue;
        }
        let indent = indent_of(line);
        out.push(format!("{}static_configs:", " ".repeat(indent)));
        out.push(format!("{}  - targets: [\"127.0.0.1:9543\"]", " ".repeat(indent)));
        i += 1;
        let mut item_indent = None;
        while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > indent) {
            let l = lines[i];
            let t = l.trim();
            if let Some(first) = t.strip_prefix("- ") {
                item_indent = Some(indent_of(l) + 2);
                entries.push(vec![first.split(':').next().unwrap_or("").trim().to_owned()]);
            } else if !t.is_empty() && !t.starts_with('#') && Some(indent_of(l)) == item_indent {
                entries.last_mut().expect("an entry").push(t.split(':').next().unwrap_or("").trim().to_owned());
            }
            i += 1;
        }
    }
    (out.join("\n") + "\n", entries)
}

#[test]
fn prometheus_files_pass_promtool() {
    let promtool = promtool();
    let dir = repo().join("deploy/prometheus");

    let out = run(Command::new(&promtool).args(["check", "config", "prometheus.yml"]).current_dir(&dir));
    let all_output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && all_output.contains("field nomad_sd_configs not found") {
        // This promtool lacks Nomad SD. Check the SD blocks' keys by hand and let promtool check
        // everything else on a copy with static targets in their place.
        eprintln!("note: this promtool has no Nomad service discovery; checking nomad_sd_configs keys by hand");
        let (copy, entries) = without_nomad_sd(&read("deploy/prometheus/prometheus.yml"));
        assert!(!entries.is_empty(), "prometheus.yml must discover pgleader through nomad_sd_configs");
        for keys in &entries {
            assert!(
                keys.first().is_some_and(|k| k == "server"),
                "each nomad_sd_configs entry starts with server: {keys:?}"
            );
            for key in keys {
                assert!(NOMAD_SD_KEYS.contains(&key.as_str()), "nomad_sd_configs has no key `{key}`");
            }
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("prometheus.yml"), copy).expect("write copy");
        std::fs::copy(dir.join("alerts.yml"), tmp.path().join("alerts.yml")).expect("copy alerts.yml");
        let out = run(Command::new(&promtool).args(["check", "config", "prometheus.yml"]).current_dir(tmp.path()));
        assert_success("promtool check config (nomad_sd_configs replaced by static targets)", &out);
    } else {
        assert_success("promtool check config prometheus.yml", &out);
    }

    let out = run(Command::new(&promtool).args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    assert_success("promtool check rules alerts.yml", &out);
    let out = run(Command::new(&promtool).args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    assert_success("promtool test rules alerts_test.yml", &out);
}

#[test]
fn every_alert_has_a_firing_and_a_resolved_test() {
    let alerts: BTreeSet<String> = read("deploy/prometheus/alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:").map(|n| n.trim().to_owned()))
        .collect();
    for required in [
        "PgleaderNoLeader",
        "PgleaderSplitBrain",
        "PgleaderBackendDown",
        "PgleaderClientsWaiting",
        "PgleaderConnectionLimit",
        "PgleaderEtcdUnreachable",
        "PgleaderPrimaryNotConfirmed",
        "PgleaderFailsafeFallback",
    ] {
        assert!(alerts.contains(required), "alerts.yml lacks {required}");
    }
    // (test case, alert) -> [(eval_time, fires)]: "resolved" means an empty expectation AFTER a
    // firing one in the same test case (an empty one before it is only "pending").
    let tests = read("deploy/prometheus/alerts_test.yml");
    let mut cases: BTreeMap<(usize, String), Vec<(Duration, bool)>> = BTreeMap::new();
    let (mut case, mut eval_time) = (0, None);
    let lines: Vec<&str> = tests.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if line.starts_with("  - interval:") {
            case += 1;
        } else if let Some(at) = t.strip_prefix("- eval_time:") {
            eval_time = Some(duration(at.trim()));
        } else if let Some(name) = t.strip_prefix("alertname:") {
            let exp = lines[i + 1..]
                .iter()
                .find_map(|l| l.trim().strip_prefix("exp_alerts:"))
                .unwrap_or_else(|| panic!("alertname {name} without exp_alerts"));
            let at = eval_time.take().unwrap_or_else(|| panic!("alertname {name} without eval_time"));
            cases.entry((case, name.trim().to_owned())).or_default().push((at, exp.trim() != "[]"));
        }
    }
    for alert in &alerts {
        let fires_then_resolves = cases
            .iter()
            .filter(|((_, a), _)| a == alert)
            .any(|(_, evals)| evals.iter().any(|(t1, fires)| *fires && evals.iter().any(|(t2, f2)| !f2 && t2 > t1)));
        assert!(
            fires_then_resolves,
            "alerts_test.yml has no case where {alert} fires and a later evaluation finds it resolved"
        );
    }
}

#[test]
fn alert_runbook_links_point_at_runbook_sections() {
    let runbook = read("docs/runbook.md");
    // GitHub's anchors: lower case, spaces to '-', punctuation other than '-' and '_' dropped.
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix('#').map(|h| h.trim_start_matches('#').trim()))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let alerts = read("deploy/prometheus/alerts.yml");
    let links: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("runbook: docs/runbook.md#")).collect();
    assert!(!links.is_empty(), "alerts.yml links no runbook section");
    for link in links {
        assert!(anchors.contains(link), "alerts.yml links docs/runbook.md#{link}, which is no heading there");
    }
}

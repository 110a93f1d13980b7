//! The partition report of issue 12: the scenarios of `tests/common/scenario.rs` with every
//! front end side by side in the namespace lab of `tests/common/partition.rs`, and the rendering
//! of the raw per-attempt logs into `docs/partitions.md` and one SVG timeline per run.
//!
//! ```text
//! partition_report collect --out docs/partitions --pgleader target/debug/pgleader
//!                          [--scenarios isolate-leader,...] [--modes async,sync]
//!                          [--frontends pgleader,haproxy-rest,haproxy-tcp,pgleader-fenced] [--append]
//! partition_report render  --from docs/partitions --doc docs/partitions.md
//! ```
//! `scripts/partition-report` runs both. `collect` writes, per run and workload, the attempts as
//! CSV (`<scenario>-<mode>-<front end>-<node>.csv`) and everything else (marks, lost ids,
//! configurations, timings, machine) in `runs.json`; `render` reads only those files.

// The harness shared with tests/partitions.rs: one lab, one way of counting.
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use common::partition::{all_front_ends, default_front_ends, FrontEndKind, DB_NODES};
use common::patroni::Replication;
use common::scenario::{self, Scenario, ScenarioResult};
use common::workload::{Outcome, Run};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    machine: BTreeMap<String, String>,
    runs: Vec<ScenarioResult>,
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    match args.first().map(String::as_str) {
        Some("collect") => {
            let out = PathBuf::from(opt("--out").unwrap_or_else(|| "docs/partitions".to_owned()));
            let pgleader = PathBuf::from(opt("--pgleader").unwrap_or_else(|| "target/debug/pgleader".to_owned()));
            let scenarios: Vec<Scenario> = match opt("--scenarios") {
                None => Scenario::ALL.to_vec(),
                Some(s) => s
                    .split(',')
                    .map(|x| Scenario::from_slug(x).ok_or_else(|| format!("unknown scenario `{x}`")))
                    .collect::<Result<_, _>>()?,
            };
            let modes: Vec<Replication> = opt("--modes")
                .unwrap_or_else(|| "async".to_owned())
                .split(',')
                .map(|m| match m {
                    "async" => Ok(Replication::Async),
                    "sync" => Ok(Replication::Sync),
                    x => Err(format!("unknown mode `{x}`: async or sync")),
                })
                .collect::<Result<_, _>>()?;
            let front_ends = match opt("--frontends") {
                None => default_front_ends(),
                Some(list) => {
                    let kinds: Vec<FrontEndKind> = list
                        .split(',')
                        .map(|x| FrontEndKind::from_slug(x).ok_or_else(|| format!("unknown front end `{x}`")))
                        .collect::<Result<_, _>>()?;
                    all_front_ends().into_iter().filter(|f| kinds.contains(&f.kind)).collect()
                }
            };
            if !pgleader.is_file() {
                return Err(format!("{} not found: cargo build --bin pgleader", pgleader.display()));
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("build runtime: {e}"))?;
            rt.block_on(collect(&out, &pgleader, &scenarios, &modes, front_ends, args.iter().any(|a| a == "--append")))
        }
        Some("render") => {
            let from = PathBuf::from(opt("--from").unwrap_or_else(|| "docs/partitions".to_owned()));
            let doc = PathBuf::from(opt("--doc").unwrap_or_else(|| "docs/partitions.md".to_owned()));
            render(&from, &doc)
        }
        _ => Err("usage: partition_report collect --out DIR --pgleader BIN [--scenarios a,b] [--modes async,sync] \
                  [--frontends a,b] | render --from DIR --doc FILE"
            .to_owned()),
    }
}

async fn collect(
    out: &Path,
    pgleader: &Path,
    scenarios: &[Scenario],
    modes: &[Replication],
    front_ends: Vec<common::partition::FrontEnd>,
    append: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut report = Report { machine: machine(), runs: Vec::new() };
    if append {
        // Add to an earlier collection (e.g. after an interrupted matrix): keep its runs.
        let text =
            std::fs::read_to_string(out.join("runs.json")).map_err(|e| format!("--append: read runs.json: {e}"))?;
        let earlier: Report = serde_json::from_str(&text).map_err(|e| format!("--append: parse runs.json: {e}"))?;
        report.runs = earlier.runs;
    }
    for &mode in modes {
        for &s in scenarios {
            let result = scenario::run(s, mode, front_ends.clone(), pgleader).await;
            for w in &result.writers {
                let run = Run {
                    started_unix_ms: w.started_unix_ms,
                    duration_ms: w.duration_ms,
                    attempts: w.attempts.clone(),
                    marks: Vec::new(),
                };
                let name = w.csv_name(s, &result.replication);
                std::fs::write(out.join(&name), run.to_csv()).map_err(|e| format!("write {name}: {e}"))?;
            }
            report.runs.push(result);
            let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            std::fs::write(out.join("runs.json"), json).map_err(|e| format!("write runs.json: {e}"))?;
        }
    }
    Ok(())
}

fn machine() -> BTreeMap<String, String> {
    let sh = |cmd: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let mut m = BTreeMap::new();
    m.insert("cpu".to_owned(), sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"));
    m.insert("cores".to_owned(), sh("nproc"));
    m.insert("kernel".to_owned(), sh("uname -sr"));
    m.insert("os".to_owned(), sh(". /etc/os-release && echo \"$PRETTY_NAME\""));
    m.insert("postgresql".to_owned(), sh("/usr/lib/postgresql/15/bin/postgres --version"));
    m.insert("patroni".to_owned(), sh(&format!("{}/bin/patroni --version", common::patroni::patroni_venv().display())));
    m.insert("etcd".to_owned(), sh("etcd --version | head -1"));
    m.insert("haproxy".to_owned(), sh("haproxy -v | head -1"));
    m.insert("iproute2".to_owned(), sh("ip -V"));
    m.insert("iptables".to_owned(), sh("iptables -V"));
    m.insert("pgleader".to_owned(), sh("git rev-parse --short HEAD 2>/dev/null"));
    m.insert("date".to_owned(), sh("date -u +%Y-%m-%dT%H:%MZ"));
    m
}

fn secs(ms: f64) -> String {
    format!("{:.1} s", ms / 1000.0)
}

fn counts(e: &BTreeMap<String, usize>) -> String {
    if e.is_empty() {
        return "0".to_owned();
    }
    let total: usize = e.values().sum();
    let parts: Vec<String> = e.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!("{total} ({})", parts.join(", "))
}

fn render(from: &Path, doc: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(from.join("runs.json")).map_err(|e| format!("read runs.json: {e}"))?;
    let mut report: Report = serde_json::from_str(&text).map_err(|e| format!("parse runs.json: {e}"))?;
    for r in &mut report.runs {
        let scenario = r.scenario;
        let mode = r.replication.clone();
        for w in &mut r.writers {
            let name = w.csv_name(scenario, &mode);
            let csv = std::fs::read_to_string(from.join(&name)).map_err(|e| format!("read {name}: {e}"))?;
            w.attempts = Run::attempts_from_csv(&csv).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    let rel = from.strip_prefix(doc.parent().unwrap_or(Path::new(""))).unwrap_or(from);
    let get = |k: &str| report.machine.get(k).cloned().unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Partition report: pgleader vs HAProxy when the network between the nodes breaks\n");
    let _ = writeln!(
        md,
        "Generated by `scripts/partition-report` from the raw per-attempt logs in `{}/` (one CSV per run, front \
         end and node, plus `runs.json` with the marks, lost ids, timings and every configuration file verbatim). \
         Produced on {} ({} cores), {}, {}, on {}; {}, {}, {}, {}, {}, {}; pgleader commit {}.\n",
        rel.display(),
        get("cpu"),
        get("cores"),
        get("os"),
        get("kernel"),
        get("date"),
        get("postgresql"),
        get("patroni"),
        get("etcd"),
        get("haproxy"),
        get("iproute2"),
        get("iptables"),
        get("pgleader"),
    );
    md.push_str(SETUP);
    md.push_str(&summary_table(&report.runs));
    md.push_str(&where_worse(&report.runs));
    for r in &report.runs {
        md.push_str(&section(r, rel));
        let svg = format!("{}-{}.svg", r.scenario.slug(), r.replication);
        std::fs::write(from.join(&svg), plot(r)).map_err(|e| format!("write {svg}: {e}"))?;
    }
    md.push_str(NOTES);
    std::fs::write(doc, md).map_err(|e| format!("write {}: {e}", doc.display()))
}

/// One line per run and front end: the five measures of the issue.
fn summary_table(runs: &[ScenarioResult]) -> String {
    let mut md = String::from("## Summary\n\n");
    md.push_str(
        "| scenario | mode | front end | acknowledged writes lost | writes on a read-only node | longest outage (worst writer) | two primaries at overlapping times | recovered by itself |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        for kind in r.kinds() {
            let m = r.measures(kind);
            let worst = m.outage_ms.values().copied().fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario.slug(),
                r.replication,
                kind.label(),
                m.lost,
                m.read_only_hits,
                secs(worst),
                if m.overlapping_primaries { format!("**yes** ({:.0} ms)", m.overlap_ms) } else { "no".to_owned() },
                if m.recovered { "yes" } else { "**no**" }
            );
        }
    }
    md.push('\n');
    md
}

/// Every measure of every run in which the SQL-only pgleader did worse than another front end
/// of the same run (outages: by more than a second), computed, so the list cannot drift from the data.
fn where_worse(runs: &[ScenarioResult]) -> String {
    let mut md = String::from("## Where pgleader (SQL only) does worse than a contender\n\n");
    let mut any = false;
    for r in runs {
        if !r.kinds().contains(&FrontEndKind::PgleaderSql) {
            continue;
        }
        let me = r.measures(FrontEndKind::PgleaderSql);
        for other in r.kinds().into_iter().filter(|k| *k != FrontEndKind::PgleaderSql) {
            let them = r.measures(other);
            let mut items = Vec::new();
            if me.lost > them.lost {
                items.push(format!("lost {} acknowledged writes, {} lost {}", me.lost, other.label(), them.lost));
            }
            if me.read_only_hits > them.read_only_hits {
                items.push(format!(
                    "{} writes on a read-only node, {} {}",
                    me.read_only_hits,
                    other.label(),
                    them.read_only_hits
                ));
            }
            if me.overlap_ms > them.overlap_ms {
                items.push(format!(
                    "two primaries for {:.0} ms, {} {:.0} ms",
                    me.overlap_ms,
                    other.label(),
                    them.overlap_ms
                ));
            }
            if !me.recovered && them.recovered {
                items.push(format!("did not recover by itself, {} did", other.label()));
            }
            for (writer, mine) in &me.outage_ms {
                if let Some(theirs) = them.outage_ms.get(writer) {
                    if mine - theirs > 1000.0 {
                        items.push(format!(
                            "writer {writer}: outage {}, {} {}",
                            secs(*mine),
                            other.label(),
                            secs(*theirs)
                        ));
                    }
                }
            }
            for item in items {
                any = true;
                let _ = writeln!(md, "- {} ({}): {item}.", r.scenario.slug(), r.replication);
            }
        }
    }
    if !any {
        md.push_str("- In no run, on none of the measures above (outages compared with a 1 s tolerance).\n");
    }
    md.push('\n');
    md
}

fn section(r: &ScenarioResult, rel: &Path) -> String {
    let mut md = format!("## {} — {} replication\n\n", r.scenario.title(), r.replication);
    let _ = writeln!(
        md,
        "Fault at {} after the writers started; healed {} later. Patroni: {}; cluster recovered (one leader, the \
         other member streaming) {} after the heal; final leader **{}**.\n",
        secs(r.fault_ms - r.marks.first().map_or(0.0, |m| m.at_ms)),
        secs(r.heal_ms - r.fault_ms),
        r.new_leader_ms
            .map_or("no failover".to_owned(), |t| format!("epyc primary {} after the fault", secs(t - r.fault_ms))),
        r.cluster_recovered_ms.map_or("**never (within the patience)**".to_owned(), |t| secs(t - r.heal_ms)),
        r.final_leader.as_deref().unwrap_or("none"),
    );
    let _ = writeln!(md, "Timings: {}.\n", r.timings);
    md.push_str(
        "| front end | lost (acked by) | read-only hits | outage optiplex new / long | outage epyc new / long | overlap | recovered | failed attempts | acked (by node) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for kind in r.kinds() {
        let m = r.measures(kind);
        let o = |k: &str| m.outage_ms.get(k).map_or("-".to_owned(), |v| secs(*v));
        let _ = writeln!(
            md,
            "| {} | {} {} | {} | {} / {} | {} / {} | {} | {} | {} | {} |",
            kind.label(),
            m.lost,
            if m.lost_by_node.is_empty() { String::new() } else { format!("{:?}", m.lost_by_node) },
            m.read_only_hits,
            o("optiplex/new_conn"),
            o("optiplex/long_lived"),
            o("epyc/new_conn"),
            o("epyc/long_lived"),
            if m.overlapping_primaries { format!("**{:.0} ms**", m.overlap_ms) } else { "none".to_owned() },
            if m.recovered { "yes" } else { "**no**" },
            counts(&m.failed),
            counts(&m.acked_by_node),
        );
    }
    let marks: Vec<String> = r.marks.iter().map(|m| format!("{} {}", secs(m.at_ms), m.label)).collect();
    let _ = writeln!(md, "\nEvents (lab clock): {}.\n", marks.join("; "));
    let _ = writeln!(
        md,
        "![{} timeline]({}/{}-{}.svg)\n",
        r.scenario.slug(),
        rel.display(),
        r.scenario.slug(),
        r.replication
    );
    md
}

/// One SVG per run: a panel per front end and node; per 250 ms, acknowledged writes upwards
/// (green; purple if the write was later lost), failed attempts downwards (red; orange when
/// the attempt reached a read-only node), and the marks as dashed lines.
fn plot(r: &ScenarioResult) -> String {
    const W: f64 = 1000.0;
    const LEFT: f64 = 150.0;
    const PANEL: f64 = 90.0;
    const BUCKET_MS: f64 = 250.0;
    let t0 = r.marks.first().map_or(0.0, |m| m.at_ms);
    let t1 = r.marks.last().map_or(1.0, |m| m.at_ms).max(t0 + 1.0);
    let width = W - LEFT - 20.0;
    let x_of = |ms: f64| LEFT + width * (ms - t0) / (t1 - t0);
    let buckets = ((t1 - t0) / BUCKET_MS).ceil() as usize + 1;
    let panels: Vec<(FrontEndKind, &str)> =
        r.kinds().into_iter().flat_map(|k| DB_NODES.iter().map(move |n| (k, *n))).collect();
    let marks_h = 12.0 * r.marks.len() as f64;
    let height = 60.0 + PANEL * panels.len() as f64 + marks_h + 40.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">{} ({} replication)</text>\n\
         <text x=\"10\" y=\"36\">Per 250 ms. Up: acknowledged writes (green; purple: acknowledged, later lost). Down: failed \
         attempts (red; orange: reached a read-only node). Dashed: events, listed below.</text>\n",
        escape(r.scenario.title()),
        r.replication
    );
    for (i, (kind, node)) in panels.iter().enumerate() {
        let top = 50.0 + PANEL * i as f64;
        let mid = top + PANEL * 0.6;
        let (mut ok, mut lost, mut bad, mut ro) =
            (vec![0usize; buckets], vec![0usize; buckets], vec![0usize; buckets], vec![0usize; buckets]);
        for w in r.writers.iter().filter(|w| w.front_end == *kind && w.node == *node) {
            for a in &w.attempts {
                let b = (((a.end_ms + w.offset_ms - t0) / BUCKET_MS).max(0.0) as usize).min(buckets - 1);
                match a.outcome {
                    Outcome::Ok if w.lost.binary_search(&a.id).is_ok() => lost[b] += 1,
                    Outcome::Ok => ok[b] += 1,
                    _ if a.in_recovery == Some(true) || a.outcome == Outcome::ReadOnly => ro[b] += 1,
                    _ => bad[b] += 1,
                }
            }
        }
        let up = (PANEL * 0.5) / 12.0_f64.max((0..buckets).map(|b| ok[b] + lost[b]).max().unwrap_or(0) as f64);
        let down = (PANEL * 0.32) / 12.0_f64.max((0..buckets).map(|b| bad[b] + ro[b]).max().unwrap_or(0) as f64);
        let bw = (width / buckets as f64).max(0.5);
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.1}\" font-weight=\"bold\">{}</text><text x=\"10\" y=\"{:.1}\">writers on {node}</text>\
             <line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{mid:.1}\" y2=\"{mid:.1}\" stroke=\"#888\" stroke-width=\"0.5\"/>",
            mid - 8.0,
            escape(kind.slug()),
            mid + 6.0,
            LEFT + width
        );
        for b in 0..buckets {
            let x = LEFT + bw * b as f64;
            let mut y = mid;
            for (n, color) in [(ok[b], "#2a9d3a"), (lost[b], "#8e44ad")] {
                if n > 0 {
                    let h = n as f64 * up;
                    y -= h;
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>"
                    );
                }
            }
            let mut y = mid;
            for (n, color) in [(bad[b], "#d62728"), (ro[b], "#ff8c00")] {
                if n > 0 {
                    let h = n as f64 * down;
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"{color}\"/>"
                    );
                    y += h;
                }
            }
        }
    }
    let bottom = 50.0 + PANEL * panels.len() as f64;
    for (j, m) in r.marks.iter().enumerate() {
        let x = x_of(m.at_ms);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"50\" y2=\"{bottom:.1}\" stroke=\"#333\" stroke-dasharray=\"3,3\" stroke-width=\"0.7\"/>\
             <text x=\"{x:.1}\" y=\"48\" font-size=\"9\" text-anchor=\"middle\">{}</text>\
             <text x=\"10\" y=\"{:.1}\">{}: {} {}</text>",
            j + 1,
            bottom + 34.0 + 12.0 * j as f64,
            j + 1,
            secs(m.at_ms - t0),
            escape(&m.label)
        );
    }
    let step = if t1 - t0 > 120_000.0 { 20 } else { 10 };
    for s in (0..=((t1 - t0) / 1000.0) as u64).step_by(step) {
        let x = x_of(t0 + s as f64 * 1000.0);
        let _ = writeln!(svg, "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s} s</text>", bottom + 14.0);
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The setup, fixed by the harness (not measured).
const SETUP: &str = "Setup (`tests/common/netns.rs`, `tests/common/partition.rs`): the runbook's three nodes as Linux network \
namespaces on one machine, joined by a bridge with no uplink, addresses from 198.51.100.0/24, no default route. \
optiplex (198.51.100.1) and epyc (198.51.100.2) each run an etcd member, Patroni with PostgreSQL 15 and one instance of \
every front end; mac (198.51.100.3) runs the third etcd member. optiplex bootstraps and leads. On each of the two \
database nodes every front end has its own pair of writers connecting to that node's own front end (a new connection \
every 50 ms, plus one long-lived connection that reconnects after an error; an attempt is abandoned after 15 s), so \
the four front ends see the same fault at the same instant. Front ends: **pgleader (SQL only)** with the shipped \
settings; **HAProxy REST check** as Patroni's template (`option httpchk OPTIONS /primary`, `http-check expect status \
200`, `inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`); **HAProxy TCP check** as the runbook had it (`check`, \
inter 2s fall 3 rise 2, `balance first`); **pgleader fenced with etcd**: the shipped settings plus the job's `[etcd]` \
section (`mode = \"enforce\"`, `timeout = \"500ms\"`, `max_staleness = \"3s\"`) and `member` keys, reading the cluster's own \
etcd members from its node.\n\n\
Faults: *cut off* is the node's veth on the bridge set down (both directions, every peer); *asymmetric loss* is an \
iptables DROP of everything arriving at optiplex (what it sends still arrives); *flapping* is optiplex's link down and \
up every 2 s for 30 s; *latency* adds 100 ms to every packet each node sends to another (a round trip gains 200 ms). \
This kernel has no `sch_netem` and no tc drop action, so loss is an iptables rule and the delay is an NFQUEUE rule whose \
packets a thread in the namespace releases after the delay (`Delayer` in `tests/common/netns.rs`). After the heal \
nothing is restarted: the run waits for the cluster to recover by itself, then 30 s more for the front ends.\n\n\
Measures, per front end over its four writers: *lost* are acknowledged ids missing on the final leader after the \
heal and Patroni's rejoin (and by which node they had been acknowledged); *read-only hits* are attempts that reached \
a node in recovery; *outage* is the longest time a writer went without an acknowledged write; *overlap* is the time \
during which two primaries acknowledged writes (each node's acknowledged writes form primary terms, split at gaps over \
1 s; terms of different nodes that intersect overlap); *recovered* means every writer of the front end wrote again \
within 30 s of the cluster's recovery and none of its attempts failed in the last 5 s of that window.\n\n";

/// Fixed text after the tables: what holds by construction.
const NOTES: &str = "## Notes\n\n\
- **Patroni's timings decide the loss.** With `ttl 20, loop_wait 1, retry_timeout 5` (Patroni 4 raises a ttl below \
20 silently) an isolated leader keeps its PostgreSQL writable until its Patroni gives up on etcd and demotes it, \
and the other node is promoted only when the leader key expires (ttl after its last renewal). Every write a front \
end lets through to the isolated leader in that window is acknowledged and then thrown away by `pg_rewind` at the \
rejoin (asynchronous replication: nothing reached the other node). Production's `ttl 30, loop_wait 10` makes the \
window longer, not shorter.\n\
- **Why pgleader (SQL only) loses as much as HAProxy there.** The isolated node's pgleader sees one healthy primary: \
its local PostgreSQL, which says it is not in recovery until Patroni demotes it. HAProxy's REST check asks the local \
Patroni, which answers 200 to `OPTIONS /primary` for just as long, and the TCP check sees an open port. All three \
therefore let the same writes through and lose the same writes; a difference of one is the write that was in flight \
at the instant of the cut (acknowledged before the cut, not yet replicated). SQL alone cannot tell a primary that \
is about to be demoted from a healthy one: that is what the etcd fencing of issue 11 is for (writes stop within \
`max_staleness`), and synchronous replication loses nothing (the isolated primary cannot commit).\n\
- **Where pgleader is better.** It never routed a write to a read-only node. It holds a new client while there is no \
leader (up to `leader_wait_timeout`, 10 s) and releases it to the new primary, where HAProxy REST closes the \
connection at once (the `closed` failures) and HAProxy TCP routes to whatever port is open, the replica included \
(the 25006 failures). During the flapping link optiplex's Patroni demoted and re-promoted its PostgreSQL (the \
57P01s); pgleader saw the recovery state at its next check, HAProxy REST kept routing there until `fall` x `inter`.\n\
- **HAProxy TCP does not come back by itself after a failover.** With `balance first` it sends every client to the \
first open port, optiplex: after the old leader has rejoined as a replica, every write gets 25006 until someone \
edits the configuration.\n\
- **Two primaries never acknowledged writes at overlapping times**, through any front end: the isolated leader is \
demoted (after `retry_timeout`) before the other node is promoted (after `ttl`). The measure uses client-side times \
and errs towards reporting an overlap.\n\
- **Latency.** 200 ms more per round trip changed nothing at these timings (etcd heartbeat 100 ms, election 1 s; \
Patroni ttl 20 s): only the epyc writers, whose front ends connect across the link to optiplex, took longer per \
attempt.\n";

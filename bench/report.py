#!/usr/bin/env python3
"""Turns one results directory of bench/e2e.py (runs.jsonl + meta.json) into a Markdown report and
an SVG plot of select-only TPS by clients.

  bench/report.py RESULTS_DIR [--md docs/performance.md] [--svg docs/performance.svg]
                              [--notes bench/notes.md] [--summary]

Every figure is a median over the repetitions; ratios are ratios of medians. --summary prints the
compact tables to stdout only (what scripts/bench --quick shows).
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

ORDER = ["direct", "pgleader", "pgleader-base", "haproxy", "pgbouncer"]
COLORS = {"direct": "#444444", "pgleader": "#d62728", "pgleader-base": "#ff9896", "haproxy": "#1f77b4",
          "pgbouncer": "#2ca02c"}


def load(d):
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    rows = []
    with open(os.path.join(d, "runs.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return meta, rows


class Table:
    """Median of a metric per (test key, contender)."""

    def __init__(self, rows):
        self.v = defaultdict(list)
        self.by_rep = defaultdict(dict)
        self.cmd = {}
        for r in rows:
            key = (r["test"], r.get("mode"), r.get("clients"))
            for k, val in r.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    self.v[(key, r["contender"], k)].append(val)
                    self.by_rep[(key, r["contender"], k)][r.get("rep")] = val
            if "command" in r:
                self.cmd.setdefault((key, r["contender"]), r["command"])

    def med(self, key, c, metric):
        xs = self.v.get((key, c, metric))
        return statistics.median(xs) if xs else None

    def rep_ratios(self, key, a, b, metric):
        """a/b inside each repetition that measured both, in repetition order."""
        xa, xb = self.by_rep.get((key, a, metric), {}), self.by_rep.get((key, b, metric), {})
        return [xa[r] / xb[r] for r in sorted(set(xa) & set(xb), key=str) if xb[r]]

    def n(self, key, c, metric):
        return len(self.v.get((key, c, metric), []))


def fmt(x, digits=None):
    if x is None:
        return "–"
    if digits is None:
        digits = 0 if abs(x) >= 100 else (1 if abs(x) >= 10 else 2)
    return f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fr(x):
    return "–" if x is None else f"{x:.2f}×"


def contenders_of(meta):
    return [c for c in ORDER if c in meta["contenders"]] + [c for c in meta["contenders"] if c not in ORDER]


def select_table(t, cs, modes, clients):
    out = ["| mode | clients | " + " | ".join(f"{c} TPS" for c in cs) + " | "
           + " | ".join(f"{c}/direct" for c in cs if c != "direct") + " | pgleader/haproxy |",
           "|---|---:|" + "---:|" * (len(cs) + len(cs) - 1 + 1)]
    for m in modes:
        for n in clients:
            key = ("select", m, n)
            tps = {c: t.med(key, c, "tps") for c in cs}
            out.append(f"| {m} | {n} | " + " | ".join(fmt(tps[c]) for c in cs) + " | "
                       + " | ".join(fr(ratio(tps[c], tps.get("direct"))) for c in cs if c != "direct")
                       + f" | {fr(ratio(tps.get('pgleader'), tps.get('haproxy')))} |")
    return out


def latency_table(t, cs, modes, clients):
    out = ["| mode | clients | " + " | ".join(f"{c} avg / p50 / p99 (ms)" for c in cs) + " |",
           "|---|---:|" + "---|" * len(cs)]
    for m in modes:
        for n in clients:
            key = ("select", m, n)
            cells = []
            for c in cs:
                a, p50, p99 = (t.med(key, c, k) for k in ("lat_avg_ms", "lat_p50_ms", "lat_p99_ms"))
                cells.append(f"{fmt(a, 2)} / {fmt(p50, 2)} / {fmt(p99, 2)}")
            out.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return out


def simple_rows(t, cs, items):
    """items: (label, key, metric, digits); one row per item, ratios to direct and haproxy."""
    out = ["| measure | " + " | ".join(cs) + " | pgleader/direct | pgleader/haproxy |",
           "|---|" + "---:|" * (len(cs) + 2)]
    for label, key, metric, digits in items:
        vals = {c: t.med(key, c, metric) for c in cs}
        out.append(f"| {label} | " + " | ".join(fmt(vals[c], digits) for c in cs)
                   + f" | {fr(ratio(vals.get('pgleader'), vals.get('direct')))}"
                   + f" | {fr(ratio(vals.get('pgleader'), vals.get('haproxy')))} |")
    return out


def targets(t, modes, clients, connect_clients):
    """(target, measured, pass) rows: issue 15's targets, and issue 6's p99 and COPY ones."""
    res = []
    for m in modes:
        for n in [x for x in (8, 32, 64) if x in clients]:
            key = ("select", m, n)
            r = ratio(t.med(key, "pgleader", "tps"), t.med(key, "haproxy", "tps"))
            d = ratio(t.med(key, "pgleader", "tps"), t.med(key, "direct", "tps"))
            reps = ", ".join(f"{x:.2f}" for x in t.rep_ratios(key, "pgleader", "haproxy", "tps"))
            res.append((f"select-only {m}, {n} clients: pgleader/HAProxy TPS ≥ 1.05",
                        f"{fr(r)} (per rep {reps}; pgleader/direct {fr(d)})", r is not None and r >= 1.05))
    for m in modes:
        for n in [x for x in (8, 32, 64) if x in clients]:
            key = ("select", m, n)
            a, b = t.med(key, "pgleader", "cpu_s_per_100k_tx"), t.med(key, "haproxy", "cpu_s_per_100k_tx")
            if a is not None:
                res.append((f"proxy CPU s per 100k tx, {m}, {n} clients: pgleader < HAProxy",
                            f"{fmt(a, 2)} s vs {fmt(b, 2)} s ({fr(ratio(a, b))})", b is not None and a < b))
    for m in modes:
        if 32 in clients:
            key = ("select", m, 32)
            a, b = t.med(key, "pgleader", "lat_p99_ms"), t.med(key, "haproxy", "lat_p99_ms")
            res.append((f"p99 at 32 clients ({m}): pgleader ≤ HAProxy", f"{fmt(a, 2)} ms vs {fmt(b, 2)} ms "
                        f"({fr(ratio(a, b))})", a is not None and b is not None and a <= b))
    for n in connect_clients:
        key = ("connect", None, n)
        r = ratio(t.med(key, "pgleader", "tps"), t.med(key, "direct", "tps"))
        res.append((f"connection rate (-C, {n} client{'s' if n > 1 else ''}): pgleader ≥ 1.0× direct", fr(r),
                    r is not None and r >= 1.0))
    for test, label in (("copy_out", "COPY out"), ("copy_in", "COPY in")):
        key = (test, None, None)
        r = ratio(t.med(key, "pgleader", "mb_per_s"), t.med(key, "direct", "mb_per_s"))
        res.append((f"{label}: pgleader ≥ 0.95× direct", fr(r), r is not None and r >= 0.95))
    key = ("idle_rss", None, None)
    a, b = t.med(key, "pgleader", "kib_per_idle_session"), t.med(key, "haproxy", "kib_per_idle_session")
    if a is not None:
        res.append(("RSS per idle session: pgleader ≤ HAProxy", f"{fmt(a, 2)} KiB vs {fmt(b, 2)} KiB",
                    b is not None and a <= b))
    return res


def svg_plot(t, cs, modes, clients, path):
    """Two panels (one per query mode): median TPS by clients, one line per contender."""
    W, H, pad_l, pad_r, pad_t, pad_b = 460, 320, 64, 16, 36, 46
    panels = []
    ymax = max([t.med(("select", m, n), c, "tps") or 0 for m in modes for n in clients for c in cs] + [1])
    step = 10 ** len(str(int(ymax))) / 10
    while ymax / step < 4:
        step /= 2
    top = step * (int(ymax / step) + 1)
    for i, m in enumerate(modes):
        x0 = i * W
        g = [f'<g transform="translate({x0},0)">',
             f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
             f'pgbench -S -M {m}: median TPS</text>']
        pw, ph = W - pad_l - pad_r, H - pad_t - pad_b

        def X(j):
            return pad_l + (pw * (j + 0.5) / len(clients))

        def Y(v):
            return pad_t + ph - ph * v / top

        y = 0.0
        while y <= top + 1e-9:
            g.append(f'<line x1="{pad_l}" x2="{pad_l + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#ddd"/>')
            g.append(f'<text x="{pad_l - 6}" y="{Y(y) + 4:.1f}" text-anchor="end" font-size="11">{int(y):,}</text>')
            y += step
        for j, n in enumerate(clients):
            g.append(f'<text x="{X(j):.1f}" y="{pad_t + ph + 16}" text-anchor="middle" font-size="11">{n}</text>')
        g.append(f'<text x="{pad_l + pw / 2}" y="{H - 8}" text-anchor="middle" font-size="12">clients</text>')
        g.append(f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        for c in cs:
            pts = [(X(j), Y(v)) for j, n in enumerate(clients)
                   if (v := t.med(("select", m, n), c, "tps")) is not None]
            if not pts:
                continue
            col = COLORS.get(c, "#9467bd")
            g.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            g += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>' for x, y in pts]
        g.append("</g>")
        panels += g
    legend = ['<g transform="translate(0,%d)">' % H]
    for k, c in enumerate(cs):
        lx = 70 + k * 150
        legend.append(f'<line x1="{lx}" x2="{lx + 24}" y1="12" y2="12" stroke="{COLORS.get(c, "#9467bd")}" '
                      f'stroke-width="3"/><text x="{lx + 30}" y="16" font-size="12">{c}</text>')
    legend.append("</g>")
    total_w = W * len(modes)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{H + 28}" '
           f'viewBox="0 0 {total_w} {H + 28}" font-family="sans-serif">',
           f'<rect width="{total_w}" height="{H + 28}" fill="white"/>'] + panels + legend + ["</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--md")
    ap.add_argument("--svg")
    ap.add_argument("--notes")
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args()
    meta, rows = load(a.results)
    t = Table(rows)
    cs = contenders_of(meta)
    modes = [m for m in ("simple", "prepared") if any(r.get("mode") == m for r in rows)]
    clients = sorted({r["clients"] for r in rows if r["test"] == "select"})
    reps = max([r["rep"] for r in rows] + [0])

    sel = select_table(t, cs, modes, clients)
    lat = latency_table(t, cs, modes, clients)
    connect_clients = sorted({r["clients"] for r in rows if r["test"] == "connect"})
    other = simple_rows(t, cs, [
        (f"connection rate: pgbench -S -C, {n} client{'s' if n > 1 else ''} (TPS)", ("connect", None, n), "tps", 0)
        for n in connect_clients] + [
        ("COPY out (MB/s)", ("copy_out", None, None), "mb_per_s", 0),
        ("COPY in (MB/s)", ("copy_in", None, None), "mb_per_s", 0),
    ] + [(f"proxy CPU s per 100k tx, -S -M {m}, 32 clients", ("select", m, 32), "cpu_s_per_100k_tx", 2)
         for m in modes if 32 in clients] + [
        (f"proxy voluntary context switches per tx, -S -M {m}, 32 clients", ("select", m, 32), "wakeups_per_tx", 2)
        for m in modes if 32 in clients] + [
        ("proxy RSS per idle session, 250 open (KiB)", ("idle_rss", None, None), "kib_per_idle_session", 2),
    ] + [(f"proxy RSS per active session, -S -M prepared, {n} clients (KiB)", ("active_rss", None, n),
          "kib_per_active_session", 2) for n in sorted({r["clients"] for r in rows if r["test"] == "active_rss"})])
    tg = targets(t, modes, clients, connect_clients)
    tg_lines = ["| target (issues 6 and 15) | measured (ratio of medians) | met |", "|---|---|---|"] + [
        f"| {name} | {val} | {'yes' if ok else '**no**'} |" for name, val, ok in tg]

    if a.summary or not a.md:
        print("\n".join(sel + [""] + lat + [""] + other + [""] + tg_lines))
    if a.svg:
        svg_plot(t, cs, modes, clients, a.svg)
    if not a.md:
        return
    v = meta["versions"]
    args = meta["args"]
    argline = " ".join(f"--{k.replace('_', '-')}={val}" for k, val in args.items()
                       if val not in (None, False) and k != "out")
    cmds = []
    for key, label in ((("select", "prepared", 32), "select-only (per mode and client count)"),
                       (("connect", None, 8), "connection rate"), (("copy_out", None, None), "COPY out"),
                       (("copy_in", None, None), "COPY in")):
        cmd = t.cmd.get((key, "pgleader")) or t.cmd.get((key, "direct"))
        if cmd:
            cmds.append(f"- {label}: `{cmd}`")
    md = [
        "# Performance",
        "",
        "<!-- Generated by bench/report.py from bench/results/"
        f"{os.path.basename(os.path.normpath(a.results))}; edit bench/notes.md or the generator, not this file. -->",
        "",
        "pgleader beside a direct connection, HAProxy 2.6 (`mode tcp`, as the runbook's pg-haproxy) and "
        "PgBouncer 1.18 (session pooling), all on loopback in one run, interleaved (every test point runs "
        "against each contender in turn, then the next point; the whole sequence repeated "
        f"{reps} times). Every figure is the **median of {reps} runs**; ratios are ratios of medians. The "
        f"machine has {v.get('cpus')} cores shared by PostgreSQL, pgbench and the proxy and is noisy, so "
        "read the ratios, not the absolute numbers.",
        "",
        f"Raw per-run figures: `bench/results/{os.path.basename(os.path.normpath(a.results))}/runs.jsonl` "
        "(one JSON line per run) and `meta.json`. Run it again with `scripts/bench` (see below).",
        "",
        "![select-only TPS by clients](performance.svg)",
        "",
        "## Targets",
        "",
    ] + tg_lines + [
        "",
        "## Select-only throughput (`pgbench -S`, TPS)",
        "",
    ] + sel + [
        "",
        "## Select-only latency (from pgbench's per-transaction logs, `-l`)",
        "",
    ] + lat + [
        "",
        "## Connection rate, bulk, CPU and memory",
        "",
    ] + other + [
        "",
        "- CPU: user+sys seconds of the proxy process (`/proc/PID/stat` utime+stime, before and after the "
        "pgbench run) divided by the transactions pgbench processed, × 100,000.",
        "- RSS per idle session: `VmRSS` of the proxy process after opening N sessions (StartupMessage "
        "through ReadyForQuery, then idle) minus before, over N; each contender freshly started. PgBouncer "
        "preallocates its per-client slots, so its delta is near zero.",
        "- RSS per active session: median `VmRSS` sampled every 250 ms during the run minus the freshly "
        "started process's, over the clients.",
        "",
        "## How it was run",
        "",
        f"`scripts/bench` (`bench/e2e.py {argline}`), "
        f"started {meta.get('started')}, finished {meta.get('finished', '?')}.",
        "",
    ] + cmds + [
        "",
        "Every pgbench point uses `-n` (no vacuum), `-j 2` (`-j 1` for one client) and `-l` (per-transaction "
        "log, from which avg/p50/p99 are computed). The data: `pgbench -i -s 10` (1M accounts, in "
        f"shared_buffers); COPY table: {meta.get('copy_bytes', 0) / 1e6:.0f} MB of COPY text "
        "(bigint + 32 + 64 character md5 strings, UNLOGGED table; COPY in targets an empty UNLOGGED table, "
        "truncated before each run).",
        "",
        "### Versions and machine",
        "",
    ] + [f"- {k}: {val}" for k, val in v.items()] + [
        "",
        "### PostgreSQL settings (tuned for the benchmark: in memory, no durability cost)",
        "",
        "```",
    ] + [f"{k} = {val}" for k, val in meta["postgres_settings"].items()] + [
        "```",
        "",
    ]
    for name, text in meta["configs"].items():
        md += [f"### {name}", "", "```", text.strip(), "```", ""]
    if a.notes and os.path.exists(a.notes):
        with open(a.notes) as f:
            md += [f.read().rstrip(), ""]
    with open(a.md, "w") as f:
        f.write("\n".join(md))
    print(f"wrote {a.md}" + (f" and {a.svg}" if a.svg else ""), file=sys.stderr)


if __name__ == "__main__":
    main()

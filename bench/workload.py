#!/usr/bin/env python3
"""VietMarket-shaped benchmark (issue 15): direct PostgreSQL vs pgleader vs HAProxy on the candle schema.

Reuses bench/e2e.py's setup (the same tuned PostgreSQL 15, the same pgleader.toml and haproxy.cfg, the
same process bookkeeping) and replaces its pgbench workloads with the cluster's own traffic:

  * deploy/timescaledb/schema.sql applied with `psql -v skip_timescaledb=1` (plain PostgreSQL: the
    tables, constraints, the candles_latest trigger and the indexes; no hypertable);
  * seeded with TICKERS tickers x 3 timeframes (1m, 1h, 1d) of history, inserted in time order;
  * a pool of long-lived connections (one pgbench, --pool clients, closed loop) running three
    statement classes through `-f file@weight`:
      write   multi-row INSERT .. ON CONFLICT (ticker, tf, ts) DO UPDATE of the current 1m bar of a
              block of --batch tickers (the candles_latest_sync trigger runs once per row);
      chart   one keyset page of 500 candles for one ticker and timeframe
              (WHERE ticker = .. AND tf = .. AND ts < cursor ORDER BY ts DESC LIMIT 500);
      latest  the cross-sectional query on candles_latest (WHERE tf = .. ORDER BY ticker);
  * plus a trickle of new connections: a second pgbench with -C (a new connection per transaction)
    at a fixed rate -R, same scripts and weights, whose latency includes the connection set-up.

Every point runs against each front end in turn (the order rotates by one each repetition), with a
VACUUM of both tables before each point so that every front end starts from the same table state.
Writes one JSON line per (rep, front end) to OUT/runs.jsonl and OUT/meta.json; `--report OUT` prints
the markdown tables for docs/performance.md.

Needs root (PostgreSQL runs as the `postgres` user) and target/release/pgleader.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import DB, PGBIN, USER, log, psql, run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(REPO, "deploy", "timescaledb", "schema.sql")

# (timeframe, bar length in ms, bars of history per ticker)
TIMEFRAMES = [("1m", 60_000, 3000), ("1h", 3_600_000, 1500), ("1d", 86_400_000, 1000)]
PAGE = 500
TICKER0 = 1000  # tickers are VN1000, VN1001, ...

CLASSES = ("write", "chart", "latest")


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------------------------------------
# Schema, data, scripts


def apply_schema(port):
    return run([f"{PGBIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", DB,
                "-v", "skip_timescaledb=1", "-f", SCHEMA]).stdout


def seed(port, tickers):
    """History up to (not including) the current bar of each timeframe, in time order as an ingester
    would have written it; the trigger is off while seeding and candles_latest is then built from the
    table in one statement (the trigger's result, without 2M trigger calls)."""
    now_ms = int(time.time() * 1000)
    tfv = ", ".join(f"('{tf}', {ms}::bigint, {bars}, {now_ms // ms * ms}::bigint)" for tf, ms, bars in TIMEFRAMES)
    psql(port, f"""
        ALTER TABLE public.candles DISABLE TRIGGER candles_latest_sync;
        INSERT INTO public.candles (ticker, tf, ts, open, high, low, close, volume)
        SELECT 'VN' || ({TICKER0} + t), tf.tf, tf.cur - n * tf.ms,
               b + (n * 53 + t) % 500, greatest(b + (n * 53 + t) % 500, b + (n * 37 + t) % 500) + n % 11,
               least(b + (n * 53 + t) % 500, b + (n * 37 + t) % 500) - n % 7, b + (n * 37 + t) % 500,
               (n * 7919 + t * 104729) % 1000000
          FROM (VALUES {tfv}) AS tf(tf, ms, bars, cur)
         CROSS JOIN generate_series(1, tf.bars) AS n
         CROSS JOIN generate_series(0, {tickers - 1}) AS t
         CROSS JOIN LATERAL (SELECT 10000 + t * 100 AS b) AS base
         ORDER BY tf.ms, n DESC, t;
        ALTER TABLE public.candles ENABLE TRIGGER candles_latest_sync;
        INSERT INTO public.candles_latest
        SELECT DISTINCT ON (ticker, tf) ticker, tf, ts, open, high, low, close, volume
          FROM public.candles ORDER BY ticker, tf, ts DESC;
    """)
    psql(port, "VACUUM ANALYZE public.candles, public.candles_latest")
    psql(port, "CHECKPOINT")
    return {tf: now_ms // ms * ms for tf, ms, _ in TIMEFRAMES}


def write_scripts(d, tickers, batch, cur):
    """pgbench scripts, one statement each, so a transaction in the log is one statement of one class.
    Returns [(path, weight, class)] in the order given to pgbench (script_no in its log)."""
    os.makedirs(d, exist_ok=True)
    scripts = []

    def add(name, weight, cls, text):
        path = os.path.join(d, name + ".sql")
        with open(path, "w") as f:
            f.write(text)
        scripts.append((path, weight, cls))

    # write: the ingester's upsert of the current 1m bar, one block of `batch` tickers per statement
    # (blocks cover all tickers); literal values as psycopg2's execute_values sends them (simple
    # protocol). ts is the current minute, by the schema's own candles_now_ms(), so a statement
    # updates the bar (ON CONFLICT .. DO UPDATE, the trigger's UPDATE path) or, at a minute boundary,
    # inserts it (the INSERT path).
    blocks = [list(range(i, min(i + batch, tickers))) for i in range(0, tickers, batch)]
    for bi, block in enumerate(blocks):
        rows = []
        for k, t in enumerate(block):
            a, c = (k * 53) % 40, (k * 37) % 40
            lo, hi = min(a, c) - 1 - k % 5, max(a, c) + 1 + k % 7
            rows.append(f"('VN{TICKER0 + t}', '1m', public.candles_now_ms() / 60000 * 60000, "
                        f":p + {a}, :p + {hi}, :p + {lo}, :p + {c}, :v + {k * 13})")
        add(f"write_{bi}", 6, "write",
            "\\set p random(10000, 90000)\n\\set v random(0, 100000)\n"
            "INSERT INTO public.candles (ticker, tf, ts, open, high, low, close, volume) VALUES\n    "
            + ",\n    ".join(rows) +
            "\nON CONFLICT (ticker, tf, ts) DO UPDATE SET open = EXCLUDED.open, high = EXCLUDED.high, "
            "low = EXCLUDED.low, close = EXCLUDED.close, volume = EXCLUDED.volume;\n")
    # chart: a keyset page of 500 for one random ticker, on a random page of the history (page 0 is
    # the newest, including the live bar); the cursor is the ts of the previous page's last bar.
    # Weights: write 6 per block; chart 6/3/3 and latest 4/2 times the number of blocks, so the mix is
    # 25% write, 50% chart, 25% latest whatever --batch is.
    nb = len(blocks)
    chart_w = {"1m": 6 * nb, "1h": 3 * nb, "1d": 3 * nb}
    for tf, ms, bars in TIMEFRAMES:
        pages = max(1, bars // PAGE)
        add(f"chart_{tf}", chart_w[tf], "chart",
            f"\\set t random({TICKER0}, {TICKER0 + tickers - 1})\n"
            f"\\set page random(0, {pages - 1})\n"
            f"\\set cursor {cur[tf] + ms} - :page * {PAGE * ms}\n"
            "SELECT ts, open, high, low, close, volume FROM public.candles\n"
            f" WHERE ticker = 'VN:t' AND tf = '{tf}' AND ts < :cursor ORDER BY ts DESC LIMIT {PAGE};\n")
    # latest: the cross-sectional query the schema's candles_latest_tf_ticker_idx is for.
    for tf, w in (("1m", 4 * nb), ("1d", 2 * nb)):
        add(f"latest_{tf}", w, "latest",
            "SELECT ticker, ts, open, high, low, close, volume FROM public.candles_latest\n"
            f" WHERE tf = '{tf}' ORDER BY ticker;\n")
    return scripts


# ---------------------------------------------------------------------------------------------
# One point: the pool and the trickle at once against one front end


def pgbench_cmd(port, scripts, clients, duration, prefix, extra):
    cmd = [f"{PGBIN}/pgbench", "-n", "-M", "simple", "-h", "127.0.0.1", "-p", str(port), "-U", USER,
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(duration), "-l", f"--log-prefix={prefix}"]
    cmd += extra
    for path, weight, _ in scripts:
        cmd += ["-f", f"{path}@{weight}"]
    return cmd + [DB]


def read_log(prefix, scripts):
    """pgbench -l lines: client_id transaction_no time script_no time_epoch time_us [schedule_lag].
    `time` is the latency in µs (with -R it counts from the scheduled start, so it includes the lag
    and, with -C, the connection set-up)."""
    lat = {c: [] for c in CLASSES}
    lag = []
    for fn in glob.glob(prefix + ".*"):
        with open(fn) as f:
            for line in f:
                p = line.split()
                if len(p) < 6 or p[2] == "failed" or p[2] == "skipped":
                    continue
                lat[scripts[int(p[3])][2]].append(int(p[2]))
                if len(p) >= 7:
                    lag.append(int(p[6]))
    return lat, lag


def pct(sorted_us, q):
    if not sorted_us:
        return None
    return sorted_us[min(len(sorted_us) - 1, int(len(sorted_us) * q))] / 1000


def summarise(lat, duration):
    out = {}
    allv = []
    for c, v in lat.items():
        v.sort()
        allv += v
        out[c] = {"n": len(v), "tps": len(v) / duration, "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99),
                  "avg_ms": statistics.fmean(v) / 1000 if v else None}
    allv.sort()
    out["all"] = {"n": len(allv), "tps": len(allv) / duration, "p50_ms": pct(allv, 0.5),
                  "p99_ms": pct(allv, 0.99), "avg_ms": statistics.fmean(allv) / 1000 if allv else None}
    return out


def point(c, scripts, a, tmp):
    logdir = os.path.join(tmp, "txlog")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    pool_cmd = pgbench_cmd(c.port, scripts, a.pool, a.duration, f"{logdir}/pool", [])
    trickle_cmd = pgbench_cmd(c.port, scripts, a.trickle_clients, a.duration, f"{logdir}/trickle",
                              ["-C", "-R", str(a.trickle_rate)])
    load0 = loadavg()
    cpu0 = e2e.cpu_seconds(c.pid) if c.pid else None
    csw0 = e2e.ctx_switches(c.pid) if c.pid else None
    t0 = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in (pool_cmd, trickle_cmd)]
    outs = [p.communicate() for p in procs]
    wall = time.time() - t0
    load1 = loadavg()
    for p, cmd, (out, err) in zip(procs, (pool_cmd, trickle_cmd), outs):
        if p.returncode != 0:
            raise RuntimeError(f"pgbench failed ({p.returncode}): {' '.join(cmd)}\n{out}\n{err}")
    res = {"wall_s": wall, "loadavg_before": load0, "loadavg_after": load1,
           "commands": {"pool": " ".join(pool_cmd).replace(tmp, "TMP"),
                        "trickle": " ".join(trickle_cmd).replace(tmp, "TMP")}}
    for name, (out, _) in zip(("pool", "trickle"), outs):
        lat, lag = read_log(f"{logdir}/{name}", scripts)
        s = summarise(lat, a.duration)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        s["failed"] = int(failed.group(1)) if failed else 0
        tps = re.search(r"tps = ([\d.]+)", out)
        s["pgbench_tps"] = float(tps.group(1)) if tps else None
        if lag:
            lag.sort()
            s["lag_p99_ms"] = pct(lag, 0.99)
        if name == "trickle":
            # A few hundred samples per run: keep them, so the report can pool the repetitions
            # instead of taking the median of per-run maxima.
            s["raw_us"] = {cls: v for cls, v in lat.items()}
            conn = re.search(r"average connection time = ([\d.]+) ms", out)
            s["avg_connection_ms"] = float(conn.group(1)) if conn else None
        res[name] = s
    if cpu0 is not None:
        tx = res["pool"]["all"]["n"] + res["trickle"]["all"]["n"]
        res["cpu_s"] = e2e.cpu_seconds(c.pid) - cpu0
        res["cpu_ms_per_1k_tx"] = res["cpu_s"] / tx * 1e6
        res["wakeups_per_tx"] = (e2e.ctx_switches(c.pid) - csw0) / tx
    shutil.rmtree(logdir, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# Report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    if x is None:
        return "–"
    return f"{x:,.0f}" if nd == 0 else f"{x:,.{nd}f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def report(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "runs.jsonl"))]
    cs = meta["contenders"]
    by = {c: [r for r in rows if r["contender"] == c] for c in cs}

    def m(c, *path):
        vals = []
        for r in by[c]:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(v)
        return med(vals)

    a = meta["args"]
    lines = []
    reps = max(r["rep"] for r in rows)
    head = "| | " + " | ".join(cs) + " | pgleader/haproxy | pgleader/direct | haproxy/direct |"
    sep = "|---|" + "---:|" * (len(cs) + 3)
    have = all(x in cs for x in ("pgleader", "haproxy", "direct"))

    def row(label, vals, nd=2):
        r = f"| {label} | " + " | ".join(fmt(v, nd) for v in vals)
        if have:
            d = dict(zip(cs, vals))
            r += f" | {ratio(d['pgleader'], d['haproxy'])} | {ratio(d['pgleader'], d['direct'])} | " \
                 f"{ratio(d['haproxy'], d['direct'])}"
        return r + " |"

    lines += [f"Pool of {a['pool']} long-lived connections, closed loop (medians of {reps} repetitions):", "",
              head, sep]
    lines.append(row("throughput, all classes (TPS)", [m(c, "pool", "all", "tps") for c in cs], 0))
    for cls in CLASSES:
        lines.append(row(f"{cls}: throughput (TPS)", [m(c, "pool", cls, "tps") for c in cs], 0))
        lines.append(row(f"{cls}: p50 (ms)", [m(c, "pool", cls, "p50_ms") for c in cs]))
        lines.append(row(f"{cls}: p99 (ms)", [m(c, "pool", cls, "p99_ms") for c in cs]))
    lines.append(row("candle rows written per s", [
        (m(c, "pool", "write", "tps") or 0) * a["batch"] for c in cs], 0))
    lines.append(row("proxy CPU ms per 1k tx (pool + trickle)", [m(c, "cpu_ms_per_1k_tx") for c in cs]))
    lines.append(row("proxy voluntary context switches per tx", [m(c, "wakeups_per_tx") for c in cs]))
    lines += ["", f"Trickle of new connections ({a['trickle_clients']} pgbench clients, `-C -R {a['trickle_rate']}`: "
              "a new connection per transaction, same scripts and weights; latency counted from the "
              "scheduled start, so it includes the connection set-up):", "", head, sep]
    lines.append(row("new connections (transactions) per s", [m(c, "trickle", "all", "tps") for c in cs], 1))
    lines.append(row("all classes: p50 (ms)", [m(c, "trickle", "all", "p50_ms") for c in cs]))
    lines.append(row("all classes: p99 (ms)", [m(c, "trickle", "all", "p99_ms") for c in cs]))
    for cls in CLASSES:
        lines.append(row(f"{cls}: p50 (ms)", [m(c, "trickle", cls, "p50_ms") for c in cs]))
        lines.append(row(f"{cls}: p99 (ms)", [m(c, "trickle", cls, "p99_ms") for c in cs]))
    pooled = {c: {cls: sorted(x for r in by[c] for x in r["trickle"].get("raw_us", {}).get(cls, []))
                  for cls in CLASSES} for c in cs}
    if all(pooled[c][cls] for c in cs for cls in CLASSES):
        for c in cs:
            pooled[c]["all"] = sorted(x for cls in CLASSES for x in pooled[c][cls])
        for cls in ("all",) + CLASSES:
            lines.append(row(f"{cls}: p99 (ms), all {reps} repetitions pooled (n = "
                             + "/".join(str(len(pooled[c][cls])) for c in cs) + ")",
                             [pct(pooled[c][cls], 0.99) for c in cs]))
    lines.append(row("schedule lag p99 (ms): how late pgbench started a transaction (included above)",
                     [m(c, "trickle", "lag_p99_ms") for c in cs]))
    lines.append(row("pgbench average connection time (ms)", [m(c, "trickle", "avg_connection_ms") for c in cs]))
    fails = sum((r["pool"]["failed"] + r["trickle"]["failed"]) for r in rows)
    lines += ["", f"Failed transactions, all points: {fails}."]
    loads = [r["loadavg_before"][0] for r in rows] + [r["loadavg_after"][0] for r in rows]
    lines += [f"1-minute load average during the points: {min(loads):.1f}–{max(loads):.1f} "
              f"(median {statistics.median(loads):.1f}) on {meta['versions'].get('cpus')} cores; "
              f"before the run {meta['loadavg_start'][0]:.1f}."]
    if have:
        lines += ["", "Targets (issue 15): p99 per statement class ≤ HAProxy's, throughput ≥ HAProxy's:", "",
                  "| target | pgleader | haproxy | ratio | met |", "|---|---:|---:|---:|---|"]
        pt, ht = m("pgleader", "pool", "all", "tps"), m("haproxy", "pool", "all", "tps")
        lines.append(f"| pool throughput ≥ HAProxy | {fmt(pt, 0)} TPS | {fmt(ht, 0)} TPS | {ratio(pt, ht)} | "
                     f"{'yes' if pt >= ht else '**no**'} |")
        for part in ("pool", "trickle"):
            for cls in CLASSES:
                p, h = m("pgleader", part, cls, "p99_ms"), m("haproxy", part, cls, "p99_ms")
                how = ""
                if part == "trickle" and pooled["pgleader"][cls] and pooled["haproxy"][cls]:
                    p, h = pct(pooled["pgleader"][cls], 0.99), pct(pooled["haproxy"][cls], 0.99)
                    how = " (pooled)"
                lines.append(f"| {part} {cls} p99{how} ≤ HAProxy | {fmt(p)} ms | {fmt(h)} ms | {ratio(p, h)} | "
                             f"{'yes' if p <= h else '**no**'} |")
        per = []
        for rep in range(1, reps + 1):
            pr = next((x for x in by["pgleader"] if x["rep"] == rep), None)
            hr = next((x for x in by["haproxy"] if x["rep"] == rep), None)
            if pr and hr:
                per.append(pr["pool"]["all"]["tps"] / hr["pool"]["all"]["tps"])
        lines += ["", "pgleader/HAProxy pool TPS within each repetition: "
                  + ", ".join(f"{x:.2f}×" for x in per)
                  + f" (range {min(per):.2f}–{max(per):.2f}×): the spread is the noise floor of one ratio."]
    lines += ["", "Per repetition (pool TPS, all classes; 1-minute load average before → after):", "",
              "| rep | " + " | ".join(cs) + " |", "|---:|" + "---|" * len(cs)]
    for rep in range(1, reps + 1):
        cells = []
        for c in cs:
            r = next((x for x in by[c] if x["rep"] == rep), None)
            cells.append(f"{r['pool']['all']['tps']:,.0f} (load {r['loadavg_before'][0]:.1f} → "
                         f"{r['loadavg_after'][0]:.1f})" if r else "–")
        lines.append(f"| {rep} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15, help="seconds per front end and repetition")
    ap.add_argument("--tickers", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50, help="candles per INSERT")
    ap.add_argument("--pool", type=int, default=16, help="long-lived connections (pgbench -c)")
    ap.add_argument("--trickle-rate", type=float, default=10, help="new connections per s (pgbench -C -R)")
    ap.add_argument("--trickle-clients", type=int, default=8,
                    help="pgbench clients for the trickle; 2 left it 205-350 ms behind schedule at p99 under load")
    ap.add_argument("--pgleader", default="target/release/pgleader")
    ap.add_argument("--only", help="comma-separated front ends (default: direct,pgleader,haproxy)")
    ap.add_argument("--out", help="results directory (runs.jsonl, meta.json)")
    ap.add_argument("--report", metavar="DIR", help="print the markdown tables for a results directory")
    a = ap.parse_args()
    if a.report:
        report(a.report)
        return
    if not a.out:
        ap.error("--out is required")
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="pgleader-workload-")
    os.chmod(tmp, 0o755)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs_path = os.path.join(a.out, "runs.jsonl")
    try:
        load_start = loadavg()
        log(f"tmp {tmp}; load {load_start}; postgres")
        pg = e2e.Postgres(tmp)
        psql(pg.port, f"CREATE DATABASE {DB}", db="postgres")
        apply_schema(pg.port)
        t0 = time.time()
        cur = seed(pg.port, a.tickers)
        n = psql(pg.port, "SELECT count(*) FROM public.candles").strip()
        size = psql(pg.port, "SELECT pg_size_pretty(pg_total_relation_size('public.candles'))").strip()
        log(f"seeded {n} candles ({size}) in {time.time() - t0:.0f} s")
        scripts = write_scripts(os.path.join(tmp, "scripts"), a.tickers, a.batch, cur)
        script_text = {os.path.basename(p): open(p).read() for p, _, _ in scripts}
        contenders = [e2e.Direct(pg), e2e.PgLeader(tmp, pg, os.path.abspath(a.pgleader)), e2e.HAProxy(tmp, pg)]
        if a.only:
            keep = set(a.only.split(","))
            contenders = [c for c in contenders if c.name in keep]
        meta = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "args": vars(a),
            "loadavg_start": load_start,
            "versions": e2e.versions({c.name: c.binary for c in contenders if isinstance(c, e2e.PgLeader)}),
            "postgres_settings": e2e.PG_SETTINGS,
            "contenders": [c.name for c in contenders],
            "data": {"candles": int(n), "candles_size": size, "timeframes": TIMEFRAMES, "tickers": a.tickers},
            "scripts": [(os.path.basename(p), w, cls) for p, w, cls in scripts],
            "script_text": script_text,
            "configs": {"pgleader.toml": e2e.PGLEADER_TOML, "haproxy.cfg": e2e.HAPROXY_CFG},
        }
        with open(os.path.join(a.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        for c in contenders:
            c.start()
        for rep in range(1, a.reps + 1):
            k = (rep - 1) % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                psql(pg.port, "VACUUM public.candles_latest, public.candles")
                r = point(c, scripts, a, tmp)
                row = {"rep": rep, "contender": c.name, **r}
                with open(runs_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                pool = r["pool"]
                log(f"rep {rep} {c.name}: pool {pool['all']['tps']:.0f} TPS "
                    + " ".join(f"{cls} p50/p99 {pool[cls]['p50_ms']}/{pool[cls]['p99_ms']}" for cls in CLASSES)
                    + f"; trickle {r['trickle']['all']['n']} tx p99 {r['trickle']['all']['p99_ms']}"
                    + f"; load {r['loadavg_before'][0]} -> {r['loadavg_after'][0]}")
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        meta["candles_after"] = int(psql(pg.port, "SELECT count(*) FROM public.candles").strip())
        with open(os.path.join(a.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        log(f"done: {runs_path}")
    finally:
        e2e.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

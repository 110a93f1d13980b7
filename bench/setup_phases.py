#!/usr/bin/env python3
"""Where a new connection's set-up time goes under load (issue 15: 14.2 vs 11.1 ms through
pgleader and HAProxy in the workload's trickle).

One PostgreSQL, loaded by a direct `pgbench -S` (both cores busy, the same load for every front
end); meanwhile `pgbench -S -C` (a new connection per transaction) through direct, pgleader and
HAProxy in turn, interleaved, `--reps` times. pgbench reports each run's average connection
time; pgleader's debug line for each admitted session (`setup_us`: from the session task's start
to the backend's first byte relayed; `backend_us`: the part spent waiting on PostgreSQL: the
connect, the SSL answer and the first reply) says how much of its own figure is PostgreSQL's.

    python3 bench/setup_phases.py --out bench/results/setup-phases-1

Results: DIR/runs.jsonl, one line per run, and the summary on stdout (also DIR/summary.txt).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import DB, PGBIN, USER, log  # noqa: E402


def admitted_lines(path, offset):
    """The `admitted` debug lines pgleader wrote after byte `offset` of its log, and the new end."""
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    # Only whole lines: a line still being written is read next time.
    data = data[: data.rfind(b"\n") + 1]
    for raw in data.splitlines():
        try:
            v = json.loads(raw)
        except ValueError:
            continue
        fields = v.get("fields", {})
        if fields.get("message") == "admitted" and "setup_us" in fields:
            out.append((fields["setup_us"], fields["backend_us"]))
    return out, offset + len(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pgleader", default="target/release/pgleader")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connect-clients", type=int, default=2)
    ap.add_argument("--load-clients", type=int, default=16, help="0: no background load")
    ap.add_argument("--workers", type=int, help="pgleader's [proxy] workers (default: its own default)")
    ap.add_argument("--baseline", action="append", default=[],
                    help="another pgleader binary in the same interleaved run, as NAME=BIN (repeatable)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="pgleader-setup-")
    os.chmod(tmp, 0o755)
    try:
        pg = e2e.Postgres(tmp)
        e2e.psql(pg.port, f"CREATE DATABASE {DB}", db="postgres")
        e2e.run([f"{PGBIN}/pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER, DB])
        direct = e2e.Direct(pg)
        leaders = [e2e.PgLeader(tmp, pg, args.pgleader, workers=args.workers)]
        for spec in args.baseline:
            name, binary = spec.split("=", 1)
            leaders.append(e2e.PgLeader(tmp, pg, binary, name=name, workers=args.workers))
        for leader in leaders:
            # JSON logs with the proxy's debug lines (the `admitted` line carries the timings).
            with open(leader.conf, "a") as f:
                f.write('[log]\nformat = "json"\nfilter = "info,pgleader::proxy=debug"\naccess = false\n')
            leader.start()
        haproxy = e2e.HAProxy(tmp, pg)
        haproxy.start()
        contenders = [direct, *leaders, haproxy]
        runs = []
        offsets = {leader.name: 0 for leader in leaders}
        for rep in range(args.reps):
            for c in contenders:
                load = None
                if args.load_clients:
                    load = subprocess.Popen(
                        [f"{PGBIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER,
                         "-c", str(args.load_clients), "-j", "2", "-T", str(args.duration + 4), "-S", DB],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(2)
                if c in leaders:
                    _, offsets[c.name] = admitted_lines(c.logf, offsets[c.name])
                res = e2e.pgbench(c, c.port, ["-S", "-C"], args.connect_clients, args.duration)
                if load:
                    load.wait()
                res.update({"rep": rep, "contender": c.name})
                if c in leaders:
                    phases, offsets[c.name] = admitted_lines(c.logf, offsets[c.name])
                    if phases:
                        setup = sorted(p[0] for p in phases)
                        backend = sorted(p[1] for p in phases)
                        res["sessions_logged"] = len(phases)
                        res["setup_ms_mean"] = statistics.fmean(setup) / 1000
                        res["setup_ms_p50"] = setup[len(setup) // 2] / 1000
                        res["backend_ms_mean"] = statistics.fmean(backend) / 1000
                        res["backend_ms_p50"] = backend[len(backend) // 2] / 1000
                        res["own_ms_mean"] = res["setup_ms_mean"] - res["backend_ms_mean"]
                log(f"rep {rep} {c.name}: {json.dumps({k: v for k, v in res.items() if k != 'command'})}")
                runs.append(res)
        with open(os.path.join(args.out, "runs.jsonl"), "w") as f:
            for r in runs:
                f.write(json.dumps(r) + "\n")
        lines = [f"setup phases: -C with {args.connect_clients} clients, {args.duration} s, "
                 f"load {args.load_clients} direct -S clients, {args.reps} reps, medians of reps"]
        for name in [c.name for c in contenders]:
            rs = [r for r in runs if r["contender"] == name]
            med = lambda k: statistics.median(r[k] for r in rs) if all(k in r for r in rs) else None  # noqa: E731
            line = f"{name:12} tps {med('tps'):8.1f}  pgbench conn_ms {med('conn_ms'):6.2f}"
            if med("setup_ms_mean") is not None:
                line += (f"  setup mean {med('setup_ms_mean'):.2f} p50 {med('setup_ms_p50'):.2f}"
                         f"  waiting on PostgreSQL mean {med('backend_ms_mean'):.2f} p50 {med('backend_ms_p50'):.2f}"
                         f"  the rest mean {med('own_ms_mean'):.2f} ms")
            lines.append(line)
        summary = "\n".join(lines)
        print(summary)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(summary + "\n")
    finally:
        e2e.cleanup()


if __name__ == "__main__":
    main()

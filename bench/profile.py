#!/usr/bin/env python3
"""Profile pgleader under pgbench select-only load (the findings are in docs/performance.md).

  bench/profile.py perf      [--clients 32] [--seconds 10] [--mode prepared]   # perf record -g on the proxy
  bench/profile.py callgrind [--clients 32] [--seconds 10]                     # pgleader under callgrind
  bench/profile.py syscalls  [--clients 32] [--seconds 5]                      # strace -c -f on the proxy

  --connect adds pgbench's -C (a new connection per transaction): what a connection costs.
  --proxy haproxy profiles HAProxy (mode tcp, as bench/e2e.py runs it) instead, for the same
  figures side by side (perf and syscalls).

Starts its own Postgres and pgleader (bench/e2e.py's classes) in a temp dir and stops them after.
Reports go to bench/results/profile-<kind>-<time>/.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["perf", "callgrind", "syscalls"])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--mode", default="prepared")
    ap.add_argument("--pgleader", default="target/release/pgleader")
    ap.add_argument("--proxy", choices=["pgleader", "haproxy"], default="pgleader")
    ap.add_argument("--connect", action="store_true", help="pgbench -C: a new connection per transaction")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.proxy == "haproxy" and a.kind == "callgrind":
        ap.error("callgrind profiles pgleader only")
    out = os.path.abspath(a.out or f"bench/results/profile-{a.kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="pgleader-prof-")
    os.chmod(tmp, 0o755)
    try:
        pg = e2e.Postgres(tmp)
        e2e.psql(pg.port, f"CREATE DATABASE {e2e.DB}", db="postgres")
        e2e.run([f"{e2e.PGBIN}/pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(pg.port),
                 "-U", e2e.USER, e2e.DB])
        if a.proxy == "haproxy":
            pl = e2e.HAProxy(tmp, pg)
        else:
            pl = e2e.PgLeader(tmp, pg, os.path.abspath(a.pgleader))
        if a.kind == "callgrind":
            # Run the binary under valgrind; PgLeader.start() waits for /readyz, which is slow there.
            p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out",
                                  "--separate-threads=no", os.path.abspath(a.pgleader), "--config", pl.conf],
                                 stdout=subprocess.DEVNULL, stderr=open(f"{out}/valgrind.log", "w"))
            pl.pid = p.pid
            e2e.started.append(("pgleader-callgrind", p.pid, signal.SIGTERM))
            e2e.wait_sql(pl.port, 120)
        else:
            pl.start()
        bench = [f"{e2e.PGBIN}/pgbench", "-n", "-S", "-M", a.mode, "-c", str(a.clients), "-j", "2",
                 "-T", str(a.seconds), "-h", "127.0.0.1", "-p", str(pl.port), "-U", e2e.USER]
        bench += ["-C", e2e.DB] if a.connect else [e2e.DB]
        prof = None
        if a.kind == "perf":
            prof = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", f"{out}/perf.data", "-p",
                                     str(pl.pid), "--", "sleep", str(a.seconds)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif a.kind == "syscalls":
            prof = subprocess.Popen(["strace", "-c", "-f", "-o", f"{out}/strace.txt", "-p", str(pl.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0 = e2e.cpu_seconds(pl.pid)
        r = subprocess.run(bench, capture_output=True, text=True)
        cpu = e2e.cpu_seconds(pl.pid) - cpu0
        with open(f"{out}/pgbench.txt", "w") as f:
            f.write(" ".join(bench) + "\n" + r.stdout + r.stderr + f"\nproxy cpu_s {cpu:.2f}\n")
        print(r.stdout[-600:])
        print(f"proxy cpu seconds: {cpu:.2f}")
        if prof is not None:
            if a.kind == "syscalls":
                prof.send_signal(signal.SIGINT)
            prof.wait()
        if a.kind == "perf":
            rep = subprocess.run(["perf", "report", "-i", f"{out}/perf.data", "--stdio", "--no-children",
                                  "--percent-limit", "0.7", "-g", "none", "--sort", "dso,sym"],
                                 capture_output=True, text=True)
            with open(f"{out}/perf-report.txt", "w") as f:
                f.write(rep.stdout)
            print(rep.stdout[:6000])
        if a.kind == "callgrind":
            e2e.cleanup()  # stops pgleader, so callgrind writes its file
            rep = subprocess.run(["callgrind_annotate", "--inclusive=no", f"{out}/callgrind.out"],
                                 capture_output=True, text=True)
            with open(f"{out}/callgrind-annotate.txt", "w") as f:
                f.write(rep.stdout)
            print(rep.stdout[:6000])
        if a.kind == "syscalls":
            with open(f"{out}/strace.txt") as f:
                print(f.read()[:4000])
    finally:
        e2e.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

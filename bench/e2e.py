#!/usr/bin/env python3
"""End-to-end benchmark: direct PostgreSQL vs pgleader vs HAProxy (mode tcp) vs PgBouncer (session).

Starts everything on loopback in a temp dir, runs every test point against each contender in turn
(A B C D, A B C D, ...), repeats, and appends one JSON line per run to RESULTS/runs.jsonl, plus
RESULTS/meta.json (versions, machine, exact commands). bench/report.py turns that into
docs/performance.md and docs/performance.svg. Run it through scripts/bench.

Stdlib only. Needs root (Postgres and PgBouncer run as the `postgres` user). Every process it
starts is stopped on exit, by PID; nothing is killed by name.
"""

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

PGBIN = "/usr/lib/postgresql/15/bin"
HAPROXY = "/usr/sbin/haproxy"
PGBOUNCER = "/usr/sbin/pgbouncer"
DB = "bench"
USER = "postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Postgres tuning, written down in docs/performance.md: everything in RAM, no durability cost, so the
# server is as fast as it can be and the proxies' overhead shows.
PG_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "400",
    "shared_buffers": "'512MB'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "'4GB'",
    "checkpoint_timeout": "'30min'",
    "autovacuum": "off",
    "jit": "off",
}

started = []  # (name, pid, is_child Popen or None)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    r = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if r.returncode != 0:
        log(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
    return r


def as_postgres():
    return {"user": "postgres", "group": "postgres"}


def stop_pid(pid, sig=signal.SIGTERM, wait=15.0):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    end = time.time() + wait
    while time.time() < end:
        try:
            wpid, _ = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return
        except ChildProcessError:
            pass
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cleanup():
    while started:
        name, pid, sig = started.pop()
        stop_pid(pid, sig)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ctx_switches(pid):
    """Voluntary context switches of all the process's threads: how often they blocked (wakeups)."""
    total = 0
    for task in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(task) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def wait_port(port, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def psql(port, sql, db=DB, **kw):
    return run([f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
                "-U", USER, "-d", db, "-Atc", sql], **kw).stdout


def try_sql(port, db=DB):
    r = subprocess.run([f"{PGBIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", db,
                        "-Atc", "select 1"], capture_output=True)
    return r.returncode == 0


def wait_sql(port, timeout=30.0, db=DB):
    end = time.time() + timeout
    while not try_sql(port, db):
        if time.time() > end:
            raise RuntimeError(f"no SQL on port {port} after {timeout} s")
        time.sleep(0.1)


class Postgres:
    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "pg")
        self.port = free_port()
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres", "postgres")
        run([f"{PGBIN}/initdb", "-D", self.dir, "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8"],
            cwd=tmp, **as_postgres())
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            for k, v in {**PG_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.dir}'"}.items():
                f.write(f"{k} = {v}\n")
        logf = open(os.path.join(tmp, "postgres.log"), "w")
        p = subprocess.Popen([f"{PGBIN}/postgres", "-D", self.dir], stdout=logf, stderr=logf, cwd=tmp,
                             **as_postgres())
        self.pid = p.pid
        started.append(("postgres", p.pid, signal.SIGINT))
        wait_sql(self.port, 60, db="postgres")


class Contender:
    name = "?"
    pid = None
    port = None

    def start(self):
        pass

    def stop(self):
        if self.pid:
            for i, (_, pid, sig) in enumerate(started):
                if pid == self.pid:
                    started.pop(i)
                    stop_pid(pid, sig)
                    break
            self.pid = None

    def restart(self):
        self.stop()
        self.start()


class Direct(Contender):
    name = "direct"

    def __init__(self, pg):
        self.port = pg.port


class PgLeader(Contender):
    def __init__(self, tmp, pg, binary, name="pgleader", workers=None, proxy_extra=""):
        self.name = name
        self.binary = binary
        self.port = free_port()
        self.admin = free_port()
        self.conf = os.path.join(tmp, f"{name}.toml")
        self.logf = os.path.join(tmp, f"{name}.log")
        with open(self.conf, "w") as f:
            toml = PGLEADER_TOML.format(port=self.port, admin=self.admin, pg=pg.port, user=USER)
            if workers is not None:
                proxy_extra = f"workers = {workers}\n" + proxy_extra
            toml = toml.replace("[admin]", proxy_extra + "[admin]", 1)
            f.write(toml)

    def start(self):
        p = subprocess.Popen([self.binary, "--config", self.conf], stdout=subprocess.DEVNULL,
                             stderr=open(self.logf, "a"))
        self.pid = p.pid
        started.append((self.name, p.pid, signal.SIGTERM))
        end = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > end:
                raise RuntimeError("pgleader not ready")
            time.sleep(0.1)
        wait_sql(self.port)


# [health] timeout 5 s, as HAProxy's `timeout check 5s` below. pgbench saturates both cores, and
# on this 2-vCPU VM (kernel 6.18) the health check's PostgreSQL backend, woken by the query, was
# seen runnable and not run for 1.8 s while the pgbench backends kept the CPUs: at the default
# 800 ms, three such checks in a row mark the only server down and cut every session mid-run.
# HAProxy's check is a TCP connect, which the kernel answers without PostgreSQL running.
PGLEADER_TOML = """# generated by bench/e2e.py
[proxy]
listen = "127.0.0.1:{port}"
max_connections = 1000
[admin]
listen = "127.0.0.1:{admin}"
[health]
user = "{user}"
database = "postgres"
interval = "1s"
timeout = "5s"
[[backend]]
name = "pg"
address = "127.0.0.1:{pg}"
"""


class HAProxy(Contender):
    name = "haproxy"

    def __init__(self, tmp, pg):
        self.port = free_port()
        self.conf = os.path.join(tmp, "haproxy.cfg")
        with open(self.conf, "w") as f:
            f.write(HAPROXY_CFG.format(port=self.port, pg=pg.port))

    def start(self):
        p = subprocess.Popen([HAPROXY, "-db", "-f", self.conf], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.pid = p.pid
        started.append((self.name, p.pid, signal.SIGTERM))
        wait_port(self.port)
        wait_sql(self.port)


# As the runbook's pg-haproxy (Patroni's template): mode tcp, long client/server timeouts.
HAPROXY_CFG = """# generated by bench/e2e.py
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 4s
    timeout client 30m
    timeout server 30m
    timeout check 5s
listen postgres
    bind 127.0.0.1:{port}
    server pg 127.0.0.1:{pg} maxconn 1000 check inter 3s fall 3 rise 2
"""


class PgBouncer(Contender):
    name = "pgbouncer"

    def __init__(self, tmp, pg):
        self.port = free_port()
        d = os.path.join(tmp, "pgbouncer")
        os.makedirs(d)
        self.conf = os.path.join(d, "pgbouncer.ini")
        self.pidfile = os.path.join(d, "pgbouncer.pid")
        with open(os.path.join(d, "userlist.txt"), "w") as f:
            f.write(f'"{USER}" ""\n')
        with open(self.conf, "w") as f:
            f.write(PGBOUNCER_INI.format(port=self.port, pg=pg.port, db=DB, dir=d))
        for p in [d] + [os.path.join(d, x) for x in os.listdir(d)]:
            shutil.chown(p, "postgres", "postgres")
        self.dir = d

    def start(self):
        p = subprocess.Popen([PGBOUNCER, self.conf], stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.dir, "stderr.log"), "a"), **as_postgres())
        self.pid = p.pid
        started.append((self.name, p.pid, signal.SIGINT))
        wait_port(self.port)
        wait_sql(self.port)


PGBOUNCER_INI = """; generated by bench/e2e.py
[databases]
{db} = host=127.0.0.1 port={pg} dbname={db}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 400
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
logfile = {dir}/pgbouncer.log
log_connections = 0
log_disconnections = 0
pidfile = {dir}/pgbouncer.pid
"""


# ---------------------------------------------------------------------------------------------
# Workloads


def pgbench(c, port, args, clients, duration, logdir=None, sample_rss=False):
    jobs = min(clients, 2)
    cmd = [f"{PGBIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-c", str(clients),
           "-j", str(jobs), "-T", str(duration)] + args
    if logdir:
        os.makedirs(logdir, exist_ok=True)
        cmd += ["-l", f"--log-prefix={logdir}/tx"]
    cmd.append(DB)
    cpu0 = cpu_seconds(c.pid) if c.pid else None
    csw0 = ctx_switches(c.pid) if c.pid else None
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = []
    if sample_rss and c.pid:
        time.sleep(min(1.0, duration / 3))
        while p.poll() is None:
            rss.append(rss_kib(c.pid))
            time.sleep(0.25)
    out, err = p.communicate()
    wall = time.time() - t0
    cpu = cpu_seconds(c.pid) - cpu0 if c.pid else None
    csw = ctx_switches(c.pid) - csw0 if c.pid else None
    if p.returncode != 0:
        raise RuntimeError(f"pgbench failed: {' '.join(cmd)}\n{out}\n{err}")
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    tx = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", out)
    res = {"tps": tps, "tx": tx, "wall_s": wall, "failed": int(failed.group(1)) if failed else 0,
           "command": " ".join(cmd).replace(f"{logdir}/", "DIR/") if logdir else " ".join(cmd)}
    conn = re.search(r"average connection time = ([\d.]+) ms", out)
    if conn:
        res["conn_ms"] = float(conn.group(1))
    if cpu is not None:
        res["cpu_s"] = cpu
        res["cpu_s_per_100k_tx"] = cpu / tx * 1e5
        res["wakeups_per_tx"] = csw / tx
    if rss:
        res["rss_kib_samples"] = rss
    if logdir:
        lat = []
        for fn in glob.glob(f"{logdir}/tx.*"):
            with open(fn) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        lat.append(int(parts[2]))
        shutil.rmtree(logdir)
        lat.sort()
        if lat:
            res["lat_avg_ms"] = statistics.fmean(lat) / 1000
            res["lat_p50_ms"] = lat[len(lat) // 2] / 1000
            res["lat_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000
            res["lat_n"] = len(lat)
    return res


def startup_packet():
    body = b"".join(x.encode() + b"\0" for x in ("user", USER, "database", DB)) + b"\0"
    return struct.pack("!ii", 8 + len(body), 196608) + body


def open_session(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(startup_packet())
    buf = b""
    while True:  # read messages until ReadyForQuery
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed during startup")
        buf += chunk
        while len(buf) >= 5:
            kind, length = buf[0:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            if kind == b"E":
                raise RuntimeError(f"startup error: {buf[:1 + length]!r}")
            if kind == b"Z":
                return s
            buf = buf[1 + length:]


def idle_sessions(c, n):
    time.sleep(0.5)
    before = rss_kib(c.pid) if c.pid else None
    t0 = time.time()
    socks = [open_session(c.port) for _ in range(n)]
    open_s = time.time() - t0
    time.sleep(1.0)
    after = rss_kib(c.pid) if c.pid else None
    for s in socks:
        try:
            s.sendall(b"X\0\0\0\4")
        except OSError:
            pass
        s.close()
    res = {"sessions": n, "open_s": open_s}
    if c.pid:
        res.update(rss_before_kib=before, rss_after_kib=after, kib_per_idle_session=(after - before) / n)
    return res


def copy_out(c, size):
    cmd = [f"{PGBIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(c.port), "-U", USER, "-d", DB,
           "-c", "COPY bulk TO STDOUT"]
    t0 = time.time()
    with open(os.devnull, "w") as null:
        subprocess.run(cmd, check=True, stdout=null)
    dt = time.time() - t0
    return {"seconds": dt, "mb_per_s": size / dt / 1e6, "bytes": size, "command": " ".join(cmd) + " > /dev/null"}


def copy_in(c, path, size):
    psql(c.port, "TRUNCATE bulk_in")
    cmd = [f"{PGBIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(c.port), "-U", USER, "-d", DB,
           "-c", "COPY bulk_in FROM STDIN"]
    t0 = time.time()
    with open(path) as f:
        subprocess.run(cmd, check=True, stdin=f, stdout=subprocess.DEVNULL)
    dt = time.time() - t0
    return {"seconds": dt, "mb_per_s": size / dt / 1e6, "bytes": size, "command": " ".join(cmd) + " < bulk.copy"}


# ---------------------------------------------------------------------------------------------


def versions(binaries):
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    osr = "?"
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            m = re.search(r'PRETTY_NAME="([^"]+)"', f.read())
            osr = m.group(1) if m else "?"
    v = {
        "postgres": first([f"{PGBIN}/postgres", "--version"]),
        "pgbench": first([f"{PGBIN}/pgbench", "--version"]),
        "haproxy": first([HAPROXY, "-v"]),
        "pgbouncer": first([PGBOUNCER, "--version"]),
        "rustc": first(["rustc", "--version"]),
        "kernel": platform.release(),
        "os": osr,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(int(mem) / 1024 / 1024, 1),
    }
    for name, path in binaries.items():
        v[name] = first([path, "--version"])
    try:
        v["pgleader_commit"] = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--", "src/pump.rs"]).stdout.strip()
        if dirty:
            v["pgleader_commit"] += " (+ uncommitted src/pump.rs)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: 2 reps, 3 s points, 8/32 clients, 50 MB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench point")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--connect-clients", default="8", help="client counts for the pgbench -C points")
    ap.add_argument("--modes", default="simple,prepared", help="pgbench query modes for the select-only points")
    ap.add_argument("--copy-mb", type=int, default=500)
    ap.add_argument("--idle-sessions", type=int, default=250)
    ap.add_argument("--pgleader", default="target/release/pgleader")
    ap.add_argument("--baseline", action="append", default=[],
                    help="another pgleader binary, benchmarked as contender pgleader-base (or NAME=BIN; repeatable)")
    ap.add_argument("--workers", action="append", default=[],
                    help="the --pgleader binary again with [proxy] workers = N, as contender NAME (NAME=N; repeatable)")
    ap.add_argument("--variant", action="append", default=[],
                    help="the --pgleader binary again with more [proxy] keys, as contender NAME "
                         "(NAME:key=value,key=value; e.g. nospares:spare_connections=0; repeatable)")
    ap.add_argument("--only", help="comma-separated contenders to run (default: all)")
    ap.add_argument("--tests", help="comma-separated test groups: idle,active,select,connect,copy")
    ap.add_argument("--out", required=True, help="results directory (runs.jsonl, meta.json)")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.duration, a.clients, a.copy_mb = min(a.reps, 2), 3, "8,32", min(a.copy_mb, 50)
    clients = [int(x) for x in a.clients.split(",")]
    groups = set((a.tests or "idle,active,select,connect,copy").split(","))
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="pgleader-bench-")
    finished = False
    os.chmod(tmp, 0o755)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs_path = os.path.join(a.out, "runs.jsonl")
    try:
        log(f"tmp {tmp}; postgres")
        pg = Postgres(tmp)
        psql(pg.port, f"CREATE DATABASE {DB}", db="postgres")
        run([f"{PGBIN}/pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER, DB])
        copy_path = os.path.join(pg.dir, "bulk.copy")
        copy_size = 0
        if "copy" in groups:
            # ~106 bytes a row in COPY text format.
            rows = a.copy_mb * 1_000_000 // 106
            log(f"generating {rows} rows (~{a.copy_mb} MB) for COPY")
            psql(pg.port, "CREATE UNLOGGED TABLE bulk (id bigint, a text, b text); "
                          "CREATE UNLOGGED TABLE bulk_in (id bigint, a text, b text); "
                          f"INSERT INTO bulk SELECT g, md5(g::text), md5((g+1)::text) || md5((g+2)::text) "
                          f"FROM generate_series(1, {rows}) g; "
                          f"COPY bulk TO '{copy_path}'")
            copy_size = os.path.getsize(copy_path)
        psql(pg.port, "VACUUM ANALYZE")
        psql(pg.port, "CHECKPOINT")

        contenders = [Direct(pg), PgLeader(tmp, pg, os.path.abspath(a.pgleader))]
        for b in a.baseline:
            name, _, path = b.rpartition("=")
            contenders.append(PgLeader(tmp, pg, os.path.abspath(path), name=name or "pgleader-base"))
        for w in a.workers:
            name, _, n = w.rpartition("=")
            contenders.append(PgLeader(tmp, pg, os.path.abspath(a.pgleader), name=name or f"pgleader-w{n}",
                                       workers=int(n)))
        for v in a.variant:
            name, _, keys = v.partition(":")
            extra = "".join(f"{k.strip()} = {val.strip()}\n" for k, _, val in
                            (kv.partition("=") for kv in keys.split(",") if kv))
            contenders.append(PgLeader(tmp, pg, os.path.abspath(a.pgleader), name=name, proxy_extra=extra))
        contenders += [HAProxy(tmp, pg), PgBouncer(tmp, pg)]
        if a.only:
            keep = set(a.only.split(","))
            contenders = [c for c in contenders if c.name in keep]
        meta = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "args": vars(a),
            "versions": versions({c.name: c.binary for c in contenders if isinstance(c, PgLeader)}),
            "postgres_settings": PG_SETTINGS,
            "contenders": [c.name for c in contenders],
            "configs": {
                "pgleader.toml": PGLEADER_TOML,
                "haproxy.cfg": HAPROXY_CFG,
                "pgbouncer.ini": PGBOUNCER_INI,
            },
            "copy_bytes": copy_size,
        }
        with open(os.path.join(a.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        for c in contenders:
            c.start()

        def record(rep, test, c, res, **key):
            row = {"rep": rep, "test": test, "contender": c.name, **key, **res}
            with open(runs_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                     if k in ("tps", "conn_ms", "lat_p99_ms", "cpu_s_per_100k_tx", "wakeups_per_tx", "mb_per_s", "kib_per_idle_session",
                              "kib_per_active_session")}
            log(f"rep {rep} {test} {key} {c.name}: {brief}")

        for rep in range(1, a.reps + 1):
            if "idle" in groups:
                for c in contenders:
                    c.restart()
                    record(rep, "idle_rss", c, idle_sessions(c, a.idle_sessions))
            if "active" in groups:
                for c in contenders:
                    c.restart()
                    time.sleep(0.3)
                    fresh = rss_kib(c.pid) if c.pid else None
                    n = max(clients)
                    r = pgbench(c, c.port, ["-S", "-M", "prepared"], n, min(a.duration, 5), sample_rss=True)
                    if fresh is not None and r.get("rss_kib_samples"):
                        r["rss_fresh_kib"] = fresh
                        r["kib_per_active_session"] = (statistics.median(r["rss_kib_samples"]) - fresh) / n
                    record(rep, "active_rss", c, r, clients=n)
            if "select" in groups:
                for mode in a.modes.split(","):
                    for n in clients:
                        for c in contenders:
                            r = pgbench(c, c.port, ["-S", "-M", mode], n, a.duration,
                                        logdir=os.path.join(tmp, "txlog"))
                            record(rep, "select", c, r, mode=mode, clients=n)
            if "connect" in groups:
                for n in [int(x) for x in a.connect_clients.split(",")]:
                    for c in contenders:
                        record(rep, "connect", c, pgbench(c, c.port, ["-S", "-C"], n, a.duration), clients=n)
            if "copy" in groups:
                for c in contenders:
                    record(rep, "copy_out", c, copy_out(c, copy_size))
                for c in contenders:
                    record(rep, "copy_in", c, copy_in(c, copy_path, copy_size))
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        with open(os.path.join(a.out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        log(f"done: {runs_path}")
        finished = True
    finally:
        cleanup()
        # The proxies' own logs say why a run failed (a session cut, a health check down): keep
        # the end of each (the access log makes them tens of MB) beside the figures.
        if not finished:
            for name in os.listdir(tmp):
                if name.endswith(".log"):
                    with open(os.path.join(tmp, name), "rb") as src:
                        src.seek(max(0, os.path.getsize(src.name) - 1_000_000))
                        with open(os.path.join(a.out, name), "wb") as dst:
                            dst.write(src.read())
            log(f"failed; the logs' last MB are in {a.out}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

# pgleader: the leader-aware PostgreSQL proxy on :5433, one per Linux node (replaces pg-haproxy).
#
# Apps keep their connection strings (postgres://...@<node>:5433/vietmarket): every node's
# pgleader checks both Patroni members with SQL (pg_is_in_recovery(), timeline) and routes only
# to the current primary. Each instance decides on its own; they share nothing (DESIGN.md).
#
# Requirements (docs/runbook.md, "One-time host preparation"):
#   * Nomad >= 1.4 on servers and clients: Nomad Variables (nomadVar), Nomad-native service
#     checks (provider = "nomad"), template uid/gid. See "update" below for rolling behaviour.
#   * The image pgleader:<version> present on each Linux node's Docker (built from the repo's
#     Dockerfile; there is no registry in this cluster).
#   * The Nomad Variable nomad/jobs/pgleader with key health_password (the password of the
#     `pgleader` login role, member of pg_monitor). It never appears in this file.
#   * pg-haproxy stopped first: it holds :5433 on the same nodes (runbook, "Cutover").
#
# Driver: docker. Both Linux nodes already run every other job (etcd, timescaledb-ha,
# pg-haproxy) under Docker, so this adds no new dependency; the image carries its own Debian 12
# userland, so the glibc binary does not depend on the hosts' distribution (an `exec` task would
# need a host glibc at least as new as the build's, and a binary staged on every node or an
# artifact server). The container uses host networking: clients and backends see real addresses.
#
# How this file was checked (no Nomad binary or Docker engine where it was written):
# tests/deploy_files.rs parses it with hcl-rs, checks the structure below (system job, static
# ports, /readyz check, kill_signal/kill_timeout against the rendered shutdown_grace, linux
# constraint, update max_parallel, no password literal), renders the config template from an
# explicit substitution table and validates it with pgleader's own Config::from_toml and
# `pgleader check-config`. `nomad job validate` / `nomad job plan` have NOT been run on it.
job "pgleader" {
  datacenters = ["dc1"]
  type        = "system"

  # Linux only. The Mac mini is the etcd witness and runs no Postgres and no proxy; Docker's host
  # networking does not exist on macOS either. A system job silently skips nodes whose driver is
  # missing, so the choice is explicit here rather than an accident of fingerprinting.
  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  # One node at a time. Nomad before the system-job deployments of newer releases enforces only
  # max_parallel and stagger for system jobs (the health fields below are then ignored, and the
  # stagger is the pause between nodes); releases with system deployments also wait for the
  # /readyz check. While one node's pgleader restarts, apps that list both nodes in their
  # connection string (runbook) reconnect through the other one.
  update {
    max_parallel     = 1
    stagger          = "30s"
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "pgleader" {
    network {
      mode = "host"

      port "pg" {
        static = 5433
      }

      port "admin" {
        static = 9543
      }

      # The read-only listener ([read_only] below): sessions go to a replica within the lag bounds.
      port "pg_read" {
        static = 5434
      }
    }

    # Service name and tags are what deploy/prometheus/prometheus.yml selects on.
    service {
      provider = "nomad"
      name     = "pgleader"
      port     = "admin"
      tags     = ["pgleader", "metrics", "node=${node.unique.name}"]

      # Readiness: 200 only while this pgleader has a routable leader and is not draining.
      # No check_restart here: "no leader" is a cluster state, and restarting the proxy would
      # not fix it (it would only drop the clients waiting for the next leader).
      check {
        name     = "readyz"
        type     = "http"
        path     = "/readyz"
        interval = "5s"
        timeout  = "2s"
      }

      # Liveness: 200 while the process answers; a hung pgleader is restarted.
      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"

        check_restart {
          limit = 3
          grace = "30s"
        }
      }
    }

    # The read-only port's own service: ready while a read session can be served (a replica in
    # bounds, or the leader as the fallback). Its check asks the admin port's /readyz/read.
    service {
      provider = "nomad"
      name     = "pgleader-read"
      port     = "pg_read"
      tags     = ["pgleader", "read-only", "node=${node.unique.name}"]

      check {
        name     = "readyz-read"
        type     = "http"
        port     = "admin"
        path     = "/readyz/read"
        interval = "5s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "pgleader" {
      driver = "docker"

      # SIGTERM starts pgleader's drain: /readyz turns 503, the listener closes, open sessions
      # get up to proxy.shutdown_grace (20s below), then are cut, and the process exits 0.
      # kill_timeout is shutdown_grace + 5s, so Nomad's SIGKILL never lands mid-drain, and stays
      # within the client's default max_kill_timeout (30s). A node drain therefore lets sessions
      # finish. tests/deploy_files.rs keeps the two numbers in step.
      kill_signal  = "SIGTERM"
      kill_timeout = "25s"

      config {
        image        = "pgleader:0.1.0"
        force_pull   = false
        network_mode = "host"
        args         = ["--config", "/local/pgleader.toml"]
      }

      # The config holds no secret, so it is world-readable: the image runs as uid 10001, not
      # root, and a 0600 root-owned file would be unreadable. A change (job update) re-renders it
      # and pgleader reloads on SIGHUP without dropping sessions.
      #
      # admin.listen binds the node's Nomad host address (the tailnet IP), not loopback: Nomad's
      # checks and Prometheus must reach /readyz and /metrics from outside the process. That is
      # acceptable because the admin port serves read-only data, and POST /reload refuses every
      # peer that is not loopback (so here it is refused altogether: reload through SIGHUP,
      # `nomad alloc signal -s SIGHUP <alloc>`, which is what change_mode below sends too).
      template {
        destination   = "local/pgleader.toml"
        perms         = "0644"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<EOF
# Rendered by Nomad from deploy/nomad/jobs/pgleader.nomad.hcl; edit the job, not this file.
[proxy]
listen = "0.0.0.0:{{ env "NOMAD_PORT_pg" }}"
leader_wait_timeout = "10s"
connect_timeout = "2s"
client_hello_timeout = "10s"
max_connections = 2000
shutdown_grace = "20s"

[admin]
listen = "{{ env "NOMAD_IP_admin" }}:{{ env "NOMAD_PORT_admin" }}"

[health]
interval = "1s"
fast_interval = "100ms"
timeout = "800ms"
rise = 1
fall = 3
user = "pgleader"
database = "postgres"
password_file = "{{ env "NOMAD_SECRETS_DIR" }}/health_password"

[log]
format = "json"
filter = "info"

[etcd]
# Fencing with Patroni's leader lease (README, "Fencing"): a backend leads only while a quorum read
# of /service/vietmarket/leader names its member. The three members of deploy/nomad/jobs/etcd.nomad.hcl.
endpoints = ["http://100.83.150.39:2379", "http://100.103.201.10:2379", "http://100.100.5.40:2379"]
namespace = "service"         # Patroni's default namespace (the timescaledb-ha job sets none)
scope = "vietmarket"          # PATRONI_SCOPE in deploy/nomad/jobs/timescaledb-ha.nomad.hcl
timeout = "500ms"             # one read, across endpoints; below [health] interval
max_staleness = "3s"          # one confirmation lasts at most this; above interval + timeout
mode = "enforce"              # "observe" to roll out: decide and report, route as SQL alone

[read_only]
# Reads on :5434 (runbook, "Read-only listener"): chart pages and "latest" queries to the replica
# within these bounds. fallback = "leader" keeps reads served when the replica is down or behind;
# apps that must never write through this port use fallback = "refuse" (the port routes, it does
# not make sessions read-only).
listen = "0.0.0.0:5434"
max_lag_bytes = 16777216      # 16 MiB of WAL
max_lag = "5s"
fallback = "leader"

[[backend]]
name = "optiplex"
address = "100.83.150.39:5432"
member = "optiplex"

[[backend]]
name = "epyc"
address = "100.103.201.10:5432"
member = "epyc"
EOF
      }

      # The health-check password, from the Nomad Variable nomad/jobs/pgleader (readable by this
      # job's workload identity without any ACL policy). Rendered into the task's secrets dir
      # (a per-task tmpfs) as 0400 owned by the image's uid, so only pgleader can read it.
      # Until the Variable exists the task waits in "Template: Missing: nomad.var.block(...)".
      template {
        destination   = "secrets/health_password"
        perms         = "0400"
        uid           = 10001
        gid           = 10001
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = "{{ with nomadVar \"nomad/jobs/pgleader\" }}{{ .health_password }}{{ end }}"
      }

      # Sizing, from docs/performance.md and docs/soak.md: about 8 MiB at rest, 2.75 KiB per idle
      # and 3.4 KiB per active session (no per-session copy buffers; one 64 KiB scratch buffer per
      # worker), so max_connections = 2000 adds under 16 MiB. 128 MiB reserved leaves room for
      # kernel socket buffers charged to the cgroup; memory_max (honoured only with memory
      # oversubscription enabled) caps bursts. CPU: about 2.5 s per 100k select-only transactions.
      resources {
        cpu        = 200
        memory     = 128
        memory_max = 256
      }
    }
  }
}

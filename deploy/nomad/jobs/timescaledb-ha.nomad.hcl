# timescaledb-ha: two PostgreSQL + TimescaleDB members (Optiplex, EPYC) managed by Patroni, with
# etcd (deploy/nomad/jobs/etcd.nomad.hcl) as the DCS. Deploy after etcd, before pgleader
# (docs/runbook.md, "Deploy order").
#
# Started through the image's own Timescale entrypoint (/timescaledb_entrypoint.sh), which makes
# $PGDATA and execs `patroni /home/postgres/postgres.yml`. That file is rendered below and holds
# only what is the same on both nodes; Patroni takes everything per-node or secret from PATRONI_*
# environment variables, which override the file:
#   * per node: PATRONI_NAME and the connect addresses, from Nomad's interpolation (the node's
#     host address, which must be its tailnet IP: runbook, "One-time host preparation");
#   * secrets: from the Nomad Variable nomad/jobs/timescaledb-ha (superuser_password,
#     replication_password, restapi_password, vietmarket_password, pgleader_password).
#
# Users: Patroni 3 no longer creates users at bootstrap, so `post_bootstrap` runs
# deploy/timescaledb-ha/post_bootstrap.sh (embedded with file(): run `nomad job run` from the
# repository root) to create the app role `vietmarket` with its database, and the health-check
# role `pgleader` (LOGIN, member of pg_monitor, nothing else) that pgleader logs in with. For a
# cluster that was bootstrapped before this job, the runbook runs the same script by hand.
#
# Data: the Nomad host volume "timescaledb-ha" (/opt/timescaledb-ha, owned by uid 1000, the
# image's postgres user) mounted at /home/postgres/pgdata; PGDATA is its data/ subdirectory,
# the same layout as the previous job, so existing data is reused as is.
#
# How this file was checked: tests/deploy_files.rs parses it with hcl-rs, checks the members,
# ports, host volume, PATRONI_* environment and secrets handling, runs the rendered Patroni
# config through `patroni --validate-config` (Patroni from scripts/patroni-venv), and runs
# post_bootstrap.sh against a real PostgreSQL, then logs in as both roles. No Nomad binary or
# Docker engine was available: `nomad job validate` and the image itself were not exercised.
job "timescaledb-ha" {
  datacenters = ["dc1"]
  type        = "service"

  # One member at a time, so the other holds (or takes) the leader lock meanwhile. Before
  # updating the node that runs the leader, `patronictl switchover` moves it first (runbook).
  update {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "30s"
    healthy_deadline = "10m"
    auto_revert      = false
  }

  group "db" {
    count = 2

    constraint {
      attribute = "${attr.kernel.name}"
      value     = "linux"
    }

    constraint {
      attribute = "${node.unique.name}"
      operator  = "regexp"
      value     = "^(optiplex|epyc)$"
    }

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      mode = "host"

      port "pg" {
        static = 5432
      }

      port "patroni" {
        static = 8008
      }
    }

    volume "pgdata" {
      type   = "host"
      source = "timescaledb-ha"
    }

    service {
      provider = "nomad"
      name     = "timescaledb"
      port     = "pg"
      tags     = ["postgres", "node=${node.unique.name}"]

      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    # Patroni's /health is 200 while PostgreSQL runs, whatever its role: the member is alive.
    # Who is primary is pgleader's business (by SQL), not this check's.
    service {
      provider = "nomad"
      name     = "patroni"
      port     = "patroni"
      tags     = ["patroni", "node=${node.unique.name}"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 5
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    task "db" {
      driver = "docker"

      # Patroni stops PostgreSQL (fast) on SIGTERM and releases the leader lock, so the other
      # member takes over at once instead of after the lock's TTL. 30s is the client's default
      # max_kill_timeout.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      volume_mount {
        volume      = "pgdata"
        destination = "/home/postgres/pgdata"
      }

      config {
        image        = "timescale/timescaledb-ha:pg16"
        network_mode = "host"
        entrypoint   = ["/timescaledb_entrypoint.sh"]
        # PostgreSQL's dynamic shared memory (parallel queries) lives in /dev/shm; Docker's 64 MiB
        # default is too small.
        shm_size = 1073741824

        mount {
          type     = "bind"
          source   = "local/postgres.yml"
          target   = "/home/postgres/postgres.yml"
          readonly = true
        }
      }

      env {
        PATRONI_SCOPE                      = "vietmarket"
        PATRONI_NAME                       = "${node.unique.name}"
        PATRONI_ETCD3_HOSTS                = "100.83.150.39:2379,100.103.201.10:2379,100.100.5.40:2379"
        PATRONI_RESTAPI_LISTEN             = "${NOMAD_IP_patroni}:8008"
        PATRONI_RESTAPI_CONNECT_ADDRESS    = "${NOMAD_IP_patroni}:8008"
        PATRONI_RESTAPI_USERNAME           = "patroni"
        PATRONI_POSTGRESQL_LISTEN          = "${NOMAD_IP_pg},127.0.0.1:5432"
        PATRONI_POSTGRESQL_CONNECT_ADDRESS = "${NOMAD_IP_pg}:5432"
        PATRONI_POSTGRESQL_DATA_DIR        = "/home/postgres/pgdata/data"
        PATRONI_POSTGRESQL_PGPASS          = "/home/postgres/.pgpass"
        PATRONI_SUPERUSER_USERNAME         = "postgres"
        PATRONI_REPLICATION_USERNAME       = "replicator"
      }

      # Secrets as environment variables, from the Nomad Variable. change_mode noop: a rotated
      # password takes effect at the member's next restart, never by restarting a database on
      # its own. Values must be env-file safe (the runbook uses hex).
      template {
        destination = "secrets/patroni.env"
        env         = true
        change_mode = "noop"
        data        = <<EOF
{{ with nomadVar "nomad/jobs/timescaledb-ha" -}}
PATRONI_SUPERUSER_PASSWORD={{ .superuser_password }}
PATRONI_REPLICATION_PASSWORD={{ .replication_password }}
PATRONI_RESTAPI_PASSWORD={{ .restapi_password }}
VIETMARKET_PASSWORD={{ .vietmarket_password }}
PGLEADER_PASSWORD={{ .pgleader_password }}
{{- end }}
EOF
      }

      template {
        destination = "local/post_bootstrap.sh"
        perms       = "0755"
        change_mode = "noop"
        data        = file("deploy/timescaledb-ha/post_bootstrap.sh")
      }

      # Identical on both members. bootstrap.* is used once, by the member that initialises the
      # cluster; bootstrap.dcs seeds the cluster-wide settings kept in etcd afterwards (change
      # them with `patronictl edit-config`, not here).
      template {
        destination = "local/postgres.yml"
        perms       = "0644"
        change_mode = "noop"
        data        = <<EOF
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        shared_preload_libraries: timescaledb
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        max_connections: 200
        shared_buffers: 768MB
        effective_cache_size: 2GB
        maintenance_work_mem: 256MB
        password_encryption: scram-sha-256
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
    - data-checksums
  post_bootstrap: /local/post_bootstrap.sh

postgresql:
  use_unix_socket: true
  parameters:
    unix_socket_directories: /var/run/postgresql
  pg_hba:
    - local all all peer
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication replicator 100.64.0.0/10 scram-sha-256
    - host all all 100.64.0.0/10 scram-sha-256
EOF
      }

      # As the previous job. shared_buffers is a quarter of it (768 MiB); the rest is for
      # backends, maintenance_work_mem and the page cache the cgroup is charged for.
      resources {
        cpu    = 1500
        memory = 3072
      }
    }
  }
}

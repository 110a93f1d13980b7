# etcd: the 3-member DCS that Patroni (deploy/nomad/jobs/timescaledb-ha.nomad.hcl) keeps its
# leader lock in. Optiplex + EPYC + the Mac mini witness, so either database node can fail and the
# other two members still hold quorum. Deploy it first (docs/runbook.md, "Deploy order").
#
# Static bootstrap: every member is pinned to its node and named in --initial-cluster below.
# --initial-cluster-state=new only matters on an empty data dir; on restarts etcd reads its own
# WAL, so re-running this job never re-bootstraps. To start over, see the runbook
# ("etcd will not form quorum").
#
# Data: /opt/etcd on the Linux nodes, as the Nomad host volume "etcd" (client config, runbook);
# ~/Library/Application Support/etcd on the Mac, where etcd is the Homebrew binary under
# raw_exec (no Docker host networking on macOS). Keep the Mac's etcd on the same minor version
# as the image below (`brew pin etcd`).
#
# Listeners bind each node's tailnet address (and loopback for clients), never 0.0.0.0: etcd
# here has no auth, so it must not be reachable on other interfaces.
#
# How this file was checked: tests/deploy_files.rs parses it with hcl-rs and checks the three
# members, their pinning, the identical static cluster naming all three IPs, the advertised URLs
# and the data dirs. No Nomad binary was available, so `nomad job validate` was not run.
job "etcd" {
  datacenters = ["dc1"]
  type        = "service"

  update {
    max_parallel = 1
  }

  group "optiplex" {
    constraint {
      attribute = "${node.unique.name}"
      value     = "optiplex"
    }

    network {
      mode = "host"

      port "client" {
        static = 2379
      }

      port "peer" {
        static = 2380
      }
    }

    volume "etcd" {
      type   = "host"
      source = "etcd"
    }

    service {
      provider = "nomad"
      name     = "etcd"
      port     = "client"
      tags     = ["etcd", "node=${node.unique.name}"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "etcd" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      volume_mount {
        volume      = "etcd"
        destination = "/etcd-data"
      }

      config {
        image        = "quay.io/coreos/etcd:v3.5.16"
        network_mode = "host"
        command      = "/usr/local/bin/etcd"
        args = [
          "--name=etcd-optiplex",
          "--data-dir=/etcd-data",
          "--listen-client-urls=http://100.83.150.39:2379,http://127.0.0.1:2379",
          "--advertise-client-urls=http://100.83.150.39:2379",
          "--listen-peer-urls=http://100.83.150.39:2380",
          "--initial-advertise-peer-urls=http://100.83.150.39:2380",
          "--initial-cluster=etcd-optiplex=http://100.83.150.39:2380,etcd-epyc=http://100.103.201.10:2380,etcd-macmini=http://100.100.5.40:2380",
          "--initial-cluster-state=new",
          "--initial-cluster-token=vietmarket-etcd",
          "--auto-compaction-mode=periodic",
          "--auto-compaction-retention=1h",
          "--quota-backend-bytes=536870912",
        ]
      }

      resources {
        cpu    = 300
        memory = 256
      }
    }
  }

  group "epyc" {
    constraint {
      attribute = "${node.unique.name}"
      value     = "epyc"
    }

    network {
      mode = "host"

      port "client" {
        static = 2379
      }

      port "peer" {
        static = 2380
      }
    }

    volume "etcd" {
      type   = "host"
      source = "etcd"
    }

    service {
      provider = "nomad"
      name     = "etcd"
      port     = "client"
      tags     = ["etcd", "node=${node.unique.name}"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "etcd" {
      driver       = "docker"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      volume_mount {
        volume      = "etcd"
        destination = "/etcd-data"
      }

      config {
        image        = "quay.io/coreos/etcd:v3.5.16"
        network_mode = "host"
        command      = "/usr/local/bin/etcd"
        args = [
          "--name=etcd-epyc",
          "--data-dir=/etcd-data",
          "--listen-client-urls=http://100.103.201.10:2379,http://127.0.0.1:2379",
          "--advertise-client-urls=http://100.103.201.10:2379",
          "--listen-peer-urls=http://100.103.201.10:2380",
          "--initial-advertise-peer-urls=http://100.103.201.10:2380",
          "--initial-cluster=etcd-optiplex=http://100.83.150.39:2380,etcd-epyc=http://100.103.201.10:2380,etcd-macmini=http://100.100.5.40:2380",
          "--initial-cluster-state=new",
          "--initial-cluster-token=vietmarket-etcd",
          "--auto-compaction-mode=periodic",
          "--auto-compaction-retention=1h",
          "--quota-backend-bytes=536870912",
        ]
      }

      resources {
        cpu    = 300
        memory = 256
      }
    }
  }

  group "macmini" {
    # The witness: macOS, tagged meta.role = "witness" in its Nomad client config.
    constraint {
      attribute = "${attr.kernel.name}"
      value     = "darwin"
    }

    constraint {
      attribute = "${meta.role}"
      value     = "witness"
    }

    network {
      mode = "host"

      port "client" {
        static = 2379
      }

      port "peer" {
        static = 2380
      }
    }

    service {
      provider = "nomad"
      name     = "etcd"
      port     = "client"
      tags     = ["etcd", "node=${node.unique.name}"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "etcd" {
      # raw_exec must be enabled in the Mac's Nomad client config (plugin "raw_exec").
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      config {
        command = "/opt/homebrew/opt/etcd/bin/etcd"
        args = [
          "--name=etcd-macmini",
          "--data-dir=/Users/lenamkhanh/Library/Application Support/etcd",
          "--listen-client-urls=http://100.100.5.40:2379,http://127.0.0.1:2379",
          "--advertise-client-urls=http://100.100.5.40:2379",
          "--listen-peer-urls=http://100.100.5.40:2380",
          "--initial-advertise-peer-urls=http://100.100.5.40:2380",
          "--initial-cluster=etcd-optiplex=http://100.83.150.39:2380,etcd-epyc=http://100.103.201.10:2380,etcd-macmini=http://100.100.5.40:2380",
          "--initial-cluster-state=new",
          "--initial-cluster-token=vietmarket-etcd",
          "--auto-compaction-mode=periodic",
          "--auto-compaction-retention=1h",
          "--quota-backend-bytes=536870912",
        ]
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

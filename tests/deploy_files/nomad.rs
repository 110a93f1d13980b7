//! The pgleader and etcd jobs, and that every job file parses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hcl::Block;

use crate::hcl_job::*;
use crate::{assert_success, duration, read, repo, run, EPYC, MACMINI, OPTIPLEX};

const PGLEADER_JOB: &str = "deploy/nomad/jobs/pgleader.nomad.hcl";
const ETCD_JOB: &str = "deploy/nomad/jobs/etcd.nomad.hcl";

#[test]
fn every_nomad_job_file_parses() {
    let dir = repo().join("deploy/nomad/jobs");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("read deploy/nomad/jobs") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "hcl") {
            let rel = path.strip_prefix(repo()).expect("inside repo").to_string_lossy().into_owned();
            let job = job(&rel);
            assert!(!blocks(&job.body, "group").is_empty(), "{rel}: a job without groups");
            names.insert(label(&job).to_owned());
        }
    }
    let want: BTreeSet<String> = ["etcd", "pgleader", "timescaledb-ha"].map(String::from).into();
    assert!(want.is_subset(&names), "expected jobs {want:?}, found {names:?}");
}

struct PgleaderJob {
    job: Block,
}

impl PgleaderJob {
    fn load() -> PgleaderJob {
        PgleaderJob { job: job(PGLEADER_JOB) }
    }
    fn group(&self) -> &Block {
        one(&self.job.body, "group")
    }
    fn task(&self) -> &Block {
        one(&self.group().body, "task")
    }
    fn config_template(&self) -> String {
        text(&template(self.task(), "local/pgleader.toml").body, "data")
    }
}

/// The explicit table the config template is rendered with: what Nomad would put in the task's
/// environment on Optiplex (docker driver: the secrets dir is `/secrets`; here a temp dir).
fn pgleader_substitutions(secrets_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        (r#"env "NOMAD_PORT_pg""#, "5433".to_owned()),
        (r#"env "NOMAD_IP_admin""#, OPTIPLEX.to_owned()),
        (r#"env "NOMAD_PORT_admin""#, "9543".to_owned()),
        (r#"env "NOMAD_SECRETS_DIR""#, secrets_dir.display().to_string()),
    ]
}

#[test]
fn pgleader_job_structure() {
    let j = PgleaderJob::load();
    assert_eq!(label(&j.job), "pgleader");
    assert_eq!(text(&j.job.body, "type"), "system", "one pgleader per node");

    // Linux only, explicitly (the Mac witness runs etcd only; exec/docker host networking are
    // Linux-only and a system job would silently skip it).
    let mut all_constraints = constraints(&j.job.body);
    all_constraints.extend(constraints(&j.group().body));
    all_constraints.extend(constraints(&j.task().body));
    assert!(
        all_constraints.iter().any(|(a, op, v)| a == "${attr.kernel.name}" && op == "=" && v == "linux"),
        "no constraint requiring ${{attr.kernel.name}} = linux: {all_constraints:?}"
    );

    // Rolling updates, one node at a time.
    let update = blocks(&j.group().body, "update").into_iter().chain(blocks(&j.job.body, "update")).next();
    let update = update.expect("an update block");
    assert_eq!(number(&update.body, "max_parallel"), 1);

    // Host networking with static ports.
    let network = one(&j.group().body, "network");
    assert_eq!(text(&network.body, "mode"), "host");
    assert_eq!(static_port(j.group(), "pg"), 5433);
    assert_eq!(static_port(j.group(), "admin"), 9543);

    // A Nomad-native service on the admin port whose check is /readyz.
    let services = blocks(&j.group().body, "service");
    let service = services.iter().find(|s| text(&s.body, "name") == "pgleader").expect("service pgleader");
    assert_eq!(text(&service.body, "provider"), "nomad");
    assert_eq!(text(&service.body, "port"), "admin");
    let tags = string_list(&service.body, "tags");
    assert!(tags.iter().any(|t| t == "metrics"), "Prometheus selects on the `metrics` tag: {tags:?}");
    let checks = blocks(&service.body, "check");
    let readyz = checks.iter().find(|c| attr(&c.body, "path").and_then(expr_text).as_deref() == Some("/readyz"));
    let readyz = readyz.expect("an http check on /readyz");
    assert_eq!(text(&readyz.body, "type"), "http");
    assert!(blocks(&readyz.body, "check_restart").is_empty(), "no leader is not a reason to restart pgleader");

    // The read-only port has its own service, whose check is the admin port's /readyz/read.
    assert_eq!(static_port(j.group(), "pg_read"), 5434);
    let read = services.iter().find(|s| text(&s.body, "name") == "pgleader-read").expect("service pgleader-read");
    assert_eq!(text(&read.body, "provider"), "nomad");
    assert_eq!(text(&read.body, "port"), "pg_read");
    let check = one(&read.body, "check");
    assert_eq!(text(&check.body, "type"), "http");
    assert_eq!(text(&check.body, "port"), "admin");
    assert_eq!(attr(&check.body, "path").and_then(expr_text).as_deref(), Some("/readyz/read"));
    assert!(blocks(&check.body, "check_restart").is_empty(), "a lagging replica is not a reason to restart pgleader");

    // The task: docker, host network, the rendered config as its --config.
    let task = j.task();
    assert_eq!(text(&task.body, "driver"), "docker");
    let config = one(&task.body, "config");
    assert_eq!(text(&config.body, "network_mode"), "host");
    let args = string_list(&config.body, "args");
    assert_eq!(args, ["--config", "/local/pgleader.toml"]);
    assert!(!boolean(&config.body, "force_pull"), "the image is built on the nodes, not pulled");
    assert_eq!(text(&task.body, "kill_signal"), "SIGTERM");

    // Both templates re-render into a SIGHUP (reload), never a restart.
    for dest in ["local/pgleader.toml", "secrets/health_password"] {
        let t = template(task, dest);
        assert_eq!(text(&t.body, "change_mode"), "signal", "{dest}");
        assert_eq!(text(&t.body, "change_signal"), "SIGHUP", "{dest}");
    }
    // The config holds no secret and must be readable by the container's non-root user.
    assert_eq!(text(&template(task, "local/pgleader.toml").body, "perms"), "0644");
}

#[test]
fn pgleader_job_renders_a_config_that_pgleader_accepts() {
    let j = PgleaderJob::load();
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("health_password"), "not-the-real-one").expect("write password file");
    let data = j.config_template();
    let rendered = render(&data, &pgleader_substitutions(secrets.path()));
    let config = pgleader::Config::from_toml(&rendered, "rendered pgleader.nomad.hcl template")
        .unwrap_or_else(|e| panic!("{e}\n--- rendered:\n{rendered}"));

    // The ports the config listens on are the job's static ports.
    assert_eq!(u64::from(config.proxy.listen.port()), static_port(j.group(), "pg"));
    assert_eq!(u64::from(config.admin.listen.port()), static_port(j.group(), "admin"));
    assert!(config.proxy.listen.ip().is_unspecified(), "clients reach :5433 on every address");
    let read_only = config.read_only.as_ref().expect("the job has a read-only listener");
    assert_eq!(u64::from(read_only.listen.port()), static_port(j.group(), "pg_read"));
    assert!(read_only.listen.ip().is_unspecified());
    assert!(
        !config.admin.listen.ip().is_loopback(),
        "Nomad checks and Prometheus must reach the admin port from outside the process"
    );

    // The health password comes from the file the second template writes, nothing inline.
    assert!(config.health.password.is_none() && config.health.password_env.is_none());
    let password_file = config.health.password_file.clone().expect("health.password_file");
    assert_eq!(password_file, secrets.path().join("health_password"));
    assert!(data.contains(r#"password_file = "{{ env "NOMAD_SECRETS_DIR" }}/health_password""#));
    assert_eq!(
        config.health_password().expect("password file readable").map(|s| s.expose().to_owned()).as_deref(),
        Some("not-the-real-one")
    );

    // The backends are the two Patroni members.
    let backends: Vec<String> = config.backend.iter().map(|b| b.address.to_string()).collect();
    assert_eq!(backends, [format!("{OPTIPLEX}:5432"), format!("{EPYC}:5432")]);
    assert_eq!(config.health.user, "pgleader");

    // Fencing: the etcd endpoints are the etcd job's members and the ones Patroni uses; the
    // scope, namespace and member names are Patroni's (timescaledb-ha job).
    let etcd = config.etcd.as_ref().expect("the job fences with [etcd]");
    assert_eq!(etcd.mode, pgleader::config::EtcdMode::Enforce);
    let members = [OPTIPLEX, EPYC, MACMINI].map(|ip| format!("http://{ip}:2379"));
    assert_eq!(etcd.endpoints, members, "the three members of {ETCD_JOB}");
    let patroni = read("deploy/nomad/jobs/timescaledb-ha.nomad.hcl");
    let env = |key: &str| -> Option<String> {
        patroni.lines().find_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
    };
    let hosts: Vec<String> =
        env("PATRONI_ETCD3_HOSTS").expect("PATRONI_ETCD3_HOSTS").split(',').map(|h| format!("http://{h}")).collect();
    assert_eq!(etcd.endpoints, hosts, "pgleader reads the etcd Patroni writes to");
    assert_eq!(Some(etcd.scope.clone()), env("PATRONI_SCOPE"), "Patroni's scope");
    assert_eq!(env("PATRONI_NAMESPACE"), None, "Patroni runs in its default namespace...");
    assert_eq!(etcd.namespace.trim_matches('/'), "service", "...which is /service/");
    assert_eq!(env("PATRONI_NAME").as_deref(), Some("${node.unique.name}"), "Patroni's member name is the node name");
    assert!(
        patroni.contains(r#"value     = "^(optiplex|epyc)$""#),
        "timescaledb-ha runs on the nodes named optiplex and epyc"
    );
    for (b, ip) in config.backend.iter().zip([OPTIPLEX, EPYC]) {
        assert_eq!(b.address.host, ip);
        assert_eq!(b.member(), b.name, "{}: the member is the node's name", b.name);
        assert!(b.verify_conn_url, "{}: conn_url is checked", b.name);
    }
    assert!(etcd.timeout < config.health.interval && config.health.interval + etcd.timeout < etcd.max_staleness);

    // kill_timeout covers the drain: shutdown_grace + 5 s, and within max_kill_timeout (30 s).
    let kill_timeout = duration(&text(&j.task().body, "kill_timeout"));
    let grace = config.proxy.shutdown_grace;
    assert!(
        kill_timeout >= grace + Duration::from_secs(5),
        "kill_timeout {kill_timeout:?} < shutdown_grace {grace:?} + 5s: Nomad would SIGKILL mid-drain"
    );
    assert!(kill_timeout <= Duration::from_secs(30), "kill_timeout {kill_timeout:?} exceeds max_kill_timeout (30s)");

    // And the real binary agrees.
    let file = secrets.path().join("pgleader.toml");
    std::fs::write(&file, &rendered).expect("write rendered config");
    let out = run(Command::new(env!("CARGO_BIN_EXE_pgleader")).arg("check-config").arg("--config").arg(&file));
    assert_success("pgleader check-config on the rendered job template", &out);
}

#[test]
fn pgleader_health_password_comes_from_a_nomad_variable() {
    let j = PgleaderJob::load();
    let t = template(j.task(), "secrets/health_password");
    let data = unescape(&text(&t.body, "data"));
    assert_eq!(
        template_expressions(&data),
        [r#"with nomadVar "nomad/jobs/pgleader""#, ".health_password", "end"],
        "the password template must read only the job's own Nomad Variable"
    );
    assert_eq!(text(&t.body, "perms"), "0400");
    // Owned by the image's user, or pgleader (not root) could not read a 0400 file.
    assert_eq!(number(&t.body, "uid"), crate::docker::dockerfile_uid());
    assert_eq!(number(&t.body, "gid"), crate::docker::dockerfile_uid());
}

#[test]
fn pgleader_job_has_no_password_literal() {
    let source = read(PGLEADER_JOB);
    for (i, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with('#') || code.starts_with("//") {
            continue;
        }
        let lower = code.to_ascii_lowercase();
        if lower.contains("password") {
            let allowed = lower.contains("password_file")
                || lower.contains("password_env")
                || lower.contains("nomadvar")
                || (lower.contains("destination") && lower.contains("secrets/"));
            assert!(allowed, "{PGLEADER_JOB}:{}: a password must come from a Nomad Variable: {line}", i + 1);
        }
        assert!(!lower.contains("password ="), "{PGLEADER_JOB}:{}: inline password: {line}", i + 1);
    }
    // No credentials in URLs either, comments included.
    let url_with_password = source.split("://").skip(1).any(|rest| {
        let authority = rest.split(['/', ' ', '"', '\n']).next().unwrap_or("");
        authority.contains('@') && authority.split('@').next().is_some_and(|userinfo| userinfo.contains(':'))
    });
    assert!(!url_with_password, "{PGLEADER_JOB} contains a URL with a password");
}

#[test]
fn etcd_job_structure() {
    let job = job(ETCD_JOB);
    assert_eq!(label(&job), "etcd");
    let groups = blocks(&job.body, "group");
    assert_eq!(groups.len(), 3, "three etcd members");

    let expected = [
        ("etcd-optiplex", OPTIPLEX, "/etcd-data"),
        ("etcd-epyc", EPYC, "/etcd-data"),
        ("etcd-macmini", MACMINI, "/Users/lenamkhanh/Library/Application Support/etcd"),
    ];
    let initial_cluster: String =
        expected.iter().map(|(name, ip, _)| format!("{name}=http://{ip}:2380")).collect::<Vec<_>>().join(",");

    let mut seen = BTreeSet::new();
    for group in &groups {
        let task = one(&group.body, "task");
        let args = string_list(&one(&task.body, "config").body, "args");
        let flag = |name: &str| -> String {
            let prefix = format!("--{name}=");
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
                .unwrap_or_else(|| panic!("group {}: no {prefix}", label(group)))
        };
        let name = flag("name");
        let (_, ip, data_dir) =
            expected.iter().find(|(n, _, _)| *n == name).unwrap_or_else(|| panic!("unexpected member {name}"));
        assert!(seen.insert(name.clone()), "member {name} twice");

        assert_eq!(flag("initial-cluster"), initial_cluster, "{name}: the static cluster must be identical everywhere");
        assert_eq!(flag("initial-cluster-state"), "new");
        assert_eq!(flag("initial-cluster-token"), "vietmarket-etcd");
        assert_eq!(flag("initial-advertise-peer-urls"), format!("http://{ip}:2380"), "{name}");
        assert_eq!(flag("advertise-client-urls"), format!("http://{ip}:2379"), "{name}");
        assert_eq!(flag("listen-peer-urls"), format!("http://{ip}:2380"), "{name}: peers bind the tailnet address");
        assert!(
            !flag("listen-client-urls").contains("0.0.0.0"),
            "{name}: etcd has no auth; do not bind all interfaces"
        );
        assert_eq!(flag("data-dir"), *data_dir, "{name}");
        assert_eq!(static_port(group, "client"), 2379);
        assert_eq!(static_port(group, "peer"), 2380);

        let cons = constraints(&group.body);
        let driver = text(&task.body, "driver");
        if name == "etcd-macmini" {
            assert_eq!(driver, "raw_exec", "Homebrew etcd on macOS");
            assert!(cons.contains(&("${attr.kernel.name}".into(), "=".into(), "darwin".into())), "{cons:?}");
        } else {
            assert_eq!(driver, "docker");
            let node = name.trim_start_matches("etcd-");
            assert!(cons.contains(&("${node.unique.name}".into(), "=".into(), node.into())), "{name}: {cons:?}");
            // /opt/etcd through the host volume "etcd", mounted where --data-dir points.
            let volume = labeled(&group.body, "volume", "etcd");
            assert_eq!(text(&volume.body, "type"), "host");
            assert_eq!(text(&volume.body, "source"), "etcd");
            let mount = one(&task.body, "volume_mount");
            assert_eq!(text(&mount.body, "volume"), "etcd");
            assert_eq!(text(&mount.body, "destination"), *data_dir);
        }
    }
    assert_eq!(seen.len(), 3);
}

//! Dockerfile and .dockerignore: their shape, since no Docker engine can build them here.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use crate::{assert_success, read, repo, run};

/// The numeric uid of the final stage's USER.
pub(crate) fn dockerfile_uid() -> u64 {
    let dockerfile = read("Dockerfile");
    let final_stage = dockerfile.rsplit("\nFROM ").next().expect("a FROM");
    let user = final_stage.lines().find_map(|l| l.strip_prefix("USER ")).expect("the final stage sets USER");
    user.trim().split(':').next().and_then(|u| u.parse().ok()).unwrap_or_else(|| panic!("USER {user} is not numeric"))
}

#[test]
fn dockerfile_is_multistage_nonroot_with_a_config_volume() {
    let dockerfile = read("Dockerfile");
    let instructions: Vec<&str> =
        dockerfile.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).collect();
    let froms: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: a build stage and a runtime stage");
    assert!(froms[0].contains(" AS build"), "the first stage builds");
    assert!(froms[1..].iter().any(|f| f.contains("debian12")), "the runtime matches the Debian 12 build (glibc)");
    assert_ne!(dockerfile_uid(), 0, "the image must not run as root");
    assert!(instructions.iter().any(|l| l.starts_with("VOLUME") && l.contains("/etc/pgleader")), "config as a volume");
    assert!(instructions.iter().any(|l| l.starts_with("ENV PGLEADER_CONFIG=/etc/pgleader/")));
    assert!(instructions.contains(&r#"ENTRYPOINT ["/usr/local/bin/pgleader"]"#));
    assert!(instructions.iter().any(|l| l.contains("cargo build --release --locked")));

    // Everything Cargo needs is copied, and .dockerignore does not hide it.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src", "benches"];
    for optional in ["build.rs", "examples"] {
        if repo().join(optional).exists() {
            needed.push(optional);
        }
    }
    for path in needed {
        assert!(
            instructions.iter().any(|l| l.starts_with("COPY ")
                && !l.contains("--from")
                && l.split_whitespace().any(|w| w == path || w.trim_start_matches("./") == path)),
            "the Dockerfile does not COPY {path}"
        );
        assert!(!ignored.iter().any(|i| i == path), ".dockerignore excludes {path}, which the build needs");
    }
    for heavy in ["target", ".git"] {
        assert!(ignored.iter().any(|i| i == heavy), ".dockerignore should exclude {heavy}");
    }
}

#[test]
fn dockerfile_rust_is_new_enough_for_the_locked_dependencies() {
    let dockerfile = read("Dockerfile");
    let pinned = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=")
        .trim()
        .to_owned();
    let version = |s: &str| -> (u64, u64) {
        let mut parts = s.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    let out = run(Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(repo()));
    assert_success("cargo metadata", &out);
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let packages: BTreeMap<&str, &serde_json::Value> =
        meta["packages"].as_array().expect("packages").iter().map(|p| (p["id"].as_str().expect("id"), p)).collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["id"].as_str().expect("id"), n))
        .collect();
    let root =
        packages.values().find(|p| p["name"] == "pgleader").expect("pgleader package")["id"].as_str().expect("id");
    // Walk normal and build dependencies only: what `cargo build --release --bin` compiles.
    let (mut seen, mut stack) = (BTreeSet::new(), vec![root]);
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            let kinds = dep["dep_kinds"].as_array().expect("dep_kinds");
            if kinds.iter().any(|k| k["kind"].is_null() || k["kind"] == "build") {
                stack.push(dep["pkg"].as_str().expect("pkg"));
            }
        }
    }
    let (needed, by) = seen
        .iter()
        .filter_map(|id| packages[id]["rust_version"].as_str().map(|v| (version(v), packages[id]["name"].to_string())))
        .max()
        .expect("some dependency declares rust-version");
    assert!(
        version(&pinned) >= needed,
        "Dockerfile builds with Rust {pinned}, but {by} needs {}.{}",
        needed.0,
        needed.1
    );
}

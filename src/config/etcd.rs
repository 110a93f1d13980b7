//! `[etcd]`: fencing with Patroni's leader lease (DESIGN.md rule 9). Optional: without the
//! section pgleader decides from SQL alone, exactly as before.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{HostPort, KeyLines, Secret};

/// `[etcd]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd client URLs, `http://host:port` or `https://host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// Patroni's `namespace`; "service" and "/service/" mean the same.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Patroni's `scope` (the cluster name); keys live under `/<namespace>/<scope>/`.
    pub scope: String,
    /// One read attempt, across endpoints, everything included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long one confirmation stays valid at most.
    #[serde(default = "default_max_staleness", with = "humantime_serde")]
    pub max_staleness: Duration,
    /// `enforce`, or `observe` (decide and report, route as without `[etcd]`).
    #[serde(default)]
    pub mode: EtcdMode,
    /// etcd authentication (with one of the password keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) for `https` endpoints; the system roots when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for etcd's `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[etcd] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdMode {
    #[default]
    Enforce,
    Observe,
}

/// Bounds of the `[etcd]` durations: past a minute a read is not a fence but an outage, and a
/// confirmation older than ten minutes confirms nothing (Patroni's own `ttl` is 30 s).
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_STALENESS: Duration = Duration::from_secs(600);

fn default_namespace() -> String {
    "service".to_owned()
}
fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_max_staleness() -> Duration {
    Duration::from_secs(3)
}

impl EtcdConfig {
    /// The etcd password, from `password`, `password_env` or `password_file`.
    ///
    /// # Errors
    /// The variable is unset or the file unreadable; the message names which.
    pub fn password(&self) -> Result<Option<Secret>, String> {
        super::read_secret("etcd", self.password.as_ref(), self.password_env.as_deref(), self.password_file.as_deref())
    }

    /// Every problem of the section, each naming its key and line. `interval` is `[health]
    /// interval`: reads run at its pace, so it relates to `timeout` and `max_staleness`.
    pub(super) fn problems(&self, interval: Duration, lines: &KeyLines) -> Vec<String> {
        let mut problems = Vec::new();
        let at = |key: &str| lines.at("etcd", key);
        if self.endpoints.is_empty() {
            problems.push(format!("etcd.endpoints{}: at least one endpoint is required", at("endpoints")));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(why) = parse_endpoint(e) {
                problems.push(format!("etcd.endpoints[{i}]{}: `{e}` {why}", at("endpoints")));
            }
        }
        if self.scope.is_empty() || !valid_key_part(&self.scope) {
            problems.push(format!(
                "etcd.scope{}: `{}` must be Patroni's scope: non-empty, no '/', no whitespace",
                at("scope"),
                self.scope
            ));
        }
        if !self.namespace.trim_matches('/').split('/').all(valid_key_part) {
            problems.push(format!("etcd.namespace{}: `{}` is not a key prefix", at("namespace"), self.namespace));
        }
        let show = |d: Duration| humantime::format_duration(d).to_string();
        for (key, value, max) in
            [("timeout", self.timeout, MAX_TIMEOUT), ("max_staleness", self.max_staleness, MAX_STALENESS)]
        {
            if value.is_zero() {
                problems.push(format!("etcd.{key}{}: must be greater than zero", at(key)));
            } else if value > max {
                problems.push(format!("etcd.{key}{}: {} is above the maximum of {}", at(key), show(value), show(max)));
            }
        }
        if self.timeout >= interval {
            problems.push(format!(
                "etcd.timeout{}: {} must be below [health] interval ({}): one read must end before the next is due",
                at("timeout"),
                show(self.timeout),
                show(interval)
            ));
        }
        if interval.saturating_add(self.timeout) >= self.max_staleness {
            problems.push(format!(
                "etcd.max_staleness{}: {} must exceed [health] interval + etcd.timeout ({}), or every confirmation \
                 lapses before the next read can renew it",
                at("max_staleness"),
                show(self.max_staleness),
                show(interval.saturating_add(self.timeout))
            ));
        }
        let secrets = [self.password.is_some(), self.password_env.is_some(), self.password_file.is_some()];
        let secrets = secrets.iter().filter(|s| **s).count();
        if secrets > 1 {
            problems.push("etcd: set at most one of password, password_env, password_file".to_owned());
        }
        if (secrets > 0) != self.username.is_some() {
            problems.push(format!("etcd.username{}: set username and a password together, or neither", at("username")));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(format!("etcd.cert_file{}: set cert_file and key_file together", at("cert_file")));
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        for (key, set) in [("ca_file", self.ca_file.is_some()), ("cert_file", self.cert_file.is_some())] {
            if set && !tls {
                problems.push(format!("etcd.{key}{}: only used with https:// endpoints", at(key)));
            }
        }
        problems
    }
}

/// `http://host:port` or `https://host:port` (a trailing `/` allowed, nothing else).
pub fn parse_endpoint(url: &str) -> Result<(bool, HostPort), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with http:// or https://".to_owned());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err("must be scheme://host:port, without a path, query or credentials".to_owned());
    }
    rest.parse::<HostPort>().map(|hp| (tls, hp)).map_err(|e| format!("is not a valid endpoint: {e}"))
}

fn valid_key_part(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BACKENDS: &str = "[[backend]]\nname = \"optiplex\"\naddress = \"100.83.150.39:5432\"\n\
                            [[backend]]\nname = \"epyc\"\naddress = \"100.103.201.10:5432\"\nmember = \"EPYC\"\n";

    fn with_etcd(etcd: &str) -> String {
        format!("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nscope = \"vietmarket\"\n{etcd}{BACKENDS}")
    }

    #[test]
    fn defaults_and_members() {
        let c = Config::from_toml(&with_etcd(""), "t").unwrap();
        let e = c.etcd.as_ref().unwrap();
        assert_eq!((e.namespace.as_str(), e.mode), ("service", super::EtcdMode::Enforce));
        assert_eq!(e.timeout, std::time::Duration::from_millis(500));
        assert_eq!(e.max_staleness, std::time::Duration::from_secs(3));
        assert_eq!(c.backend[0].member(), "optiplex", "the member defaults to the name");
        assert_eq!(c.backend[1].member(), "EPYC");
        assert!(c.backend[0].verify_conn_url);
        assert!(Config::from_toml(BACKENDS, "t").unwrap().etcd.is_none(), "no section, no fencing");
    }

    #[test]
    fn bad_sections_name_the_key_and_the_line() {
        let cases = [
            ("endpoints = []\n", "etcd.endpoints (line"),
            ("endpoints = [\"127.0.0.1:2379\"]\n", "must start with http://"),
            ("endpoints = [\"http://h:2379/v3\"]\n", "without a path"),
            ("endpoints = [\"http://h:0\"]\n", "port 0"),
            ("scope = \"\"\n", "etcd.scope"),
            ("timeout = \"2s\"\n", "must be below [health] interval"),
            ("max_staleness = \"1s\"\n", "must exceed [health] interval + etcd.timeout"),
            ("max_staleness = \"1h\"\n", "above the maximum"),
            ("timeout = \"0s\"\n", "greater than zero"),
            ("mode = \"maybe\"\n", "mode"),
            ("username = \"u\"\n", "username and a password together"),
            ("ca_file = \"/ca.pem\"\n", "only used with https://"),
            ("cert_file = \"/c.pem\"\n", "cert_file and key_file together"),
        ];
        for (extra, want) in cases {
            // Later keys override the defaults of `with_etcd`'s first lines only where repeated,
            // so each case writes its own section.
            let text = if extra.starts_with("endpoints") {
                format!("[etcd]\n{extra}scope = \"vietmarket\"\n{BACKENDS}")
            } else if extra.starts_with("scope") {
                format!("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n{extra}{BACKENDS}")
            } else {
                with_etcd(extra)
            };
            let err = Config::from_toml(&text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{extra:?}: wanted {want:?} in\n{err}");
            assert!(err.contains("line"), "{extra:?}: names a line:\n{err}");
        }
    }

    #[test]
    fn a_member_used_twice_is_an_error() {
        let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nscope = \"s\"\n\
                    [[backend]]\nname = \"a\"\naddress = \"h:1\"\nmember = \"m\"\n\
                    [[backend]]\nname = \"b\"\naddress = \"h:2\"\nmember = \"m\"\n";
        let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("backend[1].member (line 8)") && err.contains("`m` is also backend[0]'s member"), "{err}");
    }

    #[test]
    fn secrets_stay_masked_and_the_effective_config_round_trips() {
        let text = with_etcd("username = \"pgleader\"\npassword = \"hunter2\"\n");
        let c = Config::from_toml(&text, "t").unwrap();
        assert!(!c.to_toml().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.etcd.as_ref().unwrap().password().unwrap().unwrap().expose(), "hunter2");
        let plain = Config::from_toml(&with_etcd("mode = \"observe\"\n"), "t").unwrap();
        assert_eq!(Config::from_toml(&plain.to_toml(), "t").unwrap(), plain);
    }
}

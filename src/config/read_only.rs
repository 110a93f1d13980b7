//! `[read_only]`: a second listener whose sessions go to a replica within a lag bound (DESIGN.md
//! rule 10). Optional: without the section nothing changes.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::KeyLines;

/// `[read_only]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOnlyConfig {
    /// The read-only listener's address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A replica further behind the leader than this (bytes of WAL) takes no new read sessions.
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: u64,
    /// ... nor one whose replay has stayed behind a leader position for longer than this.
    #[serde(default = "default_max_lag", with = "humantime_serde")]
    pub max_lag: Duration,
    /// With no replica in bounds: `leader` (read sessions go to the leader) or `refuse` (57P03).
    #[serde(default)]
    pub fallback: ReadFallbackConfig,
}

/// `[read_only] fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadFallbackConfig {
    #[default]
    Leader,
    Refuse,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5434))
}
fn default_max_lag_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_lag() -> Duration {
    Duration::from_secs(5)
}

/// A lag bound above a day routes reads to a replica that is not following at all; 1 TiB of WAL
/// is more than any replica that still counts as one.
const MAX_LAG: Duration = Duration::from_secs(86_400);
const MAX_LAG_BYTES: u64 = 1 << 40;

impl ReadOnlyConfig {
    /// Every problem of the section, each naming its key and line; `others` are the addresses
    /// the other listeners use.
    pub(super) fn problems(&self, others: &[(&str, SocketAddr)], lines: &KeyLines) -> Vec<String> {
        let mut problems = Vec::new();
        let at = |key: &str| lines.at("read_only", key);
        if self.max_lag_bytes == 0 || self.max_lag_bytes > MAX_LAG_BYTES {
            problems.push(format!(
                "read_only.max_lag_bytes{}: {} must be between 1 and {MAX_LAG_BYTES} (1 TiB)",
                at("max_lag_bytes"),
                self.max_lag_bytes
            ));
        }
        if self.max_lag.is_zero() || self.max_lag > MAX_LAG {
            problems.push(format!(
                "read_only.max_lag{}: {} must be above zero and at most a day",
                at("max_lag"),
                humantime::format_duration(self.max_lag)
            ));
        }
        for (key, addr) in others {
            if *addr == self.listen && addr.port() != 0 {
                problems.push(format!("read_only.listen{}: {} is also {key}", at("listen"), self.listen));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BACKEND: &str = "[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:5432\"\n";

    #[test]
    fn defaults_and_keys() {
        let c = Config::from_toml(&format!("[read_only]\n{BACKEND}"), "t").unwrap();
        let r = c.read_only.unwrap();
        assert_eq!(r.listen, "0.0.0.0:5434".parse().unwrap());
        assert_eq!(r.max_lag_bytes, 16_777_216);
        assert_eq!(r.max_lag, std::time::Duration::from_secs(5));
        assert_eq!(r.fallback, super::ReadFallbackConfig::Leader);
        assert!(Config::from_toml(BACKEND, "t").unwrap().read_only.is_none());
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let text = format!("[read_only]\nlisten = \"0.0.0.0:5433\"\nmax_lag_bytes = 0\nmax_lag = \"0s\"\n{BACKEND}");
        let e = Config::from_toml(&text, "t").unwrap_err().to_string();
        assert!(e.contains("read_only.max_lag_bytes (line 3)"), "{e}");
        assert!(e.contains("read_only.max_lag (line 4)"), "{e}");
        assert!(e.contains("read_only.listen (line 2): 0.0.0.0:5433 is also proxy.listen"), "{e}");
        let e = Config::from_toml(&format!("[read_only]\nfallback = \"primary\"\n{BACKEND}"), "t").unwrap_err();
        assert!(e.to_string().contains("fallback"), "{e}");
    }
}

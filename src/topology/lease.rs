//! What etcd says about Patroni's leader lease, folded into a [`LeaseView`]: an input of
//! [`super::decide`] like the health observations (DESIGN.md rule 9). Pure: events carry their
//! own instants, and nothing here reads a clock.
//!
//! - Only reads grant. A successful linearizable read that names a member as the value of
//!   `/<namespace>/<scope>/leader`, with the key's lease alive, confirms that member until
//!   `read_start + min(max_staleness, the lease's remaining TTL)`. `read_start` is taken before
//!   the request is sent, and etcd rounds the remaining TTL down, so the confirmation never
//!   outlives the old leader's right to write: Patroni can take the key over only once that lease
//!   has expired.
//! - The latest read is the one with the highest etcd revision, never the one that arrived last.
//! - Watch events only revoke: a delete of the key, or a write naming another member, at a
//!   revision after the confirming read's, ends the confirmation at once. A write naming the same
//!   member, or the end of a watch, changes nothing here (the watcher reads again at once).
//! - A failed read changes no confirmation: it lapses by itself at `valid_until`.

use std::time::{Duration, Instant};

/// One successful read of the scope, all keys at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRead {
    /// pgleader's monotonic clock just before the read was sent.
    pub read_start: Instant,
    pub revision: i64,
    /// The endpoint that answered.
    pub endpoint: String,
    /// The leader key; `None` when it is absent.
    pub leader: Option<LeaderLease>,
    /// Patroni's dynamic configuration (`config` key), when present and readable.
    pub patroni: Option<PatroniConfig>,
    /// `members/<name>`: every member Patroni lists.
    pub members: Vec<MemberEntry>,
}

/// The leader key's value and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderLease {
    /// The leader's member name.
    pub member: String,
    /// The lease's remaining TTL, rounded down; `None` without a live lease.
    pub remaining: Option<Duration>,
}

/// What pgleader uses of Patroni's dynamic configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PatroniConfig {
    pub ttl: Option<u64>,
    pub loop_wait: Option<u64>,
    pub retry_timeout: Option<u64>,
    pub failsafe_mode: bool,
    /// Maintenance mode: a manual promotion does not move the leader key.
    pub pause: bool,
}

/// A member Patroni registered, with the address it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEntry {
    pub name: String,
    pub conn_url: Option<String>,
}

/// One thing the etcd watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Read(LeaseRead),
    /// No endpoint answered the read in time.
    ReadFailed {
        at: Instant,
        error: String,
    },
    /// The watch saw the leader key written (`Some(member)`) or deleted (`None`).
    Changed {
        revision: i64,
        member: Option<String>,
    },
    /// The watch ended (no leader in etcd, compacted, closed); a read follows.
    WatchEnded {
        reason: String,
    },
}

/// A member confirmed as the lease holder until `valid_until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub member: String,
    /// The revision of the read that granted it.
    pub revision: i64,
    pub read_start: Instant,
    pub valid_until: Instant,
}

impl Confirmation {
    /// Valid at `now`?
    pub fn valid_at(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

/// Everything known from etcd, folded from [`LeaseEvent`]s by [`LeaseView::observe`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseView {
    /// The read with the highest revision so far.
    pub read: Option<LeaseRead>,
    /// From `read`, unless a later watch event revoked it.
    pub confirmation: Option<Confirmation>,
    /// Why the last confirmation was revoked (a watch event), if it was.
    pub revoked: Option<String>,
    /// The latest read attempt succeeded.
    pub reachable: bool,
    /// The latest failure, phrased for an operator.
    pub last_error: Option<String>,
    /// Patroni's configuration from the latest read that had one, since pgleader started.
    pub patroni: Option<PatroniConfig>,
    /// `read_start` of the latest read that confirmed a leader (kept after it lapses).
    pub last_confirmed: Option<Instant>,
    pub reads_ok: u64,
    pub reads_failed: u64,
}

impl LeaseView {
    /// Folds one event. `max_staleness` bounds how long a read confirms.
    #[must_use]
    pub fn observe(&self, event: &LeaseEvent, max_staleness: Duration) -> LeaseView {
        let mut next = self.clone();
        match event {
            LeaseEvent::Read(read) => {
                next.reachable = true;
                next.reads_ok += 1;
                if read.patroni.is_some() {
                    next.patroni = read.patroni;
                }
                let older = self.read.as_ref().is_some_and(|r| r.revision > read.revision);
                if !older {
                    next.confirmation = confirm(read, max_staleness);
                    if next.confirmation.is_some() {
                        next.last_confirmed = Some(read.read_start);
                    }
                    next.revoked = None;
                    next.read = Some(read.clone());
                }
            }
            LeaseEvent::ReadFailed { error, .. } => {
                next.reachable = false;
                next.reads_failed += 1;
                next.last_error = Some(error.clone());
            }
            LeaseEvent::Changed { revision, member } => {
                let revokes = |c: &Confirmation| *revision > c.revision && member.as_deref() != Some(c.member.as_str());
                if next.confirmation.as_ref().is_some_and(revokes) {
                    next.confirmation = None;
                    next.revoked = Some(match member {
                        Some(m) => format!("the leader key now names {m} (revision {revision})"),
                        None => format!("the leader key was deleted (revision {revision})"),
                    });
                }
            }
            LeaseEvent::WatchEnded { .. } => {}
        }
        next
    }

    /// The member the latest read named as the lease holder, if any.
    pub fn named(&self) -> Option<&str> {
        self.read.as_ref()?.leader.as_ref().map(|l| l.member.as_str())
    }

    /// `member`'s confirmation, if it is valid at `now`.
    pub fn confirmed(&self, member: &str, now: Instant) -> Option<&Confirmation> {
        self.confirmation.as_ref().filter(|c| c.member == member && c.valid_at(now))
    }

    /// The member as Patroni registered it, from the latest read.
    pub fn member(&self, name: &str) -> Option<&MemberEntry> {
        self.read.as_ref()?.members.iter().find(|m| m.name == name)
    }
}

/// What a read grants: its leader until the earlier of `max_staleness` and the lease's end.
fn confirm(read: &LeaseRead, max_staleness: Duration) -> Option<Confirmation> {
    let leader = read.leader.as_ref()?;
    let remaining = leader.remaining?;
    let valid_until = read.read_start.checked_add(max_staleness.min(remaining))?;
    Some(Confirmation {
        member: leader.member.clone(),
        revision: read.revision,
        read_start: read.read_start,
        valid_until,
    })
}

/// The `host:port` of a libpq URL such as Patroni's `conn_url`
/// (`postgres://user@host:port/db`); the port defaults to 5432. `None` if it is not one.
pub fn conn_url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))?;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 5432,
    };
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STALE: Duration = Duration::from_secs(3);

    fn read(t0: Instant, at_ms: u64, revision: i64, leader: Option<(&str, u64)>) -> LeaseEvent {
        LeaseEvent::Read(LeaseRead {
            read_start: t0 + Duration::from_millis(at_ms),
            revision,
            endpoint: "e".into(),
            leader: leader.map(|(m, ttl)| LeaderLease { member: m.into(), remaining: Some(Duration::from_secs(ttl)) }),
            patroni: None,
            members: Vec::new(),
        })
    }

    #[test]
    fn a_read_confirms_until_the_earlier_of_staleness_and_the_lease() {
        let t0 = Instant::now();
        let v = LeaseView::default().observe(&read(t0, 0, 5, Some(("a", 30))), STALE);
        assert_eq!(v.confirmation.as_ref().unwrap().valid_until, t0 + STALE);
        let v = LeaseView::default().observe(&read(t0, 0, 5, Some(("a", 1))), STALE);
        assert_eq!(v.confirmation.as_ref().unwrap().valid_until, t0 + Duration::from_secs(1), "the lease ends first");
        assert!(v.confirmed("a", t0).is_some());
        assert!(v.confirmed("a", t0 + Duration::from_secs(1)).is_none(), "valid strictly before valid_until");
        assert!(v.confirmed("b", t0).is_none());
        let no_lease = LeaseEvent::Read(LeaseRead {
            leader: Some(LeaderLease { member: "a".into(), remaining: None }),
            ..match read(t0, 0, 6, None) {
                LeaseEvent::Read(r) => r,
                _ => unreachable!(),
            }
        });
        assert!(
            LeaseView::default().observe(&no_lease, STALE).confirmation.is_none(),
            "no live lease, no confirmation"
        );
    }

    #[test]
    fn the_highest_revision_wins_not_the_last_arrival() {
        let t0 = Instant::now();
        let v = LeaseView::default().observe(&read(t0, 100, 9, Some(("b", 30))), STALE);
        let v = v.observe(&read(t0, 200, 7, Some(("a", 30))), STALE);
        assert_eq!(v.confirmation.as_ref().unwrap().member, "b");
        assert!(v.reachable);
    }

    #[test]
    fn watch_events_only_revoke() {
        let t0 = Instant::now();
        let v = LeaseView::default().observe(&read(t0, 0, 5, Some(("a", 30))), STALE);
        let same = v.observe(&LeaseEvent::Changed { revision: 6, member: Some("a".into()) }, STALE);
        assert_eq!(same.confirmation, v.confirmation, "the same member: unchanged");
        let old = v.observe(&LeaseEvent::Changed { revision: 5, member: None }, STALE);
        assert_eq!(old.confirmation, v.confirmation, "not after the read: ignored");
        let other = v.observe(&LeaseEvent::Changed { revision: 6, member: Some("b".into()) }, STALE);
        assert!(other.confirmation.is_none());
        assert!(other.revoked.as_deref().unwrap().contains("names b"));
        let deleted = v.observe(&LeaseEvent::Changed { revision: 6, member: None }, STALE);
        assert!(deleted.confirmation.is_none());
        let none = LeaseView::default().observe(&LeaseEvent::Changed { revision: 9, member: Some("a".into()) }, STALE);
        assert!(none.confirmation.is_none(), "a watch event never grants");
        let ended = v.observe(&LeaseEvent::WatchEnded { reason: "no leader".into() }, STALE);
        assert_eq!(ended.confirmation, v.confirmation);
        let failed = v.observe(&LeaseEvent::ReadFailed { at: t0, error: "down".into() }, STALE);
        assert_eq!(failed.confirmation, v.confirmation, "a failed read lets it lapse by itself");
        assert!(!failed.reachable);
    }

    #[test]
    fn conn_urls_are_parsed_like_libpq() {
        let p = conn_url_host_port;
        assert_eq!(p("postgres://100.83.150.39:5432/postgres"), Some(("100.83.150.39".into(), 5432)));
        assert_eq!(p("postgresql://u:pw@Db.Example:6000/x?sslmode=disable"), Some(("db.example".into(), 6000)));
        assert_eq!(p("postgres://[::1]:5433/postgres"), Some(("::1".into(), 5433)));
        assert_eq!(p("postgres://host/postgres"), Some(("host".into(), 5432)));
        assert_eq!(p("http://host:1"), None);
        assert_eq!(p("postgres://:5432/x"), None);
        assert_eq!(p("postgres://h:99999/x"), None);
    }

    fn arb_event(t0: Instant) -> impl Strategy<Value = LeaseEvent> {
        let members = prop_oneof![Just("a"), Just("b")];
        prop_oneof![
            (0u64..10_000, 1i64..20, proptest::option::of((members.clone(), 0u64..40)))
                .prop_map(move |(ms, rev, l)| read(t0, ms, rev, l)),
            (1i64..20, proptest::option::of(members))
                .prop_map(|(revision, m)| LeaseEvent::Changed { revision, member: m.map(str::to_owned) }),
            Just(LeaseEvent::ReadFailed { at: t0, error: "x".into() }),
            Just(LeaseEvent::WatchEnded { reason: "x".into() }),
        ]
    }

    proptest! {
        #[test]
        fn confirmations_come_only_from_reads_and_never_outlive_their_bounds(
            events in proptest::collection::vec(arb_event(Instant::now()), 0..30),
        ) {
            let mut v = LeaseView::default();
            let mut best_read: Option<LeaseRead> = None;
            for e in &events {
                let next = v.observe(e, STALE);
                if let LeaseEvent::Read(r) = e {
                    if best_read.as_ref().is_none_or(|b| b.revision <= r.revision) {
                        best_read = Some(r.clone());
                    }
                }
                if let Some(c) = &next.confirmation {
                    // Granted by the best read so far, with its own bounds.
                    let r = best_read.as_ref().expect("a confirmation needs a read");
                    let lease = r.leader.as_ref().expect("the read named a leader");
                    prop_assert_eq!(&c.member, &lease.member);
                    prop_assert_eq!(c.revision, r.revision);
                    prop_assert!(c.valid_until <= r.read_start + STALE);
                    prop_assert!(c.valid_until <= r.read_start + lease.remaining.expect("a live lease"));
                    // Anything but a read can only keep or drop it.
                    if !matches!(e, LeaseEvent::Read(_)) {
                        prop_assert_eq!(Some(c), v.confirmation.as_ref());
                    }
                }
                v = next;
            }
        }
    }
}

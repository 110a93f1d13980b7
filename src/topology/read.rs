//! Reads (issue 13): how far behind the leader each replica is, and which backends a read-only
//! session may use. Pure, like the rest of the decision.
//!
//! Lag is measured from the health checks pgleader already runs, on pgleader's own monotonic
//! clock; no two servers' clocks are ever compared.
//! - The *reference* is the SQL leader (rules 1-4, fenced or not: replicas keep serving reads
//!   while the lease is unconfirmed). Each of its checks adds a sample (its `pg_current_wal_lsn()`,
//!   the instant of the check) to [`LagTracker`].
//! - **Byte lag** of a replica is `L - R`: `R` its replay position at its latest check, `L` the
//!   first leader sample taken *at or after* that check. The leader's LSN only grows, so `L` is at
//!   least the leader's position when `R` was read: the error is an over-estimate, never under.
//!   Until such a sample exists the previous estimate stands (one check interval at most),
//!   raised to what the newest leader sample already shows. A leader sample is stamped with the
//!   instant its check *started* and a replica's with the instant its check *ended*, so a pair
//!   really has the leader's position read after the replica's.
//! - **Time lag** is how long the replica's replay position has stayed behind a leader position
//!   pgleader saw: `now` minus the instant of the earliest sample above `R`; nothing pending is
//!   zero, so an idle primary never makes a replica look behind.
//! - A replica is **in bounds** when its latest check succeeded, its WAL receiver is streaming,
//!   it follows the reference's system and timeline, and both lags are within `[read_only]`'s
//!   bounds. Only such replicas take new read sessions; with `fallback = "leader"` the table's
//!   leader takes them when none is.
//!
//! Samples keep the first sighting of each new position (what time lag needs, for any replica,
//! also one not checked yet) and the latest sighting (what byte lag pairs with); they are capped
//! at [`MAX_SAMPLES`]: past the cap the two oldest are merged into one that keeps the older
//! instant and the newer position, which can only make either lag look larger.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::BackendId;

/// `[read_only]`'s bounds and fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPolicy {
    /// A replica further behind than this takes no new read sessions.
    pub max_lag_bytes: u64,
    /// ... nor one whose replay has stayed behind for longer than this.
    pub max_lag: Duration,
    pub fallback: ReadFallback,
}

/// What read sessions get when no replica is in bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFallback {
    /// The routing table's leader.
    Leader,
    /// 57P03, naming the lag.
    Refuse,
}

impl ReadFallback {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadFallback::Leader => "leader",
            ReadFallback::Refuse => "refuse",
        }
    }
}

/// The WAL position one check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wal {
    /// A primary's `pg_current_wal_lsn()`; a replica's
    /// `COALESCE(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn())`.
    pub lsn: u64,
    /// A replica's WAL receiver reports `streaming`.
    pub streaming: bool,
    /// A replica's WAL receiver's `received_tli`.
    pub receive_timeline: Option<u32>,
}

/// One replica's lag, as estimated at one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// `None` until a leader sample follows one of its checks.
    pub bytes: Option<u64>,
    pub time: Duration,
}

/// At most this many leader samples are kept (see the module docs).
pub const MAX_SAMPLES: usize = 64;

/// The leader's recent WAL positions, carried from table to table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LagTracker {
    /// Whose positions these are; another reference starts over.
    reference: Option<BackendId>,
    /// (LSN, when it was first seen), oldest first, LSN strictly increasing, except that the last
    /// entry may repeat the one before it with the latest instant that position was seen.
    samples: VecDeque<(u64, Instant)>,
}

impl LagTracker {
    /// Adds the reference's latest check (`lsn` seen at `at`). Another backend as the reference,
    /// or a position that went backwards (another system or a restore), starts over; no
    /// reference for a while (a failed check of the leader) keeps what was seen.
    #[must_use]
    pub fn with_sample(&self, reference: Option<BackendId>, sample: Option<(u64, Instant)>) -> LagTracker {
        let mut next = self.clone();
        let Some(id) = reference else { return next };
        if Some(id) != self.reference {
            next = LagTracker { reference, samples: VecDeque::new() };
        }
        let Some((lsn, at)) = sample else { return next };
        let len = next.samples.len();
        let repeated = len >= 2 && next.samples[len - 1].0 == next.samples[len - 2].0;
        match next.samples.back().copied() {
            Some((_, last)) if at <= last => {}
            Some((last_lsn, _)) if lsn < last_lsn => next.samples = VecDeque::from([(lsn, at)]),
            // The same position again: only its latest sighting is kept after the first.
            Some((last_lsn, _)) if lsn == last_lsn && repeated => next.samples[len - 1].1 = at,
            _ => {
                if repeated {
                    // A check paired with the dropped repeat pairs with this later one: larger.
                    next.samples.pop_back();
                }
                next.samples.push_back((lsn, at));
            }
        }
        while next.samples.len() > MAX_SAMPLES {
            let (Some((_, older)), Some((lsn, _))) = (next.samples.pop_front(), next.samples.pop_front()) else {
                break;
            };
            next.samples.push_front((lsn, older));
        }
        next
    }

    pub fn reference(&self) -> Option<BackendId> {
        self.reference
    }

    /// Whether a leader sample at or after `checked` exists: the replica's check is measured.
    pub fn paired(&self, checked: Instant) -> bool {
        self.samples.back().is_some_and(|(_, at)| *at >= checked)
    }

    /// The lag of a replica that replayed up to `replay` at its check at `checked`; `previous`
    /// is its last estimate, which stands while no leader sample follows the check.
    pub fn lag(&self, replay: u64, checked: Instant, previous: Option<Lag>, now: Instant) -> Lag {
        let paired = self.samples.iter().find(|(_, at)| *at >= checked).map(|(lsn, _)| lsn.saturating_sub(replay));
        let behind_since = self.samples.iter().find(|(lsn, _)| *lsn > replay).map(|(_, at)| *at);
        Lag {
            // Unpaired: the previous estimate, but never below what the newest sample already shows.
            bytes: paired.or_else(|| {
                let newest = self.samples.back().map(|(lsn, _)| lsn.saturating_sub(replay));
                previous.and_then(|p| p.bytes).map(|b| b.max(newest.unwrap_or(0)))
            }),
            time: behind_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
        }
    }
}

/// Parses PostgreSQL's `pg_lsn` text form (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let (hi, lo) = (u32::from_str_radix(hi, 16).ok()?, u32::from_str_radix(lo, 16).ok()?);
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REF: Option<BackendId> = Some(BackendId(0));

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for bad in ["", "1", "1/", "/1", "x/1", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn byte_lag_pairs_a_replica_check_with_the_next_leader_sample() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let t = LagTracker::default().with_sample(REF, Some((1000, s(0))));
        // The replica's check came after the only leader sample: no pair yet, nothing known.
        assert_eq!(t.lag(900, s(10), None, s(10)).bytes, None);
        // ... or the previous estimate stands.
        let prev = Lag { bytes: Some(77), time: Duration::ZERO };
        assert_eq!(t.lag(900, s(10), Some(prev), s(10)).bytes, Some(100), "raised to what the newest sample shows");
        assert_eq!(t.lag(990, s(10), Some(prev), s(10)).bytes, Some(77));
        // The next leader sample, taken later, is the one it is measured against.
        let t = t.with_sample(REF, Some((1500, s(20))));
        assert_eq!(t.lag(900, s(10), Some(prev), s(20)).bytes, Some(600));
    }

    #[test]
    fn time_lag_counts_from_the_first_position_the_replica_has_not_reached() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let t = LagTracker::default()
            .with_sample(REF, Some((1000, s(0))))
            .with_sample(REF, Some((2000, s(1000))))
            .with_sample(REF, Some((3000, s(2000))));
        assert_eq!(t.lag(1500, s(2500), None, s(3000)).time, Duration::from_millis(2000));
        assert_eq!(t.lag(3000, s(2500), None, s(3000)).time, Duration::ZERO, "caught up");
        // An idle primary: the same position again and again, the replica has it: no lag.
        let idle = (0..10).fold(LagTracker::default(), |t, i| t.with_sample(REF, Some((5000, s(i * 1000)))));
        assert_eq!(idle.lag(5000, s(8500), None, s(20_000)), Lag { bytes: Some(0), time: Duration::ZERO });
    }

    #[test]
    fn a_new_reference_or_a_position_going_back_starts_over() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let t = LagTracker::default().with_sample(REF, Some((1000, s(0))));
        let other = t.with_sample(Some(BackendId(1)), Some((10, s(1))));
        assert_eq!(other.samples, VecDeque::from([(10, s(1))]));
        let back = t.with_sample(REF, Some((10, s(1))));
        assert_eq!(back.samples, VecDeque::from([(10, s(1))]));
        // The same check seen twice is one sample.
        assert_eq!(t.with_sample(REF, Some((1000, s(0)))).samples.len(), 1);
    }

    #[test]
    fn repeats_keep_the_first_and_the_latest_sighting_and_the_cap_only_over_estimates() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let idle = (0..10).fold(LagTracker::default(), |t, i| t.with_sample(REF, Some((500, s(i * 10)))));
        assert_eq!(idle.samples, VecDeque::from([(500, s(0)), (500, s(90))]));
        let moved = idle.with_sample(REF, Some((600, s(100))));
        assert_eq!(moved.samples, VecDeque::from([(500, s(0)), (600, s(100))]));
        let mut t = LagTracker::default();
        for i in 0..200u64 {
            t = t.with_sample(REF, Some((i * 100, s(i * 10))));
        }
        assert_eq!(t.samples.len(), MAX_SAMPLES);
        // A replica that replayed up to 50, checked at 5 ms: exactly it is 50 bytes behind and has
        // been behind since 10 ms; the merged samples claim more, never less.
        let lag = t.lag(50, s(5), None, s(2000));
        assert!(lag.bytes.unwrap() >= 50);
        assert!(lag.time >= Duration::from_millis(1990));
        let recent = t.lag(19_850, s(1985), None, s(2000));
        assert_eq!(recent, Lag { bytes: Some(50), time: Duration::from_millis(10) }, "recent samples are exact");
    }
}

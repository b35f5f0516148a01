//! Time as the trust code sees it: passed in through [`Clock`], never read deep inside.

use std::time::{Duration, SystemTime};

pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that says what it is told (tests, and tools asked to sign "as of" a time).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl FixedClock {
    pub fn now() -> Self {
        Self(SystemTime::now())
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// `now + after` as the timestamp type tough uses, truncated to whole seconds as TUF writes
/// expiries. A `now` before the epoch (a broken clock) gives the epoch.
pub fn jiff_after(now: SystemTime, after: Duration) -> jiff::Timestamp {
    let at = now.checked_add(after).unwrap_or(now);
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// `now - before`, for deliberately expired metadata in tests and drills.
pub fn jiff_before(now: SystemTime, before: Duration) -> jiff::Timestamp {
    jiff_after(
        now.checked_sub(before).unwrap_or(SystemTime::UNIX_EPOCH),
        Duration::ZERO,
    )
}

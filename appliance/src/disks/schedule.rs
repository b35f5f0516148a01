//! When to run self-tests and which history samples to keep. Pure: times in, decisions out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A daily local-time window, `HH:MM-HH:MM`, that may cross midnight (`22:00-04:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Minutes after midnight.
    start: u16,
    end: u16,
}

impl QuietHours {
    /// `None` for an empty string: no quiet hours, so no scheduled self-tests.
    pub fn parse(s: &str) -> Result<Option<QuietHours>, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let minutes = |t: &str| -> Result<u16, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
                m.parse().map_err(|_| format!("{t:?} is not HH:MM"))?,
            );
            if h > 23 || m > 59 {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not HH:MM-HH:MM"))?;
        let (start, end) = (minutes(a)?, minutes(b)?);
        if start == end {
            return Err(format!("{s:?} is an empty window"));
        }
        Ok(Some(QuietHours { start, end }))
    }

    /// Whether `minute_of_day` (local time, 0..1440) falls in the window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start || minute_of_day < self.end
        }
    }
}

/// A self-test kind, as `smartctl -t` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TestKind {
    Short,
    Long,
}

impl TestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TestKind::Short => "short",
            TestKind::Long => "long",
        }
    }
}

/// The self-test to start on a device now, if any: in quiet hours, the long one when it is
/// due (it covers what the short one reads), else the short one when due. `last_*` are when
/// each was last started (unix seconds).
pub fn due_test(
    quiet: Option<QuietHours>,
    minute_of_day: u16,
    now: i64,
    last_short: Option<i64>,
    last_long: Option<i64>,
    short_every: Duration,
    long_every: Duration,
) -> Option<TestKind> {
    let quiet = quiet?;
    if !quiet.contains(minute_of_day) {
        return None;
    }
    let due = |last: Option<i64>, every: Duration| {
        !every.is_zero()
            // A little slack, so a daily test does not drift a reading later every day.
            && last.is_none_or(|at| now - at >= every.as_secs() as i64 - 3600)
    };
    if due(last_long, long_every) {
        Some(TestKind::Long)
    } else if due(last_short, short_every) && due(last_long, short_every) {
        Some(TestKind::Short)
    } else {
        None
    }
}

/// How finely a stored sample is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Raw,
    Day,
    Week,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Raw => "raw",
            Resolution::Day => "day",
            Resolution::Week => "week",
        }
    }

    pub fn parse(s: &str) -> Option<Resolution> {
        match s {
            "raw" => Some(Resolution::Raw),
            "day" => Some(Resolution::Day),
            "week" => Some(Resolution::Week),
            _ => None,
        }
    }
}

/// Every reading kept this long.
pub const RAW_FOR: i64 = 15 * 86_400;
/// Then one a day (the day's last) for this long; after that one a week.
pub const DAILY_FOR: i64 = 180 * 86_400;

/// What to do with one stored sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Delete { at: i64 },
    Coarsen { at: i64, to: Resolution },
}

/// Downsamples one device's history: raw readings older than [`RAW_FOR`] become one per UTC
/// day, days older than [`DAILY_FOR`] one per week (Monday-based). The kept sample of a period
/// is its last: the counters only grow, so the last is the worst, and the wear trend needs the
/// latest point. `samples` are `(unix seconds, resolution)` in any order.
pub fn compact(samples: &[(i64, Resolution)], now: i64) -> Vec<Change> {
    let mut kept: BTreeMap<i64, Resolution> = samples.iter().copied().collect();
    // Weeks start on Monday: 1970-01-01 was a Thursday, 3 days after one.
    for (older_than, from, to, period, shift) in [
        (RAW_FOR, Resolution::Raw, Resolution::Day, 86_400, 0),
        (
            DAILY_FOR,
            Resolution::Day,
            Resolution::Week,
            7 * 86_400,
            3 * 86_400,
        ),
    ] {
        // Only periods entirely before the cut-off; one still open keeps its readings.
        let cutoff = now - older_than;
        let mut periods: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (&at, &res) in &kept {
            let start = (at + shift).div_euclid(period) * period - shift;
            if res <= from && start + period <= cutoff {
                periods.entry(start).or_default().push(at);
            }
        }
        for members in periods.values() {
            let (&last, rest) = members.split_last().expect("a period has members");
            for at in rest {
                kept.remove(at);
            }
            kept.insert(last, to);
        }
    }
    samples
        .iter()
        .filter_map(|&(at, res)| match kept.get(&at) {
            None => Some(Change::Delete { at }),
            Some(&to) if to != res => Some(Change::Coarsen { at, to }),
            Some(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn quiet_hours_may_cross_midnight() {
        let q = QuietHours::parse("22:30-04:00").unwrap().unwrap();
        assert!(q.contains(23 * 60));
        assert!(q.contains(3 * 60 + 59));
        assert!(!q.contains(4 * 60));
        assert!(!q.contains(12 * 60));
        let q = QuietHours::parse("02:00-05:00").unwrap().unwrap();
        assert!(q.contains(2 * 60) && !q.contains(5 * 60) && !q.contains(60));
        assert_eq!(QuietHours::parse(" ").unwrap(), None);
        for bad in ["2-5", "25:00-01:00", "02:00", "02:00-02:00", "aa:bb-01:00"] {
            assert!(QuietHours::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_long_test_goes_first_and_the_short_one_waits_a_day_after_it() {
        let q = QuietHours::parse("02:00-05:00").ok().flatten();
        let (short, long) = (
            Duration::from_secs(DAY as u64),
            Duration::from_secs(7 * DAY as u64),
        );
        let now = 100 * DAY;
        let at_3am = 180;
        assert_eq!(
            due_test(q, at_3am, now, None, None, short, long),
            Some(TestKind::Long)
        );
        assert_eq!(
            due_test(q, 12 * 60, now, None, None, short, long),
            None,
            "not in quiet hours"
        );
        assert_eq!(
            due_test(q, at_3am, now, None, Some(now - 2 * DAY), short, long),
            Some(TestKind::Short)
        );
        assert_eq!(
            due_test(
                q,
                at_3am,
                now,
                Some(now - 3600),
                Some(now - 2 * DAY),
                short,
                long
            ),
            None
        );
        assert_eq!(
            due_test(q, at_3am, now, None, Some(now - 3600), short, long),
            None
        );
        // A day later, less the slack, the short test is due again.
        assert_eq!(
            due_test(
                q,
                at_3am,
                now,
                Some(now - DAY + 1800),
                Some(now - 3 * DAY),
                short,
                long
            ),
            Some(TestKind::Short)
        );
        assert_eq!(due_test(None, at_3am, now, None, None, short, long), None);
        assert_eq!(
            due_test(q, at_3am, now, None, None, Duration::ZERO, Duration::ZERO),
            None
        );
    }

    #[test]
    fn history_is_raw_for_fifteen_days_then_daily_then_weekly() {
        let now = 400 * DAY;
        let mut samples: Vec<(i64, Resolution)> = Vec::new();
        // Every 30 minutes for 400 days.
        let mut at = 0;
        while at <= now {
            samples.push((at, Resolution::Raw));
            at += 1800;
        }
        let changes = compact(&samples, now);
        let mut kept: BTreeMap<i64, Resolution> = samples.iter().copied().collect();
        for c in &changes {
            match *c {
                Change::Delete { at } => {
                    kept.remove(&at);
                }
                Change::Coarsen { at, to } => {
                    kept.insert(at, to);
                }
            }
        }
        let raw = kept.values().filter(|r| **r == Resolution::Raw).count() as i64;
        let daily = kept.values().filter(|r| **r == Resolution::Day).count() as i64;
        let weekly = kept.values().filter(|r| **r == Resolution::Week).count() as i64;
        assert!((15 * 48..=16 * 48 + 1).contains(&raw), "{raw} raw");
        // 165 days of daily points, and up to 6 more: a week still partly within 180 days
        // keeps its days.
        assert!((165..=172).contains(&daily), "{daily} daily");
        assert!((30..=32).contains(&weekly), "{weekly} weekly");
        // Each kept coarse sample is the last of its period.
        assert_eq!(kept.get(&(301 * DAY - 1800)), Some(&Resolution::Day));
        // The first week (Monday 1969-12-29 to Sunday 1970-01-04) ends at day 4.
        assert_eq!(kept.get(&(4 * DAY - 1800)), Some(&Resolution::Week));
        // Compacting again changes nothing.
        let again: Vec<(i64, Resolution)> = kept.iter().map(|(a, r)| (*a, *r)).collect();
        assert_eq!(compact(&again, now), vec![]);
    }

    #[test]
    fn an_open_period_keeps_its_raw_readings() {
        let now = 20 * DAY + 600;
        let samples = vec![
            (20 * DAY - 15 * DAY + 60, Resolution::Raw),
            (20 * DAY - 15 * DAY + 120, Resolution::Raw),
        ];
        assert_eq!(compact(&samples, now), vec![]);
    }
}

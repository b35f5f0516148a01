//! The control loop's decisions, without I/O: in which order to write setpoints so the site
//! limit holds between writes, how long to wait before retrying a failed charger, and what
//! changed between two polls of a charger.

use std::time::Duration;

use serde::Serialize;

use crate::driver::Reading;

/// One charger's setpoint change, in the power it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<K> {
    pub key: K,
    /// What the charger may draw now, kW.
    pub from_kw: f64,
    /// What it may draw after the write, kW.
    pub to_kw: f64,
}

/// Orders setpoint writes so that the site limit holds after every single write, not only
/// after the last: all decreases first (the largest first, freeing the most room soonest),
/// then the increases (the smallest first). If the old and the new setpoints each fit under
/// the limit, every intermediate state does too, since each is at most the larger of the two
/// per charger during the decreases and at most the new total during the increases.
pub fn order<K>(mut changes: Vec<Change<K>>) -> Vec<Change<K>> {
    changes.retain(|c| c.to_kw != c.from_kw);
    changes.sort_by(|a, b| {
        let (da, db) = (a.to_kw - a.from_kw, b.to_kw - b.from_kw);
        match (da < 0.0, db < 0.0) {
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            // Both decreases: most negative first; both increases: smallest first.
            _ => da.total_cmp(&db),
        }
    });
    changes
}

/// The highest total power allowed at any point while `changes` are written in order,
/// starting from `total_kw`.
pub fn peak_while_writing<K>(total_kw: f64, changes: &[Change<K>]) -> f64 {
    let mut total = total_kw;
    let mut peak = total;
    for c in changes {
        total += c.to_kw - c.from_kw;
        peak = peak.max(total);
    }
    peak
}

/// Wait before the next attempt after `failures` consecutive failures: `base`, doubling, at
/// most `max`.
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(max)
}

/// What changed at a charger between two polls.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Plugged,
    Unplugged,
    ChargingStarted,
    ChargingStopped,
    /// The charger itself reports an error (IEC 61851 E or F, or its fault register).
    ChargerError,
    ChargerErrorCleared,
}

impl Event {
    pub fn as_str(&self) -> &'static str {
        match self {
            Event::Plugged => "plugged",
            Event::Unplugged => "unplugged",
            Event::ChargingStarted => "charging_started",
            Event::ChargingStopped => "charging_stopped",
            Event::ChargerError => "charger_error",
            Event::ChargerErrorCleared => "charger_error_cleared",
        }
    }
}

/// Events between the last reading (None: first contact) and this one.
pub fn events(before: Option<&Reading>, after: &Reading) -> Vec<Event> {
    let (plugged, charging, fault) =
        before.map_or((false, false, false), |b| (b.plugged, b.charging, b.fault));
    let mut out = Vec::new();
    if after.plugged != plugged {
        out.push(if after.plugged {
            Event::Plugged
        } else {
            Event::Unplugged
        });
    }
    if after.charging != charging {
        out.push(if after.charging {
            Event::ChargingStarted
        } else {
            Event::ChargingStopped
        });
    }
    if after.fault != fault {
        out.push(if after.fault {
            Event::ChargerError
        } else {
            Event::ChargerErrorCleared
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn change(key: usize, from_kw: f64, to_kw: f64) -> Change<usize> {
        Change {
            key,
            from_kw,
            to_kw,
        }
    }

    #[test]
    fn decreases_go_first() {
        let ordered = order(vec![
            change(0, 0.0, 22.0),
            change(1, 22.0, 4.0),
            change(2, 11.0, 11.0),
            change(3, 11.0, 7.0),
            change(4, 4.0, 11.0),
        ]);
        let keys: Vec<usize> = ordered.iter().map(|c| c.key).collect();
        assert_eq!(
            keys,
            vec![1, 3, 4, 0],
            "unchanged setpoints are not rewritten"
        );
    }

    proptest! {
        /// Whenever the old and the new setpoints both fit under the limit, no prefix of the
        /// ordered writes exceeds it.
        #[test]
        fn the_limit_holds_between_writes(
            pairs in proptest::collection::vec((0.0f64..22.0, 0.0f64..22.0), 1..40),
            limit in 50.0f64..400.0,
        ) {
            let before: f64 = pairs.iter().map(|p| p.0).sum();
            let after: f64 = pairs.iter().map(|p| p.1).sum();
            prop_assume!(before <= limit && after <= limit);
            let changes = pairs.iter().enumerate().map(|(i, p)| change(i, p.0, p.1)).collect();
            let ordered = order(changes);
            prop_assert!(peak_while_writing(before, &ordered) <= limit + 1e-9);
        }
    }

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let (b, m) = (Duration::from_secs(5), Duration::from_secs(300));
        let waits: Vec<u64> = (1..=9).map(|f| backoff(f, b, m).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX, b, m), m);
    }

    #[test]
    fn plug_charge_and_fault_transitions_are_reported() {
        let idle = Reading {
            state: Some(crate::profile::IecState::A),
            status: Some("A".into()),
            plugged: false,
            charging: false,
            fault: false,
            power_w: 0.0,
            energy_wh: Some(0.0),
        };
        let charging = Reading {
            plugged: true,
            charging: true,
            ..idle.clone()
        };
        assert_eq!(events(None, &idle), vec![]);
        assert_eq!(
            events(Some(&idle), &charging),
            vec![Event::Plugged, Event::ChargingStarted]
        );
        let failed = Reading {
            fault: true,
            charging: false,
            ..charging.clone()
        };
        assert_eq!(
            events(Some(&charging), &failed),
            vec![Event::ChargingStopped, Event::ChargerError]
        );
    }
}

//! From what the depot knows (plugged chargers, the vehicles docked at their bays, what
//! technicians set, the tariff, the measured base load) to the scheduler's [`Problem`]. Pure:
//! the time zone and "now" come in as arguments.

use atlasmesh_charging::driver::Reading;
use atlasmesh_charging::schedule::{Need, Problem};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::Serialize;

/// The planning horizon: a day of quarter-hours.
pub const SLOTS: usize = 96;
pub const SLOT_MS: i64 = 15 * 60_000;

/// One plugged charger and what is known of the vehicle on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub charger: String,
    /// Index of the charger's circuit in the problem's circuits.
    pub circuit: Option<usize>,
    /// The vehicle docked at the charger's bay, when the depot knows it.
    pub vehicle: Option<String>,
    pub soc_percent: Option<f64>,
    pub battery_kwh: Option<f64>,
    pub target_soc_percent: f64,
    /// Unix ms.
    pub departure_ms: i64,
    pub priority: u8,
    pub max_kw: f64,
    pub min_kw: f64,
    /// Kept for an OTA install while docked, kWh.
    pub reserve_kwh: f64,
    /// Need when the vehicle's state of charge is unknown, kWh.
    pub unknown_need_kwh: f64,
    /// Energy already put into the battery this session, kWh: what an unknown vehicle's
    /// assumed need is reduced by, so it is not charged for the full guess on every re-plan.
    pub delivered_kwh: f64,
}

/// The energy register at the start of the session on a charger, Wh: taken when the vehicle
/// plugs in (or is first seen plugged), kept while it stays, and taken again if the register
/// goes backwards (chargers whose register counts per session reset it at plug-in).
pub fn session_start(start: Option<f64>, was_plugged: bool, now: &Reading) -> Option<f64> {
    if !now.plugged {
        return None;
    }
    match (start, now.energy_wh.filter(|e| e.is_finite())) {
        (Some(s), Some(e)) if was_plugged && e >= s => Some(s),
        // An unreadable value keeps the start it had.
        (s, None) if was_plugged => s,
        (_, e) => e,
    }
}

/// What the plan says about one session, beside its power.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionView {
    pub charger: String,
    pub vehicle: Option<String>,
    pub soc_percent: Option<f64>,
    pub target_soc_percent: f64,
    pub departure_ms: i64,
    pub priority: u8,
    pub reserve_kwh: f64,
    /// Energy the battery still needs, kWh (with the reserve).
    pub need_kwh: f64,
}

impl Session {
    /// Energy the battery needs by departure, kWh.
    pub fn need_kwh(&self) -> f64 {
        let charge = match (self.soc_percent, self.battery_kwh) {
            (Some(soc), Some(battery)) => {
                ((self.target_soc_percent - soc).max(0.0) / 100.0) * battery
            }
            _ => (self.unknown_need_kwh - self.delivered_kwh).max(0.0),
        };
        charge + self.reserve_kwh
    }

    /// Planner name: the vehicle, or the charger when the vehicle is unknown.
    pub fn name(&self) -> String {
        self.vehicle
            .clone()
            .unwrap_or_else(|| format!("{} (unknown vehicle)", self.charger))
    }
}

/// Quarter-hour of the local day (0..96) that `ms` falls in.
pub fn quarter_of_day(ms: i64, tz: &TimeZone) -> usize {
    let Ok(ts) = Timestamp::from_millisecond(ms) else {
        return 0;
    };
    let t = ts.to_zoned(tz.clone());
    (t.hour() as usize * 4 + t.minute() as usize / 15).min(SLOTS - 1)
}

/// The next local `minutes`-after-midnight strictly after `now_ms`, Unix ms.
pub fn next_local_time(now_ms: i64, minutes: u32, tz: &TimeZone) -> i64 {
    let Ok(now) = Timestamp::from_millisecond(now_ms) else {
        return now_ms + 86_400_000;
    };
    let zoned = now.to_zoned(tz.clone());
    let today = zoned
        .date()
        .at((minutes / 60) as i8, (minutes % 60) as i8, 0, 0)
        .to_zoned(tz.clone());
    let candidate = match today {
        Ok(t) if t.timestamp() > now => t,
        Ok(t) => match t.checked_add(1.day()) {
            Ok(t) => t,
            Err(_) => return now_ms + 86_400_000,
        },
        Err(_) => return now_ms + 86_400_000,
    };
    candidate.timestamp().as_millisecond()
}

/// Builds the problem for the day ahead from now.
pub fn problem(
    now_ms: i64,
    tz: &TimeZone,
    site_limit_kw: f64,
    tariff: &[f64],
    base_load_kw: &[f64],
    efficiency: f64,
    sessions: &[Session],
) -> Problem {
    let price = (0..SLOTS)
        .map(|t| {
            tariff
                .get(quarter_of_day(now_ms + t as i64 * SLOT_MS, tz))
                .copied()
                .unwrap_or(0.0)
        })
        .collect();
    let vehicles = sessions
        .iter()
        .map(|s| Need {
            vehicle: s.name(),
            circuit: s.circuit,
            energy_kwh: s.need_kwh(),
            efficiency,
            from_slot: 0,
            // Only whole slots before departure count: a plan never relies on the minutes
            // in which the vehicle may already be unplugging.
            departure_slot: usize::try_from((s.departure_ms - now_ms).max(0) / SLOT_MS)
                .unwrap_or(0)
                .min(SLOTS),
            max_kw: s.max_kw,
            min_kw: s.min_kw.min(s.max_kw),
            priority: s.priority,
        })
        .collect();
    Problem {
        slot_hours: 0.25,
        site_limit_kw,
        base_load_kw: base_load_kw.iter().map(|b| b.max(0.0)).collect(),
        price,
        circuits: Vec::new(),
        vehicles,
    }
}

/// A base-load forecast: the last measurement per local quarter-hour, blended, falling back to
/// the latest reading for quarters not seen yet.
#[derive(Debug, Clone, Default)]
pub struct BaseLoad {
    by_quarter: Vec<Option<f64>>,
    latest: Option<f64>,
}

impl BaseLoad {
    /// Records a measurement, kW.
    pub fn observe(&mut self, now_ms: i64, tz: &TimeZone, kw: f64) {
        if self.by_quarter.is_empty() {
            self.by_quarter = vec![None; SLOTS];
        }
        let q = quarter_of_day(now_ms, tz);
        // Weight a new reading like one day in five: yesterday's peak still counts today.
        self.by_quarter[q] = Some(match self.by_quarter[q] {
            Some(old) => 0.8 * old + 0.2 * kw,
            None => kw,
        });
        self.latest = Some(kw);
    }

    pub fn forecast(&self, now_ms: i64, tz: &TimeZone) -> Vec<f64> {
        (0..SLOTS)
            .map(|t| {
                if t == 0 {
                    return self.latest.unwrap_or(0.0);
                }
                let q = quarter_of_day(now_ms + t as i64 * SLOT_MS, tz);
                self.by_quarter
                    .get(q)
                    .copied()
                    .flatten()
                    .or(self.latest)
                    .unwrap_or(0.0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    #[test]
    fn local_times_and_quarters() {
        // 2026-11-23T22:10:00Z
        let now = 1_795_471_800_000;
        assert_eq!(quarter_of_day(now, &utc()), 22 * 4);
        let dep = next_local_time(now, 6 * 60 + 30, &utc());
        assert_eq!(dep - now, (8 * 60 + 20) * 60_000);
        let later = next_local_time(now, 23 * 60, &utc());
        assert_eq!(later - now, 50 * 60_000, "later today, not tomorrow");
    }

    #[test]
    fn a_session_becomes_a_need_with_whole_slots_before_departure() {
        let now = 1_795_471_800_000;
        let s = Session {
            charger: "cp-1".into(),
            circuit: None,
            vehicle: Some("bus-7".into()),
            soc_percent: Some(30.0),
            battery_kwh: Some(400.0),
            target_soc_percent: 80.0,
            departure_ms: now + 100 * 60_000,
            priority: 2,
            max_kw: 22.0,
            min_kw: 4.1,
            reserve_kwh: 2.0,
            unknown_need_kwh: 30.0,
            delivered_kwh: 12.0,
        };
        let p = problem(
            now,
            &utc(),
            150.0,
            &crate::charging::db::default_tariff(),
            &[10.0; SLOTS],
            0.9,
            std::slice::from_ref(&s),
        );
        let v = &p.vehicles[0];
        assert_eq!(v.energy_kwh, 202.0);
        assert_eq!(
            v.departure_slot, 6,
            "100 minutes hold 6 whole quarter-hours"
        );
        assert_eq!(p.price[0], 0.18, "22:10 is in the late-evening band");
        assert_eq!(p.price[8], 0.12, "00:10 is in the night band");
        let unknown = Session {
            vehicle: None,
            soc_percent: None,
            ..s
        };
        // 30 kWh assumed, 12 already in, 2 kept for the OTA install.
        assert_eq!(unknown.need_kwh(), 20.0);
        assert_eq!(unknown.name(), "cp-1 (unknown vehicle)");
        let full = Session {
            delivered_kwh: 45.0,
            ..unknown
        };
        assert_eq!(full.need_kwh(), 2.0, "never below the reserve");
    }

    #[test]
    fn a_session_counts_energy_from_plug_in() {
        let reading = |plugged: bool, wh: f64| Reading {
            state: None,
            status: None,
            plugged,
            charging: plugged,
            fault: false,
            power_w: 0.0,
            energy_wh: Some(wh),
        };
        // A lifetime register: the start is where it stood at plug-in.
        let start = session_start(None, false, &reading(true, 50_000.0));
        assert_eq!(start, Some(50_000.0));
        assert_eq!(session_start(start, true, &reading(true, 61_000.0)), start);
        // Unplugged: no session; the next plug-in starts again.
        assert_eq!(session_start(start, true, &reading(false, 61_000.0)), None);
        assert_eq!(
            session_start(start, false, &reading(true, 61_000.0)),
            Some(61_000.0)
        );
        // A per-session register reset after the start was taken.
        assert_eq!(
            session_start(Some(9_000.0), true, &reading(true, 200.0)),
            Some(200.0)
        );
        // A value that is not a number changes nothing.
        assert_eq!(
            session_start(start, true, &reading(true, f64::INFINITY)),
            start
        );
        assert_eq!(session_start(None, false, &reading(true, f64::NAN)), None);
    }

    #[test]
    fn the_base_load_forecast_remembers_quarters() {
        let now = 1_795_471_800_000;
        let mut b = BaseLoad::default();
        b.observe(now, &utc(), 40.0);
        b.observe(now + SLOT_MS, &utc(), 60.0);
        let f = b.forecast(now, &utc());
        assert_eq!(f[0], 60.0, "the latest reading now");
        assert_eq!(f[1], 60.0);
        assert_eq!(f[SLOTS - 1], 60.0, "unseen quarters: the latest");
    }
}

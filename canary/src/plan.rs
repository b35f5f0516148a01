//! A rollout plan: what to install, in which waves, behind which gate, with which time limits.

use serde::{Deserialize, Serialize};

use crate::gate::Gate;

/// The image a rollout installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub hardware_id: String,
    pub version: String,
}

/// How far a wave takes the rollout, counted over all its vehicles (cumulative): the
/// runbooks' "canary, then 25 %, then 100 %" is three waves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    /// Percent of the rollout's vehicles, rounded up.
    Percent(f64),
    /// A number of vehicles.
    Count(u64),
}

/// In JSON: `{"percent": 25}` or `{"count": 150}`, with an optional `"min_vehicles"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WaveJson", into = "WaveJson")]
pub struct Wave {
    pub size: Size,
    /// At least this many vehicles by the end of the wave (when the rollout has them).
    pub min_vehicles: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(default)]
    min_vehicles: u64,
}

impl TryFrom<WaveJson> for Wave {
    type Error = String;

    fn try_from(w: WaveJson) -> Result<Self, String> {
        let size = match (w.percent, w.count) {
            (Some(p), None) => Size::Percent(p),
            (None, Some(n)) => Size::Count(n),
            _ => return Err("a wave has either \"percent\" or \"count\"".into()),
        };
        Ok(Wave {
            size,
            min_vehicles: w.min_vehicles,
        })
    }
}

impl From<Wave> for WaveJson {
    fn from(w: Wave) -> Self {
        let (percent, count) = match w.size {
            Size::Percent(p) => (Some(p), None),
            Size::Count(n) => (None, Some(n)),
        };
        WaveJson {
            percent,
            count,
            min_vehicles: w.min_vehicles,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub target: Target,
    pub waves: Vec<Wave>,
    #[serde(default)]
    pub gate: Gate,
    /// After a good boot, how long a vehicle must stay healthy before it counts as a success.
    pub soak_ms: i64,
    /// From assignment to success: a vehicle still open after this counts as failed (silent).
    pub deadline_ms: i64,
    /// Vehicles downloading or installing at once.
    pub max_concurrent: u64,
    /// A wave still inconclusive after this long pauses for a technician (too few vehicles
    /// became eligible, for instance).
    pub wave_timeout_ms: i64,
    /// On a halt, also roll back the vehicles the failed wave already updated.
    #[serde(default = "yes")]
    pub roll_back_failed_wave: bool,
}

fn yes() -> bool {
    true
}

/// Why a plan cannot run. Each says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the rollout has no vehicle to update (none of this hardware below the target version)"
    )]
    NoVehicles,
    #[error("a plan needs at least one wave")]
    NoWaves,
    #[error("wave {wave}: {message}")]
    Wave { wave: usize, message: String },
    #[error("gate: {0}")]
    Gate(String),
    #[error(
        "the first wave has {wave_size} vehicle(s), but showing {threshold_percent} % success at {confidence_percent} % confidence takes at least {needed} vehicles that all succeed; make the first wave larger, or lower the threshold (at most {strictest_percent:.1} % with {wave_size} vehicles) or the confidence"
    )]
    GateCannotPass {
        wave_size: u64,
        needed: u64,
        threshold_percent: f64,
        confidence_percent: f64,
        strictest_percent: f64,
    },
    #[error("{0}")]
    Limits(String),
}

impl Plan {
    /// The cumulative vehicle count at the end of each wave over `population` vehicles. A
    /// wave that adds nobody on this population (a count above it, say) is dropped, so the
    /// result is strictly increasing and ends at most at `population`.
    pub fn targets(&self, population: u64) -> Result<Vec<u64>, PlanError> {
        if population == 0 {
            return Err(PlanError::NoVehicles);
        }
        if self.waves.is_empty() {
            return Err(PlanError::NoWaves);
        }
        self.gate.validate()?;
        if self.max_concurrent == 0 {
            return Err(PlanError::Limits(
                "max_concurrent must be at least 1".into(),
            ));
        }
        if self.soak_ms < 0 || self.deadline_ms <= 0 || self.wave_timeout_ms <= 0 {
            return Err(PlanError::Limits(
                "soak must not be negative; the vehicle deadline and wave timeout must be positive"
                    .into(),
            ));
        }
        if self.deadline_ms <= self.soak_ms {
            return Err(PlanError::Limits(format!(
                "the vehicle deadline ({} s) must be longer than the soak time ({} s)",
                self.deadline_ms / 1000,
                self.soak_ms / 1000
            )));
        }
        let mut targets: Vec<u64> = Vec::with_capacity(self.waves.len());
        for (i, wave) in self.waves.iter().enumerate() {
            let n = match wave.size {
                Size::Percent(p) if p > 0.0 && p <= 100.0 => {
                    (p / 100.0 * population as f64).ceil() as u64
                }
                Size::Percent(p) => {
                    return Err(PlanError::Wave {
                        wave: i + 1,
                        message: format!("{p} % is not between 0 (excluded) and 100"),
                    });
                }
                Size::Count(0) => {
                    return Err(PlanError::Wave {
                        wave: i + 1,
                        message: "a count of 0 vehicles".into(),
                    });
                }
                Size::Count(n) => n,
            };
            // Sizes are cumulative: of two waves of the same kind, the later is larger.
            let earlier = self.waves[..i].iter().rev().find(|w| {
                matches!(
                    (w.size, wave.size),
                    (Size::Percent(_), Size::Percent(_)) | (Size::Count(_), Size::Count(_))
                )
            });
            let shrinks = match (earlier.map(|w| w.size), wave.size) {
                (Some(Size::Percent(a)), Size::Percent(b)) => b <= a,
                (Some(Size::Count(a)), Size::Count(b)) => b <= a,
                _ => false,
            };
            if shrinks {
                return Err(PlanError::Wave {
                    wave: i + 1,
                    message: "no larger than an earlier wave; sizes are cumulative (canary, then 25 %, then 100 %)".into(),
                });
            }
            // On this population a wave may add nobody (a canary count above 25 % of it, or
            // a count above the population): it is dropped.
            let n = n.max(wave.min_vehicles).min(population);
            if targets.last().is_none_or(|&last| n > last) {
                targets.push(n);
            }
        }
        let first = targets[0];
        let needed = self.gate.min_sample();
        if first < needed {
            return Err(PlanError::GateCannotPass {
                wave_size: first,
                needed,
                threshold_percent: self.gate.threshold * 100.0,
                confidence_percent: self.gate.confidence * 100.0,
                strictest_percent: self.gate.strictest_threshold(first) * 100.0,
            });
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn plan(waves: &[Size]) -> Plan {
        Plan {
            target: Target {
                hardware_id: "hw".into(),
                version: "2.0.0".into(),
            },
            waves: waves
                .iter()
                .map(|&size| Wave {
                    size,
                    min_vehicles: 0,
                })
                .collect(),
            gate: Gate::default(),
            soak_ms: 60_000,
            deadline_ms: 3_600_000,
            max_concurrent: 50,
            wave_timeout_ms: 86_400_000,
            roll_back_failed_wave: true,
        }
    }

    #[test]
    fn waves_are_cumulative_and_clamped() {
        let p = plan(&[Size::Count(150), Size::Percent(25.0), Size::Percent(100.0)]);
        assert_eq!(p.targets(1000).unwrap(), vec![150, 250, 1000]);
        // On 400 vehicles 25 % is 100, within the canary: that wave adds nobody.
        assert_eq!(p.targets(400).unwrap(), vec![150, 400]);
        assert_eq!(p.targets(150).unwrap(), vec![150]);
        // Shrinking sizes of one kind are a mistake on any population.
        let bad = plan(&[Size::Percent(50.0), Size::Percent(25.0)]);
        let err = bad.targets(1000).unwrap_err();
        assert!(err.to_string().starts_with("wave 2"), "{err}");
    }

    #[test]
    fn a_first_wave_the_gate_cannot_pass_is_refused_with_what_would_work() {
        let p = plan(&[Size::Count(20), Size::Percent(100.0)]);
        let err = p.targets(20).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("at least 133 vehicles"), "{text}");
        assert!(text.contains("at most 88.1 %"), "{text}");
        let mut small = p.clone();
        small.gate.threshold = 0.85;
        assert_eq!(small.targets(20).unwrap(), vec![20]);
    }

    #[test]
    fn min_vehicles_raises_a_small_percentage() {
        let mut p = plan(&[Size::Percent(1.0), Size::Percent(100.0)]);
        p.waves[0].min_vehicles = 140;
        assert_eq!(p.targets(1000).unwrap(), vec![140, 1000]);
    }

    #[test]
    fn serde_shape() {
        let w: Wave = serde_json::from_str(r#"{"percent": 25, "min_vehicles": 3}"#).unwrap();
        assert_eq!(w.size, Size::Percent(25.0));
        let w: Wave = serde_json::from_str(r#"{"count": 10}"#).unwrap();
        assert_eq!(w.size, Size::Count(10));
        assert!(serde_json::from_str::<Wave>(r#"{"count": 10, "percent": 5}"#).is_err());
    }
}

//! The statistical gate between waves: is the release's success rate at least the threshold,
//! with the chosen confidence? Wilson's score interval on the vehicles' outcomes, with three
//! answers: pass, fail (it can no longer pass, whatever the vehicles still pending report),
//! and inconclusive (wait for them).

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// Threshold and confidence of the gate. The default is the runbooks' 98 % at 95 % confidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// Minimum success rate, as a fraction (0.98).
    pub threshold: f64,
    /// One-sided confidence that the true rate is at least the lower bound (0.95).
    pub confidence: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            threshold: 0.98,
            confidence: 0.95,
        }
    }
}

/// What a wave's vehicles have shown so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub successes: u64,
    /// Reported failures (download, install, boot, health).
    pub failures: u64,
    /// Vehicles that said nothing conclusive before their deadline: counted as failures.
    pub silent: u64,
    /// Vehicles whose outcome is still open, including wave places not yet assigned.
    pub pending: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// A judgement with the figures behind it, for the decision log and the panel.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub tally: Tally,
    /// Wilson lower bound of what is decided so far (`None` before any outcome).
    pub lower_bound: Option<f64>,
    /// The lower bound if every pending vehicle succeeded: below the threshold means fail.
    pub best_case: Option<f64>,
    pub threshold: f64,
    pub confidence: f64,
}

impl Gate {
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(PlanError::Gate(format!(
                "threshold {} must be between 0 and 1 (0.98 is 98 %)",
                self.threshold
            )));
        }
        if !(self.confidence >= 0.5 && self.confidence < 1.0) {
            return Err(PlanError::Gate(format!(
                "confidence {} must be at least 0.5 and below 1 (0.95 is 95 %)",
                self.confidence
            )));
        }
        Ok(())
    }

    /// The one-sided normal quantile for the confidence (1.645 at 95 %).
    pub fn z(&self) -> f64 {
        normal_quantile(self.confidence)
    }

    /// Wilson score lower bound of the success rate; `None` without trials.
    pub fn lower_bound(&self, successes: u64, trials: u64) -> Option<f64> {
        if trials == 0 {
            return None;
        }
        let n = trials as f64;
        let p = successes.min(trials) as f64 / n;
        let z = self.z();
        let z2 = z * z;
        let centre = p + z2 / (2.0 * n);
        let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
        Some(((centre - spread) / (1.0 + z2 / n)).max(0.0))
    }

    /// The fewest vehicles that, all succeeding, pass the gate: a first wave smaller than this
    /// can never pass (133 at 98 % and 95 %).
    pub fn min_sample(&self) -> u64 {
        let z2 = self.z().powi(2);
        // All n succeed: the bound is n / (n + z²), at least t when n >= t z² / (1 - t).
        let mut n = (self.threshold * z2 / (1.0 - self.threshold))
            .ceil()
            .max(1.0) as u64;
        // Guard the rounding at the boundary with the bound itself.
        while n > 1 && self.passes(n - 1, n - 1) {
            n -= 1;
        }
        while !self.passes(n, n) {
            n += 1;
        }
        n
    }

    /// The highest threshold `n` vehicles, all succeeding, can show at this confidence.
    pub fn strictest_threshold(&self, n: u64) -> f64 {
        self.lower_bound(n, n).unwrap_or(0.0)
    }

    fn passes(&self, successes: u64, trials: u64) -> bool {
        self.lower_bound(successes, trials)
            .is_some_and(|lb| lb >= self.threshold)
    }

    pub fn judge(&self, tally: Tally) -> Judgement {
        let failed = tally.failures + tally.silent;
        let decided = tally.successes + failed;
        let lower_bound = self.lower_bound(tally.successes, decided);
        let best_case = self.lower_bound(tally.successes + tally.pending, decided + tally.pending);
        let verdict = match best_case {
            Some(best) if best < self.threshold => Verdict::Fail,
            Some(_) if tally.pending == 0 && lower_bound.is_some_and(|lb| lb >= self.threshold) => {
                Verdict::Pass
            }
            _ => Verdict::Inconclusive,
        };
        Judgement {
            verdict,
            tally,
            lower_bound,
            best_case,
            threshold: self.threshold,
            confidence: self.confidence,
        }
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error below
/// 1.2e-9: far finer than any vehicle count can tell apart).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383_577_518_672_69e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    const LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p <= 0.0 {
        f64::NEG_INFINITY
    } else if p >= 1.0 {
        f64::INFINITY
    } else if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles_match_the_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.8, 0.841_621_234),
            (0.9, 1.281_551_566),
            (0.95, 1.644_853_627),
            (0.975, 1.959_963_985),
            (0.99, 2.326_347_874),
            (0.999, 3.090_232_306),
            (0.01, -2.326_347_874),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-6,
                "{p}: {}",
                normal_quantile(p)
            );
        }
    }

    #[test]
    fn wilson_lower_bound_matches_worked_examples() {
        let gate = Gate {
            threshold: 0.9,
            confidence: 0.975,
        };
        // 95 % two-sided interval (z = 1.96) for 81 of 100: [0.7222, 0.8749].
        let lb = gate.lower_bound(81, 100).unwrap();
        assert!((lb - 0.7222).abs() < 1e-4, "{lb}");
        // All successes: n / (n + z²).
        let lb = gate.lower_bound(10, 10).unwrap();
        assert!((lb - 10.0 / (10.0 + 1.959_964f64.powi(2))).abs() < 1e-6);
        assert_eq!(gate.lower_bound(0, 0), None);
        assert_eq!(gate.lower_bound(0, 5), Some(0.0));
    }

    #[test]
    fn the_default_gate_needs_133_clean_vehicles() {
        let gate = Gate::default();
        assert_eq!(gate.min_sample(), 133);
        assert!(gate.lower_bound(133, 133).unwrap() >= 0.98);
        assert!(gate.lower_bound(132, 132).unwrap() < 0.98);
        // One failure among them and 98 % can no longer be shown.
        assert_eq!(
            gate.judge(Tally {
                successes: 0,
                failures: 1,
                silent: 0,
                pending: 132
            })
            .verdict,
            Verdict::Fail
        );
        let small = Gate {
            threshold: 0.8,
            confidence: 0.8,
        };
        assert_eq!(small.min_sample(), 3);
    }

    #[test]
    fn three_verdicts() {
        let gate = Gate::default();
        let judge = |successes, failures, silent, pending| {
            gate.judge(Tally {
                successes,
                failures,
                silent,
                pending,
            })
            .verdict
        };
        assert_eq!(judge(0, 0, 0, 200), Verdict::Inconclusive);
        assert_eq!(judge(150, 0, 0, 50), Verdict::Inconclusive);
        assert_eq!(judge(200, 0, 0, 0), Verdict::Pass);
        assert_eq!(judge(1000, 5, 0, 0), Verdict::Pass);
        // Silent vehicles are failures.
        assert_eq!(judge(190, 0, 10, 0), Verdict::Fail);
        assert_eq!(judge(190, 10, 0, 0), Verdict::Fail);
        // Fails as soon as the best case is out of reach, long before the wave ends.
        assert_eq!(judge(10, 3, 0, 187), Verdict::Fail);
        assert_eq!(judge(0, 0, 0, 0), Verdict::Inconclusive);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let bad = Gate {
            threshold: 1.0,
            confidence: 0.95,
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("threshold")
        );
        let bad = Gate {
            threshold: 0.98,
            confidence: 0.2,
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("confidence")
        );
    }
}

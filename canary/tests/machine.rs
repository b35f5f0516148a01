//! The rollout state machine driven through its public API: scenarios over a thousand
//! vehicles, and properties over random event sequences (proptest).

use std::collections::{BTreeMap, HashSet};

use atlasmesh_canary::{
    Candidate, Decision, Event, Gate, Millis, Outcome, Phase, Plan, Replan, Rollout, Size, Stage,
    Target, Verdict, Wave,
};
use proptest::prelude::*;

const S: Millis = 1000;

fn plan(waves: &[Size]) -> Plan {
    Plan {
        target: Target {
            hardware_id: "veh-gen2".into(),
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
        soak_ms: 300 * S,
        deadline_ms: 3600 * S,
        max_concurrent: 100,
        wave_timeout_ms: 24 * 3600 * S,
        roll_back_failed_wave: true,
    }
}

fn fleet(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            id: format!("veh-{i:04}"),
            from_version: Some("1.0.0".into()),
            eligible: true,
            reasons: vec![],
        })
        .collect()
}

/// Vehicles that do what they are told, on a timetable; the ones in `failing` fail to install.
struct Depot {
    rollout: Rollout,
    now: Millis,
    queue: BTreeMap<(Millis, u64), Event>,
    seq: u64,
    failing: HashSet<String>,
    log: Vec<Decision>,
}

impl Depot {
    fn start(plan: Plan, n: usize, failing: HashSet<String>) -> Depot {
        let (rollout, decisions) = Rollout::start(plan, fleet(n), 0).unwrap();
        let mut depot = Depot {
            rollout,
            now: 0,
            queue: BTreeMap::new(),
            seq: 0,
            failing,
            log: vec![],
        };
        depot.carry_out(decisions);
        depot
    }

    fn at(&mut self, delay: Millis, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn carry_out(&mut self, decisions: Vec<Decision>) {
        for d in &decisions {
            match d {
                Decision::Assign { vehicle, .. } => {
                    let v = vehicle.clone();
                    self.at(S, Event::Downloading { vehicle: v.clone() });
                    self.at(60 * S, Event::Installed { vehicle: v.clone() });
                    if self.failing.contains(&v) {
                        self.at(
                            90 * S,
                            Event::Failed {
                                vehicle: v,
                                reason: "install: write failed".into(),
                            },
                        );
                    } else {
                        self.at(120 * S, Event::BootedGood { vehicle: v.clone() });
                        self.at(130 * S, Event::HealthPass { vehicle: v });
                        self.at(130 * S + 300 * S, Event::Tick);
                    }
                }
                Decision::RollBack { vehicle, .. } => {
                    self.at(
                        10 * S,
                        Event::RolledBack {
                            vehicle: vehicle.clone(),
                        },
                    );
                }
                _ => {}
            }
        }
        self.log.extend(decisions);
    }

    /// Runs until nothing is left to happen.
    fn run(&mut self) {
        while let Some(((t, _), event)) = self.queue.pop_first() {
            self.now = t;
            let step = self.rollout.handle(t, &event).unwrap();
            self.carry_out(step.decisions);
        }
    }
}

fn every_twentieth(n: usize) -> HashSet<String> {
    (0..n)
        .filter(|i| i % 20 == 7)
        .map(|i| format!("veh-{i:04}"))
        .collect()
}

#[test]
fn a_good_release_completes_every_wave() {
    let mut depot = Depot::start(
        plan(&[Size::Count(150), Size::Percent(25.0), Size::Percent(100.0)]),
        1000,
        HashSet::new(),
    );
    depot.run();
    assert_eq!(depot.rollout.phase(), &Phase::Completed);
    assert_eq!(depot.rollout.counts()[&Stage::Succeeded], 1000);
    let advances: Vec<usize> = depot
        .log
        .iter()
        .filter_map(|d| match d {
            Decision::Advance { wave, judgement } => {
                assert_eq!(judgement.verdict, Verdict::Pass);
                Some(*wave)
            }
            _ => None,
        })
        .collect();
    assert_eq!(advances, vec![1, 2]);
    assert!(matches!(depot.log.last(), Some(Decision::Complete { .. })));
}

#[test]
fn a_release_failing_on_five_percent_halts_within_the_canary_and_rolls_back() {
    let failing = every_twentieth(1000);
    let mut depot = Depot::start(
        plan(&[Size::Count(150), Size::Percent(25.0), Size::Percent(100.0)]),
        1000,
        failing,
    );
    depot.run();
    let Phase::Halted { reason } = depot.rollout.phase() else {
        panic!("not halted: {:?}", depot.rollout.phase());
    };
    assert!(reason.contains("wave 1 cannot pass"), "{reason}");
    // Nobody outside the canary wave was touched.
    let vehicles = depot.rollout.vehicles();
    assert!(
        vehicles
            .values()
            .all(|v| v.wave.is_none() || v.wave == Some(0))
    );
    let assigned = vehicles.values().filter(|v| v.wave.is_some()).count();
    assert!(assigned <= 150, "{assigned}");
    // The halt came at the first failure, while the wave was still in flight: everything it
    // had assigned is back on 1.0.0 or on its way there.
    let halt_at = depot
        .log
        .iter()
        .position(|d| matches!(d, Decision::Halt { .. }))
        .unwrap();
    assert!(
        !depot.log[..halt_at]
            .iter()
            .any(|d| matches!(d, Decision::Advance { .. }))
    );
    assert!(
        vehicles
            .values()
            .filter(|v| v.wave.is_some())
            .all(|v| v.stage == Stage::RolledBack),
        "{:?}",
        depot.rollout.counts()
    );
    let rolled_back: HashSet<&str> = depot
        .log
        .iter()
        .filter_map(|d| match d {
            Decision::RollBack {
                vehicle,
                to_version,
            } => {
                assert_eq!(to_version.as_deref(), Some("1.0.0"));
                Some(vehicle.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(rolled_back.len(), assigned);
}

#[test]
fn a_silent_vehicle_counts_as_failed_at_its_deadline() {
    let mut p = plan(&[Size::Count(3), Size::Percent(100.0)]);
    p.gate = Gate {
        threshold: 0.5,
        confidence: 0.6,
    };
    let (mut rollout, decisions) = Rollout::start(p, fleet(6), 0).unwrap();
    assert_eq!(decisions.len(), 3);
    let step = rollout.handle(3599 * S, &Event::Tick).unwrap();
    assert!(step.decisions.is_empty());
    let step = rollout.handle(3600 * S, &Event::Tick).unwrap();
    let v = &rollout.vehicles()["veh-0000"];
    assert_eq!(v.outcome, Some(Outcome::Silent));
    assert!(
        step.decisions
            .iter()
            .any(|d| matches!(d, Decision::Halt { .. }))
    );
}

/// Four vehicles, a canary of two under a lenient gate, both assigned at once.
fn two_of_four() -> (Rollout, Vec<Decision>) {
    let mut p = plan(&[Size::Count(2), Size::Percent(100.0)]);
    p.gate = Gate {
        threshold: 0.5,
        confidence: 0.6,
    };
    p.max_concurrent = 2;
    Rollout::start(p, fleet(4), 0).unwrap()
}

/// The vehicle left the depot (or dropped off the link).
fn leaves(vehicle: &str) -> Event {
    Event::Ineligible {
        vehicle: vehicle.into(),
        reasons: vec!["not docked".into()],
    }
}

#[test]
fn a_vehicle_that_leaves_before_starting_is_released_not_failed() {
    let (mut rollout, decisions) = two_of_four();
    assert_eq!(decisions.len(), 2);
    let step = rollout.handle(10 * S, &leaves("veh-0000")).unwrap();
    // Released, and its place taken by the next vehicle that is here.
    assert_eq!(
        step.decisions,
        vec![
            Decision::Release {
                vehicle: "veh-0000".into()
            },
            Decision::Assign {
                vehicle: "veh-0002".into(),
                wave: 0
            },
        ]
    );
    let v = &rollout.vehicles()["veh-0000"];
    assert_eq!(
        (v.stage, v.outcome.clone(), v.wave),
        (Stage::Waiting, None, None)
    );
    // One that started keeps its place: its download resumes at the next dock.
    rollout
        .handle(
            11 * S,
            &Event::Downloading {
                vehicle: "veh-0001".into(),
            },
        )
        .unwrap();
    let step = rollout
        .handle(
            12 * S,
            &Event::Ineligible {
                vehicle: "veh-0001".into(),
                reasons: vec!["not docked".into()],
            },
        )
        .unwrap();
    assert!(step.decisions.is_empty(), "{:?}", step.decisions);
    assert_eq!(rollout.vehicles()["veh-0001"].stage, Stage::Downloading);
    // Back, it is eligible again, but the wave is full.
    let step = rollout
        .handle(
            13 * S,
            &Event::Eligible {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    assert!(step.decisions.is_empty(), "{:?}", step.decisions);
}

#[test]
fn a_released_vehicle_that_started_anyway_is_followed_again() {
    let (mut rollout, _) = two_of_four();
    rollout.handle(10 * S, &leaves("veh-0000")).unwrap();
    assert_eq!(rollout.vehicles()["veh-0000"].stage, Stage::Waiting);
    // The withdrawal crossed its start: its download report arrives after the release.
    let step = rollout
        .handle(
            11 * S,
            &Event::Downloading {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    assert_eq!(
        step.decisions,
        vec![Decision::Assign {
            vehicle: "veh-0000".into(),
            wave: 0
        }],
        "its assignment is restored so its pull still verifies"
    );
    let v = &rollout.vehicles()["veh-0000"];
    assert_eq!(
        (v.stage, v.wave, v.assigned_at),
        (Stage::Downloading, Some(0), Some(0))
    );
    // And it counts like any other once it boots and passes its soak.
    rollout
        .handle(
            12 * S,
            &Event::BootedGood {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    rollout
        .handle(
            12 * S,
            &Event::HealthPass {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    rollout
        .handle(12 * S + rollout.plan().soak_ms, &Event::Tick)
        .unwrap();
    assert_eq!(
        rollout.vehicles()["veh-0000"].outcome,
        Some(Outcome::Succeeded)
    );
    // A vehicle never released is not adopted by a stray report.
    let step = rollout
        .handle(
            13 * S,
            &Event::Installed {
                vehicle: "veh-0003".into(),
            },
        )
        .unwrap();
    assert!(step.decisions.is_empty());
    assert_eq!(rollout.vehicles()["veh-0003"].stage, Stage::Waiting);
}

/// A vehicle followed again after its withdrawal crossed its start may have pulled while it
/// was withdrawn: the depot said "nothing to install", and the vehicle reports a failed
/// download. That is the withdrawal, not the release: released again, not failed. Once it has
/// installed, a failure counts as usual.
#[test]
fn a_refollowed_vehicle_whose_pull_met_the_withdrawal_is_released_not_failed() {
    let (mut rollout, _) = two_of_four();
    rollout.handle(10 * S, &leaves("veh-0000")).unwrap();
    let downloading = |v: &str| Event::Downloading { vehicle: v.into() };
    rollout.handle(11 * S, &downloading("veh-0000")).unwrap();
    assert_eq!(rollout.vehicles()["veh-0000"].stage, Stage::Downloading);
    let failed = |v: &str| Event::Failed {
        vehicle: v.into(),
        reason: "download: nothing to install: NoAssignment".into(),
    };
    let step = rollout.handle(12 * S, &failed("veh-0000")).unwrap();
    assert_eq!(
        step.decisions,
        vec![Decision::Release {
            vehicle: "veh-0000".into()
        }]
    );
    let v = &rollout.vehicles()["veh-0000"];
    assert_eq!((v.stage, &v.outcome), (Stage::Waiting, &None));

    // Followed again once more, it installs, then fails: that counts.
    rollout.handle(13 * S, &downloading("veh-0000")).unwrap();
    rollout
        .handle(
            14 * S,
            &Event::Installed {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    rollout.handle(15 * S, &failed("veh-0000")).unwrap();
    let v = &rollout.vehicles()["veh-0000"];
    assert!(
        matches!(v.outcome, Some(Outcome::Failed { .. })),
        "{:?}",
        v.outcome
    );
    // And a vehicle never released fails on its first failed download.
    rollout.handle(16 * S, &failed("veh-0001")).unwrap();
    assert!(matches!(
        rollout.vehicles()["veh-0001"].outcome,
        Some(Outcome::Failed { .. })
    ));
}

#[test]
fn a_released_vehicle_that_installs_after_a_halt_is_rolled_back() {
    let (mut rollout, _) = two_of_four();
    rollout.handle(S, &leaves("veh-0000")).unwrap();
    rollout
        .handle(
            2 * S,
            &Event::Halt {
                reason: "test".into(),
            },
        )
        .unwrap();
    let step = rollout
        .handle(
            3 * S,
            &Event::Installed {
                vehicle: "veh-0000".into(),
            },
        )
        .unwrap();
    assert_eq!(
        step.decisions,
        vec![Decision::RollBack {
            vehicle: "veh-0000".into(),
            to_version: Some("1.0.0".into())
        }]
    );
}

#[test]
fn operators_pause_resume_halt_and_replan_with_smaller_waves() {
    let mut p = plan(&[Size::Count(4), Size::Percent(100.0)]);
    p.gate = Gate {
        threshold: 0.6,
        confidence: 0.6,
    };
    p.max_concurrent = 2;
    let (mut r, decisions) = Rollout::start(p, fleet(10), 0).unwrap();
    assert_eq!(decisions.len(), 2, "max_concurrent holds");
    r.handle(S, &Event::Pause).unwrap();
    assert!(r.handle(S, &Event::Pause).is_err(), "already paused");
    // While paused nothing new is assigned, even as installs finish.
    for v in ["veh-0000", "veh-0001"] {
        r.handle(2 * S, &Event::BootedGood { vehicle: v.into() })
            .unwrap();
        let step = r
            .handle(2 * S, &Event::HealthPass { vehicle: v.into() })
            .unwrap();
        assert!(step.decisions.is_empty());
    }
    let step = r.handle(3 * S, &Event::Resume { replan: None }).unwrap();
    assert_eq!(step.decisions.len(), 2, "{:?}", step.decisions);
    let step = r
        .handle(
            4 * S,
            &Event::Halt {
                reason: "customer report".into(),
            },
        )
        .unwrap();
    assert!(matches!(r.phase(), Phase::Halted { .. }));
    assert!(
        step.decisions
            .iter()
            .any(|d| matches!(d, Decision::RollBack { .. }))
    );
    // Halted stays halted: reports and time change nothing.
    let step = r.handle(10_000 * S, &Event::Tick).unwrap();
    assert!(step.decisions.is_empty());
    assert!(matches!(r.phase(), Phase::Halted { .. }));
    // Resume with smaller waves: a new plan over the vehicles not updated.
    let waves = vec![
        Wave {
            size: Size::Count(2),
            min_vehicles: 0,
        },
        Wave {
            size: Size::Percent(100.0),
            min_vehicles: 0,
        },
    ];
    let step = r
        .handle(
            10_001 * S,
            &Event::Resume {
                replan: Some(Replan { waves, gate: None }),
            },
        )
        .unwrap();
    assert_eq!(r.phase(), &Phase::Running);
    assert_eq!(r.epoch(), 1);
    assert!(!step.decisions.is_empty());
    // A plan the gate cannot pass is refused, and the rollout stays as it was.
    let mut strict = r.clone();
    strict.handle(10_002 * S, &Event::Pause).unwrap();
    let err = strict
        .handle(
            10_003 * S,
            &Event::Resume {
                replan: Some(Replan {
                    waves: vec![Wave {
                        size: Size::Count(1),
                        min_vehicles: 0,
                    }],
                    gate: Some(Gate::default()),
                }),
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("at least 133"), "{err}");
}

#[test]
fn a_stored_rollout_carries_on_exactly_where_it_was() {
    let mut depot = Depot::start(
        plan(&[Size::Count(150), Size::Percent(100.0)]),
        300,
        every_twentieth(300),
    );
    // Part-way: serialise, restore, and both go on identically.
    for _ in 0..200 {
        let ((t, _), event) = depot.queue.pop_first().unwrap();
        depot.now = t;
        let step = depot.rollout.handle(t, &event).unwrap();
        depot.carry_out(step.decisions);
    }
    let stored = serde_json::to_string(&depot.rollout).unwrap();
    let mut restored: Rollout = serde_json::from_str(&stored).unwrap();
    assert_eq!(restored, depot.rollout);
    for ((t, _), event) in depot.queue.clone() {
        let a = depot.rollout.handle(t, &event).unwrap();
        let b = restored.handle(t, &event).unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(restored, depot.rollout);
}

fn event(kind: u8, vehicle: String) -> Event {
    match kind {
        0 => Event::Tick,
        1 => Event::Eligible { vehicle },
        2 => Event::Ineligible {
            vehicle,
            reasons: vec!["undocked".into()],
        },
        3 => Event::Downloading { vehicle },
        4 => Event::Installed { vehicle },
        5 => Event::BootedGood { vehicle },
        6 => Event::HealthPass { vehicle },
        7 => Event::HealthFail {
            vehicle,
            reason: "lidar".into(),
        },
        8 => Event::Failed {
            vehicle,
            reason: "boot".into(),
        },
        9 => Event::RolledBack { vehicle },
        10 => Event::Pause,
        11 => Event::Resume { replan: None },
        12 => Event::Halt {
            reason: "test".into(),
        },
        _ => Event::TimedOut { vehicle },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_for_any_event_sequence(
        n in 3usize..40,
        canary in 2u64..6,
        middle in 30.0f64..70.0,
        concurrent in 1u64..8,
        ops in prop::collection::vec((0u8..14, 0usize..40, 0i64..900), 1..400),
    ) {
        let mut p = plan(&[Size::Count(canary), Size::Percent(middle), Size::Percent(100.0)]);
        p.gate = Gate { threshold: 0.5, confidence: 0.6 };
        p.max_concurrent = concurrent;
        p.soak_ms = 60 * S;
        p.deadline_ms = 1800 * S;
        let (mut r, _) = Rollout::start(p.clone(), fleet(n), 0).unwrap();
        let mut now = 0;
        let mut adopted = HashSet::new();
        for (kind, idx, dt) in ops {
            now += dt * S;
            let before = r.clone();
            let e = event(kind, format!("veh-{:04}", idx % n));
            let Ok(step) = r.handle(now, &e) else {
                prop_assert_eq!(&r, &before, "a refused event changes nothing");
                continue;
            };
            // Counts are conserved.
            prop_assert_eq!(r.counts().values().sum::<u64>(), n as u64);
            // Never beyond the current wave, but for vehicles that started after their
            // assignment was withdrawn: those are followed wherever that leaves the wave.
            if r.epoch() != before.epoch() {
                adopted.clear();
            }
            for (id, v) in r.vehicles() {
                if before.vehicles()[id].released_at.is_some() && v.stage != Stage::Waiting {
                    adopted.insert(id.clone());
                }
            }
            let assigned = r.vehicles().iter().filter(|(id, v)| v.epoch == r.epoch() && v.wave.is_some() && !adopted.contains(*id)).count() as u64;
            prop_assert!(assigned <= r.targets()[r.wave()]);
            for d in &step.decisions {
                if let Decision::Assign { wave, .. } = d {
                    prop_assert_eq!(*wave, r.wave());
                }
            }
            // Never past a failed gate: whatever advanced had passed, on the vehicles of the
            // waves before.
            for d in &step.decisions {
                let (closed, judgement) = match d {
                    Decision::Advance { wave, judgement } => (*wave, judgement),
                    Decision::Complete { judgement } => (r.targets().len(), judgement),
                    _ => continue,
                };
                prop_assert_eq!(judgement.verdict, Verdict::Pass);
                let open = r.vehicles().values().filter(|v| {
                    v.epoch == r.epoch() && v.wave.is_some_and(|w| w < closed) && v.outcome.is_none()
                });
                prop_assert_eq!(open.count(), 0);
            }
            // Halted stays halted until resumed.
            if matches!(before.phase(), Phase::Halted { .. }) && !matches!(e, Event::Resume { .. }) {
                let halted = matches!(r.phase(), Phase::Halted { .. });
                prop_assert!(halted, "left the halt");
                let acted = step.decisions.iter().any(|d| matches!(d, Decision::Assign { .. } | Decision::Advance { .. } | Decision::Complete { .. }));
                prop_assert!(!acted, "acted while halted");
            }
            // A silent vehicle counts as failed by its deadline.
            if r.is_active() {
                for v in r.vehicles().values() {
                    if v.outcome.is_none() && v.stage.in_flight() {
                        prop_assert!(now - v.assigned_at.unwrap() < p.deadline_ms);
                    }
                }
            }
        }
    }
}

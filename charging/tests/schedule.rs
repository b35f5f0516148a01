//! The scheduler at its boundary: its plans against an independent LP (microlp through
//! good_lp), and the properties every plan must have.

use atlasmesh_charging::instances::depot_night;
use atlasmesh_charging::schedule::{
    Circuit, Method, Need, Problem, ProblemError, cheapest_slots_first_come,
    earliest_deadline_first, optimal, plan, plan_with_budget,
};
use good_lp::{Expression, ProblemVariables, Solution, SolverModel, microlp, variable};
use proptest::prelude::*;

/// The LP of docs/charging.md, solved by microlp: the least cost at which every need is met,
/// or None when not every need can be.
fn reference_cost(problem: &Problem) -> Option<f64> {
    let dt = problem.slot_hours;
    let mut vars = ProblemVariables::new();
    let mut objective = Expression::default();
    let mut per_slot = vec![Expression::default(); problem.slots()];
    let mut per_circuit =
        vec![vec![Expression::default(); problem.slots()]; problem.circuits.len()];
    let mut rows = Vec::new();
    for v in &problem.vehicles {
        let mut energy = Expression::default();
        for t in problem.window(v) {
            let x = vars.add(variable().min(0.0).max(v.max_kw));
            objective += problem.price[t] * dt * x;
            per_slot[t] += x;
            if let Some(c) = v.circuit {
                per_circuit[c][t] += x;
            }
            energy += v.efficiency * dt * x;
        }
        rows.push(energy.geq(v.energy_kwh));
    }
    let mut model = vars.minimise(objective.clone()).using(microlp);
    for row in rows {
        model = model.with(row);
    }
    for (t, e) in per_slot.into_iter().enumerate() {
        model = model.with(e.leq(problem.headroom(t)));
    }
    for (c, slots) in per_circuit.into_iter().enumerate() {
        for e in slots {
            model = model.with(e.leq(problem.circuits[c].limit_kw));
        }
    }
    let solution = model.solve().ok()?;
    Some(solution.eval(objective))
}

fn cost(problem: &Problem, power: &[Vec<f64>]) -> f64 {
    power
        .iter()
        .flat_map(|row| {
            row.iter()
                .zip(&problem.price)
                .map(|(p, c)| p * c * problem.slot_hours)
        })
        .sum()
}

/// The limits every plan keeps, and the windows it charges in.
fn assert_drivable(problem: &Problem, power: &[Vec<f64>], minimums: bool) {
    for t in 0..problem.slots() {
        let total: f64 = power.iter().map(|row| row[t]).sum();
        assert!(
            total <= problem.headroom(t) + 1e-6,
            "slot {t}: {total} kW over {}",
            problem.headroom(t)
        );
        for (c, circuit) in problem.circuits.iter().enumerate() {
            let on: f64 = problem
                .vehicles
                .iter()
                .zip(power)
                .filter(|(v, _)| v.circuit == Some(c))
                .map(|(_, row)| row[t])
                .sum();
            assert!(on <= circuit.limit_kw + 1e-6, "circuit {c} slot {t}: {on}");
        }
    }
    for (v, row) in problem.vehicles.iter().zip(power) {
        for (t, kw) in row.iter().enumerate() {
            assert!(
                *kw >= -1e-9 && *kw <= v.max_kw + 1e-6,
                "{} slot {t}: {kw}",
                v.vehicle
            );
            if !problem.window(v).contains(&t) {
                assert!(kw.abs() < 1e-9, "{} charges outside its window", v.vehicle);
            }
            if minimums {
                assert!(
                    *kw < 1e-9 || *kw >= v.min_kw - 1e-6,
                    "{} slot {t}: {kw} kW is below its minimum {}",
                    v.vehicle,
                    v.min_kw
                );
            }
        }
    }
}

fn need(name: &str, energy: f64, from: usize, departure: usize, max_kw: f64) -> Need {
    Need {
        vehicle: name.into(),
        circuit: None,
        energy_kwh: energy,
        efficiency: 1.0,
        from_slot: from,
        departure_slot: departure,
        max_kw,
        min_kw: 0.0,
        priority: 0,
    }
}

fn problem(site: f64, price: Vec<f64>, vehicles: Vec<Need>) -> Problem {
    Problem {
        slot_hours: 1.0,
        site_limit_kw: site,
        base_load_kw: vec![0.0; price.len()],
        price,
        circuits: Vec::new(),
        vehicles,
    }
}

fn small_problem() -> impl Strategy<Value = Problem> {
    let vehicle = (
        1.0f64..60.0,
        0usize..6,
        1usize..12,
        3.0f64..22.0,
        0.85f64..1.0,
        0u8..2,
        any::<bool>(),
    );
    (
        prop::collection::vec(vehicle, 1..8),
        prop::collection::vec(0.05f64..0.5, 12),
        prop::collection::vec(0.0f64..10.0, 12),
        20.0f64..80.0,
        any::<bool>(),
    )
        .prop_map(|(vehicles, price, base, site, circuits)| Problem {
            slot_hours: 0.5,
            site_limit_kw: site,
            base_load_kw: base,
            price,
            circuits: if circuits {
                vec![Circuit {
                    name: "row-a".into(),
                    limit_kw: site / 2.0,
                }]
            } else {
                Vec::new()
            },
            vehicles: vehicles
                .into_iter()
                .enumerate()
                .map(
                    |(i, (energy, from, len, max_kw, eff, priority, on_a))| Need {
                        vehicle: format!("v{i}"),
                        circuit: (circuits && on_a).then_some(0),
                        energy_kwh: energy,
                        efficiency: eff,
                        from_slot: from,
                        departure_slot: from + len,
                        max_kw,
                        min_kw: 0.0,
                        priority,
                    },
                )
                .collect(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Where every need can be met, the greedy's cost is the LP optimum, and every need is met.
    #[test]
    fn the_greedy_is_as_cheap_as_the_lp(problem in small_problem()) {
        let relaxed = optimal(&problem, u64::MAX).unwrap();
        assert_drivable(&problem, &relaxed, false);
        if let Some(best) = reference_cost(&problem) {
            let ours = cost(&problem, &relaxed);
            prop_assert!((ours - best).abs() <= 1e-6 * best.abs().max(1.0), "greedy {ours}, LP {best}");
            for (v, row) in problem.vehicles.iter().zip(&relaxed) {
                let got: f64 = row.iter().sum::<f64>() * problem.slot_hours * v.efficiency;
                prop_assert!(got >= v.energy_kwh - 1e-6, "{}: {got} of {}", v.vehicle, v.energy_kwh);
            }
        }
    }

    /// Every planner keeps the site and circuit limits, and the rounded plan the minimums.
    #[test]
    fn every_plan_keeps_the_limits(mut problem in small_problem(), min_kw in 0.0f64..4.2) {
        for v in &mut problem.vehicles {
            v.min_kw = min_kw.min(v.max_kw);
        }
        let planned = plan(&problem).unwrap();
        prop_assert_eq!(planned.method, Method::Optimal);
        assert_drivable(&problem, &planned.power_kw, true);
        assert_drivable(&problem, &earliest_deadline_first(&problem), true);
        assert_drivable(&problem, &cheapest_slots_first_come(&problem), true);
        prop_assert_eq!(planned.vehicles.len(), problem.vehicles.len());
    }
}

#[test]
fn energy_goes_to_the_cheapest_slots_the_deadline_allows() {
    // Night is cheap (slots 2-3) but vehicle b leaves at slot 2: it charges at the dear price,
    // a waits for the cheap slots.
    let p = problem(
        10.0,
        vec![0.40, 0.30, 0.10, 0.10],
        vec![need("a", 20.0, 0, 4, 10.0), need("b", 10.0, 0, 2, 10.0)],
    );
    let planned = plan(&p).unwrap();
    assert_eq!(planned.power_kw[0], vec![0.0, 0.0, 10.0, 10.0]);
    assert_eq!(planned.power_kw[1], vec![0.0, 10.0, 0.0, 0.0]);
    assert!((planned.cost - 5.0).abs() < 1e-9, "{}", planned.cost);
    assert_eq!(planned.missed(), 0);
}

#[test]
fn a_shortage_goes_to_priority_first_and_is_shared_among_equals() {
    // 30 kWh of room for 50 kWh of need: the priority vehicle is served in full, the two
    // others share what is left equally.
    let mut urgent = need("urgent", 10.0, 0, 3, 10.0);
    urgent.priority = 1;
    let p = problem(
        10.0,
        vec![0.2, 0.2, 0.2],
        vec![
            need("x", 20.0, 0, 3, 10.0),
            urgent,
            need("y", 20.0, 0, 3, 10.0),
        ],
    );
    let planned = plan(&p).unwrap();
    let got: Vec<f64> = planned.vehicles.iter().map(|o| o.energy_kwh).collect();
    assert!((got[1] - 10.0).abs() < 1e-6, "{got:?}");
    assert!(
        (got[0] - 10.0).abs() < 1e-6 && (got[2] - 10.0).abs() < 1e-6,
        "{got:?}"
    );
    assert_eq!(planned.missed(), 2);
    assert!((planned.vehicles[0].shortfall_kwh - 10.0).abs() < 1e-6);
    assert!(
        planned
            .explanation
            .iter()
            .any(|e| e.contains("x will be 10.0 kWh short")),
        "{:?}",
        planned.explanation
    );
}

#[test]
fn a_vehicle_that_cannot_make_it_alone_is_told_why() {
    let p = problem(100.0, vec![0.2, 0.2], vec![need("slow", 50.0, 0, 2, 11.0)]);
    let planned = plan(&p).unwrap();
    assert!((planned.vehicles[0].energy_kwh - 22.0).abs() < 1e-6);
    assert!(
        planned
            .explanation
            .iter()
            .any(|e| e.contains("even alone it can take only 22.0 kWh")),
        "{:?}",
        planned.explanation
    );
}

#[test]
fn a_shortfall_names_the_limit_that_binds() {
    use atlasmesh_charging::schedule::Circuit;
    // Two vans of 30 kWh in two slots at up to 22 kW: 44 kWh of room each alone.
    let van = |name: &str| {
        let mut v = need(name, 30.0, 0, 2, 22.0);
        v.circuit = Some(0);
        v
    };
    let reason = |site: f64, circuit: f64| {
        let mut p = problem(site, vec![0.2, 0.2], vec![van("a"), van("b")]);
        p.circuits = vec![Circuit {
            name: "feeder-a".into(),
            limit_kw: circuit,
        }];
        let planned = plan(&p).unwrap();
        assert!(planned.missed() > 0, "{:?}", planned.power_kw);
        planned.explanation.join("\n")
    };
    // The feeder (20 kW) binds under a generous site: it is named, and said to be full.
    let text = reason(100.0, 20.0);
    assert!(
        text.contains("the limit of circuit feeder-a is shared"),
        "{text}"
    );
    assert!(
        text.contains("circuit feeder-a (20.0 kW) is at its limit in 2 slots"),
        "{text}"
    );
    // The site (20 kW) binds under a generous feeder: the site is named.
    let text = reason(20.0, 100.0);
    assert!(text.contains("the site limit is shared"), "{text}");
    assert!(!text.contains("feeder-a"), "{text}");
}

#[test]
fn minimum_power_is_rounded_and_the_need_still_met() {
    // The relaxation would split 5 kWh as 2.5 kW in two slots; the charger cannot go below
    // 4.14 kW, so the rounded plan charges at the minimum or more, and the need is met.
    let mut v = need("van", 5.0, 0, 2, 11.0);
    v.min_kw = 4.14;
    let mut p = problem(2.5, vec![0.1, 0.1], vec![v]);
    p.site_limit_kw = 11.0;
    let planned = plan(&p).unwrap();
    assert_drivable(&p, &planned.power_kw, true);
    assert_eq!(planned.missed(), 0, "{:?}", planned.power_kw);
}

#[test]
fn running_out_of_budget_falls_back_to_earliest_deadline_first() {
    let p = depot_night(50, 3);
    let planned = plan_with_budget(&p, 10).unwrap();
    assert_eq!(planned.method, Method::EarliestDeadlineFirst);
    assert!(
        planned
            .explanation
            .iter()
            .any(|e| e.contains("earliest-deadline-first"))
    );
    assert_drivable(&p, &planned.power_kw, true);
}

#[test]
fn a_depot_night_is_planned_with_every_deadline_met_and_cheaper_than_first_come() {
    let p = depot_night(120, 11);
    let planned = plan(&p).unwrap();
    assert_eq!(planned.method, Method::Optimal);
    assert_eq!(planned.missed(), 0, "{:?}", planned.explanation);
    assert_drivable(&p, &planned.power_kw, true);
    let relaxed = cost(&p, &optimal(&p, u64::MAX).unwrap());
    assert!(
        planned.cost <= relaxed * 1.01,
        "rounding costs {} over {relaxed}",
        planned.cost
    );
    let first_come = cheapest_slots_first_come(&p);
    assert!(cost(&p, &first_come) > relaxed);
}

#[test]
fn malformed_problems_are_refused_with_the_field_named() {
    let mut p = problem(10.0, vec![0.1, 0.1], vec![need("a", 1.0, 0, 2, 10.0)]);
    p.base_load_kw.pop();
    assert!(matches!(
        plan(&p),
        Err(ProblemError::Horizon { base: 1, price: 2 })
    ));
    let mut p = problem(10.0, vec![0.1], vec![need("a", f64::NAN, 0, 1, 10.0)]);
    let err = plan(&p).unwrap_err().to_string();
    assert!(err.contains("a energy_kwh"), "{err}");
    p.vehicles[0].energy_kwh = 1.0;
    p.vehicles[0].efficiency = 0.0;
    assert!(plan(&p).unwrap_err().to_string().contains("efficiency"));
    p.vehicles[0].efficiency = 1.0;
    p.vehicles[0].circuit = Some(3);
    assert!(plan(&p).unwrap_err().to_string().contains("no circuit"));
}

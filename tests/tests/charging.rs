//! The charging scheduler against an independent LP solver: HiGHS (through SciPy, in the test
//! venv) solves the same instance from the formulation in docs/charging.md.

use std::io::Write;
use std::process::Stdio;

use atlasmesh_charging::instances::depot_night;
use atlasmesh_charging::schedule::{Method, Problem, optimal, plan};
use atlasmesh_tests::python_peer;
use serde_json::Value;

fn highs(problem: &Problem) -> Value {
    let mut child = python_peer("lp_reference.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(problem).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "lp_reference.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_scheduler_finds_the_optimum_highs_finds_and_meets_every_deadline() {
    for (vehicles, seed) in [(40, 5), (120, 6)] {
        let problem = depot_night(vehicles, seed);
        let answer = highs(&problem);
        assert_eq!(answer["status"], "optimal", "{answer}");
        let best = answer["cost"].as_f64().unwrap();
        let relaxed: f64 = optimal(&problem, u64::MAX)
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.iter()
                    .zip(&problem.price)
                    .map(|(p, c)| p * c * problem.slot_hours)
            })
            .sum();
        assert!(
            (relaxed - best).abs() <= 1e-6 * best,
            "{vehicles} vehicles: ours {relaxed}, HiGHS {best}"
        );
        let planned = plan(&problem).unwrap();
        assert_eq!(planned.method, Method::Optimal);
        assert_eq!(planned.missed(), 0, "{:?}", planned.explanation);
        assert!(
            planned.cost <= best * 1.01,
            "rounded plan {} against {best}",
            planned.cost
        );
    }
}

//! Charging scheduler benchmark (issue 7): depot nights of 200 and 500 vehicles over 96
//! 15-minute slots, planned by the depot's scheduler, by an independent LP solve of the same
//! instance (HiGHS through SciPy, `tests/peers/lp_reference.py`), and by an evcc-style planner
//! (each vehicle's cheapest slots, the site limit shared first-come).
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-charging` (the LP
//! peer needs `tests/.venv`, which `tests/run` creates). Prints Markdown for
//! docs/benchmarks.md.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_charging::instances::depot_night;
use atlasmesh_charging::schedule::{
    Method, Plan, Problem, cheapest_slots_first_come, finish, optimal, plan,
};
use atlasmesh_tests::bench::machine;
use atlasmesh_tests::python_peer;
use serde_json::Value;

const ROUNDS: usize = 7;
const SEEDS: [u64; 3] = [1, 2, 3];

fn reference(problem: &Problem) -> Result<Value> {
    let mut child = python_peer("lp_reference.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(&serde_json::to_vec(problem)?)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("lp_reference.py failed");
    }
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    if answer["status"] != "optimal" {
        bail!("HiGHS did not solve the instance: {answer}");
    }
    Ok(answer)
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() -> Result<()> {
    println!("## Charging scheduler benchmarks\n");
    println!("{}\n", machine());
    println!(
        "Instances: `atlasmesh_charging::instances::depot_night(N, seed)`, 96 slots of 15 min from 16:00; 30 % buses (250-660 kWh, 50/100/150 kW DC), 70 % vans (60-120 kWh, 11/22 kW AC, 4.14 kW minimum); a third plugged at 16:00, the rest arriving by 22:00, leaving 04:00-08:00; 10 % priority vehicles; a tariff dear 17-21 h and cheap 23-06 h; the site limit sized so the night runs at about two thirds of it. Solve time: median of {ROUNDS} runs of `schedule::plan` (validation, the exact flow algorithm, rounding to minimum power, outcomes and explanation).\n"
    );
    println!(
        "| vehicles | seed | variables | plan solve (ms) | HiGHS solve (ms) | plan cost | relaxed optimum | HiGHS cost | plan / HiGHS | deadlines met (plan) | evcc-style cost | evcc-style missed departures |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for vehicles in [200usize, 500] {
        for seed in SEEDS {
            let problem = depot_night(vehicles, seed);
            let mut times = Vec::new();
            let mut planned: Option<Plan> = None;
            for _ in 0..ROUNDS {
                let started = Instant::now();
                let p = plan(&problem)?;
                times.push(started.elapsed());
                planned = Some(p);
            }
            let planned = planned.context("a plan")?;
            if planned.method != Method::Optimal {
                bail!("the scheduler fell back: {:?}", planned.explanation);
            }
            let relaxed = finish(
                &problem,
                Method::Optimal,
                optimal(&problem, u64::MAX)?,
                Vec::new(),
            );
            let highs = reference(&problem)?;
            let highs_cost = highs["cost"].as_f64().context("cost")?;
            let evcc = finish(
                &problem,
                Method::CheapestSlotsFirstCome,
                cheapest_slots_first_come(&problem),
                Vec::new(),
            );
            println!(
                "| {vehicles} | {seed} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | **{:.4}** | {} of {} | {:.2} | {} |",
                highs["variables"],
                median(times).as_secs_f64() * 1e3,
                highs["seconds"].as_f64().unwrap_or(0.0) * 1e3,
                planned.cost,
                relaxed.cost,
                highs_cost,
                planned.cost / highs_cost,
                vehicles - planned.missed(),
                vehicles,
                evcc.cost,
                evcc.missed(),
            );
        }
    }
    println!(
        "\nTargets: solve under 1 s for 500 vehicles; cost at most 1.01 times the independent LP's; every feasible deadline met (every instance here is feasible: HiGHS meets every need)."
    );
    Ok(())
}

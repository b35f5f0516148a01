//! Depot nights for tests and benchmarks: reproducible from a seed, shaped by the facts in
//! docs/charging.md (AC vans at 11 or 22 kW, buses on 50 to 150 kW DC chargers, a tariff that
//! is dear in the evening peak and cheap at night).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::schedule::{Need, Problem};

/// A 24-hour horizon of 15-minute slots starting at 16:00, with `vehicles` vehicles arriving
/// through the evening and leaving in the morning, and a site limit that leaves the night
/// about a third of spare capacity, so every deadline can be met but not by everyone at once.
pub fn depot_night(vehicles: usize, seed: u64) -> Problem {
    let mut rng = StdRng::seed_from_u64(seed);
    let slots = 96;
    let slot_hours = 0.25;
    // Slot t starts at 16:00 + t/4 hours.
    let hour = |t: usize| (16.0 + t as f64 * slot_hours) % 24.0;
    let price: Vec<f64> = (0..slots)
        .map(|t| {
            let h = hour(t);
            let base = match h {
                h if (17.0..21.0).contains(&h) => 0.42,
                h if !(6.0..23.0).contains(&h) => 0.14,
                h if (6.0..9.0).contains(&h) => 0.31,
                _ => 0.27,
            };
            // Spot-market wiggle, so slots of one band differ.
            base + rng.random_range(-0.03..0.03)
        })
        .collect();
    let base_load_kw: Vec<f64> = (0..slots)
        .map(|t| {
            let h = hour(t);
            let day = if (7.0..20.0).contains(&h) { 60.0 } else { 25.0 };
            day + rng.random_range(0.0..10.0)
        })
        .collect();
    let mut needs = Vec::with_capacity(vehicles);
    let mut grid_kwh = 0.0f64;
    for i in 0..vehicles {
        let bus = rng.random_bool(0.3);
        let (capacity, max_kw, min_kw, efficiency) = if bus {
            let capacity = rng.random_range(250.0..660.0);
            let charger = [50.0, 100.0, 150.0][rng.random_range(0..3)];
            (capacity, charger, 5.0, 0.95)
        } else {
            let capacity = rng.random_range(60.0..120.0);
            let charger = if rng.random_bool(0.5) { 11.0 } else { 22.0 };
            (capacity, charger, 4.14, 0.92)
        };
        let soc: f64 = rng.random_range(0.1..0.6);
        let target = rng.random_range(0.8..=1.0);
        // Arrive between 16:00 and 22:00 (a third are plugged already), leave 04:00 to 08:00.
        let from_slot = if rng.random_bool(0.33) {
            0
        } else {
            rng.random_range(0..24)
        };
        let departure_slot = rng.random_range(48..64);
        let window_kwh = (departure_slot - from_slot) as f64 * slot_hours * max_kw * efficiency;
        let energy = ((target - soc) * capacity).min(window_kwh * 0.9);
        grid_kwh += energy / efficiency;
        needs.push(Need {
            vehicle: format!("veh-{i:04}"),
            circuit: None,
            energy_kwh: (energy * 10.0).round() / 10.0,
            efficiency,
            from_slot,
            departure_slot,
            max_kw,
            min_kw,
            priority: u8::from(rng.random_bool(0.1)),
        });
    }
    // Spread over the twelve hours most vehicles are in, at about two thirds of the limit.
    let site_limit_kw = (70.0 + grid_kwh / 12.0 / 0.66).round();
    Problem {
        slot_hours,
        site_limit_kw,
        base_load_kw,
        price,
        circuits: Vec::new(),
        vehicles: needs,
    }
}

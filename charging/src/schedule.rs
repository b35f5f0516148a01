//! The depot charging scheduler: a pure function from the depot's state (vehicles, the site
//! limit, a base-load forecast, a time-of-use tariff) to power per vehicle per slot.
//!
//! The optimum is a linear program (Caltech's adacharge formulation, docs/charging.md):
//! minimise the energy bought, priced per slot, subject to each vehicle's power limit while
//! plugged, the site limit (and circuit limits) in every slot, and each vehicle's energy need
//! by its departure. Its structure allows an exact specialised algorithm, which is what runs
//! here: every vehicle pays the same price in a slot, so the LP is a transportation problem
//! whose feasible slot totals form a polymatroid, and Edmonds' greedy is optimal over it:
//! open the slots cheapest first and push as much energy as still fits into each (one
//! incremental max-flow, [`crate::flow`]). Cost is optimal subject to meeting every need that
//! can be met.
//!
//! When not every need can be met, who gets what is settled first, by max-flows as well:
//! priority classes in turn, highest first; within a class every vehicle gets the same
//! fraction of its need (the largest that fits), then the rest of the class's room goes to
//! whoever can still use it. The cheapest-slots greedy then runs on those amounts.
//!
//! If the flow computation runs over its work budget the plan falls back to
//! earliest-deadline-first, which ignores prices. Minimum charging power (IEC 61851's 6 A)
//! makes the true problem mixed-integer: the optimum of the relaxation is rounded per slot and
//! repaired (see [`round_minimums`]), and re-planned at every change (receding horizon), so
//! rounding errors do not accumulate.

use serde::{Deserialize, Serialize};

use crate::flow::{self, Budget, Network, OverBudget};

/// A small tolerance for kW and kWh comparisons.
const EPS: f64 = 1e-6;

/// A vehicle within this much of its need is ready (10 Wh).
const READY_SLACK_KWH: f64 = 0.01;

/// Everything the scheduler needs, for one horizon of equal slots starting now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// Length of a slot in hours (0.25 for the tariff's 15-minute slots).
    pub slot_hours: f64,
    /// The depot's grid connection, kW.
    pub site_limit_kw: f64,
    /// Per slot: the forecast of the depot's other load, kW.
    pub base_load_kw: Vec<f64>,
    /// Per slot: the energy price, per kWh.
    pub price: Vec<f64>,
    /// Circuits (or phases) with their own limits; vehicles name theirs by index.
    #[serde(default)]
    pub circuits: Vec<Circuit>,
    pub vehicles: Vec<Need>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Circuit {
    pub name: String,
    pub limit_kw: f64,
}

/// One plugged (or arriving) vehicle and what it must have by its departure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Need {
    pub vehicle: String,
    /// Index into [`Problem::circuits`].
    #[serde(default)]
    pub circuit: Option<usize>,
    /// Energy the battery must gain by departure, kWh (from SoC, target SoC and capacity, plus
    /// any OTA reserve).
    pub energy_kwh: f64,
    /// Battery energy gained per kWh drawn from the grid.
    pub efficiency: f64,
    /// First slot the vehicle can charge in (0 when plugged now).
    pub from_slot: usize,
    /// The slot it leaves at: charging happens in slots before it.
    pub departure_slot: usize,
    /// The lower of the vehicle's and the charger's limits, kW.
    pub max_kw: f64,
    /// The least power the charger can deliver when on (6 A), kW; 0 when it has no minimum.
    #[serde(default)]
    pub min_kw: f64,
    /// Higher goes first when not everyone can be served.
    #[serde(default)]
    pub priority: u8,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProblemError {
    #[error("slot_hours must be positive, got {0}")]
    SlotLength(f64),
    #[error("base_load_kw has {base} slots and price {price}; they must be equal and non-empty")]
    Horizon { base: usize, price: usize },
    #[error("{field} must be a finite number, at least 0 (got {value})")]
    Value { field: String, value: f64 },
    #[error("vehicle {vehicle}: {reason}")]
    Vehicle { vehicle: String, reason: String },
}

impl Problem {
    pub fn slots(&self) -> usize {
        self.price.len()
    }

    pub fn validate(&self) -> Result<(), ProblemError> {
        if !(self.slot_hours.is_finite() && self.slot_hours > 0.0) {
            return Err(ProblemError::SlotLength(self.slot_hours));
        }
        if self.price.is_empty() || self.base_load_kw.len() != self.price.len() {
            return Err(ProblemError::Horizon {
                base: self.base_load_kw.len(),
                price: self.price.len(),
            });
        }
        let value = |field: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(ProblemError::Value {
                    field: field.into(),
                    value,
                })
            }
        };
        value("site_limit_kw", self.site_limit_kw)?;
        for (t, (b, p)) in self.base_load_kw.iter().zip(&self.price).enumerate() {
            value(&format!("base_load_kw[{t}]"), *b)?;
            if !p.is_finite() {
                return Err(ProblemError::Value {
                    field: format!("price[{t}]"),
                    value: *p,
                });
            }
        }
        for c in &self.circuits {
            value(&format!("circuit {} limit_kw", c.name), c.limit_kw)?;
        }
        for v in &self.vehicles {
            let bad = |reason: String| ProblemError::Vehicle {
                vehicle: v.vehicle.clone(),
                reason,
            };
            value(&format!("{} energy_kwh", v.vehicle), v.energy_kwh)?;
            value(&format!("{} max_kw", v.vehicle), v.max_kw)?;
            value(&format!("{} min_kw", v.vehicle), v.min_kw)?;
            if !(v.efficiency > 0.0 && v.efficiency <= 1.0) {
                return Err(bad(format!(
                    "efficiency must be in (0, 1], got {}",
                    v.efficiency
                )));
            }
            if v.min_kw > v.max_kw {
                return Err(bad(format!(
                    "min_kw {} is above max_kw {}",
                    v.min_kw, v.max_kw
                )));
            }
            if v.circuit.is_some_and(|c| c >= self.circuits.len()) {
                return Err(bad(format!("no circuit {:?}", v.circuit)));
            }
        }
        Ok(())
    }

    /// Slots a vehicle can charge in, clipped to the horizon.
    pub fn window(&self, v: &Need) -> std::ops::Range<usize> {
        let end = v.departure_slot.min(self.slots());
        v.from_slot.min(end)..end
    }

    /// Grid power left for charging in slot `t`.
    pub fn headroom(&self, t: usize) -> f64 {
        (self.site_limit_kw - self.base_load_kw[t]).max(0.0)
    }
}

/// How a plan was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The cost-optimal LP, rounded for minimum power.
    Optimal,
    /// Earliest deadline first, when the solver failed.
    EarliestDeadlineFirst,
    /// Each vehicle on its own in its cheapest slots, the site limit shared first-come (the
    /// evcc-style planner, kept as the benchmark's baseline).
    CheapestSlotsFirstCome,
}

/// What a vehicle gets from a plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub vehicle: String,
    /// Energy the battery gains by departure, kWh.
    pub energy_kwh: f64,
    pub need_kwh: f64,
    /// Ready by departure: the need is met (within 10 Wh).
    pub ready: bool,
    pub shortfall_kwh: f64,
    pub cost: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub method: Method,
    /// Power per vehicle (in the order of the problem) per slot, kW.
    pub power_kw: Vec<Vec<f64>>,
    pub vehicles: Vec<Outcome>,
    /// Energy cost of the whole plan.
    pub cost: f64,
    /// Why the plan is what it is, for the panel.
    pub explanation: Vec<String>,
}

impl Plan {
    /// Charging power in slot `t`, summed over vehicles.
    pub fn total_kw(&self, t: usize) -> f64 {
        self.power_kw.iter().map(|p| p[t]).sum()
    }

    pub fn missed(&self) -> usize {
        self.vehicles.iter().filter(|v| !v.ready).count()
    }
}

/// Plans the horizon: the cost-optimal plan, or earliest-deadline-first if computing it runs
/// over its work budget.
pub fn plan(problem: &Problem) -> Result<Plan, ProblemError> {
    plan_with_budget(problem, flow::DEFAULT_BUDGET)
}

/// [`plan`] with an explicit work budget (edge visits of the flow computations).
pub fn plan_with_budget(problem: &Problem, budget: u64) -> Result<Plan, ProblemError> {
    problem.validate()?;
    Ok(match optimal(problem, budget) {
        Ok(mut power) => {
            round_minimums(problem, &mut power);
            repair(problem, &mut power);
            finish(problem, Method::Optimal, power, Vec::new())
        }
        Err(e) => finish(
            problem,
            Method::EarliestDeadlineFirst,
            earliest_deadline_first(problem),
            vec![format!(
                "the optimiser gave up ({e}); planned earliest-deadline-first, which ignores prices"
            )],
        ),
    })
}

/// The relaxed optimum (no minimum power): power per vehicle per slot, kW.
pub fn optimal(problem: &Problem, budget: u64) -> Result<Vec<Vec<f64>>, OverBudget> {
    let mut graph = Graph::new(problem, &Budget::new(budget));
    let grid_need: Vec<f64> = problem
        .vehicles
        .iter()
        .map(|v| v.energy_kwh / v.efficiency)
        .collect();
    let amounts = graph.amounts(problem, &grid_need)?;
    graph.cheapest_first(problem, &amounts)
}

/// The flow network of a problem: source -> vehicle (its grid energy) -> slot in its window
/// (its power limit), through its circuit's node for that slot if it has one (the circuit
/// limit) -> sink (the slot's headroom). Quantities are grid kWh.
struct Graph {
    network: Network,
    budget: Budget,
    source: usize,
    sink: usize,
    /// Per vehicle: its source edge, and its (slot, edge) pairs.
    vehicle_edges: Vec<(usize, Vec<(usize, usize)>)>,
    /// Per slot: its edge to the sink.
    sink_edges: Vec<usize>,
}

impl Graph {
    fn new(problem: &Problem, budget: &Budget) -> Self {
        let (n, slots, circuits) = (
            problem.vehicles.len(),
            problem.slots(),
            problem.circuits.len(),
        );
        let dt = problem.slot_hours;
        let source = 0;
        let vehicle_node = |v: usize| 1 + v;
        let slot_node = |t: usize| 1 + n + t;
        let circuit_node = |c: usize, t: usize| 1 + n + slots + c * slots + t;
        let sink = 1 + n + slots + circuits * slots;
        let mut network = Network::new(sink + 1, budget.clone());
        let mut sink_edges = Vec::with_capacity(slots);
        for t in 0..slots {
            sink_edges.push(network.add_edge(slot_node(t), sink, 0.0));
        }
        for (c, circuit) in problem.circuits.iter().enumerate() {
            for t in 0..slots {
                network.add_edge(circuit_node(c, t), slot_node(t), circuit.limit_kw * dt);
            }
        }
        let mut vehicle_edges = Vec::with_capacity(n);
        for (v, need) in problem.vehicles.iter().enumerate() {
            let from_source = network.add_edge(source, vehicle_node(v), 0.0);
            let mut own = Vec::new();
            if need.max_kw > 0.0 {
                for t in problem.window(need) {
                    let to = match need.circuit {
                        Some(c) => circuit_node(c, t),
                        None => slot_node(t),
                    };
                    own.push((t, network.add_edge(vehicle_node(v), to, need.max_kw * dt)));
                }
            }
            vehicle_edges.push((from_source, own));
        }
        Self {
            network,
            budget: budget.clone(),
            source,
            sink,
            vehicle_edges,
            sink_edges,
        }
    }

    fn open_all_slots(&mut self, problem: &Problem) {
        for (t, &e) in self.sink_edges.iter().enumerate() {
            self.network
                .set_capacity(e, problem.headroom(t) * problem.slot_hours);
        }
    }

    fn set_amounts(&mut self, amounts: &[f64]) {
        for (&(e, _), &a) in self.vehicle_edges.iter().zip(amounts) {
            self.network.set_capacity(e, a);
        }
    }

    fn delivered(&self, v: usize) -> f64 {
        self.network.flow(self.vehicle_edges[v].0)
    }

    /// How much grid energy each vehicle gets: all of its need when everyone's fits; else by
    /// priority class, equal shares of need within a class, then whatever is left.
    fn amounts(&mut self, problem: &Problem, grid_need: &[f64]) -> Result<Vec<f64>, OverBudget> {
        let total: f64 = grid_need.iter().sum();
        let mut probe = self.clone_empty(problem);
        probe.open_all_slots(problem);
        probe.set_amounts(grid_need);
        let possible = probe.network.augment(probe.source, probe.sink)?;
        if possible >= total - 1e-6 {
            return Ok(grid_need.to_vec());
        }
        let mut classes: Vec<u8> = problem.vehicles.iter().map(|v| v.priority).collect();
        classes.sort_unstable_by(|a, b| b.cmp(a));
        classes.dedup();
        let mut fixed: Vec<Option<f64>> = vec![None; grid_need.len()];
        for class in classes {
            let members: Vec<usize> = (0..grid_need.len())
                .filter(|&v| problem.vehicles[v].priority == class)
                .collect();
            let caps = |share: f64| -> Vec<f64> {
                (0..grid_need.len())
                    .map(|v| match fixed[v] {
                        Some(a) => a,
                        None if problem.vehicles[v].priority == class => share * grid_need[v],
                        None => 0.0,
                    })
                    .collect()
            };
            // The largest equal share of need the class can have on top of those fixed.
            let fits = |share: f64, graph: &Graph| -> Result<(Graph, bool), OverBudget> {
                let amounts = caps(share);
                let mut g = graph.clone_empty(problem);
                g.open_all_slots(problem);
                g.set_amounts(&amounts);
                let flow = g.network.augment(g.source, g.sink)?;
                let wanted: f64 = amounts.iter().sum();
                Ok((g, flow >= wanted - 1e-6))
            };
            let (mut lo, mut hi) = (0.0f64, 1.0f64);
            let (mut best, ok) = fits(1.0, self)?;
            if !ok {
                best = fits(0.0, self)?.0;
                for _ in 0..30 {
                    let mid = (lo + hi) / 2.0;
                    let (g, ok) = fits(mid, self)?;
                    if ok {
                        lo = mid;
                        best = g;
                    } else {
                        hi = mid;
                    }
                }
                // Then the class's room left goes to whoever of it can still use some: flows
                // only grow on augmenting, so no one drops below the equal share.
                for &v in &members {
                    let e = best.vehicle_edges[v].0;
                    best.network.set_capacity(e, grid_need[v]);
                }
                best.network.augment(best.source, best.sink)?;
            }
            for &v in &members {
                fixed[v] = Some(best.delivered(v));
            }
        }
        Ok(fixed.into_iter().map(|a| a.unwrap_or(0.0)).collect())
    }

    /// A copy of this network with no flow and every capacity as built.
    fn clone_empty(&self, problem: &Problem) -> Graph {
        Graph::new(problem, &self.budget)
    }

    /// Edmonds' greedy: opens the slots cheapest first (earlier first among equal prices) and
    /// pushes into each as much of the amounts as still fits.
    fn cheapest_first(
        &mut self,
        problem: &Problem,
        amounts: &[f64],
    ) -> Result<Vec<Vec<f64>>, OverBudget> {
        self.set_amounts(amounts);
        let mut order: Vec<usize> = (0..problem.slots()).collect();
        order.sort_by(|a, b| {
            problem.price[*a]
                .total_cmp(&problem.price[*b])
                .then(a.cmp(b))
        });
        for t in order {
            self.network
                .set_capacity(self.sink_edges[t], problem.headroom(t) * problem.slot_hours);
            self.network.augment(self.source, self.sink)?;
        }
        Ok(self
            .vehicle_edges
            .iter()
            .map(|(_, own)| {
                let mut row = vec![0.0; problem.slots()];
                for &(t, e) in own {
                    row[t] = self.network.flow(e) / problem.slot_hours;
                }
                row
            })
            .collect())
    }
}

/// Makes a relaxed plan drivable: a charger cannot deliver less than its minimum when on. In
/// each slot, vehicles planned below their minimum are raised to it in earliest-deadline
/// order while the site and circuit limits allow, and set to zero otherwise; the energy moved
/// is re-planned at the next change.
pub fn round_minimums(problem: &Problem, power: &mut [Vec<f64>]) {
    // Specks of floating-point noise from the flow are no power at all.
    for x in power.iter_mut().flatten() {
        if *x < EPS {
            *x = 0.0;
        }
    }
    let mut usage = Usage::of(problem, power);
    // Slot by slot (the outer loop) because vehicles compete within a slot.
    #[allow(clippy::needless_range_loop)]
    for t in 0..problem.slots() {
        let mut small: Vec<usize> = (0..problem.vehicles.len())
            .filter(|&v| {
                let x = power[v][t];
                x > EPS && x < problem.vehicles[v].min_kw - EPS
            })
            .collect();
        if small.is_empty() {
            continue;
        }
        small.sort_by_key(|&v| (problem.vehicles[v].departure_slot, v));
        for &v in &small {
            usage.add(t, problem.vehicles[v].circuit, -power[v][t]);
            power[v][t] = 0.0;
        }
        for v in small {
            let need = &problem.vehicles[v];
            if usage.room(problem, t, need.circuit) + EPS >= need.min_kw {
                power[v][t] = need.min_kw;
                usage.add(t, need.circuit, need.min_kw);
            }
        }
    }
}

/// After rounding a vehicle may lack a little of its need: it takes it from the cheapest slots
/// of its window that still have room, higher priority and earlier departures first.
pub fn repair(problem: &Problem, power: &mut [Vec<f64>]) {
    let dt = problem.slot_hours;
    let mut usage = Usage::of(problem, power);
    let mut order: Vec<usize> = (0..problem.vehicles.len()).collect();
    order.sort_by_key(|&v| {
        let need = &problem.vehicles[v];
        (std::cmp::Reverse(need.priority), need.departure_slot, v)
    });
    for v in order {
        let need = &problem.vehicles[v];
        let mut left = need.energy_kwh - power[v].iter().sum::<f64>() * dt * need.efficiency;
        if left <= READY_SLACK_KWH / 2.0 {
            continue;
        }
        let mut slots: Vec<usize> = problem.window(need).collect();
        slots.sort_by(|a, b| {
            problem.price[*a]
                .total_cmp(&problem.price[*b])
                .then(a.cmp(b))
        });
        for t in slots {
            let room = usage
                .room(problem, t, need.circuit)
                .min(need.max_kw - power[v][t]);
            let mut add = (left / (need.efficiency * dt)).min(room);
            if power[v][t] + add < need.min_kw {
                if power[v][t] + room + EPS < need.min_kw {
                    continue;
                }
                add = need.min_kw - power[v][t];
            }
            if add <= EPS {
                continue;
            }
            power[v][t] += add;
            usage.add(t, need.circuit, add);
            left -= add * need.efficiency * dt;
            if left <= READY_SLACK_KWH / 2.0 {
                break;
            }
        }
    }
}

/// Power already planned per slot, on the site and on each circuit.
struct Usage {
    site: Vec<f64>,
    circuits: Vec<Vec<f64>>,
}

impl Usage {
    fn of(problem: &Problem, power: &[Vec<f64>]) -> Self {
        let mut usage = Self {
            site: vec![0.0; problem.slots()],
            circuits: vec![vec![0.0; problem.slots()]; problem.circuits.len()],
        };
        for (need, row) in problem.vehicles.iter().zip(power) {
            for (t, kw) in row.iter().enumerate() {
                usage.add(t, need.circuit, *kw);
            }
        }
        usage
    }

    fn add(&mut self, t: usize, circuit: Option<usize>, kw: f64) {
        self.site[t] += kw;
        if let Some(c) = circuit {
            self.circuits[c][t] += kw;
        }
    }

    /// Power still free in slot `t` for a vehicle on `circuit`.
    fn room(&self, problem: &Problem, t: usize, circuit: Option<usize>) -> f64 {
        let mut room = problem.headroom(t) - self.site[t];
        if let Some(c) = circuit {
            room = room.min(problem.circuits[c].limit_kw - self.circuits[c][t]);
        }
        room.max(0.0)
    }
}

/// Earliest deadline first: slot by slot, the plugged vehicles that still need energy take the
/// headroom in order of priority, then departure, each up to its limit.
pub fn earliest_deadline_first(problem: &Problem) -> Vec<Vec<f64>> {
    let dt = problem.slot_hours;
    let n = problem.vehicles.len();
    let mut power = vec![vec![0.0; problem.slots()]; n];
    let mut usage = Usage::of(problem, &power);
    let mut left: Vec<f64> = problem.vehicles.iter().map(|v| v.energy_kwh).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&v| {
        let need = &problem.vehicles[v];
        (std::cmp::Reverse(need.priority), need.departure_slot, v)
    });
    // Slot by slot (the outer loop) because vehicles compete within a slot.
    #[allow(clippy::needless_range_loop)]
    for t in 0..problem.slots() {
        for &v in &order {
            let need = &problem.vehicles[v];
            if !problem.window(need).contains(&t) || left[v] <= EPS {
                continue;
            }
            let wanted = (left[v] / (need.efficiency * dt)).min(need.max_kw);
            let room = usage.room(problem, t, need.circuit);
            let mut kw = wanted.min(room);
            if kw < need.min_kw {
                // Below the minimum: on at the minimum if it fits, else off.
                kw = if room + EPS >= need.min_kw {
                    need.min_kw
                } else {
                    0.0
                };
            }
            if kw > EPS {
                power[v][t] = kw;
                usage.add(t, need.circuit, kw);
                left[v] -= kw * need.efficiency * dt;
            }
        }
    }
    power
}

/// The evcc-style planner, the benchmark's baseline: each vehicle on its own picks the
/// cheapest slots before its departure (at full power), then vehicles take the site limit
/// first-come, in the order they plugged in, each getting what is left.
pub fn cheapest_slots_first_come(problem: &Problem) -> Vec<Vec<f64>> {
    let dt = problem.slot_hours;
    let mut power = vec![vec![0.0; problem.slots()]; problem.vehicles.len()];
    let mut usage = Usage::of(problem, &power);
    for (v, need) in problem.vehicles.iter().enumerate() {
        let mut slots: Vec<usize> = problem.window(need).collect();
        slots.sort_by(|a, b| {
            problem.price[*a]
                .total_cmp(&problem.price[*b])
                .then(a.cmp(b))
        });
        let mut left = need.energy_kwh;
        for t in slots {
            if left <= EPS {
                break;
            }
            let wanted = (left / (need.efficiency * dt)).min(need.max_kw);
            let kw = wanted.min(usage.room(problem, t, need.circuit));
            if kw >= need.min_kw.max(EPS) {
                power[v][t] = kw;
                usage.add(t, need.circuit, kw);
                left -= kw * need.efficiency * dt;
            }
        }
    }
    power
}

/// Outcomes, cost and an explanation for a set of power rows.
pub fn finish(
    problem: &Problem,
    method: Method,
    power: Vec<Vec<f64>>,
    mut explanation: Vec<String>,
) -> Plan {
    let dt = problem.slot_hours;
    let mut outcomes = Vec::with_capacity(problem.vehicles.len());
    let mut total = 0.0;
    for (need, row) in problem.vehicles.iter().zip(&power) {
        let grid: f64 = row.iter().sum::<f64>() * dt;
        let cost: f64 = row
            .iter()
            .zip(&problem.price)
            .map(|(p, price)| p * dt * price)
            .sum();
        total += cost;
        let energy = grid * need.efficiency;
        let shortfall = (need.energy_kwh - energy).max(0.0);
        outcomes.push(Outcome {
            vehicle: need.vehicle.clone(),
            energy_kwh: energy,
            need_kwh: need.energy_kwh,
            ready: shortfall <= READY_SLACK_KWH,
            shortfall_kwh: if shortfall <= READY_SLACK_KWH {
                0.0
            } else {
                shortfall
            },
            cost,
        });
    }
    // Whether circuit `c` is at its limit in slot `t`.
    let full = |c: usize, t: usize| {
        let used: f64 = problem
            .vehicles
            .iter()
            .zip(&power)
            .filter(|(n, _)| n.circuit == Some(c))
            .map(|(_, row)| row[t])
            .sum();
        used + 0.01 >= problem.circuits[c].limit_kw
    };
    for (need, outcome) in problem.vehicles.iter().zip(&outcomes) {
        if outcome.ready {
            continue;
        }
        let window = problem.window(need);
        let alone = window.len() as f64 * dt * need.max_kw * need.efficiency;
        explanation.push(if alone + READY_SLACK_KWH < need.energy_kwh {
            format!(
                "{} will be {:.1} kWh short: even alone it can take only {:.1} kWh in its {} slots at {:.1} kW",
                need.vehicle,
                outcome.shortfall_kwh,
                alone,
                window.len(),
                need.max_kw
            )
        } else {
            // Its circuit is to blame when it is full in the vehicle's window.
            let limit = match need.circuit {
                Some(c) if window.clone().any(|t| full(c, t)) => {
                    format!("the limit of circuit {}", problem.circuits[c].name)
                }
                _ => "the site limit".to_owned(),
            };
            format!(
                "{} will be {:.1} kWh short: {limit} is shared with vehicles that leave earlier or rank higher",
                need.vehicle, outcome.shortfall_kwh
            )
        });
    }
    for (c, circuit) in problem.circuits.iter().enumerate() {
        let full = (0..problem.slots())
            .filter(|&t| circuit.limit_kw > 0.0 && full(c, t))
            .count();
        if full > 0 {
            explanation.push(format!(
                "circuit {} ({:.1} kW) is at its limit in {full} slots",
                circuit.name, circuit.limit_kw
            ));
        }
    }
    let ready = outcomes.iter().filter(|o| o.ready).count();
    explanation.insert(
        0,
        format!(
            "{ready} of {} vehicles ready by departure; energy cost {total:.2}",
            outcomes.len()
        ),
    );
    Plan {
        method,
        power_kw: power,
        vehicles: outcomes,
        cost: total,
        explanation,
    }
}

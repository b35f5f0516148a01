//! A small max-flow network (Dinic's algorithm) over real capacities, for the scheduler.
//!
//! Hand-written rather than taken from a graph library because the scheduler needs what those
//! do not offer: augmenting an existing flow after raising capacities (a sink edge opened, a
//! source edge widened), which is what makes the cheapest-slots-first greedy one incremental
//! computation instead of a hundred separate ones.

/// Flows below this are zero: capacities are kWh, so this is well under a watt-hour.
const EPS: f64 = 1e-9;

use std::cell::Cell;
use std::rc::Rc;

/// The work a computation may do (edge visits) before it gives up, so a pathological
/// instance falls back to the simple planner instead of stalling the control loop.
pub const DEFAULT_BUDGET: u64 = 200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the flow computation ran over its work budget")]
pub struct OverBudget;

/// Work left for a computation, shared by the networks it builds.
#[derive(Debug, Clone)]
pub struct Budget(Rc<Cell<u64>>);

impl Budget {
    pub fn new(edge_visits: u64) -> Self {
        Self(Rc::new(Cell::new(edge_visits)))
    }

    fn spend(&self, work: u64) -> Result<(), OverBudget> {
        match self.0.get().checked_sub(work) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(OverBudget),
        }
    }
}

/// A directed network with residual capacities. Edge `e` and `e ^ 1` are a pair.
#[derive(Debug)]
pub struct Network {
    adjacency: Vec<Vec<usize>>,
    head: Vec<usize>,
    residual: Vec<f64>,
    capacity: Vec<f64>,
    level: Vec<i32>,
    next: Vec<usize>,
    budget: Budget,
}

impl Network {
    pub fn new(nodes: usize, budget: Budget) -> Self {
        Self {
            adjacency: vec![Vec::new(); nodes],
            head: Vec::new(),
            residual: Vec::new(),
            capacity: Vec::new(),
            level: vec![0; nodes],
            next: vec![0; nodes],
            budget,
        }
    }

    /// Adds an edge `from -> to` with `capacity`; returns its id.
    pub fn add_edge(&mut self, from: usize, to: usize, capacity: f64) -> usize {
        let id = self.head.len();
        self.head.push(to);
        self.residual.push(capacity);
        self.capacity.push(capacity);
        self.adjacency[from].push(id);
        self.head.push(from);
        self.residual.push(0.0);
        self.capacity.push(0.0);
        self.adjacency[to].push(id + 1);
        id
    }

    /// Changes an edge's capacity, keeping its flow (which must still fit).
    pub fn set_capacity(&mut self, edge: usize, capacity: f64) {
        let flow = self.flow(edge);
        debug_assert!(flow <= capacity + EPS);
        self.capacity[edge] = capacity;
        self.residual[edge] = (capacity - flow).max(0.0);
    }

    /// The flow on edge `edge`.
    pub fn flow(&self, edge: usize) -> f64 {
        (self.capacity[edge] - self.residual[edge]).max(0.0)
    }

    /// Augments the current flow to a maximum one from `source` to `sink`; returns the flow
    /// added.
    pub fn augment(&mut self, source: usize, sink: usize) -> Result<f64, OverBudget> {
        let mut added = 0.0;
        while self.levels(source, sink)? {
            self.next.iter_mut().for_each(|n| *n = 0);
            loop {
                let pushed = self.push(source, sink, f64::INFINITY)?;
                if pushed <= EPS {
                    break;
                }
                added += pushed;
            }
        }
        Ok(added)
    }

    fn spend(&self, work: u64) -> Result<(), OverBudget> {
        self.budget.spend(work)
    }

    /// Breadth-first levels over edges with residual capacity; whether the sink is reached.
    fn levels(&mut self, source: usize, sink: usize) -> Result<bool, OverBudget> {
        self.level.iter_mut().for_each(|l| *l = -1);
        self.level[source] = 0;
        let mut queue = std::collections::VecDeque::from([source]);
        let mut work = 0u64;
        while let Some(u) = queue.pop_front() {
            for &e in &self.adjacency[u] {
                work += 1;
                let v = self.head[e];
                if self.residual[e] > EPS && self.level[v] < 0 {
                    self.level[v] = self.level[u] + 1;
                    queue.push_back(v);
                }
            }
        }
        self.spend(work)?;
        Ok(self.level[sink] >= 0)
    }

    /// One blocking-flow path search from `u`, pushing at most `limit`.
    fn push(&mut self, u: usize, sink: usize, limit: f64) -> Result<f64, OverBudget> {
        if u == sink {
            return Ok(limit);
        }
        while self.next[u] < self.adjacency[u].len() {
            self.spend(1)?;
            let e = self.adjacency[u][self.next[u]];
            let v = self.head[e];
            if self.residual[e] > EPS && self.level[v] == self.level[u] + 1 {
                let pushed = self.push(v, sink, limit.min(self.residual[e]))?;
                if pushed > EPS {
                    self.residual[e] -= pushed;
                    self.residual[e ^ 1] += pushed;
                    return Ok(pushed);
                }
            }
            self.next[u] += 1;
        }
        Ok(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_textbook_network_and_an_incremental_sink() {
        // s=0, a=1, b=2, t=3: s->a 3, s->b 2, a->b 1, a->t 2, b->t 3. Max flow 5.
        let mut n = Network::new(4, Budget::new(DEFAULT_BUDGET));
        let sa = n.add_edge(0, 1, 3.0);
        n.add_edge(0, 2, 2.0);
        n.add_edge(1, 2, 1.0);
        let at = n.add_edge(1, 3, 2.0);
        let bt = n.add_edge(2, 3, 0.0);
        assert!((n.augment(0, 3).unwrap() - 2.0).abs() < 1e-12);
        // Opening b->t later adds the rest without undoing what a->t carries.
        n.set_capacity(bt, 3.0);
        assert!((n.augment(0, 3).unwrap() - 3.0).abs() < 1e-12);
        assert!((n.flow(at) - 2.0).abs() < 1e-12);
        assert!((n.flow(sa) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_tiny_budget_is_reported() {
        let mut n = Network::new(3, Budget::new(2));
        n.add_edge(0, 1, 1.0);
        n.add_edge(1, 2, 1.0);
        n.add_edge(0, 2, 1.0);
        assert!(n.augment(0, 2).is_err());
    }
}

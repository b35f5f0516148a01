"""The charging LP of docs/charging.md, solved independently by HiGHS (through SciPy).

Reads a scheduler problem as the depot serialises it (JSON on stdin or in the file named by
the first argument) and prints {"status", "cost", "seconds", "variables", "rows"} as JSON:
the least energy cost at which every vehicle's need is met by its departure, within the site
and circuit limits, ignoring minimum power (the relaxation the depot's scheduler solves
before rounding). Written from the formulation, not from the depot's code.
"""

import json
import sys
import time

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix


def solve(problem):
    dt = problem["slot_hours"]
    price = problem["price"]
    slots = len(price)
    base = problem["base_load_kw"]
    circuits = problem.get("circuits", [])
    cost, upper, columns = [], [], []  # columns: (vehicle, slot, circuit)
    for v, need in enumerate(problem["vehicles"]):
        end = min(need["departure_slot"], slots)
        start = min(need["from_slot"], end)
        for t in range(start, end):
            cost.append(price[t] * dt)
            upper.append(need["max_kw"])
            columns.append((v, t, need.get("circuit")))
    vehicles = len(problem["vehicles"])
    rows, cols, vals, rhs = [], [], [], []
    # Energy: -sum(eff * dt * p) <= -need, one row per vehicle.
    for j, (v, t, _) in enumerate(columns):
        rows.append(v)
        cols.append(j)
        vals.append(-problem["vehicles"][v]["efficiency"] * dt)
    rhs.extend(-need["energy_kwh"] for need in problem["vehicles"])
    # Site: sum over vehicles of p <= limit - base load, one row per slot.
    for j, (v, t, _) in enumerate(columns):
        rows.append(vehicles + t)
        cols.append(j)
        vals.append(1.0)
    rhs.extend(max(problem["site_limit_kw"] - base[t], 0.0) for t in range(slots))
    # Circuits: one row per circuit and slot.
    for j, (v, t, c) in enumerate(columns):
        if c is not None:
            rows.append(vehicles + slots + c * slots + t)
            cols.append(j)
            vals.append(1.0)
    for c in circuits:
        rhs.extend([c["limit_kw"]] * slots)
    a = coo_matrix((vals, (rows, cols)), shape=(len(rhs), len(columns))).tocsr()
    started = time.perf_counter()
    result = linprog(
        np.array(cost),
        A_ub=a,
        b_ub=np.array(rhs),
        bounds=list(zip([0.0] * len(upper), upper)),
        method="highs",
    )
    seconds = time.perf_counter() - started
    return {
        "status": "optimal" if result.status == 0 else result.message,
        "cost": float(result.fun) if result.status == 0 else None,
        "seconds": seconds,
        "variables": len(columns),
        "rows": len(rhs),
    }


def main():
    source = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    print(json.dumps(solve(json.load(source))))


if __name__ == "__main__":
    main()

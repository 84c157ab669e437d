"""Throughput of the code sandbox (lmforge.agent.sandbox) for short math-agent cells.

Measures, on this machine's cores (the reference machine has 2):
  * cold start: Sandbox() to the first result, with the default preloads (numpy, sympy, ...);
  * sequential calls on one trajectory (state kept across turns, no replay);
  * rollout-style batches: T trajectories advance one turn per `run_batch` call;
  * one flat batch of all cells at once;
  * trajectory turnover: open, run 3 cells, close (workers are reused with a fresh namespace);
  * recovery: a segfaulting cell, then the next call (which rebuilds state by replay).

Prints a table and writes bench/results/sandbox_throughput.json.

    python bench/sandbox_throughput.py [--trajectories 8] [--turns 50] [--sequential 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict

from lmforge.agent.sandbox import Sandbox, SandboxConfig

SHORT_CELLS = (
    "x = {i}\nx * 2",
    "import math\nmath.comb(20, {i} % 10)",
    "from fractions import Fraction\nFraction({i}, 7) + Fraction(1, 3)",
    "print(sum(k * k for k in range({i} % 50)))",
)


def short_cell(i: int) -> str:
    return SHORT_CELLS[i % len(SHORT_CELLS)].format(i=i)


def measure_cold_start(config: SandboxConfig) -> float:
    started = time.perf_counter()
    with Sandbox(config) as sandbox:
        result = sandbox.run("cold", "1 + 1")
        assert result.ok, result.output
        return time.perf_counter() - started


def measure_sequential(sandbox: Sandbox, n: int) -> float:
    sandbox.run("seq", "x = 0")  # the worker is bound and warm before timing
    started = time.perf_counter()
    for i in range(n):
        result = sandbox.run("seq", short_cell(i))
        assert result.ok, result.output
    elapsed = time.perf_counter() - started
    sandbox.close("seq")
    return n / elapsed


def measure_rollout_batches(sandbox: Sandbox, trajectories: int, turns: int) -> float:
    ids = [f"roll-{k}" for k in range(trajectories)]
    sandbox.run_batch([(tid, "x = 0") for tid in ids])
    started = time.perf_counter()
    for turn in range(turns):
        results = sandbox.run_batch([(tid, short_cell(turn * trajectories + k)) for k, tid in enumerate(ids)])
        assert all(r.ok for r in results)
    elapsed = time.perf_counter() - started
    for tid in ids:
        sandbox.close(tid)
    return trajectories * turns / elapsed


def measure_flat_batch(sandbox: Sandbox, trajectories: int, turns: int) -> float:
    calls = [(f"flat-{i % trajectories}", short_cell(i)) for i in range(trajectories * turns)]
    sandbox.run_batch([(f"flat-{k}", "x = 0") for k in range(trajectories)])
    started = time.perf_counter()
    results = sandbox.run_batch(calls)
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results)
    for k in range(trajectories):
        sandbox.close(f"flat-{k}")
    return len(calls) / elapsed


def measure_turnover(sandbox: Sandbox, n: int) -> float:
    started = time.perf_counter()
    for k in range(n):
        tid = f"turnover-{k}"
        for turn in range(3):
            assert sandbox.run(tid, short_cell(turn)).ok
        sandbox.close(tid)
    return n / (time.perf_counter() - started)


def measure_recovery(sandbox: Sandbox, repeats: int) -> dict:
    crash_s, restore_s = [], []
    for k in range(repeats):
        tid = f"crash-{k}"
        for turn in range(5):
            sandbox.run(tid, short_cell(turn))
        started = time.perf_counter()
        crashed = sandbox.run(tid, "import ctypes\nctypes.string_at(0)")
        crash_s.append(time.perf_counter() - started)
        assert crashed.error_kind == "crash", crashed.output
        started = time.perf_counter()
        restored = sandbox.run(tid, "x")
        restore_s.append(time.perf_counter() - started)
        assert restored.ok and restored.replayed_cells == 5, restored
        sandbox.close(tid)
    return {"crash_report_s": statistics.median(crash_s), "next_call_with_replay_of_5_s": statistics.median(restore_s)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--turnover", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measure; median and best are reported")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "sandbox_throughput.json"))
    args = parser.parse_args(argv)
    for name in ("trajectories", "turns", "sequential", "turnover", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    cores = os.cpu_count() or 1
    config = SandboxConfig(num_workers=max(args.trajectories, 2), max_parallel=min(cores, max(args.trajectories, 2)))
    # key -> (label, unit, higher_is_better, samples)
    measures: dict[str, tuple[str, str, bool, list[float]]] = {
        "cold_start_s": ("cold start to first result", "s", False, []),
        "sequential_calls_per_s": ("sequential, 1 trajectory", "calls/s", True, []),
        "rollout_calls_per_s": (f"rollout batches, {args.trajectories} traj x {args.turns} turns", "calls/s", True, []),
        "flat_batch_calls_per_s": (f"one flat batch of {args.trajectories * args.turns} cells", "calls/s", True, []),
        "turnover_traj_per_s": ("trajectory turnover, 3 cells + close", "traj/s", True, []),
        "crash_report_s": ("segfaulting cell reported", "s", False, []),
        "restore_after_crash_s": ("next call after crash (replays 5 cells)", "s", False, []),
    }
    stats = {}
    for _ in range(args.repeats):
        measures["cold_start_s"][3].append(measure_cold_start(config))
        with Sandbox(config) as sandbox:
            measures["sequential_calls_per_s"][3].append(measure_sequential(sandbox, args.sequential))
            measures["rollout_calls_per_s"][3].append(measure_rollout_batches(sandbox, args.trajectories, args.turns))
            measures["flat_batch_calls_per_s"][3].append(measure_flat_batch(sandbox, args.trajectories, args.turns))
            measures["turnover_traj_per_s"][3].append(measure_turnover(sandbox, args.turnover))
            recovery = measure_recovery(sandbox, 3)
            measures["crash_report_s"][3].append(recovery["crash_report_s"])
            measures["restore_after_crash_s"][3].append(recovery["next_call_with_replay_of_5_s"])
            stats = sandbox.stats

    results = {}
    for key, (label, unit, higher_is_better, samples) in measures.items():
        best = max(samples) if higher_is_better else min(samples)
        results[key] = {"label": label, "unit": unit, "median": statistics.median(samples), "best": best,
                        "samples": samples}
    width = max(len(f"{r['label']} ({r['unit']})") for r in results.values())
    print(f"sandbox throughput: {cores} cores, max_parallel={config.parallel}, Python {platform.python_version()}, "
          f"{args.repeats} repeats")
    print(f"{'measure'.ljust(width)}    median      best")
    print(f"{'-' * width}  --------  --------")
    for result in results.values():
        name = f"{result['label']} ({result['unit']})"
        fmt = "{:8.3f}" if result["unit"] == "s" else "{:8.0f}"
        print(f"{name.ljust(width)}  {fmt.format(result['median'])}  {fmt.format(result['best'])}")

    report = {
        "machine": {"cpu_count": cores, "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min": os.getloadavg()[0]},
        "config": asdict(config),
        "args": vars(args),
        "results": results,
        "sandbox_stats": stats,
        "cells": list(SHORT_CELLS),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    temporary = args.out + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    os.replace(temporary, args.out)  # never a half-written result file
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""Interleaved A/B of lmforge's CCE between source trees, on one GPU, in one call.

One run of a tree's own ``bench/cce_gpu.py`` in a fresh process differs from the next by up to ~1.5 ms at Gemma
2's shape (the same default path measured 43.15 and 41.75 ms in two calls of 2026-12-07), as much as the
changes being compared. This runs each tree (a checkout or a ``git archive`` of its ``src`` and ``bench``) in
rounds whose order alternates (A B, B A, A B, ...: a drift of the GPU's clocks then shifts every tree alike),
each run a fresh process of that tree's script, until the rounds or the time budget run out, and reports per
tree the median and the spread of every run's medians.

    git archive 534e617 src bench | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    python bench/cce_ab.py --tree new=. --tree old=/tmp/old --rounds 3 --budget-s 400 --out ab.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("fwd_ms", "fwd_bwd_ms", "fwd_mb", "fwd_bwd_mb")


def run_order(names: list[str], rounds: int) -> list[str]:
    """The trees' runs, round by round, every other round reversed."""
    order = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


def summarise(runs: list[dict]) -> list[dict]:
    """Per (tree, shape, regime, impl): the runs' count and, per metric, the median, min and max of the runs'
    values (``runs``: {"tree": name, "rows": cce_gpu.py's result rows})."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault((run["tree"], row["shape"], row["regime"], row["impl"]), []).append(row)
    out = []
    for (tree, shape, regime, impl), rows in groups.items():
        entry = dict(tree=tree, shape=shape, regime=regime, impl=impl, runs=len(rows))
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if values:
                entry[metric] = dict(median=statistics.median(values), min=min(values), max=max(values))
        out.append(entry)
    return out


def run_tree(path: Path, args, out: Path) -> float:
    """One run of the tree's bench/cce_gpu.py in a fresh process (its own src first on the path); seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(path / "src"),
                                                                    os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "bench/cce_gpu.py", "--shapes", *args.shapes, "--regimes", *args.regimes, "--impls",
           *args.impls, "--repeats", str(args.repeats), "--out", str(out), "--run-dir", str(out.with_suffix(""))]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=path, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH, two or more")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no run that the slowest run so far would carry past this many seconds")
    ap.add_argument("--shapes", nargs="+", default=["gemma2-2b"])
    ap.add_argument("--regimes", nargs="+", default=["calibrated"])
    ap.add_argument("--impls", nargs="+", default=["lmforge"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    trees = {}
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "bench" / "cce_gpu.py").is_file():
            ap.error(f"--tree wants NAME=PATH to a tree with bench/cce_gpu.py, got {spec!r}")
        trees[name] = Path(path).resolve()
    t0, slowest, runs = time.perf_counter(), 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(run_order(list(trees), args.rounds)):
            if time.perf_counter() - t0 + slowest > args.budget_s:
                print(f"budget: stopped before run {i + 1} ({name})", file=sys.stderr)
                break
            out = Path(tmp) / f"{i}.json"
            slowest = max(slowest, run_tree(trees[name], args, out))
            result = json.loads(out.read_text())
            runs.append(dict(tree=name, run=i, device=result.get("device"), rows=result["rows"]))
            first = result["rows"][0]
            print(f"run {i + 1} {name}: {first['impl']} fwd+bwd {first['fwd_bwd_ms']:.2f} ms", flush=True)
    summary = summarise(runs)
    for entry in summary:
        cells = ", ".join(f"{m} {entry[m]['median']:.2f} [{entry[m]['min']:.2f}, {entry[m]['max']:.2f}]"
                          for m in METRICS if m in entry)
        print(f"{entry['tree']} {entry['shape']}/{entry['regime']} {entry['impl']} x{entry['runs']}: {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(trees={k: str(v) for k, v in trees.items()}, runs=runs,
                                                  summary=summary), indent=1))


if __name__ == "__main__":
    main()

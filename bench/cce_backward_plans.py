"""The GEMM backward under forced workspace plans (GPU): per (rows per chunk, piece columns), the event-timed
forward+backward, the same behind a busy GPU, the summed kernel time of one profiled step, the number of
kernels and the allocator's peak beyond the inputs. Shows where smaller plans stop paying (the GPU waiting
for the host's launches).

    python bench/cce_backward_plans.py --shape gemma2-2b --regime calibrated --filter-eps auto \
        --plans 8192x4096 4096x4096 4096x2048 2048x4096 [--out bench/results/....json]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lmforge.cce import gemm_impl, linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import _rel, cuda_event_times, float64_reference, parse_shape  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402


def parse_plan(text: str):
    if text == "default":
        return None
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


@contextlib.contextmanager
def forced(plan):
    """gemm_impl.backward under ``plan`` (rows, columns), or its default plan for ``None``. A set budget sends
    every order and size to backward_plan, which then returns the forced plan."""
    if plan is None:
        yield
        return
    real_plan, budget = gemm_impl.backward_plan, os.environ.get("LMFORGE_CCE_BWD_MB")
    gemm_impl.backward_plan = lambda n, d, v, cols, **kw: (min(plan[0], n), min(plan[1], cols))
    os.environ["LMFORGE_CCE_BWD_MB"] = "1"
    try:
        yield
    finally:
        gemm_impl.backward_plan = real_plan
        if budget is None:
            os.environ.pop("LMFORGE_CCE_BWD_MB", None)
        else:
            os.environ["LMFORGE_CCE_BWD_MB"] = budget


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--regime", default="calibrated")
    ap.add_argument("--real-path", default=".benchdata/real.safetensors")
    ap.add_argument("--filter-eps", default="auto", help="auto, fast, none or a number")
    ap.add_argument("--plans", nargs="+", default=["default", "8192x4096", "4096x4096", "4096x2048", "2048x4096"],
                    help="ROWSxCOLUMNS (rows per chunk x columns per piece) or 'default'")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--errors", action="store_true", help="also dE's and dC's relative errors against float64")
    ap.add_argument("--inputs-cache", help="a .pt file: the inputs are read from it if present, else written to "
                    "it (runs of two code versions on the same inputs without generating them twice)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    eps = args.filter_eps if args.filter_eps in ("auto", "fast") else None if args.filter_eps == "none" \
        else float(args.filter_eps)
    n, d, v = parse_shape(args.shape)
    if args.inputs_cache and Path(args.inputs_cache).exists():
        e, c, t = (x.cuda() for x in torch.load(args.inputs_cache))
    else:
        e, c, t = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device="cuda", real_path=args.real_path)
        if args.inputs_cache:
            torch.save([x.cpu() for x in (e, c, t)], args.inputs_cache)
    ref = float64_reference(e, c, t) if args.errors else None
    e.requires_grad_(True)
    c.requires_grad_(True)

    def step():
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, filter_eps=eps).backward()

    rows_out = []
    for text in args.plans:
        with forced(parse_plan(text)):
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            ms = statistics.median(cuda_event_times(step, args.repeats))
            busy_ms = statistics.median(cuda_event_times(step, args.repeats, busy_cycles=int(1.5e8)))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernel_ms = sum(ev.self_device_time_total for ev in events) / 1e3
            kernels = sum(ev.count for ev in events if ev.self_device_time_total > 0)
            e.grad = c.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        row = dict(plan=text, ms=ms, busy_ms=busy_ms, kernel_ms=kernel_ms, kernels=kernels, peak_mib=peak)
        if ref is not None:
            row.update(de_err=_rel(e.grad, ref[1]), dc_err=_rel(c.grad, ref[2]))
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        result = dict(shape=args.shape, regime=args.regime, filter_eps=args.filter_eps,
                      device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows_out)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

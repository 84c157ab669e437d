"""Where the time goes in one forward+backward (or forward) of lmforge's CCE (GPU): CUDA time per kernel name.

    python bench/cce_profile.py --shape gemma2-2b --regime calibrated [--filter-eps auto] [--forward]
        [--event-timing] [--trace] [--syncs] [--host]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from lmforge.cce import linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import cuda_event_times, parse_shape  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--regime", default="calibrated")
    ap.add_argument("--real-path", default=".benchdata/real.safetensors")
    ap.add_argument("--filter-eps", help="profile with this gradient-filter budget: a number, auto or fast "
                                         "(default: exact)")
    ap.add_argument("--forward", action="store_true", help="profile the forward alone, without autograd")
    ap.add_argument("--event-timing", action="store_true",
                    help="also time the step with CUDA events as bench/cce_gpu.py does, once plainly and once with "
                         "the GPU kept busy before the start event (hides the host's enqueueing of the call)")
    ap.add_argument("--trace", action="store_true",
                    help="also trace 5 plainly event-timed steps and split each into GPU idle before its longest "
                         "kernel, that kernel's duration and the rest (where an event-timed step's time goes)")
    ap.add_argument("--syncs", action="store_true",
                    help="also list every host synchronisation torch reports in one step "
                         "(torch.cuda.set_sync_debug_mode): a sync the design does not expect leaves the GPU idle")
    ap.add_argument("--host", action="store_true",
                    help="also profile the host (cProfile) over steps enqueued behind a busy GPU (20 forwards or 3 "
                         "forward+backward steps): the Python and launch work of a call, by function")
    args = ap.parse_args()
    eps = args.filter_eps if args.filter_eps in (None, "auto", "fast") else float(args.filter_eps)
    n, d, v = parse_shape(args.shape)
    e, c, t = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device="cuda", real_path=args.real_path)
    e.requires_grad_(True)
    c.requires_grad_(True)

    def step():
        if args.forward:
            with torch.no_grad():
                linear_cross_entropy(e, c, t, filter_eps=eps)
            return
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, filter_eps=eps).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.event_timing:
        for busy in (False, True):
            print(f"event-timed, GPU busy before start={busy}: {event_timed(step, busy):.2f} ms (median of 10)")
    if args.syncs:
        for where, count in synchronising_calls(step).items():
            print(f"host sync x{count}: {where}")
    if args.host:  # a forward+backward step queues ~230 launches: 3 fit the launch queue, 20 would block
        host_profile(step, repeats=20 if args.forward else 3)
    if args.trace:
        for row in traced_steps(step):
            print("traced step:", json.dumps(row))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"{args.shape} / {args.regime} / filter_eps {args.filter_eps}" + (" / forward" if args.forward else ""),
          flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def synchronising_calls(step) -> dict[str, int]:
    """Where one call of ``step`` synchronises the host with the GPU, as torch reports it with
    ``set_sync_debug_mode("warn")`` (reads such as ``.item()``, ``.tolist()``, ``nonzero``; not the allocator's
    own waits): {"file:line: message": count}, in order of first occurrence. The filtered backward is meant
    to read its row counts once per step."""
    import warnings

    found: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        text = str(w.message)
        # torch's reports read "called a synchronizing CUDA operation"; the mode's own notice ("Synchronization
        # debug mode is a prototype feature ...") is no sync
        if "called a synchronizing" not in text:
            continue
        key = f"{Path(w.filename).name}:{w.lineno}: {text.splitlines()[0][:80]}"
        found[key] = found.get(key, 0) + 1
    return found


def host_profile(step, repeats: int = 20, rows: int = 25):
    """Host milliseconds per step, and cProfile's functions by own time, over ``repeats`` steps queued behind
    ~0.5 s of GPU spinning (no step waits for the GPU, so this is the Python and launch work alone; a step that
    synchronises shows up as a long wait, and so do more launches than CUDA's queue holds, about a thousand)."""
    import cProfile
    import pstats
    import time

    torch.cuda._sleep(1_000_000_000)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    plain_ms = (time.perf_counter() - t0) * 1e3 / repeats
    torch.cuda.synchronize()
    print(f"host time per step behind a busy GPU: {plain_ms:.3f} ms ({repeats} steps)")
    torch.cuda._sleep(1_000_000_000)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(repeats):
        step()
    prof.disable()
    host_ms = (time.perf_counter() - t0) * 1e3 / repeats
    torch.cuda.synchronize()
    print(f"the same under cProfile: {host_ms:.3f} ms")
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)
    pstats.Stats(prof).sort_stats("cumtime").print_stats(rows)


def event_timed(step, busy: bool, repeats: int = 10) -> float:
    """Median CUDA-event ms of ``step`` as bench/cce_gpu.py times it; ``busy``: behind ~50 ms of GPU spinning
    before each start event (the step is enqueued before it runs)."""
    return statistics.median(cuda_event_times(step, repeats, busy_cycles=100_000_000 if busy else 0))


def traced_steps(step, repeats: int = 5) -> list[dict]:
    """Event-timed steps under the profiler, each split by :func:`step_timeline`."""
    import tempfile

    def marked_step():
        with record_function("traced_step"):
            step()

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        elapsed = cuda_event_times(marked_step, repeats)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    rows = step_timeline(events, "traced_step")
    for row, ms in zip(rows, elapsed):
        row["event_ms"] = round(ms, 3)
    return rows


def step_timeline(events: list[dict], marker: str, gaps: int = 4) -> list[dict]:
    """Per host-side ``marker`` span of a chrome trace: when its first and its longest GPU kernel started
    after the span began (ms: GPU idle that host enqueueing explains), the longest kernel's duration (a kernel
    slower than when measured alone points at clocks), the GPU span from first kernel start to last end and
    the kernels' summed durations (span minus sum: the GPU idle between kernels, e.g. waiting for launches),
    and ``idle_gaps``: the ``gaps`` longest stretches (>= 0.05 ms) with no kernel running, each with where it
    starts in the span, the kernels on either side and the host-side op that launched the one after it."""
    spans = sorted((e for e in events if e.get("ph") == "X" and e.get("name") == marker
                    and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launcher = _launchers(events)
    rows = []
    for i, span in enumerate(spans):
        t0 = span["ts"]
        t1 = spans[i + 1]["ts"] if i + 1 < len(spans) else float("inf")
        mine = [k for k in kernels if t0 <= k["ts"] < t1]
        if not mine:
            continue
        main = max(mine, key=lambda k: k["dur"])
        rows.append(dict(first_kernel_after_ms=round((mine[0]["ts"] - t0) / 1e3, 3),
                         main_kernel=main["name"][:60], main_start_after_ms=round((main["ts"] - t0) / 1e3, 3),
                         main_ms=round(main["dur"] / 1e3, 3), kernels=len(mine),
                         kernel_ms=round(sum(k["dur"] for k in mine) / 1e3, 3),
                         gpu_span_ms=round((max(k["ts"] + k["dur"] for k in mine) - mine[0]["ts"]) / 1e3, 3),
                         idle_gaps=_idle_gaps(mine, t0, launcher, gaps)))
    return rows


def _launchers(events: list[dict]) -> dict:
    """Kernel correlation id -> name of the innermost host op (an aten op or a ``record_function`` range, same
    thread) open when the runtime or driver call that launched it was made (a Triton launch outside any aten
    op names the enclosing range): one sweep per thread with a stack of the open ops."""
    launches = ("cuda_runtime", "cuda_driver")
    per_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", *launches):
            per_thread.setdefault(e.get("tid"), []).append(e)
    out = {}
    for mine in per_thread.values():
        # by start; at equal starts the longer (outer) op first, an op before a runtime call it encloses
        mine.sort(key=lambda e: (e["ts"], -e["dur"], e["cat"] in launches))
        stack = []
        for e in mine:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < e["ts"]:
                stack.pop()
            if e["cat"] not in launches:
                stack.append(e)
            elif stack and e.get("args", {}).get("correlation") is not None:
                out[e["args"]["correlation"]] = stack[-1]["name"]
    return out


def _idle_gaps(kernels: list[dict], t0: float, launcher: dict, gaps: int) -> list[dict]:
    """The longest stretches between ``kernels`` (sorted by start) in which none runs."""
    found, busy_until, last = [], kernels[0]["ts"] + kernels[0]["dur"], kernels[0]
    for k in kernels[1:]:
        if k["ts"] - busy_until >= 50:  # microseconds
            found.append(dict(ms=round((k["ts"] - busy_until) / 1e3, 3), at_ms=round((busy_until - t0) / 1e3, 3),
                              after=last["name"][:40], before=k["name"][:40],
                              launched_by=launcher.get(k.get("args", {}).get("correlation"), "?")))
        if k["ts"] + k["dur"] > busy_until:
            busy_until, last = k["ts"] + k["dur"], k
    return sorted(found, key=lambda g: -g["ms"])[:gaps]


def memory_probe(n=8192, d=2304, v=256000):
    """Peak extra memory of the forward's pieces, to find its workspace."""
    from lmforge.cce import gemm_impl, order, triton_impl

    e = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    t = torch.randint(0, v, (n,), device="cuda")
    for name, fn in (("vocab_order", lambda: triton_impl.vocab_order(e, c, None)),
                     ("gemm slab order", lambda: order.vocab_order(e, c, None, gemm_impl.slab_columns(n, v))),
                     ("forward_stats", lambda: triton_impl.forward_stats(e, c, None, t)),
                     ("full forward", lambda: linear_cross_entropy(e.requires_grad_(), c, t))):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        print(f"{name}: peak extra {(torch.cuda.max_memory_allocated() - base) / 2**20:.2f} MiB")
        del out


if __name__ == "__main__":
    if "--memory" in sys.argv:
        memory_probe()
    else:
        main()

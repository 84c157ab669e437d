"""Where the time goes in one forward+backward (or forward) of lmforge's CCE (GPU): CUDA time per kernel name.

    python bench/cce_profile.py --shape gemma2-2b --regime calibrated [--filter-eps auto] [--forward] [--event-timing]
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lmforge.cce import linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import parse_shape  # noqa: E402
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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"{args.shape} / {args.regime} / filter_eps {args.filter_eps}" + (" / forward" if args.forward else ""),
          flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def event_timed(step, busy: bool, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        if busy:
            torch.cuda._sleep(100_000_000)  # ~50 ms of spinning: the call is enqueued before the GPU reaches it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def memory_probe(n=8192, d=2304, v=256000):
    """Peak extra memory of the forward's pieces, to find its workspace."""
    from lmforge.cce import triton_impl

    e = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    t = torch.randint(0, v, (n,), device="cuda")
    for name, fn in (("vocab_order", lambda: triton_impl.vocab_order(e, c, None)),
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

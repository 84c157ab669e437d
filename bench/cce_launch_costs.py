"""Host cost of each operation in one step of the GEMM backward's loop (GPU): microseconds of host time per call,
measured while the GPU is kept busy so that no call waits for it, and the GPU time per call. Tells which of
a step's launches make the sorted order host-bound when its chunks get small (docs/cce-tuning.md, v3.9).

    python bench/cce_launch_costs.py --shape gemma2-2b --rows 2048 --cols 4096 [--calls 100] [--out FILE]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import gemm_impl  # noqa: E402
from lmforge.cce.benchmark import parse_shape  # noqa: E402


def host_and_gpu_us(fn, calls: int) -> tuple[float, float]:
    """(host us, GPU us) per call of ``fn``: the host's time to issue ``calls`` calls behind a long sleep
    kernel (nothing waits for the GPU), and the event-timed GPU time of the same calls run back to back."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(4e8))  # ~0.2 s of GPU time: every call below is queued, none waits
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, vocab = parse_shape(args.shape)
    k, cols = args.rows, args.cols
    dev = torch.device("cuda")
    bf = dict(dtype=torch.bfloat16, device=dev)
    e = torch.randn(n, d, **bf) * 0.1
    c = torch.randn(vocab, d, **bf) * 0.1
    perm = torch.randperm(vocab, device=dev).to(torch.int32)
    perm_long = perm.long()
    dc = torch.empty_like(c)
    e_chunk = e[:k].contiguous()
    c_buffer = torch.empty(cols, d, **bf)
    dz = torch.randn(k, cols, **bf) * 1e-3
    acc = torch.zeros(k, d, dtype=torch.float32, device=dev)
    targets = torch.randint(0, vocab, (n,), device=dev)
    lse = torch.full((n,), 12.0, device=dev)
    vectors = (lse, lse, torch.full_like(lse, 1 / n), torch.full_like(lse, -1 / n), lse, lse)
    grads = dict(HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUM=False, HAS_G_MU=False)
    start = 8192
    ops = {
        "gather classifier rows (index_select, int32 index)":
            lambda: torch.index_select(c, 0, perm[start:start + cols], out=c_buffer),
        "perm slice .long()": lambda: perm[start:start + cols].long(),
        "dC rows scattered back (index_copy_)":
            lambda: dc.index_copy_(0, perm_long[start:start + cols], c_buffer),
        "dC rows scattered back (index_put_, int32 index)":
            lambda: dc.index_put_((perm[start:start + cols],), c_buffer),
        "dC rows added back (index_add_, int32 index)":
            lambda: dc.index_add_(0, perm[start:start + cols], c_buffer),
        "dC rows scattered back (scatter_rows, v3.10)":
            lambda: gemm_impl.scatter_rows(dc, perm[start:start + cols], c_buffer, add=False),
        "dC rows added back (scatter_rows add, v3.10)":
            lambda: gemm_impl.scatter_rows(dc, perm[start:start + cols], c_buffer, add=True),
        "dE += dz C (addmm, fp32 out)":
            lambda: torch.addmm(acc, dz, c_buffer, out_dtype=torch.float32, out=acc),
        "dC = dz^T E (mm)": lambda: torch.mm(dz.t(), e_chunk, out=c_buffer),
        "dC += dz^T E (addmm_)": lambda: c_buffer.addmm_(dz.t(), e_chunk),
        "dC rows gathered (index_select dc)":
            lambda: torch.index_select(dc, 0, perm[start:start + cols], out=c_buffer),
        "views of one step (5 slices)": lambda: (dz[:k], c_buffer[:cols], perm[start:start + cols],
                                                 e_chunk[:k], acc[:k]),
    }
    if gemm_impl.tma_applies(e, c, backward=True):
        launch = gemm_impl._logit_grad_tma(e_chunk, c_buffer, None, targets[:k], tuple(v[:k] for v in vectors),
                                           None, grads)
        ops["dz kernel (Triton launch, TMA)"] = lambda: launch(k, 0, cols, start, dz)
    rows = []
    for name, fn in ops.items():
        host, gpu = host_and_gpu_us(fn, args.calls)
        rows.append(dict(op=name, host_us=round(host, 1), gpu_us=round(gpu, 1)))
        print(f"{name:55s} host {host:7.1f} us  gpu {gpu:8.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, rows_per_chunk=k, cols=cols,
                                                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                  ops=rows), indent=1))


if __name__ == "__main__":
    main()

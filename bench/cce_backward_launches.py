"""Count what one filtered GEMM backward issues, on the CPU under the Triton interpreter: torch operations
called from lmforge's code (not from inside other operations) and Triton launches, by name. Run from
another tree's root (a ``git archive`` of its ``src`` and ``bench``) to compare versions: a step that got
slower on the GPU with the same kernels might be issuing more work from the host.

    TRITON_INTERPRET=1 python bench/cce_backward_launches.py [--shape 256x32x3000] [--slab-cols 128]
"""

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lmforge.cce import gemm_impl, linear_cross_entropy  # noqa: E402


def count_backward(n: int, d: int, v: int, slab_cols: int, filter_eps: float = 2.0 ** -6, seed: int = 0) -> dict:
    """{"aten": {op: calls}, "triton": {kernel: launches}} of one filtered backward (bf16, GEMM impl) on the
    CPU, after two warm-up steps; filtering forced on at this small hidden size, never falling back to exact."""
    import triton.runtime.interpreter as interpreter

    os.environ["LMFORGE_CCE_SLAB_MB"] = str(slab_cols * n * 4 / 2**20)
    saved = (gemm_impl.FILTER_MIN_D, gemm_impl.DENSE_SHARE, gemm_impl.SMALL_GRAD_BYTES)
    gemm_impl.FILTER_MIN_D, gemm_impl.DENSE_SHARE, gemm_impl.SMALL_GRAD_BYTES = 1, 1.01, 0
    g = torch.Generator().manual_seed(seed)
    e = (2 * torch.randn(n, d, generator=g)).bfloat16().requires_grad_()
    c = (2 * torch.randn(v, d, generator=g)).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    launches = collections.Counter()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[getattr(self.fn, "__name__", str(self.fn))] += 1
        return run(self, *args, **kwargs)

    try:
        for _ in range(2):
            e.grad = c.grad = None
            linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps).backward()
        e.grad = c.grad = None
        loss = linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps)
        interpreter.InterpretedFunction.run = counted
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss.backward()
    finally:
        interpreter.InterpretedFunction.run = run
        gemm_impl.FILTER_MIN_D, gemm_impl.DENSE_SHARE, gemm_impl.SMALL_GRAD_BYTES = saved
    aten = collections.Counter()
    for event in prof.events():  # operations whose caller is Python, not another operation
        if event.name.startswith("aten::") and (event.cpu_parent is None or
                                                not event.cpu_parent.name.startswith("aten::")):
            aten[event.name] += 1
    # The interpreter's own tensor handling (set_, empty, copy_, ...) is not what a GPU run would issue
    interpreted = {"aten::set_", "aten::empty", "aten::new_empty", "aten::copy_", "aten::slice", "aten::to",
                   "aten::view", "aten::detach", "aten::lift_fresh"}
    return dict(aten=dict(sorted((k, x) for k, x in aten.items() if k not in interpreted)),
                triton=dict(sorted(launches.items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256x32x3000", help="tokens x hidden x vocab")
    ap.add_argument("--slab-cols", type=int, default=128)
    args = ap.parse_args()
    n, d, v = (int(x) for x in args.shape.split("x"))
    print(json.dumps(count_backward(n, d, v, args.slab_cols), indent=1))


if __name__ == "__main__":
    main()

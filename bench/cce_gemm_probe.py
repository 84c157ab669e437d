"""How fast cuBLAS writes one logit slab, by output dtype, orientation and slab width (GPU).

The GEMM path's forward is one (N x S) = E C[slab]^T product per slab, written in float32 (torch.mm with
out_dtype); its backward recomputes it. This probe times that product against the same product written
in the inputs' dtype, the transposed orientation (C[slab] E^T, S x N) and the whole N x V product in one
call (what torch.compile's logits cost), and prints TFLOP/s per variant as JSON lines.

    python bench/cce_gemm_probe.py --shape 8192 2304 256000 --cols 2048 4096 8192
"""

import argparse
import json
from pathlib import Path

import torch
import triton


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[8192, 2304, 256000])
    ap.add_argument("--cols", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = args.shape
    e = torch.randn(n, d, device="cuda").bfloat16()
    c = (torch.randn(v, d, device="cuda") / d ** 0.5).bfloat16()
    rows = []

    def record(variant, cols, fn):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        rows.append(dict(variant=variant, cols=cols, ms=ms, tflops=2 * n * cols * d / ms / 1e9))
        print(json.dumps(rows[-1]), flush=True)

    for cols in args.cols:
        c_slab = c[:cols]
        z32 = torch.empty(n, cols, device="cuda")
        z16 = torch.empty(n, cols, device="cuda", dtype=e.dtype)
        zt32 = torch.empty(cols, n, device="cuda")
        record("fp32_out", cols, lambda: torch.mm(e, c_slab.t(), out_dtype=torch.float32, out=z32))
        record("bf16_out", cols, lambda: torch.mm(e, c_slab.t(), out=z16))
        record("fp32_out_transposed", cols, lambda: torch.mm(c_slab, e.t(), out_dtype=torch.float32, out=zt32))
    full = torch.empty(n, v, device="cuda", dtype=e.dtype)
    record("bf16_out_full_vocab", v, lambda: torch.mm(e, c.t(), out=full))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()

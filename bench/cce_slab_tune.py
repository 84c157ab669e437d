"""Block shapes of the GEMM path's two memory-bound slab kernels, timed on one fp32 logit slab (GPU).

Each configuration (rows per program, columns per step, warps, pipeline stages) is timed with
triton.testing.do_bench on an N x S float32 slab (the default 128 MiB: 8192 x 4096): the statistics pass
reads 4 N S bytes, the gradient pass reads 4 N S and writes 2 N S (bf16 dz in place). Prints the achieved
bandwidth per configuration, best first, and writes them as JSON.

    python bench/cce_slab_tune.py --out slab_tune.json
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402

from lmforge.cce.kernels.slab import slab_grad_kernel, slab_stats_kernel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--out")
    args = ap.parse_args()
    n, cols = args.n, args.cols
    dev = "cuda"
    z = torch.randn(n, cols, device=dev) * 3
    work = torch.empty_like(z)
    targets = torch.randint(0, args.vocab, (n,), device=dev)
    f32 = dict(device=dev, dtype=torch.float32)
    m, s, w, zsum, tgt = (torch.zeros(n, **f32) for _ in range(5))
    lse = torch.logsumexp(z, 1) + 5.0
    g = torch.full((n,), 1.0 / n, **f32)
    slab_lse = torch.empty(n, **f32)
    rows = []
    grid_shapes = [(4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024), (32, 256),
                   (32, 512)]
    for (bn, bv), warps, stages in itertools.product(grid_shapes, (4, 8), (1, 3)):
        grid = (triton.cdiv(n, bn),)

        def stats():
            m.fill_(float("-inf"))
            slab_stats_kernel[grid](z, z, targets, m, s, w, zsum, tgt, slab_lse, n, cols, 0, z.stride(0), 1.0,
                                    HAS_BIAS=False, HAS_SOFTCAP=False, NEED_SUM=False, NEED_MU=False,
                                    NEED_SLAB=True, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps, num_stages=stages)

        narrow = work.view(torch.bfloat16)

        def grad():
            slab_grad_kernel[grid](work, narrow, work, targets, lse, lse, g, -g, lse, lse, n, cols, 0,
                                   work.stride(0), narrow.stride(0), 1.0, HAS_BIAS=False, HAS_SOFTCAP=False,
                                   HAS_G_LSE=True, HAS_G_TGT=True, HAS_G_SUM=False, HAS_G_MU=False,
                                   BLOCK_N=bn, BLOCK_V=bv, num_warps=warps, num_stages=stages)

        try:
            t_fill = triton.testing.do_bench(lambda: m.fill_(float("-inf")), warmup=5, rep=20)
            t_stats = triton.testing.do_bench(stats, warmup=10, rep=50) - t_fill
            work.copy_(z)  # then dz is written over it again and again: garbage values, the same traffic
            t_grad = triton.testing.do_bench(grad, warmup=10, rep=50)
        except Exception as err:  # a shape that does not compile (registers, shared memory) is skipped
            print(f"BLOCK_N {bn} BLOCK_V {bv} warps {warps} stages {stages}: {type(err).__name__}", flush=True)
            continue
        row = dict(block_n=bn, block_v=bv, num_warps=warps, num_stages=stages, stats_us=t_stats * 1e3,
                   grad_us=t_grad * 1e3, stats_tbs=4 * n * cols / t_stats / 1e9, grad_tbs=6 * n * cols / t_grad / 1e9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for key in ("stats_us", "grad_us"):
        best = sorted(rows, key=lambda r: r[key])[:5]
        print(f"best {key}:", *[(r["block_n"], r["block_v"], r["num_warps"], r["num_stages"], round(r[key], 1))
                                  for r in best])
    if args.out:
        Path(args.out).write_text(json.dumps(dict(n=n, cols=cols, device=torch.cuda.get_device_name(),
                                                  triton=triton.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()

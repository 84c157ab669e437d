"""Sweep Triton tile configurations of lmforge's CCE kernels on one shape (GPU only).

    python bench/cce_tune.py --shape gemma2-2b --regime random --out tune.json

Each configuration is set through LMFORGE_CCE_CONFIG (read at every launch, compiled once) and timed
with CUDA events (median); results are appended to docs/cce-tuning.md by hand with the predictions.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import parse_shape  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); the first of each list is the default.
FWD = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 5), (256, 256, 64, 8, 3), (128, 128, 64, 8, 3)]
BWD = [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4)]


def as_cfg(t):
    return dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages"), t))


def time_ms(fn, reps=10):
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--regime", default="random")
    ap.add_argument("--real-path")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    e, c, t = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device="cuda", real_path=args.real_path)
    e.requires_grad_(True)
    c.requires_grad_(True)
    flops = 2 * n * d * v
    rows = []
    for kind, grid, base in (("fwd", FWD, {"bwd": as_cfg(BWD[0])}), ("bwd", BWD, {"fwd": as_cfg(FWD[0])})):
        for cfg in grid:
            conf = dict(base, **{kind: as_cfg(cfg)})
            if kind == "fwd" and cfg[1] % conf["bwd"]["BLOCK_V"]:
                conf["bwd"] = dict(conf["bwd"], BLOCK_V=cfg[1])
            os.environ["LMFORGE_CCE_CONFIG"] = json.dumps(conf)
            try:
                with torch.no_grad():
                    fwd = time_ms(lambda: linear_cross_entropy(e, c, t))

                def step():
                    e.grad = c.grad = None
                    linear_cross_entropy(e, c, t).backward()

                both = time_ms(step, reps=5)
                row = dict(kind=kind, cfg=cfg, fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9)
            except Exception as err:  # a config that does not compile (shared memory) is skipped
                row = dict(kind=kind, cfg=cfg, error=f"{type(err).__name__}: {str(err)[:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, regime=args.regime, rows=rows), indent=2))


if __name__ == "__main__":
    main()

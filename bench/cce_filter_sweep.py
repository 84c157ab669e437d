"""The GEMM path's knobs on one shape and regime, side by side in one process (GPU).

For exact gradients (filter_eps=None), each gradient-filter budget (``filter_eps``: softmax mass a row may
lose to skipped slabs) and each slab size (``LMFORGE_CCE_SLAB_MB``): forward and forward+backward time,
extra memory and relative error against float64 (the measurement of lmforge.cce.benchmark), and for the
filtered rows the share of (slab, row) pairs the backward keeps (:func:`lmforge.cce.gemm_impl.row_depths`).
``--params`` generates the calibrated regime with overrides of lmforge.cce.regimes.CALIBRATED.

    python bench/cce_filter_sweep.py --shape gemma2-2b --regime calibrated --eps 12 10 8 --slab-mb 32 64 --out x.json
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import gemm_impl, linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import float64_reference, measure, parse_shape  # noqa: E402
from lmforge.cce.regimes import calibrated_inputs, make_inputs, regime_stats  # noqa: E402
from lmforge.cce.order import vocab_order  # noqa: E402


def kept_share(e, c, t, eps: float) -> float:
    """Share of (slab, row) pairs the filtered backward visits for the mean loss (g_lse = g_tgt = 1 / N)."""
    n, vocab = e.shape[0], c.shape[0]
    perm = vocab_order(e, c, None, gemm_impl.slab_columns(n, vocab))
    table = gemm_impl.empty_table(e, c)  # the shipped forward's compact table
    lse, *_ = gemm_impl.forward_stats(e, c, None, t, perm=perm, slab_lse=table)
    targets, _ = gemm_impl._permuted(t, None, perm, vocab)
    g = torch.full((n,), 1.0 / n, device=e.device)
    depth = gemm_impl.row_depths(table, lse, g, -g, targets, gemm_impl.slab_columns(n, vocab), eps)
    return depth.sum().item() / (n * table.codes.shape[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="gemma2-2b")
    ap.add_argument("--regime", default="calibrated")
    ap.add_argument("--real-path", default=".benchdata/real.safetensors")
    ap.add_argument("--eps", type=float, nargs="*", default=[12, 10, 8], help="filter budgets as k in 2^-k")
    ap.add_argument("--slab-mb", type=float, nargs="*", default=[32, 64])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--params", type=json.loads, help="calibrated regime: JSON overrides of regimes.CALIBRATED")
    ap.add_argument("--filter-min-d", type=int, help="override gemm_impl.FILTER_MIN_D (e.g. 1 to filter at D = 576)")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    if args.filter_min_d is not None:
        gemm_impl.FILTER_MIN_D = args.filter_min_d
    if args.params:
        e, c, t = calibrated_inputs(n, d, v, dtype=torch.bfloat16, device=args.device, params=args.params)
    else:
        e, c, t = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device=args.device,
                              real_path=args.real_path)
    ref = float64_reference(e, c, t)
    stats = regime_stats(e, c, t) if args.regime != "random" else {}
    print(args.shape, args.regime, stats, flush=True)
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    rows = [measure("exact", lambda a, b, y: linear_cross_entropy(a, b, y, filter_eps=None), e, c, t, ref, **timing)]
    for k in args.eps:
        eps = 2.0 ** -k
        row = measure(f"filter 2^-{k:g}", lambda a, b, y: linear_cross_entropy(a, b, y, filter_eps=eps),
                      e, c, t, ref, **timing)
        with torch.no_grad():
            row["kept_share"] = kept_share(e, c, t, eps)
        rows.append(row)
    for mb in args.slab_mb:
        os.environ["LMFORGE_CCE_SLAB_MB"] = str(mb)
        rows.append(measure(f"exact, slab {mb:g} MB", lambda a, b, y: linear_cross_entropy(a, b, y, filter_eps=None),
                            e, c, t, ref, **timing))
        del os.environ["LMFORGE_CCE_SLAB_MB"]
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if e.is_cuda else "cpu"
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, regime=args.regime, params=args.params,
                                                  n=n, d=d, v=v, device=device, torch=torch.__version__,
                                                  regime_stats=stats, rows=rows), indent=1))


if __name__ == "__main__":
    main()

"""How many rows visit each slab of the sorted vocabulary in the GEMM path's filtered backward.

For one shape and data regime: the forward's per-slab log-sum-exp table (``gemm_impl.forward_stats`` over the
vocabulary in slabs by ``order.vocab_order``), each row's depth (``gemm_impl.row_depths``, the slabs it
keeps at ``filter_eps``, its target's slab included) and, per slab, how many rows reach it (the backward's
``counts``); ``kept_share_exact`` is the share of (slab, row) pairs kept with exact float32 masses, against
``kept_share`` from the compact table's bounds. Route (e) in docs/cce-tuning.md needs the last slabs to be
visited by few rows; this measures whether they are. Prints one JSON line (also written to ``--out``).

    python bench/cce_row_depths.py --shape gemma2-2b --regime calibrated          # GPU, seconds
    python bench/cce_row_depths.py --shape 1024x576x49152 --regime real --device cpu
    python bench/cce_row_depths.py --shape gemma2-2b --regime calibrated --device cpu --rows 512  # ~9 min
    TRITON_INTERPRET=1 python bench/cce_row_depths.py ... --device cpu --counting  # the GPU's vocabulary order
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from lmforge.cce import auto_filter_eps, gemm_impl, order, triton_impl  # noqa: E402
from lmforge.cce.benchmark import parse_shape  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402


def slab_counts(e, c, targets, filter_eps: float, plan_n: int | None = None, counting: bool = False):
    """(rows reaching each slab, each row's depth, the depths from exact float32 masses) as the filtered
    backward would plan them (g_lse = 1 and g_tgt = -1 for every row: a mean loss with no ignored token).
    ``plan_n``: size the slabs and groups for a problem of that many tokens (e holding some of its rows).
    ``counting``: on the CPU, the shipped counting sort of bf16 scores (``order.vocab_order``, under
    TRITON_INTERPRET=1) instead of a full float32 sort."""
    n, vocab = e.shape[0], c.shape[0]
    plan_n = plan_n or n
    cols = gemm_impl.slab_columns(plan_n, vocab)
    n_slab = gemm_impl.n_slabs(plan_n, vocab)
    if e.is_cuda:  # the shipped path: the sorted order and the forward's compact table
        if plan_n != n:
            raise ValueError("--rows is for the CPU path (the GPU's forward sizes its own slabs)")
        perm = order.vocab_order(e, c, None, cols)
        table = gemm_impl.empty_table(e, c)
        lse, *_ = gemm_impl.forward_stats(e, c, None, targets, perm=perm, slab_lse=table)
        plain = torch.empty((n_slab, n), dtype=torch.float32, device=e.device)
        gemm_impl.forward_stats(e, c, None, targets, perm=perm, slab_lse=plain)
    else:  # float32 logits by torch, 256 rows at a time (the Triton passes would run in the interpreter);
        # the vocabulary fully sorted, the table grouped as on a 132-SM GPU
        perm = order.vocab_order(e, c, None, cols) if counting else triton_impl.vocab_order(e, c, None)
        plain = torch.empty((n_slab, n), dtype=torch.float32, device=e.device)
        c_sorted = c[perm.long()].float()
        for r0 in range(0, n, 256):
            z = e[r0:r0 + 256].float() @ c_sorted.t()
            for k, start in enumerate(range(0, vocab, cols)):
                plain[k, r0:r0 + 256] = torch.logsumexp(z[:, start:start + cols], dim=1)
        lse = torch.logsumexp(plain, dim=0)
        table = gemm_impl.encode_table(plain, gemm_impl.slabs_per_group(plan_n, n_slab, 132, 128))
    if e.is_cuda:
        slab_targets = order.positions(perm, targets, vocab)
    else:  # every target is a vocabulary index here
        inverse = torch.empty(vocab, dtype=torch.long)
        inverse[perm.long()] = torch.arange(vocab)
        slab_targets = inverse[targets]
    ones = torch.ones(n, dtype=torch.float32, device=e.device)
    depth = gemm_impl.row_depths(table, lse, ones, -ones, slab_targets, cols, filter_eps)
    exact = gemm_impl.row_depths(plain, lse, ones, -ones, slab_targets, cols, filter_eps)
    counts = torch.bincount(depth, minlength=n_slab + 1).flip(0).cumsum(0).flip(0)[1:]
    return counts.tolist(), depth, exact


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gemma2-2b", help="a name of benchmark.GPU_SHAPES or NxDxV")
    ap.add_argument("--regime", default="calibrated", choices=["calibrated", "real", "random"])
    ap.add_argument("--real-path", default=".benchdata/real.safetensors")
    ap.add_argument("--filter-eps", type=float, default=auto_filter_eps(torch.bfloat16))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, help="CPU: only this many of the shape's tokens (slabs sized for all)")
    ap.add_argument("--counting", action="store_true",
                    help="CPU: order the vocabulary as the GPU does (counting sort of bf16 scores; needs "
                         "TRITON_INTERPRET=1), not by a full float32 sort")
    ap.add_argument("--out")
    args = ap.parse_args()
    n, d, v = parse_shape(args.shape)
    rows = args.rows or n
    e, c, t = make_inputs(args.regime, rows, d, v, dtype=torch.bfloat16, device=args.device,
                          real_path=args.real_path)[:3]
    counts, depth, exact = slab_counts(e, c, t, args.filter_eps, plan_n=n, counting=args.counting)
    row = dict(shape=[n, d, v], rows=rows, regime=args.regime, filter_eps=args.filter_eps, device=str(args.device),
               order="counting" if args.counting or e.is_cuda else "sorted",
               slab_columns=gemm_impl.slab_columns(n, v), counts=counts,
               kept_share=sum(counts) / (rows * len(counts)),
               kept_share_exact=float(exact.float().mean()) / len(counts), last_slabs=counts[-4:],
               depth_quantiles={q: float(depth.float().quantile(q)) for q in (0.5, 0.9, 0.99, 1.0)})
    print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

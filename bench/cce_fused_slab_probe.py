"""Can a Triton GEMM with the log-sum-exp in its epilogue, fed by TMA, beat cuBLAS + the statistics pass?

The GEMM path's forward writes each fp32 logit slab (128 MiB) with cuBLAS and reads it back in a
memory-bound pass (H200, Gemma 2 2B shape: 15.3 ms of GEMMs + 3.6 ms of statistics; the fused Triton
forward, pointer loads, 20.8 ms). Issue 3's forward target (0.8x Apple's 20.9 ms, with <= 2 MB of
workspace) needs the statistics folded into a GEMM that runs near cuBLAS's rate. This probe's kernel
loads E and C tiles through tensor descriptors (TMA on Hopper), keeps each BLOCK_N x BLOCK_V logit tile
on chip and folds it into a per-(split, row) online log-sum-exp and target logit; the splits of the
vocabulary are combined by two torch ops. Modes:

* ``exact``: one launch over the whole vocabulary in its own order (no workspace beyond the partials);
* ``sorted``: the GEMM path's sorted order, one launch per slab over the gathered classifier slab
  (contiguous, so TMA applies), also producing the per-slab log-sum-exp table the filtered backward needs.

    python bench/cce_fused_slab_probe.py --selftest            # CPU, TRITON_INTERPRET=1: against float64
    python bench/cce_fused_slab_probe.py --shape 8192 2304 256000 --out probe.json   # GPU: times, errors

On the GPU it prints, per tile configuration, the time and TFLOP/s of every mode beside the shipped
forward (gemm_impl.forward_stats, exact and sorted) and the largest lse / slab-lse differences.
``gather``: the sorted order in one launch, the classifier's rows read through the permutation.

Outcome (H200, 2026-11-30, bench/results/cce_fused_probe.json): exact 15.5 ms against 18.0 for the cuBLAS
forward, gathered sorted order 18.9; both now ship as lmforge.cce.kernels.tma_forward ("shipped_*" above
then time that kernel on Hopper, "shipped_*_cublas" the cuBLAS-slab forward).

Since that outcome the exact, sorted and gather modes launch the shipped kernel (the probe's own copy of it,
which produced the numbers above, is in git history at d36aa27). ``binned``: the exact order with TMA for
both operands, each tile's probabilities also summed into the sorted vocabulary's slabs by a P x one-hot
product, so the filtered backward's table costs no gathers.

Outcome of the eighth session (bench/results/cce_fused_probe_v37.json; from its call 2 on, every mode is
timed behind a busy GPU, i.e. GPU time alone): binned 18.8 ms at best against 19.1 for the gather (dropped);
``_flat`` modes (the tile and D loops flattened into one pipeline) 13.33 ms exact, 16.26 gathered, against
14.40 / 17.16 nested; ``sN`` split counts showed v3.6's 9 splits (4.4 waves) 1.4 ms slower than 8 or 33.
Both now ship (FLATTEN, gemm_impl.tma_splits).
"""

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

if "--selftest" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from lmforge.cce import gemm_impl  # noqa: E402
from lmforge.cce.benchmark import cuda_event_times  # noqa: E402
from lmforge.cce.kernels.forward import _add_target_logit, _store_split  # noqa: E402
from lmforge.cce.kernels.tma_forward import lse_tma_kernel, row_block  # noqa: E402
from lmforge.cce.triton_impl import _launch_kwargs, interpreting, vocab_order  # noqa: E402


@triton.jit
def binned_lse_kernel(
    e_desc, c_desc, Bucket, Targets, L_out, Tgt_out, Bins_out,
    N, V, v_per_split,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr, BUCKETS: tl.constexpr,
):
    # The exact-order kernel (C by TMA, no gathers) that also returns each row's log-sum-exp per slab of the
    # *sorted* vocabulary: column j belongs to slab Bucket[j], and each tile's probabilities (relative to the
    # running max, in bf16: fp16 would flush a far slab's mass to zero) are summed into BUCKETS bins by one
    # more tensor-core product, P (BLOCK_N x BLOCK_V) times the tile's one-hot slab matrix (BLOCK_V x
    # BUCKETS): 2 * BUCKETS / D of the tile's main product (5.6% at Gemma's D = 2304 with 64 bins). Bins are
    # rescaled with the running max like the sum.
    pid_s = tl.program_id(1)
    row0, rows, row_ok, targets = row_block(Targets, N, tl.program_id(0), BLOCK_N)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    bins = tl.zeros((BLOCK_N, BUCKETS), tl.float32)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in tl.range(v_begin, v_end, BLOCK_V):
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in tl.range(0, D, BLOCK_D):
            a = e_desc.load([row0, d0])
            b = c_desc.load([v0, d0])
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        prob = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(prob, axis=1)
        slab_of = tl.load(Bucket + cols, mask=col_ok, other=-1)
        hit = slab_of[:, None] == tl.arange(0, BUCKETS)[None, :]
        if UPCAST:  # the interpreter: bf16-rounded probabilities, exact one-hot, fp32 product
            bins = bins * scale[:, None] + tl.dot(prob.to(tl.bfloat16).to(tl.float32), hit.to(tl.float32),
                                                  input_precision="ieee")
        else:
            bins = bins * scale[:, None] + tl.dot(prob.to(tl.bfloat16), hit.to(tl.bfloat16))
        tgt = _add_target_logit(tgt, acc, cols, targets, col_ok)
        m = m_new
    _store_split(L_out, Tgt_out, pid_s * N + rows, m, s, tgt, row_ok)
    buckets = tl.arange(0, BUCKETS)
    tl.store(Bins_out + (pid_s * BUCKETS + buckets[None, :]) * N + rows[:, None], m[:, None] + tl.log(bins),
             mask=row_ok[:, None])


def binned_forward(e, c, targets, cfg, *, splits=None, slab_bytes=None):
    """(lse, target logit, per-slab lse table of the sorted vocabulary) from one exact-order launch."""
    n, vocab = e.shape[0], c.shape[0]
    perm = vocab_order(e, c, None)
    cols_per_slab = gemm_impl.slab_columns(n, vocab, slab_bytes)
    n_slab = gemm_impl.n_slabs(n, vocab, slab_bytes)
    buckets = max(16, triton.next_power_of_2(n_slab))
    bucket = torch.empty(vocab, dtype=torch.int32, device=e.device)
    bucket[perm.long()] = torch.arange(vocab, dtype=torch.int32, device=e.device) // cols_per_slab
    sms = torch.cuda.get_device_properties(e.device).multi_processor_count if e.is_cuda else 4
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = max(1, min(splits or triton.cdiv(sms, row_blocks), v_tiles))  # partials grow with splits x bins
    v_per_split = triton.cdiv(v_tiles, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, v_per_split)
    partial = torch.empty((2, splits, n), dtype=torch.float32, device=e.device)
    bins = torch.empty((splits, buckets, n), dtype=torch.float32, device=e.device)
    valid = (targets >= 0) & (targets < vocab)
    e_desc = TensorDescriptor.from_tensor(e, [cfg["BLOCK_N"], cfg["BLOCK_D"]])
    c_desc = TensorDescriptor.from_tensor(c, [cfg["BLOCK_V"], cfg["BLOCK_D"]])
    launch = _launch_kwargs(cfg)
    binned_lse_kernel[(row_blocks, splits)](
        e_desc, c_desc, bucket, torch.where(valid, targets, -1), partial[0], partial[1], bins, n, vocab, v_per_split,
        UPCAST=interpreting(), BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        D=e.shape[1], BUCKETS=buckets, **launch)
    return torch.logsumexp(partial[0], 0), partial[1].sum(0), torch.logsumexp(bins, 0)[:n_slab]

def _launch_lse(e, c_part, targets, cfg, splits, perm=None, v_per_split=None, flatten=False):
    """(per-split lse over c_part's rows (splits x N), target logit (N)) for targets given as positions in c_part
    (-1: none), through the shipped kernel (lmforge.cce.kernels.tma_forward). With ``perm``: c_part is the whole
    classifier visited in the order perm (pointer gathers); with ``v_per_split`` the splits are that wide."""
    n, d = e.shape
    cols = c_part.shape[0]
    e_desc = TensorDescriptor.from_tensor(e, [cfg["BLOCK_N"], cfg["BLOCK_D"]])
    c_desc = TensorDescriptor.from_tensor(c_part, [cfg["BLOCK_V"], cfg["BLOCK_D"]])
    if v_per_split is None:
        v_tiles = triton.cdiv(cols, cfg["BLOCK_V"])
        splits = max(1, min(splits, v_tiles))
        v_per_split = triton.cdiv(v_tiles, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(cols, v_per_split)
    l_part = torch.empty((splits, n), dtype=torch.float32, device=e.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=e.device)
    launch = _launch_kwargs(cfg)
    # One slab per split when gathering (the splits are the table's slabs), else one slab cut in `splits`.
    slab, sub = (v_per_split, 1) if perm is not None else (cols, splits)
    lse_tma_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        e_desc, c_desc, c_part, perm if perm is not None else targets, l_part, targets, l_part, l_part, l_part, tgt,
        n, cols, slab, v_per_split, c_part.stride(0), 1.0,
        D=d, SUB=sub, HAS_BIAS=False, HAS_SOFTCAP=False, GATHER=perm is not None, NEED_SUM=False, NEED_MU=False,
        UPCAST=interpreting(), BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        FLATTEN=flatten, **launch)
    return l_part, tgt


def fused_forward(e, c, targets, cfg, *, sorted_order=False, splits=None, slab_bytes=None, gather=False,
                  flatten=False):
    """(lse, target logit, per-slab lse table or None) of softmax(e @ c.T).

    ``gather``: the sorted order in one launch, C read through the permutation by pointer loads, one split
    per slab (its partials are the slab table: no gathered classifier buffer)."""
    n, vocab = e.shape[0], c.shape[0]
    sms = torch.cuda.get_device_properties(e.device).multi_processor_count if e.is_cuda else 4
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    if gather:
        perm = vocab_order(e, c, None)
        slab_targets, _ = gemm_impl._permuted(targets, None, perm, vocab)
        cols_per_slab = gemm_impl.slab_columns(n, vocab, slab_bytes)
        if cols_per_slab % cfg["BLOCK_V"]:
            raise ValueError(f"slab width {cols_per_slab} is no multiple of BLOCK_V {cfg['BLOCK_V']}")
        table, tgt = _launch_lse(e, c, slab_targets, cfg, None, perm=perm, v_per_split=cols_per_slab,
                                 flatten=flatten)
        return torch.logsumexp(table, 0), tgt, table
    if not sorted_order:  # ~16 waves of programs over the whole vocabulary
        valid = (targets >= 0) & (targets < vocab)
        l_part, tgt = _launch_lse(e, c, torch.where(valid, targets, -1), cfg,
                                  splits or max(1, round(16 * sms / row_blocks)), flatten=flatten)
        return torch.logsumexp(l_part, 0), tgt, None
    splits = splits or max(1, round(sms / row_blocks))  # about one wave per slab
    perm = vocab_order(e, c, None)
    slab_targets, _ = gemm_impl._permuted(targets, None, perm, vocab)
    cols_per_slab = gemm_impl.slab_columns(n, vocab, slab_bytes)
    c_buffer = torch.empty((cols_per_slab, c.shape[1]), dtype=c.dtype, device=c.device)
    table = torch.empty((gemm_impl.n_slabs(n, vocab, slab_bytes), n), dtype=torch.float32, device=e.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=e.device)
    for index, start in enumerate(range(0, vocab, cols_per_slab)):
        cols = min(cols_per_slab, vocab - start)
        c_slab = gemm_impl._classifier_slab(c, perm, start, cols, c_buffer)
        local = torch.where((slab_targets >= start) & (slab_targets < start + cols), slab_targets - start, -1)
        l_part, slab_tgt = _launch_lse(e, c_slab, local, cfg, splits)
        table[index] = torch.logsumexp(l_part, 0)
        tgt += slab_tgt
    return torch.logsumexp(table, 0), tgt, table


CONFIGS = [dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
           dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4),
           dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
           dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=4),
           dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=128, num_warps=8, num_stages=2)]
# Modes: the exact order with the default ~16 waves of splits, or `sN` splits (v3.6's forward picked 9 at
# Gemma's shape on an H200: 576 programs, 4.4 waves); `_flat`: the kernel's loop over vocabulary tiles flattened
# with its loop over D (tl.range(flatten=True): one software pipeline across tile boundaries; sm_90 AOT: the
# 128 x 256 tile's 45 register spills of the nested loops disappear).
MODES = dict(fused_exact={}, fused_exact_flat=dict(flatten=True),
             **{f"fused_exact_s{k}{f}": dict(splits=k, flatten=f == "_flat")
                for k in (8, 9, 16) for f in ("", "_flat")},
             fused_sorted=dict(sorted_order=True), fused_gather=dict(sorted_order=True, gather=True),
             fused_gather_flat=dict(sorted_order=True, gather=True, flatten=True),
             fused_binned=dict(binned=True), fused_binned_s4=dict(binned=True, splits=4))
# warp_specialize=True is not in the list: Triton 3.6 leaves this loop unpartitioned on sm_90 (its TTGIR has no
# warp-specialize partitions; same SASS) and fails to compile it for sm_100 (python -m lmforge.cce.sass style
# AOT check, 2026-11-30).


def selftest():
    """CPU (interpreter): both modes against float64 on a shape no tile divides."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 45, 48, 300
    e = (torch.randn(n, d, generator=g) * 2).bfloat16()
    c = torch.randn(v, d, generator=g).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    z = e.double() @ c.double().T
    ref_lse, ref_tgt = torch.logsumexp(z, 1), z[torch.arange(n), t]
    for sorted_order, gather in ((False, False), (True, False), (True, True)):
        cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)
        lse, tgt, table = fused_forward(e, c, t, cfg, sorted_order=sorted_order, splits=3, slab_bytes=64 * n * 4,
                                        gather=gather)
        assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=1e-5), (lse - ref_lse).abs().max()
        assert torch.allclose(tgt.double(), ref_tgt, rtol=1e-6, atol=1e-5), (tgt - ref_tgt).abs().max()
        if sorted_order:  # the table equals the shipped forward's, slab by slab
            shipped = torch.empty_like(table)
            perm = vocab_order(e, c, None)
            gemm_impl.forward_stats(e, c, None, t, perm=perm, slab_lse=shipped, slab_bytes=64 * n * 4)
            assert torch.allclose(table, shipped, rtol=1e-5, atol=1e-5), (table - shipped).abs().max()
    cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)
    lse, tgt, table = binned_forward(e, c, t, cfg, splits=3, slab_bytes=64 * n * 4)
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=1e-5), (lse - ref_lse).abs().max()
    assert torch.allclose(tgt.double(), ref_tgt, rtol=1e-6, atol=1e-5), (tgt - ref_tgt).abs().max()
    shipped = torch.empty_like(table)
    gemm_impl.forward_stats(e, c, None, t, perm=vocab_order(e, c, None), slab_lse=shipped, slab_bytes=64 * n * 4)
    # bf16 probabilities in the bins: each slab's share of the row's mass within 2^-7 relative (the interpreter
    # truncates to bf16: 0.63% here; the GPU rounds to nearest, 2^-8). A shipped version would scale the bins
    # up by 2^-7 so that the filter never under-counts a slab.
    got, want = torch.exp(table - lse), torch.exp(shipped - lse)
    assert torch.allclose(got, want, rtol=2.0 ** -7, atol=1e-30), ((got - want).abs() / want).max()
    print("selftest passed: exact, sorted and binned modes match float64 and the shipped slab table")


def _time(fn, repeats):
    """Median CUDA-event ms of ``fn`` over ``repeats`` runs, each queued behind ~20 ms of GPU spinning: the GPU's
    time alone, without the host's Python and launch work (which do_bench, used before 2026-11-30's 8th
    session, counted whenever it outlasted its cache-clearing kernel)."""
    fn()
    return statistics.median(cuda_event_times(fn, repeats, busy_cycles=40_000_000))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--shape", type=int, nargs=3, default=[8192, 2304, 256000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    ap.add_argument("--configs", type=int, nargs="+", default=list(range(len(CONFIGS))),
                    help="indices into CONFIGS")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.selftest:
        selftest()
        return
    n, d, v = args.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    c = (torch.randn(v, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    flop = 2 * n * d * v
    perm = vocab_order(e, c, None)
    shipped_table = torch.empty((gemm_impl.n_slabs(n, v), n), dtype=torch.float32, device="cuda")
    ref_lse = gemm_impl.forward_stats(e, c, None, t)[0]
    rows = []
    for tma in ("auto", "0"):  # the shipped forward: the TMA kernel on Hopper, and cuBLAS slabs
        os.environ["LMFORGE_CCE_TMA"] = tma
        for name, fn in (("shipped_exact", lambda: gemm_impl.forward_stats(e, c, None, t)),
                         ("shipped_sorted", lambda: gemm_impl.forward_stats(e, c, None, t, perm=vocab_order(e, c, None),
                                                                            slab_lse=shipped_table))):
            ms = _time(fn, args.repeats)
            rows.append(dict(variant=name + ("_cublas" if tma == "0" else ""), ms=ms, tflops=flop / ms / 1e9))
            print(json.dumps(rows[-1]), flush=True)
    gemm_impl.forward_stats(e, c, None, t, perm=perm, slab_lse=shipped_table)  # cuBLAS's table: the reference
    os.environ["LMFORGE_CCE_TMA"] = "auto"
    for cfg in [CONFIGS[i] for i in args.configs]:
        for mode in args.modes:
            kw = MODES[mode]
            row = dict(variant=mode, **cfg)
            try:
                if kw.get("binned"):
                    run = functools.partial(binned_forward, e, c, t, cfg, splits=kw.get("splits"))
                else:
                    run = functools.partial(fused_forward, e, c, t, cfg, **kw)
                lse, _, table = run()
                row["max_lse_diff"] = float((lse - ref_lse).abs().max())
                if table is not None:
                    row["max_slab_lse_diff"] = float((table - shipped_table).abs().max())
                ms = _time(run, args.repeats)
                row.update(ms=ms, tflops=flop / ms / 1e9)
            except Exception as err:  # a tile shape that does not compile or launch is a result too
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=args.shape, device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__, triton=triton.__version__, rows=rows),
                                             indent=1))


if __name__ == "__main__":
    main()

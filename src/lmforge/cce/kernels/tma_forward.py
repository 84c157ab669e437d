"""GEMM-path forward on Hopper: the classifier product fed by tensor descriptors, statistics in its epilogue.

Each program owns BLOCK_N rows of E and one split of the vocabulary. It walks the split in BLOCK_V-column
tiles; for each tile it accumulates E[rows] C[cols]^T over D in BLOCK_D steps (fp32 accumulator, on chip),
with both operands loaded through tensor descriptors (TMA on sm_90: one instruction per operand tile, no
per-thread addresses), and folds the tile into an online log-sum-exp, the target logit and, when asked,
the softmax-weighted and plain logit sums. The loop over tiles is flattened with the loop over D
(``FLATTEN``; the shipped path sets it) into one software pipeline, so loads for the next tile overlap the
current tile's last products and its epilogue instead of the pipeline draining at every tile (and the
128 x 256 tile's register spills of the nested loops go). Nothing of size N x V is written: the H200
forward at Gemma 2 2B's shape takes 13.3 ms of GPU time (726 TFLOP/s; 14.4 nested, 16.3 for cuBLAS fp32
slabs plus a statistics pass over them), with under 1 MiB of partials instead of a 128 MiB slab
(bench/cce_fused_slab_probe.py, 2026-11-30, bench/results/cce_fused_probe_v37.json).

Splits. The vocabulary (in visiting order) is cut into slabs of ``cols_per_slab`` columns and each slab
into ``SUB`` splits of ``v_per_sub`` columns (:func:`lmforge.cce.gemm_impl.tma_splits` sizes them so the
grid fills whole waves); program axis 1 runs over (slab, split) pairs. A split writes
its log-sum-exp to ``L_out[pid_s, row]``. With one slab (the exact order) the splits only spread the work
over the GPU; with the GEMM path's slabs (the filtered backward's sorted order) ``L_out`` reshaped to
(n_slabs, SUB, N) gives each row's log-sum-exp per slab, the table :func:`lmforge.cce.gemm_impl.row_depths`
reads.

Grouped (``GROUPED``; the training forward's :class:`lmforge.cce.gemm_impl.SlabTable`). Program axis 1 runs
over groups of ``slabs_per_group`` slabs; a program walks its group's tiles in one loop, stores a byte per
(slab, row) as each slab ends and the group's log-sum-exp as its partial.

Sorted order (``GATHER``). TMA on sm_90 cannot gather rows, so in the sorted order C's tiles are read
through the permutation by pointer loads (cp.async); E keeps its descriptor. This costs about 20% against
the contiguous order (16.3 vs 13.3 ms at Gemma's shape) but needs no gathered copy of the classifier.

Targets and bias are given by position in the visiting order (the caller permutes them). A row's target
lies in exactly one split, which stores its logit: no partials and no atomics for it.
"""

import triton
import triton.language as tl

from lmforge.cce.kernels.forward import _add_target_logit, _tanh, fold_tile


@triton.jit
def row_block(Targets, N, pid_r, BLOCK_N: tl.constexpr):
    """Row block pid_r's first row, its BLOCK_N rows, their mask and their targets (int64; -1 where masked)."""
    row0 = pid_r * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    return row0, rows, row_ok, tl.load(Targets + rows, mask=row_ok, other=-1).to(tl.int64)


@triton.jit
def _tile_logits(e_desc, c_desc, C, Perm, Bias, row0, v0, v_end, stride_cv, softcap, D: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GATHER: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits of rows [row0, row0 + BLOCK_N) x visiting positions [v0, v0 + BLOCK_V), the positions and
    which of them lie before v_end."""
    offs_d = tl.arange(0, BLOCK_D)
    pos = v0 + tl.arange(0, BLOCK_V)
    col_ok = pos < v_end
    if GATHER:
        vocab_rows = tl.load(Perm + pos, mask=col_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        a = e_desc.load([row0, d0])
        if GATHER:
            b = tl.load(C + vocab_rows[:, None] * stride_cv + (d0 + offs_d)[None, :],
                        mask=(d0 + offs_d)[None, :] < D, other=0.0)
        else:  # rows past v_end (the next split's, or zeros past V) are masked out below
            b = c_desc.load([v0, d0])
        if UPCAST:  # the interpreter multiplies 16-bit tiles as raw bits; fp32 gives the GPU's products
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.T, acc)
    if HAS_BIAS:
        acc += tl.load(Bias + pos, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc, pos, col_ok


@triton.jit
def lse_tma_kernel(
    e_desc, c_desc, C, Perm, Bias, Targets,
    L_out, W_out, Sum_out, Tgt_out, Codes,
    N, V, cols_per_slab, v_per_sub, slabs_per_group, stride_cv, softcap,
    D: tl.constexpr, SUB: tl.constexpr, GROUPED: tl.constexpr, CODE_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GATHER: tl.constexpr,
    NEED_SUM: tl.constexpr, NEED_MU: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, FLATTEN: tl.constexpr,
    BAND: tl.constexpr,
):
    if BAND > 0:
        # Launch order in bands of BAND row blocks x every part (a part: a split or a group of slabs), row
        # blocks fastest: the programs in flight read ~BAND row blocks of E and a few parts of the classifier,
        # instead of all of E beside two parts (row-major order). H100, bands of 16: eval forward 13.29 ->
        # 12.69 ms at Gemma 2's shape and 12.16 -> 11.67 at Qwen 2.5's, grouped forward 17.07 -> 16.97 and
        # 15.97 -> 15.60 (gemm_impl.launch_band says where it applies).
        n_rb = tl.num_programs(0)
        pid = tl.program_id(1) * n_rb + tl.program_id(0)
        per_band = BAND * tl.num_programs(1)
        band = pid // per_band
        size = tl.minimum(n_rb - band * BAND, BAND)
        local = pid - band * per_band
        pid_r = band * BAND + local % size
        pid_s = local // size
    else:
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
    row0, rows, row_ok, targets = row_block(Targets, N, pid_r, BLOCK_N)
    if GROUPED:  # slabs [pid_s G, (pid_s + 1) G) one after the other; SUB is 1
        first_slab = pid_s * slabs_per_group
        v_begin = first_slab * cols_per_slab
        v_end = tl.minimum(v_begin + slabs_per_group * cols_per_slab, V)
    else:
        slab_end = tl.minimum((pid_s // SUB + 1) * cols_per_slab, V)
        v_begin = (pid_s // SUB) * cols_per_slab + (pid_s % SUB) * v_per_sub
        v_end = tl.minimum(v_begin + v_per_sub, slab_end)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    if GROUPED:
        # One loop over the group's tiles, slab after slab (a slab's last tile may be partial), so the group
        # is one software pipeline: a slab loop nested around the tile loop cost 1.4-1.9 ms at Gemma 2's shape
        # (H100: 17.1-17.7 ms against 15.8 for one slab per program; bench/cce_forward_groups.py), where
        # the kernel compiled by Triton 3.6 for sm_90 spilled to local memory (52 STL; 3 now, 0 ungrouped: the
        # counts of `python -m lmforge.cce.sass`).
        # The slab's end is handled by selects. Triton 3.6 fails to compile an `if` holding the code's store;
        # one holding only the merge compiles but timed the same (H100, 2026-12-07).
        tiles_per_slab = tl.cdiv(cols_per_slab, BLOCK_V)
        last_slab = tl.minimum(first_slab + slabs_per_group, tl.cdiv(V, cols_per_slab)) - 1
        n_tiles = (last_slab - first_slab) * tiles_per_slab \
            + tl.cdiv(tl.minimum(cols_per_slab, V - last_slab * cols_per_slab), BLOCK_V)
        ms = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        ss = tl.zeros((BLOCK_N,), tl.float32)
        ws = tl.zeros((BLOCK_N,), tl.float32)
        for t in tl.range(0, n_tiles, flatten=FLATTEN):
            j = t // tiles_per_slab
            k0 = (first_slab + j) * cols_per_slab
            tile = t - j * tiles_per_slab
            acc, pos, col_ok = _tile_logits(
                e_desc, c_desc, C, Perm, Bias, row0, k0 + tile * BLOCK_V, tl.minimum(k0 + cols_per_slab, V),
                stride_cv, softcap, D, HAS_BIAS, HAS_SOFTCAP, GATHER, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            ms, ss, ws, zsum, _ = fold_tile(acc, col_ok, ms, ss, ws, zsum, NEED_MU, NEED_SUM)
            tgt = _add_target_logit(tgt, acc, pos, targets, col_ok)
            # At a slab's last tile: merge the slab into the group's running statistics (ms is finite, the
            # slab has columns) and store its code, the slab's mass below the group's so far in 1 / CODE_SCALE
            # nats, rounded down and capped at 255. Decoded against the whole group's log-sum-exp (never
            # smaller) it bounds the slab's from above. 128-row vectors, computed at every tile.
            at = tl.zeros_like(rows) + t  # as a row vector: the interpreter's masks must be vectors
            slab_done = (at - j * tiles_per_slab == tiles_per_slab - 1) | (at == n_tiles - 1)
            m_new = tl.maximum(m, ms)
            old, new = tl.exp(m - m_new), tl.exp(ms - m_new)
            s_new = s * old + ss * new
            gap = (m_new + tl.log(s_new)) - (ms + tl.log(tl.maximum(ss, 1.0)))
            code = tl.minimum(tl.floor(tl.maximum(gap, 0.0) * CODE_SCALE), 255.0)
            tl.store(Codes + (first_slab + j) * N + rows, code.to(tl.uint8), mask=row_ok & slab_done)
            w = tl.where(slab_done, w * old + ws * new, w)
            s = tl.where(slab_done, s_new, s)
            m = tl.where(slab_done, m_new, m)
            ms = tl.where(slab_done, float("-inf"), ms)
            ss = tl.where(slab_done, 0.0, ss)
            ws = tl.where(slab_done, 0.0, ws)
    else:
        for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=FLATTEN):
            acc, pos, col_ok = _tile_logits(
                e_desc, c_desc, C, Perm, Bias, row0, v0, v_end, stride_cv, softcap, D, HAS_BIAS, HAS_SOFTCAP,
                GATHER, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            m, s, w, zsum, _ = fold_tile(acc, col_ok, m, s, w, zsum, NEED_MU, NEED_SUM)
            tgt = _add_target_logit(tgt, acc, pos, targets, col_ok)

    # s >= 1 after any column (the row's maximum contributes exp(0)); a split that saw none has m = -inf,
    # s = 0 and stores lse -inf and mean 0 (flooring s at 1 changes nothing else).
    s = tl.maximum(s, 1.0)
    out = pid_s * N + rows
    tl.store(L_out + out, m + tl.log(s), mask=row_ok)
    tl.store(Tgt_out + rows, tgt, mask=row_ok & (targets >= v_begin) & (targets < v_end))
    if NEED_MU:
        tl.store(W_out + out, w / s, mask=row_ok)
    if NEED_SUM:
        tl.store(Sum_out + out, zsum, mask=row_ok)

"""Kernels of the GEMM path: per-row statistics and the logit gradient of a logit slab cuBLAS wrote.

The GEMM path (:mod:`lmforge.cce.gemm_impl`) lets cuBLAS compute one vocabulary slab of logits at a time,
Z = E C[slab]^T in float32 (N x S), and needs two memory-bound passes over it:

* ``slab_stats_kernel`` folds the slab into running per-row statistics (max, sum of exp relative to it,
  softmax-weighted logit sum, plain logit sum, target logit), read-modify-write, so slabs are visited one
  after the other and nothing of size N x V ever exists; optionally it stores each row's log-sum-exp
  over the slab (the slab's share of the row's softmax mass, for the filtered backward);
* ``slab_grad_kernel`` turns the slab into the logit gradient dz, written *in place* over Z in the
  inputs' dtype: row i's dz occupies the first bytes of row i's Z (a bf16 view with row stride 2S).
  One program owns whole rows and walks their columns left to right, so it only overwrites columns it
  has already read (a barrier per step keeps its warps from overtaking each other's loads), and no other
  program touches its rows.

Both read every element of the slab once: (4 + 2) N S bytes for the gradient pass, 4 N S for the stats.
Two more move rows for the sorted order's dC: ``scatter_rows_kernel`` (a slab's rows to the vocabulary's)
and ``cycle_round_kernel`` (the pointer jumping behind ``gemm_impl.permute_rows_``'s in-place moves).
"""

import triton
import triton.language as tl

from lmforge.cce.kernels.forward import _tanh, fold_tile


@triton.jit
def _capped(z, Bias, cols, col_ok, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    th = z
    if HAS_SOFTCAP:
        th = _tanh(z / softcap)
        z = softcap * th
    return z, th


@triton.jit
def slab_stats_kernel(
    Z, Bias, Targets, M, S, W, Sum, Tgt, SlabLse,
    N, slab_cols, slab_start, stride_zn, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr, NEED_MU: tl.constexpr,
    NEED_SLAB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # The slab's own statistics first (max, sum of exp, softmax-weighted logit sum), folded into the
    # running ones once at the end: the same work as folding step by step, and the slab's log-sum-exp
    # (its share of each row's softmax mass, which the filtered backward reads) comes for free.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(Targets + rows, mask=row_ok, other=-1).to(tl.int64)
    tgt = tl.load(Tgt + rows, mask=row_ok, other=0.0)
    m_slab = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_slab = tl.zeros((BLOCK_N,), tl.float32)
    w_slab = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    if NEED_SUM:
        zsum = tl.load(Sum + rows, mask=row_ok, other=0.0)
    for v0 in range(0, slab_cols, BLOCK_V):
        slot = v0 + tl.arange(0, BLOCK_V)
        col_ok = slot < slab_cols
        cols = slab_start + slot
        z = tl.load(Z + rows[:, None].to(tl.int64) * stride_zn + slot[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        z, _ = _capped(z, Bias, cols, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)
        # m_slab stays finite: every step holds at least one column.
        m_slab, s_slab, w_slab, zsum, _ = fold_tile(z, col_ok, m_slab, s_slab, w_slab, zsum, NEED_MU, NEED_SUM)
        hit = (cols[None, :] == targets[:, None]) & col_ok[None, :]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    s = tl.load(S + rows, mask=row_ok, other=0.0)
    m_new = tl.maximum(m, m_slab)
    old_scale = tl.exp(m - m_new)  # 0 on the first slab (m = -inf)
    slab_scale = tl.exp(m_slab - m_new)
    tl.store(M + rows, m_new, mask=row_ok)
    tl.store(S + rows, s * old_scale + s_slab * slab_scale, mask=row_ok)
    tl.store(Tgt + rows, tgt, mask=row_ok)
    if NEED_MU:
        w = tl.load(W + rows, mask=row_ok, other=0.0)
        tl.store(W + rows, w * old_scale + w_slab * slab_scale, mask=row_ok)
    if NEED_SUM:
        tl.store(Sum + rows, zsum, mask=row_ok)
    if NEED_SLAB:
        tl.store(SlabLse + rows, m_slab + tl.log(s_slab), mask=row_ok)


@triton.jit
def row_grad_inputs(rows, row_ok, Lse, Mu, G_lse, G_tgt, G_sum, G_mu,
                    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr,
                    HAS_G_MU: tl.constexpr):
    """The per-row vectors the logit gradient reads: (lse, mu, g_lse, g_tgt, g_sum, g_mu); an absent
    gradient (and mu without g_mu) is a stand-in that :func:`logit_grad` never reads."""
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(G_lse + rows, mask=row_ok, other=0.0) if HAS_G_LSE else lse
    g_tgt = tl.load(G_tgt + rows, mask=row_ok, other=0.0) if HAS_G_TGT else lse
    g_sum = tl.load(G_sum + rows, mask=row_ok, other=0.0) if HAS_G_SUM else lse
    g_mu = tl.load(G_mu + rows, mask=row_ok, other=0.0) if HAS_G_MU else lse
    mu = tl.load(Mu + rows, mask=row_ok, other=0.0) if HAS_G_MU else lse
    return lse, mu, g_lse, g_tgt, g_sum, g_mu


@triton.jit
def logit_grad(z, Bias, cols, col_ok, targets, lse, mu, g_lse, g_tgt, g_sum, g_mu, softcap,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LSE: tl.constexpr,
               HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr, HAS_G_MU: tl.constexpr):
    """dLoss/dz (fp32) of a tile of raw logits z = e . c (rows x columns at vocabulary positions ``cols``):
    bias and softcap applied here, then g_lse p + g_mu p (1 + z - mu) + g_sum + g_tgt [col == target],
    times softcap's derivative."""
    z, th = _capped(z, Bias, cols, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    dz = tl.zeros(z.shape, tl.float32)
    if HAS_G_LSE:
        dz += g_lse[:, None] * p
    if HAS_G_MU:
        dz += g_mu[:, None] * p * (1.0 + z - mu[:, None])
    if HAS_G_SUM:
        dz += g_sum[:, None]
    if HAS_G_TGT:
        dz += tl.where(cols[None, :] == targets[:, None], g_tgt[:, None], 0.0)
    if HAS_SOFTCAP:
        dz *= 1.0 - th * th
    return dz


@triton.jit
def slab_grad_kernel(
    Z, DZ, Bias, Targets, Lse, Mu, G_lse, G_tgt, G_sum, G_mu,
    N, slab_cols, slab_start, stride_zn, stride_dzn, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr, HAS_G_MU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows[:, None].to(tl.int64)
    targets = tl.load(Targets + rows, mask=row_ok, other=-1).to(tl.int64)
    lse, mu, g_lse, g_tgt, g_sum, g_mu = row_grad_inputs(rows, row_ok, Lse, Mu, G_lse, G_tgt, G_sum, G_mu,
                                                         HAS_G_LSE, HAS_G_TGT, HAS_G_SUM, HAS_G_MU)
    for v0 in range(0, slab_cols, BLOCK_V):
        slot = v0 + tl.arange(0, BLOCK_V)
        col_ok = slot < slab_cols
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(Z + rows64 * stride_zn + slot[None, :], mask=mask, other=0.0)
        dz = logit_grad(z, Bias, slab_start + slot, col_ok, targets, lse, mu, g_lse, g_tgt, g_sum, g_mu, softcap,
                        HAS_BIAS, HAS_SOFTCAP, HAS_G_LSE, HAS_G_TGT, HAS_G_SUM, HAS_G_MU)
        # In place over Z when DZ aliases it. The stores land in columns [v0 / 2, (v0 + BLOCK_V) / 2) of
        # Z, which this step and earlier ones read; the barrier makes every warp finish this step's loads
        # first (warps are not in lockstep, and with no reduction in the loop nothing else syncs them).
        tl.debug_barrier()
        tl.store(DZ + rows64 * stride_dzn + slot[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


@triton.jit
def scatter_rows_kernel(Src, Dst, Index, n_rows, D, stride_src, stride_dst, Side, SideIndex, stride_side,
                        ADD: tl.constexpr, ROUND_BF16: tl.constexpr, HAS_SIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """Dst[Index[i]] = Src[i] (or += with ``ADD``, summed in fp32 and rounded once) for i < n_rows; rows with
    Index[i] < 0 are skipped. ``HAS_SIDE``: also Side[SideIndex[i]] = Src[i] where SideIndex[i] >= 0 (a second
    destination for some rows, in the same pass: ``gemm_impl.permute_rows_``'s parked rows).

    The sorted order's dC slab goes back to the vocabulary's rows this way. Index is a permutation's slice,
    so no two programs write one row and no atomics are needed: a pure copy at memory speed, where torch's
    ``index_put_`` on int32 indices moved a 4096 x 4096 bf16 slab at ~0.9 TB/s (77 us, H100) and
    ``index_add_`` adds with bf16 atomics."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dst_rows = tl.load(Index + rows, mask=rows < n_rows, other=-1).to(tl.int64)
    row_ok = (rows < n_rows) & (dst_rows >= 0)
    mask = row_ok[:, None] & (cols < D)[None, :]
    if HAS_SIDE:
        side_rows = tl.load(SideIndex + rows, mask=rows < n_rows, other=-1).to(tl.int64)
        side_mask = ((rows < n_rows) & (side_rows >= 0))[:, None] & (cols < D)[None, :]
        x = tl.load(Src + rows[:, None].to(tl.int64) * stride_src + cols[None, :], mask=mask | side_mask,
                    other=0.0)
        tl.store(Side + side_rows[:, None] * stride_side + cols[None, :], x, mask=side_mask)
    else:
        x = tl.load(Src + rows[:, None].to(tl.int64) * stride_src + cols[None, :], mask=mask, other=0.0)
    out = Dst + dst_rows[:, None] * stride_dst + cols[None, :]
    if ADD:
        x = x.to(tl.float32) + tl.load(out, mask=mask, other=0.0).to(tl.float32)
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even, as here
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    tl.store(out, x.to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def cycle_round_kernel(Jump, Low, Off, JumpOut, LowOut, OffOut, v, span, BLOCK: tl.constexpr):
    """One round of pointer jumping over a permutation's moves p -> nxt(p), for positions p < v.

    Before the round, Jump[p] = nxt^span(p), Low[p] the smallest position among p, nxt(p), ...,
    nxt^(span - 1)(p) and Off[p] the number of moves from p to its first occurrence there; after it (in the
    Out arrays) the same for a window of 2 span: the window of p joined with that of Jump[p]. Once the
    window covers p's whole cycle, Low[p] is the cycle's smallest position and Off[p] the moves from p to it.
    One launch per round, where torch needs seven (three gathers, a comparison, two selects, an add)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < v
    j = tl.load(Jump + p, mask=ok, other=0)
    low_p = tl.load(Low + p, mask=ok, other=0)
    off_p = tl.load(Off + p, mask=ok, other=0)
    low_j = tl.load(Low + j, mask=ok, other=0)
    off_j = tl.load(Off + j, mask=ok, other=0)
    later = low_j < low_p  # the window's first minimum lies in its second half
    tl.store(LowOut + p, tl.where(later, low_j, low_p), mask=ok)
    tl.store(OffOut + p, tl.where(later, span + off_j, off_p), mask=ok)
    tl.store(JumpOut + p, tl.load(Jump + j, mask=ok, other=0), mask=ok)


@triton.jit
def cycle_heads_kernel(Perm, Low, Off, Heads, Rank, Length, v, BLOCK: tl.constexpr):
    """After :func:`cycle_round_kernel`'s last round (Low[p] p's cycle's leader, Off[p] the moves from p to
    it): p's rank (moves from the leader to p), its cycle's length L (the leader's successor is L - 1 moves
    from the leader) and, at each leader, L (0 elsewhere: their running sum starts each cycle's list)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < v
    leader = tl.load(Low + p, mask=ok, other=0)
    off = tl.load(Off + p, mask=ok, other=0)
    length = tl.load(Off + tl.load(Perm + leader, mask=ok, other=0), mask=ok, other=0) + 1
    rank = tl.where(off == 0, 0, length - off)
    tl.store(Heads + p, tl.where(off == 0, length, 0), mask=ok)
    tl.store(Rank + p, rank, mask=ok)
    tl.store(Length + p, length, mask=ok)


@triton.jit
def cycle_list_kernel(Perm, Low, Rank, Length, Ends, Source, Target, SideIndex, SideTarget, v, batch,
                      BLOCK: tl.constexpr):
    """The move list of ``gemm_impl.plan_row_moves``: position p's place i in the list is its cycle's start
    (Ends at the leader, the running sum of the lengths, less the cycle's length) plus its rank. Source[i] = p;
    Target[i] = Perm[p], except for a cycle's last row whose cycle began in an earlier batch of ``batch``
    places: that row is parked (Target -1, SideIndex its batch, SideTarget[batch] = Perm[p]); SideIndex is
    -1 elsewhere. A batch holds at most one parked row, so SideTarget needs no reduction."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < v
    leader = tl.load(Low + p, mask=ok, other=0)
    rank = tl.load(Rank + p, mask=ok, other=0)
    length = tl.load(Length + p, mask=ok, other=1)
    i = tl.load(Ends + leader, mask=ok, other=0) - length + rank
    to = tl.load(Perm + p, mask=ok, other=0).to(tl.int32)
    first = (i // batch) * batch
    parked = (rank == length - 1) & (i - rank < first)
    tl.store(Source + i, p, mask=ok)
    tl.store(Target + i, tl.where(parked, -1, to), mask=ok)
    tl.store(SideIndex + i, tl.where(parked, i // batch, -1), mask=ok)
    tl.store(SideTarget + i // batch, to, mask=ok & parked)

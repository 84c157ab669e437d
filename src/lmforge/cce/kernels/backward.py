"""Backward kernel: recompute logit tiles, form the logit gradient, accumulate dE and dC in fp32.

Tiling. One program per BLOCK_N x BLOCK_V tile of the logit matrix. Vocabulary tiles are taken in the
order of ``Perm`` (the vocabulary sorted by mean logit over the batch), so that the tiles whose softmax
is negligible everywhere cluster and gradient filtering can skip them. A program:

1. recomputes z = softcap(E[rows] C[perm]^T + b) over D in BLOCK_D steps (fp32 accumulator);
2. forms p = exp(z - lse) and, if filtering is on, skips the tile when every p < filter_eps and no
   target and no uniform (label-smoothing) term lands in it -- those entries change dE and dC by less
   than the input dtype resolves;
3. dz = g_lse p + g_mu p (1 + z - mu) + g_sum + g_tgt [col == target], times 1 - tanh^2 for softcap;
4. casts dz to the input dtype for the tensor cores and, for each BLOCK_D slice of D, atomically adds
   dz C[perm] into the fp32 buffer dE32[rows] and dz^T E[rows] into dC32[perm]; db32 likewise.

Global memory. Reads E[rows] and C[perm] twice per tile (once for the recompute, once for the
gradient products); atomically adds (BLOCK_N + BLOCK_V) x D fp32 values per tile. Bounds: 6 N V D FLOP
for a full (unfiltered) pass -- three tile GEMMs -- and ~4 N V D (1/BLOCK_N + 1/BLOCK_V) bytes of
fp32 atomics, which is what large tiles amortise.
"""

import triton
import triton.language as tl

from lmforge.cce.kernels.forward import _dot, _tanh


@triton.jit
def lse_backward_kernel(
    E, C, Bias, Targets, Perm, Lse, Mu,
    G_lse, G_tgt, G_sum, G_mu,
    DE, DC, DB,
    N, V, D,
    stride_en, stride_ed, stride_cv, stride_cd,
    stride_den, stride_ded, stride_dcv, stride_dcd,
    softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr, HAS_G_MU: tl.constexpr,
    NEED_DE: tl.constexpr, NEED_DC: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    slots = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = slots < V
    cols = tl.load(Perm + slots, mask=col_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        e_blk = tl.load(E + rows[:, None] * stride_en + d[None, :] * stride_ed,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c_blk = tl.load(C + cols[:, None] * stride_cv + d[None, :] * stride_cd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(e_blk, tl.trans(c_blk), acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        th = _tanh(acc / softcap)
        acc = softcap * th

    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    valid = row_ok[:, None] & col_ok[None, :]
    p = tl.where(valid, tl.exp(acc - lse[:, None]), 0.0)
    targets = tl.load(Targets + rows, mask=row_ok, other=-1).to(tl.int64)
    is_target = (cols[None, :] == targets[:, None]) & valid

    keep = True
    if FILTER:
        # The launcher turns FILTER off when a uniform (label-smoothing) term touches every entry.
        keep = (tl.max(p) >= filter_eps) | (tl.sum(is_target.to(tl.int32)) > 0)
    if keep:
        dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        if HAS_G_LSE:
            g_lse = tl.load(G_lse + rows, mask=row_ok, other=0.0)
            dz += g_lse[:, None] * p
        if HAS_G_MU:
            g_mu = tl.load(G_mu + rows, mask=row_ok, other=0.0)
            mu = tl.load(Mu + rows, mask=row_ok, other=0.0)
            dz += g_mu[:, None] * p * (1.0 + acc - mu[:, None])
        if HAS_G_SUM:
            g_sum = tl.load(G_sum + rows, mask=row_ok, other=0.0)
            dz += tl.where(valid, g_sum[:, None], 0.0)
        if HAS_G_TGT:
            g_tgt = tl.load(G_tgt + rows, mask=row_ok, other=0.0)
            dz += tl.where(is_target, g_tgt[:, None], 0.0)
        if HAS_SOFTCAP:
            dz *= 1.0 - th * th
        if NEED_DB:
            tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_ok)
        dz_in = dz.to(E.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            if NEED_DE:
                c_blk = tl.load(C + cols[:, None] * stride_cv + d[None, :] * stride_cd,
                                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                de = _dot(dz_in, c_blk, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), UPCAST_DOT, DOT_PRECISION)
                tl.atomic_add(DE + rows[:, None] * stride_den + d[None, :] * stride_ded, de,
                              mask=row_ok[:, None] & d_ok[None, :])
            if NEED_DC:
                e_blk = tl.load(E + rows[:, None] * stride_en + d[None, :] * stride_ed,
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dc = _dot(tl.trans(dz_in), e_blk, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), UPCAST_DOT, DOT_PRECISION)
                tl.atomic_add(DC + cols[:, None] * stride_dcv + d[None, :] * stride_dcd, dc,
                              mask=col_ok[:, None] & d_ok[None, :])

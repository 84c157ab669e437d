"""Backward kernel: the logit gradient dz of one vocabulary slab, recomputed tile by tile.

The backward walks the (sorted) vocabulary in slabs of S columns. For each slab this kernel writes
dz[:, slab] (N x S, in the input dtype) and the launcher turns it into gradients with two dense GEMMs
on the tensor cores: dC[slab] = dz^T E (complete in one product, so it is rounded once, straight into
dC) and dE += dz C[slab] (accumulated over slabs in fp32). Peak extra memory is the dz slab plus one
fp32 copy of dE -- no fp32 copy of dC, no atomics.

Tiling. One program per BLOCK_N x BLOCK_V tile of the slab. A program first consults the forward's
tile map: if every SUB-row group's bound says the tile holds less than filter_eps of any row's
probability mass, and no row's target lies in the tile, it writes zeros and stops -- no loads of E or C. Otherwise it recomputes z = softcap(E[rows] C[perm]^T + b) over D in
BLOCK_D steps (fp32 accumulator), forms

    dz = g_lse p + g_mu p (1 + z - mu) + g_sum + g_tgt [col == target],   p = exp(z - lse),

times 1 - tanh^2 for softcap, and stores it.

Global memory per kept tile: (BLOCK_N + BLOCK_V) x D input elements read, BLOCK_N x BLOCK_V written.
Bounds: 2 N S D FLOP per slab for the kept tiles (the recompute), then 4 N S D in the two GEMMs.
"""

import triton
import triton.language as tl

from lmforge.cce.kernels.forward import _logit_tile, _tanh


@triton.jit
def logit_grad_kernel(
    E, C, Bias, Perm, TargetPos, Lse, Mu, Map,
    G_lse, G_tgt, G_sum, G_mu, DZ,
    N, V, D, slab_start, slab_cols, stride_map,
    stride_en, stride_ed, stride_cv, stride_cd, stride_dzn,
    softcap, log_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PERM: tl.constexpr, FILTER: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr, HAS_G_MU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr,
    MAP_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    slot = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the slab
    pos = slab_start + slot  # position in the sorted vocabulary
    col_ok = (slot < slab_cols) & (pos < V)
    out_ptrs = DZ + rows[:, None] * stride_dzn + slot[None, :]
    out_mask = row_ok[:, None] & (slot < slab_cols)[None, :]
    lse = tl.load(Lse + rows, mask=row_ok, other=float("inf"))
    # Sorted position of each row's target; -1 (never matches) for ignored rows.
    target_pos = tl.load(TargetPos + rows, mask=row_ok, other=-1)
    is_target = (pos[None, :] == target_pos[:, None]) & col_ok[None, :]

    keep = True
    if FILTER:
        subs = pid_n * (BLOCK_N // SUB) + tl.arange(0, BLOCK_N // SUB)
        tile = (slab_start + pid_v * BLOCK_V) // MAP_V  # the forward's tile (MAP_V columns) holding ours
        log_share = tl.load(Map + subs * stride_map + tile, mask=subs < tl.cdiv(N, SUB),
                            other=float("-inf")).to(tl.float32)
        keep = (tl.max(log_share) >= log_eps) | (tl.sum(is_target.to(tl.int32)) > 0)
    if keep:
        acc, cols = _logit_tile(E, C, Bias, Perm, rows, row_ok, pos, col_ok, D,
                                stride_en, stride_ed, stride_cv, stride_cd, 1.0,
                                HAS_BIAS, False, HAS_PERM, DOT_PRECISION, UPCAST_DOT,
                                BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_SOFTCAP:
            th = _tanh(acc / softcap)
            acc = softcap * th
        valid = row_ok[:, None] & col_ok[None, :]
        p = tl.where(valid, tl.exp(acc - lse[:, None]), 0.0)
        dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        if HAS_G_LSE:
            dz += tl.load(G_lse + rows, mask=row_ok, other=0.0)[:, None] * p
        if HAS_G_MU:
            g_mu = tl.load(G_mu + rows, mask=row_ok, other=0.0)
            mu = tl.load(Mu + rows, mask=row_ok, other=0.0)
            dz += g_mu[:, None] * p * (1.0 + acc - mu[:, None])
        if HAS_G_SUM:
            dz += tl.where(valid, tl.load(G_sum + rows, mask=row_ok, other=0.0)[:, None], 0.0)
        if HAS_G_TGT:
            dz += tl.where(is_target, tl.load(G_tgt + rows, mask=row_ok, other=0.0)[:, None], 0.0)
        if HAS_SOFTCAP:
            dz *= 1.0 - th * th
        tl.store(out_ptrs, dz.to(DZ.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, tl.zeros((BLOCK_N, BLOCK_V), DZ.dtype.element_ty), mask=out_mask)

"""GEMM-path backward on Hopper: one vocabulary slab's logit gradient dz straight from E and C, by TMA.

The GEMM path's backward visits the vocabulary one slab of S columns at a time. Before Hopper (and with
``LMFORGE_CCE_TMA=0`` or ``forward``) cuBLAS writes the slab's fp32 logits (N x S x 4 bytes; 128 MiB at
8192 tokens) and a memory-bound pass turns them into dz in place. Here one kernel does both: a program owns
BLOCK_N rows and a run of whole BLOCK_V-column tiles of the slab, whose classifier rows start at row
``c_row0`` of the descriptor's tensor (c itself, or the sorted order's gathered slab); for each tile it
accumulates E[rows] C[slab cols]^T over D (fp32, on chip; E and C tiles loaded through tensor
descriptors), applies bias and softcap, and stores the tile's dz (:func:`lmforge.cce.kernels.slab.logit_grad`)
in the inputs' dtype. The loop over tiles is flattened with the loop over D into one software pipeline, as
in the forward (:mod:`lmforge.cce.kernels.tma_forward`).

Reads: E's rows once per tile and C's slab rows once per row block (2 (BLOCK_N + BLOCK_V) D bytes per
tile, mostly from L2), six fp32 vectors per row. Writes: dz, 2 N S bytes (half the fp32 slab it replaces,
which was also read back). FLOPs: 2 N S D per slab, the same products cuBLAS computed; the two products
that follow (dE += dz C, dC = dz^T E) stay with cuBLAS.

With ``FP8`` (for the lse and target-logit gradients together, and only those) the kernel also writes the
softmax part of dz, f g_lse p (the target's g_tgt term left out), in e4m3 to Q8, each row of each
BLOCK_V-column tile scaled to e4m3's range by a bound from the tile's largest logit, the scale to
QScale[row, tile]: the operand
of the e4m3 dE product (:mod:`lmforge.cce.kernels.fp8`).
"""

import triton
import triton.language as tl

from lmforge.cce.kernels.fp8 import E4M3, to_e4m3
from lmforge.cce.kernels.slab import _capped, logit_grad, row_grad_inputs
from lmforge.cce.kernels.tma_forward import row_block


@triton.jit
def logit_grad_tma_kernel(
    e_desc, c_desc, DZ, Bias, Targets, Lse, Mu, G_lse, G_tgt, G_sum, G_mu, Q8, QScale,
    N, slab_cols, slab_start, c_row0, v_per_split, stride_dzn, stride_q8, stride_qs, softcap,
    D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUM: tl.constexpr, HAS_G_MU: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FLATTEN: tl.constexpr, FP8: tl.constexpr,
):
    row0, rows, row_ok, targets = row_block(Targets, N, tl.program_id(0), BLOCK_N)
    lse, mu, g_lse, g_tgt, g_sum, g_mu = row_grad_inputs(rows, row_ok, Lse, Mu, G_lse, G_tgt, G_sum, G_mu,
                                                         HAS_G_LSE, HAS_G_TGT, HAS_G_SUM, HAS_G_MU)
    v_begin = tl.program_id(1) * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, slab_cols)
    rows64 = rows[:, None].to(tl.int64)
    for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=FLATTEN):
        slot = v0 + tl.arange(0, BLOCK_V)
        col_ok = slot < v_end
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in tl.range(0, D, BLOCK_D):
            a = e_desc.load([row0, d0])
            b = c_desc.load([c_row0 + v0, d0])  # rows past the slab (the next slab's, or zeros) are masked below
            if UPCAST:  # the interpreter multiplies 16-bit tiles as raw bits; fp32 gives the GPU's products
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        mask = row_ok[:, None] & col_ok[None, :]
        if FP8:  # dz = q + f g_tgt [col == target] with q = f g_lse p, q's tile in e4m3 as well
            z, th = _capped(acc, Bias, slab_start + slot, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)
            hit = slab_start + slot[None, :] == targets[:, None]
            g_hit = g_tgt  # the target term's weight, f at the target folded in below (one column per row)
            # Each row's e4m3 scale from the tile's largest logit: |q| <= |g_lse| exp(z_max - lse) (f <= 1; equal
            # without softcap), so q is quantised as it is formed, with no pass over q first. Compiled for
            # sm_90 (Triton 3.9) this order spills 72 registers; a pass for q's maximum, 104 (the shipped
            # kernel, FP8 off, none): q's tile, dz's and their stores' layout changes exceed the 255 registers.
            z_max = tl.max(tl.where(mask, z, -float("inf")), axis=1)
            bound = tl.abs(g_lse) * tl.exp(z_max - lse)
            scale = tl.where(bound > 0, bound / E4M3, 1.0)
            q = g_lse[:, None] * tl.exp(z - lse[:, None])
            if HAS_SOFTCAP:
                f = 1.0 - th * th
                q *= f
                g_hit = g_tgt * tl.sum(tl.where(hit, f, 0.0), axis=1)
            tl.store(Q8 + rows64 * stride_q8 + slot[None, :], to_e4m3(q / scale[:, None], UPCAST), mask=mask)
            tl.store(DZ + rows64 * stride_dzn + slot[None, :],
                     (q + tl.where(hit, g_hit[:, None], 0.0)).to(DZ.dtype.element_ty), mask=mask)
            tl.store(QScale + rows * stride_qs + v0 // BLOCK_V, scale, mask=row_ok)
        else:
            dz = logit_grad(acc, Bias, slab_start + slot, col_ok, targets, lse, mu, g_lse, g_tgt, g_sum, g_mu,
                            softcap, HAS_BIAS, HAS_SOFTCAP, HAS_G_LSE, HAS_G_TGT, HAS_G_SUM, HAS_G_MU)
            tl.store(DZ + rows64 * stride_dzn + slot[None, :], dz.to(DZ.dtype.element_ty), mask=mask)

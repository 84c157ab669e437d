"""e4m3 pieces of the exact backward's dE product (experimental: ``LMFORGE_CCE_FP8_DE=1``).

For the mean loss dE = sum_v dz_v C_v, and dz_v = f_v (g_lse p_v + g_tgt [v == target]) with f the softcap's
derivative. Where the softmax is flat (random data: the backward runs exact, in vocabulary order) the
softmax part sum_v g_lse p_v f_v C_v is ~2% of dE's norm at Gemma 2's vocabulary, so it can take e4m3
products (a few % of its own norm, ~3e-4 of dE's) while the target rows, added apart in fp32, keep dE's
accuracy (bench/cce_fp8_probe.py measures both sides). The logit-gradient kernel writes that softmax part
quantised (:mod:`lmforge.cce.kernels.tma_grad` with ``FP8``: one scale per row and BLOCK_V-column tile, so
no row maximum is needed beforehand); :func:`fp8_transpose_kernel` turns a classifier piece into the e4m3
operand an fp8 tensor-core product wants (contraction dimension contiguous: the piece transposed);
:func:`fp8_accumulate_kernel` adds the product into the chunk's fp32 dE accumulator, scaling each K block by
its rows' tile scales.
"""

import triton
import triton.language as tl

E4M3_MAX = 448.0  # e4m3fn's largest finite value
E4M3 = tl.constexpr(E4M3_MAX)  # the same, for the kernels


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 x to e4m3 (round to nearest even, saturating at +-448). The GPU converts in hardware; Triton's
    interpreter (``EMULATE``) drops the carry when a mantissa rounds up into the next binade (1.99 becomes 1,
    not 2), so there x is first rounded onto e4m3's grid in fp32 (exactly: a power-of-two step and the
    round-to-even of an fp32 addition) and the cast only stores it."""
    x = tl.clamp(x, -E4M3, E4M3)
    if EMULATE:
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        step = ((tl.maximum(exponent - 3, -9) + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
        x = ((x / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: fp32's rounding to an integer
    return x.to(tl.float8e4nv)


@triton.jit
def fp8_transpose_kernel(C, Out, inv_scale, cols, D, stride_c, stride_out, EMULATE: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[d, v] = e4m3(C[v, d] * inv_scale) for v < cols, d < D: a classifier piece, transposed."""
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (v < cols)[:, None] & (d < D)[None, :]
    x = tl.load(C + v[:, None].to(tl.int64) * stride_c + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + d[None, :].to(tl.int64) * stride_out + v[:, None], to_e4m3(x * inv_scale, EMULATE), mask=mask)


@triton.jit
def fp8_accumulate_kernel(a_desc, b_desc, Acc, Scale, col_scale, KNorm2, Est2, M, N, K, stride_acc, stride_scale,
                          SCALE_K: tl.constexpr, PER_BLOCK: tl.constexpr, ESTIMATE: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Acc[M, N] += sum_k A[:, k] B[:, k]^T Scale[:, k // SCALE_K] * col_scale for e4m3 A (M x K) and B
    (N x K, K contiguous), read by tensor descriptors. With ``PER_BLOCK`` each BLOCK_K block's product is
    formed on its own and scaled by its rows' scales as it is added (BLOCK_K divides SCALE_K); without, the
    scale is one per row (column 0 of Scale), applied once in the epilogue, and the products chain in one
    accumulator. The fp32 accumulator is read, added to and written once, in the epilogue.

    With ``ESTIMATE`` (and ``PER_BLOCK``) the programs of the first column of output tiles also add
    sum_k (A[:, k] Scale[:, k // SCALE_K])^2 KNorm2[k // SCALE_K] to Est2[rows]: the e4m3 product's error
    model, with the squared norms of B's rows bounded per scale block (KNorm2), from the A tiles already in
    shared memory (the other programs skip it)."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // n_tiles_n, pid % n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    energy = tl.zeros((BLOCK_M,), tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        if UPCAST:  # the interpreter: the e4m3 values' exact products, in fp32
            a, b = a.to(tl.float32), b.to(tl.float32)
        if PER_BLOCK:
            if UPCAST:
                part = tl.dot(a, b.T, input_precision="ieee")
            else:
                part = tl.dot(a, b.T)
            scale = tl.load(Scale + rows * stride_scale + k // SCALE_K, mask=row_ok, other=0.0)
            acc += part * scale[:, None]
            if ESTIMATE:
                if pid_n == 0:
                    a32 = a.to(tl.float32)
                    energy += tl.sum(a32 * a32, axis=1) * (scale * scale) * tl.load(KNorm2 + k // SCALE_K)
        elif UPCAST:
            acc = tl.dot(a, b.T, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.T, acc)
    if not PER_BLOCK:
        acc *= tl.load(Scale + rows * stride_scale, mask=row_ok, other=0.0)[:, None]
    if ESTIMATE:
        if pid_n == 0:
            tl.store(Est2 + rows, tl.load(Est2 + rows, mask=row_ok, other=0.0) + energy, mask=row_ok)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols < N)[None, :]
    ptr = Acc + rows[:, None].to(tl.int64) * stride_acc + cols[None, :]
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc * col_scale, mask=mask)

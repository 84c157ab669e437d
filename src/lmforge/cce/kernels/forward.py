"""Forward kernel: per-token log-sum-exp and target logit without writing logits.

Tiling. The (N x V) logit matrix z = softcap(E C^T + b) is cut into BLOCK_N x BLOCK_V tiles. The
vocabulary is visited in the order ``Perm`` (sorted by mean logit when the backward will filter, else
the identity). Program (pid_n, pid_s) owns rows [pid_n * BLOCK_N, +BLOCK_N) and one contiguous split of
``v_per_split`` sorted positions (a multiple of BLOCK_V). It walks its split tile by tile; for each tile
it accumulates E[rows] C[perm]^T over D in BLOCK_D steps with tl.dot (fp32 accumulator, on chip),
applies bias and softcap, and folds the tile into an online log-sum-exp (running max m, running sum
s = sum exp(z - m)), plus, when asked, the softmax-weighted logit sum w = sum exp(z - m) z, the plain
logit sum, and the target logit if the target falls in this tile.

Tile map. With WRITE_MAP, each program first computes the log-sum-exp of its rows over the head of the
sorted vocabulary (the first BLOCK_V positions), a lower bound lse_floor <= lse. Each tile then records,
for every SUB consecutive rows, the largest log sum_{j in tile} exp(z_ij) - lse_floor_i: an upper bound
on the log of the softmax mass any of those rows puts in the tile. The backward skips tiles whose bound
is below log(filter_eps) without recomputing them. (N / SUB) x (V / BLOCK_V) fp16 values: 0.25 MB at
N = 8192, V = 256000 with 256-wide tiles. Cost: one extra tile per program.

Global memory. Reads: E[rows] once per vocabulary tile (N * D * V / BLOCK_V elements in all) and each
C row once per token block (V * D * N / BLOCK_N elements). Writes: fp32 partials per (split, row)
(the split's log-sum-exp and target logit, and when asked its mean logits),
combined by a few tiny torch ops in the launcher, and the tile map. Nothing of size N x V.

Bounds. 2 N V D FLOP on the tensor cores; bytes ~ 2 (N D V / BLOCK_V + V D N / BLOCK_N) for bf16, so
with 128 x 128 tiles the kernel is matmul-bound for D >= ~256 (H200: ~790 TFLOP/s bf16 measured).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh through exp so it also runs under TRITON_INTERPRET; 1 - 2 / (exp(2x) + 1) is exact at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 tiles as their raw uint16 bits; upcasting first gives
    # the GPU's result (a product of two 16-bit floats is exact in fp32, the sum accumulates in fp32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _add_target_logit(tgt, acc, cols, targets, col_ok):
    """tgt + each row's logit at its target's column, where that column is in this tile."""
    hit = (cols[None, :] == targets[:, None]) & col_ok[None, :]
    return tgt + tl.sum(tl.where(hit, acc, 0.0), axis=1)


@triton.jit
def fold_tile(z, col_ok, m, s, w, zsum, NEED_MU: tl.constexpr, NEED_SUM: tl.constexpr):
    """Fold a tile of fp32 logits z (rows x columns; columns outside col_ok ignored) into each row's online
    statistics: running max m, s = sum exp(z - m), and when asked the softmax-weighted logit sum w (same
    scale as s) and the plain logit sum. Returns (m, s, w, zsum, the tile's sum exp(z - new m))."""
    zm = tl.where(col_ok[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    scale = tl.exp(m - m_new)
    p = tl.exp(zm - m_new[:, None])
    tile_mass = tl.sum(p, axis=1)
    s = s * scale + tile_mass
    if NEED_MU:
        w = w * scale + tl.sum(tl.where(col_ok[None, :], p * z, 0.0), axis=1)
    if NEED_SUM:
        zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    return m_new, s, w, zsum, tile_mass


@triton.jit
def _store_split(L_out, Tgt_out, out, m, s, tgt, row_ok):
    """A split's partials: its log-sum-exp m + log s and target logit at offsets ``out``."""
    tl.store(L_out + out, m + tl.log(s), mask=row_ok)
    tl.store(Tgt_out + out, tgt, mask=row_ok)


@triton.jit
def _logit_tile(E, C, Bias, Perm, rows, row_ok, pos, col_ok, D,
                stride_en, stride_ed, stride_cv, stride_cd, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PERM: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits of rows x (vocabulary at sorted positions pos), and the vocabulary ids of pos."""
    if HAS_PERM:
        cols = tl.load(Perm + pos, mask=col_ok, other=0).to(tl.int64)
    else:
        cols = pos.to(tl.int64)
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
        acc = softcap * _tanh(acc / softcap)
    return acc, cols


@triton.jit
def lse_forward_kernel(
    E, C, Bias, Targets, Perm,
    L_out, W_out, Sum_out, Tgt_out, Map,
    N, V, D, v_per_split, stride_map,
    stride_en, stride_ed, stride_cv, stride_cd,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PERM: tl.constexpr, WRITE_MAP: tl.constexpr,
    NEED_SUM: tl.constexpr, NEED_MU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(Targets + rows, mask=row_ok, other=-1).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    if WRITE_MAP:
        # A lower bound of each row's lse from the head of the sorted vocabulary (one extra tile per
        # program): the map stores tile masses relative to it, an upper bound of the probability mass
        # that needs no cross-row comparison in the backward.
        head = tl.arange(0, BLOCK_V)
        head_ok = head < V
        z_head, _ = _logit_tile(E, C, Bias, Perm, rows, row_ok, head, head_ok, D,
                                stride_en, stride_ed, stride_cv, stride_cd, softcap,
                                HAS_BIAS, HAS_SOFTCAP, HAS_PERM, DOT_PRECISION, UPCAST_DOT,
                                BLOCK_N, BLOCK_V, BLOCK_D)
        z_head = tl.where(head_ok[None, :], z_head, float("-inf"))
        head_max = tl.max(z_head, axis=1)
        lse_floor = head_max + tl.log(tl.sum(tl.exp(z_head - head_max[:, None]), axis=1))
    v_begin = pid_s * v_per_split
    for v_step in range(0, v_per_split, BLOCK_V):
        v0 = v_begin + v_step
        # v_per_split is a multiple of BLOCK_V, so only the last split can run past V.
        if v0 < V:
            pos = v0 + tl.arange(0, BLOCK_V)
            col_ok = pos < V
            acc, cols = _logit_tile(E, C, Bias, Perm, rows, row_ok, pos, col_ok, D,
                                    stride_en, stride_ed, stride_cv, stride_cd, softcap,
                                    HAS_BIAS, HAS_SOFTCAP, HAS_PERM, DOT_PRECISION, UPCAST_DOT,
                                    BLOCK_N, BLOCK_V, BLOCK_D)
            m, s, w, zsum, tile_mass = fold_tile(acc, col_ok, m, s, w, zsum, NEED_MU, NEED_SUM)
            if WRITE_MAP:
                log_share = m + tl.log(tile_mass) - lse_floor  # >= log of the tile's softmax mass
                sub_max = tl.max(tl.reshape(log_share, (BLOCK_N // SUB, SUB)), axis=1)
                subs = pid_n * (BLOCK_N // SUB) + tl.arange(0, BLOCK_N // SUB)
                # Round up before fp16 so the stored bound never undershoots.
                bound = sub_max + 1e-3 * tl.abs(sub_max) + 1e-3
                tl.store(Map + subs * stride_map + v0 // BLOCK_V, bound.to(tl.float16),
                         mask=subs < tl.cdiv(N, SUB))
            tgt = _add_target_logit(tgt, acc, cols, targets, col_ok)

    # One log-sum-exp per (split, row) -- and the split's softmax-weighted mean logit -- keep the
    # partials small; a split that saw no column stores -inf.
    out = pid_s * N + rows
    _store_split(L_out, Tgt_out, out, m, s, tgt, row_ok)
    if NEED_MU:
        tl.store(W_out + out, w / s, mask=row_ok)
    if NEED_SUM:
        tl.store(Sum_out + out, zsum, mask=row_ok)

"""The GEMM path of Cut Cross-Entropy: cuBLAS logit slabs, Triton passes over them (impl="gemm").

Same contract as :mod:`lmforge.cce.chunked` and :mod:`lmforge.cce.triton_impl`. The vocabulary is cut into
slabs of S columns; for each slab cuBLAS writes the float32 logits Z = E C[slab]^T (N x S, bf16 x bf16
products accumulated and stored in fp32), and a memory-bound Triton pass reads them once:

* forward: fold Z into running per-row statistics (:func:`slab_stats_kernel`);
* backward: recompute Z, turn it into dz in place (:func:`slab_grad_kernel`), then dC[slab] = dz^T E
  (complete in one product, rounded once) and dE += dz C[slab] (fp32 accumulator).

Why a second GPU path: the fused Triton kernels never hold a slab (forward extra memory is a few
vectors), but on the H200 they reach about half of the tensor cores' rate, while cuBLAS reaches most of
it. Here the price is one slab of workspace (``slab_bytes``, default 128 MiB, fp32) plus the fp32 dE
accumulator. Logits are fp32 end to end, so accuracy is that of the chunked float32 path up to dz's
rounding to the input dtype.

Gradient filtering (``filter_eps``): a dense GEMM cannot skip tiles, but it can skip rows. The forward
visits the vocabulary sorted by mean logit (:func:`lmforge.cce.triton_impl.vocab_order`) and stores every
row's log-sum-exp over each slab (N x n_slabs floats), so the backward knows each row's softmax mass per
slab without recomputing anything. Each row drops its lightest slabs while their summed mass stays
<= filter_eps (:func:`kept_rows`); a slab's three products then run over the gathered rows that keep it.
On SmolLM2's real activations (8192 tokens, 4096-column slabs, filter_eps 2^-12) rows keep 47% of (slab, row)
pairs (72% without the sort).
"""

from __future__ import annotations

import os

import torch

from lmforge.cce.triton_impl import HAS_TRITON, _accumulate_matmul, interpreting

if HAS_TRITON:
    import triton

    from lmforge.cce.kernels.slab import slab_grad_kernel, slab_stats_kernel

DEFAULT_SLAB_BYTES = 128 << 20
# The filtered backward updates the gathered rows of the fp32 dE through blocks of at most this size.
DE_BLOCK_BYTES = 16 << 20
# Gradient filtering runs only from this hidden size up: below it the slab products are so cheap that the
# sort, the per-slab gathers and the scatters cost more than the skipped work (H200, SmolLM2's real data,
# D = 576: 10.6 ms forward+backward filtered, 5.1 ms exact in an earlier call; Gemma's calibrated data,
# D = 2304: 48.6 ms filtered, 67.1 exact).
FILTER_MIN_D = 1024
# A slab whose kept rows exceed this share of all rows runs over every row: the few rows saved do not pay
# for the gathers (E rows, six per-row vectors, a gather and scatter of fp32 dE).
DENSE_SHARE = 0.9


def filters(d: int) -> bool:
    """Whether the GEMM path filters gradients at hidden size ``d`` (see FILTER_MIN_D)."""
    return d >= FILTER_MIN_D


def slab_columns(n: int, vocab: int, slab_bytes: int | None = None) -> int:
    """Columns per slab: the fp32 (n x S) logit slab fits ``slab_bytes`` (LMFORGE_CCE_SLAB_MB overrides),
    S a multiple of 128 (whole tensor-core tiles for cuBLAS) unless the budget or the vocabulary is smaller."""
    if slab_bytes is None:
        slab_bytes = int(float(os.environ.get("LMFORGE_CCE_SLAB_MB", DEFAULT_SLAB_BYTES / 2**20)) * 2**20)
    cols = slab_bytes // (4 * max(n, 1))
    cols = cols // 128 * 128 if cols >= 128 else max(16, cols)
    return min(cols, vocab)


def _blocks(device: torch.device) -> dict:
    if device.type != "cuda":  # interpreter: small tiles keep numpy work small
        return dict(BLOCK_N=16, BLOCK_V=16)
    return dict(BLOCK_N=8, BLOCK_V=512, num_warps=4)


def _launch(cfg: dict) -> dict:
    return {} if interpreting() else {"num_warps": cfg["num_warps"]}


_FP32_OUT_MM: dict = {}


def _logits_into(out: torch.Tensor, e: torch.Tensor, c_slab: torch.Tensor) -> None:
    """out (n x S, float32) = e @ c_slab^T, the products of 16-bit inputs stored in fp32 without rounding.

    cuBLAS writes fp32 output from bf16/fp16 operands (torch's mm with out_dtype); where that is missing
    (the CPU, older torch) the operands are upcast.
    """
    if e.dtype == out.dtype:
        torch.mm(e, c_slab.t(), out=out)
        return
    key = (out.device.type, e.dtype)
    if _FP32_OUT_MM.get(key, e.is_cuda):
        try:
            torch.mm(e, c_slab.t(), out_dtype=torch.float32, out=out)
            _FP32_OUT_MM[key] = True
            return
        except (TypeError, RuntimeError):  # no out_dtype overload in this torch / for this device
            _FP32_OUT_MM[key] = False
    torch.mm(e.float(), c_slab.float().t(), out=out)


def _slab_view(buffer: torch.Tensor, n: int, cols: int) -> torch.Tensor:
    return buffer[: n * cols].view(n, cols)


def n_slabs(n: int, vocab: int, slab_bytes: int | None = None) -> int:
    """How many slabs cover the vocabulary (the rows of the forward's per-slab log-sum-exp table)."""
    return -(-vocab // slab_columns(n, vocab, slab_bytes))


def _permuted(targets: torch.Tensor, bias, perm, vocab: int):
    """Targets as positions in the sorted vocabulary (-1 where a target is no vocabulary index) and the
    bias in sorted order: the kernels compare and index by column position."""
    if perm is None:
        return targets, bias
    position = torch.empty(vocab, dtype=torch.int64, device=perm.device)
    position[perm.long()] = torch.arange(vocab, device=perm.device)
    valid = (targets >= 0) & (targets < vocab)
    sorted_targets = torch.where(valid, position[targets.clamp(0, vocab - 1).long()], -1)
    return sorted_targets, (bias[perm.long()] if bias is not None else None)


def _classifier_slab(c, perm, start: int, cols: int, buffer):
    """Rows [start, start + cols) of the classifier in (optionally sorted) vocabulary order."""
    if perm is None:
        return c[start:start + cols]
    out = buffer[:cols]
    torch.index_select(c, 0, perm[start:start + cols], out=out)
    return out


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False, slab_bytes=None,
                  perm=None, slab_lse=None):
    """Per-token (lse, target_logit, sum_logit, mean_logit), float32, shape (N,) each.

    ``perm``: visit the vocabulary in this order (int32, from :func:`lmforge.cce.triton_impl.vocab_order`),
    so that slabs hold tokens of similar mean logit. ``slab_lse``: a float32 (:func:`n_slabs`, N) tensor that
    receives every row's log-sum-exp over each slab (in visiting order), which the filtered backward needs.
    """
    n, vocab = e.shape[0], c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    cfg = _blocks(e.device)
    f32 = dict(dtype=torch.float32, device=e.device)
    m = torch.full((n,), float("-inf"), **f32)
    s = torch.zeros(n, **f32)
    w = torch.zeros(n, **f32) if need_mu else s
    zsum = torch.zeros(n, **f32) if need_sum else s
    tgt = torch.zeros(n, **f32)
    if slab_lse is not None and tuple(slab_lse.shape) != (n_slabs(n, vocab, slab_bytes), n):
        raise ValueError(f"slab_lse must have shape {(n_slabs(n, vocab, slab_bytes), n)}, got {tuple(slab_lse.shape)}")
    slab_targets, slab_bias = _permuted(targets, bias, perm, vocab)
    c_buffer = torch.empty((cols_per_slab, c.shape[1]), dtype=c.dtype, device=c.device) if perm is not None else None
    buffer = torch.empty(n * cols_per_slab, **f32)
    for index, start in enumerate(range(0, vocab, cols_per_slab)):
        cols = min(cols_per_slab, vocab - start)
        z = _slab_view(buffer, n, cols)
        _logits_into(z, e, _classifier_slab(c, perm, start, cols, c_buffer))
        slab_stats_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            z, slab_bias if slab_bias is not None else z, slab_targets, m, s, w, zsum, tgt,
            slab_lse[index] if slab_lse is not None else m,
            n, cols, start, z.stride(0), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum, NEED_MU=need_mu,
            NEED_SLAB=slab_lse is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg),
        )
    del buffer, c_buffer
    lse = m + torch.log(s)
    mean_logit = w / s if need_mu else torch.zeros_like(lse)
    return lse, tgt, (zsum if need_sum else torch.zeros_like(lse)), mean_logit


def kept_rows(slab_lse, lse, g_lse, g_tgt, slab_targets, cols_per_slab: int, filter_eps: float) -> torch.Tensor:
    """(n_slabs, N) bool: which rows each slab's backward must visit.

    Row i loses the slabs of smallest softmax mass, as many as keep their summed mass <= ``filter_eps``
    (their logit gradients g_lse_i p_ij are what filtering drops), except the slab holding its target when
    g_tgt_i != 0; a row with g_lse_i = 0 (an ignored token) needs no slab but that one.
    """
    mass = torch.exp(slab_lse - lse[None, :])
    ordered, order = torch.sort(mass, dim=0)
    droppable = torch.zeros_like(mass, dtype=torch.bool).scatter_(0, order, ordered.cumsum(0) <= filter_eps)
    keep = ~droppable
    if g_lse is not None:
        keep &= (g_lse != 0)[None, :]
    else:
        keep.zero_()
    if g_tgt is not None:
        rows = torch.nonzero((g_tgt != 0) & (slab_targets >= 0)).squeeze(1)
        keep[slab_targets[rows] // cols_per_slab, rows] = True
    return keep


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, slab_bytes=None, perm=None, slab_lse=None,
             filter_eps=None, de_dtype=None):
    """Gradients (dE, dC, db) for upstream per-token gradients of the four statistics.

    Exact unless ``filter_eps`` and the forward's ``slab_lse`` (same ``perm``) are given and only g_lse /
    g_tgt are: then each slab's products run over the rows :func:`kept_rows` keeps (gathered), so every row
    loses at most ``filter_eps`` of its softmax mass to skipped slabs and the skipped work is never done.
    dE is accumulated in float32 and returned in ``de_dtype`` (default e's dtype).
    """
    n, d = e.shape
    vocab = c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    cfg = _blocks(e.device)
    slab_targets, slab_bias = _permuted(targets, bias, perm, vocab)
    counts, gathered = None, {}
    if filter_eps is not None and slab_lse is not None and g_sum is None and g_mu is None:
        keep = kept_rows(slab_lse, lse, g_lse, g_tgt, slab_targets, cols_per_slab, filter_eps)
        # Two host syncs for the whole plan (a count per slab, the rows of the slabs to gather), not one
        # per slab: each sync idles the GPU while the next slab's launches queue.
        counts = keep.sum(dim=1).tolist()
        chosen = [i for i, count in enumerate(counts) if 0 < count <= DENSE_SHARE * n]
        if chosen:
            picked = keep.index_select(0, torch.tensor(chosen, device=keep.device))
            rows_flat = torch.nonzero(picked)[:, 1]  # slab-major, rows ascending within a slab
            gathered = dict(zip(chosen, torch.split(rows_flat, [counts[i] for i in chosen])))
        del keep
    buffer = torch.empty(n * cols_per_slab, dtype=torch.float32, device=e.device)
    de32 = torch.zeros((n, d), dtype=torch.float32, device=e.device) if need_de else None
    dc = torch.empty_like(c, memory_format=torch.contiguous_format) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    c_buffer = torch.empty((cols_per_slab, d), dtype=c.dtype, device=c.device) if perm is not None else None
    dc_buffer = torch.empty((cols_per_slab, d), dtype=c.dtype, device=c.device) if perm is not None and need_dc \
        else None
    # dz lives in the logit buffer: in the inputs' dtype, row i over the first bytes of row i of z.
    narrow = buffer.view(e.dtype) if e.dtype != torch.float32 else buffer
    per_z = narrow.numel() // buffer.numel()  # elements of dz per element of z (2 for 16-bit inputs)
    vectors = (lse, mean_logit if g_mu is not None else lse, g_lse if g_lse is not None else lse,
               g_tgt if g_tgt is not None else lse, g_sum if g_sum is not None else lse,
               g_mu if g_mu is not None else lse)
    for index, start in enumerate(range(0, vocab, cols_per_slab)):
        cols = min(cols_per_slab, vocab - start)
        c_slab = _classifier_slab(c, perm, start, cols, c_buffer)
        dc_slab = None
        if need_dc:
            dc_slab = dc[start:start + cols] if perm is None else dc_buffer[:cols]
        rows = gathered.get(index)  # None: every row (all kept, or so many that gathering does not pay)
        if counts is not None and counts[index] == 0:
            if dc_slab is not None:
                dc_slab.zero_()
        else:
            e_rows = e if rows is None else e.index_select(0, rows)
            k = e_rows.shape[0]
            z = _slab_view(buffer, k, cols)
            _logits_into(z, e_rows, c_slab)
            dz = narrow[: k * cols * per_z].view(k, cols * per_z)[:, :cols]
            row_vectors = vectors if rows is None else tuple(v.index_select(0, rows) for v in vectors)
            row_targets = slab_targets if rows is None else slab_targets.index_select(0, rows)
            slab_grad_kernel[(triton.cdiv(k, cfg["BLOCK_N"]),)](
                z, dz, slab_bias if slab_bias is not None else z, row_targets, *row_vectors,
                k, cols, start, z.stride(0), dz.stride(0), float(softcap) if softcap is not None else 1.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None,
                HAS_G_SUM=g_sum is not None, HAS_G_MU=g_mu is not None,
                BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg),
            )
            if dc_slab is not None:
                torch.mm(dz.t(), e_rows, out=dc_slab)
            if need_de:
                if rows is None:
                    _accumulate_matmul(de32, dz, c_slab)
                else:  # gather, accumulate, scatter back, a bounded block of rows at a time
                    step = max(128, DE_BLOCK_BYTES // (4 * d))
                    for r0 in range(0, k, step):
                        part = rows[r0:r0 + step]
                        de_part = de32.index_select(0, part)
                        _accumulate_matmul(de_part, dz[r0:r0 + step], c_slab)
                        de32.index_copy_(0, part, de_part)
            if need_db:
                db_slab = dz.sum(dim=0, dtype=torch.float32)
                if perm is None:
                    db32[start:start + cols] += db_slab
                else:
                    db32.index_add_(0, perm[start:start + cols].long(), db_slab)
        if dc_slab is not None and perm is not None:
            dc.index_copy_(0, perm[start:start + cols].long(), dc_slab)
    del buffer
    de = de32.to(de_dtype or e.dtype) if need_de else None
    db = db32.to(bias.dtype) if need_db else None
    return de, dc, db

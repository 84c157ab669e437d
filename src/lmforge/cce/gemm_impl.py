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
accumulator, and no gradient filtering (a dense GEMM cannot skip tiles). Logits are fp32 end to end, so
accuracy is that of the chunked float32 path up to dz's rounding to the input dtype.
"""

from __future__ import annotations

import os

import torch

from lmforge.cce.triton_impl import HAS_TRITON, _accumulate_matmul, interpreting

if HAS_TRITON:
    import triton

    from lmforge.cce.kernels.slab import slab_grad_kernel, slab_stats_kernel

DEFAULT_SLAB_BYTES = 128 << 20


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


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False, slab_bytes=None):
    """Per-token (lse, target_logit, sum_logit, mean_logit), float32, shape (N,) each."""
    n, vocab = e.shape[0], c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    cfg = _blocks(e.device)
    f32 = dict(dtype=torch.float32, device=e.device)
    m = torch.full((n,), float("-inf"), **f32)
    s = torch.zeros(n, **f32)
    w = torch.zeros(n, **f32) if need_mu else s
    zsum = torch.zeros(n, **f32) if need_sum else s
    tgt = torch.zeros(n, **f32)
    buffer = torch.empty(n * cols_per_slab, **f32)
    for start in range(0, vocab, cols_per_slab):
        cols = min(cols_per_slab, vocab - start)
        z = _slab_view(buffer, n, cols)
        _logits_into(z, e, c[start:start + cols])
        slab_stats_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            z, bias if bias is not None else z, targets, m, s, w, zsum, tgt,
            n, cols, start, z.stride(0), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_SUM=need_sum, NEED_MU=need_mu,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg),
        )
    del buffer
    lse = m + torch.log(s)
    mean_logit = w / s if need_mu else torch.zeros_like(lse)
    return lse, tgt, (zsum if need_sum else torch.zeros_like(lse)), mean_logit


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, slab_bytes=None):
    """Gradients (dE, dC, db) for upstream per-token gradients of the four statistics. Exact: no filtering."""
    n, d = e.shape
    vocab = c.shape[0]
    cols_per_slab = slab_columns(n, vocab, slab_bytes)
    cfg = _blocks(e.device)
    buffer = torch.empty(n * cols_per_slab, dtype=torch.float32, device=e.device)
    de32 = torch.zeros((n, d), dtype=torch.float32, device=e.device) if need_de else None
    dc = torch.empty_like(c, memory_format=torch.contiguous_format) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    # dz lives in the logit buffer: in the inputs' dtype, row i over the first bytes of row i of z.
    narrow = buffer.view(e.dtype) if e.dtype != torch.float32 else buffer
    per_z = narrow.numel() // buffer.numel()  # elements of dz per element of z (2 for 16-bit inputs)
    for start in range(0, vocab, cols_per_slab):
        cols = min(cols_per_slab, vocab - start)
        z = _slab_view(buffer, n, cols)
        c_slab = c[start:start + cols]
        _logits_into(z, e, c_slab)
        dz = narrow[: n * cols * per_z].view(n, cols * per_z)[:, :cols]
        slab_grad_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            z, dz, bias if bias is not None else z, targets, lse, mean_logit if g_mu is not None else lse,
            g_lse if g_lse is not None else lse, g_tgt if g_tgt is not None else lse,
            g_sum if g_sum is not None else lse, g_mu if g_mu is not None else lse,
            n, cols, start, z.stride(0), dz.stride(0), float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None,
            HAS_G_SUM=g_sum is not None, HAS_G_MU=g_mu is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg),
        )
        if need_dc:
            torch.mm(dz.t(), e, out=dc[start:start + cols])
        if need_de:
            _accumulate_matmul(de32, dz, c_slab)
        if need_db:
            db32[start:start + cols] += dz.sum(dim=0, dtype=torch.float32)
    del buffer
    de = de32.to(e.dtype) if need_de else None
    db = db32.to(bias.dtype) if need_db else None
    return de, dc, db

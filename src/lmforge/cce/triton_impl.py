"""Launchers for the Triton kernels, with the same contract as :mod:`lmforge.cce.chunked`.

No host synchronisation: every size the launchers need comes from tensor shapes, and the partial
results are combined with ordinary (asynchronous) torch ops.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton

    from lmforge.cce.kernels.backward import lse_backward_kernel
    from lmforge.cce.kernels.forward import lse_forward_kernel

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): exact semantics, slow."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_for(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or interpreting())


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(dtype: torch.dtype, device: torch.device, d: int) -> dict:
    if device.type != "cuda":  # interpreter: smallest legal tiles keep numpy work small
        return dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would lose ~3 decimal digits); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_kwargs(cfg: dict) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False):
    n, d = e.shape
    vocab = c.shape[0]
    cfg = _blocks(e.dtype, e.device, d)
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    if e.device.type == "cuda":
        # Enough programs to fill every SM about twice over; each walks a contiguous vocabulary split.
        splits = max(1, min(v_tiles, math.ceil(2 * _num_sms(e.device.index or 0) / n_blocks)))
    else:
        splits = min(v_tiles, 4)
    v_per_split = triton.cdiv(v_tiles, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, v_per_split)
    part = torch.empty((5, splits, n), dtype=torch.float32, device=e.device)
    m_part, s_part, w_part, sum_part, tgt_part = part.unbind(0)
    lse_forward_kernel[(n_blocks, splits)](
        e, c, bias if bias is not None else e, targets,
        m_part, s_part, w_part, sum_part, tgt_part,
        n, vocab, d, v_per_split,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1),
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        NEED_SUM=need_sum, NEED_MU=need_mu,
        DOT_PRECISION=_dot_precision(e.dtype), UPCAST_DOT=interpreting(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        **_launch_kwargs(cfg),
    )
    m = m_part.amax(dim=0)
    weights = torch.exp(m_part - m)  # splits that saw no column have m_part = -inf -> weight 0
    s = (s_part * weights).sum(dim=0)
    lse = m + torch.log(s)
    target_logit = tgt_part.sum(dim=0)
    sum_logit = sum_part.sum(dim=0) if need_sum else torch.zeros_like(lse)
    mean_logit = (w_part * weights).sum(dim=0) / s if need_mu else torch.zeros_like(lse)
    return lse, target_logit, sum_logit, mean_logit


def vocab_order(e, c, bias) -> torch.Tensor:
    """Vocabulary sorted by mean logit over the batch (c_j . mean(e) + b_j), largest first.

    Tokens with a large softmax mass share their columns with high-mean-logit vocabulary, so after
    sorting the negligible tiles gather in the tail, where filtering skips them.
    """
    mean_e = e.float().mean(dim=0)
    score = c.float() @ mean_e
    if bias is not None:
        score += bias.float()
    return torch.argsort(score, descending=True).to(torch.int32)


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, filter_eps=None):
    n, d = e.shape
    vocab = c.shape[0]
    cfg = _blocks(e.dtype, e.device, d)
    use_filter = filter_eps is not None and g_sum is None
    perm = vocab_order(e, c, bias) if use_filter else torch.arange(vocab, device=c.device, dtype=torch.int32)
    de32 = torch.zeros((n, d), dtype=torch.float32, device=e.device) if need_de else None
    dc32 = torch.zeros((vocab, d), dtype=torch.float32, device=c.device) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    dummy = lse
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    lse_backward_kernel[grid](
        e, c, bias if bias is not None else dummy, targets, perm, lse,
        mean_logit if g_mu is not None else dummy,
        g_lse if g_lse is not None else dummy, g_tgt if g_tgt is not None else dummy,
        g_sum if g_sum is not None else dummy, g_mu if g_mu is not None else dummy,
        de32 if need_de else dummy, dc32 if need_dc else dummy, db32 if need_db else dummy,
        n, vocab, d,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1),
        de32.stride(0) if need_de else 0, de32.stride(1) if need_de else 0,
        dc32.stride(0) if need_dc else 0, dc32.stride(1) if need_dc else 0,
        float(softcap) if softcap is not None else 1.0,
        float(filter_eps) if use_filter else 0.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None,
        HAS_G_SUM=g_sum is not None, HAS_G_MU=g_mu is not None,
        NEED_DE=need_de, NEED_DC=need_dc, NEED_DB=need_db,
        FILTER=use_filter, DOT_PRECISION=_dot_precision(e.dtype), UPCAST_DOT=interpreting(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        **_launch_kwargs(cfg),
    )
    de = de32.to(e.dtype) if need_de else None
    dc = dc32.to(c.dtype) if need_dc else None
    db = db32.to(bias.dtype) if need_db else None
    return de, dc, db

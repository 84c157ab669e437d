"""Launchers for the Triton kernels, with the same contract as :mod:`lmforge.cce.chunked`.

No host synchronisation: every size the launchers need comes from tensor shapes, and the partial
results are combined with ordinary (asynchronous) torch ops.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from lmforge.cce import configs

try:
    import triton

    from lmforge.cce.kernels.backward import logit_grad_kernel
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


def _blocks(dtype: torch.dtype, device: torch.device, d: int, kind: str = "fwd") -> dict:
    """Tile shapes and launch options of the fused kernels (:func:`lmforge.cce.configs.config_for`)."""
    return configs.config_for(kind, dtype, device, d)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would lose ~3 decimal digits); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_kwargs(cfg: dict) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _split_count(n_rows: int, n_blocks: int, v_tiles: int, device: torch.device) -> int:
    """Vocabulary splits per token block: the grid should end on a nearly full wave of programs, while
    the (splits x N) partials stay within 0.5 MB."""
    if device.type != "cuda":
        return min(v_tiles, 4)
    sms = _num_sms(device.index or 0)
    most = max(1, min(v_tiles, (1 << 19) // (8 * max(n_rows, 1)), 64))
    best, best_eff = 1, 0.0
    for splits in range(1, most + 1):
        waves = n_blocks * splits / sms
        eff = waves / math.ceil(waves)
        if eff >= best_eff - 1e-9 or (best_eff < 0.9 and eff > best_eff):
            best, best_eff = splits, eff
    return best


def forward_stats(e, c, bias, targets, *, softcap=None, need_sum=False, need_mu=False, perm=None,
                  map_sub=None):
    """The four statistics; with ``perm`` the vocabulary is visited in that order, and with ``map_sub``
    a tile map for the backward's filter is returned as a fifth value (else None)."""
    n, d = e.shape
    vocab = c.shape[0]
    cfg = _blocks(e.dtype, e.device, d)
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    v_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = _split_count(n, n_blocks, v_tiles, e.device)
    v_per_split = triton.cdiv(v_tiles, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, v_per_split)
    n_parts = 2 + need_sum + need_mu
    part = torch.empty((n_parts, splits, n), dtype=torch.float32, device=e.device)
    l_part, tgt_part = part[0], part[1]
    w_part = part[2] if need_mu else l_part
    sum_part = part[2 + need_mu] if need_sum else l_part
    sub = map_sub or cfg["BLOCK_N"]
    tile_map = (torch.empty((triton.cdiv(n, sub), v_tiles), dtype=torch.float16, device=e.device)
                if map_sub else l_part)
    lse_forward_kernel[(n_blocks, splits)](
        e, c, bias if bias is not None else e, targets, perm if perm is not None else targets,
        l_part, w_part, sum_part, tgt_part, tile_map,
        n, vocab, d, v_per_split, tile_map.stride(0) if map_sub else 0,
        e.stride(0), e.stride(1), c.stride(0), c.stride(1),
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_PERM=perm is not None,
        WRITE_MAP=map_sub is not None, NEED_SUM=need_sum, NEED_MU=need_mu,
        DOT_PRECISION=_dot_precision(e.dtype), UPCAST_DOT=interpreting(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], SUB=sub,
        **_launch_kwargs(cfg),
    )
    lse, sum_logit, mean_logit = combine_splits(l_part, w_part if need_mu else None,
                                                sum_part if need_sum else None)
    return lse, tgt_part.sum(dim=0), sum_logit, mean_logit, (tile_map if map_sub else None)


def combine_splits(l_part, w_part=None, sum_part=None):
    """(lse, sum_logit, mean_logit) of a row from its (splits, N) partials: each split's log-sum-exp, and
    when given its softmax-weighted mean logit and its plain logit sum (zeros where not given)."""
    lse = torch.logsumexp(l_part, dim=0)  # splits that saw no column hold -inf and weigh nothing
    sum_logit = sum_part.sum(dim=0) if sum_part is not None else torch.zeros_like(lse)
    if w_part is not None:
        share = torch.exp(l_part - lse)
        mean_logit = torch.where(share > 0, share * w_part, torch.zeros_like(w_part)).sum(dim=0)
    else:
        mean_logit = torch.zeros_like(lse)
    return lse, sum_logit, mean_logit


def vocab_order(e, c, bias) -> torch.Tensor:
    """Vocabulary sorted by mean logit over the batch (c_j . mean(e) + b_j), largest first.

    Tokens with a large softmax mass share their columns with high-mean-logit vocabulary, so after
    sorting the negligible tiles gather in the tail, where filtering skips them.
    """
    # Two matrix-vector products in the inputs' dtype: an ordering needs no more, and neither e nor c
    # is copied (a float32 mean of e alone would cost N x D x 4 bytes of workspace).
    ones = torch.full((e.shape[0],), 1.0 / e.shape[0], dtype=e.dtype, device=e.device)
    score = torch.mv(c, torch.mv(e.t(), ones)).float()
    if bias is not None:
        score += bias.float()
    return torch.argsort(score, descending=True).to(torch.int32)


def map_granularity(dtype: torch.dtype, device: torch.device, d: int) -> int:
    """Rows per entry of the forward's tile map: at most 64 (tighter bounds than a whole 128-row tile at
    0.5 MB for 8192 x 256000), and a divisor of both kernels' BLOCK_N."""
    return min(64, _blocks(dtype, device, d, "fwd")["BLOCK_N"], _blocks(dtype, device, d, "bwd")["BLOCK_N"])


def slab_columns(n: int, vocab: int, device: torch.device, block_v: int) -> int:
    """Vocabulary columns per backward slab: the dz slab (n x S) is the backward's main workspace."""
    if device.type != "cuda":
        return min(triton.cdiv(vocab, block_v), 4) * block_v
    cols = max(block_v, (1 << 24) // max(n, 1) // block_v * block_v)  # ~32 MB of bf16 dz
    return min(cols, triton.cdiv(vocab, block_v) * block_v)


_FP32_OUT_GEMM: dict = {}


def _accumulate_matmul(out32: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """out32 += a @ b for low-precision a, b, accumulated in fp32 (no rounding of the partial product).

    On CUDA, cuBLAS can write a bf16 x bf16 product straight into an fp32 matrix (torch's addmm with
    out_dtype); elsewhere, or on a torch without it, the operands are upcast (slab-sized temporaries).
    """
    if a.dtype == out32.dtype:
        out32.addmm_(a, b)
        return
    key = (out32.device.type, a.dtype)
    if _FP32_OUT_GEMM.get(key, a.is_cuda):
        try:
            torch.addmm(out32, a, b, out_dtype=torch.float32, out=out32)
            _FP32_OUT_GEMM[key] = True
            return
        except (TypeError, RuntimeError):  # also torch builds that lack out_dtype (a RuntimeError)
            _FP32_OUT_GEMM[key] = False
    out32.addmm_(a.float(), b.float())


def backward(e, c, bias, targets, lse, mean_logit, g_lse, g_tgt, g_sum, g_mu, *, softcap=None,
             need_de=True, need_dc=True, need_db=False, filter_eps=None, perm=None, tile_map=None,
             map_sub=None, de_dtype=None):
    n, d = e.shape
    vocab = c.shape[0]
    cfg = _blocks(e.dtype, e.device, d, "bwd")
    use_filter = filter_eps is not None and tile_map is not None and g_sum is None
    map_v = _blocks(e.dtype, e.device, d)["BLOCK_V"]  # columns per tile-map entry (the forward's tiles)
    if map_v % cfg["BLOCK_V"]:  # tiles must nest in the map's (separately tuned configs may not)
        cfg["BLOCK_V"] = math.gcd(map_v, cfg["BLOCK_V"])
    # Each row's target as a position in the visiting order (-1: none), so tiles holding one are kept.
    valid = (targets >= 0) & (targets < vocab)
    if perm is not None:
        inverse = torch.empty(vocab, dtype=torch.int32, device=c.device)
        inverse[perm.long()] = torch.arange(vocab, dtype=torch.int32, device=c.device)
        target_pos = torch.where(valid, inverse[targets.clamp(0, vocab - 1).long()], -1).to(torch.int32)
        del inverse
    else:
        target_pos = torch.where(valid, targets, -1).to(torch.int32)
    slab = slab_columns(n, vocab, e.device, max(cfg["BLOCK_V"], map_v))
    dz = torch.empty((n, slab), dtype=e.dtype, device=e.device)
    de32 = torch.zeros((n, d), dtype=torch.float32, device=e.device) if need_de else None
    dc = torch.empty_like(c, memory_format=torch.contiguous_format) if need_dc else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=c.device) if need_db else None
    dummy = lse
    # filter_eps bounds the probability mass a row may lose in all: each of the map's tiles gets an equal
    # share, so many individually negligible tiles cannot add up to a coherent error (on a near-uniform
    # softmax they would: every entry is tiny, their sum is the whole gradient).
    log_eps = math.log(filter_eps) - math.log(tile_map.shape[1]) if use_filter else 0.0
    for start in range(0, vocab, slab):
        cols = min(slab, vocab - start)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(cols, cfg["BLOCK_V"]))
        logit_grad_kernel[grid](
            e, c, bias if bias is not None else dummy, perm if perm is not None else target_pos,
            target_pos, lse, mean_logit if g_mu is not None else dummy,
            tile_map if use_filter else dummy,
            g_lse if g_lse is not None else dummy, g_tgt if g_tgt is not None else dummy,
            g_sum if g_sum is not None else dummy, g_mu if g_mu is not None else dummy, dz,
            n, vocab, d, start, cols, tile_map.stride(0) if use_filter else 0,
            e.stride(0), e.stride(1), c.stride(0), c.stride(1), dz.stride(0),
            float(softcap) if softcap is not None else 1.0, log_eps,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_PERM=perm is not None,
            FILTER=use_filter,
            HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None,
            HAS_G_SUM=g_sum is not None, HAS_G_MU=g_mu is not None,
            DOT_PRECISION=_dot_precision(e.dtype), UPCAST_DOT=interpreting(),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], SUB=map_sub or cfg["BLOCK_N"],
            MAP_V=map_v, **_launch_kwargs(cfg),
        )
        dz_slab = dz[:, :cols]
        if perm is not None:
            index = perm[start:start + cols].long()
            c_slab = c.index_select(0, index) if need_de else None
        else:
            index, c_slab = None, c[start:start + cols]
        if need_dc:
            # The whole token dimension in one product: dC rows are complete and rounded once (straight into
            # dC in vocabulary order; through a temporary when the slab's rows are scattered).
            if index is None:
                torch.mm(dz_slab.t(), e, out=dc[start:start + cols])
            else:
                dc.index_copy_(0, index, dz_slab.t() @ e)
        if need_de:
            _accumulate_matmul(de32, dz_slab, c_slab)
        if need_db:
            col_sum = dz_slab.sum(dim=0, dtype=torch.float32)
            if index is None:
                db32[start:start + cols] += col_sum
            else:
                db32.index_add_(0, index, col_sum)
    dz = dz_slab = c_slab = None  # the slab's views hold its storage: free it before dE's conversion
    de = de32.to(de_dtype or e.dtype) if need_de else None
    db = db32.to(bias.dtype) if need_db else None
    return de, dc, db

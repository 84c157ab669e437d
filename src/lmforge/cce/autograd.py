"""Autograd glue: one Function over the four per-token statistics, for either backend.

The forward saves only the inputs and two length-N vectors (lse, mean logit); the backward recomputes
logits tile by tile. Both backends share the contract documented in :mod:`lmforge.cce.chunked`.
"""

from __future__ import annotations

import contextlib

import torch

from lmforge.cce import chunked, gemm_impl, order, triton_impl


def _like_stats(g, stats):
    # Upstream gradients arrive in whatever dtype the caller used; the backends want the statistics' dtype.
    return None if g is None else g.to(stats.dtype).contiguous()


def on_device_of(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current one while kernels run: Triton launches on the current device, so
    inputs on cuda:1 while cuda:0 is current (a worker of a multi-GPU pool, a user's second model) would
    otherwise run on the wrong GPU and read another device's memory."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _summed_over(group, partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of every rank's ``partial`` (float32 for 16-bit ``dtype``: one rounding at the end), in ``dtype``."""
    import torch.distributed as dist

    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    total = partial.to(wide, memory_format=torch.contiguous_format)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(dtype)


class LinearStats(torch.autograd.Function):
    """(e, c, bias, targets) -> (lse, target_logit, sum_logit, mean_logit), each (N,) float32

    (float64 for float64 inputs on the torch path). With ``de_group`` (a process group; vocabulary-parallel
    use, where each rank holds a block of c) the backward sums dE over the group's ranks in float32 before
    its one rounding to e's dtype."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, softcap, need_sum, need_mu, filter_eps, impl, de_group=None):
        # Autocast would recast the recomputed logits; the backends choose their own precisions.
        ctx.de_group = de_group
        with torch.autocast(e.device.type, enabled=False), on_device_of(e):
            return LinearStats._forward(ctx, e, c, bias, targets, softcap, need_sum, need_mu, filter_eps, impl)

    @staticmethod
    def _forward(ctx, e, c, bias, targets, softcap, need_sum, need_mu, filter_eps, impl):
        perm = tile_map = map_sub = table = None
        if impl == "triton":
            # Filtering needs the forward's tile map over a sorted vocabulary; label smoothing (need_sum)
            # touches every logit, so nothing could be skipped then.
            if filter_eps is not None and not need_sum and any(ctx.needs_input_grad[:3]):
                perm = triton_impl.vocab_order(e, c, bias)
                map_sub = triton_impl.map_granularity(e.dtype, e.device, e.shape[1])
            *stats, tile_map = triton_impl.forward_stats(e, c, bias, targets, softcap=softcap,
                                                         need_sum=need_sum, need_mu=need_mu,
                                                         perm=perm, map_sub=map_sub)
        elif impl == "gemm":
            # Filtering: the vocabulary sorted by mean logit, and each row's softmax mass per slab, so the
            # backward knows which rows each slab may skip without recomputing anything.
            if filter_eps is not None and not need_sum and not need_mu and any(ctx.needs_input_grad[:3]) \
                    and gemm_impl.filters(e.shape[1]) and gemm_impl.sorted_order_due(e, c, filter_eps):
                perm = order.vocab_order(e, c, bias, gemm_impl.slab_columns(e.shape[0], c.shape[0]))
                table = gemm_impl.empty_table(e, c)
            stats = gemm_impl.forward_stats(e, c, bias, targets, softcap=softcap, need_sum=need_sum,
                                            need_mu=need_mu, perm=perm, slab_lse=table)
        else:
            stats = chunked.forward_stats(e, c, bias, targets, softcap=softcap,
                                          need_sum=need_sum, need_mu=need_mu)
        lse, _, _, mean_logit = stats
        if table is not None:  # the compact table's two tensors; its group size rides on ctx
            tile_map, codes, ctx.table_group = table.lse, table.codes, table.group
        else:
            codes = None
        ctx.save_for_backward(e, c, bias, targets, lse, mean_logit, perm, tile_map, codes)
        ctx.softcap, ctx.filter_eps, ctx.impl, ctx.map_sub = softcap, filter_eps, impl, map_sub
        ctx.set_materialize_grads(False)
        return tuple(stats)

    @staticmethod
    def backward(ctx, g_lse, g_tgt, g_sum, g_mu):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False), on_device_of(ctx.saved_tensors[0]):
            return LinearStats._backward(ctx, g_lse, g_tgt, g_sum, g_mu)

    @staticmethod
    def _backward(ctx, g_lse, g_tgt, g_sum, g_mu):
        e, c, bias, targets, lse, mean_logit, perm, tile_map, codes = ctx.saved_tensors
        need_de, need_dc, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        group = ctx.de_group
        if all(g is None for g in (g_lse, g_tgt, g_sum, g_mu)) or not (need_de or need_dc or need_db):
            if group is not None and need_de:  # the other ranks' all-reduce still needs this rank's zeros
                return _summed_over(group, torch.zeros_like(e, dtype=torch.float32), e.dtype), *(None,) * 9
            return (None,) * 10
        grads = tuple(_like_stats(g, lse) for g in (g_lse, g_tgt, g_sum, g_mu))
        # Partial dE of a vocabulary block: kept in float32 until the ranks' blocks are summed.
        de_dtype = torch.float32 if group is not None and e.dtype in (torch.float16, torch.bfloat16) else None
        if ctx.impl == "triton":
            de, dc, db = triton_impl.backward(e, c, bias, targets, lse, mean_logit, *grads,
                                              softcap=ctx.softcap, need_de=need_de, need_dc=need_dc,
                                              need_db=need_db, filter_eps=ctx.filter_eps, perm=perm,
                                              tile_map=tile_map, map_sub=ctx.map_sub, de_dtype=de_dtype)
        elif ctx.impl == "gemm":
            de, dc, db = gemm_impl.backward(e, c, bias, targets, lse, mean_logit, *grads,
                                            softcap=ctx.softcap, need_de=need_de, need_dc=need_dc,
                                            need_db=need_db, perm=perm,
                                            slab_lse=None if codes is None else gemm_impl.SlabTable(
                                                tile_map, codes, ctx.table_group),
                                            filter_eps=ctx.filter_eps, de_dtype=de_dtype)
        else:
            de, dc, db = chunked.backward(e, c, bias, targets, lse, mean_logit, *grads,
                                          softcap=ctx.softcap, need_de=need_de, need_dc=need_dc,
                                          need_db=need_db, de_dtype=de_dtype)
        if group is not None and de is not None:
            de = _summed_over(group, de, e.dtype)
        return de, dc, db, None, None, None, None, None, None, None

"""The vocabulary in slabs by mean logit, for the GEMM path's filtered backward, in ~1.5 bytes per token.

The filtered backward skips, for each row, a run of trailing slabs that hold almost none of its softmax
mass; that works when slab k holds the vocabulary's ranks [k W, (k + 1) W) by mean logit over the batch
(c_j . mean(e) + b_j), so that the tail slabs hold the tokens no row expects. Only slab membership
matters: inside a slab any order does. :func:`vocab_order` computes such an order with a counting sort
(:mod:`lmforge.cce.kernels.order`) whose workspace stays below the permutation's own 4 bytes per token,
where ``torch.argsort`` of a float32 score held ~24 bytes per token at once (int64 indices, radix double
buffers): 6 of the training forward's 8.9 MB at Gemma 2's vocabulary. The score is the bf16 result of
two matrix-vector products, so its 16 bits order it exactly; ties (equal bf16 scores) go by token id, and
the result is the same on every run.
"""

from __future__ import annotations

import torch

from lmforge.cce.triton_impl import HAS_TRITON

if HAS_TRITON:
    import triton

    from lmforge.cce.kernels.order import (digit_counts_kernel, digit_rank_kernel, key_counts_kernel,
                                           sorted_positions_kernel)

KEYS = 1 << 16
CHUNK = 128  # tokens per step of the rank kernel (a CHUNK x CHUNK comparison)
BLOCK = 1024  # tokens per program of the elementwise kernels


def mean_logit_score(e: torch.Tensor, c: torch.Tensor, bias) -> torch.Tensor:
    """(V,) bf16: c_j . mean(e) (+ b_j), by two matrix-vector products in the inputs' dtype (an ordering
    needs no more, and neither e nor c is copied)."""
    ones = torch.full((e.shape[0],), 1.0 / max(e.shape[0], 1), dtype=e.dtype, device=e.device)
    score = torch.mv(c, torch.mv(e.t(), ones))
    if bias is not None:
        score = score.float() + bias.float()
    return score.to(torch.bfloat16)


def _blocks(v: int, bins: int) -> tuple[int, int]:
    """(tokens per program, programs): whole CHUNKs, and at most 65536 counters (bins per program) in all."""
    programs = max(1, min(-(-v // 2048), KEYS // bins))
    per = -(-(-(-v // programs)) // CHUNK) * CHUNK
    return per, -(-v // per)


def _ranks(source, digit_map, key_start, out, v: int, group: int, bins: int, *, from_keys: bool, mode: int):
    """One stable counting pass over ``source``'s digits (see :mod:`lmforge.cce.kernels.order`)."""
    per, programs = _blocks(v, bins)
    counts = torch.zeros((programs, bins), dtype=torch.int32, device=out.device)
    digit_counts_kernel[(programs,)](source, digit_map, counts, v, per, BINS=bins, FROM_KEYS=from_keys,
                                     CHUNK=CHUNK)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # the earlier programs' tokens of each digit
    del counts
    if mode == 1:  # digits are slabs: slab s starts at rank s W
        offsets += torch.arange(bins, dtype=torch.int32, device=out.device) * group
    digit_rank_kernel[(programs,)](source, digit_map, key_start, offsets, out, v, per, group, BINS=bins,
                                   FROM_KEYS=from_keys, MODE=mode, CHUNK=CHUNK)


def vocab_order(e: torch.Tensor, c: torch.Tensor, bias, group: int) -> torch.Tensor:
    """(V,) int32 permutation of the vocabulary whose positions [k ``group``, (k + 1) ``group``) hold the
    tokens of ranks k ``group`` ... by descending bf16 mean logit (:func:`mean_logit_score`), ties by token
    id; within a group, tokens in id order. Six small launches, no host sync."""
    v = c.shape[0]
    if group < 1 or -(-v // group) >= 1 << 15:
        raise ValueError(f"group must give between 1 and 32767 groups of the {v} tokens, got {group}")
    device = c.device
    score16 = mean_logit_score(e, c, bias).view(torch.int16)
    key_counts = torch.zeros(KEYS, dtype=torch.int32, device=device)
    key_counts_kernel[(triton.cdiv(v, BLOCK),)](score16, key_counts, v, BLOCK=BLOCK)
    key_start = torch.cumsum(key_counts, 0, dtype=torch.int32) - key_counts  # each key's first rank
    # Keys whose tokens fall into two or more groups: their tokens need ranks among themselves (a digit each).
    split = (key_counts > 0) & (key_start // group != (key_start + key_counts - 1) // group)
    del key_counts
    digit_map = torch.where(split, torch.cumsum(split, 0, dtype=torch.int32) - 1, -1).to(torch.int16)
    del split
    n_groups = -(-v // group)
    slab = torch.empty(v, dtype=torch.int16, device=device)
    _ranks(score16, digit_map, key_start, slab, v, group, triton.next_power_of_2(max(n_groups - 1, 1)),
           from_keys=True, mode=0)
    del score16, digit_map, key_start
    perm = torch.empty(v, dtype=torch.int32, device=device)
    _ranks(slab, slab, slab, perm, v, group, triton.next_power_of_2(n_groups), from_keys=False, mode=1)
    return perm


def positions(perm: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N,) int64: each target's position in ``perm`` (-1 where a target is no vocabulary index), through
    N-long vectors only: perm's entries are looked up among the sorted targets. The training forward's peak
    memory holds these vectors beside the permutation and the slab table, so they are int32 (the sort's
    indices aside) and each goes as soon as it is used: ~4 x 4N bytes at the peak instead of ~6 x 8N."""
    n = targets.numel()
    valid = (targets >= 0) & (targets < vocab)
    # a copy even of int32 targets (filled in place below); out-of-range ids may wrap but are masked anyway
    wanted = targets.to(torch.int32, copy=True).masked_fill_(~valid, -1)
    ascending = torch.sort(wanted).values
    first = torch.full((n,), -1, dtype=torch.int32, device=targets.device)
    if n and vocab:
        sorted_positions_kernel[(triton.cdiv(vocab, BLOCK),)](perm, ascending, first, vocab, n,
                                                              STEPS=n.bit_length(), BLOCK=BLOCK)
    at = torch.searchsorted(ascending, wanted, out_int32=True).clamp_(max=max(n - 1, 0))
    del ascending, wanted
    out = first.index_select(0, at).long()
    del first, at
    return out.masked_fill_(~valid, -1)

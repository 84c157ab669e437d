"""Vocabulary-parallel Cut Cross-Entropy: the classifier split by rows over a process group.

Layout (tensor parallelism over the vocabulary). Every rank of the group holds the same hidden states
e (N, D) and targets, and its own contiguous block of classifier rows c[v0:v1] (with the same rows of
the bias). Each rank computes the per-token statistics of its block with the single-device machinery
(:class:`lmforge.cce.autograd.LinearStats`, any backend), and they combine exactly:

    lse          = log sum_r exp(lse_r)        all-reduce max m, then all-reduce sum of exp(lse_r - m)
    target_logit = sum_r target_logit_r       the target row lies in one block; the others give 0
    sum_logit    = sum_r sum_logit_r          (label smoothing)
    mean_logit   = sum_r w_r mean_logit_r     (entropy), w_r = exp(lse_r - lse): block r's softmax mass

Backward. The loss built from the combined statistics is the same on every rank, so every rank holds the
same upstream gradients (g_lse, g_tgt, g_sum, g_mu) and derives its block's share without communicating:

    g_lse_r = w_r (g_lse + g_mu (mean_logit_r - mean_logit)),   g_mu_r = w_r g_mu,
    g_tgt_r = g_tgt,   g_sum_r = g_sum.

The block's backward then gives dC and db for its rows (they stay local) and a partial dE over its rows;
the partial dE of all ranks is summed by one all-reduce, so every rank gets the full dE. Communication per
call: the forward all-reduces 3 (4 with the entropy) length-N vectors, the backward one N x D tensor. No
rank ever holds more than its V/world x D block of the classifier.

Every rank must call the loss with the same e, targets and options, and must run the backward (dE's
all-reduce is a collective). Before computing, the ranks exchange their block ranges and a fingerprint of
(e, targets) in one small all-gather, and all of them raise ValueError when the blocks do not tile the
vocabulary or the inputs differ between ranks (data-parallel ranks with their own tokens must not use this
path: see the DTensor notes below). This costs one host synchronisation per call.

DTensor classifiers (FSDP2, tensor-parallel plans). :func:`local_operands` turns a classifier that is a
``torch.distributed.tensor.DTensor`` into what the loss needs. ``Shard(0)`` on a 1-D mesh (rows split over
the mesh, e.g. a column-wise parallel lm_head) runs the vocabulary-parallel path above over the mesh's
process group without gathering anything. Any other placement is gathered with ``full_tensor()``: the
full V x D classifier is materialised on every rank (2.4 GB for Gemma 2's 256000 x 2304 in bfloat16),
with DTensor's gradient rule for it (the computation after the gather is taken to be replicated). Like
DTensor itself, both take e and targets to be the same on every rank of the mesh. A model sharded for
data parallelism (FSDP2 ``fully_shard`` with its own tokens per rank) goes through FSDP's own gathering
instead: :func:`lmforge.cce.patch.patch` unshards a separately sharded lm_head through FSDP, so FSDP
reduces its gradient like every other parameter's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmforge.cce.autograd import LinearStats

# Columns of the table the ranks all-gather before computing: the block and the replication fingerprint.
_LAYOUT_COLUMNS = ("error", "vocab_start", "rows", "n_tokens", "hidden", "e_fingerprint", "target_fingerprint")


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's block of classifier rows: global rows [start, start + rows) of a vocabulary of ``vocab``."""

    group: Any  # torch.distributed ProcessGroup
    start: int
    rows: int
    vocab: int


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (False where torch.distributed is absent)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def local_operands(e, c, targets, bias, process_group, vocab_start):
    """Plain tensors for the loss, and the process group of a vocabulary-parallel call (None otherwise).

    Returns ``(e, c, targets, bias, process_group)``. DTensors are resolved as the module docstring says:
    a ``Shard(0)`` classifier on a 1-D mesh gives its local rows and the mesh's group; other classifier
    placements, and DTensor hidden states or targets, are gathered with ``full_tensor()``.
    """
    if process_group is not None and not torch.distributed.is_available():
        raise ValueError("process_group needs torch.distributed, which this torch build lacks")
    if vocab_start is not None:
        if process_group is None:
            raise ValueError("vocab_start is the first global row of this rank's classifier block; it needs "
                             "process_group (the group the classifier is split over)")
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise TypeError(f"vocab_start must be an int >= 0 or None, got {vocab_start!r}")
    if is_dtensor(e):
        e = e.full_tensor()
    if is_dtensor(targets):
        targets = targets.full_tensor()
    if not is_dtensor(c):
        if is_dtensor(bias):
            raise TypeError("bias is a DTensor but c is not; pass both as DTensors or both as plain tensors")
        return e, c, targets, bias, process_group
    if process_group is not None:
        raise ValueError("c is a DTensor, whose device mesh already names the process group; pass "
                         "process_group=None (and no vocab_start)")
    from torch.distributed.tensor import Shard

    if c.device_mesh.ndim == 1 and tuple(c.placements) == (Shard(0),):
        if bias is not None:
            if not (is_dtensor(bias) and bias.device_mesh == c.device_mesh
                    and tuple(bias.placements) == (Shard(0),)):
                raise ValueError("c is a DTensor split by rows (Shard(0)); bias must be None or a DTensor "
                                 "split the same way on the same mesh")
            bias = bias.to_local()
        return e, c.to_local(), targets, bias, c.device_mesh.get_group()
    # Any other layout: gather the whole classifier on every rank (V x D memory, see the module docstring).
    c = c.full_tensor()
    if is_dtensor(bias):
        bias = bias.full_tensor()
    return e, c, targets, bias, None


def _fingerprint(e2d: torch.Tensor, flat_targets: torch.Tensor) -> list[torch.Tensor]:
    """Two numbers that differ, in practice, whenever e or the targets differ (row order included)."""
    weights = torch.arange(1, e2d.shape[0] + 1, device=e2d.device, dtype=torch.float64)
    e_print = (e2d.detach().sum(dim=1, dtype=torch.float64) * weights).sum()
    target_print = (flat_targets.to(torch.float64) * weights).sum()
    return [e_print, target_print]


def vocab_shard(prepared, error: Exception | None, rows: int, process_group, vocab_start: int | None,
                ignore_index: int, device: torch.device) -> VocabShard:
    """Exchange block ranges and input fingerprints over ``process_group``; return this rank's block.

    ``prepared`` is ``(e2d, flat_targets)`` after validation, or None when this rank's validation raised
    ``error``: the ranks always meet in the all-gather, so an error on one rank is raised on every rank
    instead of leaving the others waiting. ``device`` is where the all-gathered table lives (the inputs'
    device, as the group's backend expects). Blocks are taken in rank order when ``vocab_start`` is None
    (every rank must then pass None); else they must tile [0, V) in any order.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if prepared is None:
        mine = torch.zeros(len(_LAYOUT_COLUMNS), dtype=torch.float64, device=device)
        mine[0] = 1.0
    else:
        e2d, flat_targets = prepared
        sizes = [0.0, -1.0 if vocab_start is None else float(vocab_start), float(rows), float(e2d.shape[0]),
                 float(e2d.shape[1])]
        mine = torch.cat([torch.tensor(sizes, dtype=torch.float64, device=device),
                          torch.stack(_fingerprint(e2d, flat_targets))])
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    table = torch.stack(gathered).cpu()
    rank = dist.get_rank(process_group)

    failed = [r for r in range(world) if table[r, 0] != 0]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"vocabulary-parallel cross-entropy: rank(s) {failed} of the process group rejected "
                         f"their inputs (their error says why)")
    inputs = table[:, 3:]
    same = (inputs == inputs[0]) | (torch.isnan(inputs) & torch.isnan(inputs[0]))
    if not bool(same.all()):
        raise ValueError("vocabulary-parallel cross-entropy needs the same e and targets on every rank of the "
                         "process group (each rank holds a block of the vocabulary, not its own tokens); they "
                         "differ here. For data-parallel ranks with their own tokens, gather the classifier "
                         "instead (FSDP: see lmforge.cce.patch, which unshards the lm_head through FSDP)")
    sizes = [int(s) for s in table[:, 2]]
    given = [int(s) for s in table[:, 1]]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"every rank needs at least one classifier row; the blocks have {sizes} rows")
    if all(g < 0 for g in given):
        starts = [sum(sizes[:r]) for r in range(world)]
    elif all(g >= 0 for g in given):
        starts = given
        ordered = sorted(range(world), key=lambda r: starts[r])
        end = 0
        for r in ordered:
            if starts[r] != end:
                raise ValueError(f"the classifier blocks (vocab_start, rows) per rank, "
                                 f"{[(starts[q], sizes[q]) for q in range(world)]}, do not tile [0, V) without "
                                 f"gaps or overlaps (rank {r} starts at {starts[r]}, expected {end})")
            end += sizes[r]
    else:
        raise ValueError("vocab_start must be given on every rank of the process group or on none")
    shard = VocabShard(group=process_group, start=starts[rank], rows=sizes[rank], vocab=sum(sizes))

    flat_targets = prepared[1]
    bad = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= shard.vocab))
    if bool(bad.any()):
        first = int(flat_targets[bad][0])
        raise ValueError(f"targets must lie in [0, {shard.vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first} ({int(bad.sum())} bad entries)")
    return shard


def local_targets(flat_targets: torch.Tensor, shard: VocabShard, ignore_index: int) -> torch.Tensor:
    """Global target ids as rows of this rank's block; -1 (no target logit here) outside the block and
    for ignored positions (an ignore_index inside [0, V) must not pick a logit)."""
    local = flat_targets - shard.start
    inside = (flat_targets != ignore_index) & (local >= 0) & (local < shard.rows)
    return torch.where(inside, local, torch.full_like(local, -1))


class _CombineBlockStats(torch.autograd.Function):
    """(lse_r, target_logit_r, sum_logit_r, mean_logit_r) of this rank's block -> the same over the whole
    vocabulary, by the formulas of the module docstring (no communication in the backward)."""

    @staticmethod
    def forward(ctx, lse_r, target_r, sum_r, mean_r, group, need_mu):
        import torch.distributed as dist

        lse_max = lse_r.clone()
        dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
        # One all-reduce for the three sums; exp(lse_r - max) <= 1, so the sum cannot overflow.
        sums = torch.stack([torch.exp(lse_r - lse_max), target_r, sum_r])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = lse_max + torch.log(sums[0])
        share = torch.exp(lse_r - lse)
        mean_logit = torch.zeros_like(lse)
        if need_mu:
            mean_logit = share * mean_r
            dist.all_reduce(mean_logit, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(share, mean_r, mean_logit)
        ctx.set_materialize_grads(False)
        return lse, sums[1].clone(), sums[2].clone(), mean_logit

    @staticmethod
    def backward(ctx, g_lse, g_tgt, g_sum, g_mu):
        share, mean_r, mean_logit = ctx.saved_tensors
        g_lse_r = None if g_lse is None else share * g_lse
        g_mu_r = None
        if g_mu is not None:
            g_mu_r = share * g_mu
            from_mu = share * g_mu * (mean_r - mean_logit)
            g_lse_r = from_mu if g_lse_r is None else g_lse_r + from_mu
        return g_lse_r, g_tgt, g_sum, g_mu_r, None, None


def vocab_parallel_stats(e2d, c, bias, flat_targets, shard: VocabShard, *, ignore_index, softcap, need_sum,
                         need_mu, filter_eps, impl):
    """The four per-token statistics over the whole vocabulary from this rank's block of rows.

    Same contract as :class:`lmforge.cce.autograd.LinearStats` (``softcap``/``filter_eps``/``impl`` already
    resolved), with ``c``/``bias`` this rank's rows and ``flat_targets`` global ids. Differentiable: dE is
    all-reduced in the backward (the blocks' float32 partials, rounded once), dC/db stay local.
    """
    de_group = shard.group if e2d.requires_grad else None
    stats = LinearStats.apply(e2d, c, bias, local_targets(flat_targets, shard, ignore_index), softcap,
                              need_sum, need_mu, filter_eps, impl, de_group)
    return _CombineBlockStats.apply(*stats, shard.group, need_mu)

"""The GEMM path's vocabulary order (lmforge.cce.order) against a plain lexicographic sort.

On the CPU the kernels run under the interpreter; on a GPU the same tests run compiled.
"""

import numpy as np
import pytest
import torch

from lmforge.cce import order
from tests.conftest import DEVICE


def reference_ranks(score: torch.Tensor) -> torch.Tensor:
    """rank[j] of token j when sorted by descending score, ties by token id (numpy's lexsort, float64)."""
    s = score.double().cpu().numpy()
    ids = np.arange(s.size)
    ordered = np.lexsort((ids, -s))
    rank = np.empty(s.size, dtype=np.int64)
    rank[ordered] = ids
    return torch.from_numpy(rank)


def inputs(v, d, n, *, levels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * 0.3
    if levels is not None:  # few distinct classifier rows: many tokens share one bf16 score
        c = c[torch.randint(0, levels, (v,), generator=g)]
    return e.to(DEVICE, torch.bfloat16), c.to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("v,group,levels", [(1000, 64, None), (5000, 512, None), (777, 100, None),
                                            (3000, 1, None), (2000, 64, 3), (2000, 37, 1), (4096, 4096, None),
                                            (300, 1000, None)])
def test_vocab_order_puts_each_rank_in_its_group_and_ids_in_order_within(v, group, levels):
    e, c = inputs(v, 16, 40, levels=levels)
    perm = order.vocab_order(e, c, None, group).cpu()
    assert perm.dtype == torch.int32
    assert torch.equal(torch.sort(perm).values, torch.arange(v, dtype=torch.int32))
    rank = reference_ranks(order.mean_logit_score(e, c, None).float())
    # position p holds a token whose rank lies in p's group
    assert torch.equal(rank[perm.long()] // group, torch.arange(v) // group)
    for start in range(0, v, group):
        members = perm[start:start + group]
        assert bool((members[1:] > members[:-1]).all())


def test_vocab_order_with_a_bias_follows_the_biased_score():
    e, c = inputs(2500, 24, 33)
    bias = torch.linspace(-3, 3, 2500, device=DEVICE)
    perm = order.vocab_order(e, c, bias, 128).cpu()
    score = (c.double() @ e.double().mean(0) + bias.double()).cpu()
    rank = reference_ranks(order.mean_logit_score(e, c, bias).float())
    assert torch.equal(rank[perm.long()] // 128, torch.arange(2500) // 128)
    # bf16 rounding of the score aside, the first group holds the largest scores
    assert score[perm[:128].long()].min() >= torch.topk(score, 160).values[-1]


def test_vocab_order_is_the_same_on_every_run():
    e, c = inputs(3000, 16, 20, levels=5)
    first = order.vocab_order(e, c, None, 96)
    assert all(torch.equal(first, order.vocab_order(e, c, None, 96)) for _ in range(2))


def test_vocab_order_rejects_too_many_groups():
    e, c = inputs(100, 8, 4)
    with pytest.raises(ValueError, match="group"):
        order.vocab_order(e, c, None, 0)


def test_positions_find_each_target_in_the_permutation():
    v = 3000
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(v, generator=g).to(torch.int32)
    targets = torch.randint(-3, v + 3, (257,), generator=g)
    targets[:5] = torch.tensor([-100, 0, v - 1, v, 17])
    targets[5:9] = 17  # repeated targets
    pos = order.positions(perm.to(DEVICE), targets.to(DEVICE), v).cpu()
    inverse = torch.empty(v, dtype=torch.long)
    inverse[perm.long()] = torch.arange(v)
    valid = (targets >= 0) & (targets < v)
    expected = torch.where(valid, inverse[targets.clamp(0, v - 1)], -1)
    assert pos.dtype == torch.int64 and torch.equal(pos, expected)
    # int32 targets give the same positions and are left as they were (the lookup works on a copy)
    targets32 = targets.to(torch.int32).to(DEVICE)
    before = targets32.clone()
    assert torch.equal(order.positions(perm.to(DEVICE), targets32, v).cpu(), expected)
    assert torch.equal(targets32, before)
    assert order.positions(perm.to(DEVICE), targets[:0].to(DEVICE), v).numel() == 0

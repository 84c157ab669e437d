"""Agent evaluation metrics against brute-force definitions."""

import itertools
import random
from types import SimpleNamespace

import pytest

from lmforge.agent.evaluate import pass_at_k, summarise


def brute_pass_at_k(outcomes, k):
    """Share of k-subsets of the samples that hold at least one correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 5, 4), (3, 3, 3), (8, 3, 4)])
def test_pass_at_k_matches_enumeration(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(3, 1, 4)


def trajectory(pid, correct, calls=(), predicted="1"):
    return SimpleNamespace(problem_id=pid, correct=correct, predicted=predicted,
                           tool_calls=[{"ok": ok} for ok in calls])


def test_summarise_counts_each_metric():
    greedy = [trajectory("a", True, calls=(True,)), trajectory("b", False, calls=(True, False)),
              trajectory("c", False, predicted=None), trajectory("d", True)]
    rng = random.Random(0)
    sampled, per_problem = [], {}
    for pid in "abcd":
        outcomes = [rng.random() < 0.5 for _ in range(4)]
        per_problem[pid] = outcomes
        sampled += [trajectory(pid, o) for o in outcomes]
    m = summarise(greedy, sampled, levels={"a": 1, "b": 1, "c": 2, "d": 2}, ks=(1, 2))
    assert m["accuracy"] == 0.5
    assert m["tool_use_rate"] == 0.5
    assert m["mean_tool_calls"] == 0.75
    assert m["tool_error_rate"] == pytest.approx(1 / 3)
    assert m["unanswered_rate"] == 0.25
    assert m["accuracy_by_level"] == {"1": 0.5, "2": 0.5}
    for k in (1, 2):
        want = sum(brute_pass_at_k(v, k) for v in per_problem.values()) / 4
        assert m[f"pass@{k}"] == pytest.approx(want)


def test_summarise_rejects_empty_input():
    with pytest.raises(ValueError, match="no trajectories"):
        summarise([])

"""Preference data from graded rollouts: M-DPO pairs, M-KTO examples, and their padded batches.

From graded trajectories (:class:`lmforge.agent.format.Trajectory`, e.g. from
:func:`lmforge.agent.format.read_trajectories`), following the recipe of Xiong et al. (2024),
"Building Math Agents with Multi-Turn Iterative Preference Learning":

1. group the trajectories by prompt (``problem_id``), each group ordered by ``sample_index`` (so
   the result does not depend on the order rollouts were written in);
2. drop trajectories longer than ``max_length`` tokens (counted as ``dropped_length``), then
   correct trajectories whose last tool call failed (``drop_error_endings``; counted as
   ``dropped_error``): the answer is right but the agent ignored an error, a habit not to reward.
   A trajectory is counted once, under the first rule that drops it; a trajectory without any
   policy token has nothing to train and is dropped too (``dropped_no_policy_tokens``);
3. M-DPO: per prompt, up to ``k`` distinct (correct, incorrect) pairs drawn uniformly without
   replacement from all ``n_correct * n_incorrect`` combinations; a prompt whose kept trajectories
   are all correct or all incorrect gives no pair;
4. M-KTO: every kept trajectory, desirable iff correct (prompts without a pair included: KTO needs
   no partner).

Randomness: each prompt draws from its own ``numpy.random.Generator`` seeded with ``(seed,
hash(problem_id))`` (a stable SHA-256 hash), so a prompt's pairs depend only on the seed and that
prompt's trajectories -- not on the file order or which other prompts are present.

Prompt and completion. The *prompt* of a trajectory is every token before its first policy token
(the question as the chat template renders it, up to the generation prompt); the *completion* is
the rest -- the policy's turns, the tool outputs and scaffolding between them -- together with its
slice of the policy mask. KTO's reference point is estimated from completions scored under a
*mismatched* prompt; :func:`collate_kto` builds those rows inside the batch: example ``i``'s prompt
followed by the completion of the next example (cyclically) that has a different ``problem_id``.

Masks. ``loss_mask[b, t]`` says whether token ``t`` is scored (it is predicted from position
``t - 1``, as :func:`lmforge.models.logprobs.token_logprobs` expects). Multi-turn mode (M-DPO /
M-KTO) scores the policy's own tokens (the policy mask); single-turn mode (the paper's baseline)
scores every token after the prompt, tool outputs included
(:func:`lmforge.prefs.losses.single_turn_mask`). Batches are right-padded with ``pad_token_id``;
``attention_mask`` is 1 on real tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.agent.format import Trajectory
from lmforge.prefs.losses import single_turn_mask

__all__ = [
    "KTOExample",
    "PairConfig",
    "PreferenceData",
    "PreferencePair",
    "build_preference_data",
    "collate_kto",
    "collate_pairs",
    "split_prompt_completion",
]


# --------------------------------------------------------------------------------------------
# Records and config
# --------------------------------------------------------------------------------------------


@dataclass
class PairConfig:
    """How preference data is built from graded rollouts.

    ``k``: pairs per prompt at most (fewer when the prompt has fewer distinct correct x incorrect
    combinations). ``max_length``: trajectories with more tokens are dropped; None keeps all.
    ``seed``: seeds the pair sampling. ``drop_error_endings``: drop correct trajectories whose last
    tool call failed.
    """

    k: int = 1
    max_length: int | None = None
    seed: int = 0
    drop_error_endings: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(f"max_length must be None or an int >= 1, got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.drop_error_endings, bool):
            raise TypeError(f"drop_error_endings must be a bool, got {type(self.drop_error_endings).__name__}")


@dataclass
class PreferencePair:
    """One M-DPO pair: a correct and an incorrect trajectory of the same prompt."""

    chosen: Trajectory
    rejected: Trajectory

    @property
    def problem_id(self) -> str | None:
        return self.chosen.problem_id


@dataclass
class KTOExample:
    """One M-KTO example: a trajectory and whether it is desirable (correct)."""

    trajectory: Trajectory
    desirable: bool


@dataclass
class PreferenceData:
    """Result of :func:`build_preference_data`.

    ``stats`` counts (ints): ``prompts``; ``prompts_with_pair``, ``all_correct``,
    ``all_incorrect``, ``all_dropped`` (these four partition the prompts by what survives the
    drops); ``dropped_length``, ``dropped_error``, ``dropped_no_policy_tokens`` (trajectories);
    ``pairs``; ``kto_desirable``, ``kto_undesirable``.
    """

    pairs: list[PreferencePair]
    kto_examples: list[KTOExample]
    stats: dict[str, int]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_trajectory(trajectory: Any, name: str) -> Trajectory:
    """Token ids and policy mask consistent: equal non-zero lengths, 0/1 mask, a prompt first."""
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"{name} must be a Trajectory, got {type(trajectory).__name__}")
    ids, mask = trajectory.input_ids, trajectory.policy_mask
    if len(ids) == 0:
        raise ValueError(f"{name} has no input_ids")
    if len(ids) != len(mask):
        raise ValueError(f"{name} has {len(ids)} input_ids but {len(mask)} policy_mask entries; they must be equal")
    if any(value not in (0, 1) for value in mask):
        raise ValueError(f"{name}.policy_mask must hold only 0 and 1")
    if mask[0] == 1:
        # The first token has nothing before it to be predicted from, and a prompt must exist.
        raise ValueError(f"{name}.policy_mask[0] is 1; a trajectory must start with its prompt (mask 0)")
    return trajectory


def _check_pad_token_id(pad_token_id: Any) -> int:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    if pad_token_id < 0:
        raise ValueError(f"pad_token_id must be >= 0, got {pad_token_id}")
    return pad_token_id


def _ends_with_tool_error(trajectory: Trajectory) -> bool:
    return bool(trajectory.tool_calls) and not trajectory.tool_calls[-1].get("ok", False)


def _prompt_seed(seed: int, problem_id: str) -> np.random.Generator:
    # Python's hash() of a str changes between processes; SHA-256 does not.
    digest = int.from_bytes(hashlib.sha256(problem_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


# --------------------------------------------------------------------------------------------
# Building pairs and KTO examples
# --------------------------------------------------------------------------------------------


def build_preference_data(trajectories: Sequence[Trajectory], config: PairConfig | None = None) -> PreferenceData:
    """M-DPO pairs, M-KTO examples and counts from graded trajectories (see the module docstring).

    Args:
        trajectories: graded trajectories; each needs a ``problem_id``, a bool ``correct`` and
            consistent ``input_ids`` / ``policy_mask``; ``(problem_id, sample_index)`` unique.
        config: :class:`PairConfig`; None uses the defaults.

    Returns:
        :class:`PreferenceData`. Pairs come grouped by prompt in order of the prompts' first
        appearance; within a prompt, in the order drawn. KTO examples follow the same prompt order,
        each prompt's trajectories by ``sample_index``.
    """
    config = PairConfig() if config is None else config
    if not isinstance(config, PairConfig):
        raise TypeError(f"config must be a PairConfig, got {type(config).__name__}")
    if isinstance(trajectories, (str, bytes)) or not isinstance(trajectories, Sequence):
        raise TypeError(f"trajectories must be a list of Trajectory, got {type(trajectories).__name__}")
    if len(trajectories) == 0:
        raise ValueError("trajectories is empty; there is nothing to build preference data from")

    groups: dict[str, list[Trajectory]] = {}
    seen: set[tuple[str, int]] = set()
    for index, trajectory in enumerate(trajectories):
        name = f"trajectories[{index}]"
        _check_trajectory(trajectory, name)
        if not isinstance(trajectory.problem_id, str):
            raise ValueError(f"{name}.problem_id must be a str, got {trajectory.problem_id!r}")
        if not isinstance(trajectory.correct, bool):
            raise ValueError(f"{name}.correct must be True or False (grade the rollout first), "
                             f"got {trajectory.correct!r}")
        if trajectory.key() in seen:
            raise ValueError(f"{name} repeats (problem_id, sample_index) = {trajectory.key()!r}")
        seen.add(trajectory.key())
        groups.setdefault(trajectory.problem_id, []).append(trajectory)

    stats = dict.fromkeys(
        ("prompts", "prompts_with_pair", "all_correct", "all_incorrect", "all_dropped", "dropped_length",
         "dropped_error", "dropped_no_policy_tokens", "pairs", "kto_desirable", "kto_undesirable"), 0)
    pairs: list[PreferencePair] = []
    kto_examples: list[KTOExample] = []
    for problem_id, group in groups.items():
        stats["prompts"] += 1
        correct, incorrect = [], []
        for trajectory in sorted(group, key=lambda t: t.sample_index):
            if config.max_length is not None and len(trajectory.input_ids) > config.max_length:
                stats["dropped_length"] += 1
            elif trajectory.correct and config.drop_error_endings and _ends_with_tool_error(trajectory):
                stats["dropped_error"] += 1
            elif trajectory.num_policy_tokens == 0:
                stats["dropped_no_policy_tokens"] += 1
            else:
                (correct if trajectory.correct else incorrect).append(trajectory)
                kto_examples.append(KTOExample(trajectory, desirable=trajectory.correct))

        stats["kto_desirable"] += len(correct)
        stats["kto_undesirable"] += len(incorrect)
        if not correct and not incorrect:
            stats["all_dropped"] += 1
            continue
        if not incorrect:
            stats["all_correct"] += 1
            continue
        if not correct:
            stats["all_incorrect"] += 1
            continue
        # Draw flat indices of the correct x incorrect grid without replacement: no pair twice.
        num_combinations = len(correct) * len(incorrect)
        rng = _prompt_seed(config.seed, problem_id)
        drawn = rng.choice(num_combinations, size=min(config.k, num_combinations), replace=False)
        for flat in drawn.tolist():
            chosen_index, rejected_index = divmod(flat, len(incorrect))
            pairs.append(PreferencePair(chosen=correct[chosen_index], rejected=incorrect[rejected_index]))
        stats["prompts_with_pair"] += 1
        stats["pairs"] += len(drawn)
    return PreferenceData(pairs=pairs, kto_examples=kto_examples, stats=stats)


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def split_prompt_completion(trajectory: Trajectory) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, completion_ids, completion_policy_mask)``: split at the first policy token.

    A trajectory without any policy token is all prompt (empty completion).
    """
    _check_trajectory(trajectory, "trajectory")
    mask = trajectory.policy_mask
    start = next((t for t, value in enumerate(mask) if value), len(mask))
    return list(trajectory.input_ids[:start]), list(trajectory.input_ids[start:]), list(mask[start:])


def _pad_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int, length: int,
              multi_turn: bool) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, policy_mask)`` rows to ``length``: input_ids, attention_mask, loss_mask."""
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    policy_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, (ids, mask) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        policy_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    loss_mask = policy_mask if multi_turn else single_turn_mask(policy_mask, attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _check_multi_turn(multi_turn: Any) -> bool:
    if not isinstance(multi_turn, bool):
        raise TypeError(f"multi_turn must be a bool, got {type(multi_turn).__name__}")
    return multi_turn


def collate_pairs(pairs: Sequence[PreferencePair], pad_token_id: int, *, multi_turn: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded tensors of M-DPO pairs, token-exact (the trajectories' own ids, never re-tokenised).

    Returns ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the same for
    ``rejected_``, each (B, T) with one T for chosen and rejected (so a trainer can concatenate
    them into one forward pass). ids and attention masks are int64, loss masks bool: the policy
    mask (``multi_turn=True``) or every real token from the first policy token on (single-turn).
    """
    pad_token_id = _check_pad_token_id(pad_token_id)
    multi_turn = _check_multi_turn(multi_turn)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of PreferencePair, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty; a batch needs at least one pair")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise TypeError(f"pairs[{index}] must be a PreferencePair, got {type(pair).__name__}")
        _check_trajectory(pair.chosen, f"pairs[{index}].chosen")
        _check_trajectory(pair.rejected, f"pairs[{index}].rejected")
    length = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [(getattr(p, side).input_ids, getattr(p, side).policy_mask) for p in pairs]
        for key, tensor in _pad_rows(rows, pad_token_id, length, multi_turn).items():
            batch[f"{side}_{key}"] = tensor
    return batch


def collate_kto(examples: Sequence[KTOExample], pad_token_id: int, *, multi_turn: bool = True,
                kl_max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors of M-KTO examples and their mismatched rows for the KL estimate.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` (B, T) as in :func:`collate_pairs`,
    ``is_desirable`` (B,) bool, and ``kl_input_ids``, ``kl_attention_mask``, ``kl_loss_mask``
    (B, T_kl): row ``i`` is example ``i``'s prompt followed by the completion (and its policy
    mask) of the next example after ``i``, cyclically, whose ``problem_id`` differs. The KL rows'
    loss mask covers only that completion. ``kl_max_length`` cuts KL rows on the right (a prompt
    plus another example's completion can be longer than any trajectory of the batch).

    Raises ValueError when the batch holds a single prompt: there is no mismatched pair then.
    """
    pad_token_id = _check_pad_token_id(pad_token_id)
    multi_turn = _check_multi_turn(multi_turn)
    if kl_max_length is not None and (
        isinstance(kl_max_length, bool) or not isinstance(kl_max_length, int) or kl_max_length < 2
    ):
        raise ValueError(f"kl_max_length must be None or an int >= 2, got {kl_max_length!r}")
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a list of KTOExample, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty; a batch needs at least one example")
    splits = []
    for index, example in enumerate(examples):
        if not isinstance(example, KTOExample):
            raise TypeError(f"examples[{index}] must be a KTOExample, got {type(example).__name__}")
        if not isinstance(example.desirable, bool):
            raise TypeError(f"examples[{index}].desirable must be a bool, got {type(example.desirable).__name__}")
        _check_trajectory(example.trajectory, f"examples[{index}].trajectory")
        splits.append(split_prompt_completion(example.trajectory))
    if len({example.trajectory.problem_id for example in examples}) < 2:
        raise ValueError("examples all share one problem_id; KTO's KL estimate needs completions paired with "
                         "other prompts, so a batch needs examples of at least two prompts")

    rows = [(e.trajectory.input_ids, e.trajectory.policy_mask) for e in examples]
    batch = _pad_rows(rows, pad_token_id, max(len(ids) for ids, _ in rows), multi_turn)
    batch["is_desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)

    kl_rows = []
    for index, example in enumerate(examples):
        for shift in range(1, len(examples)):
            partner = (index + shift) % len(examples)
            if examples[partner].trajectory.problem_id != example.trajectory.problem_id:
                break
        prompt_ids = splits[index][0]
        _, completion_ids, completion_mask = splits[partner]
        ids = prompt_ids + completion_ids
        mask = [0] * len(prompt_ids) + completion_mask
        if kl_max_length is not None:
            ids, mask = ids[:kl_max_length], mask[:kl_max_length]
        kl_rows.append((ids, mask))
    kl_batch = _pad_rows(kl_rows, pad_token_id, max(len(ids) for ids, _ in kl_rows), multi_turn)
    for key, tensor in kl_batch.items():
        batch[f"kl_{key}"] = tensor
    return batch

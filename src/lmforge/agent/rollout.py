"""Batched multi-turn rollouts of the tool-integrated math agent.

    model, tokenizer = load_model(None)
    backend = TransformersBackend(model, tokenizer)
    config = RolloutConfig(samples_per_problem=4, output_path="runs/r1/rollouts.jsonl")
    trajectories = run_rollouts(generate_problems(64), backend, tokenizer, config)

Each (problem, sample) pair becomes one :class:`~lmforge.agent.format.Trajectory`. The loop keeps
up to ``batch_size`` trajectories in flight and repeats:

1. generate the next assistant turn of every trajectory in flight, in one backend call (each with
   its own token budget: ``max_new_tokens_per_turn``, and what is left of ``max_total_tokens``);
2. cut each turn at its first stop: the end of a ```python code block (a closing ``` after an
   opening ```python, checked on the decoded text, so the opening fence never stops it), or a stop
   token (the template's end-of-turn token, eos) -- whichever comes first;
3. run the code blocks in the sandbox (one interpreter per trajectory, state kept across turns),
   all at once, and append each output as a tool turn (```output block); after the
   ``max_tool_calls``-th call a notice saying no more code will run is appended to the output, and
   the next turn is the final one (it is not stopped at code blocks);
4. a trajectory whose turn ended any other way (end of turn, token limit) is finished: closing
   scaffolding appended, final answer graded with :func:`lmforge.agent.grading.grade`, the record
   appended to the JSONL file (flushed and fsync'ed) and its slot refilled from the queue.

Token ids are exactly what the policy sampled (see :mod:`lmforge.agent.format`); the cut in step 2
only drops sampled tokens after the stop, which the policy would never have seen.

Backends implement :class:`GenerationBackend`: ``generate(prompts, params) -> sampled ids``, one
:class:`SamplingParams` per prompt. A backend may stop early on the stop conditions (for speed) or
not at all: the loop cuts every turn itself, so a backend that over-generates is slower, never
wrong. :class:`TransformersBackend` batches with left padding and the KV cache of
``model.generate``, and prefills a prompt that several rows share (the samples of one problem)
once; each turn re-reads the trajectory's whole prefix (no cache is kept across turns).

Resuming: with ``output_path`` set, pairs already in the file are skipped, so a crashed or
interrupted run continues where it stopped; a line torn by the crash is cut from the file. Sampling
is seeded per backend call from ``seed``, so a rerun from scratch repeats a run, but a resumed run
draws different samples for the pairs it still has to do (the batches differ).
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from lmforge.agent.format import ChatFormat, Trajectory, append_trajectory, read_trajectories
from lmforge.agent.grading import EXTRACTION_RULES, grade
from lmforge.agent.sandbox import Sandbox, SandboxConfig
from lmforge.agent.tasks import Problem, output_block

logger = logging.getLogger(__name__)

__all__ = [
    "CodeBlock",
    "GenerationBackend",
    "RolloutConfig",
    "SamplingParams",
    "TOOL_LIMIT_NOTICE",
    "TransformersBackend",
    "cut_turn",
    "find_code_block",
    "run_rollouts",
]

TOOL_LIMIT_NOTICE = (
    "You have used all {limit} tool calls; no more code will be run. "
    "Give your final answer now, in the form \\boxed{answer}."
)
"""Appended to the output of the last allowed tool call; ``{limit}`` becomes the number of calls."""

FINISH_REASONS = ("end_of_turn", "turn_token_limit", "total_token_limit", "backend_stopped")

# An opening ```python (or ```py) fence line, then code, then the first closing ```.
_CODE_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class CodeBlock:
    """A complete ```python block: its code and the index just past its closing fence."""

    code: str
    end: int


def find_code_block(text: str) -> CodeBlock | None:
    """The first complete ```python ... ``` block of ``text``, or None (an unclosed block is none)."""
    match = _CODE_BLOCK.search(text)
    return None if match is None else CodeBlock(code=match.group(1), end=match.end())


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn.

    ``temperature`` 0 is greedy decoding. ``stop_token_ids`` end the turn (the token is kept);
    ``stop_at_code_block`` also ends it right after the closing fence of a ```python block.
    ``seed`` seeds the sampler for the backend call (None: unseeded).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_at_code_block: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that samples continuations of token id prompts (transformers, vLLM, a test script)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
        """The sampled ids of each prompt (without the prompt), at most ``params[i].max_new_tokens``."""
        ...


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def cut_turn(sampled_ids: Sequence[int], params: SamplingParams, tokenizer: Any) -> tuple[list[int], str]:
    """Cut a sampled turn at its first stop; return ``(ids, why)``.

    ``why`` is ``"code_block"`` (the ids end where a ```python block closes; only with
    ``params.stop_at_code_block``), ``"stop_token"`` (the ids end with a stop token),
    ``"length"`` (``max_new_tokens`` ids, no stop) or ``"unfinished"`` (fewer ids, no stop).
    """
    ids = [int(i) for i in sampled_ids[: params.max_new_tokens]]
    stops = set(params.stop_token_ids)
    stop_at = next((i for i, token in enumerate(ids) if token in stops), None)
    end = len(ids) if stop_at is None else stop_at + 1
    if params.stop_at_code_block and find_code_block(_decode(tokenizer, ids[:end])) is not None:
        # The shortest prefix whose text holds a complete block. Fences are ASCII, so once a prefix
        # holds one every longer prefix does, and binary search finds the closing token.
        low, high = 1, end
        while low < high:
            middle = (low + high) // 2
            if find_code_block(_decode(tokenizer, ids[:middle])) is not None:
                high = middle
            else:
                low = middle + 1
        return ids[:low], "code_block"
    if stop_at is not None:
        return ids[:end], "stop_token"
    return ids, "length" if len(ids) >= params.max_new_tokens else "unfinished"


class TransformersBackend:
    """:class:`GenerationBackend` over ``model.generate``: left-padded batches, KV cache, CPU or GPU.

    Rows share one ``generate`` call when they share temperature, top-p, stop tokens and seed;
    per-row token budgets and code-block stops are stopping criteria, so a finished row stops
    early and the call ends when every row has. Rows with the same prompt are prefilled once and
    the KV cache copied to each of them. ``max_batch_size`` splits larger requests.
    Sampling is plain temperature / top-p: ``top_k`` and repetition penalties of the model's
    generation config are switched off.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int | None = None):
        if not hasattr(model, "generate"):
            raise TypeError(f"model must be a transformers model with .generate, got {type(model).__name__}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = getattr(model.generation_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer has no pad or eos token to pad batches with")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pad_token_id = int(pad_id)
        self._backtick_tokens = None
        self._cache_argument: str | None = None  # "cache" (transformers >= 5.x) or "past_key_values"
        self._accepts_logits_to_keep = False

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _backtick_mask(self):
        """Bool tensor over the vocabulary: does the token's text contain a backtick?"""
        import torch

        if self._backtick_tokens is None:
            vocab = max(len(self.tokenizer), int(self.model.get_output_embeddings().weight.shape[0]))
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[: len(texts)] = torch.tensor(["`" in text for text in texts])
            self._backtick_tokens = mask.to(self.device)
        return self._backtick_tokens

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{index}] is empty")
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for row, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params[{row}] must be SamplingParams, got {type(p).__name__}")
            groups[(p.temperature, p.top_p, p.stop_token_ids, p.seed)].append(row)
        results: list[list[int]] = [[] for _ in prompts]
        for rows in groups.values():
            step = self.max_batch_size or len(rows)
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                outputs = self._generate_batch([prompts[r] for r in chunk], [params[r] for r in chunk])
                for row, output in zip(chunk, outputs):
                    results[row] = output
        return results

    def _generate_batch(self, prompts: list[Sequence[int]], params: list[SamplingParams]) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        device = self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token is at column `width`
            input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        shared = params[0]
        greedy = shared.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max(p.max_new_tokens for p in params),
            do_sample=not greedy,
            temperature=None if greedy else float(shared.temperature),
            top_p=None if greedy else float(shared.top_p),
            top_k=None if greedy else 0,  # 0 switches off the top-k default of generation configs
            repetition_penalty=1.0,
            eos_token_id=list(shared.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
        )
        stops = _turn_stopping_class()(
            prompt_length=width,
            budgets=torch.tensor([p.max_new_tokens for p in params], device=device),
            code_rows=torch.tensor([p.stop_at_code_block for p in params], device=device),
            backtick_tokens=self._backtick_mask() if any(p.stop_at_code_block for p in params) else None,
            tokenizer=self.tokenizer,
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        shared_cache = self._prefill_shared_prompts(prompts, input_ids, attention_mask)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=shared.seed is not None):
            if shared.seed is not None:
                torch.manual_seed(shared.seed)
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stops]),
                **shared_cache,
            )
        generated = sequences[:, width:].tolist()
        # Rows that finished early are padded; cutting at each row's own stop removes the padding.
        return [cut_turn(ids, p, self.tokenizer)[0] for ids, p in zip(generated, params)]

    def _prefill_shared_prompts(self, prompts, input_ids, attention_mask) -> dict:
        """Prefill each distinct prompt once when rows repeat prompts (the samples of one problem).

        Returns ``{cache_argument: cache}`` for ``generate``: the KV cache of every row's prompt but
        its last token, computed for the distinct prompts only and copied to their rows, so
        ``generate`` runs only the last prompt column before decoding. Empty when nothing repeats.
        Positions follow the attention mask exactly as ``generate`` numbers them (padding skipped).
        """
        import torch

        distinct_index: dict[tuple, int] = {}
        first_rows: list[int] = []  # the first row holding each distinct prompt
        rows_to_distinct: list[int] = []
        for row, prompt in enumerate(prompts):
            key = tuple(prompt)
            if key not in distinct_index:
                distinct_index[key] = len(first_rows)
                first_rows.append(row)
            rows_to_distinct.append(distinct_index[key])
        if len(first_rows) == len(prompts) or input_ids.shape[1] < 2:
            return {}
        if self._cache_argument is None:
            parameters = inspect.signature(self.model.forward).parameters
            self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
            self._accepts_logits_to_keep = "logits_to_keep" in parameters
        distinct = torch.tensor(first_rows, device=input_ids.device)
        head_ids, head_mask = input_ids[distinct, :-1], attention_mask[distinct, :-1]
        positions = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
        extra = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        with torch.no_grad():
            outputs = self.model(input_ids=head_ids, attention_mask=head_mask, position_ids=positions,
                                 use_cache=True, **extra)
        cache = outputs[self._cache_argument]
        cache.reorder_cache(torch.tensor(rows_to_distinct, device=input_ids.device))  # copy to every row
        return {self._cache_argument: cache}


@functools.cache
def _turn_stopping_class():
    """The stopping criterion class, made on first use so that importing this module does not
    import transformers (the loop and test backends do not need it)."""
    from transformers import StoppingCriteria

    class TurnStopping(StoppingCriteria):
        """Per-row stops for ``generate``: the row's token budget, and the end of a ```python block
        for rows that stop at code. Text is decoded only for rows whose newest token has a backtick."""

        def __init__(self, prompt_length, budgets, code_rows, backtick_tokens, tokenizer):
            self.prompt_length = prompt_length
            self.budgets = budgets
            self.code_rows = code_rows
            self.backtick_tokens = backtick_tokens
            self.tokenizer = tokenizer

        def __call__(self, input_ids, scores, **kwargs):
            done = self.budgets <= input_ids.shape[1] - self.prompt_length
            if self.backtick_tokens is not None:
                newest = input_ids[:, -1].clamp(0, self.backtick_tokens.shape[0] - 1)
                candidates = self.code_rows & self.backtick_tokens[newest] & ~done
                for row in candidates.nonzero().flatten().tolist():
                    text = _decode(self.tokenizer, input_ids[row, self.prompt_length :].tolist())
                    if find_code_block(text) is not None:
                        done[row] = True
            return done

    return TurnStopping


# --------------------------------------------------------------------------------------------
# The rollout loop
# --------------------------------------------------------------------------------------------


@dataclass
class RolloutConfig:
    """Every knob of :func:`run_rollouts`.

    Sampling: ``samples_per_problem`` trajectories per problem, ``temperature`` (0: greedy),
    ``top_p``, ``seed`` (None: unseeded). Limits: ``max_tool_calls`` code executions per
    trajectory (the last one's output carries ``tool_limit_notice``), ``max_new_tokens_per_turn``,
    ``max_total_tokens`` for the whole trajectory (prompt and tool output included).
    ``batch_size``: trajectories generated together. Format: ``tool_role`` ("tool" or "user"),
    ``system_prompt`` (None: the template's default), ``user_template`` (``{question}`` is replaced
    by the question), ``chat_template_kwargs``. Tools: ``tool_timeout_s`` (wall and CPU seconds per
    call), ``tool_max_output_chars``. Grading: ``grading_rules``, ``grading_timeout_s``. Output:
    ``output_path`` (JSONL, streamed; pairs already there are skipped when ``resume``),
    ``progress`` (a tqdm bar).
    """

    samples_per_problem: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    max_tool_calls: int = 6
    max_new_tokens_per_turn: int = 512
    max_total_tokens: int = 4096
    batch_size: int = 16
    tool_role: str = "tool"
    system_prompt: str | None = None
    user_template: str = "{question}"
    chat_template_kwargs: dict = field(default_factory=dict)
    tool_limit_notice: str = TOOL_LIMIT_NOTICE
    tool_timeout_s: float = 10.0
    tool_max_output_chars: int = 2000
    grading_rules: tuple[str, ...] = ("boxed",)
    grading_timeout_s: float = 5.0
    output_path: str | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"RolloutConfig.{name} must be an int >= {minimum}, got {value!r}")

        for name in ("samples_per_problem", "max_new_tokens_per_turn", "max_total_tokens", "batch_size"):
            positive_int(name)
        positive_int("max_tool_calls", 0)
        positive_int("tool_max_output_chars", 200)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"RolloutConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"RolloutConfig.seed must be an int or None, got {type(self.seed).__name__}")
        for name in ("tool_timeout_s", "grading_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"RolloutConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.tool_role not in ("tool", "user"):
            raise ValueError(f"RolloutConfig.tool_role must be 'tool' or 'user', got {self.tool_role!r}")
        if not isinstance(self.user_template, str) or "{question}" not in self.user_template:
            raise ValueError(f"RolloutConfig.user_template must contain '{{question}}', got {self.user_template!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"RolloutConfig.system_prompt must be a str or None, got {type(self.system_prompt).__name__}")
        if not isinstance(self.chat_template_kwargs, dict):
            raise TypeError("RolloutConfig.chat_template_kwargs must be a dict")
        if isinstance(self.grading_rules, str):
            self.grading_rules = (self.grading_rules,)
        self.grading_rules = tuple(self.grading_rules)
        unknown = [rule for rule in self.grading_rules if rule not in EXTRACTION_RULES]
        if unknown or not self.grading_rules:
            raise ValueError(f"RolloutConfig.grading_rules must be a non-empty selection of {EXTRACTION_RULES}, "
                             f"got {self.grading_rules!r}")


@dataclass
class _InFlight:
    """A trajectory being generated and what the loop needs to continue it."""

    problem: Problem
    trajectory: Trajectory
    tool_calls_left: int

    @property
    def sandbox_id(self) -> str:
        return f"{self.problem.id}#{self.trajectory.sample_index}"


def prompt_messages(problem: Problem, config: RolloutConfig) -> list[dict[str, str]]:
    """The opening messages of a trajectory: the optional system prompt and the question."""
    messages = [] if config.system_prompt is None else [{"role": "system", "content": config.system_prompt}]
    messages.append({"role": "user", "content": config.user_template.replace("{question}", problem.question)})
    return messages


def _check_problems(problems: Sequence[Problem]) -> list[Problem]:
    problems = list(problems)
    if not problems:
        raise ValueError("problems must be a non-empty sequence of Problem")
    seen: set[str] = set()
    for index, problem in enumerate(problems):
        if not isinstance(problem, Problem):
            raise TypeError(f"problems[{index}] must be a Problem, got {type(problem).__name__}")
        if problem.id in seen:
            raise ValueError(f"problems[{index}] repeats the problem id {problem.id!r}; ids must be unique")
        seen.add(problem.id)
    return problems


def _load_finished(config: RolloutConfig, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], Trajectory]:
    if config.output_path is None:
        return {}
    path = Path(config.output_path)
    if not path.exists() or path.stat().st_size == 0:
        return {}
    if not config.resume:
        raise FileExistsError(f"output_path {path} already holds trajectories; set resume=True to continue it "
                              "or choose another path")
    finished = {}
    for trajectory in read_trajectories(path, repair=True):
        if trajectory.key() in wanted:
            finished[trajectory.key()] = trajectory
    return finished


def run_rollouts(
    problems: Sequence[Problem],
    backend: GenerationBackend,
    tokenizer: Any,
    config: RolloutConfig | None = None,
    *,
    sandbox: Sandbox | None = None,
) -> list[Trajectory]:
    """Sample ``config.samples_per_problem`` tool-using trajectories for every problem.

    ``backend`` generates (e.g. :class:`TransformersBackend`); ``tokenizer`` is the policy's, with
    its chat template. ``sandbox`` runs the code (default: a sandbox started on the first code
    block with ``tool_timeout_s`` / ``tool_max_output_chars`` and one worker per trajectory in
    flight, shut down at the end). Returns every trajectory of ``problems`` -- those read back
    from ``output_path`` included -- ordered by problem, then sample index.
    """
    config = RolloutConfig() if config is None else config
    if not isinstance(config, RolloutConfig):
        raise TypeError(f"config must be a RolloutConfig, got {type(config).__name__}")
    if not isinstance(backend, GenerationBackend):
        raise TypeError(f"backend must have a generate(prompts, params) method, got {type(backend).__name__}")
    if sandbox is not None and not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a Sandbox or None, got {type(sandbox).__name__}")
    problems = _check_problems(problems)
    chat = ChatFormat(tokenizer, tool_role=config.tool_role, chat_template_kwargs=config.chat_template_kwargs)
    samples = range(config.samples_per_problem)
    wanted = {(problem.id, s) for problem in problems for s in samples}
    finished = _load_finished(config, wanted)
    queue = collections.deque((p, s) for p in problems for s in samples if (p.id, s) not in finished)

    # Room is kept for the closing scaffolding of a turn that ends without an end-of-turn token, so
    # no stored trajectory is longer than max_total_tokens. Every prompt must leave room for at
    # least one generated token; find out before generating anything.
    prompt_ids: dict[str, list[int]] = {}
    closing_room: dict[str, int] = {}
    for problem in dict.fromkeys(p for p, _ in queue):
        messages = prompt_messages(problem, config)
        prompt_ids[problem.id] = chat.prompt_ids(messages)
        closing_room[problem.id] = len(chat.closing_ids(messages, sampled_end_of_turn=False))
        if len(prompt_ids[problem.id]) + closing_room[problem.id] >= config.max_total_tokens:
            raise ValueError(f"problem {problem.id!r}: its prompt has {len(prompt_ids[problem.id])} tokens, "
                             f"which leaves none of max_total_tokens={config.max_total_tokens} to generate")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(wanted), initial=len(finished), desc="rollouts", unit="traj", disable=not config.progress)
    owned_sandbox: Sandbox | None = None
    in_flight: list[_InFlight] = []
    stats = {"policy_tokens": 0, "correct": 0, "graded": 0, "started": time.perf_counter()}
    notice = config.tool_limit_notice.replace("{limit}", str(config.max_tool_calls))

    def code_sandbox() -> Sandbox:
        nonlocal owned_sandbox
        if sandbox is not None:
            return sandbox
        if owned_sandbox is None:
            owned_sandbox = Sandbox(SandboxConfig(
                wall_time_s=config.tool_timeout_s, cpu_time_s=config.tool_timeout_s,
                max_output_chars=config.tool_max_output_chars, num_workers=config.batch_size))
        return owned_sandbox

    def start(problem: Problem, sample_index: int) -> _InFlight:
        trajectory = Trajectory(
            messages=prompt_messages(problem, config), problem_id=problem.id, sample_index=sample_index,
            gold=problem.answer,
            metadata={"source": problem.source, "level": problem.level, "tool_role": config.tool_role},
        )
        trajectory.append_tokens(prompt_ids[problem.id], sampled=False)
        return _InFlight(problem, trajectory, tool_calls_left=config.max_tool_calls)

    def finish(item: _InFlight, reason: str) -> None:
        trajectory = item.trajectory
        chat.close_trajectory(trajectory)
        trajectory.finish_reason = reason
        result = grade(trajectory.final_answer_text or "", item.problem.answer,
                       rules=config.grading_rules, timeout=config.grading_timeout_s)
        trajectory.correct, trajectory.predicted = result.correct, result.predicted
        if result.timed_out:
            trajectory.errors.append("grading timed out")
        trajectory.metadata.update(
            grading_rule=result.rule, tool_limit_reached=item.tool_calls_left == 0 and config.max_tool_calls > 0)
        if trajectory.tool_calls:  # free the interpreter and folder of this trajectory
            code_sandbox().close(item.sandbox_id)
        if config.output_path is not None:
            append_trajectory(config.output_path, trajectory)
        finished[trajectory.key()] = trajectory
        stats["policy_tokens"] += trajectory.num_policy_tokens
        stats["graded"] += 1
        stats["correct"] += int(bool(trajectory.correct))
        elapsed = max(time.perf_counter() - stats["started"], 1e-9)
        bar.set_postfix({"tok/s": f"{stats['policy_tokens'] / elapsed:.1f}",
                         "acc": f"{stats['correct'] / stats['graded']:.2f}"}, refresh=False)
        bar.update(1)

    calls = 0
    try:
        while queue or in_flight:
            while queue and len(in_flight) < config.batch_size:
                in_flight.append(start(*queue.popleft()))
            params = []
            for item in in_flight:
                room = config.max_total_tokens - len(item.trajectory.input_ids) - closing_room[item.problem.id]
                params.append(SamplingParams(
                    max_new_tokens=min(config.max_new_tokens_per_turn, room),
                    temperature=float(config.temperature), top_p=float(config.top_p),
                    stop_token_ids=chat.stop_token_ids, stop_at_code_block=item.tool_calls_left > 0,
                    seed=None if config.seed is None else (config.seed * 1_000_003 + calls) % (2**31 - 1)))
            outputs = backend.generate([item.trajectory.input_ids for item in in_flight], params)
            calls += 1
            if not isinstance(outputs, (list, tuple)) or len(outputs) != len(in_flight):
                raise RuntimeError(f"backend.generate returned {type(outputs).__name__} of length "
                                   f"{len(outputs) if hasattr(outputs, '__len__') else '?'} for {len(in_flight)} prompts")

            code_turns: list[tuple[_InFlight, str]] = []
            for item, output, p in zip(in_flight, outputs, params):
                sampled, why = cut_turn(output, p, chat.tokenizer)
                content = chat.add_assistant_turn(item.trajectory, sampled)
                if why == "code_block":
                    code_turns.append((item, find_code_block(content).code))
                elif why == "stop_token":
                    finish(item, "end_of_turn")
                elif why == "length":
                    finish(item, "turn_token_limit" if p.max_new_tokens == config.max_new_tokens_per_turn
                           else "total_token_limit")
                else:
                    finish(item, "backend_stopped")

            continuing: list[_InFlight] = []
            if code_turns:
                results = code_sandbox().run_batch([(item.sandbox_id, code) for item, code in code_turns])
                for (item, code), result in zip(code_turns, results):
                    trajectory = item.trajectory
                    item.tool_calls_left -= 1
                    trajectory.tool_calls.append({
                        "code": code, "output": result.output, "ok": result.ok, "error_kind": result.error_kind,
                        "error": result.error, "elapsed_s": round(result.elapsed_s, 4), "truncated": result.truncated,
                    })
                    if not result.ok:
                        trajectory.errors.append(
                            f"tool call {len(trajectory.tool_calls)}: {result.error_kind}: {result.error}")
                    tool_content = output_block(result.output)
                    if item.tool_calls_left == 0:
                        tool_content += "\n\n" + notice
                    tool_ids = chat.next_tool_turn_ids(trajectory, tool_content)
                    if len(trajectory.input_ids) + len(tool_ids) + closing_room[item.problem.id] >= config.max_total_tokens:
                        finish(item, "total_token_limit")  # no room left to answer after the output
                        continue
                    chat.add_tool_turn(trajectory, tool_content, tool_ids)
                    continuing.append(item)
            in_flight = continuing
    finally:
        bar.close()
        if sandbox is not None:
            for item in in_flight:  # trajectories cut short by an exception
                sandbox.close(item.sandbox_id)
        if owned_sandbox is not None:
            owned_sandbox.shutdown()
    return [finished[(p.id, s)] for p in problems for s in samples]

"""Fitness of LoRA adapters on answer tasks, with one base model kept loaded and adapters swapped in place.

Evolution scores hundreds of adapters of the same base model. Reloading the model and a PEFT folder for
each one spends most of the time on disk reads and module surgery, so here the base model is loaded once,
wrapped in one ``peft.PeftModel``, and every adapter is *copied into* that model's LoRA parameters
(:func:`write_adapter_`): no disk round trip, no model rebuild. Adapters are plain ``{key: tensor}`` dicts
keyed exactly as PEFT saves them (``base_model.model.<module>.lora_A.weight``), so an adapter read from an
``adapter_model.safetensors`` file, one read from the model (:func:`read_adapter`) and one made by
:mod:`lmforge.evolve.merge` are interchangeable.

The task format (a documented choice, for speed with a small CPU model): a *direct answer*. The prompt is
the chat template applied to an optional system message (:data:`SYSTEM_PROMPT`) and the question; the
model's reply should be ``\\boxed{<answer>}`` and nothing else. No tool calls, no reasoning: one short
greedy generation per question, which a 135M-parameter model on two CPU cores can afford for hundreds of
adapters. Two fitness modes score a set of examples:

* ``"accuracy"``: greedy generation of at most ``max_new_tokens`` tokens, the final answer extracted and
  compared with the gold answer by :func:`lmforge.agent.grading.grade` (math-verify equivalence);
  fitness = fraction correct.
* ``"loglik"`` (fast, no generation): the gold reply ``\\boxed{<answer>}`` is appended to the prompt and
  :func:`lmforge.models.logprobs.token_logprobs` (through lmforge.cce, no logit matrix) scores the tokens
  of ``<answer>}`` -- the answer and the brace that ends it, so a prefix of the answer does not count as
  the whole answer. Per example the mean log-probability of those tokens; fitness =
  ``exp(mean over examples)``, the geometric-mean probability per answer token. It is a monotone function
  of the mean log-likelihood (ranking is the same) but lies in (0, 1], because GENOME's fitness-
  proportional parent draws and crossover weights need fitness >= 0.

Agreement of the two modes, measured on the default task (``add_sub+mul_div+rate``, levels 1-2, 64
validation problems, 5 experts trained by ``lmforge evolve make-experts --dtype bfloat16 --steps 30
--batch-size 4 --learning-rate 2e-3 --n-train 120`` on the embedded model): Spearman 0.90 (Pearson 0.85)
between loglik fitness and accuracy over 16 adapters (the experts, 6 pair merges, 5 mutants of them), from
``lmforge evolve fitness-correlation --config <experts>/evolve.yaml --n-validation 64 --max-new-tokens 12``.
Accuracies there were low (0 to 16%, several ties at 0), and mutants are close to their parents, so the
number says that loglik ranks adapters like accuracy does at this scale, not more.

Examples are encoded once (:func:`encode_answer_examples`); evaluation sorts them by length and runs them
in batches (left padding for generation, right padding for scoring), so the result for an adapter depends
only on the adapter and the examples, never on what was evaluated before.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lmforge.agent.grading import EXTRACTION_RULES, extract_answer, is_equivalent, remove_thousands_separators
from lmforge.agent.tasks import Problem
from lmforge.evolve.population import Adapter, adapter_hash
from lmforge.models.lora import ADAPTER_WEIGHTS_FILENAME, check_lora_folder, save_lora

SYSTEM_PROMPT = "Reply with only the final answer, in \\boxed{}."
FITNESS_MODES = ("accuracy", "loglik")
DEFAULT_ADAPTER_NAME = "default"


# ---------------------------------------------------------------------------------------------
# Adapters in place.


def _check_peft_model(model) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel with a LoRA adapter (see lmforge.models.lora.attach_lora "
                        f"or load_lora), got {type(model).__name__}")


def lora_parameters(model, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of ``adapter_name`` in a PeftModel, keyed as PEFT saves them.

    The model's parameter ``...q_proj.lora_A.default.weight`` is returned under the saved name
    ``...q_proj.lora_A.weight``. Adapters with other trainable pieces (DoRA magnitudes, modules_to_save,
    LoRA on embeddings) are refused, since merging and swapping here only know lora_A / lora_B.
    """
    from peft.utils import get_peft_model_state_dict

    _check_peft_model(model)
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of the model; it has "
                         f"{sorted(model.peft_config)}")
    parameters = {}
    for name, parameter in model.named_parameters():
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}.{adapter_name}."
            if marker in name:
                parameters[name.replace(marker, f".{factor}.")] = parameter
    saved_keys = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    if set(parameters) != saved_keys:
        other = sorted(saved_keys - set(parameters))[:3]
        raise ValueError(f"adapter {adapter_name!r} holds parameters other than lora_A / lora_B (e.g. {other}); "
                         "only plain LoRA adapters can be swapped in place")
    if not parameters:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA parameters")
    return parameters


def read_adapter(model, adapter_name: str = DEFAULT_ADAPTER_NAME) -> Adapter:
    """A copy of the model's current LoRA weights (CPU tensors, PEFT's saved key names and order)."""
    return {key: p.detach().to("cpu", copy=True) for key, p in lora_parameters(model, adapter_name).items()}


def check_adapter_matches(adapter: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor],
                          label: str = "adapter") -> None:
    """ValueError/TypeError naming the key unless ``adapter`` has exactly the keys and shapes of ``parameters``."""
    if not isinstance(adapter, Mapping):
        raise TypeError(f"{label} must be a mapping of LoRA keys to tensors, got {type(adapter).__name__}")
    missing = sorted(set(parameters) - set(adapter))
    extra = sorted(set(adapter) - set(parameters))
    if missing or extra:
        raise ValueError(f"{label} does not fit the model's LoRA adapter: missing {missing[:3]}, unexpected "
                         f"{extra[:3]} (was it trained with another rank, target modules or base model?)")
    for key, parameter in parameters.items():
        tensor = adapter[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{label}[{key!r}] must be a floating-point tensor, got {getattr(tensor, 'dtype', tensor)!r}")
        if tensor.shape != parameter.shape:
            raise ValueError(f"{label}[{key!r}] has shape {tuple(tensor.shape)}, the model's LoRA parameter has "
                             f"{tuple(parameter.shape)}")


@torch.no_grad()
def write_adapter_(model, adapter: Mapping[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER_NAME) -> None:
    """Copy ``adapter`` into the model's LoRA parameters, in place (device and dtype of the model's parameters).

    After this the model computes exactly what a fresh ``PeftModel.from_pretrained`` of the same weights
    computes. The adapter's tensors are not kept or modified.
    """
    copy_into_parameters(lora_parameters(model, adapter_name), adapter)


@torch.no_grad()
def copy_into_parameters(parameters: Mapping[str, torch.nn.Parameter], adapter: Mapping[str, torch.Tensor]) -> None:
    """Check ``adapter`` against ``parameters`` (from :func:`lora_parameters`) and copy it in, in place."""
    check_adapter_matches(adapter, parameters)
    for key, parameter in parameters.items():
        parameter.copy_(adapter[key])


def load_adapter_weights(folder: str | os.PathLike) -> Adapter:
    """The LoRA weights of a PEFT folder (``adapter_model.safetensors``) as a dict, without touching a model."""
    folder = Path(folder).expanduser()
    check_lora_folder(folder)
    path = folder / ADAPTER_WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS_FILENAME} (only safetensors adapters are read)")
    return load_file(str(path))


def save_adapter(model, adapter: Mapping[str, torch.Tensor], folder: str | os.PathLike, *,
                 overwrite: bool = False, adapter_name: str = DEFAULT_ADAPTER_NAME) -> Path:
    """Write ``adapter`` as a standard PEFT folder (the model's adapter config + these weights); atomic.

    The adapter is written into the model first (the model keeps it afterwards), so the folder carries the
    model's own adapter_config.json and loads with ``PeftModel.from_pretrained`` / lmforge's ``load_lora``.
    """
    write_adapter_(model, adapter, adapter_name)
    return save_lora(model, folder, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Encoding examples.


@dataclasses.dataclass(frozen=True)
class AnswerExample:
    """One question of an answer task, tokenised once.

    prompt_ids: the chat prompt up to the assistant's turn (generation starts after it).
    completion_ids: the gold reply's tokens (``\\boxed{answer}`` and the template's end of turn).
    answer_mask: per completion token, True when it is part of ``answer}`` (the tokens loglik scores).
    """

    problem_id: str
    task: str
    split: str
    gold: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    answer_mask: tuple[bool, ...]


def answer_reply(gold: str) -> str:
    """The gold reply in the direct-answer format."""
    return f"\\boxed{{{gold}}}"


def answer_messages(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat messages of a direct-answer prompt (a system message only when system_prompt is set)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}]


def encode_answer_examples(problems: Sequence[Problem], tokenizer, *, task: str,
                           system_prompt: str | None = SYSTEM_PROMPT) -> list[AnswerExample]:
    """Tokenise problems in the direct-answer format (see the module docstring).

    The whole conversation (prompt + gold reply) is rendered with the tokenizer's chat template and
    tokenised once with character offsets; the prompt is the part before the reply, and answer tokens are
    those whose characters overlap ``answer}``. This never relies on the ids of one template's special
    tokens. The split of each example is ``problem.metadata["split"]`` when present.
    """
    if isinstance(problems, (str, bytes)) or not isinstance(problems, Sequence) or not problems:
        raise TypeError("problems must be a non-empty list of lmforge.agent.tasks.Problem")
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty task name, got {task!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer has no chat template; the direct-answer format needs one")
    examples = []
    for problem in problems:
        if not isinstance(problem, Problem):
            raise TypeError(f"problems must hold Problem records, got {type(problem).__name__}")
        messages = answer_messages(problem.question, system_prompt)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        reply = answer_reply(problem.answer)
        full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the tokenizer's chat template renders a conversation that does not start with its "
                             "generation prompt; the direct-answer format cannot split prompt and reply")
        reply_start = full_text.index(reply, len(prompt_text))
        answer_start = reply_start + len("\\boxed{")
        answer_end = reply_start + len(reply)  # includes the closing brace
        encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        # The prompt ends at the first token that reaches into the reply; generation starts from exactly
        # these tokens, so they must be what the prompt alone tokenises to.
        n_prompt = next(i for i, (start, end) in enumerate(offsets) if end > len(prompt_text))
        if tokenizer(prompt_text, add_special_tokens=False)["input_ids"] != ids[:n_prompt]:
            raise ValueError("the tokenizer merges the end of the prompt with the start of the reply; the "
                             "direct-answer format needs a token boundary there")
        completion = ids[n_prompt:]
        mask = tuple(start < answer_end and end > answer_start for start, end in offsets[n_prompt:])
        if not any(mask):
            raise ValueError(f"could not locate the answer tokens of problem {problem.id!r}")
        examples.append(AnswerExample(
            problem_id=problem.id, task=task, split=str(problem.metadata.get("split", "")), gold=problem.answer,
            prompt_ids=tuple(ids[:n_prompt]), completion_ids=tuple(completion), answer_mask=mask))
    return examples


# ---------------------------------------------------------------------------------------------
# Batches and the two fitness measures (on whatever adapter the model holds now).


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of int64 token lists padded on ``side`` ("left" or "right")."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if side == "left" else 0
        ids[row, start:start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, start:start + len(sequence)] = 1
    return ids.to(device), mask.to(device)


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of similar length (stable sort, longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_logprobs(model, examples: Sequence[AnswerExample], *, pad_id: int, batch_size: int = 16,
                    progress: bool = False) -> list[float]:
    """Per example, the mean log-probability of its answer tokens under the model (prompt + gold reply)."""
    from lmforge.models.logprobs import token_logprobs

    device = _model_device(model)
    sequences = [e.prompt_ids + e.completion_ids for e in examples]
    means = [0.0] * len(examples)
    batches = _batches_by_length([len(s) for s in sequences], batch_size)
    for batch in tqdm(batches, desc="loglik", unit="batch", leave=False, disable=not progress):
        ids, attention = pad_sequences([sequences[i] for i in batch], pad_id, side="right", device=device)
        loss_mask = torch.zeros_like(attention)
        for row, i in enumerate(batch):
            start = len(examples[i].prompt_ids)
            loss_mask[row, start:start + len(examples[i].answer_mask)] = torch.tensor(examples[i].answer_mask)
        scores = token_logprobs(model, ids, attention, loss_mask)
        row_means = (scores.sum_logprobs.double() / scores.num_tokens.double()).tolist()
        for row, i in enumerate(batch):
            means[i] = row_means[row]
    return means


def loglik_fitness_from(example_logprobs: Sequence[float]) -> float:
    """exp(mean over examples of the per-example mean answer-token log-probability), in (0, 1]."""
    return math.exp(math.fsum(example_logprobs) / len(example_logprobs))


@torch.no_grad()
def generate_replies(model, tokenizer, examples: Sequence[AnswerExample], *, batch_size: int = 16,
                     max_new_tokens: int = 20, progress: bool = False) -> list[str]:
    """Greedy replies (decoded text, special tokens dropped) to each example's prompt."""
    from transformers import GenerationConfig

    device = _model_device(model)
    eos = tokenizer.eos_token_id
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    replies = [""] * len(examples)
    batches = _batches_by_length([len(e.prompt_ids) for e in examples], batch_size)
    for batch in tqdm(batches, desc="generate", unit="batch", leave=False, disable=not progress):
        ids, attention = pad_sequences([examples[i].prompt_ids for i in batch], tokenizer.pad_token_id,
                                       side="left", device=device)
        output = model.generate(input_ids=ids, attention_mask=attention, generation_config=generation_config)
        texts = tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)
        for row, i in enumerate(batch):
            replies[i] = texts[row]
    return replies


def canonical_answer(text: str | None) -> str | None:
    """A normal form for votes: numbers as ``str(Fraction)`` ("2.50" -> "5/2", "1,000" -> "1000"), other text stripped."""
    if text is None:
        return None
    stripped = remove_thousands_separators(text.strip()).strip().strip("$").rstrip(".").strip()
    try:
        return str(Fraction(stripped))
    except (ValueError, ZeroDivisionError):
        return stripped or None


# ---------------------------------------------------------------------------------------------
# The evaluator: one PeftModel, adapters swapped in.


class AdapterEvaluator:
    """Scores adapters of one base model held in one PeftModel (the state that lives across calls).

    Args:
        model: a ``peft.PeftModel`` with one LoRA adapter (``adapter_name``); its LoRA weights are
            overwritten by every evaluation.
        tokenizer: the base model's tokenizer (with a padding token; lmforge's ``load_model`` sets one).
        batch_size: examples per forward pass / generate call.
        max_new_tokens: generation budget of the accuracy mode.
        answer_rules: extraction rules of :func:`lmforge.agent.grading.extract_answer`, tried in order.
        progress: tqdm bars over batches.

    Replies and extracted answers are memoised per (adapter content hash, examples), so the accuracy of
    an adapter and its ensemble votes cost one generation.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_new_tokens: int = 20,
                 answer_rules: Sequence[str] = EXTRACTION_RULES, adapter_name: str = DEFAULT_ADAPTER_NAME,
                 progress: bool = False):
        self.parameters = lora_parameters(model, adapter_name)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no padding token; load it with lmforge.models.load_model, which sets one")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.answer_rules = tuple(answer_rules)
        self.adapter_name = adapter_name
        self.progress = progress
        self._answers: dict[tuple[str, tuple[str, ...]], list[str | None]] = {}
        model.eval()

    def load(self, adapter: Mapping[str, torch.Tensor]) -> None:
        """Put ``adapter`` into the model (in place)."""
        copy_into_parameters(self.parameters, adapter)

    def example_logprobs(self, adapter: Mapping[str, torch.Tensor], examples: Sequence[AnswerExample]) -> list[float]:
        """Per example, the mean answer-token log-probability under ``adapter``."""
        self.load(adapter)
        return answer_logprobs(self.model, examples, pad_id=self.tokenizer.pad_token_id,
                               batch_size=self.batch_size, progress=self.progress)

    def loglik_fitness(self, adapter: Mapping[str, torch.Tensor], examples: Sequence[AnswerExample]) -> float:
        """The loglik-mode fitness (see the module docstring) of ``adapter`` on ``examples``."""
        return loglik_fitness_from(self.example_logprobs(adapter, examples))

    def answers(self, adapter: Mapping[str, torch.Tensor], examples: Sequence[AnswerExample]) -> list[str | None]:
        """The answer extracted from the greedy reply to each example (None where none was found), as given."""
        key = (adapter_hash(adapter), tuple(e.problem_id for e in examples))
        if key not in self._answers:
            self.load(adapter)
            replies = generate_replies(self.model, self.tokenizer, examples, batch_size=self.batch_size,
                                       max_new_tokens=self.max_new_tokens, progress=self.progress)
            self._answers[key] = [extract_answer(reply, self.answer_rules) for reply in replies]
        return list(self._answers[key])

    def accuracy(self, adapter: Mapping[str, torch.Tensor], examples: Sequence[AnswerExample]) -> float:
        """Fraction of examples whose extracted answer is equivalent to the gold answer."""
        return answer_accuracy(self.answers(adapter, examples), examples)

    def fitness(self, adapter: Mapping[str, torch.Tensor], examples: Sequence[AnswerExample], mode: str) -> float:
        """Accuracy or loglik fitness of ``adapter`` on ``examples``."""
        if mode == "accuracy":
            return self.accuracy(adapter, examples)
        if mode == "loglik":
            return self.loglik_fitness(adapter, examples)
        raise ValueError(f"mode must be one of {FITNESS_MODES}, got {mode!r}")

    def fitness_fn(self, tasks: Mapping[str, Sequence[AnswerExample]], mode: str) -> Callable[[Any], dict[str, float]]:
        """``fn(individual) -> {task: fitness}`` over ``tasks`` (validation examples), for a FitnessCache."""
        if mode not in FITNESS_MODES:
            raise ValueError(f"mode must be one of {FITNESS_MODES}, got {mode!r}")
        if not isinstance(tasks, Mapping) or not tasks:
            raise TypeError("tasks must be a non-empty mapping of task name to examples")

        def fitness_of(individual) -> dict[str, float]:
            return {task: self.fitness(individual.adapter, examples, mode) for task, examples in tasks.items()}

        return fitness_of


def answer_accuracy(answers: Sequence[str | None], examples: Sequence[AnswerExample]) -> float:
    """Fraction of ``answers`` equivalent to their example's gold answer (math-verify; None is wrong)."""
    if len(answers) != len(examples):
        raise ValueError(f"answers has {len(answers)} entries but examples has {len(examples)}")
    if not examples:
        raise ValueError("examples must not be empty")
    return sum(is_equivalent(a, e.gold) for a, e in zip(answers, examples)) / len(examples)


def spearman_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks, ties share their mean rank)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y must have the same length >= 2, got {len(x)} and {len(y)}")

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.fsum((a - mx) ** 2 for a in rx)
    vy = math.fsum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return float("nan")  # a constant series has no ranking to correlate
    return cov / math.sqrt(vx * vy)

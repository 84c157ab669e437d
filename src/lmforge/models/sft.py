"""Supervised fine-tuning on chat data, with the loss on assistant tokens only: ``lmforge sft``.

    result = run_sft(SFTConfig(output_dir="runs/sft-smol", max_steps=200))

Data. Conversations are lists of messages ``{"role": ..., "content": ...}`` with roles system, user,
assistant and tool; a data file is JSONL with one ``{"messages": [...]}`` per line. Without a file, the
default data are lmforge's generated arithmetic word problems with tool-integrated solutions
(:func:`lmforge.agent.tasks.generate_problems` + :func:`~lmforge.agent.tasks.solution_messages`).

Which tokens are trained on. Masks are built per message from the chat template itself, never from the
token ids of one template: for assistant message k,

    prompt  = apply_chat_template(messages[:k], add_generation_prompt=True)   # ends with the assistant header
    through = apply_chat_template(messages[:k+1])                              # ends after message k

and the characters ``[len(prompt), len(through.rstrip()))`` of the full rendering are the assistant's: its
content and the template's end-of-turn marker (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``</s>``)
but not the header, and not whitespace the template writes after the marker (the model stops at the marker,
so it never generates that whitespace). The full rendering is tokenized once with character offsets, and a
token is trained on when it starts inside one of those character spans. Working in characters of one
tokenization means no token boundary can shift between the prefix and the full conversation. Every user,
system and tool turn, every header and any padding gets label -100. A template that renders a prefix of the
conversation differently from the start of the whole conversation (so the spans would be wrong) is refused
with a ValueError.

Tool turns. Templates without a tool role (they raise on it, as Gemma's does, or drop it) get tool messages
as user messages: ``tool_role="auto"`` detects this by rendering a probe conversation, ``"user"`` forces the
mapping and ``"tool"`` forbids it. When mapped, consecutive user messages are merged (joined by a blank line)
so templates that demand alternating roles accept them.

Training. transformers' Trainer does the loop, so ``accelerate launch`` (DDP, FSDP, DeepSpeed) runs it
unchanged; :func:`training_arguments` maps :class:`SFTConfig` onto ``TrainingArguments``. The model is
patched with :func:`lmforge.cce.patch.patch`, so ``model(input_ids, labels=...)`` computes its loss with Cut
Cross-Entropy and the tokens x vocabulary logits never exist (in training and in evaluation). The loss is
the stock one: the mean over the assistant tokens of the whole accumulated batch (Trainer's
``num_items_in_batch``, counted across devices); the evaluation loss is Trainer's too, the token mean of each
eval batch averaged over batches. LoRA (default) or full fine-tuning; bf16 mixed precision on
GPU (LoRA keeps the frozen base weights in bf16, full fine-tuning keeps float32 master weights), float32 on
the CPU; AdamW with a cosine schedule after a linear warm-up.

The run folder (``output_dir``):

    config.yaml     the SFTConfig of the run
    metrics.jsonl   one line per log: train loss, grad norm, learning rate, eval loss, step, epoch
    report.md       data, settings and results
    loss.png        train and eval loss against the step
    checkpoints/    Trainer checkpoints (checkpoint-<step>/), the newest kept
    final/          the trained model: a PEFT adapter folder for LoRA, a full model folder otherwise (with
                    the tokenizer in both cases)

Running again on the same folder resumes from the newest checkpoint (``resume=True``), with the data order,
RNG states, optimizer and schedule restored by Trainer; metrics.jsonl is rewritten from the checkpoint's
log history, so lines logged after the checkpoint by a crashed run don't appear twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.config import (add_config_arguments, check_choice, check_int, check_number, check_optional_string,
                            check_resumable, config_from_args)
from lmforge.files import read_jsonl, write_text_atomic

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
TOOL_ROLE_OPTIONS = ("auto", "tool", "user")
FINETUNE_OPTIONS = ("lora", "full")
PRECISION_OPTIONS = ("auto", "bf16", "fp32")
IGNORE_INDEX = -100  # label of tokens that are not trained on (transformers' ForCausalLMLoss default)

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
REPORT_FILENAME = "report.md"
PLOT_FILENAME = "loss.png"
CHECKPOINTS_DIRNAME = "checkpoints"
FINAL_DIRNAME = "final"

# Default learning rates per fine-tuning mode (learning_rate=None picks one).
DEFAULT_LEARNING_RATES = {"lora": 2e-4, "full": 2e-5}
# Options that define what is trained on what; a resumed run must not change them.
_RUN_IDENTITY_FIELDS = (
    "model", "data", "n_examples", "skills", "levels", "finetune", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_target_modules", "max_length", "eval_fraction", "seed", "tool_role", "batch_size",
    "grad_accumulation",
)
# A probe conversation for tool-role detection; the marker is unlikely to occur in a template.
_TOOL_PROBE_MARKER = "lmforge-tool-probe-7f3a"


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class SFTConfig:
    """Options of ``lmforge sft`` and :func:`run_sft`.

    Model and data:
        model: a Hugging Face folder, a hub id or a .gguf file; None = the embedded SmolLM2-135M-Instruct.
        data: a JSONL file with one ``{"messages": [...]}`` per line; None = ``n_examples`` generated
            word problems with tool-integrated solutions (``skills`` / ``levels`` select them, None = all).
        tool_role: "auto" (keep the tool role if the chat template renders it, else map tool -> user),
            "tool" (always keep it) or "user" (always map it).
        max_length: conversations are cut to this many tokens (the tail is dropped); a conversation left
            with no assistant token is skipped.
        eval_fraction: share of the conversations held out for the evaluation loss (0 = no evaluation).

    Fine-tuning:
        finetune: "lora" (a PEFT LoRA adapter on every linear layer of the blocks, or lora_target_modules)
            or "full".
        precision: "auto" (bf16 mixed precision on CUDA, float32 on the CPU), "bf16" or "fp32".
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        cce: compute the loss with lmforge's Cut Cross-Entropy patch (no logits); False = the stock loss.
        attn_implementation: transformers' attention kernel ("eager", "sdpa", "flex_attention", ...);
            None = transformers' default for the architecture (see lmforge.models.loading.load_model).

    Optimisation (AdamW, cosine decay to 0 after a linear warm-up):
        learning_rate: None = 2e-4 for LoRA, 2e-5 for full fine-tuning.
        epochs / max_steps: max_steps (optimizer steps) wins when set.
        batch_size: conversations per device per micro-batch; grad_accumulation micro-batches per step.
        warmup: a fraction of the steps when < 1, else a number of steps.

    Run folder:
        output_dir: the run folder (see the module docstring).
        save_steps / eval_steps / logging_steps: in optimizer steps; eval_steps None = save_steps.
        save_total_limit: how many checkpoints to keep (None = all).
        resume: continue from the newest checkpoint in output_dir if there is one; with False, a folder
            that already holds checkpoints is an error (pick a new output_dir).
    """

    model: str | None = None
    data: str | None = None
    n_examples: int = 2000
    skills: list[str] | None = None
    levels: list[int] | None = None
    tool_role: str = "auto"
    max_length: int = 1024
    eval_fraction: float = 0.05
    output_dir: str = "runs/sft"
    finetune: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accumulation: int = 1
    warmup: float = 0.03
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    cce: bool = True
    cce_impl: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    save_steps: int = 200
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    logging_steps: int = 10
    resume: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "data"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                    raise TypeError(f"{name} must be a non-empty path string or None, got {value!r}")
                setattr(self, name, os.fspath(value))
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise TypeError(f"output_dir must be a non-empty path string, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        check_choice("tool_role", self.tool_role, TOOL_ROLE_OPTIONS)
        check_choice("finetune", self.finetune, FINETUNE_OPTIONS)
        check_choice("precision", self.precision, PRECISION_OPTIONS)
        for name in ("n_examples", "max_length", "batch_size", "grad_accumulation", "save_steps", "logging_steps",
                     "lora_rank"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_batch_size", "eval_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        check_number("eval_fraction", self.eval_fraction, low=0.0, high=1.0, high_open=True)
        check_number("epochs", self.epochs, low=0.0, low_open=True)
        check_number("warmup", self.warmup, low=0.0)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.learning_rate is not None:
            check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError(f"warmup must be a fraction < 1 or a whole number of steps, got {self.warmup}")
        for name in ("gradient_checkpointing", "cce", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.skills is not None:
            self.skills = _check_string_list("skills", self.skills)
        if self.lora_target_modules is not None:
            self.lora_target_modules = _check_string_list("lora_target_modules", self.lora_target_modules)
        if self.levels is not None:
            if isinstance(self.levels, int) and not isinstance(self.levels, bool):
                self.levels = [self.levels]
            if not isinstance(self.levels, (list, tuple)) or not self.levels:
                raise TypeError(f"levels must be a non-empty list of ints or None, got {self.levels!r}")
            for level in self.levels:
                check_int("levels", level, minimum=1)
            self.levels = list(self.levels)
        from lmforge.cce.api import IMPLS

        check_choice("cce_impl", self.cce_impl, IMPLS)
        check_optional_string("attn_implementation", self.attn_implementation)

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.finetune]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_string_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a non-empty list of non-empty strings or None, got {value!r}")
    return list(value)


# --------------------------------------------------------------------------------------------------
# Conversations


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """Return ``messages`` as a list of ``{"role", "content"}`` dicts; raise ValueError naming ``where``
    unless it is a non-empty list of messages with known roles, string contents and an assistant turn.
    Other keys of a message (``name``, ``tool_call_id``, ...) are dropped: only role and content are rendered."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: message {index} must be an object with role and content, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {index} has role {role!r}; roles must be one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {index} ({role}) must have a string 'content', got {content!r}")
        checked.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in checked):
        raise ValueError(f"{where}: has no assistant message, so there is nothing to train on")
    return checked


def load_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file (one ``{"messages": [...]}`` per line; blank lines skipped).
    Malformed lines raise ValueError naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    conversations = []
    for where, record in read_jsonl(path):
        if "messages" not in record:
            raise ValueError(f"{where}: expected an object with a 'messages' list")
        conversations.append(check_messages(record["messages"], where))
    if not conversations:
        raise ValueError(f"data file {path} holds no conversations")
    return conversations


def generated_conversations(n: int, *, skills: Sequence[str] | None = None, levels: Sequence[int] | None = None,
                            seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` tool-integrated solutions of generated word problems (train split) as conversations:
    user question, assistant reasoning + Python block, tool output, assistant boxed answer."""
    from lmforge.agent.tasks import generate_problems, solution_messages

    problems = generate_problems(n, skills=skills, levels=levels, split="train", seed=seed)
    return [solution_messages(problem) for problem in problems]


def split_train_eval(conversations: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first ``round(eval_fraction * n)`` (at least one when the fraction is > 0
    and there are two or more conversations, never all) go to evaluation."""
    order = list(range(len(conversations)))
    random.Random(f"lmforge-sft-split:{seed}").shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(conversations) >= 2:
        n_eval = min(max(1, round(eval_fraction * len(conversations))), len(conversations) - 1)
    eval_set = [conversations[i] for i in sorted(order[:n_eval])]
    train_set = [conversations[i] for i in sorted(order[n_eval:])]
    return train_set, eval_set


# --------------------------------------------------------------------------------------------------
# Chat template rendering and the assistant mask


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
                         f"tokenizer.chat_template to a Jinja template before SFT on chat data")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def template_renders_tool_role(tokenizer: Any) -> bool:
    """Whether the chat template accepts a message with role "tool" and writes its content."""
    probe = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "```python\nprint(2 + 3)\n```"},
        {"role": "tool", "content": _TOOL_PROBE_MARKER},
        {"role": "assistant", "content": "5"},
    ]
    try:
        text = render_chat(tokenizer, probe)
    except ValueError:
        raise
    except Exception:  # jinja's TemplateError from raise_exception(...), or a template bug on unknown roles
        return False
    return _TOOL_PROBE_MARKER in text


def resolve_tool_role(tokenizer: Any, tool_role: str) -> str:
    """"tool" or "user": the role tool messages are rendered with, for ``tool_role`` in
    ("auto", "tool", "user")."""
    check_choice("tool_role", tool_role, TOOL_ROLE_OPTIONS)
    if tool_role != "auto":
        return tool_role
    return "tool" if template_renders_tool_role(tokenizer) else "user"


def map_tool_messages(messages: Sequence[Mapping[str, str]], tool_role: str) -> list[dict[str, str]]:
    """``messages`` with tool turns rendered as ``tool_role``. Mapping to "user" merges runs of consecutive
    user messages (joined by a blank line), so templates that demand alternating roles accept them."""
    if tool_role == "tool":
        return [dict(message) for message in messages]
    if tool_role != "user":
        raise ValueError(f"tool_role must be 'tool' or 'user' here, got {tool_role!r}")
    mapped: list[dict[str, str]] = []
    for message in messages:
        role = "user" if message["role"] == "tool" else message["role"]
        if role == "user" and mapped and mapped[-1]["role"] == "user":
            mapped[-1]["content"] = mapped[-1]["content"] + "\n\n" + message["content"]
        else:
            mapped.append({"role": role, "content": message["content"]})
    return mapped


def assistant_char_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span ``[start, end)`` of each assistant message in it:
    from the end of the generation prompt to the end of the message, trailing whitespace excluded (see the
    module docstring). Raises ValueError if the template does not render prefixes as prefixes."""
    text = _render_or_raise(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_or_raise(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render_or_raise(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not text.startswith(through) or not through.startswith(prompt):
            raise ValueError(
                f"the chat template renders the conversation up to message {index} differently from the start of "
                f"the whole conversation, so assistant tokens cannot be located by prefix rendering (templates "
                f"that rewrite earlier turns, e.g. dropping reasoning, are not supported); differing at character "
                f"{_first_difference(text, through if not text.startswith(through) else prompt)}"
            )
        end = len(through.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return text, spans


def _render_or_raise(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except ValueError:
        raise
    except Exception as err:  # jinja TemplateError (e.g. "roles must alternate") and friends
        roles = [message["role"] for message in messages]
        raise ValueError(f"the chat template cannot render a conversation with roles {roles}: "
                         f"{type(err).__name__}: {err}") from err


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assistant_token_mask(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of the rendered conversation; ``mask[t] = 1`` where token t belongs to an
    assistant message (its content and end-of-turn marker), 0 elsewhere.

    ``messages`` are rendered as given (map tool turns first, see :func:`map_tool_messages`). The text is
    tokenized as ``apply_chat_template(..., tokenize=True)`` does (no extra special tokens), with
    character offsets, so it needs a fast (Rust) tokenizer.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives no character offsets; SFT masks need a fast "
                         f"(Rust-backed) tokenizer") from err
    input_ids = list(encoding["input_ids"])
    mask = [0] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        if end <= start:
            continue  # tokens that cover no character (added bos/eos) are never the assistant's
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start:
            mask[position] = 1
    return input_ids, mask


def tokenize_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_length: int,
                          tool_role: str = "tool") -> dict[str, list[int]]:
    """One training example: ``{"input_ids", "labels"}`` with labels = input ids on assistant tokens and
    -100 elsewhere, cut to ``max_length`` tokens. ``tool_role`` is "tool" or "user" (see
    :func:`resolve_tool_role`)."""
    input_ids, mask = assistant_token_mask(tokenizer, map_tool_messages(messages, tool_role))
    return _example(input_ids, mask, max_length)


def _example(input_ids: list[int], mask: list[int], max_length: int) -> dict[str, list[int]]:
    input_ids, mask = input_ids[:max_length], mask[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask)]
    return {"input_ids": input_ids, "labels": labels}


def build_examples(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]], *, max_length: int,
                   tool_role: str, show_progress: bool = True, description: str = "tokenizing") -> tuple[list, dict]:
    """Tokenize conversations into examples; return ``(examples, stats)``.

    Examples whose assistant tokens all fall beyond ``max_length`` are dropped (a label needs a token before
    it, so an example needs an assistant token at position >= 1). ``stats`` counts conversations, kept
    examples, truncated and dropped ones, tokens and assistant tokens.
    """
    from tqdm.auto import tqdm

    examples = []
    stats = {"conversations": len(conversations), "examples": 0, "truncated": 0, "dropped": 0, "tokens": 0,
             "assistant_tokens": 0}
    for index, messages in enumerate(tqdm(conversations, desc=description, disable=not show_progress)):
        try:
            input_ids, mask = assistant_token_mask(tokenizer, map_tool_messages(messages, tool_role))
        except ValueError as err:
            raise ValueError(f"conversation {index}: {err}") from err
        stats["truncated"] += len(input_ids) > max_length
        example = _example(input_ids, mask, max_length)
        trained = sum(label != IGNORE_INDEX for label in example["labels"][1:])
        if trained == 0:
            stats["dropped"] += 1
            continue
        examples.append(example)
        stats["tokens"] += len(example["input_ids"])
        stats["assistant_tokens"] += trained
    stats["examples"] = len(examples)
    return examples, stats


def collate_chat_batch(features: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad examples on the right into ``input_ids``, ``attention_mask`` and ``labels`` (B, T) tensors;
    padding gets attention 0 and label -100."""
    if not features:
        raise ValueError("collate_chat_batch needs at least one example")
    length = max(len(feature["input_ids"]) for feature in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Trainer set-up


def use_bf16(precision: str) -> bool:
    """Whether training runs in bf16 mixed precision: "auto" = on CUDA devices that support bf16."""
    check_choice("precision", precision, PRECISION_OPTIONS)
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def training_arguments(config: SFTConfig, run_dir: Path, *, has_eval: bool) -> Any:
    """The ``transformers.TrainingArguments`` of ``config``; checkpoints go to ``run_dir/checkpoints``."""
    from transformers import TrainingArguments

    eval_steps = config.eval_steps if config.eval_steps is not None else config.save_steps
    bf16 = use_bf16(config.precision)
    # transformers renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated
    # alias); use whichever this version has. Non-reentrant checkpointing needs no input gradients with LoRA.
    argument_names = {field.name for field in dataclasses.fields(TrainingArguments)}
    checkpointing_name = ("activation_checkpointing" if "activation_checkpointing" in argument_names
                          else "gradient_checkpointing")
    checkpointing = {checkpointing_name: config.gradient_checkpointing,
                     f"{checkpointing_name}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        **checkpointing,
        output_dir=str(run_dir / CHECKPOINTS_DIRNAME),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        learning_rate=config.resolved_learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        # Without a GPU, say so: Trainer then accepts bf16 (CPU autocast), and under a plain torchrun (no
        # `accelerate launch --cpu`) it still sees the gloo process group instead of training each rank alone.
        use_cpu=not torch.cuda.is_available(),
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        prediction_loss_only=True,  # evaluation needs the loss only (the patched model returns no logits)
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen=True,
        report_to="none",
        disable_tqdm=False,
    )


def _metrics_callback(path: Path) -> Any:
    """A TrainerCallback that keeps ``metrics.jsonl`` equal to the Trainer's log history (main process)."""
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # On resume the state (log history included) comes from the checkpoint; lines a crashed run wrote
            # after that checkpoint are dropped, because those steps are about to be trained again.
            if state.is_world_process_zero:
                write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in state.log_history))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**logs, "step": state.global_step}) + "\n")

    return MetricsFile()


def load_model_for_sft(config: SFTConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` ready for training: LoRA attached (or every weight trainable), patched with
    lmforge.cce unless ``config.cce`` is False. Weights load on the CPU; Trainer moves them to the device."""
    from lmforge.cce.patch import patch
    from lmforge.models.loading import load_model
    from lmforge.models.lora import LoraAdapterConfig

    bf16 = use_bf16(config.precision)
    # LoRA's base weights are frozen, so bf16 copies lose nothing to the optimizer; full fine-tuning keeps
    # float32 master weights and runs its matmuls in bf16 under autocast.
    dtype = torch.bfloat16 if bf16 and config.finetune == "lora" else torch.float32
    lora = None
    if config.finetune == "lora":
        lora = LoraAdapterConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                 target_modules=config.lora_target_modules)
    model, tokenizer = load_model(config.model, dtype=dtype, device="cpu", lora=lora,
                                  attn_implementation=config.attn_implementation)
    if config.finetune == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    if config.cce:
        patch(model, impl=config.cce_impl)
    return model, tokenizer


def _latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints_dir.is_dir():
        return None
    latest = get_last_checkpoint(str(checkpoints_dir))
    return Path(latest) if latest else None


def _check_resumable(config: SFTConfig, run_dir: Path, checkpoint: Path | None) -> None:
    check_resumable(run_dir, checkpoint, resume=config.resume, current=config.to_dict(),
                    identity_fields=_RUN_IDENTITY_FIELDS, config_file=CONFIG_FILENAME, what="data/model settings")


# --------------------------------------------------------------------------------------------------
# The run


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Fine-tune on chat data with the loss on assistant tokens only; return a summary of the run.

    The returned dict holds ``train_loss`` (the last logged training loss), ``eval_loss`` (the final
    evaluation loss, None without an eval split), ``global_step``, example counts, ``trainable_parameters``,
    and the paths ``run_dir``, ``final_dir``, ``config_path``, ``metrics_path``, ``report_path``,
    ``plot_path``. Works unchanged under ``accelerate launch`` (files are written by the main process).
    """
    from transformers import Trainer, set_seed

    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    started = time.perf_counter()
    run_dir = Path(config.output_dir).expanduser().resolve()
    checkpoint = _latest_checkpoint(run_dir / CHECKPOINTS_DIRNAME)
    _check_resumable(config, run_dir, checkpoint)
    if config.data is not None and not Path(config.data).expanduser().is_file():
        raise FileNotFoundError(f"data file {config.data} does not exist")

    # Seeds before the adapter is created, so its initial weights are a function of the config.
    set_seed(config.seed)
    model, tokenizer = load_model_for_sft(config)
    if config.data is not None:
        conversations = load_conversations(config.data)
        data_description = str(Path(config.data).expanduser())
    else:
        conversations = generated_conversations(config.n_examples, skills=config.skills, levels=config.levels,
                                                seed=config.seed)
        data_description = (f"{config.n_examples} generated tool-integrated solutions (skills "
                            f"{config.skills or 'all'}, levels {config.levels or 'all'}, seed {config.seed})")
    tool_role = resolve_tool_role(tokenizer, config.tool_role)
    train_conversations, eval_conversations = split_train_eval(conversations, config.eval_fraction, config.seed)

    args = training_arguments(config, run_dir, has_eval=bool(eval_conversations))
    is_main = args.should_save
    train_examples, train_stats = build_examples(tokenizer, train_conversations, max_length=config.max_length,
                                                 tool_role=tool_role, show_progress=is_main,
                                                 description="tokenizing train")
    eval_examples, eval_stats = build_examples(tokenizer, eval_conversations, max_length=config.max_length,
                                               tool_role=tool_role, show_progress=is_main,
                                               description="tokenizing eval")
    if not train_examples:
        raise ValueError(f"no training example keeps an assistant token within max_length={config.max_length} "
                         f"tokens; raise max_length")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG_FILENAME, yaml.safe_dump(config.to_dict(), sort_keys=False))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=functools.partial(collate_chat_batch, pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[_metrics_callback(run_dir / METRICS_FILENAME)],
    )
    final_dir = run_dir / FINAL_DIRNAME
    total_steps = planned_optimizer_steps(config, len(train_examples), world_size=args.world_size)
    checkpoint_state = _trainer_state(checkpoint)
    if checkpoint_state is not None and checkpoint_state["global_step"] >= total_steps:
        # The run already finished. Trainer would start one more step when resuming at the last step,
        # so it is not called; a crash between the last checkpoint and the final save is repaired here.
        logger.info("the run in %s already finished at step %d", run_dir, checkpoint_state["global_step"])
        history = checkpoint_state["log_history"]
        global_step = checkpoint_state["global_step"]
        if is_main:
            write_text_atomic(run_dir / METRICS_FILENAME, "".join(json.dumps(e) + "\n" for e in history))
            if not final_dir.is_dir():
                _copy_checkpoint_model(checkpoint, final_dir)
    else:
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        history = trainer.state.log_history
        if eval_examples and not any("eval_loss" in e and e["step"] == trainer.state.global_step for e in history):
            trainer.evaluate()  # the final eval loss, when the last step was not an evaluation step
        _save_final_model(trainer, final_dir)
        history = trainer.state.log_history
        global_step = trainer.state.global_step

    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    result = {
        "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "global_step": global_step,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "num_train_examples": len(train_examples),
        "num_eval_examples": len(eval_examples),
        "train_stats": train_stats,
        "eval_stats": eval_stats,
        "tool_role": tool_role,
        "bf16": args.bf16,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
        "final_dir": str(final_dir),
        "config_path": str(run_dir / CONFIG_FILENAME),
        "metrics_path": str(run_dir / METRICS_FILENAME),
        "report_path": str(run_dir / REPORT_FILENAME),
        "plot_path": str(run_dir / PLOT_FILENAME),
    }
    if is_main:
        plot_losses(history, run_dir / PLOT_FILENAME)
        write_text_atomic(run_dir / REPORT_FILENAME, _report(config, result, data_description))
    return result


def planned_optimizer_steps(config: SFTConfig, num_train_examples: int, *, world_size: int = 1) -> int:
    """Optimizer steps of the whole run, as Trainer counts them: ``max_steps`` if set, else
    ``ceil(epochs * ceil(batches per epoch / grad_accumulation))`` with ``ceil(examples / (batch x devices))``
    batches per epoch."""
    if config.max_steps is not None:
        return config.max_steps
    batches_per_epoch = math.ceil(num_train_examples / (config.batch_size * max(world_size, 1)))
    steps_per_epoch = max(math.ceil(batches_per_epoch / config.grad_accumulation), 1)
    return math.ceil(config.epochs * steps_per_epoch)


def _trainer_state(checkpoint: Path | None) -> dict[str, Any] | None:
    """The trainer_state.json of a checkpoint folder (None without a checkpoint)."""
    if checkpoint is None:
        return None
    path = checkpoint / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {checkpoint} has no readable trainer_state.json ({err}); delete that "
                         f"checkpoint folder to resume from the one before it") from err


# Files of a Trainer checkpoint that belong to the training state, not to the model.
_TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "scaler.pt")


def _copy_checkpoint_model(checkpoint: Path, final_dir: Path) -> None:
    """Make ``final_dir`` from the model files of a Trainer checkpoint (adapter or weights, tokenizer)."""
    import shutil

    from lmforge.models.loading import write_directory_atomically

    with write_directory_atomically(final_dir, overwrite=True) as staging:
        for path in checkpoint.iterdir():
            if path.name in _TRAINING_STATE_FILES or path.name.startswith("rng_state"):
                continue
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            else:
                shutil.copy2(path, staging / path.name)


def _save_final_model(trainer: Any, final_dir: Path) -> None:
    """trainer.save_model into a staging folder (every process takes part, as FSDP/DeepSpeed need), then the
    main process renames it to ``final_dir``: a PEFT adapter folder for LoRA, a full model folder otherwise,
    with the tokenizer."""
    staging = final_dir.parent / f".{final_dir.name}.partial"
    is_main = trainer.is_world_process_zero()
    if is_main and staging.exists():
        import shutil

        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if is_main:
        import shutil

        if final_dir.exists():
            retired = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(final_dir, retired)
            os.rename(staging, final_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final_dir)
    trainer.accelerator.wait_for_everyone()


def plot_losses(log_history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Train loss (line) and eval loss (markers) against the optimizer step, as a PNG (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per assistant token (nats)")
    axes.set_title("SFT loss (assistant tokens only)")
    axes.grid(alpha=0.3)
    if train or evaluation:
        axes.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)


def _report(config: SFTConfig, result: Mapping[str, Any], data_description: str) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    stats = result["train_stats"]
    lines = [
        "# SFT run",
        "",
        f"- model: {config.model or 'embedded SmolLM2-135M-Instruct'}",
        f"- data: {data_description}",
        f"- examples: {result['num_train_examples']} train, {result['num_eval_examples']} eval "
        f"({stats['truncated']} train conversations cut to max_length={config.max_length}, {stats['dropped']} "
        f"dropped with no assistant token left)",
        f"- train tokens: {stats['tokens']}, of which trained on (assistant): {stats['assistant_tokens']}",
        f"- tool turns rendered as: {result['tool_role']}",
        f"- fine-tuning: {config.finetune}"
        + (f" (rank {config.lora_rank}, alpha {config.lora_alpha}, dropout {config.lora_dropout})"
           if config.finetune == "lora" else ""),
        f"- trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,}",
        f"- precision: {'bf16 mixed' if result['bf16'] else 'float32'}; loss: "
        f"{'lmforge Cut Cross-Entropy (no logits)' if config.cce else 'stock transformers'}",
        f"- optimisation: AdamW, lr {config.resolved_learning_rate:g}, cosine schedule, warm-up {config.warmup:g}, "
        f"batch {config.batch_size} x {config.grad_accumulation} accumulation per device",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| optimizer steps | {result['global_step']} |",
        f"| last train loss | {fmt(result['train_loss'])} |",
        f"| final eval loss | {fmt(result['eval_loss'])} |",
        f"| resumed from | {result['resumed_from'] or '-'} |",
        f"| wall time (this call) | {result['wall_seconds']:.1f} s |",
        "",
        f"Losses are mean cross-entropy per assistant token (nats). Curves: {PLOT_FILENAME}; every log line: "
        f"{METRICS_FILENAME}; the trained {'adapter' if config.finetune == 'lora' else 'model'}: "
        f"{FINAL_DIRNAME}/.",
        "",
        "Masking: each assistant message's tokens (content and end-of-turn marker) are located by rendering the "
        "conversation up to that message with the chat template (with and without the generation prompt) and "
        "mapping the character span onto one tokenization of the whole conversation; all other tokens have "
        "label -100.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI


def add_sft_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sft`` subcommand (``lmforge sft --config FILE [--option value ...]``) to an argparse
    subparsers object; it runs :func:`run_sft` and prints where the results are."""
    parser = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)",
        description="Supervised fine-tuning on chat data (JSONL of {\"messages\": [...]}, or generated "
                    "tool-integrated solutions) with the loss on assistant tokens only. Options come from "
                    "--config FILE (YAML/JSON) and are overridden by flags.")
    add_config_arguments(parser, SFTConfig)
    parser.set_defaults(func=_run_sft_command)
    return parser


def _run_sft_command(args: argparse.Namespace) -> int:
    config = config_from_args(SFTConfig, args)
    result = run_sft(config)
    if result["eval_loss"] is not None:
        print(f"train loss {result['train_loss']:.4f}, eval loss {result['eval_loss']:.4f} after "
              f"{result['global_step']} steps")
    elif result["train_loss"] is not None:
        print(f"train loss {result['train_loss']:.4f} after {result['global_step']} steps")
    print(f"run folder: {result['run_dir']} (final model in {result['final_dir']}, report {result['report_path']})")
    return 0

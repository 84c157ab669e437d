"""Tests of lmforge.models.sft: assistant-only masks under several chat templates (checked by decoding the
trained tokens back to the messages' text), the batch collator, config validation, the patched loss against
the stock loss and a float64 reference, token-level loss normalisation across gradient accumulation against
a float64 reference, training of the embedded model, and resuming after a simulated crash.

Training runs are kept small for two busy CPU cores: the embedded model sees ~96-token conversations one at
a time; resume and accumulation tests use the tiny random models of tests/models/conftest.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
import yaml

from lmforge.cce.patch import patch, unpatch
from lmforge.config import config_from_args
from lmforge.models.loading import load_model
from lmforge.models.lora import check_lora_folder, load_lora
from lmforge.models.sft import (
    IGNORE_INDEX,
    SFTConfig,
    add_sft_cli,
    assistant_token_mask,
    build_examples,
    collate_chat_batch,
    generated_conversations,
    load_conversations,
    load_model_for_sft,
    map_tool_messages,
    resolve_tool_role,
    run_sft,
    split_train_eval,
    tokenize_conversation,
)
from tests.models.conftest import build_tiny_tokenizer

# A conversation with a system prompt, two tool calls and three assistant turns.
CONVERSATION = [
    {"role": "system", "content": "You solve math problems with Python."},
    {"role": "user", "content": "Mia has 3 boxes of 12 pens and gives away 7. How many are left?"},
    {"role": "assistant", "content": "First count the pens.\n\n```python\nprint(3 * 12)\n```"},
    {"role": "tool", "content": "```output\n36\n```"},
    {"role": "assistant", "content": "Now subtract the 7 pens.\n\n```python\nprint(36 - 7)\n```"},
    {"role": "tool", "content": "```output\n29\n```"},
    {"role": "assistant", "content": "The answer is \\boxed{29}."},
]
ASSISTANT_CONTENTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

# A Gemma-style template (written for this test): user/model turns only, alternation enforced, no system or
# tool role, so tool turns must be mapped to user turns.
GEMMA_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('only user and assistant roles') }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + message['content'] "
    "+ '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# A Llama-3-style template (written for this test): a bos marker, headers, tool turns as "ipython", no
# newline after the end-of-turn marker.
LLAMA3_STYLE_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Rewrites earlier assistant turns (drops reasoning before </think> unless the turn is the last): prefix
# rendering cannot locate assistant tokens in such templates, and they must be refused.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def masked_runs(tokenizer, input_ids, mask) -> list[str]:
    """The decoded text of each maximal run of mask-1 tokens."""
    runs = []
    for keep, positions in itertools.groupby(range(len(input_ids)), key=lambda i: mask[i]):
        if keep:
            runs.append(tokenizer.decode([input_ids[i] for i in positions]))
    return runs


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Run torch on one thread on the CPU. On shared cores, two-thread kernels stall at every barrier while
    another process holds a core: a training step of the embedded model took ~20 s with two threads and
    ~1.5 s with one on two busy cores."""
    if torch.cuda.is_available():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2_tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model.folder))


# --------------------------------------------------------------------------------------------------
# Masks


def test_mask_smollm2_template_covers_exactly_assistant_contents_and_end_of_turn(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert resolve_tool_role(tokenizer, "auto") == "tool"  # ChatML renders any role
    input_ids, mask = assistant_token_mask(tokenizer, CONVERSATION)
    # The token ids are exactly what apply_chat_template gives.
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert input_ids == list(reference)
    assert masked_runs(tokenizer, input_ids, mask) == [content + "<|im_end|>" for content in ASSISTANT_CONTENTS]
    unmasked = tokenizer.decode([t for t, m in zip(input_ids, mask) if not m])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in unmasked
    assert "<|im_start|>assistant\n" in unmasked  # headers are not trained on


def test_mask_gemma_style_template_maps_tool_turns_to_user(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    conversation = CONVERSATION[1:]  # the template has no system role
    assert resolve_tool_role(tokenizer, "auto") == "user"
    with pytest.raises(ValueError, match="cannot render a conversation with roles"):
        tokenize_conversation(tokenizer, conversation, max_length=4096, tool_role="tool")

    mapped = map_tool_messages(conversation, "user")
    assert [m["role"] for m in mapped] == ["user", "assistant"] * 3
    input_ids, mask = assistant_token_mask(tokenizer, mapped)
    expected = [content + "<end_of_turn>" for content in ASSISTANT_CONTENTS]
    assert masked_runs(tokenizer, input_ids, mask) == expected
    unmasked = tokenizer.decode([t for t, m in zip(input_ids, mask) if not m])
    assert "<start_of_turn>user\n```output\n36\n```<end_of_turn>" in unmasked


def test_mask_llama3_style_template_keeps_tool_role_and_has_no_trailing_newline():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE
    assert resolve_tool_role(tokenizer, "auto") == "tool"
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=4096, tool_role="tool")
    mask = [label != IGNORE_INDEX for label in example["labels"]]
    assert masked_runs(tokenizer, example["input_ids"], mask) == [c + "<|eot_id|>" for c in ASSISTANT_CONTENTS]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example["labels"], example["input_ids"]))
    assert "<|start_header_id|>ipython<|end_header_id|>" in tokenizer.decode(example["input_ids"])


def test_mask_refuses_templates_that_rewrite_earlier_turns():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = REWRITING_TEMPLATE
    conversation = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>two and two</think>It is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    with pytest.raises(ValueError, match="renders the conversation up to message 1 differently"):
        assistant_token_mask(tokenizer, conversation)


def test_truncation_and_dropping_examples_without_assistant_tokens():
    tokenizer = build_tiny_tokenizer()  # one token per byte, ChatML template
    input_ids, mask = assistant_token_mask(tokenizer, CONVERSATION)
    first_assistant = mask.index(1)
    keep = first_assistant + 5
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=keep, tool_role="tool")
    assert example["input_ids"] == input_ids[:keep]
    assert [label != IGNORE_INDEX for label in example["labels"]] == [bool(m) for m in mask[:keep]]

    too_short = first_assistant  # every assistant token falls beyond max_length
    examples, stats = build_examples(tokenizer, [CONVERSATION, CONVERSATION], max_length=too_short,
                                     tool_role="tool", show_progress=False)
    assert examples == [] and stats["dropped"] == 2 and stats["truncated"] == 2
    examples, stats = build_examples(tokenizer, [CONVERSATION], max_length=4096, tool_role="tool",
                                     show_progress=False)
    assert stats["assistant_tokens"] == sum(mask) and stats["tokens"] == len(input_ids) and stats["truncated"] == 0


def test_collate_pads_right_with_ignored_labels():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = collate_chat_batch(features, pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]


# --------------------------------------------------------------------------------------------------
# Data and config


def test_generated_conversations_and_split():
    conversations = generated_conversations(10, skills=["rate"], levels=[1, 2], seed=3)
    assert len(conversations) == 10
    assert all([m["role"] for m in c] == ["user", "assistant", "tool", "assistant"] for c in conversations)
    train, evaluation = split_train_eval(conversations, 0.2, seed=0)
    assert len(train) == 8 and len(evaluation) == 2
    assert sorted(map(json.dumps, train + evaluation)) == sorted(map(json.dumps, conversations))
    assert split_train_eval(conversations, 0.2, seed=0) == (train, evaluation)  # seeded
    assert split_train_eval(conversations, 0.0, seed=0) == (conversations, [])


def test_load_conversations_validates_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"messages": CONVERSATION[1:3]}))
    assert load_conversations(good) == [CONVERSATION, CONVERSATION[1:3]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                   + json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: message 0 has role 'robot'"):
        load_conversations(bad)
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text(json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        load_conversations(no_assistant)
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"finetune": "qlora"}, ValueError, "finetune must be one of"),
        ({"tool_role": "assistant"}, ValueError, "tool_role must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"max_steps": 2.5}, TypeError, "max_steps must be an int"),
        ({"eval_fraction": 1.0}, ValueError, "eval_fraction must be < 1"),
        ({"learning_rate": -1e-4}, ValueError, "learning_rate must be > 0"),
        ({"warmup": 2.5}, ValueError, "warmup must be a fraction"),
        ({"precision": "fp8"}, ValueError, "precision must be one of"),
        ({"resume": "yes"}, TypeError, "resume must be a bool"),
        ({"levels": ["one"]}, TypeError, "levels must be an int"),
        ({"attn_implementation": ""}, TypeError, "attn_implementation must be None or a non-empty string"),
    ],
)
def test_config_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        SFTConfig(**options)


def test_cli_builds_config_from_file_and_flags(tmp_path):
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(yaml.safe_dump({"max_steps": 50, "levels": [1, 2], "finetune": "full", "lora_rank": 4}))
    parser = argparse.ArgumentParser()
    add_sft_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sft", "--config", str(config_file), "--max-steps", "7", "--skills", "rate", "percent",
                              "--cce", "false"])
    config = config_from_args(SFTConfig, args)
    assert (config.max_steps, config.levels, config.finetune, config.lora_rank) == (7, [1, 2], "full", 4)
    assert config.skills == ["rate", "percent"] and config.cce is False
    assert args.func.__name__ == "_run_sft_command"
    assert config.resolved_learning_rate == 2e-5  # full fine-tuning default


# --------------------------------------------------------------------------------------------------
# The patched loss


def test_patched_loss_equals_stock_loss_on_an_sft_batch(embedded_model):
    model, tokenizer = load_model(embedded_model.folder)
    examples, _ = build_examples(tokenizer, generated_conversations(2, levels=[1], seed=5), max_length=96,
                                 tool_role="tool", show_progress=False)
    examples[1] = {key: value[:80] for key, value in examples[1].items()}  # rows of different lengths: padding
    batch = collate_chat_batch(examples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        stock = model(**batch)
        # float64 reference from the stock logits: mean over the assistant tokens that have a predecessor
        logprobs = torch.log_softmax(stock.logits.double(), dim=-1)[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        reference_sum = -picked[scored].sum()
        patch(model)
        patched = model(**batch)
        patched_sum = model(**batch, num_items_in_batch=torch.tensor(1000)).loss
        unpatch(model)
    assert patched.logits is None
    assert int(scored.sum()) > 40
    reference_mean = float(reference_sum / scored.sum())
    assert patched.loss.item() == pytest.approx(reference_mean, rel=2e-5)
    assert stock.loss.item() == pytest.approx(reference_mean, rel=2e-5)
    assert patched_sum.item() == pytest.approx(float(reference_sum) / 1000, rel=2e-5)


# --------------------------------------------------------------------------------------------------
# Training runs


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(metrics: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in metrics if "loss" in entry}


@pytest.mark.slow
def test_lora_sft_of_the_embedded_model_lowers_the_loss(embedded_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(embedded_model.home))
    run_dir = tmp_path / "run"
    config = SFTConfig(model=None, data=None, n_examples=7, skills=["add_sub", "mul_div", "rate"], levels=[1],
                       max_length=96, eval_fraction=0.15, output_dir=str(run_dir), lora_rank=8, lora_alpha=16,
                       learning_rate=1e-3, max_steps=24, batch_size=1, warmup=2, logging_steps=1, save_steps=24,
                       seed=0)
    result = run_sft(config)

    metrics = read_metrics(run_dir)
    losses = train_losses(metrics)
    assert sorted(losses) == list(range(1, 25))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(20, 25)]
    assert sum(last) / 5 < 0.6 * (sum(first) / 5), losses
    assert result["global_step"] == 24 and result["train_loss"] == losses[24]
    assert result["num_train_examples"] == 6 and result["num_eval_examples"] == 1
    assert result["eval_loss"] is not None and math.isfinite(result["eval_loss"])
    assert [e["eval_loss"] for e in metrics if "eval_loss" in e][-1] == result["eval_loss"]
    assert 0 < result["trainable_parameters"] < 0.05 * result["total_parameters"]

    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config.to_dict()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "last train loss" in (run_dir / "report.md").read_text()
    final = run_dir / "final"
    check_lora_folder(final)
    # The saved adapter reproduces the trained model's loss on a training example.
    base, tokenizer = load_model(embedded_model.folder)
    trained = load_lora(base, final)
    examples, _ = build_examples(tokenizer, generated_conversations(1, skills=["add_sub"], levels=[1]),
                                 max_length=96, tool_role="tool", show_progress=False)
    with torch.no_grad():
        loss_after = trained(**collate_chat_batch(examples, pad_token_id=tokenizer.pad_token_id)).loss.item()
        with trained.disable_adapter():
            loss_before = trained(**collate_chat_batch(examples, pad_token_id=tokenizer.pad_token_id)).loss.item()
    assert loss_after < 0.7 * loss_before


def tiny_config(folder, run_dir, **overrides) -> SFTConfig:
    options = dict(model=str(folder), n_examples=6, skills=["rate"], levels=[1], max_length=160, eval_fraction=0,
                   output_dir=str(run_dir), lora_rank=4, learning_rate=3e-3, max_steps=8, batch_size=2, warmup=0,
                   logging_steps=1, save_steps=4, save_total_limit=2, seed=1)
    options.update(overrides)
    return SFTConfig(**options)


def test_the_attention_implementation_reaches_the_trained_model(tiny_model_folder, tmp_path):
    folder, _ = tiny_model_folder("llama")
    for attn in ("sdpa", "eager"):
        model, _ = load_model_for_sft(tiny_config(folder, tmp_path / attn, attn_implementation=attn))
        assert model.get_base_model().config._attn_implementation == attn


def test_resume_after_a_crash_continues_the_run_exactly(tiny_model_folder, tmp_path, monkeypatch):
    from transformers import Trainer

    folder, _ = tiny_model_folder("llama", max_position_embeddings=256)
    uninterrupted = run_sft(tiny_config(folder, tmp_path / "straight"))
    reference_losses = train_losses(read_metrics(tmp_path / "straight"))

    run_dir = tmp_path / "crashed"
    stock_training_step = Trainer.training_step

    def crash_in_step_six(self, *args, **kwargs):
        if self.state.global_step == 5:
            raise RuntimeError("simulated crash")
        return stock_training_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash_in_step_six)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sft(tiny_config(folder, run_dir))
    monkeypatch.setattr(Trainer, "training_step", stock_training_step)
    assert not (run_dir / "final").exists()
    assert max(train_losses(read_metrics(run_dir))) == 5  # step 5 was logged after checkpoint-4

    with pytest.raises(ValueError, match="resume=False"):
        run_sft(tiny_config(folder, run_dir, resume=False))
    with pytest.raises(ValueError, match="max_length: 160 -> 32"):
        run_sft(tiny_config(folder, run_dir, max_length=32))

    resumed = run_sft(tiny_config(folder, run_dir))
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["global_step"] == 8 == uninterrupted["global_step"]
    steps = [entry["step"] for entry in read_metrics(run_dir) if "loss" in entry]
    assert steps == list(range(1, 9))  # step 5 is not duplicated
    losses = train_losses(read_metrics(run_dir))
    assert losses == pytest.approx(reference_losses, rel=1e-5)

    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    after_resume = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert straight.keys() == after_resume.keys()
    for name in straight:
        torch.testing.assert_close(after_resume[name], straight[name], rtol=1e-4, atol=1e-6)

    # Running a finished run again trains nothing more; a lost final folder is rebuilt from the last checkpoint.
    import shutil

    shutil.rmtree(run_dir / "final")
    again = run_sft(tiny_config(folder, run_dir))
    assert again["global_step"] == 8 and again["resumed_from"].endswith("checkpoint-8")
    assert again["train_loss"] == resumed["train_loss"]
    assert [entry["step"] for entry in read_metrics(run_dir) if "loss" in entry] == list(range(1, 9))
    rebuilt = load_file(run_dir / "final" / "adapter_model.safetensors")
    for name in straight:
        torch.testing.assert_close(rebuilt[name], after_resume[name], rtol=0, atol=0)


def test_gradient_accumulation_normalises_by_all_assistant_tokens(tiny_model_folder, tmp_path):
    """Full fine-tuning, one optimizer step over the same two conversations: batch 2 with the stock loss vs
    batch 1 x 2 accumulated micro-batches with the CCE loss and gradient checkpointing log the same loss and
    gradient norm, equal to the float64 token-mean over both conversations (a per-micro-batch mean would
    weight the two conversations equally instead)."""
    folder, _ = tiny_model_folder("llama", max_position_embeddings=512)
    common = dict(finetune="full", n_examples=2, skills=["add_sub", "multi_step"], levels=[1], max_length=512,
                  max_steps=1, max_grad_norm=1e9)
    together = run_sft(tiny_config(folder, tmp_path / "b2", batch_size=2, grad_accumulation=1, cce=False,
                                   **common))
    run_sft(tiny_config(folder, tmp_path / "b1x2", batch_size=1, grad_accumulation=2, gradient_checkpointing=True,
                        **common))
    first_together = read_metrics(tmp_path / "b2")[0]
    first_accumulated = read_metrics(tmp_path / "b1x2")[0]

    # float64 reference with the stock model (logits materialised), all parameters.
    model, tokenizer = load_model(folder, dtype=torch.float64)
    examples, stats = build_examples(tokenizer, generated_conversations(2, skills=["add_sub", "multi_step"],
                                                                        levels=[1], seed=1),
                                     max_length=512, tool_role="tool", show_progress=False)
    assert stats["truncated"] == 0
    per_example = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
    assert per_example[0] != per_example[1]  # otherwise both normalisations agree
    batch = collate_chat_batch(examples, pad_token_id=tokenizer.pad_token_id)
    loss = model(**batch).loss  # stock mean over every scored token of the batch
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))

    for logged in (first_together, first_accumulated):
        assert logged["step"] == 1
        assert logged["loss"] == pytest.approx(loss.item(), rel=1e-4)
        assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-3)
    assert together["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    # The final folder is a full model that loads and differs from the initial weights.
    trained, _ = load_model(together["final_dir"], dtype=torch.float64)
    with torch.no_grad():
        assert trained(**batch).loss.item() < loss.item()

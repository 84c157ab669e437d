"""Fitness of LoRA adapters: in-place swapping vs fresh PEFT loads, log-likelihood vs float64 logits, batching."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.agent.tasks import generate_problems
from lmforge.evolve.fitness import (
    AdapterEvaluator,
    answer_accuracy,
    canonical_answer,
    encode_answer_examples,
    generate_replies,
    load_adapter_weights,
    lora_parameters,
    read_adapter,
    save_adapter,
    spearman_correlation,
    write_adapter_,
)
from lmforge.models.lora import LoraAdapterConfig, attach_lora, load_lora
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SYSTEM = "Answer in \\boxed{}."


def tiny_base(family: str = "llama", dtype=torch.float32):
    return build_tiny_model(family, dtype, max_position_embeddings=1024)


def random_adapter(model, seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random non-zero lora_A and lora_B (a fresh PEFT adapter has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale).to(p.dtype)
            for key, p in lora_parameters(model).items()}


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_in_place_swap_gives_the_outputs_of_a_fresh_load(tmp_path, family):
    lora = LoraAdapterConfig(rank=4, alpha=8.0)
    model = attach_lora(tiny_base(family), lora)
    first, second = random_adapter(model, 1), random_adapter(model, 2)
    save_adapter(model, first, tmp_path / "first")
    save_adapter(model, second, tmp_path / "second")
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))

    # Our way: one model loaded with the first adapter, the second copied into it in place.
    swapped = load_lora(tiny_base(family), tmp_path / "first")
    before = logits_of(swapped, ids)
    write_adapter_(swapped, load_adapter_weights(tmp_path / "second"))
    after = logits_of(swapped, ids)
    # The reference: PEFT loads the second adapter from its folder onto a fresh base model.
    fresh = load_lora(tiny_base(family), tmp_path / "second")
    assert torch.equal(after, logits_of(fresh, ids))
    assert not torch.allclose(before, after)  # the swap really changed what the model computes
    # Swapping back restores the first adapter's outputs exactly.
    write_adapter_(swapped, first)
    assert torch.equal(logits_of(swapped, ids), before)
    # read_adapter returns what was written, keyed as PEFT saves it.
    assert read_adapter(fresh).keys() == second.keys()
    assert all(torch.equal(read_adapter(fresh)[k], second[k]) for k in second)


def test_swap_rejects_adapters_that_do_not_fit():
    model = attach_lora(tiny_base(), LoraAdapterConfig(rank=4))
    adapter = random_adapter(model, 0)
    key = next(iter(adapter))
    with pytest.raises(ValueError, match="shape"):
        write_adapter_(model, {**adapter, key: adapter[key][:1]})
    with pytest.raises(ValueError, match="missing"):
        write_adapter_(model, {k: v for k, v in adapter.items() if k != key})
    with pytest.raises(TypeError, match="PeftModel"):
        write_adapter_(tiny_base(), adapter)
    with pytest.raises(ValueError, match="batch_size"):
        AdapterEvaluator(model, build_tiny_tokenizer(), batch_size=0)


def test_answer_tokens_are_the_answer_and_its_closing_brace():
    tokenizer = build_tiny_tokenizer()
    problems = generate_problems(6, skills=["fraction", "add_sub"], levels=[1, 3], split="validation")
    examples = encode_answer_examples(problems, tokenizer, task="mix", system_prompt=SYSTEM)
    for problem, example in zip(problems, examples):
        answer_ids = [t for t, keep in zip(example.completion_ids, example.answer_mask) if keep]
        assert tokenizer.decode(answer_ids) == problem.answer + "}"
        assert tokenizer.decode(example.completion_ids).startswith("\\boxed{" + problem.answer + "}")
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": problem.question}],
                                               tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(example.prompt_ids) == prompt
        assert example.split == "validation" and example.gold == problem.answer


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loglik_fitness_equals_a_float64_computation_from_stock_logits(tmp_path, dtype, tolerance):
    tokenizer = build_tiny_tokenizer()
    model = attach_lora(tiny_base(dtype=dtype), LoraAdapterConfig(rank=4))
    adapter = random_adapter(model, 3)
    save_adapter(model, random_adapter(model, 4), tmp_path / "other")  # the model now holds another adapter
    problems = generate_problems(5, skills="rate", levels=[1, 2], split="validation")
    examples = encode_answer_examples(problems, tokenizer, task="rate", system_prompt=SYSTEM)
    evaluator = AdapterEvaluator(model, tokenizer, batch_size=2)
    fitness = evaluator.loglik_fitness(adapter, examples)

    # Reference: a fresh PEFT load in float64, one unpadded sequence per problem, log_softmax of the stock logits.
    save_adapter(model, adapter, tmp_path / "scored")
    # (The same base weights as the scored model, upcast: a float64 build would draw other random weights.)
    reference_model = load_lora(tiny_base(dtype=dtype).to(torch.float64), tmp_path / "scored")
    per_problem = []
    for problem in problems:
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": problem.question}],
                                               tokenize=False, add_generation_prompt=True)
        prefix = tokenizer(prompt + "\\boxed{", add_special_tokens=False).input_ids
        answer = tokenizer(problem.answer + "}", add_special_tokens=False).input_ids
        ids = torch.tensor([prefix + answer])
        logprobs = logits_of(reference_model, ids).double().log_softmax(-1)[0]
        token_logprobs = [logprobs[len(prefix) + j - 1, token] for j, token in enumerate(answer)]
        per_problem.append(float(sum(token_logprobs)) / len(answer))
    expected = math.exp(sum(per_problem) / len(per_problem))
    assert fitness == pytest.approx(expected, rel=tolerance, abs=0)
    # Batching and padding change nothing beyond rounding.
    single = AdapterEvaluator(model, tokenizer, batch_size=1).loglik_fitness(adapter, examples)
    assert single == pytest.approx(fitness, rel=tolerance, abs=0)


def test_batched_greedy_replies_equal_unbatched_generation():
    tokenizer = build_tiny_tokenizer()
    model = attach_lora(tiny_base(), LoraAdapterConfig(rank=4))
    write_adapter_(model, random_adapter(model, 5, scale=0.5))
    problems = generate_problems(4, skills=["percent", "mul_div"], levels=[1, 4], split="validation")
    examples = encode_answer_examples(problems, tokenizer, task="t", system_prompt=SYSTEM)
    assert len({len(e.prompt_ids) for e in examples}) > 1  # prompts of several lengths, so there is padding
    batched = generate_replies(model, tokenizer, examples, batch_size=4, max_new_tokens=6)
    for example, reply in zip(examples, batched):
        ids = torch.tensor([example.prompt_ids])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        assert reply == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_accuracy_and_votes_use_math_equivalence():
    tokenizer = build_tiny_tokenizer()
    problems = generate_problems(4, skills="fraction", levels=[3], split="validation")
    examples = encode_answer_examples(problems, tokenizer, task="f", system_prompt=SYSTEM)
    golds = [p.answer for p in problems]
    numerator, denominator = (golds[1].split("/") + ["1"])[:2]
    answers = [golds[0], f"\\frac{{{numerator}}}{{{denominator}}}", None, "123456789"]
    assert answer_accuracy(answers, examples) == pytest.approx(0.5)
    assert canonical_answer("2.50") == "5/2" and canonical_answer("1,000") == "1000"
    assert canonical_answer(" $12. ") == "12" and canonical_answer("x + 1") == "x + 1"
    assert canonical_answer(None) is None


def test_spearman_correlation_against_hand_computed_values():
    assert spearman_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share their mean rank: ranks (0, 1.5, 1.5, 3) and (0, 2, 1, 3) -> 4.5 / sqrt(4.5 * 5).
    assert spearman_correlation([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman_correlation([1, 1, 1], [1, 2, 3]))

"""Tests of lmforge.prefs.trainer on a tiny random-weight Llama and hand-built token-exact trajectories.

References are independent of the code under test: sequence log-probs from the float64 model's full
logits (log_softmax over the whole vocabulary, then masked sums), and the DPO / KTO formulas written
out by hand. Covered: one step's loss and gradients (M-DPO, single-turn DPO's mask, M-KTO with its KL
rows), the stored reference log-probs (policy, adapter-disabled base), learning on a fixed preference
set, gradient accumulation and a 2-process gloo DDP run against one process, resume after a crash,
and errors for bad options.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.agent.format import Trajectory
from lmforge.models.lora import LoraAdapterConfig, attach_lora
from lmforge.prefs.losses import single_turn_mask
from lmforge.prefs.pairs import KTOExample, PreferencePair
from lmforge.prefs.trainer import (
    REFERENCE_FILENAME,
    PrefTrainConfig,
    SequenceScorer,
    _lora_input_casts_off,
    batch_order,
    checkpoint_decoder_layers,
    compile_decoder_layers,
    learning_rate_factor,
    prepare_batches,
    preference_loss,
    step_batches,
    train_preferences,
    two_pass_backward,
)
from tests.conftest import free_loopback_port
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_cpu_thread")]

PAD = 0  # the tiny tokenizer's <|endoftext|>


# --------------------------------------------------------------------------------------------------
# Data and references


def trajectory(rng: random.Random, problem_id: str, sample_index: int, correct: bool, prompt: list[int]) -> Trajectory:
    """prompt (mask 0), a policy turn, a tool output (mask 0), a final policy turn, a closing token."""
    ids, mask = list(prompt), [0] * len(prompt)
    for sampled, length in ((1, rng.randint(2, 5)), (0, rng.randint(1, 3)), (1, rng.randint(2, 4)), (0, 1)):
        ids += [rng.randrange(3, 259) for _ in range(length)]
        mask += [sampled] * length
    return Trajectory(input_ids=ids, policy_mask=mask, problem_id=problem_id, sample_index=sample_index,
                      correct=correct)


def make_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for index in range(n):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(2, 4))]
        pairs.append(PreferencePair(chosen=trajectory(rng, f"p{index}", 0, True, prompt),
                                    rejected=trajectory(rng, f"p{index}", 1, False, prompt)))
    return pairs


def make_kto_examples(n_prompts: int, seed: int = 0) -> list[KTOExample]:
    rng = random.Random(seed)
    examples = []
    for index in range(n_prompts):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(2, 4))]
        for sample in range(2):
            examples.append(KTOExample(trajectory(rng, f"p{index}", sample, sample == 0, prompt),
                                       desirable=sample == 0))
    return examples


def lora_policy(seed: int = 0, perturb: bool = True):
    """The tiny Llama with a rank-4 LoRA adapter; ``perturb`` gives lora_B random values (policy != base)."""
    model = build_tiny_model("llama", seed=seed)
    torch.manual_seed(seed)
    policy = attach_lora(model, LoraAdapterConfig(rank=4, alpha=8.0))
    if perturb:
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.2)
    return policy


def float64_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Summed log-probs of the masked tokens from the float64 model's full logits (differentiable)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    log_probs = logits.double().log_softmax(-1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return (log_probs * loss_mask[:, 1:].double()).sum(-1)


def float64_pair_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return (float64_logps(model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]),
            float64_logps(model, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                          batch["rejected_loss_mask"]))


def as_float64(model):
    return copy.deepcopy(model).double()


def quiet_config(tmp_path, name: str = "run", **overrides) -> PrefTrainConfig:
    values = dict(output_dir=str(tmp_path / name), progress=False, warmup=0.0, seed=0, precision="fp32",
                  cce_impl="torch", learning_rate=1e-3, lora_rank=4, lora_alpha=8.0)
    values.update(overrides)
    return PrefTrainConfig(**values)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# (a) one step's loss and gradients against float64 from full logits


@pytest.mark.parametrize("loss", ["m_dpo", "dpo"])
def test_one_step_loss_and_gradients_match_float64_full_logits(tmp_path, loss):
    config = quiet_config(tmp_path, loss=loss, beta=0.3, batch_size=4, reference="base")
    policy = lora_policy()
    [batch] = prepare_batches(make_pairs(4), config, PAD)
    [multi_turn] = prepare_batches(make_pairs(4), quiet_config(tmp_path, batch_size=4), PAD)
    if loss == "dpo":  # the single-turn baseline also scores the tool tokens between the policy's turns
        assert torch.equal(batch["chosen_loss_mask"],
                           single_turn_mask(multi_turn["chosen_loss_mask"], multi_turn["chosen_attention_mask"]))
        assert batch["chosen_loss_mask"].sum() > multi_turn["chosen_loss_mask"].sum()
    else:
        assert torch.equal(batch["chosen_loss_mask"], multi_turn["chosen_loss_mask"])

    # Float64 reference: the adapter-disabled base for ref, the adapted model for the policy.
    policy64 = as_float64(policy)
    with torch.no_grad(), policy64.disable_adapter():
        ref_chosen, ref_rejected = float64_pair_logps(policy64, batch)
    chosen, rejected = float64_pair_logps(policy64, batch)
    expected = -F.logsigmoid(0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    expected.backward()
    expected_grads = {n: p.grad for n, p in policy64.named_parameters() if p.requires_grad}

    batch = {**batch, "ref_chosen_logps": ref_chosen.float(), "ref_rejected_logps": ref_rejected.float()}
    output = preference_loss(SequenceScorer(policy, "torch"), batch, config)
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.05 < expected.item() < 5 and expected.item() != pytest.approx(math.log(2), abs=1e-3)
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            expected_grad = expected_grads[name]  # float32 against float64: tolerance scaled to the gradient
            torch.testing.assert_close(parameter.grad.double(), expected_grad, rtol=1e-4,
                                       atol=1e-4 * float(expected_grad.abs().max()))

    # The same step through train_preferences: the logged loss, and AdamW's first update
    # -lr * g / (|g| + eps) from the float64 gradient.
    policy.zero_grad(set_to_none=True)
    before = trainable_state(policy)
    result = train_preferences(policy, build_tiny_tokenizer(), make_pairs(4), config.__class__(
        **{**config.to_dict(), "max_steps": 1, "max_grad_norm": 0.0}))
    [entry] = [e for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert entry["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert entry["rewards/margins"] == pytest.approx(
        (0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean().item(), rel=1e-4)
    after = trainable_state(result["model"])
    checked = 0
    for name, grad in expected_grads.items():
        big = grad.abs() > 1e-5
        step = (after[name] - before[name]).double()
        torch.testing.assert_close(step[big], -1e-3 * grad[big] / (grad[big].abs() + 1e-8), rtol=0, atol=2e-5)
        checked += int(big.sum())
    assert checked > 500


def test_m_kto_one_step_loss_matches_float64_with_kl_rows(tmp_path):
    config = quiet_config(tmp_path, loss="m_kto", beta=0.5, batch_size=6, reference="base",
                          desirable_weight=1.3, undesirable_weight=0.7)
    policy = lora_policy(seed=1)
    [batch] = prepare_batches(make_kto_examples(3, seed=4), config, PAD)
    policy64 = as_float64(policy)

    def logps(model, prefix):
        return float64_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                             batch[f"{prefix}loss_mask"])

    with torch.no_grad(), policy64.disable_adapter():
        ref, ref_kl = logps(policy64, ""), logps(policy64, "kl_")
    with torch.no_grad():
        z0 = max(0.0, (logps(policy64, "kl_") - ref_kl).mean().item())
    ratio = logps(policy64, "") - ref
    desirable = batch["is_desirable"]
    expected = torch.where(desirable, 1.3 * (1 - torch.sigmoid(0.5 * (ratio - z0))),
                           0.7 * (1 - torch.sigmoid(0.5 * (z0 - ratio)))).mean()
    expected.backward()

    batch = {**batch, "ref_logps": ref.float(), "ref_kl_logps": ref_kl.float()}
    output = preference_loss(SequenceScorer(policy, "torch"), batch, config)
    output.loss.backward()
    assert z0 > 0, "the test needs a positive KL estimate to check the reference point"
    assert output.kl.item() == pytest.approx(z0, rel=1e-4)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, parameter in policy.named_parameters():
        if parameter.requires_grad:
            expected_grad = dict(policy64.named_parameters())[name].grad
            torch.testing.assert_close(parameter.grad.double(), expected_grad, rtol=1e-4,
                                       atol=1e-4 * float(expected_grad.abs().max()))


# --------------------------------------------------------------------------------------------------
# (b) stored reference log-probs


@pytest.mark.parametrize(("loss", "reference"), [("m_dpo", "policy"), ("dpo", "base"), ("m_kto", "policy")])
def test_stored_reference_logps_are_the_reference_models(tmp_path, loss, reference):
    config = quiet_config(tmp_path, loss=loss, reference=reference, batch_size=3, max_steps=1)
    data = make_kto_examples(4, seed=2) if loss == "m_kto" else make_pairs(5, seed=2)
    policy = lora_policy(seed=2)
    reference_model = as_float64(policy)  # before training: the policy, or its base with the adapter off
    train_preferences(policy, build_tiny_tokenizer(), data, config)

    stored = torch.load(tmp_path / "run" / REFERENCE_FILENAME, weights_only=False)
    assert stored["source"] == reference
    batches = prepare_batches(data, config, PAD)
    assert len(stored["values"]) == len(batches) == math.ceil(len(data) / 3)
    context = reference_model.disable_adapter() if reference == "base" else torch.no_grad()
    with torch.no_grad(), context:
        for batch, values in zip(batches, stored["values"]):
            if loss == "m_kto":
                expected = {"ref_logps": float64_logps(reference_model, batch["input_ids"], batch["attention_mask"],
                                                       batch["loss_mask"]),
                            "ref_kl_logps": float64_logps(reference_model, batch["kl_input_ids"],
                                                          batch["kl_attention_mask"], batch["kl_loss_mask"])}
            else:
                chosen, rejected = float64_pair_logps(reference_model, batch)
                expected = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            assert set(values) == set(expected)
            for key in expected:
                torch.testing.assert_close(values[key].double(), expected[key], rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# (c) learning


def test_training_raises_reward_accuracy_and_margin(tmp_path):
    config = quiet_config(tmp_path, beta=0.5, batch_size=4, grad_accumulation=2, max_steps=12, learning_rate=5e-3,
                          lora_rank=8, lora_alpha=16.0)
    result = train_preferences(build_tiny_model("llama"), build_tiny_tokenizer(), make_pairs(8, seed=3), config)
    entries = [e for e in read_metrics(tmp_path / "run") if "loss" in e]
    assert [e["step"] for e in entries] == list(range(1, 13))
    # A fresh adapter is the reference: rewards start at exactly 0, the loss at log 2.
    assert entries[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert entries[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert entries[0]["rewards/accuracies"] == 0.0
    assert entries[-1]["rewards/accuracies"] == 1.0
    assert entries[-1]["rewards/margins"] > 1.0
    assert entries[-1]["loss"] < 0.5 * math.log(2)
    assert result["global_step"] == 12 and result["reward_accuracy"] == 1.0
    run_dir = tmp_path / "run"
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (run_dir / "curves.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "| optimizer steps | 12 |" in report and "8 pairs in 2 micro-batches" in report


def test_full_fine_tuning_trains_every_weight_and_saves_a_model_folder(tmp_path):
    from lmforge.models.loading import load_model

    model = build_tiny_model("llama", seed=10)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = quiet_config(tmp_path, finetune="full", batch_size=4, max_steps=2, learning_rate=1e-3)
    result = train_preferences(model, build_tiny_tokenizer(), make_pairs(4, seed=10), config)
    assert result["trainable_parameters"] == result["total_parameters"] == sum(p.numel() for p in before.values())
    changed = [name for name, p in result["model"].named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    saved, _ = load_model(str(tmp_path / "run" / "final"))
    for name, parameter in saved.named_parameters():
        assert torch.equal(parameter, dict(result["model"].named_parameters())[name]), name


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    pairs = make_pairs(4, seed=12)
    states = {}
    for checkpointing in (False, True):
        config = quiet_config(tmp_path, name=f"gc-{checkpointing}", batch_size=2, max_steps=2,
                              gradient_checkpointing=checkpointing)
        result = train_preferences(lora_policy(seed=12), build_tiny_tokenizer(), pairs, config)
        layers = [m for m in result["model"].modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(layers) == checkpointing
        states[checkpointing] = trainable_state(result["model"])
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("loss", "extra"), [("m_dpo", {"nll_coef": 0.5}), ("dpo", {"normalize": True}),
                                           ("m_dpo", {"dpo_variant": "ipo"}), ("m_kto", {})])
def test_chunked_and_two_pass_steps_train_the_one_pass_weights(tmp_path, loss, extra):
    # The losses depend on the policy through per-sequence sums only: scoring the rows in chunks, or
    # back-propagating dL/ds_i chunk by chunk after a no-grad pass, must give the one-pass gradients.
    data = make_kto_examples(3, seed=13) if loss == "m_kto" else make_pairs(5, seed=13)
    modes = {"one-pass": {}, "chunks-of-2": {"rows_per_forward": 2},
             "two-pass-1": {"rows_per_forward": 1, "two_pass": True, "gradient_checkpointing": True},
             "two-pass-3": {"rows_per_forward": 3, "two_pass": True}}
    states, logs = {}, {}
    for mode, options in modes.items():
        config = quiet_config(tmp_path, name=mode, loss=loss, batch_size=3, max_steps=2, max_grad_norm=0.0,
                              **extra, **options)
        result = train_preferences(lora_policy(seed=13), build_tiny_tokenizer(), data, config)
        states[mode] = trainable_state(result["model"])
        logs[mode] = [e for e in read_metrics(tmp_path / mode) if "loss" in e]
    initial = trainable_state(lora_policy(seed=13))
    assert max(float((states["one-pass"][n] - initial[n]).abs().max()) for n in initial) > 1e-4
    for mode in modes:
        for name, value in states["one-pass"].items():
            torch.testing.assert_close(states[mode][name], value, rtol=0, atol=2e-6, msg=f"{mode} {name}")
        for entry, expected in zip(logs[mode], logs["one-pass"], strict=True):
            assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7), mode


def test_compiled_layers_train_the_eager_weights(tmp_path):
    # torch.compile of the decoder layers (inductor on the CPU) under checkpointing and two_pass must
    # change the speed, not the numbers.
    data, states = make_pairs(4, seed=15), {}
    for name, options in {"eager": {}, "compiled": {"compile_layers": True, "rows_per_forward": 1, "two_pass": True,
                                                    "gradient_checkpointing": True}}.items():
        config = quiet_config(tmp_path, name=name, batch_size=2, max_steps=2, **options)
        result = train_preferences(lora_policy(seed=15), build_tiny_tokenizer(), data, config)
        compiled = [m for m in result["model"].modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) == (2 if name == "compiled" else 0)  # the tiny Llama's two decoder layers
        states[name] = trainable_state(result["model"])
    for key, value in states["eager"].items():
        torch.testing.assert_close(states["compiled"][key], value, rtol=0, atol=2e-6)


def _saved_bytes_and_grads(policy, ids, mask):
    """Bytes autograd keeps for the backward of one scoring pass, and the LoRA gradients it gives."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    policy.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        total = SequenceScorer(policy, "torch")(ids, torch.ones_like(ids), mask).sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return sum(saved), grads


@pytest.mark.parametrize("compiled", [False, True])
def test_checkpointed_layers_keep_less_and_give_the_same_gradients(compiled):
    # lmforge's own layer checkpoint (inside what torch.compile traces): the backward must see only the
    # layers' inputs, not their intermediates, and the gradients must not move.
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, :8] = 0
    plain_bytes, plain_grads = _saved_bytes_and_grads(lora_policy(seed=16), ids, mask)
    policy = lora_policy(seed=16)
    assert checkpoint_decoder_layers(policy) == 2
    assert checkpoint_decoder_layers(policy) == 2  # a second call wraps nothing twice
    if compiled:
        compile_decoder_layers(policy)
    bytes_, grads = _saved_bytes_and_grads(policy, ids, mask)
    assert bytes_ < 0.5 * plain_bytes
    for name, value in plain_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-6, msg=name)
    policy.eval()  # no checkpoint without training mode: the layers run as they are
    with torch.no_grad():
        plain = SequenceScorer(lora_policy(seed=16), "torch")(ids, torch.ones_like(ids), mask)
        torch.testing.assert_close(SequenceScorer(policy, "torch")(ids, torch.ones_like(ids), mask), plain,
                                   rtol=1e-5, atol=1e-5)


def test_lora_input_casts_off_under_autocast_changes_nothing_but_memory():
    # A bf16 base with float32 LoRA weights under bf16 autocast (the GPU set-up): without PEFT's cast of the
    # input to float32 the products are the same (autocast casts to bf16 either way), and the float32
    # copies of every LoRA layer's input are never made.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float32Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
                self.bytes += out.numel() * 4
            return out

    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    results = {}
    for casts_off in (False, True):
        policy = lora_policy(seed=17)
        for name, parameter in policy.named_parameters():
            if "lora_" not in name:
                parameter.data = parameter.data.to(torch.bfloat16)
        copies = Float32Copies()
        with torch.autocast("cpu", dtype=torch.bfloat16), _lora_input_casts_off(policy, casts_off), copies:
            total = SequenceScorer(policy, "torch")(ids, torch.ones_like(ids), mask).sum()
            total.backward()
        grads = {n: p.grad.float() for n, p in policy.named_parameters() if p.requires_grad}
        results[casts_off] = (float(total), grads, copies.bytes)
    assert results[True][0] == results[False][0]
    for name, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], value, rtol=0, atol=0, msg=name)
    # the tiny Llama: 2 layers x 7 LoRA inputs of 2 x 40 tokens (6 are 64 wide, down_proj's 128), 4 bytes each
    assert results[False][2] - results[True][2] >= 2 * 80 * (6 * 64 + 128) * 4


@pytest.mark.parametrize("loss", ["m_dpo", "m_kto"])
def test_two_pass_backward_gives_the_one_pass_gradients(loss):
    # Adam hides a uniformly scaled gradient, so the gradients themselves are compared here.
    config = PrefTrainConfig(loss=loss, precision="fp32", cce_impl="torch", batch_size=3, rows_per_forward=2,
                             two_pass=True, nll_coef=0.0 if loss == "m_kto" else 0.3)
    data = make_kto_examples(3, seed=14) if loss == "m_kto" else make_pairs(3, seed=14)
    [batch] = prepare_batches(data, config, pad_token_id=0)[:1]
    policy = lora_policy(seed=14)
    reference = {"ref_logps": torch.randn(batch["input_ids"].shape[0]) * 3,
                 "ref_kl_logps": torch.randn(batch["input_ids"].shape[0]) * 3} if loss == "m_kto" else \
        {"ref_chosen_logps": torch.randn(3) * 3 - 20, "ref_rejected_logps": torch.randn(3) * 3 - 20}
    batch = {**batch, **reference}
    scorer = SequenceScorer(policy, "torch")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    one_pass = preference_loss(scorer, batch, config)
    (0.7 * one_pass.loss).backward()
    expected = [p.grad.clone() for p in trainable]
    policy.zero_grad()
    output = two_pass_backward(scorer, batch, config, 0.7, torch.device("cpu"), False)
    assert float(output.loss) == pytest.approx(float(one_pass.loss), rel=1e-6)
    assert sum(float(g.abs().sum()) for g in expected) > 0
    for parameter, gradient in zip(trainable, expected, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_step_is_close_to_float32(tmp_path):
    # CPU autocast stands in for the GPU's bf16 path: same code, one rounding of every matmul input.
    pairs = make_pairs(4, seed=11)
    losses = {}
    for precision in ("fp32", "bf16"):
        config = quiet_config(tmp_path, name=precision, precision=precision, batch_size=4, max_steps=1,
                              reference="base")
        train_preferences(lora_policy(seed=11), build_tiny_tokenizer(), pairs, config)
        [entry] = [e for e in read_metrics(tmp_path / precision) if "loss" in e]
        losses[precision] = entry["loss"]
        assert "bf16 autocast" in (tmp_path / precision / "report.md").read_text() or precision == "fp32"
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert losses["bf16"] != losses["fp32"]


# --------------------------------------------------------------------------------------------------
# Schedule, accumulation and DDP


def test_schedule_and_step_batches():
    assert learning_rate_factor(0, 10, 0) == 1.0
    assert learning_rate_factor(5, 10, 0) == pytest.approx(0.5)
    assert [learning_rate_factor(s, 10, 3) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    config = PrefTrainConfig(grad_accumulation=2, seed=7)
    # 5 micro-batches, 2 processes x 2 accumulation: every epoch's permutation is visited in order.
    stream = batch_order(5, 7, 0) + batch_order(5, 7, 1)
    assert sorted(batch_order(5, 7, 0)) == list(range(5))
    assert step_batches(0, 5, config, world_size=2) == [[stream[0], stream[2]], [stream[1], stream[3]]]
    assert step_batches(1, 5, config, world_size=2) == [[stream[4], stream[6]], [stream[5], stream[7]]]


@pytest.mark.parametrize(("batch_size", "accumulation"), [(2, 3), (5, 1)])
def test_gradient_accumulation_weights_micro_batches_by_their_pairs(tmp_path, batch_size, accumulation):
    # 5 pairs: micro-batches of 2 + 2 + 1 accumulated must train exactly like one batch of 5.
    config = quiet_config(tmp_path, name=f"acc-{batch_size}", batch_size=batch_size, grad_accumulation=accumulation,
                          max_steps=2, max_grad_norm=0.0)
    result = train_preferences(lora_policy(seed=5), build_tiny_tokenizer(), make_pairs(5, seed=5), config)
    state = trainable_state(result["model"])
    reference_config = quiet_config(tmp_path, name="one-batch", batch_size=5, max_steps=2, max_grad_norm=0.0)
    if not (tmp_path / "one-batch" / "final").exists():
        train_preferences(lora_policy(seed=5), build_tiny_tokenizer(), make_pairs(5, seed=5), reference_config)
    from safetensors.torch import load_file

    one_batch = load_file(str(tmp_path / "one-batch" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    for name, value in state.items():  # two Adam steps of lr 1e-3: float32 summation order differs
        torch.testing.assert_close(value, one_batch[name], rtol=0, atol=2e-5)
    losses = [e["loss"] for e in read_metrics(tmp_path / f"acc-{batch_size}") if "loss" in e]
    one_batch_losses = [e["loss"] for e in read_metrics(tmp_path / "one-batch") if "loss" in e]
    assert losses == pytest.approx(one_batch_losses, rel=1e-6)


def _ddp_worker(rank: int, world_size: int, port: int, output_dir: str, options: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    config = PrefTrainConfig(output_dir=output_dir, progress=False, warmup=0.0, precision="fp32", cce_impl="torch",
                             learning_rate=1e-3, lora_rank=4, lora_alpha=8.0, batch_size=2, max_steps=2,
                             **(options or {}))
    result = train_preferences(lora_policy(seed=6), build_tiny_tokenizer(), _ddp_data(config.loss), config)
    assert result["world_size"] == world_size
    # As a launched script must: a Gloo group left alive can abort the process at exit (SIGABRT seen in CI).
    torch.distributed.destroy_process_group()


def _ddp_data(loss: str) -> list:
    return make_kto_examples(4, seed=6) if loss == "m_kto" else make_pairs(8, seed=6)


@pytest.mark.parametrize("options", [None, {"rows_per_forward": 1, "two_pass": True}, {"loss": "m_kto"}],
                         ids=["one-pass", "two-pass", "m-kto"])
def test_two_process_gloo_ddp_matches_one_process_with_the_same_micro_batches(tmp_path, options):
    # KTO's reference point z0 is estimated per micro-batch, so 2 processes x 1 micro-batch equal one
    # process accumulating the same 2 micro-batches.
    import torch.multiprocessing as mp

    ddp_dir = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, free_loopback_port(), str(ddp_dir), options), nprocs=2, join=True)
    single = quiet_config(tmp_path, name="single", batch_size=2, grad_accumulation=2, max_steps=2, **(options or {}))
    result = train_preferences(lora_policy(seed=6), build_tiny_tokenizer(), _ddp_data(single.loss), single)
    from safetensors.torch import load_file

    ddp_weights = load_file(str(ddp_dir / "checkpoints" / "step-000002" / "trainable.safetensors"))
    single_weights = trainable_state(result["model"])
    initial = trainable_state(lora_policy(seed=6))
    assert set(ddp_weights) == set(single_weights)
    moved = 0.0
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((value - initial[name]).abs().max()))
    assert moved > 1e-4  # the runs did train
    ddp_log = [e for e in read_metrics(ddp_dir) if "loss" in e]
    single_log = [e for e in read_metrics(tmp_path / "single") if "loss" in e]
    for ddp_entry, single_entry in zip(ddp_log, single_log, strict=True):
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen") if k in single_entry]
        assert "loss" in keys and "logps/chosen" in keys
        for key in keys:
            assert ddp_entry[key] == pytest.approx(single_entry[key], rel=1e-5, abs=1e-6), key


# --------------------------------------------------------------------------------------------------
# (d) resume


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    import lmforge.prefs.trainer as trainer

    data = make_pairs(6, seed=8)
    settings = dict(batch_size=2, max_steps=4, save_steps=2, learning_rate=3e-3, warmup=1)
    whole = train_preferences(lora_policy(seed=8, perturb=False), build_tiny_tokenizer(), data,
                              quiet_config(tmp_path, name="whole", **settings))

    calls = {"n": 0}
    step_metrics = trainer._step_metrics

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return step_metrics(*args, **kwargs)

    monkeypatch.setattr(trainer, "_step_metrics", crash_at_step_3)
    config = quiet_config(tmp_path, name="crashed", **settings)
    with pytest.raises(KeyboardInterrupt):
        train_preferences(lora_policy(seed=8, perturb=False), build_tiny_tokenizer(), data, config)
    monkeypatch.setattr(trainer, "_step_metrics", step_metrics)
    run_dir = tmp_path / "crashed"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    reference_mtime = (run_dir / REFERENCE_FILENAME).stat().st_mtime_ns

    resumed = train_preferences(lora_policy(seed=8, perturb=False), build_tiny_tokenizer(), data, config)
    assert resumed["resumed_from"].endswith("step-000002")
    assert (run_dir / REFERENCE_FILENAME).stat().st_mtime_ns == reference_mtime  # not recomputed
    for name, value in trainable_state(whole["model"]).items():
        assert torch.equal(trainable_state(resumed["model"])[name], value), name
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == [1, 2, 3, 4]
    assert [e["loss"] for e in read_metrics(run_dir)] == [e["loss"] for e in read_metrics(tmp_path / "whole")]

    # A finished run trains nothing more.
    again = train_preferences(lora_policy(seed=8, perturb=False), build_tiny_tokenizer(), data, config)
    assert again["global_step"] == 4 and again["resumed_from"].endswith("step-000004")
    for name, value in trainable_state(whole["model"]).items():
        assert torch.equal(trainable_state(again["model"])[name], value), name


def test_eval_callback_runs_every_k_steps_and_keeps_the_best(tmp_path):
    scores = iter([0.2, 0.6, 0.4])
    seen_steps = []

    def eval_fn(model):
        assert not model.training
        seen_steps.append(None)
        return {"accuracy": next(scores), "n": 3}

    config = quiet_config(tmp_path, batch_size=2, max_steps=6, eval_steps=2)
    result = train_preferences(lora_policy(seed=9), build_tiny_tokenizer(), make_pairs(4, seed=9), config,
                               eval_fn=eval_fn)
    evals = [e for e in read_metrics(tmp_path / "run") if "eval/accuracy" in e]
    assert [(e["step"], e["eval/accuracy"]) for e in evals] == [(2, 0.2), (4, 0.6), (6, 0.4)]
    assert result["best_step"] == 4 and result["best_eval"]["accuracy"] == 0.6
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    assert "best eval accuracy (step 4) | 0.6000" in (tmp_path / "run" / "report.md").read_text()


def test_make_agent_eval_runs_greedy_rollouts_of_the_model(tmp_path):
    from lmforge.agent.format import read_trajectories
    from lmforge.agent.rollout import RolloutConfig
    from lmforge.agent.tasks import generate_problems
    from lmforge.prefs.trainer import make_agent_eval

    problems = generate_problems(2, levels=[1], split="validation")
    evaluate = make_agent_eval(problems, build_tiny_tokenizer(), RolloutConfig(
        max_new_tokens_per_turn=6, max_total_tokens=400, temperature=1.0, samples_per_problem=3),
        output_path=tmp_path / "eval.jsonl")
    model = build_tiny_model("llama", max_position_embeddings=512)
    metrics = evaluate(model)
    assert metrics["n"] == 2 and metrics["accuracy"] == 0.0  # a random model answers nothing
    trajectories = read_trajectories(tmp_path / "eval.jsonl")
    assert [t.problem_id for t in trajectories] == [p.id for p in problems]  # one sample per problem
    assert all(t.num_policy_tokens == 6 for t in trajectories)
    evaluate(model)  # temperature 0 whatever the config said: the same tokens again
    assert [t.input_ids for t in read_trajectories(tmp_path / "eval.jsonl")] == [t.input_ids for t in trajectories]
    with pytest.raises(ValueError, match="at least one problem"):
        make_agent_eval([], build_tiny_tokenizer())


# --------------------------------------------------------------------------------------------------
# (e) errors


@pytest.mark.parametrize(("options", "error", "match"), [
    (dict(loss="orpo"), ValueError, "loss must be one of"),
    (dict(dpo_variant="robust"), ValueError, "dpo_variant"),
    (dict(beta=0), ValueError, "beta must be > 0"),
    (dict(beta=float("nan")), TypeError, "beta must be a finite number"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing must be < 0.5"),
    (dict(label_smoothing=0.1, dpo_variant="ipo"), ValueError, "sigmoid' only"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(grad_accumulation=1.5), TypeError, "grad_accumulation must be an int"),
    (dict(reference="initial"), ValueError, "reference must be one of"),
    (dict(reference="base", finetune="full"), ValueError, "needs finetune='lora'"),
    (dict(warmup=2.5), ValueError, "whole number of steps"),
    (dict(precision="fp16"), ValueError, "precision must be one of"),
    (dict(kl_max_length=1), ValueError, "kl_max_length must be >= 2"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool"),
])
def test_config_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        PrefTrainConfig(**options)


def test_train_preferences_rejects_bad_inputs(tmp_path):
    tokenizer = build_tiny_tokenizer()
    pairs = make_pairs(2)
    with pytest.raises(TypeError, match="config must be a PrefTrainConfig"):
        train_preferences(lora_policy(), tokenizer, pairs, {"loss": "m_dpo"})
    with pytest.raises(ValueError, match="no preference pairs"):
        train_preferences(lora_policy(), tokenizer, [], quiet_config(tmp_path))
    with pytest.raises(TypeError, match=r"data\[0\] must be a KTOExample"):
        train_preferences(lora_policy(), tokenizer, pairs, quiet_config(tmp_path, loss="kto"))
    with pytest.raises(ValueError, match="at least two prompts"):
        train_preferences(lora_policy(), tokenizer, make_kto_examples(1), quiet_config(tmp_path, loss="kto"))
    with pytest.raises(TypeError, match="finetune='full' needs a plain"):
        train_preferences(lora_policy(), tokenizer, pairs, quiet_config(tmp_path, finetune="full"))
    frozen = lora_policy()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train_preferences(frozen, tokenizer, pairs, quiet_config(tmp_path))
    with pytest.raises(ValueError, match="reference_logps has 1 entries but the data make 2"):
        train_preferences(lora_policy(), tokenizer, pairs, quiet_config(tmp_path, batch_size=1),
                          reference_logps=[{"ref_chosen_logps": torch.zeros(1), "ref_rejected_logps": torch.zeros(1)}])

    config = quiet_config(tmp_path, name="done", max_steps=1)
    train_preferences(lora_policy(), tokenizer, pairs, config)
    with pytest.raises(ValueError, match=r"different training settings \(beta: 0.1 -> 0.2\)"):
        train_preferences(lora_policy(), tokenizer, pairs, PrefTrainConfig(**{**config.to_dict(), "beta": 0.2}))
    with pytest.raises(ValueError, match="resume=False"):
        train_preferences(lora_policy(), tokenizer, pairs, PrefTrainConfig(**{**config.to_dict(), "resume": False}))
    with pytest.raises(ValueError, match="fingerprint differs"):
        train_preferences(lora_policy(), tokenizer, make_pairs(2, seed=1), config)

"""Tests of lmforge.prefs.loop: a tiny end-to-end online loop on the CPU, its state files and reports,
resuming after a crash right after the 'pairs' stage, the reference policy of the second iteration, and
the config / CLI.

The policy is a tiny random-weight Llama (byte-level tokenizer, ChatML template). A random model never
answers correctly, so the sampling stage gets a scripted backend (``backend_factory``): every
trajectory calls the tool (the code runs in the real sandbox), then boxes the
gold answer on every other attempt of a prompt and a wrong number otherwise, so each prompt yields a
pair. Training, reference log-probs and the held-out evaluation run on the tiny model itself.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmforge.agent.tasks import code_block
from lmforge.cli import build_parser
from lmforge.config import config_from_args
from lmforge.prefs.loop import MDPOLoopConfig, _load_policy, run_mdpo_loop, training_prompts
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_cpu_thread")]

END = "<|im_end|>"


class ScriptedBackend:
    """Answers like a policy that calls the tool once, then is right on every other attempt per prompt."""

    def __init__(self, tokenizer, problems):
        self.tokenizer, self.problems = tokenizer, problems
        self.final_turns: dict[str, int] = {}
        self.questions_seen: set[str] = set()
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        replies = []
        for prompt, p in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            problem = next(q for q in self.problems if q.question in text)
            self.questions_seen.add(problem.question)
            if "```output" not in text:
                reply = code_block(f"print({problem.answer})")
            else:
                attempt = self.final_turns.get(problem.id, 0)
                self.final_turns[problem.id] = attempt + 1
                answer = problem.answer if attempt % 2 == 0 else "123456789"
                reply = f"\\boxed{{{answer}}}{END}"
            replies.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"][: p.max_new_tokens])
        return replies


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", max_position_embeddings=4096).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def loop_config(tmp_path, tiny_folder, **overrides) -> MDPOLoopConfig:
    values = dict(model=str(tiny_folder), output_dir=str(tmp_path / "loop"), iterations=2, n_prompts=6,
                  levels=[1], skills=["add_sub", "mul_div"], samples_per_prompt=4, max_tool_calls=2,
                  max_new_tokens_per_turn=32, max_total_tokens=400, rollout_batch_size=4, batch_size=2,
                  max_steps=3, learning_rate=1e-3, lora_rank=4, lora_alpha=8.0, beta=0.5, warmup=0.0,
                  precision="fp32", cce_impl="torch", eval_problems=2, eval_samples=2, pass_k=[1, 2],
                  device="cpu", dtype="float32", progress=False)
    values.update(overrides)
    return MDPOLoopConfig(**values)


def float64_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    log_probs = logits.log_softmax(-1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return (log_probs * loss_mask[:, 1:].double()).sum(-1)


def test_loop_end_to_end_with_a_crash_after_pairs_and_resume(tmp_path, tiny_folder, monkeypatch):
    import lmforge.prefs.loop as loop

    config = loop_config(tmp_path, tiny_folder)
    tokenizer = build_tiny_tokenizer()
    parts = training_prompts(config)
    assert [len(p) for p in parts] == [3, 3]
    assert not {p.id for p in parts[0]} & {p.id for p in parts[1]}  # disjoint per-iteration prompts
    all_problems = parts[0] + parts[1]
    backends = []

    def factory(model, tokenizer_):
        backends.append(ScriptedBackend(tokenizer_, all_problems))
        return backends[-1]

    # Crash at the start of iteration 1's training: sampling and pairs are done.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    training_stage = loop._training_stage
    monkeypatch.setattr(loop, "_training_stage", crash)
    with pytest.raises(KeyboardInterrupt):
        run_mdpo_loop(config, backend_factory=factory)
    monkeypatch.setattr(loop, "_training_stage", training_stage)
    run_dir = tmp_path / "loop"
    state = json.loads((run_dir / "state.json").read_text())
    assert set(state["iterations"]["0"]) == {"eval"}
    assert set(state["iterations"]["1"]) == {"sampling", "pairs"}
    first = state["iterations"]["1"]
    assert first["sampling"]["trajectories"] == 12 and first["sampling"]["correct_rate"] == 0.5
    assert first["pairs"]["pairs"] == 3 and first["pairs"]["prompts_with_pair"] == 3
    rollouts, pairs = run_dir / "iter-01" / "rollouts.jsonl", run_dir / "iter-01" / "pairs.json"
    stamps = (rollouts.stat().st_mtime_ns, pairs.stat().st_mtime_ns)
    sampled_questions = set(backends[0].questions_seen)
    assert sampled_questions == {p.question for p in parts[0]}

    with pytest.raises(FileExistsError, match="resume=True"):
        run_mdpo_loop(config, backend_factory=factory)
    result = run_mdpo_loop(config, resume=True, backend_factory=factory)

    # Nothing of iteration 1 was sampled again: the resumed run's backend only saw iteration 2's prompts.
    assert (rollouts.stat().st_mtime_ns, pairs.stat().st_mtime_ns) == stamps
    assert len(backends) == 2 and backends[1].questions_seen == {p.question for p in parts[1]}
    state = json.loads((run_dir / "state.json").read_text())
    for t in ("1", "2"):
        assert set(state["iterations"][t]) == {"sampling", "pairs", "training", "eval"}
        training = state["iterations"][t]["training"]
        assert training["global_step"] == 3 and training["policy"].endswith(f"iter-0{t}/train/final")
        assert (run_dir / f"iter-0{t}" / "train" / "final" / "adapter_model.safetensors").is_file()
        assert (run_dir / f"iter-0{t}" / "eval" / "greedy.jsonl").is_file()
        evaluation = state["iterations"][t]["eval"]
        assert evaluation["n"] == 2 and {"accuracy", "pass@1", "pass@2"} <= set(evaluation)
    assert state["iterations"]["2"]["sampling"]["policy"] == state["iterations"]["1"]["training"]["policy"]
    assert result["policy"] == state["iterations"]["2"]["training"]["policy"]
    assert set(result["accuracy"]) == {0, 1, 2}

    # Iteration 2's reference log-probs are those of iteration 1's policy (float64 full logits).
    from lmforge.models.loading import load_model
    from lmforge.prefs.trainer import prepare_batches

    policy_1, _ = load_model(str(tiny_folder), dtype="float64", lora=state["iterations"]["1"]["training"]["policy"])
    stored = torch.load(run_dir / "iter-02" / "train" / "reference_logps.pt", weights_only=False)
    data = loop._read_preference_data(config, run_dir / "iter-02")
    batches = prepare_batches(data, config.train_config(run_dir / "iter-02" / "train"), tokenizer.pad_token_id)
    with torch.no_grad():
        for batch, values in zip(batches, stored["values"], strict=True):
            for side in ("chosen", "rejected"):
                expected = float64_logps(policy_1, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                         batch[f"{side}_loss_mask"])
                torch.testing.assert_close(values[f"ref_{side}_logps"].double(), expected, rtol=1e-5, atol=1e-3)

    # Reports and plots.
    report = (run_dir / "report.md").read_text()
    assert "| iteration | prompts | correct rate | coverage | pairs |" in report
    assert re.search(r"\| 1 \| 3 \| 50\.0% \| 100\.0% \| 3 \| 0 / 0 \|", report), report
    assert "pass@2" in report and "![progress](progress.png)" in report
    assert (run_dir / "progress.png").stat().st_size > 10_000
    iteration_report = (run_dir / "iter-02" / "report.md").read_text()
    for needle in ("| correct rate | 50.0% |", "| prompt coverage (at least one correct) | 3 (100.0%) |",
                   "| pairs | 3 |", "| optimizer steps | 3 |", "![training curves](train/curves.png)",
                   "| pass@2 |", "| accuracy |"):
        assert needle in iteration_report, needle
    assert (run_dir / "iter-02" / "train" / "curves.png").is_file()

    # A finished loop resumed again does nothing new.
    again = run_mdpo_loop(config, resume=True, backend_factory=factory)
    assert len(backends) == 2 and again["accuracy"] == result["accuracy"]


def test_fixed_initial_reference_scores_with_the_starting_adapter(tmp_path, tiny_folder):
    from lmforge.models.loading import load_model
    from lmforge.models.lora import LoraAdapterConfig, attach_lora, save_lora
    from lmforge.prefs.trainer import prepare_batches

    # A starting policy that differs from the base model: a LoRA adapter with random B matrices.
    base, tokenizer = load_model(str(tiny_folder))
    torch.manual_seed(0)
    start = attach_lora(base, LoraAdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, parameter in start.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    save_lora(start, tmp_path / "start")

    config = loop_config(tmp_path, tiny_folder, reference="initial", init_adapter=str(tmp_path / "start"),
                         n_prompts=4, eval_problems=1, eval_samples=0, max_steps=2)
    problems = sum(training_prompts(config), [])
    result = run_mdpo_loop(config, backend_factory=lambda model, tok: ScriptedBackend(tok, problems))
    run_dir = tmp_path / "loop"
    assert result["iterations"][1]["sampling"]["policy"] == str(tmp_path / "start")
    assert result["iterations"][2]["training"]["reference"] == "initial"
    assert result["iterations"][2]["sampling"]["policy"] == result["iterations"][1]["training"]["policy"]

    initial, _ = load_model(str(tiny_folder), dtype="float64", lora=str(tmp_path / "start"))
    stored = torch.load(run_dir / "iter-02" / "train" / "reference_logps.pt", weights_only=False)
    assert stored["source"] == "given"
    data = __import__("lmforge.prefs.loop", fromlist=["_read_preference_data"])._read_preference_data(
        config, run_dir / "iter-02")
    batches = prepare_batches(data, config.train_config(run_dir / "iter-02" / "train"), tokenizer.pad_token_id)
    with torch.no_grad():
        for batch, values in zip(batches, stored["values"], strict=True):
            expected = float64_logps(initial, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                     batch["chosen_loss_mask"])
            torch.testing.assert_close(values["ref_chosen_logps"].double(), expected, rtol=1e-5, atol=1e-3)


def test_previous_policy_supplies_some_samples_from_iteration_two(tmp_path, tiny_folder):
    from lmforge.prefs.loop import _read_rollouts

    config = loop_config(tmp_path, tiny_folder, n_prompts=4, samples_per_prompt=3, previous_policy_samples=1,
                         eval_problems=1, eval_samples=0, max_steps=2)
    problems = sum(training_prompts(config), [])
    sampled_with_adapter = []

    def factory(model, tokenizer_):
        sampled_with_adapter.append(any("lora_" in name for name, _ in model.named_parameters()))
        return ScriptedBackend(tokenizer_, problems)

    result = run_mdpo_loop(config, backend_factory=factory)
    # Iteration 1 samples the starting policy (the base model) only; iteration 2 the adapter trained in
    # iteration 1, then the policy it was trained from (the base) for one sample per prompt.
    assert sampled_with_adapter == [False, True, False]
    first, second = result["iterations"][1]["sampling"], result["iterations"][2]["sampling"]
    assert first["trajectories"] == 6 and first["previous_policy_trajectories"] == 0
    assert second["trajectories"] == 6 and second["previous_policy_trajectories"] == 2
    assert second["policy"] == result["iterations"][1]["training"]["policy"] and second["previous_policy"] is None
    rollouts = _read_rollouts(tmp_path / "loop" / "iter-02", config)
    for problem in {t.problem_id for t in rollouts}:
        mine = sorted((t.sample_index, t.metadata.get("policy")) for t in rollouts if t.problem_id == problem)
        assert mine == [(0, None), (1, None), (2, "previous")]
    assert "from the previous policy" in (tmp_path / "loop" / "iter-02" / "report.md").read_text()
    with pytest.raises(ValueError, match="previous_policy_samples must be < samples_per_prompt"):
        loop_config(tmp_path, tiny_folder, samples_per_prompt=2, previous_policy_samples=2)


def test_iteration_without_pairs_keeps_the_policy(tmp_path, tiny_folder):
    # The tiny model samples itself: it never answers correctly, so no prompt has a pair.
    config = loop_config(tmp_path, tiny_folder, iterations=1, n_prompts=2, samples_per_prompt=2,
                         max_new_tokens_per_turn=8, eval_problems=1, eval_samples=0)
    result = run_mdpo_loop(config)
    record = result["iterations"][1]
    assert record["sampling"]["correct_rate"] == 0.0 and record["pairs"]["pairs"] == 0
    assert record["pairs"]["all_incorrect"] == 2
    assert record["training"] == {"skipped": "no prompt has both a correct and an incorrect trajectory",
                                  "policy": None}
    assert result["policy"] is None and record["eval"]["policy"] is None
    assert "Skipped: no prompt has both" in (tmp_path / "loop" / "iter-01" / "report.md").read_text()


def test_the_attention_implementation_reaches_every_policy_the_loop_loads(tmp_path, tiny_folder):
    for attn in ("sdpa", "eager"):
        model, _ = _load_policy(loop_config(tmp_path, tiny_folder, attn_implementation=attn), None, trainable=False,
                                device="cpu")
        assert model.config._attn_implementation == attn


def test_config_and_cli(tmp_path, tiny_folder):
    config_file = tmp_path / "mdpo.yaml"
    config_file.write_text(f"model: {tiny_folder}\niterations: 3\nloss: m_kto\npass_k: [1]\n")
    args = build_parser().parse_args(["mdpo", "run", "--config", str(config_file), "--resume", "--beta", "0.3",
                                      "--levels", "1", "2"])
    assert args.resume is True
    config = config_from_args(MDPOLoopConfig, args)
    assert (config.iterations, config.loss, config.beta, config.levels) == (3, "m_kto", 0.3, [1, 2])
    train = config.train_config(tmp_path / "t")
    assert (train.loss, train.beta, train.finetune, train.output_dir) == ("m_kto", 0.3, "lora", str(tmp_path / "t"))

    for options, error, match in [
        (dict(reference="fixed"), ValueError, "reference must be one of"),
        (dict(loss="orpo"), ValueError, "loss must be one of"),
        (dict(iterations=0), ValueError, "iterations must be >= 1"),
        (dict(n_prompts=1, iterations=2), ValueError, "n_prompts >= iterations"),
        (dict(eval_samples=2, pass_k=[4]), ValueError, "needs eval_samples >= 4"),
        (dict(skills=["calculus"]), ValueError, "skills must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(train_eval_steps=5), ValueError, "train_eval_problems > 0"),
        (dict(beta=0), ValueError, "beta must be > 0"),
        (dict(attn_implementation=["sdpa"]), TypeError, "attn_implementation must be None or a non-empty"),
    ]:
        with pytest.raises(error, match=match):
            MDPOLoopConfig(**options)
    loop = loop_config(tmp_path, tiny_folder, iterations=1)
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "state.json").write_text(json.dumps({"format": "lmforge-mdpo-loop", "version": 1,
                                                              "iterations": {}}))
    (tmp_path / "loop" / "config.yaml").write_text(f"beta: 0.1\nmodel: {tiny_folder}\n")
    with pytest.raises(ValueError, match=r"different settings \(beta: 0.1 -> 0.2\)"):
        run_mdpo_loop(MDPOLoopConfig(**{**loop.to_dict(), "beta": 0.2}), resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_mdpo_loop(MDPOLoopConfig(**{**loop.to_dict(), "init_adapter": str(tmp_path / "missing")}))

"""Tests of lmforge.agent.rollout: the multi-turn loop, its limits, JSONL streaming and resume, and
the transformers backend.

The loop is driven by a scripted backend that answers from the decoded prompt and ignores every
stop condition (it returns whole scripted replies, text after code blocks included), so the cuts
the loop makes itself are what is tested. Code really runs in the sandbox; answers are graded
against the generator's exact gold answers. The transformers backend is checked against plain,
unpadded ``model.generate`` on the tiny random models of every family, and end to end on the
embedded SmolLM2.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmforge.agent.format import ChatFormat, policy_spans, read_trajectories
from lmforge.agent.rollout import (
    RolloutConfig,
    SamplingParams,
    TransformersBackend,
    cut_turn,
    find_code_block,
    run_rollouts,
)
from lmforge.agent.sandbox import Sandbox, SandboxConfig
from lmforge.agent.tasks import code_block, generate_problems, output_block
from tests.models.conftest import TINY_MODEL_FAMILIES, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.timeout(180)

END = "<|im_end|>"  # SmolLM2's end of turn, written into scripted replies (encoded as the special token)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmforge.models.loading import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct and its tokenizer, loaded once for this file."""
    from lmforge.models.loading import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def sandbox():
    config = SandboxConfig(wall_time_s=5, cpu_time_s=5, preload_modules=("math", "fractions"), num_workers=4,
                           max_parallel=2)
    with Sandbox(config) as pool:
        yield pool


class ScriptedBackend:
    """A GenerationBackend answering ``script(problem, outputs_so_far)`` for each prompt.

    It finds the problem by its question in the decoded prompt and the tool outputs shown so far,
    returns the script's reply (capped at max_new_tokens only), and records every call. With
    ``crash_on_call`` it raises on that call, like a backend dying mid-run.
    """

    def __init__(self, tokenizer, problems, script, crash_on_call=None):
        self.tokenizer, self.problems, self.script = tokenizer, problems, script
        self.crash_on_call = crash_on_call
        self.calls: list[tuple[list[list[int]], list[SamplingParams]]] = []

    def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], list(params)))
        if self.crash_on_call == len(self.calls):
            raise RuntimeError("simulated crash of the backend")
        replies = []
        for prompt, p in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            problem = next(q for q in self.problems if q.question in text)
            outputs = re.findall(r"```output\n(.*?)\n```", text, re.DOTALL)
            reply = self.script(problem, outputs)
            replies.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"][: p.max_new_tokens])
        return replies

    def first_turn_prompts(self) -> int:
        """How many trajectories were started (prompts with no tool output yet)."""
        return sum("```output" not in self.tokenizer.decode(prompt) for prompts, _ in self.calls for prompt in prompts)


def solve_with_one_call(problem, outputs):
    if not outputs:
        code = code_block(problem.metadata["code"])
        return f"Let me compute it.\n\n{code}\nText after the block that the loop must cut.{END}"
    return f"The code printed {outputs[-1]}, so the answer is \\boxed{{{outputs[-1]}}}.{END}"


def quiet(**overrides) -> RolloutConfig:
    return RolloutConfig(**{"progress": False, "samples_per_problem": 2, "batch_size": 4, **overrides})


def assert_token_exact(chat: ChatFormat, trajectory) -> None:
    """The ids of a ChatML trajectory are the template's tokens of its messages, and the mask-1
    runs decode to the assistant contents (with the end-of-turn token where one was sampled)."""
    tokenizer = chat.tokenizer
    assert len(trajectory.input_ids) == len(trajectory.policy_mask)
    assert tokenizer.decode(trajectory.input_ids) == chat.render(trajectory.messages, add_generation_prompt=False)
    contents = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
    runs = [trajectory.input_ids[s:e] for s, e in policy_spans(trajectory.policy_mask)]
    assert len(runs) == len(contents)
    for run, content in zip(runs, contents):
        ended = run[-1] in chat.stop_token_ids
        assert tokenizer.decode(run[:-1] if ended else run) == content


# ------------------------------------------------------------------ the loop


def test_code_runs_in_the_sandbox_and_answers_are_graded(tokenizer, sandbox, tmp_path):
    problems = generate_problems(3, seed=1)
    backend = ScriptedBackend(tokenizer, problems, solve_with_one_call)
    path = tmp_path / "rollouts.jsonl"
    trajectories = run_rollouts(problems, backend, tokenizer, quiet(output_path=str(path)), sandbox=sandbox)
    chat = ChatFormat(tokenizer)

    assert [t.key() for t in trajectories] == [(p.id, s) for p in problems for s in (0, 1)]
    for trajectory, problem in zip(trajectories, [p for p in problems for _ in (0, 1)]):
        assert trajectory.finish_reason == "end_of_turn"
        assert trajectory.gold == problem.answer
        assert trajectory.correct is True and trajectory.predicted == problem.answer
        assert [m["role"] for m in trajectory.messages] == ["user", "assistant", "tool", "assistant"]
        # The sandbox really ran the generator's code: its output is the exact answer.
        (call,) = trajectory.tool_calls
        assert call["ok"] and call["output"] == problem.answer + "\n"
        assert call["code"].strip() == problem.metadata["code"].strip()
        assert trajectory.messages[2]["content"] == output_block(problem.answer)
        # The first turn was cut right after the closing fence; the script's trailing text is gone.
        assert trajectory.messages[1]["content"].endswith("```")
        assert "must cut" not in tokenizer.decode(trajectory.input_ids)
        assert_token_exact(chat, trajectory)
        assert trajectory.input_ids == tokenizer.apply_chat_template(trajectory.messages, return_dict=False)
        assert trajectory.errors == []

    # Batches of 4: six trajectories, two turns each; a finished slot is refilled from the queue.
    assert [len(prompts) for prompts, _ in backend.calls] == [4, 4, 2, 2]
    first_params = backend.calls[0][1][0]
    assert first_params.stop_token_ids == chat.stop_token_ids and first_params.stop_at_code_block
    assert first_params.max_new_tokens == 512
    assert read_trajectories(path) == trajectories


def test_interpreter_state_persists_and_tool_errors_are_recorded(tokenizer, sandbox):
    problems = generate_problems(1, seed=2)

    def script(problem, outputs):
        steps = [code_block("x = 6 * 7\nprint(x)"), code_block("print(x + undefined_name)"), code_block("print(x)")]
        if len(outputs) < len(steps):
            return f"Step {len(outputs)}.\n{steps[len(outputs)]}{END}"
        return f"\\boxed{{{outputs[-1]}}}{END}"

    (trajectory,) = run_rollouts(problems, ScriptedBackend(tokenizer, problems, script), tokenizer,
                                 quiet(samples_per_problem=1), sandbox=sandbox)
    assert [c["ok"] for c in trajectory.tool_calls] == [True, False, True]
    assert trajectory.tool_calls[1]["error_kind"] == "exception"
    assert "NameError" in trajectory.tool_calls[1]["output"]
    assert "NameError" in trajectory.messages[4]["content"]  # the model is shown the traceback
    assert trajectory.tool_calls[2]["output"] == "42\n"  # x survived the failed cell
    assert len(trajectory.errors) == 1 and "tool call 2: exception" in trajectory.errors[0]
    assert trajectory.predicted == "42"


def test_call_limit_appends_the_notice_and_the_final_turn_runs_no_code(tokenizer, sandbox):
    problems = generate_problems(1, seed=3)
    reply = f"Again.\n{code_block('print(1)')}\nmore text{END}"
    backend = ScriptedBackend(tokenizer, problems, lambda problem, outputs: reply)
    (trajectory,) = run_rollouts(problems, backend, tokenizer, quiet(samples_per_problem=1, max_tool_calls=2),
                                 sandbox=sandbox)
    assert len(trajectory.tool_calls) == 2
    roles = [m["role"] for m in trajectory.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    first_tool, last_tool = trajectory.messages[2]["content"], trajectory.messages[4]["content"]
    assert "no more code will be run" not in first_tool
    assert last_tool.startswith(output_block("1")) and "You have used all 2 tool calls" in last_tool
    assert [p.stop_at_code_block for _, (p,) in backend.calls] == [True, True, False]
    # The final turn is kept whole (not cut at its code block), ends with the sampled end of turn.
    assert trajectory.messages[-1]["content"] == reply.removesuffix(END)
    assert trajectory.finish_reason == "end_of_turn" and trajectory.metadata["tool_limit_reached"]
    assert trajectory.correct is False and trajectory.predicted is None

    # max_tool_calls=0: a plain chat; the code block is never cut nor run.
    backend = ScriptedBackend(tokenizer, problems, lambda problem, outputs: reply)
    (plain,) = run_rollouts(problems, backend, tokenizer, quiet(samples_per_problem=1, max_tool_calls=0),
                            sandbox=sandbox)
    assert plain.tool_calls == [] and [m["role"] for m in plain.messages] == ["user", "assistant"]
    assert plain.messages[-1]["content"] == reply.removesuffix(END)


def test_token_limits_per_turn_and_per_trajectory(tokenizer, sandbox):
    problems = generate_problems(1, seed=4)
    chat = ChatFormat(tokenizer)
    rambling = "and then " * 200

    (trajectory,) = run_rollouts(problems, ScriptedBackend(tokenizer, problems, lambda p, o: rambling), tokenizer,
                                 quiet(samples_per_problem=1, max_new_tokens_per_turn=16), sandbox=sandbox)
    assert trajectory.finish_reason == "turn_token_limit" and trajectory.num_policy_tokens == 16
    assert_token_exact(chat, trajectory)

    # Total budget: room for the prompt, the code turn and its tool turn, then 5 more tokens.
    code_turn = f"Compute.\n{code_block('print(3 * 4)')}"

    def script(problem, outputs):
        return code_turn if not outputs else rambling

    question = [{"role": "user", "content": problems[0].question}]
    prompt = chat.prompt_ids(question)
    code_ids = chat.encode(code_turn)
    tool_ids = chat.tool_turn_ids(question, output_block("12"), sampled_end_of_turn=False)
    closing = chat.closing_ids(question, sampled_end_of_turn=False)
    assert tokenizer.decode(closing) == "<|im_end|>\n"
    limit = len(prompt) + len(code_ids) + len(tool_ids) + 5 + len(closing)
    (trajectory,) = run_rollouts(problems, ScriptedBackend(tokenizer, problems, script), tokenizer,
                                 quiet(samples_per_problem=1, max_total_tokens=limit), sandbox=sandbox)
    assert trajectory.finish_reason == "total_token_limit"
    assert len(trajectory.input_ids) == limit
    assert trajectory.num_policy_tokens == len(code_ids) + 5
    assert_token_exact(chat, trajectory)

    # One token less: the tool output no longer fits with room to answer, so it is not appended.
    (trajectory,) = run_rollouts(problems, ScriptedBackend(tokenizer, problems, script), tokenizer,
                                 quiet(samples_per_problem=1, max_total_tokens=limit - 5), sandbox=sandbox)
    assert trajectory.finish_reason == "total_token_limit"
    assert [m["role"] for m in trajectory.messages] == ["user", "assistant"]
    assert len(trajectory.tool_calls) == 1 and len(trajectory.input_ids) <= limit - 5
    assert_token_exact(chat, trajectory)

    with pytest.raises(ValueError, match="max_total_tokens"):
        run_rollouts(problems, ScriptedBackend(tokenizer, problems, script), tokenizer,
                     quiet(max_total_tokens=len(prompt)), sandbox=sandbox)


def test_jsonl_streaming_and_resume_after_a_crash(tokenizer, sandbox, tmp_path):
    problems = generate_problems(3, seed=5)
    path = tmp_path / "run" / "rollouts.jsonl"
    config = quiet(batch_size=2, output_path=str(path))

    crashing = ScriptedBackend(tokenizer, problems, solve_with_one_call, crash_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_rollouts(problems, crashing, tokenizer, config, sandbox=sandbox)
    saved = read_trajectories(path)
    assert [t.key() for t in saved] == [(problems[0].id, 0), (problems[0].id, 1)]  # finished before the crash
    with open(path, "a") as handle:
        handle.write('{"input_ids": [1, 2')  # and a line torn by the crash

    resumed_backend = ScriptedBackend(tokenizer, problems, solve_with_one_call)
    trajectories = run_rollouts(problems, resumed_backend, tokenizer, config, sandbox=sandbox)
    assert resumed_backend.first_turn_prompts() == 4  # only the unfinished pairs were generated
    assert [t.key() for t in trajectories] == [(p.id, s) for p in problems for s in (0, 1)]
    assert trajectories[:2] == saved
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    assert all(t.correct for t in trajectories)

    idle = ScriptedBackend(tokenizer, problems, solve_with_one_call)
    assert run_rollouts(problems, idle, tokenizer, config, sandbox=sandbox) == trajectories
    assert idle.calls == []
    with pytest.raises(FileExistsError, match="resume"):
        run_rollouts(problems, idle, tokenizer, quiet(output_path=str(path), resume=False), sandbox=sandbox)


# ------------------------------------------------------------------ stops


def test_find_code_block_needs_an_opening_python_fence_and_a_closing_one():
    assert find_code_block("```python\nprint(1)\n") is None  # still open
    assert find_code_block("```\nprint(1)\n```") is None  # not marked as Python
    assert find_code_block("see ```output\n1\n```") is None
    block = find_code_block("Plan.\n```python\nx = 2\nprint(x)\n```\nmore ```python\ny\n```")
    assert block.code == "x = 2\nprint(x)\n" and block.end == len("Plan.\n```python\nx = 2\nprint(x)\n```")
    assert find_code_block("```py\n1+1\n```").code == "1+1\n"


def test_cut_turn_stops_at_the_first_stop(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stop = tokenizer.convert_tokens_to_ids(END)
    params = SamplingParams(max_new_tokens=100, stop_token_ids=(stop,))
    head = encode("Try.\n```python\nprint(1)\n```")
    ids, why = cut_turn(head + encode("\nafter") + [stop], params, tokenizer)
    assert why == "code_block" and ids == head
    # A split closing fence ("``" + "`") is found at the token that completes it.
    split = encode("Try.\n```python\nprint(1)\n") + encode("``") + encode("`") + encode(" tail")
    ids, why = cut_turn(split, params, tokenizer)
    assert why == "code_block" and tokenizer.decode(ids).endswith("```") and len(ids) == len(split) - 1
    ids, why = cut_turn(head + [stop], SamplingParams(max_new_tokens=100, stop_token_ids=(stop,),
                                                      stop_at_code_block=False), tokenizer)
    assert why == "stop_token" and ids == head + [stop]
    words = encode("one two three four five six")
    assert cut_turn(words + [stop] + words, params, tokenizer) == (words + [stop], "stop_token")
    assert cut_turn(words, SamplingParams(max_new_tokens=3), tokenizer) == (words[:3], "length")
    assert cut_turn(words, params, tokenizer) == (words, "unfinished")
    # The stop token before the block's end wins.
    ids, why = cut_turn(encode("```python\nx") + [stop] + encode("\n```"), params, tokenizer)
    assert why == "stop_token" and ids[-1] == stop


def test_bad_configs_and_arguments(tokenizer, sandbox):
    for bad in [dict(samples_per_problem=0), dict(max_tool_calls=-1), dict(temperature=-1.0), dict(top_p=0.0),
                dict(batch_size=0), dict(tool_role="ipython"), dict(user_template="no placeholder"),
                dict(grading_rules=("psychic",)), dict(max_new_tokens_per_turn=1.5)]:
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            RolloutConfig(**bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    problems = generate_problems(2, seed=6)
    backend = ScriptedBackend(tokenizer, problems, solve_with_one_call)
    with pytest.raises(ValueError, match="unique"):
        run_rollouts([problems[0], problems[0]], backend, tokenizer, quiet(), sandbox=sandbox)
    with pytest.raises(TypeError, match="Problem"):
        run_rollouts(["What is 1+1?"], backend, tokenizer, quiet(), sandbox=sandbox)
    with pytest.raises(TypeError, match="generate"):
        run_rollouts(problems, object(), tokenizer, quiet(), sandbox=sandbox)
    with pytest.raises(TypeError, match="RolloutConfig"):
        run_rollouts(problems, backend, tokenizer, {"samples_per_problem": 1}, sandbox=sandbox)
    assert backend.calls == []


# ------------------------------------------------------------------ the transformers backend


@pytest.fixture
def one_thread():
    # Two shared cores: one intra-op thread avoids oversubscription and is several times faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("family", TINY_MODEL_FAMILIES)
def test_left_padded_batches_match_unpadded_generation(family, one_thread):
    model = build_tiny_model(family, torch.float32)  # (Gemma2 eager attention turns padding into NaN in float64)
    tiny_tokenizer = build_tiny_tokenizer()
    backend = TransformersBackend(model, tiny_tokenizer)
    # Repeated prompts (the samples of one problem) share one prefill; the outputs must not change.
    texts = ("Hi", "A longer prompt here.", "Mid size", "Hi", "A longer prompt here.")
    prompts = [tiny_tokenizer(text)["input_ids"] for text in texts]
    budgets = [6, 3, 5, 4, 6]
    params = [SamplingParams(max_new_tokens=b, temperature=0, stop_token_ids=(2,)) for b in budgets]
    batched = backend.generate(prompts, params)
    for prompt, budget, output in zip(prompts, budgets, batched):
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=budget, eos_token_id=2, pad_token_id=0)
        expected = reference[0, len(prompt):].tolist()
        if 2 in expected:
            expected = expected[: expected.index(2) + 1]
        assert output == expected
        assert len(output) <= budget

    # Sampling is seeded per call: the same seed repeats a call, another seed does not.
    first, second, other = (
        backend.generate(prompts, [SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=seed)] * 5)
        for seed in (7, 7, 8))
    assert first == second != other


def test_repeated_prompts_are_prefilled_once(one_thread):
    model = build_tiny_model("qwen3")
    tiny_tokenizer = build_tiny_tokenizer()
    prompt = tiny_tokenizer("The same question, sampled four times.")["input_ids"]
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        outputs = TransformersBackend(model, tiny_tokenizer).generate(
            [prompt] * 4, [SamplingParams(max_new_tokens=3, temperature=1.0, seed=0)] * 4)
    finally:
        hook.remove()
    assert shapes[0] == (1, len(prompt) - 1)  # the shared prompt, once
    assert shapes[1:] == [(4, 1)] * 3  # then the last prompt token and the decoding steps, per sample
    assert len({tuple(o) for o in outputs}) > 1  # the samples still differ


def test_backend_stops_right_after_a_code_block(smollm2, one_thread):
    model, model_tokenizer = smollm2
    backend = TransformersBackend(model, model_tokenizer)
    chat = ChatFormat(model_tokenizer)
    prompt = chat.prompt_ids([{"role": "user", "content": "Write a Python code block that prints 2+2."}])
    greedy = dict(max_new_tokens=40, temperature=0, stop_token_ids=chat.stop_token_ids)
    stopped, unstopped = backend.generate([prompt, prompt], [SamplingParams(stop_at_code_block=True, **greedy),
                                                             SamplingParams(stop_at_code_block=False, **greedy)])
    text = model_tokenizer.decode(stopped)
    assert find_code_block(text) is not None and find_code_block(text).end == len(text)
    assert len(unstopped) > len(stopped) and unstopped[: len(stopped)] == stopped


def test_smollm2_end_to_end(smollm2, sandbox, tmp_path, one_thread):
    model, model_tokenizer = smollm2
    problems = generate_problems(2, split="test", seed=7)
    config = quiet(samples_per_problem=2, max_new_tokens_per_turn=32, max_total_tokens=320, max_tool_calls=2,
                   temperature=1.0, seed=11, output_path=str(tmp_path / "r.jsonl"),
                   system_prompt="Solve the problem with Python: write a ```python block, read its output, "
                                 "then give the final answer as \\boxed{answer}.")
    trajectories = run_rollouts(problems, TransformersBackend(model, model_tokenizer), model_tokenizer, config,
                                sandbox=sandbox)
    chat = ChatFormat(model_tokenizer)
    assert len(trajectories) == 4
    for trajectory, problem in zip(trajectories, [p for p in problems for _ in (0, 1)]):
        assert trajectory.problem_id == problem.id and trajectory.gold == problem.answer
        assert trajectory.finish_reason in ("end_of_turn", "turn_token_limit", "total_token_limit")
        assert len(trajectory.input_ids) <= config.max_total_tokens
        prompt = chat.prompt_ids(trajectory.messages[:2])
        assert trajectory.input_ids[: len(prompt)] == prompt and not any(trajectory.policy_mask[: len(prompt)])
        assert 0 < trajectory.num_policy_tokens <= 32 * (config.max_tool_calls + 1)
        assert all(e - s <= 32 for s, e in policy_spans(trajectory.policy_mask))
        assert_token_exact(chat, trajectory)
        assert isinstance(trajectory.correct, bool)
    assert read_trajectories(tmp_path / "r.jsonl") == trajectories

"""Tests for lmforge.agent.tasks: GSM8K/MATH loaders and the word-problem generator."""

import json
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from lmforge.agent.grading import extract_answer, grade, is_equivalent, remove_thousands_separators
from lmforge.agent.tasks import (
    LEVELS,
    SKILLS,
    SPLITS,
    Problem,
    generate_problems,
    load_gsm8k,
    load_math,
    render_answer,
    solution_messages,
    split_of_question,
    tool_solution_messages,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"{GSM8K_TRAIN} not present")


# ------------------------------------------------------------------------------ GSM8K loader


@pytest.fixture(scope="module")
def gsm8k_train():
    return load_gsm8k(GSM8K_TRAIN)


@needs_gsm8k
def test_gsm8k_file_loads_every_record(gsm8k_train):
    raw = [
        json.loads(line)
        for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    assert len(gsm8k_train) == len(raw) == 7473
    assert len({p.id for p in gsm8k_train}) == len(gsm8k_train)
    first = gsm8k_train[0]
    assert first.question.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.answer == "72" and first.source == "gsm8k" and first.level is None
    assert first.metadata["solution"].startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    commas = 0
    for problem, record in zip(gsm8k_train, raw):
        assert problem.question == record["question"].strip()
        # Independent parse of the "####" line: the text after the last marker, commas dropped.
        after_marker = record["answer"].split("####")[-1].strip()
        commas += "," in after_marker
        assert problem.answer == after_marker.replace(",", "")
        assert re.fullmatch(r"-?\d+", problem.answer), problem.answer  # GSM8K golds are integers
        # ...and it is exactly what grading's "gsm8k" rule extracts from the reference solution.
        assert problem.answer == remove_thousands_separators(
            extract_answer(record["answer"], rules=("gsm8k",))
        )
    assert commas == 79  # answers written like "1,080" (counted in the raw file)


@needs_gsm8k
def test_gsm8k_reference_solutions_grade_as_correct(gsm8k_train):
    raw = [json.loads(line) for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[:500]]
    for problem, record in zip(gsm8k_train, raw):
        result = grade(record["answer"], problem.answer, rules=("gsm8k",))
        assert result.correct and result.rule == "gsm8k"
        assert not grade(record["answer"], str(int(problem.answer) + 1), rules=("gsm8k",)).correct


@needs_gsm8k
def test_gsm8k_from_folder_with_split_and_limit():
    problems = load_gsm8k(GSM8K_TRAIN.parent, split="train", limit=5)
    assert [p.answer for p in problems] == ["72", "10", "5", "42", "624"]
    assert problems == load_gsm8k(str(GSM8K_TRAIN), limit=5)
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl.*train\.jsonl"):
        load_gsm8k(GSM8K_TRAIN.parent, split="test")


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_gsm8k_malformed_inputs_name_file_and_line(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    bad_json = _write_lines(tmp_path / "bad.jsonl", [good, "", good, "{not json"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad_json))}:4: not valid JSON"):
        load_gsm8k(bad_json)
    not_object = _write_lines(tmp_path / "list.jsonl", [good, "[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object"):
        load_gsm8k(not_object)
    missing = _write_lines(tmp_path / "missing.jsonl", [json.dumps({"question": "q?"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: missing field 'answer'"):
        load_gsm8k(missing)
    no_marker = _write_lines(
        tmp_path / "nomarker.jsonl", [good, json.dumps({"question": "q", "answer": "42"})]
    )
    with pytest.raises(ValueError, match=r"nomarker\.jsonl:2: .*####"):
        load_gsm8k(no_marker)
    not_text = _write_lines(
        tmp_path / "nottext.jsonl", [json.dumps({"question": 3, "answer": "#### 3"})]
    )
    with pytest.raises(ValueError, match=r"nottext\.jsonl:1: field 'question'"):
        load_gsm8k(not_text)
    empty = _write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no records"):
        load_gsm8k(empty)
    # Blank lines are skipped, not counted as records.
    assert [p.answer for p in load_gsm8k(bad_json, limit=2)] == ["2", "2"]


def test_bad_sources_and_arguments(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_gsm8k("./missing/train.jsonl")
    with pytest.raises(TypeError, match="source"):
        load_gsm8k(42)
    with pytest.raises(ValueError, match="limit"):
        load_gsm8k(tmp_path, limit=0)
    # A Hub id without the optional `datasets` library, or offline: say to pass a local path.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="local JSONL"):
        load_gsm8k("openai/gsm8k")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local JSONL"):
        load_math("HuggingFaceH4/MATH-500")


# ------------------------------------------------------------------------------ MATH loader


def test_math_style_jsonl(tmp_path):
    records = [
        {
            "problem": "Simplify $\\frac{2}{4}$.",
            "answer": "\\frac{1}{2}",
            "level": "Level 1",
            "subject": "Algebra",
            "unique_id": "test/algebra/1.json",
        },
        {
            "problem": "Find the interval.",
            "level": 5,
            "type": "Intermediate Algebra",
            "solution": "We get $\\boxed{[0, \\frac{1}{2})}$ after noting $\\boxed{2}$ first... no: "
            "the set is $\\boxed{\\left[0, \\dfrac{1}{2}\\right)}$.",
        },
        {
            "question": "Compute $2^{10}$.",
            "solution": "It is $\\boxed{1,\\!024}$.",
            "level": "Level ?",
        },
    ]
    path = _write_lines(tmp_path / "test.jsonl", [json.dumps(r) for r in records])
    problems = load_math(tmp_path)  # folder + default split "test"
    assert [p.level for p in problems] == [1, 5, None]
    assert [p.source for p in problems] == ["math"] * 3
    assert problems[0].id == "test/algebra/1.json" and problems[0].metadata["subject"] == "Algebra"
    assert (
        problems[1].id == "math/test/1" and problems[1].metadata["type"] == "Intermediate Algebra"
    )
    assert problems[1].answer == "\\left[0, \\dfrac{1}{2}\\right)"  # the last box of the solution
    assert problems[2].question == "Compute $2^{10}$." and problems[2].answer == "1,\\!024"
    # The gold answers grade against equivalent and different predictions.
    assert is_equivalent("0.5", problems[0].answer) and not is_equivalent("2", problems[0].answer)
    assert is_equivalent("[0, 1/2)", problems[1].answer) and not is_equivalent(
        "[0, 1/2]", problems[1].answer
    )
    assert is_equivalent("1024", problems[2].answer) and not is_equivalent(
        "1023", problems[2].answer
    )
    assert load_math(path, limit=1) == problems[:1]


def test_math_malformed_inputs(tmp_path):
    no_answer = _write_lines(
        tmp_path / "a.jsonl", [json.dumps({"problem": "p", "solution": "no box here"})]
    )
    with pytest.raises(ValueError, match=r"a\.jsonl:1: .*boxed"):
        load_math(no_answer)
    neither = _write_lines(
        tmp_path / "b.jsonl",
        [json.dumps({"problem": "p", "answer": "1"}), json.dumps({"problem": "p"})],
    )
    with pytest.raises(ValueError, match=r"b\.jsonl:2: missing field 'answer' or 'solution'"):
        load_math(neither)
    no_problem = _write_lines(tmp_path / "c.jsonl", [json.dumps({"answer": "1"})])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: missing field 'problem' or 'question'"):
        load_math(no_problem)
    bad_level = _write_lines(
        tmp_path / "d.jsonl", [json.dumps({"problem": "p", "answer": "1", "level": "hard"})]
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'level'"):
        load_math(bad_level)


# ------------------------------------------------------------------------------ generator

RUN_SNIPPETS = r"""
import contextlib, io, json, sys
outputs = []
for code in json.load(sys.stdin):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {"__name__": "__snippet__"})
    outputs.append(buffer.getvalue())
json.dump(outputs, sys.stdout)
"""


@pytest.fixture(scope="module")
def generated():
    # 20 problems for each of the 30 (skill, level) pairs.
    return generate_problems(600, seed=11)


def test_generated_code_really_prints_the_answer(generated):
    # Run every solution's code in a separate interpreter and compare what it prints.
    codes = [p.metadata["code"] for p in generated]
    completed = subprocess.run(
        [sys.executable, "-I", "-c", RUN_SNIPPETS],
        input=json.dumps(codes),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outputs = json.loads(completed.stdout)
    for problem, printed in zip(generated, outputs):
        assert printed == problem.metadata["output"] + "\n", (
            problem.question,
            problem.metadata["code"],
        )
        assert problem.metadata["output"] == problem.answer


def test_generated_answers_are_canonical_and_graded_correct(generated):
    fractions = 0
    for problem in generated:
        value = Fraction(problem.answer)
        assert render_answer(value) == problem.answer  # integer or reduced a/b, nothing else
        assert re.fullmatch(r"-?\d+(/\d+)?", problem.answer)
        fractions += value.denominator != 1
        final = solution_messages(problem)[-1]["content"]
        assert grade(final, problem.answer, rules=("boxed",)).correct
        assert not grade(final, render_answer(value + 1), rules=("boxed",)).correct
    assert fractions > 0  # the fraction skill does produce non-integer answers


def _numbers(text):
    return [int(n) for n in re.findall(r"\d+", text)]


def test_generated_answers_match_an_independent_reading_of_the_question():
    # Re-solve some templates from the question text alone, without looking at the code.
    checked = Counter()
    for problem in generate_problems(
        300, skills=["add_sub", "multi_step", "percent", "rate"], seed=5
    ):
        q, answer = problem.question, Fraction(problem.answer)
        if " has " in q and q.endswith("have now?") and "$" not in q:  # running count
            value = Fraction(_numbers(q.split(".")[0])[0])
            for sentence in q.split(".")[1:]:
                amount = _numbers(sentence)
                if amount and any(w in sentence for w in ("buys", "finds", "gets")):
                    value += amount[0]
                elif amount:
                    value -= amount[0]
            checked["add_sub"] += 1
        elif q.endswith("have altogether?"):  # people compared with each other
            counts = [Fraction(_numbers(q.split(".")[0])[0])]
            for sentence in q.split(".")[1:-1]:
                gap = _numbers(sentence)[0]
                counts.append(counts[-1] + gap if " more " in sentence else counts[-1] - gap)
            value = sum(counts)
            checked["compare"] += 1
        elif problem.metadata["skill"] == "multi_step":
            sentences = q.split(". ")
            value = Fraction(_numbers(sentences[0])[0])
            for sentence in sentences[1:]:
                if "earns" in sentence:
                    value += _numbers(sentence)[0]
                elif "spends $" in sentence:
                    value -= _numbers(sentence)[0]
                elif "doubles" in sentence:
                    value *= 2
                elif "gives 1/" in sentence:
                    value -= value / _numbers(sentence)[1]
                elif "%" in sentence:
                    value -= value * _numbers(sentence)[0] / 100
            checked["multi_step"] += 1
        elif "% off" in q:
            price, percent = _numbers(q)[:2]
            value = price - Fraction(price * percent, 100)
            checked["discount"] += 1
        elif "do it together" in q:
            a, b = _numbers(q)[:2]
            value = 60 / (Fraction(1, a) + Fraction(1, b))
            checked["work"] += 1
        elif "average speed" in q:
            d1, t1, d2, t2 = _numbers(q)[:4]
            value = Fraction(d1 + d2, t1 + t2)
            checked["speed"] += 1
        else:
            continue
        assert value == answer, q
    assert all(
        checked[k] >= 5 for k in ("add_sub", "compare", "multi_step", "discount", "work", "speed")
    ), checked


def test_generator_is_deterministic_and_prefix_stable():
    first = generate_problems(60, seed=3)
    assert first == generate_problems(60, seed=3)
    assert generate_problems(25, seed=3) == first[:25]
    other = generate_problems(60, seed=4)
    assert {p.question for p in first} != {p.question for p in other}


def test_skill_and_level_coverage(generated):
    pairs = Counter((p.metadata["skill"], p.level) for p in generated)
    assert set(pairs) == {(s, l) for s in SKILLS for l in LEVELS}
    assert set(pairs.values()) == {20}
    chosen = generate_problems(40, skills=["percent", "fraction"], levels=[4, 5], seed=1)
    assert Counter((p.metadata["skill"], p.level) for p in chosen) == {
        ("percent", 4): 10,
        ("percent", 5): 10,
        ("fraction", 4): 10,
        ("fraction", 5): 10,
    }
    # A single skill by name, as an evolution expert would train on.
    assert {p.metadata["skill"] for p in generate_problems(12, skills="rate")} == {"rate"}


def test_levels_get_harder(generated):
    # Level 1 is one operation on small numbers; higher levels have more steps and bigger numbers.
    def mean(values):
        return sum(values) / len(values)

    for skill in SKILLS:
        by_level = {
            level: [p for p in generated if p.metadata["skill"] == skill and p.level == level]
            for level in LEVELS
        }
        biggest = {lv: mean([max(_numbers(p.question)) for p in ps]) for lv, ps in by_level.items()}
        code_lines = {
            lv: mean([p.metadata["code"].count("\n") for p in ps]) for lv, ps in by_level.items()
        }
        assert biggest[5] > biggest[1], (skill, biggest)
        assert code_lines[5] >= code_lines[1], (skill, code_lines)
    level1_add = [p for p in generated if p.metadata["skill"] == "add_sub" and p.level == 1]
    assert all(
        max(_numbers(p.question)) <= 20 and p.metadata["code"].count("=") == 2 for p in level1_add
    )


def test_splits_are_disjoint_and_free_of_duplicates():
    splits = {
        "train": generate_problems(900, split="train", seed=0),
        "validation": generate_problems(300, split="validation", seed=1),
        "test": generate_problems(300, split="test", seed=2),
    }
    questions = {}
    for split, problems in splits.items():
        questions[split] = {p.question for p in problems}
        assert len(questions[split]) == len(problems)  # no duplicates within a split
        assert len({p.id for p in problems}) == len(problems)
        assert all(p.metadata["split"] == split == split_of_question(p.question) for p in problems)
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    # Same seed, different split: still disjoint (the split is a property of the question).
    assert (
        not {p.question for p in generate_problems(300, split="test", seed=0)} & questions["train"]
    )
    shares = Counter(split_of_question(f"question {i}") for i in range(20000))
    assert abs(shares["train"] / 20000 - 0.8) < 0.02 and abs(shares["test"] / 20000 - 0.1) < 0.01


def test_solution_message_format(generated):
    problem = next(p for p in generated if p.metadata["skill"] == "fraction" and p.level == 5)
    messages = solution_messages(problem)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[0]["content"] == problem.question
    reasoning, block = messages[1]["content"].split("\n\n", 1)
    assert reasoning == problem.metadata["reasoning"]
    assert block == f"```python\n{problem.metadata['code']}\n```"
    assert messages[2]["content"] == f"```output\n{problem.answer}\n```"
    assert extract_answer(messages[3]["content"], rules=("boxed",)) == problem.answer
    assert tool_solution_messages("q", "r", "print(1)\n", "1\n", "1")[1:3] == [
        {"role": "assistant", "content": "r\n\n```python\nprint(1)\n```"},
        {"role": "tool", "content": "```output\n1\n```"},
    ]
    with pytest.raises(ValueError, match="no tool solution"):
        solution_messages(Problem(id="x", question="q", answer="1", source="gsm8k"))


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="skills"):
        generate_problems(5, skills=["algebra"])
    with pytest.raises(ValueError, match="levels"):
        generate_problems(5, levels=[6])
    with pytest.raises(ValueError, match="split"):
        generate_problems(5, split="dev")
    with pytest.raises(ValueError, match="n must"):
        generate_problems(0)
    with pytest.raises(TypeError, match="seed"):
        generate_problems(5, seed="1")
    assert SPLITS == ("train", "validation", "test")

"""Tests for lmforge.agent.grading: answer extraction, equivalence (against math-verify) and timeouts."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from math_verify import parse, verify

from lmforge.agent.grading import (
    EXTRACTION_RULES,
    STRICT_RULES,
    ExtractedAnswer,
    extract_answer,
    extract_answer_with_rule,
    extract_boxed,
    grade,
    is_equivalent,
    remove_thousands_separators,
)

# Takes about a minute in SymPy (measured: 54 s), so only a working timeout makes it return fast.
SLOW_ANSWER = "\\binom{1000000}{500000}"


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "First \\boxed{1}, finally \\boxed{\\frac{a}{b}}.",
            ExtractedAnswer("\\frac{a}{b}", "boxed"),
        ),
        ("So $\\boxed{\\frac{\\sqrt{3}}{2}}$", ExtractedAnswer("\\frac{\\sqrt{3}}{2}", "boxed")),
        ("\\fbox{x^{2}+1}", ExtractedAnswer("x^{2}+1", "boxed")),
        ("the set \\boxed{\\{1, 2\\}} works", ExtractedAnswer("\\{1, 2\\}", "boxed")),
        ("\\boxed{3} but then \\boxed{4", ExtractedAnswer("3", "boxed")),  # truncated last box
        ("so it is \\boxed 7.", ExtractedAnswer("7", "boxed")),
        ("\\boxed{ 12 }", ExtractedAnswer("12", "boxed")),
        ("\\boxed{\\text{(B)}} #### 5", ExtractedAnswer("\\text{(B)}", "boxed")),  # boxed wins
        ("48/2 = 24\n48+24 = 72\n#### 72", ExtractedAnswer("72", "gsm8k")),
        ("#### 1,000\n", ExtractedAnswer("1,000", "gsm8k")),
        ("The final answer is $\\frac{3}{4}$.", ExtractedAnswer("\\frac{3}{4}", "answer_is")),
        ("So the answer is 3.5. Done, it was 9.", ExtractedAnswer("3.5", "answer_is")),
        ("Work...\nAnswer: 12 apples\n", ExtractedAnswer("12 apples", "answer_is")),
        ("**Final Answer:** **-2**", ExtractedAnswer("-2", "answer_is")),
        ("we get 3 and then -7.5 in the end", ExtractedAnswer("-7.5", "last_number")),
        ("7-3 = 4", ExtractedAnswer("4", "last_number")),
        ("in all 1,234,567 people.", ExtractedAnswer("1,234,567", "last_number")),
        ("x = 3/4 of the cake", ExtractedAnswer("3/4", "last_number")),
    ],
)
def test_extract_answer_with_rule_known_cases(text, expected):
    assert extract_answer_with_rule(text) == expected
    assert extract_answer(text) == expected.text


def test_extract_returns_none_without_any_answer():
    assert extract_answer_with_rule("no digits here at all") is None
    assert extract_answer("\\boxed{}") is None  # an empty box is not an answer
    assert extract_boxed("\\boxed{unclosed") is None


def test_rules_select_strictness():
    text = "I think the answer is 5."
    assert extract_answer(text, rules=STRICT_RULES) is None
    assert extract_answer_with_rule(text, rules=("answer_is",)) == ExtractedAnswer("5", "answer_is")
    # The order of `rules` does not change the priority: boxed is tried before last_number.
    assert (
        extract_answer_with_rule("3 \\boxed{9} 4", rules=("last_number", "boxed")).rule == "boxed"
    )
    assert extract_answer_with_rule("3 \\boxed{9} 4", rules=("last_number",)).text == "4"
    assert EXTRACTION_RULES[0] == "boxed" and set(STRICT_RULES) <= set(EXTRACTION_RULES)


def test_extraction_argument_errors():
    with pytest.raises(ValueError, match="rules"):
        extract_answer("5", rules=("boxed", "vibes"))
    with pytest.raises(ValueError, match="rules"):
        extract_answer("5", rules=())
    with pytest.raises(TypeError, match="text"):
        extract_answer(5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", "1000"),
        ("1,\\!000", "1000"),
        ("-1,234.5", "-1234.5"),
        ("1,2", "1,2"),
        ("12,34", "12,34"),
        ("(1,000, 2)", "(1,000, 2)"),
        ("1000", "1000"),
    ],
)
def test_remove_thousands_separators(text, expected):
    assert remove_thousands_separators(text) == expected


# ------------------------------------------------------------------------------ equivalence

EQUAL_PAIRS = [
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac12"),
    ("0.75", "\\dfrac{3}{4}"),
    ("1.5", "3/2"),
    ("10.0", "10"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}"),
    ("5", "5\\text{ cm}"),
    ("12 apples", "12"),
    ("5 dollars", "5"),
    ("\\$18.00", "18"),
    ("$18", "18"),
    ("50", "50\\%"),
    ("0.5", "50\\%"),
    ("(1, 2)", "(1,2)"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("[0, 1)", "[0,1)"),
    ("(-\\infty,3]", "(-\\infty, 3]"),
    ("1000", "1,000"),
    ("1000", "1,\\!000"),
    ("1234567", "1,234,567"),
    ("-3", "-3"),
    ("-0.5", "-\\frac{1}{2}"),
    ("30", "30^\\circ"),
    ("30", "30^{\\circ}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("5", "x = 5"),
    ("A", "\\text{(A)}"),
    ("$\\frac{7}{2}$", "3.5"),
]

NOT_EQUAL_PAIRS = [
    ("0.51", "1/2"),
    ("(2,1)", "(1,2)"),
    ("[0,1]", "[0,1)"),
    ("3", "-3"),
    ("1000.5", "1,000"),
    ("1000", "1,001"),
    ("1.414", "\\sqrt{2}"),
    ("0.33", "\\frac{1}{3}"),
    ("\\infty", "-\\infty"),
    ("7.000001", "7"),
    ("B", "\\text{(A)}"),
    ("\\sqrt{6}", "2\\sqrt{2}"),
    ("5", "50\\%"),
    ("(3, \\pi)", "(3, \\frac{\\pi}{2})"),
    ("60", "30^\\circ"),
    ("13 apples", "12"),
    ("\\frac{2}{3}", "\\dfrac{3}{2}"),
    ("x^2+1", "(x+1)^2"),
]


@pytest.mark.parametrize("pred, gold", EQUAL_PAIRS)
def test_equal_pairs(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", NOT_EQUAL_PAIRS)
def test_not_equal_pairs(pred, gold):
    assert not is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("72", "72"),
        ("72", "73"),
        ("0.5", "1/2"),
        ("-4", "4"),
        ("1/3", "0.3333333"),
        ("1/3", "0.333"),
        ("2.50", "5/2"),
        ("\\frac{6}{4}", "1.5"),
        ("100", "99.9999999"),
        ("1,024", "1024"),
    ],
)
def test_number_fast_path_agrees_with_math_verify(pred, gold):
    # Plain numbers skip SymPy when the answer is already certain; the verdict must be the one
    # math-verify itself gives on the boxed strings.
    reference = verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{pred}}}"))
    assert is_equivalent(pred, gold) == reference


def test_missing_or_empty_answers_are_not_equivalent():
    assert not is_equivalent(None, "5")
    assert not is_equivalent("", "5")
    assert not is_equivalent("5", " ")


def test_equivalence_argument_errors():
    with pytest.raises(TypeError, match="gold"):
        is_equivalent("5", 5)
    with pytest.raises(TypeError, match="pred"):
        is_equivalent(5, "5")
    with pytest.raises(ValueError, match="timeout"):
        is_equivalent("5", "5", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        grade("\\boxed{5}", "5", timeout=-1.0)


# ------------------------------------------------------------------------------ grade


def test_grade_reports_answer_rule_and_verdict():
    result = grade("We compute 1/2 of 3.\n\nThe answer is $\\boxed{\\dfrac{3}{2}}$.", "1.5")
    assert (result.correct, result.predicted, result.rule, result.gold) == (
        True,
        "\\dfrac{3}{2}",
        "boxed",
        "1.5",
    )
    assert not result.timed_out
    wrong = grade("#### 71", "72")
    assert (wrong.correct, wrong.predicted, wrong.rule) == (False, "71", "gsm8k")


def test_grade_with_strict_rules_rejects_loose_answers():
    loose = "So the answer is 5."
    assert grade(loose, "5").correct and grade(loose, "5").rule == "answer_is"
    strict = grade(loose, "5", rules=STRICT_RULES)
    assert (strict.correct, strict.predicted, strict.rule) == (False, None, None)


# ------------------------------------------------------------------------------ timeouts


def test_timeout_in_main_thread():
    assert threading.current_thread() is threading.main_thread()
    start = time.monotonic()
    result = grade(f"\\boxed{{{SLOW_ANSWER}}}", "5", timeout=0.5)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.correct
    assert 0.45 < elapsed < 5.0, elapsed  # it ran until the alarm, and not much longer
    assert is_equivalent("\\sqrt{8}", "2\\sqrt{2}", timeout=5)  # still works afterwards


def test_main_thread_timeout_restores_an_armed_timer():
    saved_handler = signal.getsignal(signal.SIGALRM)
    saved_timer = signal.getitimer(signal.ITIMER_REAL)
    fired = []
    try:

        def record_alarm(signum, frame):
            fired.append(time.monotonic())

        signal.signal(signal.SIGALRM, record_alarm)
        # A long outer timer: ours must run inside it and hand it back with the time left.
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert not is_equivalent(SLOW_ANSWER, "5", timeout=0.3)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 95.0 < remaining < 99.8, remaining
        assert signal.getsignal(signal.SIGALRM) is record_alarm and not fired
        # A short outer timer: it must still fire (promptly), even though ours was longer.
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        start = time.monotonic()
        result = grade(f"\\boxed{{{SLOW_ANSWER}}}", "5", timeout=30)
        assert result.timed_out
        deadline = time.monotonic() + 2.0
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired and fired[0] - start < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved_handler)
        if saved_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *saved_timer)


def _timed_grade(args):
    response, gold, timeout = args
    start = time.monotonic()
    result = grade(response, gold, timeout=timeout)
    return result, time.monotonic() - start


def test_worker_threads_compare_correctly_and_time_out():
    all_started = threading.Barrier(3)

    def warm_up(_):
        all_started.wait(timeout=30)  # three concurrent comparisons start three graders
        return grade("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", timeout=5.0).correct

    with ThreadPoolExecutor(max_workers=3) as pool:
        # Start the grader subprocesses first, so the timing below measures only comparisons.
        assert all(pool.map(warm_up, range(3)))
        jobs = [
            (f"\\boxed{{{SLOW_ANSWER}}}", "5", 0.5),
            ("\\boxed{(1, 2)}", "(2, 1)", 5.0),
            ("\\boxed{\\dfrac{3}{4}}", "0.75", 5.0),
        ]
        (slow, slow_s), (tuple_, _), (frac, _) = pool.map(_timed_grade, jobs)
        assert slow.timed_out and not slow.correct
        assert 0.45 < slow_s < 5.0, slow_s  # cut off at 0.5 s, not after SymPy's ~54 s
        assert not tuple_.correct and not tuple_.timed_out
        assert frac.correct
        # The grader that overran was replaced: comparisons keep working.
        again = list(pool.map(_timed_grade, [("\\boxed{-\\frac{1}{2}}", "-0.5", 5.0)] * 3))
        assert all(result.correct for result, _ in again)


def test_worker_thread_verdicts_match_main_thread():
    pairs = EQUAL_PAIRS[:8] + NOT_EQUAL_PAIRS[:8]
    in_main = [is_equivalent(p, g) for p, g in pairs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        in_threads = list(pool.map(lambda pair: is_equivalent(*pair), pairs))
    assert in_threads == in_main == [True] * 8 + [False] * 8

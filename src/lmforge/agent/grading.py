"""Answer grading: pull the final answer out of a response and compare it with the gold answer.

Extraction tries named rules from strictest to loosest and reports which one matched, so a caller
can decide how lenient to be (a reward for RL usually accepts only ``"boxed"``; an evaluation of a
base model may accept all rules):

==============  ==========================================================================
rule            what it matches
==============  ==========================================================================
``boxed``       the content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces
                and escaped ``\\{ \\}`` handled; also the brace-less ``\\boxed 5``)
``gsm8k``       the rest of the line after the last ``#### `` marker (GSM8K's convention)
``answer_is``   the last "the answer is X", "final answer: X" or a line starting "Answer: X"
``last_number`` the last number in the text (sign, decimals, ``a/b`` and ``1,000`` grouping kept)
==============  ==========================================================================

Equivalence goes through math-verify (SymPy based: numbers, fractions, LaTeX expressions, intervals,
tuples, sets, percentages, units in ``\\text{}``, degrees). Two plain numbers are compared exactly
with :class:`fractions.Fraction` first, which settles most GSM8K-style answers without SymPy.

Every SymPy comparison runs under a timeout, because some inputs (``\\binom{10^6}{5 \\cdot 10^5}``)
take minutes. math-verify's own timeout uses ``signal.alarm``, which only works in the main thread,
so here:

* in the main thread we arm ``signal.setitimer`` ourselves (sub-second resolution) and restore any
  timer that was already running (pytest-timeout, for example, uses the same signal);
* in any other thread the comparison runs in a small pool of grader subprocesses (started with
  ``python -I this_file.py``, so they import only math-verify, never the caller's script or torch);
  a subprocess that overruns is killed and replaced, so a pathological answer cannot keep burning
  CPU after we gave up on it.

A comparison that times out or makes math-verify fail counts as *not* equivalent.
"""

from __future__ import annotations

import atexit
import json
import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

logger = logging.getLogger(__name__)

EXTRACTION_RULES: tuple[str, ...] = ("boxed", "gsm8k", "answer_is", "last_number")
"""All extraction rules, strictest first; this is also the order in which they are tried."""

STRICT_RULES: tuple[str, ...] = ("boxed", "gsm8k")
"""Rules that only fire on an explicit final-answer marker."""

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ExtractedAnswer:
    """A final answer found in a response: its text and the name of the rule that found it."""

    text: str
    rule: str


@dataclass(frozen=True)
class GradeResult:
    """The outcome of :func:`grade`.

    ``predicted``/``rule`` are ``None`` when no allowed rule found an answer. ``timed_out`` says the
    comparison was cut off (and therefore counted as wrong).
    """

    correct: bool
    predicted: str | None
    rule: str | None
    gold: str
    timed_out: bool = False


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced_group_end(text: str, open_index: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``open_index``; ``None`` if never closed.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX and do not nest.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (stripped).

    An unclosed box (a truncated generation) is ignored, so the answer is the last *complete* box.
    Returns ``None`` when there is none or the last complete box is empty.
    """
    found = None
    for match in _BOX_COMMAND.finditer(text):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _braced_group_end(text, i)
            if end is not None:
                found = text[i + 1 : end - 1]
        elif match.group(0).startswith("\\boxed") and i > match.end():
            # "\boxed 5": the argument is the next token
            token = re.match(r"[^\s$]+", text[i:])
            if token and token.group(0).rstrip(".,;:"):
                found = token.group(0).rstrip(".,;:")
    if found is None:
        return None
    found = found.strip()
    return found or None


_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")


def _extract_gsm8k(text: str) -> str | None:
    matches = _GSM8K_ANSWER.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


_ANSWER_PHRASE = re.compile(
    r"(?:(?:the\s+)?final\s+answer|the\s+answer)\s*(?:is\s*:?|:|=)\s*(?P<a>[^\n]+)"
    r"|^[ \t*#]*answer\s*[:=]\s*(?P<b>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _clean_phrase_answer(answer: str) -> str:
    """Trim a free-text answer to its first sentence and drop markdown/math wrappers."""
    end = _SENTENCE_END.search(answer)
    if end:
        answer = answer[: end.start()]
    answer = answer.strip(" \t*")  # markdown bold around the answer or the label
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer.rstrip(",;:").strip()


def _extract_answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    for match in reversed(matches):
        answer = _clean_phrase_answer(match.group("a") or match.group("b"))
        if answer:
            return answer
    return None


# A sign only when it is not the binary minus of "7-3"; grouped thousands need exactly 3 digits.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?<!\d)(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d,]*\d)"
)


def _extract_last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_EXTRACTORS = {
    "boxed": extract_boxed,
    "gsm8k": _extract_gsm8k,
    "answer_is": _extract_answer_phrase,
    "last_number": _extract_last_number,
}


def _check_rules(rules: Iterable[str]) -> tuple[str, ...]:
    if isinstance(rules, str):
        rules = (rules,)
    rules = tuple(rules)
    unknown = [r for r in rules if r not in _EXTRACTORS]
    if unknown or not rules:
        raise ValueError(
            f"rules must be a non-empty selection of {EXTRACTION_RULES}, got {rules!r}"
        )
    return rules


def extract_answer_with_rule(
    text: str, rules: Iterable[str] = EXTRACTION_RULES
) -> ExtractedAnswer | None:
    """The final answer in ``text`` and the rule that found it, or ``None``.

    Only the rules named in ``rules`` are tried, always in the order of :data:`EXTRACTION_RULES`
    (strictest first), whatever order ``rules`` lists them in.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    allowed = _check_rules(rules)
    for rule in EXTRACTION_RULES:
        if rule in allowed:
            answer = _EXTRACTORS[rule](text)
            if answer is not None:
                return ExtractedAnswer(text=answer, rule=rule)
    return None


def extract_answer(text: str, rules: Iterable[str] = EXTRACTION_RULES) -> str | None:
    """The final answer in ``text`` (see :func:`extract_answer_with_rule`), or ``None``."""
    found = extract_answer_with_rule(text, rules)
    return None if found is None else found.text


# --------------------------------------------------------------------------------------------
# Normalisation shared with the task loaders
# --------------------------------------------------------------------------------------------

_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,(?:\\!)?\d{3})+(?:\.\d+)?")


def remove_thousands_separators(text: str) -> str:
    """``"1,000"`` -> ``"1000"`` (also MATH's ``"1,\\!000"``); anything else is returned unchanged.

    Only a whole string that is one number with correct 3-digit groups is rewritten, so a tuple
    such as ``"1,2"`` keeps its comma.
    """
    stripped = text.strip()
    if _GROUPED_NUMBER.fullmatch(stripped):
        return stripped.replace("\\!", "").replace(",", "")
    return text


_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
_SLASH_FRACTION = re.compile(r"(-?\d+)/(\d+)")


def _as_plain_number(text: str) -> tuple[Fraction, bool] | None:
    """``(value, is_integer_literal)`` for a bare number, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    text = remove_thousands_separators(text.strip())
    if text.startswith("\\$") or text.startswith("$"):
        text = text.lstrip("\\$").strip()
    if _DECIMAL.fullmatch(text):
        return Fraction(text), "." not in text
    match = _SLASH_FRACTION.fullmatch(text) or _FRAC.fullmatch(text)
    if match:
        groups = match.groups()
        sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
        numerator, denominator = int(groups[-2]), int(groups[-1])
        if denominator == 0:
            return None
        return sign * Fraction(numerator, denominator), False
    return None


_MATH_DELIMITERS = ((r"\(", r"\)"), (r"\[", r"\]"), ("$$", "$$"), ("$", "$"))
# "5 dollars", "12 apples": a number followed only by plain words of 3+ letters (units).
_NUMBER_WITH_PLAIN_UNITS = re.compile(r"(-?[\d,.]*\d(?:/\d+)?)(?:\s+[A-Za-z]{3,}\.?)+")


def _prepare_for_math_verify(answer: str) -> str:
    answer = answer.strip()
    for left, right in _MATH_DELIMITERS:
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left + right):
            answer = answer[len(left) : -len(right)].strip()
            break
    if re.match(r"\$\s*-?\d", answer):  # an unescaped dollar sign used as currency
        answer = answer[1:].strip()
    units = _NUMBER_WITH_PLAIN_UNITS.fullmatch(answer)
    if units:
        answer = units.group(1)
    return remove_thousands_separators(answer)


# --------------------------------------------------------------------------------------------
# math-verify, with a timeout that works in any thread
# --------------------------------------------------------------------------------------------


class _MathVerifyTimeoutFilter(logging.Filter):
    """math-verify warns that its timeout is disabled; we disable it on purpose and time out here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_MathVerifyTimeoutFilter())


def _parse_for_math_verify(answer: str) -> list:
    from math_verify import parse

    prepared = _prepare_for_math_verify(answer)
    if not prepared:
        return []
    # Wrapping in \boxed makes math-verify read the whole string as one answer; a string whose
    # braces do not balance cannot be boxed, so it is offered as inline math instead.
    for wrapped in (f"\\boxed{{{prepared}}}", f"${prepared}$"):
        parsed = parse(wrapped, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict with its own (signal based) timeouts switched off."""
    from math_verify import verify

    try:
        gold_parsed = _parse_for_math_verify(gold)
        pred_parsed = _parse_for_math_verify(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # math-verify/SymPy failures on odd input mean "not shown equal"
        logger.debug("math-verify failed on pred=%r gold=%r", pred, gold, exc_info=True)
        return False


class _ComparisonTimeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that math-verify's and SymPy's
    ``except Exception`` blocks cannot swallow it and carry on computing."""


def _equal_with_alarm(pred: str, gold: str, timeout: float) -> tuple[bool, bool]:
    """Main-thread path: interrupt the comparison with SIGALRM after ``timeout`` seconds.

    A timer that was already armed (pytest-timeout, a caller's own alarm) is put back with the
    time it had left, and fires promptly if it expired while we held the signal.
    """

    def on_alarm(signum, frame):
        raise _ComparisonTimeout

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    if 0 < previous_delay < timeout:
        signal.setitimer(signal.ITIMER_REAL, previous_delay)
    try:
        # The outer try also catches an alarm that lands inside the inner finally, before the
        # timer is disarmed; once disarmed, no further alarm can come.
        try:
            outcome = _math_verify_equal(pred, gold), False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ComparisonTimeout:
        outcome = False, True
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = previous_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), previous_interval)
    return outcome


_WORKER_START_TIMEOUT_S = 120.0  # importing SymPy on a loaded 2-core machine can take a while


class _GraderProcess:
    """One ``python -I grading.py`` subprocess answering comparisons as JSON lines."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        if self._read_line(_WORKER_START_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError(
                f"the grading subprocess ({sys.executable} -I {__file__}) did not start; "
                "is math-verify installed in this interpreter?"
            )

    def _read_line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return line.strip() if line else None

    def compare(self, pred: str, gold: str, timeout: float | None) -> tuple[bool, bool] | None:
        """``(equal, timed_out)``; ``None`` if the process died. Kills the process on timeout."""
        try:
            self.process.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        reply = self._read_line(timeout)
        if reply is None:
            alive = self.process.poll() is None
            self.kill()
            return (False, True) if alive else None
        return reply == "1", False

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):  # already closed by the dying process
                stream.close()


class _GraderPool:
    """Idle grader subprocesses shared by all threads; each comparison borrows one exclusively."""

    def __init__(self) -> None:
        self._idle: list[_GraderProcess] = []
        self._lock = threading.Lock()

    def compare(self, pred: str, gold: str, timeout: float | None) -> tuple[bool, bool]:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _GraderProcess()
        outcome = worker.compare(pred, gold, timeout)
        if outcome is None:  # the subprocess crashed (e.g. out of memory inside SymPy)
            logger.warning("grading subprocess died while comparing %r with %r", pred, gold)
            return False, False
        if worker.process.poll() is None:
            with self._lock:
                self._idle.append(worker)
        return outcome

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    def forget_after_fork(self) -> None:
        # A forked child must not talk to its parent's subprocesses through the copied pipes.
        self._idle = []
        self._lock = threading.Lock()


_POOL = _GraderPool()
atexit.register(_POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget_after_fork)


def _can_use_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _compare(pred: str, gold: str, timeout: float | None) -> tuple[bool, bool]:
    """``(equal, timed_out)`` for two answer strings."""
    pred_number = _as_plain_number(pred)
    gold_number = _as_plain_number(gold)
    if pred_number is not None and gold_number is not None:
        if pred_number[0] == gold_number[0]:
            return True, False
        if pred_number[1] and gold_number[1]:  # two different integers: nothing to round
            return False, False
    if timeout is None:
        return _math_verify_equal(pred, gold), False
    if _can_use_alarm():
        return _equal_with_alarm(pred, gold, timeout)
    return _POOL.compare(pred, gold, timeout)


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def is_equivalent(pred: str | None, gold: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the answer ``pred`` is mathematically equal to the gold answer ``gold``.

    Both are answer strings (``"\\frac{1}{2}"``, ``"0.5"``, ``"(1, 2)"``), not whole responses;
    use :func:`grade` for a response. ``pred=None`` (nothing extracted) is never equivalent.
    ``timeout`` bounds the SymPy work in seconds (``None``: no limit); a comparison that runs
    out of time counts as not equivalent. Safe to call from any thread.
    """
    if pred is not None and not isinstance(pred, str):
        raise TypeError(f"pred must be a str or None, got {type(pred).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    timeout = _check_timeout(timeout)
    if pred is None or not pred.strip() or not gold.strip():
        return False
    return _compare(pred, gold, timeout)[0]


def grade(
    response_text: str,
    gold: str,
    rules: Iterable[str] = EXTRACTION_RULES,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> GradeResult:
    """Extract the final answer of ``response_text`` with ``rules`` and compare it with ``gold``."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    timeout = _check_timeout(timeout)
    found = extract_answer_with_rule(response_text, rules)
    if found is None or not gold.strip():
        return GradeResult(
            correct=False,
            predicted=None if found is None else found.text,
            rule=None if found is None else found.rule,
            gold=gold,
        )
    correct, timed_out = _compare(found.text, gold, timeout)
    return GradeResult(
        correct=correct, predicted=found.text, rule=found.rule, gold=gold, timed_out=timed_out
    )


def _serve_comparisons() -> None:
    """Body of a grader subprocess: one JSON request per stdin line, "1"/"0" per stdout line."""
    import math_verify  # noqa: F401  (imported before "ready" so the first request is fast)

    # Anything SymPy or math-verify prints must not corrupt the reply stream.
    replies = sys.stdout
    sys.stdout = sys.stderr
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        equal = _math_verify_equal(request["pred"], request["gold"])
        replies.write("1\n" if equal else "0\n")
        replies.flush()


if __name__ == "__main__":
    _serve_comparisons()

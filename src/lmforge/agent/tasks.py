"""Math tasks: loaders for GSM8K- and MATH-style data, and a seeded word-problem generator.

Every source yields the same record, :class:`Problem` (id, question, gold answer string, source,
optional level, metadata), so the rollout engine and the graders never care where a task came from.

Loaders read JSONL from any local file or folder (``<folder>/<split>.jsonl``). A source that is not
a local path is treated as a Hugging Face Hub dataset id and loaded with the ``datasets`` library,
which is optional: without it, or offline, the error says to pass a local path instead.

The generator (:func:`generate_problems`) is lmforge's embedded default task: arithmetic word
problems in several *skills* (operation families, selectable by name, so that one expert can be
trained per skill and a new task can mix them) at five levels, each with an exact answer
(:class:`fractions.Fraction`) and a correct tool-integrated solution for SFT
(:func:`solution_messages`). Answers are rendered as ``str(Fraction)``: an integer (``"42"``) or a
reduced fraction (``"9/4"``). Which split a question belongs to is a hash of its text, so train,
validation and test never share a question, whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from lmforge.agent.grading import extract_answer, extract_boxed, remove_thousands_separators
from lmforge.files import read_jsonl


@dataclass(frozen=True)
class Problem:
    """One math task.

    ``answer`` is the gold *final answer* string (``"72"``, ``"\\frac{1}{2}"``), not a solution.
    ``source`` names the dataset (``"gsm8k"``, ``"math"``, ``"generated"``); ``level`` is a
    difficulty from 1 (easiest) when the source has one. ``metadata`` holds the rest: the
    reference solution, the subject, and for generated problems the skill and tool solution.
    """

    id: str
    question: str
    answer: str
    source: str
    level: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _looks_like_local_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.endswith((".jsonl", ".json"))
        or os.sep in source.rstrip(os.sep)
        and source.count("/") > 1
    )


def _hub_offline() -> bool:
    return any(
        os.environ.get(variable, "").lower() in ("1", "true", "yes")
        for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _iter_hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    hint = "pass the path of a local JSONL file (or a folder with <split>.jsonl) instead"
    if _hub_offline():
        raise RuntimeError(f"source={name!r} is not a local path and the Hub is offline; {hint}")
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"source={name!r} is not a local path, and loading it from the Hugging Face Hub needs "
            f"the optional `datasets` library, which is not installed; {hint}"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        raise RuntimeError(
            f"source={name!r} is not a local path, and loading it from the Hugging Face Hub "
            f"(config={config!r}, split={split!r}) failed: {error}; {hint}"
        ) from error
    for index, row in enumerate(rows):
        yield f"{name}[{split}] row {index}", dict(row)


def _iter_records(
    source: str | os.PathLike, split: str, hub_config: str | None
) -> tuple[str, Iterator[tuple[str, dict]]]:
    """``(name for ids, records)`` from a local file, a local folder, or the Hub."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a Hub dataset id, got {type(source).__name__}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty str, got {split!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            present = sorted(p.name for p in path.glob("*.jsonl"))
            raise FileNotFoundError(
                f"source: folder {path} has no {split}.jsonl for split={split!r} "
                f"(JSONL files there: {present or 'none'})"
            )
        return file.stem, read_jsonl(file)
    if path.is_file():
        return path.stem, read_jsonl(path)
    if isinstance(source, os.PathLike) or _looks_like_local_path(str(source)):
        raise FileNotFoundError(f"source: no such file or folder: {path}")
    return split, _iter_hub_rows(str(source), hub_config, split)


def _required_text(record: dict, names: Sequence[str], location: str) -> str:
    """The first of ``names`` present in ``record``, as a non-empty str."""
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{location}: field {name!r} must be a non-empty string, got {value!r}"
                )
            return value
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{location}: missing field {wanted} (fields present: {sorted(record)})")


def gsm8k_problem(record: dict, index: int, location: str, name: str = "gsm8k") -> Problem:
    """A :class:`Problem` from one GSM8K record ``{"question": ..., "answer": "... #### 72"}``.

    The gold answer is what grading's ``"gsm8k"`` rule extracts after the last ``####``, with
    thousands separators removed (``"1,080"`` -> ``"1080"``); the reasoning before it is kept
    as ``metadata["solution"]``.
    """
    question = _required_text(record, ("question",), location)
    answer_text = _required_text(record, ("answer",), location)
    gold = extract_answer(answer_text, rules=("gsm8k",))
    if gold is None:
        raise ValueError(f"{location}: field 'answer' has no '#### <final answer>' line")
    solution = answer_text[: answer_text.rfind("####")].strip()
    return Problem(
        id=str(record.get("id", f"gsm8k/{name}/{index}")),
        question=question.strip(),
        answer=remove_thousands_separators(gold),
        source="gsm8k",
        metadata={"solution": solution},
    )


def _math_level(value: Any, location: str) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", value, re.IGNORECASE)
        if match:
            return int(match.group(1))
        if re.fullmatch(r"\s*(?:level\s*)?\?\s*", value, re.IGNORECASE):
            return None  # a few MATH problems are labelled "Level ?"
    raise ValueError(f"{location}: field 'level' must look like 'Level 3' or 3, got {value!r}")


def math_problem(record: dict, index: int, location: str, name: str = "math") -> Problem:
    """A :class:`Problem` from one MATH-style record.

    The question is ``problem`` (or ``question``). The gold answer is ``answer`` when present,
    otherwise the last ``\\boxed{}`` of ``solution``. ``level`` ("Level 3" or 3) becomes an int;
    ``subject``/``type``, ``solution`` and ``unique_id`` go to metadata.
    """
    question = _required_text(record, ("problem", "question"), location)
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise ValueError(f"{location}: field 'answer' must be a non-empty string, got {answer!r}")
    if answer is None:
        if "solution" not in record:
            raise ValueError(
                f"{location}: missing field 'answer' or 'solution' (fields present: {sorted(record)})"
            )
        solution = _required_text(record, ("solution",), location)
        answer = extract_boxed(solution)
        if answer is None:
            raise ValueError(f"{location}: no 'answer' field and no \\boxed{{...}} in 'solution'")
    metadata = {
        key: record[key] for key in ("solution", "subject", "type", "unique_id") if key in record
    }
    return Problem(
        id=str(record.get("unique_id", record.get("id", f"math/{name}/{index}"))),
        question=question.strip(),
        answer=answer.strip(),
        source="math",
        level=_math_level(record.get("level"), location),
        metadata=metadata,
    )


def _load(
    source: str | os.PathLike,
    split: str,
    hub_config: str | None,
    limit: int | None,
    make_problem: Callable[[dict, int, str, str], Problem],
) -> list[Problem]:
    _check_limit(limit)
    name, records = _iter_records(source, split, hub_config)
    problems = []
    for index, (location, record) in enumerate(records):
        problems.append(make_problem(record, index, location, name))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"source {source!r} (split={split!r}) contains no records")
    return problems


def load_gsm8k(
    source: str | os.PathLike = "openai/gsm8k",
    split: str = "train",
    limit: int | None = None,
    hub_config: str | None = "main",
) -> list[Problem]:
    """GSM8K-style problems (``question``, ``answer`` ending in ``#### n``) as :class:`Problem`.

    ``source``: a JSONL file, a folder holding ``<split>.jsonl``, or a Hub dataset id (needs the
    optional ``datasets`` library and network). ``limit`` keeps only the first problems.
    Malformed lines raise ValueError naming the file and line.
    """
    return _load(source, split, hub_config, limit, gsm8k_problem)


def load_math(
    source: str | os.PathLike = "HuggingFaceH4/MATH-500",
    split: str = "test",
    limit: int | None = None,
    hub_config: str | None = None,
) -> list[Problem]:
    """MATH-style problems (``problem``; ``answer`` or a ``solution`` with ``\\boxed{}``).

    Same sources and errors as :func:`load_gsm8k`.
    """
    return _load(source, split, hub_config, limit, math_problem)


# --------------------------------------------------------------------------------------------
# The tool-integrated solution format
# --------------------------------------------------------------------------------------------

CODE_LANGUAGE = "python"
OUTPUT_LANGUAGE = "output"


def code_block(code: str) -> str:
    """A fenced Python block, the way the assistant asks the tool to run code."""
    return f"```{CODE_LANGUAGE}\n{code.strip()}\n```"


def output_block(output: str) -> str:
    """A fenced output block, the way the tool reports what the code printed."""
    return f"```{OUTPUT_LANGUAGE}\n{output.rstrip()}\n```"


def tool_solution_messages(
    question: str, reasoning: str, code: str, output: str, answer: str
) -> list[dict[str, str]]:
    """The chat messages of a one-call tool-integrated solution.

    user: the question; assistant: a reasoning line and a Python block; tool: the block's output;
    assistant: the final ``\\boxed{answer}``.
    """
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"{reasoning.strip()}\n\n{code_block(code)}"},
        {"role": "tool", "content": output_block(output)},
        {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."},
    ]


def solution_messages(problem: Problem) -> list[dict[str, str]]:
    """The SFT conversation of a generated problem (see :func:`tool_solution_messages`)."""
    missing = [k for k in ("reasoning", "code", "output") if k not in problem.metadata]
    if missing:
        raise ValueError(
            f"problem {problem.id!r} has no tool solution (metadata lacks {missing}); "
            "only problems from generate_problems carry one"
        )
    meta = problem.metadata
    return tool_solution_messages(
        problem.question, meta["reasoning"], meta["code"], meta["output"], problem.answer
    )


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------

SKILLS: tuple[str, ...] = ("add_sub", "mul_div", "percent", "fraction", "rate", "multi_step")
"""Operation families of the generator, selectable by name in :func:`generate_problems`."""

LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Share of all possible questions in each split, in per-mille of the question hash.
_SPLIT_PER_MILLE = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}

_NAMES = tuple(
    "Ava Ben Chloe Diego Emma Farah Gus Hana Ivan Jia Kofi Lena Mateo Nia Omar Priya Quinn Rosa Sam"
    " Tariq Uma Victor Wen Yusuf Zoe".split()
)
_ITEMS = tuple("apples marbles stickers books pencils cookies stamps shells cards beads".split())


def render_answer(value: Fraction | int) -> str:
    """The canonical answer text: ``"42"``, ``"-7"`` or a reduced fraction ``"9/4"``.

    It is exactly what ``print`` shows for the same value as an int or a Fraction, so the
    generated code's output and the boxed answer agree character for character.
    """
    return str(Fraction(value))


def split_of_question(question: str) -> str:
    """The split a question belongs to, from a hash of its text (80/10/10 train/val/test)."""
    per_mille = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 1000
    for split, (low, high) in _SPLIT_PER_MILLE.items():
        if low <= per_mille < high:
            return split
    raise AssertionError("split shares must cover 0..999")


@dataclass
class _Draft:
    """A generated problem before the split check: question, tool solution and exact answer."""

    question: str
    reasoning: str
    code: str
    answer: Fraction


def _code(lines: Iterable[str], uses_fraction: bool) -> str:
    header = ["from fractions import Fraction"] if uses_fraction else []
    return "\n".join([*header, *lines])


# Numbers grow with the level; level 1 stays with single-digit and teen numbers.
_MAGNITUDE = {1: 20, 2: 100, 3: 1000, 4: 5000, 5: 100_000}


def _draft_add_sub(rng: random.Random, level: int) -> _Draft:
    top = _MAGNITUDE[level]
    if level >= 3 and rng.random() < 0.5:
        # People compared with each other: "B has x more than A", then a total.
        people = rng.sample(_NAMES, level - 1)
        item = rng.choice(_ITEMS)
        first = rng.randint(top // 4, top)
        sentences = [f"{people[0]} has {first} {item}."]
        code = [f"{people[0].lower()} = {first}"]
        counts = [Fraction(first)]
        for previous, person in zip(people, people[1:]):
            gap = rng.randint(1, max(2, top // 5))
            if counts[-1] > gap and rng.random() < 0.5:
                sentences.append(f"{person} has {gap} fewer {item} than {previous}.")
                code.append(f"{person.lower()} = {previous.lower()} - {gap}")
                counts.append(counts[-1] - gap)
            else:
                sentences.append(f"{person} has {gap} more {item} than {previous}.")
                code.append(f"{person.lower()} = {previous.lower()} + {gap}")
                counts.append(counts[-1] + gap)
        together = {2: "both of them", 3: "the three of them", 4: "all four of them"}[len(people)]
        sentences.append(f"How many {item} do {together} have altogether?")
        code += [f"total = {' + '.join(p.lower() for p in people)}", "print(total)"]
        return _Draft(
            question=" ".join(sentences),
            reasoning="Work out each person's count from the one before, then add them all up.",
            code=_code(code, False),
            answer=sum(counts, Fraction(0)),
        )
    # A running count changed `level` times.
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    count = rng.randint(2, top)
    sentences = [f"{name} has {count} {item}."]
    code = [f"{item} = {count}"]
    gains = ("buys {n} more", "finds {n} more", "gets {n} more as a gift")
    losses = ("gives {n} to a friend", "loses {n}", "uses {n}")
    for step in range(level):
        then = "Then " if step else ""
        if count > 1 and rng.random() < 0.5:
            amount = rng.randint(1, count - 1)
            verb = rng.choice(losses).format(n=amount)
            code.append(f"{item} -= {amount}  # {verb}")
            count -= amount
        else:
            amount = rng.randint(1, top)
            verb = rng.choice(gains).format(n=amount)
            code.append(f"{item} += {amount}  # {verb}")
            count += amount
        sentences.append(f"{then}{name} {verb}.")
    sentences.append(f"How many {item} does {name} have now?")
    code.append(f"print({item})")
    return _Draft(
        question=" ".join(sentences),
        reasoning=f"Start from {name}'s {item} and apply each change in order.",
        code=_code(code, False),
        answer=Fraction(count),
    )


def _draft_mul_div(rng: random.Random, level: int) -> _Draft:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if level == 1:
        if rng.random() < 0.5:
            packs, per_pack = rng.randint(2, 9), rng.randint(2, 9)
            return _Draft(
                question=f"{name} buys {packs} packs of {item} with {per_pack} {item} in each "
                f"pack. How many {item} does {name} buy?",
                reasoning="Multiply the number of packs by the number in each pack.",
                code=_code(
                    [f"packs = {packs}", f"per_pack = {per_pack}", "print(packs * per_pack)"], False
                ),
                answer=Fraction(packs * per_pack),
            )
        friends, each = rng.randint(2, 9), rng.randint(2, 9)
        return _Draft(
            question=f"{name} shares {friends * each} {item} equally among {friends} friends. "
            f"How many {item} does each friend get?",
            reasoning="Divide the total equally by the number of friends.",
            code=_code(
                [f"total = {friends * each}", f"friends = {friends}", "print(total // friends)"],
                False,
            ),
            answer=Fraction(each),
        )
    if level == 2:
        boxes, per_box, loose = rng.randint(3, 12), rng.randint(6, 24), rng.randint(1, 30)
        return _Draft(
            question=f"{name} has {boxes} boxes of {item} with {per_box} in each box, plus "
            f"{loose} loose {item}. How many {item} does {name} have in total?",
            reasoning="Multiply boxes by the number per box, then add the loose ones.",
            code=_code(
                [
                    f"boxes = {boxes}",
                    f"per_box = {per_box}",
                    f"loose = {loose}",
                    "print(boxes * per_box + loose)",
                ],
                False,
            ),
            answer=Fraction(boxes * per_box + loose),
        )
    if level == 3:
        count, price = rng.randint(3, 15), rng.randint(2, 40)
        cost = count * price
        bill = next(b for b in (20, 50, 100, 200, 500, 1000) if b >= cost + 1)
        return _Draft(
            question=f"{name} buys {count} notebooks at ${price} each and pays with a ${bill} "
            f"bill. How many dollars of change does {name} get?",
            reasoning="The cost is count times price; the change is the bill minus the cost.",
            code=_code(
                [f"cost = {count} * {price}", f"change = {bill} - cost", "print(change)"], False
            ),
            answer=Fraction(bill - cost),
        )
    if level == 4:
        stores = rng.randint(2, 8)
        crates, per_crate = stores * rng.randint(2, 10), rng.randint(6, 30)
        per_store = crates * per_crate // stores
        sold = rng.randint(2, per_store - 1)
        return _Draft(
            question=f"A warehouse receives {crates} crates with {per_crate} bottles in each crate. "
            f"The bottles are split equally among {stores} stores, and each store sells {sold} "
            f"bottles. How many bottles does each store have left?",
            reasoning="Find the total bottles, split them among the stores, then subtract the sales.",
            code=_code(
                [
                    f"total = {crates} * {per_crate}",
                    f"per_store = total // {stores}",
                    f"left = per_store - {sold}",
                    "print(left)",
                ],
                False,
            ),
            answer=Fraction(per_store - sold),
        )
    box_size = rng.choice((6, 8, 12, 20, 24, 25, 50))
    per_hour = box_size * rng.randint(5, 60)
    hours, days = rng.randint(6, 12), rng.randint(5, 30)
    return _Draft(
        question=f"A factory makes {per_hour} toys per hour, {hours} hours a day, for {days} days. "
        f"The toys are packed in boxes of {box_size}. How many boxes are filled?",
        reasoning="Total toys are rate times hours times days; divide by the box size.",
        code=_code(
            [
                f"toys = {per_hour} * {hours} * {days}",
                f"boxes = toys // {box_size}",
                "print(boxes)",
            ],
            False,
        ),
        answer=Fraction(per_hour * hours * days, box_size),
    )


def _multiple_making_whole(rng: random.Random, factor: Fraction, low: int, high: int) -> int:
    """A random ``n`` in about [low, high] with ``n * factor`` a whole number."""
    step = factor.denominator
    n = rng.randint(max(1, low // step), max(1, high // step)) * step
    return n


_PERCENT_CONTEXTS = (
    ("students", "walk to school"),
    ("books", "are novels"),
    ("cars", "are red"),
    ("trees", "are oaks"),
    ("emails", "are spam"),
    ("tickets", "are sold online"),
    ("eggs", "are brown"),
    ("songs", "are in English"),
)
_PRODUCTS = ("jacket", "bike", "lamp", "backpack", "watch", "tent", "guitar", "printer")


def _draft_percent(rng: random.Random, level: int) -> _Draft:
    name = rng.choice(_NAMES)
    if level == 1:
        percent = rng.choice((10, 20, 25, 50, 75))
        whole, part = rng.choice(_PERCENT_CONTEXTS)
        count = _multiple_making_whole(rng, Fraction(percent, 100), 4, 200)
        return _Draft(
            question=f"{name} counts {count} {whole}, and {percent}% of them {part}. "
            f"How many of the {whole} {part}?",
            reasoning=f"Take {percent}% of the {count} {whole}.",
            code=_code(
                [f"total = {count}", f"part = total * Fraction({percent}, 100)", "print(part)"],
                True,
            ),
            answer=count * Fraction(percent, 100),
        )
    if level == 2:
        percent = rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
        price = _multiple_making_whole(rng, Fraction(percent, 100), 20, 1000)
        product = rng.choice(_PRODUCTS)
        return _Draft(
            question=f"A {product} costs ${price}. It is on sale for {percent}% off. "
            f"What is the sale price in dollars?",
            reasoning="Subtract the discount, which is the percentage of the price.",
            code=_code(
                [
                    f"price = {price}",
                    f"discount = price * Fraction({percent}, 100)",
                    "print(price - discount)",
                ],
                True,
            ),
            answer=price * (1 - Fraction(percent, 100)),
        )
    if level == 3:
        first, second = rng.choice((5, 10, 20, 25)), rng.choice((4, 5, 10, 20))
        factor = (1 + Fraction(first, 100)) * (1 + Fraction(second, 100))
        rent = _multiple_making_whole(rng, factor, 400, 3000)
        return _Draft(
            question=f"{name}'s monthly rent is ${rent}. It goes up by {first}% one year and "
            f"then by {second}% the next year. What is the monthly rent, in dollars, after the "
            f"two increases?",
            reasoning="Apply the first increase, then the second increase to the new rent.",
            code=_code(
                [
                    f"rent = {rent}",
                    f"rent = rent * (1 + Fraction({first}, 100))",
                    f"rent = rent * (1 + Fraction({second}, 100))",
                    "print(rent)",
                ],
                True,
            ),
            answer=rent * factor,
        )
    if level == 4:
        if rng.random() < 0.5:
            tip, tax = rng.choice((10, 15, 18, 20)), rng.choice((5, 6, 8, 10))
            meal = _multiple_making_whole(rng, Fraction(tip + tax, 100), 20, 500)
            return _Draft(
                question=f"A dinner costs ${meal}. {name} adds a {tip}% tip and pays {tax}% tax, "
                f"both on the price of the dinner. How many dollars does {name} pay in total?",
                reasoning="Add the tip and the tax, each a percentage of the dinner price.",
                code=_code(
                    [
                        f"meal = {meal}",
                        f"tip = meal * Fraction({tip}, 100)",
                        f"tax = meal * Fraction({tax}, 100)",
                        "print(meal + tip + tax)",
                    ],
                    True,
                ),
                answer=meal * (1 + Fraction(tip + tax, 100)),
            )
        total = rng.choice((20, 25, 40, 50, 80, 200, 250, 400, 500))
        passed = rng.randint(1, total - 1)
        while (passed * 100) % total:
            passed = rng.randint(1, total - 1)
        return _Draft(
            question=f"{passed} out of {total} students passed a test. What percent of the "
            f"students passed?",
            reasoning="Divide those who passed by the total and multiply by 100.",
            code=_code([f"percent = Fraction({passed}, {total}) * 100", "print(percent)"], True),
            answer=Fraction(passed, total) * 100,
        )
    rent, food, transport = (
        rng.choice((20, 25, 30, 40)),
        rng.choice((10, 20, 25, 50)),
        rng.choice((10, 20, 25)),
    )
    factor = (1 - Fraction(rent, 100)) * (1 - Fraction(food, 100)) * (1 - Fraction(transport, 100))
    salary = _multiple_making_whole(rng, factor, 2000, 60000)
    return _Draft(
        question=f"{name} earns ${salary} a month, spends {rent}% of it on rent, then {food}% of "
        f"what is left on food, then {transport}% of what remains after that on transport. "
        f"How many dollars does {name} save each month?",
        reasoning="Each percentage applies to what is left after the previous expense.",
        code=_code(
            [
                f"money = {salary}",
                f"money -= money * Fraction({rent}, 100)  # rent",
                f"money -= money * Fraction({food}, 100)  # food",
                f"money -= money * Fraction({transport}, 100)  # transport",
                "print(money)",
            ],
            True,
        ),
        answer=salary * factor,
    )


def _fraction_text(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def _proper_fraction(rng: random.Random, max_denominator: int) -> Fraction:
    denominator = rng.randint(2, max_denominator)
    return Fraction(rng.randint(1, denominator - 1), denominator)


def _draft_fraction(rng: random.Random, level: int) -> _Draft:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if level == 1:
        parts = rng.randint(2, 5)
        count = parts * rng.randint(1, 6)
        return _Draft(
            question=f"{name} has {count} {item} and gives 1/{parts} of them to a friend. "
            f"How many {item} does {name} give away?",
            reasoning=f"Divide the {item} into {parts} equal parts and take one part.",
            code=_code(
                [f"{item} = {count}", f"given = {item} * Fraction(1, {parts})", "print(given)"],
                True,
            ),
            answer=Fraction(count, parts),
        )
    if level == 2:
        share = _proper_fraction(rng, 8)
        count = share.denominator * rng.randint(2, 12)
        return _Draft(
            question=f"A jar holds {count} {item}. {name} takes {_fraction_text(share)} of them. "
            f"How many {item} are left in the jar?",
            reasoning="Work out how many were taken, then subtract from the jar's total.",
            code=_code(
                [
                    f"{item} = {count}",
                    f"taken = {item} * Fraction({share.numerator}, {share.denominator})",
                    f"print({item} - taken)",
                ],
                True,
            ),
            answer=count - count * share,
        )
    if level == 3:
        per_batch = Fraction(rng.randint(1, 7), rng.choice((2, 3, 4, 8)))
        batches = rng.randint(2, 9)
        return _Draft(
            question=f"A recipe needs {_fraction_text(per_batch)} cup of flour per batch. "
            f"{name} makes {batches} batches. How many cups of flour does {name} use? "
            f"Give the answer as a fraction in lowest terms if it is not whole.",
            reasoning="Multiply the flour per batch by the number of batches, exactly.",
            code=_code(
                [
                    f"per_batch = Fraction({per_batch.numerator}, {per_batch.denominator})",
                    f"print(per_batch * {batches})",
                ],
                True,
            ),
            answer=per_batch * batches,
        )
    if level == 4:
        days = ("Monday", "Tuesday", "Wednesday")
        walks = [_proper_fraction(rng, 6) for _ in days]
        trips = ", ".join(f"{_fraction_text(w)} of a mile on {d}" for w, d in zip(walks, days))
        return _Draft(
            question=f"{name} walks {trips}. How many miles does {name} walk in total? "
            f"Give the answer as a fraction in lowest terms if it is not whole.",
            reasoning="Add the three distances as exact fractions.",
            code=_code(
                [
                    f"walks = [{', '.join(f'Fraction({w.numerator}, {w.denominator})' for w in walks)}]",
                    "print(sum(walks))",
                ],
                True,
            ),
            answer=sum(walks, Fraction(0)),
        )
    full, used = _proper_fraction(rng, 6), _proper_fraction(rng, 5)
    capacity = full.denominator * used.denominator * rng.randint(2, 40)
    water = capacity * full * (1 - used)
    added = rng.randint(1, int(capacity - water))
    return _Draft(
        question=f"A tank holds {capacity} liters and is {_fraction_text(full)} full. "
        f"{name} uses {_fraction_text(used)} of the water in it and then adds {added} liters. "
        f"What fraction of the tank is full now? Give the answer in lowest terms.",
        reasoning="Track the liters of water, then divide by the tank's capacity.",
        code=_code(
            [
                f"capacity = {capacity}",
                f"water = capacity * Fraction({full.numerator}, {full.denominator})",
                f"water -= water * Fraction({used.numerator}, {used.denominator})",
                f"water += {added}",
                "print(water / capacity)",
            ],
            True,
        ),
        answer=(water + added) / capacity,
    )


_MACHINES = (
    ("printer", "pages"),
    ("bakery oven", "rolls"),
    ("bottling machine", "bottles"),
    ("press", "cans"),
    ("loom", "scarves"),
    ("robot", "boxes"),
)


_CONVERSIONS = (
    (
        "hours",
        "minutes",
        60,
        "{name} reads for {big} hours and {small} minutes.",
        "How many minutes does {name} read?",
    ),
    (
        "kilograms",
        "grams",
        1000,
        "{name} buys a bag of flour weighing {big} kilograms and {small} grams.",
        "How many grams of flour is that?",
    ),
    (
        "meters",
        "centimeters",
        100,
        "{name} cuts a rope {big} meters and {small} centimeters long.",
        "How many centimeters long is the rope?",
    ),
    (
        "minutes",
        "seconds",
        60,
        "{name} runs a race in {big} minutes and {small} seconds.",
        "How many seconds does the race take {name}?",
    ),
)


def _draft_rate(rng: random.Random, level: int) -> _Draft:
    name = rng.choice(_NAMES)
    if level == 1:
        rate, minutes = rng.randint(2, 12), rng.randint(2, 9)
        machine, thing = rng.choice(_MACHINES)
        return _Draft(
            question=f"{name}'s {machine} makes {rate} {thing} per minute. How many {thing} does "
            f"it make in {minutes} minutes?",
            reasoning="Multiply the rate by the time.",
            code=_code([f"rate = {rate}", f"minutes = {minutes}", "print(rate * minutes)"], False),
            answer=Fraction(rate * minutes),
        )
    if level == 2:
        big_name, small_name, ratio, story, ask = rng.choice(_CONVERSIONS)
        big, small = rng.randint(1, 9), rng.randint(1, ratio - 1)
        return _Draft(
            question=story.format(name=name, big=big, small=small) + " " + ask.format(name=name),
            reasoning=f"Convert the {big_name} to {small_name} ({ratio} each) and add the rest.",
            code=_code([f"total = {big} * {ratio} + {small}", "print(total)"], False),
            answer=Fraction(big * ratio + small),
        )
    if level == 3:
        per_minute, hours = rng.randint(3, 40), rng.randint(2, 12)
        machine, thing = rng.choice(_MACHINES)
        return _Draft(
            question=f"A {machine} makes {per_minute} {thing} every minute. How many {thing} does "
            f"it make in {hours} hours?",
            reasoning="Convert hours to minutes, then multiply by the rate.",
            code=_code(
                [f"minutes = {hours} * 60", f"made = {per_minute} * minutes", "print(made)"], False
            ),
            answer=Fraction(per_minute * 60 * hours),
        )
    if level == 4:
        while True:
            t1, t2 = rng.randint(1, 5), rng.randint(1, 5)
            v1, v2 = rng.randrange(40, 95, 5), rng.randrange(40, 95, 5)
            if (v1 * t1 + v2 * t2) % (t1 + t2) == 0:
                break
        d1, d2 = v1 * t1, v2 * t2
        return _Draft(
            question=f"{name} drives {d1} km in {t1} hours and then {d2} km in {t2} hours. "
            f"What is the average speed for the whole trip, in km per hour?",
            reasoning="Average speed is the total distance divided by the total time.",
            code=_code(
                [
                    f"distance = {d1} + {d2}",
                    f"hours = {t1} + {t2}",
                    "print(Fraction(distance, hours))",
                ],
                True,
            ),
            answer=Fraction(d1 + d2, t1 + t2),
        )
    while True:
        a, b = rng.randint(2, 24), rng.randint(2, 24)
        if a != b and (60 * a * b) % (a + b) == 0:
            break
    other = rng.choice([n for n in _NAMES if n != name])
    job = rng.choice(
        (
            "paint a fence",
            "mow a field",
            "fill a pool",
            "sort a pile of letters",
            "wash the windows",
        )
    )
    return _Draft(
        question=f"{name} can {job} alone in {a} hours, and {other} can do it alone in {b} "
        f"hours. How many minutes do they take to do it together?",
        reasoning="Add the two work rates (jobs per hour), invert, and convert to minutes.",
        code=_code(
            [
                f"rate = Fraction(1, {a}) + Fraction(1, {b})",
                "hours = 1 / rate",
                "print(hours * 60)",
            ],
            True,
        ),
        answer=60 / (Fraction(1, a) + Fraction(1, b)),
    )


def _draft_multi_step(rng: random.Random, level: int) -> _Draft:
    """A running amount of money through several different operations (a mix of skills)."""
    name = rng.choice(_NAMES)
    money = Fraction(rng.randint(2, _MAGNITUDE[level] // 2) * 4)
    sentences = [f"{name} has ${render_answer(money)}."]
    code = [f"money = {render_answer(money)}"]
    uses_fraction = False
    # Each stretch of five steps uses every kind of operation once, in a random order, so the
    # higher levels really mix addition, subtraction, multiplication, fractions and percentages.
    kinds = ("earn", "spend", "double", "give_fraction", "spend_percent")
    plan = [kind for _ in range(2) for kind in rng.sample(kinds, len(kinds))]
    for step, kind in enumerate(plan[: level + 1]):
        then = "Then " if step else ""
        if kind == "earn":
            amount = rng.randint(1, _MAGNITUDE[level])
            sentences.append(f"{then}{name} earns ${amount} doing chores.")
            code.append(f"money += {amount}  # earns")
            money += amount
            continue
        if kind == "spend" and money > 1:
            amount = rng.randint(1, int(money) - 1)
            sentences.append(f"{then}{name} spends ${amount} on a book.")
            code.append(f"money -= {amount}  # spends")
            money -= amount
            continue
        if kind == "double":
            sentences.append(f"{then}{name}'s money doubles after selling old toys.")
            code.append("money *= 2  # doubles")
            money *= 2
            continue
        parts = [k for k in (2, 3, 4, 5) if money % k == 0]
        percents = [p for p in (10, 20, 25, 50) if (money * p) % 100 == 0]
        if kind == "give_fraction" and parts:
            k = rng.choice(parts)
            sentences.append(f"{then}{name} gives 1/{k} of the money to a sister.")
            code.append(f"money -= money * Fraction(1, {k})  # gives 1/{k} away")
            money -= money / k
        elif percents:
            p = rng.choice(percents)
            sentences.append(f"{then}{name} spends {p}% of the money on a gift.")
            code.append(f"money -= money * Fraction({p}, 100)  # spends {p}%")
            money -= money * p / 100
        else:
            amount = rng.randint(1, _MAGNITUDE[level])
            sentences.append(f"{then}{name} earns ${amount} doing chores.")
            code.append(f"money += {amount}  # earns")
            money += amount
            continue
        uses_fraction = True
    sentences.append(f"How many dollars does {name} have now?")
    code.append("print(money)")
    return _Draft(
        question=" ".join(sentences),
        reasoning=f"Follow {name}'s money through each step in order, keeping it exact.",
        code=_code(code, uses_fraction),
        answer=money,
    )


_DRAFTERS: dict[str, Callable[[random.Random, int], _Draft]] = {
    "add_sub": _draft_add_sub,
    "mul_div": _draft_mul_div,
    "percent": _draft_percent,
    "fraction": _draft_fraction,
    "rate": _draft_rate,
    "multi_step": _draft_multi_step,
}

_MAX_TRIES_PER_PROBLEM = 500


def _check_choice(name: str, given: Iterable | None, allowed: Sequence) -> tuple:
    if given is None:
        return tuple(allowed)
    if isinstance(given, (str, int)):
        given = (given,)
    chosen = tuple(dict.fromkeys(given))  # drop repeats, keep order
    unknown = [g for g in chosen if g not in allowed]
    if unknown or not chosen:
        raise ValueError(f"{name} must be a non-empty selection of {tuple(allowed)}, got {given!r}")
    return chosen


def generate_problems(
    n: int,
    *,
    skills: Iterable[str] | str | None = None,
    levels: Iterable[int] | int | None = None,
    split: str = "train",
    seed: int = 0,
) -> list[Problem]:
    """``n`` distinct generated word problems of ``split`` with exact answers and tool solutions.

    ``skills`` (names from :data:`SKILLS`) and ``levels`` (from :data:`LEVELS`) default to all;
    the problems cycle through every (skill, level) pair in a seeded order, so each pair gets
    ``n / (len(skills) * len(levels))`` problems, give or take one. The result is a function of
    the arguments only, and a prefix of a longer request with the same arguments.
    ``metadata`` holds ``skill``, ``split``, ``reasoning``, ``code`` and ``output``; the output
    is what the code prints, equal to ``answer``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    skills = _check_choice("skills", skills, SKILLS)
    levels = _check_choice("levels", levels, LEVELS)
    pairs = [(skill, level) for skill in skills for level in levels]

    problems: list[Problem] = []
    seen: set[str] = set()
    for index in range(n):
        block, position = divmod(index, len(pairs))
        # Each block of len(pairs) problems visits every pair once, in its own seeded order.
        order = random.Random(f"lmforge-tasks:{seed}:{split}:block:{block}").sample(
            pairs, len(pairs)
        )
        skill, level = order[position]
        rng = random.Random(f"lmforge-tasks:{seed}:{split}:problem:{index}")
        for _ in range(_MAX_TRIES_PER_PROBLEM):
            draft = _DRAFTERS[skill](rng, level)
            if draft.question not in seen and split_of_question(draft.question) == split:
                break
        else:
            raise ValueError(
                f"could not find a new {split} question for skill={skill!r} level={level} after "
                f"{_MAX_TRIES_PER_PROBLEM} tries ({len(problems)} made); ask for fewer problems"
            )
        seen.add(draft.question)
        answer = render_answer(draft.answer)
        digest = hashlib.sha256(draft.question.encode("utf-8")).hexdigest()[:12]
        problems.append(
            Problem(
                id=f"gen-{skill}-L{level}-{digest}",
                question=draft.question,
                answer=answer,
                source="generated",
                level=level,
                metadata={
                    "skill": skill,
                    "split": split,
                    "reasoning": draft.reasoning,
                    "code": draft.code,
                    # print() of the final int/Fraction shows exactly render_answer(value).
                    "output": answer,
                },
            )
        )
    return problems

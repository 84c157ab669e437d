"""Small file helpers every command shares: atomic writes and JSONL records with locations."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Have ``write(temporary)`` write the file under a temporary name in the same folder, then rename it to
    ``path``: a crash never leaves half a file, and concurrent writers never expose one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary name in the same folder, so a crash never leaves half of it."""
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` per non-blank line, ``location`` being ``"file:line"`` for error messages.

    A line that is not a JSON object raises ValueError naming the file and line.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{location}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
            yield location, record

"""Command configs: one dataclass per command, loadable from YAML/JSON, overridable from the CLI.

The same dataclass is the argument of the Python API, so the CLI adds nothing the library can't do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parser_for(tp):
    """An argparse type for a field annotation (scalars, optional scalars and lists/tuples of them)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _parser_for(args[0])
    if origin in (list, tuple):
        inner = _parser_for(args[0]) if args else (str, None)
        return inner[0], "+"
    if tp is bool:
        return (lambda s: s.lower() in ("1", "true", "yes", "on")), None
    if tp in (int, float, str):
        return tp, None
    return str, None


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """--config FILE plus one --option per dataclass field (default: unset, so the file or dataclass wins)."""
    parser.add_argument("--config", help="YAML or JSON file with options; flags given here override it")
    for name, tp in _field_types(cls).items():
        conv, nargs = _parser_for(tp)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=conv, nargs=nargs,
                            default=argparse.SUPPRESS, help=f"(default: {_default_of(cls, name)!r})")


def _default_of(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_config(cls, file_values: dict | None = None, overrides: dict | None = None):
    """cls(**defaults | file_values | overrides), rejecting unknown option names clearly."""
    values = dict(file_values or {})
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    types = _field_types(cls)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(types[name]) is tuple:
            values[name] = tuple(value)
    return cls(**values)


def config_from_args(cls, args: argparse.Namespace):
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cls)}}
    return build_config(cls, file_values, overrides)


# Validation of config fields, shared by the commands' __post_init__ checks.


def check_choice(name: str, value: Any, options: Sequence[str]) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """TypeError unless ``value`` is an int (bools refused); ValueError if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_optional_string(name: str, value: Any) -> None:
    """TypeError unless ``value`` is None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{name} must be None or a non-empty string, got {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """TypeError unless ``value`` is a finite real number; ValueError outside [low, high] (open ends on request)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def check_resumable(run_dir: Path, checkpoint: Path | None, *, resume: bool, current: Mapping[str, Any],
                    identity_fields: Sequence[str], config_file: str = "config.yaml",
                    what: str = "settings") -> None:
    """Refuse to start over a run folder that holds ``checkpoint`` unless ``resume``, and refuse to resume it
    when one of ``identity_fields`` differs between the saved ``config_file`` and ``current`` (the options
    that define the run, e.g. data and model; ``what`` names them in the error)."""
    if checkpoint is None:
        return
    if not resume:
        raise ValueError(f"output_dir {run_dir} already holds checkpoints ({checkpoint.name}) and resume=False; "
                         f"pass resume=True to continue that run or choose a new output_dir")
    saved_path = Path(run_dir) / config_file
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    changed = [name for name in identity_fields if name in saved and saved[name] != current[name]]
    if changed:
        details = ", ".join(f"{name}: {saved[name]!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"cannot resume the run in {run_dir} with different {what} ({details}); use a new "
                         f"output_dir or restore those options")

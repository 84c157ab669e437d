"""``lmforge agent eval``: accuracy of the tool-integrated agent on held-out problems.

Runs greedy rollouts (one trajectory per problem, temperature 0) for accuracy and, with
``samples > 0``, sampled rollouts for pass@k, then summarises: accuracy, pass@k (the unbiased
estimator of Chen et al. 2021 from n samples per problem), share of trajectories that called the
tool, mean tool calls, tool error rate, unanswered rate, and accuracy per difficulty level. The run
folder holds the trajectories (JSONL, streamed by the rollout engine, so a crash resumes), metrics.json,
report.md and accuracy.png.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from lmforge.config import add_config_arguments, config_from_args
from lmforge.files import write_text_atomic


@dataclasses.dataclass
class EvalConfig:
    """Options of ``lmforge agent eval``."""

    model: str | None = None  # None = the embedded default
    adapter: str | None = None  # a PEFT LoRA folder to evaluate on top of the model
    data: str | None = None  # GSM8K- or MATH-style JSONL; None = generated problems
    n_problems: int = 100
    split: str = "test"  # split of the generated problems
    levels: list[int] | None = None
    skills: list[str] | None = None
    samples: int = 0  # samples per problem for pass@k (0: greedy only)
    pass_k: list[int] = dataclasses.field(default_factory=lambda: [1, 4])
    temperature: float = 1.0
    max_tool_calls: int = 6
    max_new_tokens_per_turn: int = 256
    max_total_tokens: int = 1536
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    output_dir: str = "runs/agent-eval"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarise(greedy: Sequence[Any], sampled: Sequence[Any] = (), *, levels: dict | None = None,
              ks: Sequence[int] = (1,)) -> dict:
    """Metrics of graded trajectories (lmforge.agent.format.Trajectory or objects with the same fields)."""
    if not greedy:
        raise ValueError("no trajectories to summarise")
    calls = [len(t.tool_calls) for t in greedy]
    failed = sum(1 for t in greedy for call in t.tool_calls if not call.get("ok", False))
    metrics = dict(
        n=len(greedy),
        accuracy=sum(bool(t.correct) for t in greedy) / len(greedy),
        tool_use_rate=sum(c > 0 for c in calls) / len(greedy),
        mean_tool_calls=sum(calls) / len(greedy),
        tool_error_rate=failed / max(1, sum(calls)),
        unanswered_rate=sum(t.predicted is None for t in greedy) / len(greedy),
    )
    if levels:
        by_level = collections.defaultdict(list)
        for t in greedy:
            by_level[levels.get(t.problem_id)].append(bool(t.correct))
        metrics["accuracy_by_level"] = {str(k): sum(v) / len(v) for k, v in sorted(by_level.items(), key=str)}
    if sampled:
        per_problem = collections.defaultdict(list)
        for t in sampled:
            per_problem[t.problem_id].append(bool(t.correct))
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_problem.values()) / len(per_problem)
    return metrics


def _problems(config: EvalConfig):
    from lmforge.agent import tasks

    if config.data is None:
        return tasks.generate_problems(config.n_problems, skills=config.skills, levels=config.levels,
                                       split=config.split, seed=config.seed)
    text = Path(config.data).read_text(encoding="utf-8", errors="replace")[:4096]
    loader = tasks.load_math if '"problem"' in text else tasks.load_gsm8k
    return loader(config.data, limit=config.n_problems)


def run_eval(config: EvalConfig, *, model=None, tokenizer=None) -> dict:
    """Evaluate; pass ``model``/``tokenizer`` to reuse a loaded model (the adapter option is then ignored)."""
    from lmforge.agent.rollout import RolloutConfig, TransformersBackend, run_rollouts
    from lmforge.models.loading import load_model, resolve_device

    if config.samples and max(config.pass_k) > config.samples:
        raise ValueError(f"pass_k {config.pass_k} needs samples >= {max(config.pass_k)}, got {config.samples}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        device = resolve_device("cuda" if config.device == "auto" and _cuda() else
                                ("cpu" if config.device == "auto" else config.device))
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device, lora=config.adapter)
    model.eval()
    problems = _problems(config)
    backend = TransformersBackend(model, tokenizer)
    tool_role = "tool" if _renders_tool(tokenizer) else "user"
    common = dict(max_tool_calls=config.max_tool_calls, max_new_tokens_per_turn=config.max_new_tokens_per_turn,
                  max_total_tokens=config.max_total_tokens, batch_size=config.batch_size, seed=config.seed,
                  tool_role=tool_role)
    greedy = run_rollouts(problems, backend, tokenizer, RolloutConfig(
        samples_per_problem=1, temperature=0.0, output_path=str(out / "greedy.jsonl"), **common))
    sampled = []
    if config.samples:
        sampled = run_rollouts(problems, backend, tokenizer, RolloutConfig(
            samples_per_problem=config.samples, temperature=config.temperature,
            output_path=str(out / "sampled.jsonl"), **common))
    levels = {p.id: p.level for p in problems}
    metrics = summarise(greedy, sampled, levels=levels, ks=config.pass_k if sampled else ())
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    _plot(metrics, out / "accuracy.png")
    write_text_atomic(out / "report.md", _report(config, metrics))
    metrics["output_dir"] = str(out)
    return metrics


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _renders_tool(tokenizer) -> bool:
    from lmforge.models.sft import template_renders_tool_role

    return template_renders_tool_role(tokenizer)


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_level = metrics.get("accuracy_by_level", {})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["all"] + [f"level {k}" for k in by_level]
    values = [metrics["accuracy"]] + list(by_level.values())
    ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * len(by_level))
    ax.set_ylim(0, 1)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"agent eval: {metrics['n']} problems, tool use {metrics['tool_use_rate']:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(config: EvalConfig, metrics: dict) -> str:
    rows = [f"| {k} | {v:.3f} |" for k, v in metrics.items() if isinstance(v, float)]
    levels = metrics.get("accuracy_by_level", {})
    return "\n".join([
        "# Agent evaluation", "",
        f"Model: {config.model or 'embedded SmolLM2-135M-Instruct'}"
        + (f" + adapter {config.adapter}" if config.adapter else ""),
        f"Problems: {metrics['n']} ({config.data or f'generated, split {config.split}'}); "
        f"greedy rollouts, up to {config.max_tool_calls} tool calls.", "",
        "| metric | value |", "|---|---:|", *rows, "",
        "| level | greedy accuracy |", "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in levels.items()], "",
        "![accuracy](accuracy.png)", "",
    ])


def add_agent_cli(subparsers):
    agent = subparsers.add_parser("agent", help="the tool-integrated math agent").add_subparsers(
        dest="agent_command", required=True)
    parser = agent.add_parser("eval", help="accuracy, pass@k and tool use on held-out problems")
    add_config_arguments(parser, EvalConfig)

    def run(args):
        metrics = run_eval(config_from_args(EvalConfig, args))
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
        print(f"report: {metrics['output_dir']}/report.md")
        return 0

    parser.set_defaults(func=run)
    return parser

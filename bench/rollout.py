"""Batched vs one-at-a-time rollouts of the embedded SmolLM2-135M-Instruct on the CPU.

Both modes run the same rollout loop (lmforge.agent.rollout.run_rollouts) on the same generated
problems with the same sampling settings, token budgets, tool-call limit and seed; only
``batch_size`` differs (B trajectories generated together, for each B of ``--batch-sizes``, vs 1). Throughput is policy tokens (the
tokens the model sampled, mask 1) per second of wall time, code execution and grading included.
The prompt asks for a Python code block, so trajectories exercise the tool path.

Prints a table and writes bench/results/rollout_cpu.json. The target is a speed-up >= 4x at the
largest batch size.

    python bench/rollout.py [--problems 16] [--samples 4] [--batch-sizes 16 32 64]
                            [--max-new-tokens 64] [--threads 1] [--output bench/results/rollout_cpu.json]

``--threads`` sets torch's intra-op threads (default 1: on a small shared machine, more threads
than idle cores make every matmul wait on the slowest thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.agent.rollout import RolloutConfig, TransformersBackend, run_rollouts
from lmforge.agent.sandbox import Sandbox, SandboxConfig
from lmforge.agent.tasks import generate_problems
from lmforge.models.loading import load_model

USER_TEMPLATE = (
    "Write a Python code block that prints the answer to this problem, then give the answer as "
    "\\boxed{answer}.\n\n{question}"
)


def measure(problems, model, tokenizer, config: RolloutConfig, sandbox: Sandbox) -> dict:
    backend = TransformersBackend(model, tokenizer)
    load = os.getloadavg()[0]  # other work on the machine slows both modes; recorded per run
    started = time.perf_counter()
    trajectories = run_rollouts(problems, backend, tokenizer, config, sandbox=sandbox)
    elapsed = time.perf_counter() - started
    policy_tokens = sum(t.num_policy_tokens for t in trajectories)
    return {
        "batch_size": config.batch_size,
        "trajectories": len(trajectories),
        "policy_tokens": policy_tokens,
        "total_tokens": sum(len(t.input_ids) for t in trajectories),
        "tool_calls": sum(len(t.tool_calls) for t in trajectories),
        "correct": sum(bool(t.correct) for t in trajectories),
        "finish_reasons": {r: sum(t.finish_reason == r for t in trajectories)
                           for r in sorted({t.finish_reason for t in trajectories})},
        "seconds": round(elapsed, 2),
        "policy_tokens_per_s": round(policy_tokens / elapsed, 2),
        "load_average_1min_at_start": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per turn")
    parser.add_argument("--max-total-tokens", type=int, default=512)
    parser.add_argument("--max-tool-calls", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results/rollout_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None)
    problems = generate_problems(args.problems, split="test", seed=args.seed)
    common = dict(samples_per_problem=args.samples, temperature=args.temperature, top_p=1.0, seed=args.seed,
                  max_new_tokens_per_turn=args.max_new_tokens, max_total_tokens=args.max_total_tokens,
                  max_tool_calls=args.max_tool_calls, user_template=USER_TEMPLATE, progress=True)
    load_before = os.getloadavg()[0]
    results = {}
    workers = max(args.batch_sizes)
    with Sandbox(SandboxConfig(num_workers=workers, preload_modules=("math", "fractions"))) as sandbox:
        for batch_size in [1, *args.batch_sizes]:
            config = RolloutConfig(batch_size=batch_size, **common)
            name = "one_at_a_time" if batch_size == 1 else f"batched_{batch_size}"
            results[name] = measure(problems, model, tokenizer, config, sandbox)
    single = results["one_at_a_time"]["policy_tokens_per_s"]
    for row in results.values():
        row["speedup"] = round(row["policy_tokens_per_s"] / single, 2)
    speedup = results[f"batched_{max(args.batch_sizes)}"]["speedup"]

    header = (f"{'mode':<14} {'batch':>5} {'traj':>5} {'policy tok':>10} {'tool calls':>10} {'seconds':>8} "
              f"{'tok/s':>8} {'speed-up':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in results.items():
        print(f"{name:<14} {row['batch_size']:>5} {row['trajectories']:>5} {row['policy_tokens']:>10} "
              f"{row['tool_calls']:>10} {row['seconds']:>8.1f} {row['policy_tokens_per_s']:>8.2f} "
              f"{row['speedup']:>7.2f}x")
    print(f"speed-up at batch size {max(args.batch_sizes)}: {speedup:.2f}x (target >= 4x)")

    report = {
        "command": "python bench/rollout.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()),
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2),
        },
        "model": "SmolLM2-135M-Instruct (embedded, float32)",
        "config": {k: v for k, v in asdict(RolloutConfig(**common)).items()
                   if k not in ("progress", "output_path", "batch_size")},
        "problems": [p.id for p in problems],
        "results": results,
        "speedup": speedup,
        "speedup_at_batch_size": max(args.batch_sizes),
        "target_speedup": 4.0,
        "meets_target": speedup >= 4.0,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_suffix(".json.partial")
    staging.write_text(json.dumps(report, indent=2) + "\n")
    staging.replace(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

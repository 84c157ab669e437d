"""Individuals per minute of evolution's fitness evaluation on 1 vs N devices (lmforge.evolve.pool).

The same random LoRA adapters (rank 8 on every linear layer of the blocks) are scored on the same validation
problems by three pools, one after another:

* ``local``: the in-process evaluator on the first device (what ``lmforge evolve`` does by default);
* ``<backend> x 1``: the chosen backend ("processes" or "ray") with one worker on the first device;
* ``<backend> x N``: one worker per device: every visible GPU with ``--device cuda``, ``--workers`` CPU
  processes with ``--device cpu``.

Each pool first scores one warm-up adapter per worker (not timed: CUDA kernels, allocator, caches), then the
timed adapters, which no worker has seen (the accuracy mode memoises answers per adapter). Start-up (loading
the model in every worker) is reported apart. Scores must agree between the pools: the largest absolute
difference from the local pool is reported (0 on CPUs; on GPUs each device computes as a single one would).
CPU workers share the cores: N processes get cores / N torch threads each, the local pool keeps all of them
(``--threads-per-worker`` sets one count for every pool, e.g. 1 to compare like with like on a busy machine).

    python bench/evolve_pool.py --workers 2 --n-examples 4 --max-new-tokens 8 --dtype float32
                                # CPU, 2 processes, tiny settings
    python bench/evolve_pool.py --device cuda --gemma2-random --dtype bfloat16 --n-examples 64 --backend ray
                                # a random Gemma-2-2B-shaped model, one Ray actor per GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.agent.tasks import generate_problems
from lmforge.evolve.fitness import encode_answer_examples, save_adapter
from lmforge.evolve.pool import EvaluatorSpec, FitnessPool, pool_devices
from lmforge.models.loading import embedded_model_folder, load_model
from lmforge.models.lora import LoraAdapterConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evolve_speed import gemma2_random_folder, random_adapters  # noqa: E402  (a sibling script, not a package)

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "add_sub+mul_div+rate"


def time_pool(spec: EvaluatorSpec, backend: str, devices: list[str], adapters, warm_up, tasks, modes,
              threads: int | None) -> dict:
    """Start a pool, warm every worker up, time each mode over ``adapters``; close it. One result row."""
    started = time.perf_counter()
    pool = FitnessPool(spec, backend=backend, devices=devices, threads_per_worker=threads)
    startup = time.perf_counter() - started
    try:
        pool.fitness(warm_up[:len(devices)], tasks, modes[0])
        row = {"backend": backend, "workers": len(devices), "devices": devices, "startup_seconds": startup,
               "threads_per_worker": threads or "default", "modes": {}}
        for mode in modes:
            started = time.perf_counter()
            scores = pool.fitness(adapters, tasks, mode)
            seconds = time.perf_counter() - started
            row["modes"][mode] = {"seconds": seconds, "individuals_per_minute": 60.0 * len(adapters) / seconds,
                                  "scores": [s[TASK] for s in scores]}
    finally:
        pool.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-individuals", type=int, default=8, help="adapters timed per pool")
    parser.add_argument("--n-examples", type=int, default=32, help="validation problems per evaluation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["loglik", "accuracy"], choices=["accuracy", "loglik"])
    parser.add_argument("--backend", default="processes", choices=["processes", "ray"])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (every visible GPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="workers of the N-device pool (default: every visible GPU; 2 on the CPU)")
    parser.add_argument("--threads-per-worker", type=int, default=None,
                        help="torch threads of every CPU worker, local pool included (default: cores / workers; "
                             "the local pool keeps this process's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--gemma2-random", action="store_true", help="a random Gemma-2-2B-shaped model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --gemma2-random")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/evolve_pool_<case>.json)")
    args = parser.parse_args(argv)
    if args.n_individuals < 1 or args.n_examples < 1:
        parser.error("--n-individuals and --n-examples must be positive")
    on_gpu = args.device.startswith("cuda")
    devices = pool_devices(args.device, args.workers if args.workers is not None else (None if on_gpu else 2))
    case = ("gemma2_random_" if args.gemma2_random else "") + ("cuda" if on_gpu else "cpu")
    out = Path(args.out) if args.out else RESULTS / f"evolve_pool_{case}.json"

    with tempfile.TemporaryDirectory(prefix="evolve_pool_") as scratch:
        root = Path(scratch)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
        if args.gemma2_random:
            extra = {"tokenizer_path": args.tokenizer} if args.tokenizer else {}
            model_path = gemma2_random_folder(root, devices[0], dtype, **extra)
            model_name = "random Gemma-2-2B-shaped"
        else:
            model_path = Path(args.model) if args.model else embedded_model_folder()
            model_name = args.model or "embedded SmolLM2-135M-Instruct"
        # One PEFT folder fixes the adapter structure every worker attaches; the adapters themselves are data.
        model, tokenizer = load_model(model_path, dtype=args.dtype, device=devices[0],
                                      lora=LoraAdapterConfig(rank=8, alpha=16.0))
        adapters = random_adapters(model, args.n_individuals + len(devices))
        warm_up, timed = adapters[args.n_individuals:], adapters[:args.n_individuals]
        n_lora = sum(t.numel() for t in timed[0].values())
        folder = save_adapter(model, warm_up[0], root / "adapter")
        del model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        problems = generate_problems(args.n_examples, skills=TASK.split("+"), levels=[1, 2], split="validation")
        tasks = {TASK: encode_answer_examples(problems, tokenizer, task=TASK)}
        spec = EvaluatorSpec(adapter_folder=str(folder), model=str(model_path), dtype=args.dtype,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

        rows = []
        pools = [("local", devices[:1]), (args.backend, devices[:1])] + ([(args.backend, devices)]
                                                                        if len(devices) > 1 else [])
        for backend, pool_devices_used in pools:
            row = time_pool(spec, backend, pool_devices_used, timed, warm_up, tasks, args.modes,
                            args.threads_per_worker)
            rows.append(row)
            for mode, result in row["modes"].items():
                print(f"{backend:9s} x {row['workers']}  {mode:8s} {result['individuals_per_minute']:8.2f} "
                      f"individuals/min  (start-up {row['startup_seconds']:.1f} s)", flush=True)

    local = rows[0]
    one = next((r for r in rows if r["backend"] != "local" and r["workers"] == 1), None)
    for row in rows:
        for mode, result in row["modes"].items():
            base = local["modes"][mode]
            result["speedup_vs_local"] = base["seconds"] / result["seconds"]
            result["speedup_vs_one_worker"] = (one["modes"][mode]["seconds"] / result["seconds"]) if one else None
            result["max_abs_score_diff_vs_local"] = max(abs(a - b) for a, b in zip(result["scores"], base["scores"]))

    print()
    print(f"{model_name}, {args.dtype} on {args.device}, {args.n_individuals} individuals, {args.n_examples} examples "
          f"per evaluation, LoRA rank 8 ({n_lora:,} parameters per adapter)")
    print("| pool | workers | mode | individuals / min | speed-up vs local | vs 1 worker | start-up s "
          "| max score diff vs local |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for mode, result in row["modes"].items():
            vs_one = "-" if result["speedup_vs_one_worker"] is None else f"{result['speedup_vs_one_worker']:.2f}x"
            print(f"| {row['backend']} | {row['workers']} | {mode} | {result['individuals_per_minute']:.2f} | "
                  f"{result['speedup_vs_local']:.2f}x | {vs_one} | {row['startup_seconds']:.1f} | "
                  f"{result['max_abs_score_diff_vs_local']:.2e} |")
    result = {
        "benchmark": "evolve_pool", "model": model_name, "dtype": args.dtype, "device": args.device,
        "device_names": ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if on_gpu
                         else [platform.processor()]),
        "torch": torch.__version__, "python": sys.version.split()[0], "backend": args.backend,
        "n_individuals": args.n_individuals, "n_examples": args.n_examples, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "lora_parameters": n_lora, "command": " ".join(sys.argv),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many adapters per minute evolution can score: in-place swapping + batching vs reloading per individual.

Strategies (each scores the same random LoRA adapters on the same validation problems):

* ``reload_unbatched``: per individual, load the base model and the PEFT adapter folder from disk, then
  evaluate one example at a time -- the straightforward way to score a population;
* ``reload_batched``: the same reloads, batched evaluation;
* ``inplace_unbatched``: one model kept loaded, the adapter copied into its LoRA parameters, one example
  at a time;
* ``inplace_batched``: lmforge's way (``AdapterEvaluator``): one model, adapters copied in, batches.

Fitness modes: ``accuracy`` (greedy direct answers, graded) and ``loglik`` (gold-answer likelihood).
The first in-place evaluation is a warm-up and is not timed. Reload timings include reading the model
from the OS page cache (the file was just written or read), which is the favourable case for reloading.

    python bench/evolve_speed.py                          # CPU, embedded SmolLM2-135M, writes
                                                          # bench/results/evolve_speed_cpu.json
    python bench/evolve_speed.py --gemma2-random --device cuda --dtype bfloat16 --n-examples 200
                                                          # a random Gemma-2-2B-shaped model on a GPU
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
from lmforge.evolve.fitness import AdapterEvaluator, encode_answer_examples, lora_parameters, save_adapter
from lmforge.models.loading import embedded_model_folder, load_model
from lmforge.models.lora import LoraAdapterConfig, load_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_memory import GEMMA2_2B_SIZES  # noqa: E402  (a sibling script: one definition of the shapes)

STRATEGIES = ("reload_unbatched", "reload_batched", "inplace_unbatched", "inplace_batched")
RESULTS = Path(__file__).resolve().parent / "results"


def gemma2_random_folder(root: Path, device: str, dtype: torch.dtype, tokenizer_path: str | None = None) -> Path:
    """A randomly initialised model of Gemma-2-2B's shapes, saved with a tokenizer (default: the embedded model's;
    a GPU machine that cannot hold the embedded model gets the tokenizer files alone through ``--tokenizer``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or embedded_model_folder())
    config = AutoConfig.for_model(
        "gemma2", **GEMMA2_2B_SIZES, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder = root / "gemma2-2b-random"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def random_adapters(model, n: int) -> list[dict[str, torch.Tensor]]:
    """n seeded adapters: PEFT-like A, and a small random B (B = 0 would make every adapter the base model)."""
    adapters = []
    for seed in range(n):
        generator = torch.Generator().manual_seed(seed)
        adapter = {}
        for key, p in lora_parameters(model).items():
            scale = 1.0 / p.shape[1] ** 0.5 if ".lora_A." in key else 0.02
            adapter[key] = (torch.randn(p.shape, generator=generator) * scale).to(p.dtype)
        adapters.append(adapter)
    return adapters


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-individuals", type=int, default=3, help="adapters timed per strategy")
    parser.add_argument("--n-examples", type=int, default=32, help="validation problems per evaluation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["accuracy", "loglik"], choices=["accuracy", "loglik"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gemma2-random", action="store_true", help="a random Gemma-2-2B-shaped model")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for --gemma2-random (default: the embedded model's)")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/evolve_speed_<case>.json)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    case = "gemma2_random_" + args.device.split(":")[0] if args.gemma2_random else args.device.split(":")[0]
    out = Path(args.out) if args.out else RESULTS / f"evolve_speed_{case}.json"

    with tempfile.TemporaryDirectory(prefix="evolve_speed_") as scratch:
        root = Path(scratch)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
        if args.gemma2_random:
            model_path = gemma2_random_folder(root, args.device, dtype, args.tokenizer)
        else:
            model_path = embedded_model_folder()
        model_name = "random Gemma-2-2B-shaped" if args.gemma2_random else "embedded SmolLM2-135M-Instruct"
        lora = LoraAdapterConfig(rank=8, alpha=16.0)
        model, tokenizer = load_model(model_path, dtype=args.dtype, device=args.device, lora=lora)
        adapters = random_adapters(model, args.n_individuals + 1)  # the last one warms up the in-place model
        folders = [save_adapter(model, adapter, root / f"adapter-{i}") for i, adapter in enumerate(adapters)]
        problems = generate_problems(args.n_examples, skills=["add_sub", "mul_div", "rate"], levels=[1, 2],
                                     split="validation")
        examples = encode_answer_examples(problems, tokenizer, task="add_sub+mul_div+rate")
        n_lora = sum(p.numel() for p in lora_parameters(model).values())

        def evaluator_for(peft_model, batched: bool) -> AdapterEvaluator:
            return AdapterEvaluator(peft_model, tokenizer, batch_size=args.batch_size if batched else 1,
                                    max_new_tokens=args.max_new_tokens)

        rows = []
        for mode in args.modes:
            for strategy in args.strategies:
                batched = strategy.endswith("_batched")  # "_unbatched" does not end so
                seconds, scores = [], []
                if strategy.startswith("inplace"):
                    evaluator = evaluator_for(model, batched)
                    evaluator.fitness(adapters[-1], examples, mode)  # warm-up, not timed
                    for adapter in adapters[:-1]:
                        synchronize(args.device)
                        started = time.perf_counter()
                        scores.append(evaluator.fitness(adapter, examples, mode))
                        synchronize(args.device)
                        seconds.append(time.perf_counter() - started)
                else:
                    for folder in folders[:-1]:
                        synchronize(args.device)
                        started = time.perf_counter()
                        base, _ = load_model(model_path, dtype=args.dtype, device=args.device)
                        fresh = load_lora(base, folder)
                        scores.append(evaluator_for(fresh, batched).fitness(
                            load_adapter_of(fresh), examples, mode))
                        synchronize(args.device)
                        seconds.append(time.perf_counter() - started)
                        del base, fresh
                        gc.collect()
                        if args.device.startswith("cuda"):
                            torch.cuda.empty_cache()
                per_individual = sum(seconds) / len(seconds)
                rows.append({"mode": mode, "strategy": strategy, "seconds_per_individual": per_individual,
                             "individuals_per_minute": 60.0 / per_individual, "seconds": seconds, "scores": scores})
                print(f"{mode:8s} {strategy:18s} {per_individual:8.2f} s/individual  "
                      f"{60.0 / per_individual:7.2f} individuals/min", flush=True)

    by_key = {(r["mode"], r["strategy"]): r for r in rows}
    for row in rows:
        naive = by_key.get((row["mode"], "reload_unbatched"))
        reload_batched = by_key.get((row["mode"], "reload_batched"))
        row["speedup_vs_reload_unbatched"] = (naive["seconds_per_individual"] / row["seconds_per_individual"]
                                              if naive else None)
        row["speedup_vs_reload_batched"] = (reload_batched["seconds_per_individual"] / row["seconds_per_individual"]
                                            if reload_batched else None)
        ours = by_key.get((row["mode"], "inplace_batched"))
        row["max_abs_score_diff_vs_inplace_batched"] = (
            max(abs(a - b) for a, b in zip(row["scores"], ours["scores"])) if ours else None)

    print()
    print(f"{model_name}, {args.dtype} on {args.device}, {args.n_examples} examples per evaluation, "
          f"LoRA rank 8 on every linear layer of the blocks ({n_lora:,} parameters)")
    print("| mode | strategy | s / individual | individuals / min | speed-up vs reload+unbatched "
          "| vs reload+batched | max score diff vs in-place+batched |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        print(f"| {row['mode']} | {row['strategy']} | {row['seconds_per_individual']:.2f} | "
              f"{row['individuals_per_minute']:.2f} | {fmt(row['speedup_vs_reload_unbatched'], '.2f')}x | "
              f"{fmt(row['speedup_vs_reload_batched'], '.2f')}x | "
              f"{fmt(row['max_abs_score_diff_vs_inplace_batched'], '.2e')} |")
    result = {
        "benchmark": "evolve_speed", "model": model_name, "dtype": args.dtype, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
        "n_individuals": args.n_individuals, "n_examples": args.n_examples, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "lora_parameters": n_lora, "command": " ".join(sys.argv),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {out}")
    return 0


def load_adapter_of(peft_model) -> dict[str, torch.Tensor]:
    """The adapter a freshly loaded PeftModel already holds (scoring it copies it onto itself, a no-op)."""
    from lmforge.evolve.fitness import read_adapter

    return read_adapter(peft_model)


if __name__ == "__main__":
    sys.exit(main())

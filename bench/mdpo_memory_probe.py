"""Where the peak of a two-pass M-DPO step goes: per-phase peaks and an allocator-trace breakdown.

The step is lmforge's ``two_pass`` step (bench/mdpo_memory.py's ``lmforge_two_pass2_compiled``) written out
phase by phase, on the same Gemma-2-2B-shaped random model and batch (4 pairs x 2048 tokens, LoRA rank 16,
bf16 autocast, compiled decoder layers, flex attention on CUDA): a no-grad pass scores the 8 sequences,
then each chunk of ``rows`` sequences is scored again and back-propagated. After every phase the allocator's
peak (GiB above the step's start) is recorded. One variant (``--snapshot``) records the allocator trace of a
step and writes what is live at its peak, grouped by the allocating Python frames (transformers, PEFT,
lmforge, checkpoint, inductor), to ``{name}_peak.txt``.

Usage (GPU; the CPU runs the tiny model as a smoke test, without peaks):

    python bench/mdpo_memory_probe.py --out-dir OUT [--tiny] [--transformers-checkpointing] [VARIANT ...]

Variants: base (with the trace breakdown), slab32 (LMFORGE_CCE_SLAB_MB=32), score4 (4 sequences per no-grad
pass), triton (cce_impl="triton"), rows1_score4 (1 sequence per backward pass), budget05 (inductor
activation_memory_budget 0.5). ``--transformers-checkpointing`` checkpoints through transformers' switch
instead of lmforge's in-layer checkpoint, with PEFT's input casts on (the trainer before 2026-11-30).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mdpo_memory as mm  # noqa: E402
from sft_memory import GEMMA2_2B_SIZES, TINY_SIZES  # noqa: E402

from lmforge.prefs.trainer import (PrefTrainConfig, SequenceScorer, _enable_checkpointing,  # noqa: E402
                                   _lora_input_casts_off, _pair_rows, _score, compile_decoder_layers,
                                   compute_reference_logps, loss_from_logps, policy_logps, prepare_batches,
                                   prepare_model)

VARIANTS = {
    "base": dict(snapshot=True),
    "slab32": dict(slab_mb=32),
    "score4": dict(score_rows=4),
    "triton": dict(impl="triton"),
    "budget05": dict(budget=0.5),
    "rows1_score4": dict(rows=1, score_rows=4),
}
KEEP_FRAMES = ("/lmforge/", "transformers", "peft", "torch/utils/checkpoint", "_functorch", "_inductor")


def peak_breakdown(snapshot: dict, path: Path) -> float:
    """Replay one step's allocator trace; write what is live at its peak grouped by allocating frames."""
    events = snapshot["device_traces"][0]
    live, current, best, best_index = {}, 0, -1, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            current += event["size"]
            if current > best:
                best, best_index = current, index
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])
    at_peak = {}
    for event in events[:best_index + 1]:
        if event["action"] == "alloc":
            at_peak[event["addr"]] = event
        elif event["action"] == "free_completed":
            at_peak.pop(event["addr"], None)
    groups = collections.Counter()
    for event in at_peak.values():
        frames = [f for f in event.get("frames", []) if any(key in f["filename"] for key in KEEP_FRAMES)]
        groups[" < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:4])] \
            += event["size"]
    lines = [f"peak delta over trace start {best / 2**20:.1f} MiB at event {best_index} of {len(events)}"]
    lines += [f"{size / 2**20:9.1f} MiB  {key or '(no Python frame: autograd engine)'}"
              for key, size in groups.most_common(30)]
    path.write_text("\n".join(lines) + "\n")
    return best / 2**20


def run_variant(name: str, args, device: torch.device, tokenizer, pairs, *, rows: int = 2, score_rows: int = 2,
                impl: str = "auto", slab_mb: int | None = None, budget: float | None = None,
                snapshot: bool = False) -> dict:
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    functorch_config.activation_memory_budget = 1.0 if budget is None else budget
    if slab_mb is None:
        os.environ.pop("LMFORGE_CCE_SLAB_MB", None)
    else:
        os.environ["LMFORGE_CCE_SLAB_MB"] = str(slab_mb)
    cuda = device.type == "cuda"
    config = PrefTrainConfig(loss="m_dpo", beta=0.1, finetune="lora", lora_rank=16, lora_alpha=32.0,
                             learning_rate=1e-4, max_steps=5, batch_size=4, warmup=0.0,
                             precision="bf16" if cuda else "fp32", gradient_checkpointing=True, seed=0,
                             output_dir=str(Path(args.out_dir) / "run"), save_steps=10**6, progress=False,
                             rows_per_forward=score_rows, two_pass=True, compile_layers=True, cce_impl=impl)
    sizes = TINY_SIZES if args.tiny else GEMMA2_2B_SIZES
    policy = prepare_model(mm.build_model(sizes, device, 0, "flex_attention" if cuda else "eager"), config)
    _enable_checkpointing(policy, inside_layers=not args.transformers_checkpointing)
    compile_decoder_layers(policy)
    batches = prepare_batches(pairs, config, tokenizer.pad_token_id)
    reference = compute_reference_logps(policy, batches, config, device=device)
    batch = {key: value.to(device) for key, value in {**batches[0], **reference[0]}.items()}
    scorer = SequenceScorer(policy, impl)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy.train()
    casts_off = cuda and not args.transformers_checkpointing
    phases: dict[str, float] = {}

    def mark(key: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            phases[key] = max(phases.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with _lora_input_casts_off(policy, casts_off):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                scored = policy_logps(scorer, batch, config)
            mark("pass1")
            leaves = {key: value.detach().requires_grad_(True) for key, value in scored.items()}
            loss_from_logps(leaves, batch, config).loss.backward()
            sequences = _pair_rows(batch)
            weights = torch.cat([leaves["chosen"].grad, leaves["rejected"].grad])
            for start in range(0, weights.shape[0], rows):
                part = {key: sequences[key][start:start + rows] for key in ("input_ids", "attention_mask", "loss_mask")}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    logps = _score(scorer, part, "")
                mark("pass2_forward")
                (logps * weights[start:start + rows].to(logps.dtype)).sum().backward()
                mark("pass2_backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    times, peaks = [], []
    traced = 2 if snapshot and cuda else None  # the first step after two warm-up steps
    for index in range(2 + args.steps + (traced is not None)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
        phases.clear()
        if index == traced:
            torch.cuda.memory._record_memory_history(max_entries=400000, context="alloc", stacks="python")
        began = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        if index == traced:
            trace = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak_breakdown(trace, Path(args.out_dir) / f"{name}_peak.txt")
        elif index >= 2:
            times.append(seconds)
        if cuda:
            peaks.append({"start": start, **{key: value - start for key, value in phases.items()}})
    entry = {"name": name, "rows": rows, "score_rows": score_rows, "impl": impl, "slab_mb": slab_mb,
             "budget": budget, "step_times_s": times, "median_s": sorted(times)[len(times) // 2],
             "peaks_gib": peaks}
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", choices=[[]] + list(VARIANTS), default=[])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--transformers-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = mm.byte_tokenizer()
    seq_len = 64 if args.tiny else 2048
    pairs = mm.lmforge_pairs(mm.make_texts(4, seq_len, seq_len // 4, 0), tokenizer)
    results = []
    for name in args.variants or list(VARIANTS):
        try:
            results.append(run_variant(name, args, device, tokenizer, pairs, **VARIANTS[name]))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            results.append({"name": name, "error": repr(exc)[:2000]})
        gc.collect()  # the variant's model and optimizer went with its frame
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
        (Path(args.out_dir) / "probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak GPU memory and step time of one LoRA SFT step: lmforge's Cut Cross-Entropy patch vs stock transformers.

The model is shaped like Gemma-2-2B (random weights from ``transformers.Gemma2Config``: hidden 2304, 26 layers,
8 query / 4 key-value heads of dim 256, MLP 9216, vocabulary 256000, final-logit softcap 30, attention softcap
50, tied embeddings), in bfloat16, with a LoRA adapter (rank 16, alpha 32) on every linear layer of the blocks,
as ``lmforge sft`` trains it on a GPU: bf16 base weights, float32 adapter weights, bf16 autocast, AdamW.
Both variants run in the same process on the same model, batch (8 x 2048 random tokens) and initial adapter
weights, with gradient checkpointing on for both (non-reentrant, every decoder layer), eager attention for
both (Gemma 2's attention softcapping rules out SDPA):

    stock:   model(input_ids, labels=labels).loss, transformers' forward (logits materialised, upcast to fp32)
    lmforge: the same call after lmforge.cce.patch.patch(model): the loss from the hidden states, no logits
                          (impl "auto": on CUDA the GEMM path, lmforge.cce.gemm_impl)
    lmforge_triton: the same with patch(model, impl="triton") (the fused Triton kernels)

A step is forward + backward + optimizer step + zero_grad. Reported per variant: the peak of
``torch.cuda.max_memory_allocated`` over the timed steps, the memory held before a step (weights, adapter,
optimizer state) and their difference (what the step itself needs), the median step time over the timed
steps (after warm-up), and the loss of the first step from the shared initial state (the two should agree to
bf16 precision).

    python bench/sft_memory.py --out results.json                 # the H200 run (about 1-2 minutes)
    python bench/sft_memory.py --tiny --out /tmp/tiny.json         # a tiny model: a smoke test on any machine

On the CPU no memory is reported (torch.cuda's allocator statistics do not exist there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

GEMMA2_2B_SIZES = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)
# Same architecture, tiny sizes: for a smoke test of this script on any machine.
TINY_SIZES = dict(
    GEMMA2_2B_SIZES,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=64,
    max_position_embeddings=256,
)
VARIANTS = ("lmforge", "lmforge_triton", "stock")
PATCH_IMPL = {"lmforge": "auto", "lmforge_triton": "triton"}  # lmforge.cce backend per patched variant
GIB = 1024**3


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the results (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Gemma-2 config and batch (smoke test)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8; 2 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; 64 with --tiny)")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="leading share of each row labelled -100, like a prompt (default 0: every token "
                             "is a target)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    for name in ("batch_size", "seq_len", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 <= args.prompt_fraction < 1:
        parser.error(f"--prompt-fraction must be in [0, 1), got {args.prompt_fraction}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was requested but CUDA is not available")
    return args


def build_model(sizes: dict, device: torch.device, lora_rank: int, seed: int):
    """The random-weight Gemma-2 model in bf16 with a fresh LoRA adapter and gradient checkpointing."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from lmforge.cce.patch import unwrap_causal_lm
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    config = Gemma2Config(**sizes, attn_implementation="eager", use_cache=False)
    torch.manual_seed(seed)
    # Initialised on the CPU (deterministic for a seed whatever the device), directly in bf16, then moved.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    model = attach_lora(model, LoraAdapterConfig(rank=lora_rank, alpha=2.0 * lora_rank))
    causal_lm = unwrap_causal_lm(model)
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the activation_checkpointing rename
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = [m for m in causal_lm.modules() if getattr(m, "gradient_checkpointing", False)]
    if not checkpointed:
        raise RuntimeError("gradient checkpointing did not switch on; the comparison would not be the one reported")
    model.train()
    return model


def make_batch(vocab_size: int, batch_size: int, seq_len: int, prompt_fraction: float, device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : int(prompt_fraction * seq_len)] = -100
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}


def train_step(model, optimizer, batch: dict, device: torch.device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(variant: str, model, initial_adapter: dict, batch: dict, device: torch.device,
                    warmup: int, steps: int) -> dict:
    """Run ``warmup`` + ``steps`` steps of one variant from the shared initial adapter weights."""
    from lmforge.cce.patch import patch, unpatch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in initial_adapter:
                parameter.copy_(initial_adapter[name])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if variant in PATCH_IMPL:
        patch(model, impl=PATCH_IMPL[variant])
    result: dict = {"variant": variant}
    try:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        synchronize(device)
        losses = []
        for _ in range(warmup):
            losses.append(train_step(model, optimizer, batch, device))
        synchronize(device)
        if device.type == "cuda":
            # After warm-up the optimizer state exists, so the baseline is what lives between steps.
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            losses.append(train_step(model, optimizer, batch, device))
            synchronize(device)
            times.append(time.perf_counter() - started)
        result.update(
            first_step_loss=losses[0],
            losses=losses,
            step_times_s=times,
            step_time_s_median=statistics.median(times),
        )
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            result.update(peak_memory_bytes=peak, peak_memory_gib=peak / GIB, baseline_memory_gib=baseline / GIB,
                          step_memory_gib=(peak - baseline) / GIB)
        else:
            result.update(peak_memory_bytes=None, peak_memory_gib=None, baseline_memory_gib=None,
                          step_memory_gib=None)
    except torch.cuda.OutOfMemoryError as err:
        result.update(out_of_memory=True, error=str(err).splitlines()[0])
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if variant in PATCH_IMPL:
            unpatch(model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_arguments(argv)
    import peft
    import transformers

    device = torch.device(args.device)
    sizes = TINY_SIZES if args.tiny else GEMMA2_2B_SIZES
    model = build_model(sizes, device, args.lora_rank, args.seed)
    initial_adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    batch = make_batch(sizes["vocab_size"], args.batch_size, args.seq_len, args.prompt_fraction, device, args.seed)
    targets = int((batch["labels"][:, 1:] != -100).sum())

    results = {}
    for variant in args.variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        results[variant] = measure_variant(variant, model, initial_adapter, batch, device, args.warmup, args.steps)

    summary = {
        "benchmark": "sft_memory: one LoRA SFT step, lmforge CCE patch vs stock transformers",
        "model": "tiny Gemma-2 (smoke test)" if args.tiny else "Gemma-2-2B-shaped, random weights",
        "model_config": sizes,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "targets": "every linear layer in the blocks"},
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len,
        "target_tokens_per_step": targets,
        "prompt_fraction": args.prompt_fraction,
        "precision": "bf16 base weights, fp32 LoRA weights, bf16 autocast",
        "gradient_checkpointing": True,
        "gradient_checkpointing_detail": "on for both variants: every decoder layer, non-reentrant",
        "attn_implementation": "eager (both variants)",
        "optimizer": "AdamW lr 1e-4 on the LoRA parameters",
        "step": "forward + backward + optimizer step + zero_grad",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "results": results,
    }
    stock, ours = results.get("stock", {}), results.get("lmforge", {})
    if stock.get("peak_memory_bytes") and ours.get("peak_memory_bytes"):
        summary["peak_memory_ratio_stock_over_lmforge"] = stock["peak_memory_bytes"] / ours["peak_memory_bytes"]
        summary["peak_memory_saved_gib"] = (stock["peak_memory_bytes"] - ours["peak_memory_bytes"]) / GIB
    if stock.get("step_time_s_median") and ours.get("step_time_s_median"):
        summary["speedup_stock_over_lmforge"] = stock["step_time_s_median"] / ours["step_time_s_median"]
    if "first_step_loss" in stock and "first_step_loss" in ours:
        summary["first_step_loss_relative_difference"] = (
            abs(stock["first_step_loss"] - ours["first_step_loss"]) / abs(stock["first_step_loss"]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, out)
    print(format_summary(summary))
    print(f"results written to {out}")
    return 0


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['model']} on {summary['device']}: LoRA SFT step, {summary['batch_size']} x {summary['seq_len']} "
        f"tokens, {summary['precision']}; gradient checkpointing ON for both variants",
        "| variant | peak memory (GiB) | step memory (GiB) | step time (s) | first-step loss |",
        "|---|---|---|---|---|",
    ]

    def cell(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name, result in summary["results"].items():
        if result.get("out_of_memory"):
            lines.append(f"| {name} | out of memory | | | |")
            continue
        lines.append(f"| {name} | {cell(result['peak_memory_gib'], 2)} | {cell(result['step_memory_gib'], 2)} | "
                     f"{cell(result['step_time_s_median'], 3)} | {cell(result['first_step_loss'], 4)} |")
    for key in ("peak_memory_ratio_stock_over_lmforge", "peak_memory_saved_gib", "speedup_stock_over_lmforge",
                "first_step_loss_relative_difference"):
        if key in summary:
            lines.append(f"{key}: {summary[key]:.4g}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

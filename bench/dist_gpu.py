"""Multi-GPU benchmarks: vocabulary-parallel CCE on 2 shards vs one GPU, and an FSDP2 LoRA SFT step.

Launch with one process per GPU (NCCL on CUDA; gloo on the CPU for the --tiny smoke test):

    torchrun --standalone --nproc-per-node 2 bench/dist_gpu.py --out bench/results/dist_h200x2.json
    torchrun --standalone --nproc-per-node 2 bench/dist_gpu.py --tiny --out /tmp/dist_tiny.json

(a) ``vocab_parallel``: the Gemma 2 2B loss shape, N x D x V = 8192 x 2304 x 256000 in bfloat16 (inputs
from :mod:`lmforge.cce.regimes`, the same on every rank: rank 0 makes them and broadcasts them). The
classifier is split by rows into one block per rank and :func:`lmforge.cce.linear_cross_entropy` runs with
``process_group`` (:mod:`lmforge.cce.parallel`); then rank 0 runs the single-GPU call on the whole
classifier while the others wait. Both are measured by :func:`lmforge.cce.benchmark.measure`: forward and
forward+backward time (median of CUDA-event timings after warm-up), the peak memory the call needs beyond
its inputs, and the relative errors of loss, dE and dC (a rank's dC: its block's rows) against the float64
reference of :func:`lmforge.cce.benchmark.float64_reference` (materialised float64 logits, one chunk of
tokens at a time). Reported per rank, with the bytes of the inputs each rank holds (e and its classifier
block, and their gradients).

(b) ``fsdp_sft``: one LoRA SFT training step (forward + backward + AdamW step + zero_grad) of a
Gemma-2-2B-shaped random model (``Gemma2Config`` sizes of bench/sft_memory.py: hidden 2304, 26 layers,
vocabulary 256000, tied embeddings, final-logit softcap 30), bf16 base weights, float32 LoRA weights
(rank 16 on every linear layer of the blocks), sharded with FSDP2 ``fully_shard`` (each decoder layer,
then the model, whose root unit holds the tied embedding / lm_head; mixed precision: bf16 parameters for
compute, float32 gradient reduction), gradient checkpointing on, the CCE patch computing the loss. Each
rank trains on its own batch (--sft-batch-size x --sft-seq-len random tokens). Reported per rank: median
step time over the timed steps (CUDA events), peak allocated memory and the memory held between steps,
and the losses.

Each part runs in its own try/except: a failure (out of memory included) is recorded as an error string
in the JSON and the other part still runs. Rank 0 writes the JSON (atomically) to --out.
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
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from sft_memory import GEMMA2_2B_SIZES, TINY_SIZES  # noqa: E402

from lmforge.cce import linear_cross_entropy  # noqa: E402
from lmforge.cce.benchmark import _device_name, float64_reference, measure  # noqa: E402
from lmforge.cce.regimes import make_inputs  # noqa: E402

GEMMA2_LOSS_SHAPE = (8192, 2304, 256000)
TINY_LOSS_SHAPE = (64, 32, 1000)
MIB = 2 ** 20
GIB = 2 ** 30


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where rank 0 writes the results (JSON)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and model (a smoke test, CPU/gloo is fine)")
    parser.add_argument("--parts", nargs="+", default=["vocab_parallel", "fsdp_sft"],
                        choices=["vocab_parallel", "fsdp_sft"])
    parser.add_argument("--regime", default="calibrated", choices=["random", "calibrated"],
                        help="inputs of the loss benchmark (lmforge.cce.regimes); default calibrated")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--sft-batch-size", type=int, default=None, help="rows per rank (default 8; 2 with --tiny)")
    parser.add_argument("--sft-seq-len", type=int, default=None, help="tokens per row (default 2048; 64 with --tiny)")
    parser.add_argument("--sft-warmup", type=int, default=1)
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.sft_batch_size = args.sft_batch_size or (2 if args.tiny else 8)
    args.sft_seq_len = args.sft_seq_len or (64 if args.tiny else 2048)
    for name in ("repeats", "sft_batch_size", "sft_seq_len", "sft_steps", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "sft_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def init_distributed() -> torch.device:
    """Join the process group torchrun describes; one GPU per local rank (NCCL), or gloo on the CPU."""
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --standalone --nproc-per-node 2 bench/dist_gpu.py ...")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_record(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}


# --------------------------------------------------------------------------------------------------
# (a) vocabulary-parallel CCE


def block_rows(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of rank's block: torch.chunk's split, as DTensor's Shard(0) makes it."""
    size = -(-vocab // world)
    start = min(rank * size, vocab)
    return start, min(size, vocab - start)


def vocab_parallel_part(args, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    n, d, v = TINY_LOSS_SHAPE if args.tiny else GEMMA2_LOSS_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Rank 0 makes the inputs; broadcasting them guarantees every rank holds exactly the same tensors.
    if rank == 0:
        e, c, t = make_inputs(args.regime, n, d, v, dtype=dtype, device=device, seed=args.seed)
    else:
        e = torch.empty(n, d, dtype=dtype, device=device)
        c = torch.empty(v, d, dtype=dtype, device=device)
        t = torch.empty(n, dtype=torch.long, device=device)
    for tensor in (e, c, t):
        dist.broadcast(tensor, src=0)

    loss_ref, de_ref, dc_ref = float64_reference(e, c, t)
    start, rows = block_rows(v, world, rank)
    block = c[start:start + rows].clone()
    block_ref = dc_ref[start:start + rows].clone()
    if rank != 0:
        del dc_ref
    release(device)

    def parallel_loss(e_, c_, t_):
        return linear_cross_entropy(e_, c_, t_, process_group=dist.group.WORLD)

    result = {"shape": {"n": n, "d": d, "v": v}, "dtype": str(dtype).replace("torch.", ""), "regime": args.regime,
              "block": {"start": start, "rows": rows}}
    dist.barrier()
    result["vocab_parallel"] = measure("lmforge_vocab_parallel", parallel_loss, e, block, t,
                                       (loss_ref, de_ref, block_ref), warmup=args.warmup, repeats=args.repeats)
    # e and the classifier block, and their gradients.
    input_bytes = 2 * (e.numel() * e.element_size() + block.numel() * block.element_size())
    result["vocab_parallel"]["input_mb"] = input_bytes / MIB
    del block, block_ref
    release(device)
    dist.barrier()
    if rank == 0:  # the single-GPU baseline: the whole classifier on one device, the other ranks idle
        try:  # caught here, so that rank 0 still meets the others at the barrier below
            result["single_gpu"] = measure("lmforge", linear_cross_entropy, e, c, t, (loss_ref, de_ref, dc_ref),
                                           warmup=args.warmup, repeats=args.repeats)
            input_bytes = 2 * (e.numel() * e.element_size() + c.numel() * c.element_size())
            result["single_gpu"]["input_mb"] = input_bytes / MIB
        except Exception as err:  # noqa: BLE001
            result["single_gpu"] = error_record(err)
        del dc_ref
    dist.barrier()
    release(device)
    return result


# --------------------------------------------------------------------------------------------------
# (b) FSDP2 LoRA SFT step


def build_sharded_model(sizes: dict, device: torch.device, lora_rank: int, seed: int):
    """Gemma-2-shaped random model in bf16 on ``device`` with LoRA, gradient checkpointing, the CCE patch
    and FSDP2 (each decoder layer, then the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM, Gemma2Config

    from lmforge.cce.patch import patch, unwrap_causal_lm
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    config = Gemma2Config(**sizes, attn_implementation="eager", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the device: a 2.6B-parameter CPU init would dominate the run
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = attach_lora(model, LoraAdapterConfig(rank=lora_rank, alpha=2.0 * lora_rank))
    causal_lm = unwrap_causal_lm(model)
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the activation_checkpointing rename
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch(model)  # verified on the whole model, before sharding
    # FSDP2 gathers a unit's parameters in one dtype: bf16 for compute (the float32 LoRA weights are cast),
    # gradients reduced in float32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in causal_lm.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.train()
    return model


def fsdp_sft_part(args, device: torch.device) -> dict:
    rank = dist.get_rank()
    sizes = TINY_SIZES if args.tiny else GEMMA2_2B_SIZES
    model = build_sharded_model(sizes, device, args.lora_rank, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own batch
    input_ids = torch.randint(0, sizes["vocab_size"], (args.sft_batch_size, args.sft_seq_len), generator=generator)
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": input_ids.to(device)}

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step() for _ in range(args.sft_warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(args.sft_steps):
        dist.barrier()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - started)
    result = {
        "model": "tiny Gemma-2 (smoke test)" if args.tiny else "Gemma-2-2B-shaped, random weights",
        "total_parameters": sum(p.numel() for p in model.parameters()),  # DTensor numel: the global count
        "trainable_parameters": sum(p.numel() for p in trainable),
        "batch_per_rank": [args.sft_batch_size, args.sft_seq_len],
        "losses": losses,
        "step_times_s": times,
        "step_time_s_median": statistics.median(times),
        "tokens_per_s_all_ranks": dist.get_world_size() * args.sft_batch_size * args.sft_seq_len
        / statistics.median(times),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_memory_gib=peak / GIB, held_between_steps_gib=held / GIB,
                      step_memory_gib=(peak - held) / GIB)
    return result  # the model and optimizer die with this frame; main() then empties the CUDA cache


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_arguments(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = {"vocab_parallel": vocab_parallel_part, "fsdp_sft": fsdp_sft_part}
    results = {}
    for name in args.parts:
        if rank == 0:
            print(f"running {name} on {world} ranks ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            results[name] = parts[name](args, device)
        except Exception as err:  # noqa: BLE001 - recorded so the other part still runs
            results[name] = error_record(err)
        release(device)
        results[name]["wall_s"] = time.perf_counter() - started
        # A rank that failed mid-part may have left the others in a collective; the barrier keeps parts apart.
        try:
            dist.barrier()
        except Exception as err:  # noqa: BLE001
            results[name]["barrier_error"] = f"{type(err).__name__}: {err}"

        if rank == 0:  # rank 0's results so far, in case a later part brings the job down
            write_summary(args, device, world, [results] + [None] * (world - 1))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, results)
    if rank == 0:
        summary = write_summary(args, device, world, per_rank)
        print(format_summary(summary))
        print(f"results written to {args.out}")
    dist.barrier()  # leave together: a rank tearing down while another still talks can abort it
    dist.destroy_process_group()
    return 0


def write_summary(args, device: torch.device, world: int, per_rank: list) -> dict:
    """Write the JSON summary (atomically) to --out; ``per_rank`` holds None for ranks not heard from yet."""
    import transformers

    summary = {
        "benchmark": "dist_gpu: vocabulary-parallel CCE and an FSDP2 LoRA SFT step",
        "world_size": world,
        "backend": dist.get_backend(),
        "device": _device_name(device),
        "tiny": args.tiny,
        "arguments": vars(args),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "per_rank": per_rank,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(temporary, out)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['world_size']} ranks ({summary['backend']}) on {summary['device']}"]
    for rank, results in enumerate(summary["per_rank"]):
        part = results.get("vocab_parallel", {})
        if "error" in part:
            lines.append(f"rank {rank} vocab_parallel failed: {part['error'][:200]}")
        for key in ("vocab_parallel", "single_gpu"):
            row = part.get(key)
            if row:
                lines.append(f"rank {rank} {key}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
                             f"extra {row['fwd_bwd_mb']:.0f} MB, inputs {row['input_mb']:.0f} MB, errors loss "
                             f"{row['loss_err']:.2e} dE {row['de_err']:.2e} dC {row['dc_err']:.2e}")
        sft = results.get("fsdp_sft", {})
        if "error" in sft:
            lines.append(f"rank {rank} fsdp_sft failed: {sft['error'][:200]}")
        elif sft:
            memory = f", peak {sft['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in sft else ""
            lines.append(f"rank {rank} fsdp_sft: step {sft['step_time_s_median']:.3f} s{memory}, "
                         f"losses {[round(x, 4) for x in sft['losses']]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

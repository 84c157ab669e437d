"""Peak GPU memory and step time of one M-DPO LoRA training step: lmforge's trainer vs TRL's DPOTrainer.

The model is shaped like Gemma-2-2B (random weights from ``transformers.Gemma2Config``: hidden 2304, 26 layers,
8 query / 4 key-value heads of dim 256, MLP 9216, vocabulary 256000, final-logit softcap 30, attention softcap
50, tied embeddings) in bfloat16, with a LoRA adapter (rank 16, alpha 32) on every linear layer of the blocks.
The batch is 4 preference pairs of 2048 tokens each (a 512-token prompt, then a 1536-token completion that
ends with the eos token), the same token ids for every contender. Contenders, each on a fresh model built from
the same seed, one after another in this process:

    lmforge           lmforge.prefs.trainer.train_preferences, loss m_dpo (sigmoid, beta 0.1), reference
                      log-probs computed once before training (their pass is timed separately); every
                      completion token is a policy token, so M-DPO scores exactly the tokens DPO scores
    lmforge_rows1     the same with rows_per_forward=1: one sequence per forward pass, one backward, so the
                      recomputed activations of a checkpointed layer are those of one sequence
    lmforge_two_pass  rows_per_forward=1 and two_pass=True: a no-grad scoring pass, then one forward +
                      backward per sequence weighted by dL/d(log-prob): activation memory of one sequence,
                      one extra forward pass
    lmforge_compiled, lmforge_two_pass_compiled
                      the same with compile_layers=True (torch.compile of every decoder layer; compiled in
                      the warm-up step)
    lmforge_two_pass2_compiled
                      two_pass and compiled layers with two sequences per pass (rows_per_forward=2): half
                      the passes of lmforge_two_pass_compiled, whose one-sequence passes are launch-bound
    trl               trl.DPOTrainer defaults for a PEFT model: the reference log-probs come from the same
                      model with the adapter disabled, inside every step
    trl_precomputed   trl.DPOTrainer with precompute_ref_log_probs=True (reference pass before training)
    trl_liger         trl.DPOTrainer with use_liger_kernel=True (skipped when liger-kernel is not installed
                      or there is no GPU)

Equal for all: bf16 autocast (bf16 base weights, float32 adapter), AdamW, batch 4 pairs x 1 accumulation,
gradient checkpointing on (non-reentrant; TRL's default) unless --no-gradient-checkpointing, eager attention
(Gemma 2's attention softcapping rules out SDPA) unless --attn-implementation flex_attention (for every
contender: the comparison stays on one model). A step is forward + backward + optimizer step. Each
contender runs --warmup untimed steps then --steps timed ones; reported: the median step time, the peak of
torch.cuda.max_memory_allocated over a timed step (reset at its start), the memory allocated when the step
starts (weights, adapter, optimizer state) and their difference.

    python bench/mdpo_memory.py --out bench/results/mdpo_memory_h200.json   # the H200 run
    python bench/mdpo_memory.py --tiny --out /tmp/mdpo_tiny.json             # a smoke test on any machine

On the CPU no memory is reported (torch.cuda's allocator statistics do not exist there).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_memory import GEMMA2_2B_SIZES, TINY_SIZES  # noqa: E402  (a sibling script: one definition of the shapes)

CONTENDERS = ("lmforge", "lmforge_rows1", "lmforge_two_pass", "lmforge_compiled", "lmforge_two_pass_compiled",
              "lmforge_two_pass2_compiled", "trl", "trl_precomputed", "trl_liger")
LMFORGE_OPTIONS = {"lmforge": {}, "lmforge_rows1": {"rows_per_forward": 1},
                   "lmforge_two_pass": {"rows_per_forward": 1, "two_pass": True},
                   "lmforge_compiled": {"compile_layers": True},
                   "lmforge_two_pass_compiled": {"rows_per_forward": 1, "two_pass": True, "compile_layers": True},
                   "lmforge_two_pass2_compiled": {"rows_per_forward": 2, "two_pass": True, "compile_layers": True}}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2; then one token per byte (id = byte + 3)
BETA = 0.1
LEARNING_RATE = 1e-4
GIB = 1024**3


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the results (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Gemma-2 config and batch (smoke test)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 with --tiny)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default seq-len / 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender (default 2)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="switch gradient checkpointing off for every contender")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--attn-implementation", default="eager", choices=("eager", "flex_attention"),
                        help="Gemma 2's attention kernel for every contender (default eager, what TRL and "
                             "transformers train Gemma 2 with; flex_attention: softcapped attention without the "
                             "attention matrix, GPU only)")
    parser.add_argument("--cce-impl", default="auto", help="lmforge.cce implementation for lmforge (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    args.prompt_len = args.prompt_len if args.prompt_len is not None else args.seq_len // 4
    for name in ("pairs", "seq_len", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 1 <= args.prompt_len <= args.seq_len - 2:
        parser.error(f"--prompt-len must be in [1, seq-len - 2], got {args.prompt_len}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was requested but CUDA is not available")
    return args


# --------------------------------------------------------------------------------------------------
# Model, tokenizer and data


def byte_tokenizer():
    """A byte-level tokenizer (one token per byte, ids 3..258; <pad> 0, <bos> 1, <eos> 2), so any ASCII text
    of n characters is n tokens for both trainers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte, character in enumerate(_byte_characters()):
        vocab[character] = len(SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _byte_characters() -> list[str]:
    # GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the rest move to 256+.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def make_texts(pairs: int, seq_len: int, prompt_len: int, seed: int) -> list[dict[str, str]]:
    """Random lowercase text: a prompt and two completions per pair; with the eos TRL appends, each sequence
    is exactly ``seq_len`` tokens."""
    generator = torch.Generator().manual_seed(seed + 1)

    def text(n: int) -> str:
        return "".join(chr(ord("a") + int(i)) for i in torch.randint(0, 26, (n,), generator=generator))

    completion_len = seq_len - prompt_len - 1
    return [{"prompt": text(prompt_len), "chosen": text(completion_len), "rejected": text(completion_len)}
            for _ in range(pairs)]


def lmforge_pairs(texts, tokenizer):
    """The same sequences as token-exact trajectories: the prompt unscored, every completion token scored."""
    from lmforge.agent.format import Trajectory
    from lmforge.prefs.pairs import PreferencePair

    def trajectory(prompt: str, completion: str, index: int, problem: int) -> Trajectory:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Trajectory(input_ids=prompt_ids + completion_ids,
                          policy_mask=[0] * len(prompt_ids) + [1] * len(completion_ids),
                          problem_id=f"p{problem}", sample_index=index, correct=index == 0)

    return [PreferencePair(chosen=trajectory(t["prompt"], t["chosen"], 0, i),
                           rejected=trajectory(t["prompt"], t["rejected"], 1, i)) for i, t in enumerate(texts)]


def build_model(sizes: dict, device: torch.device, seed: int, attn_implementation: str = "eager"):
    """The random-weight Gemma-2 model in bf16 on ``device`` (the same weights for a seed)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(**sizes, attn_implementation=attn_implementation, use_cache=False, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of a minute on the CPU
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def lora_settings(rank: int) -> dict:
    return {"rank": rank, "alpha": 2.0 * rank, "targets": "every linear layer in the blocks"}


def checkpointed(model) -> bool:
    """Whether activation checkpointing is switched on in the model's decoder layers."""
    return any(getattr(module, "gradient_checkpointing", False) or getattr(module, "_lmforge_checkpointed", False)
               for module in model.modules())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Drop what a contender left behind and start the next from a clean allocator and accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    AcceleratorState._reset_state()  # each trainer builds its own Accelerator; their precisions may differ
    GradientState._reset_state()


def summarise_steps(steps: list[dict], warmup: int) -> dict:
    """Median time and worst peak over the timed steps (after ``warmup``)."""
    timed = steps[warmup:]
    result = {"step_times_s": [s["seconds"] for s in timed],
              "step_time_s_median": statistics.median(s["seconds"] for s in timed),
              "first_step_loss": steps[0].get("loss")}
    if all(s.get("peak") is not None for s in timed):
        worst = max(timed, key=lambda s: s["peak"])
        result.update(peak_memory_gib=worst["peak"] / GIB, step_start_memory_gib=worst["start"] / GIB,
                      step_memory_gib=(worst["peak"] - worst["start"]) / GIB)
    else:
        result.update(peak_memory_gib=None, step_start_memory_gib=None, step_memory_gib=None)
    return result


# --------------------------------------------------------------------------------------------------
# Contenders


def run_lmforge(args, sizes, device, tokenizer, texts, workdir: Path, name: str = "lmforge") -> dict:
    from lmforge.prefs.trainer import PrefTrainConfig, compile_decoder_layers, compute_reference_logps, \
        prepare_batches, prepare_model, train_preferences

    pairs = lmforge_pairs(texts, tokenizer)
    config = PrefTrainConfig(
        loss="m_dpo", beta=BETA, finetune="lora", lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
        learning_rate=LEARNING_RATE, max_steps=args.warmup + args.steps, batch_size=args.pairs, warmup=0.0,
        precision="bf16" if device.type == "cuda" else "fp32", gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, output_dir=str(workdir / name), save_steps=10**6, progress=False, cce_impl=args.cce_impl,
        **LMFORGE_OPTIONS[name])
    policy = prepare_model(build_model(sizes, device, args.seed, args.attn_implementation), config)
    if config.compile_layers:  # the reference log-probs then come from the same kernels as the policy's
        compile_decoder_layers(policy)
    batches = prepare_batches(pairs, config, tokenizer.pad_token_id)
    synchronize(device)
    started = time.perf_counter()
    reference = compute_reference_logps(policy, batches, config, device=device)
    synchronize(device)
    reference_seconds = time.perf_counter() - started
    result = train_preferences(policy, tokenizer, pairs, config, reference_logps=reference)
    log = [json.loads(line) for line in Path(result["metrics_path"]).read_text().splitlines() if line.strip()]
    steps = [{"seconds": e["step_seconds"], "loss": e["loss"],
              "peak": e["peak_memory_gib"] * GIB if "peak_memory_gib" in e else None,
              "start": e["step_start_memory_gib"] * GIB if "step_start_memory_gib" in e else None}
             for e in log if "loss" in e]
    summary = summarise_steps(steps, args.warmup)
    summary.update(reference_pass_s=reference_seconds, trainable_parameters=result["trainable_parameters"],
                   total_parameters=result["total_parameters"], gradient_checkpointing_active=checkpointed(policy))
    del policy, result
    return summary


def _step_recorder(device: torch.device):
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        """Time and peak memory of every optimizer step, as lmforge's trainer logs them."""

        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.current = {"start": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
                            "began": time.perf_counter()}

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.current["seconds"] = time.perf_counter() - self.current.pop("began")
            self.current["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            self.steps.append(self.current)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps and "loss" not in self.steps[-1]:
                self.steps[-1]["loss"] = logs["loss"]

    return StepRecorder()


def run_trl(args, sizes, device, tokenizer, texts, workdir: Path, *, precompute: bool, liger: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmforge.models.lora import LoraAdapterConfig, to_peft_config

    model = build_model(sizes, device, args.seed, args.attn_implementation)
    peft_config = to_peft_config(LoraAdapterConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), model)
    trl_config = DPOConfig(
        output_dir=str(workdir / ("trl_liger" if liger else "trl_precomputed" if precompute else "trl")),
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, beta=BETA, loss_type=["sigmoid"],
        max_length=args.seq_len, precompute_ref_log_probs=precompute, use_liger_kernel=liger,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device.type == "cuda",
        use_cpu=device.type != "cuda", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed)
    trainer = DPOTrainer(model=model, args=trl_config, train_dataset=Dataset.from_list(texts),
                         processing_class=tokenizer, peft_config=peft_config)
    recorder = _step_recorder(device)
    trainer.add_callback(recorder)
    trainer.train()
    summary = summarise_steps(recorder.steps, args.warmup)
    summary.update(trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                   total_parameters=sum(p.numel() for p in trainer.model.parameters()),
                   gradient_checkpointing_active=checkpointed(trainer.model))
    del trainer, model
    return summary


def run_contender(name: str, args, sizes, device, tokenizer, texts, workdir: Path) -> dict:
    if name == "trl_liger":
        if device.type != "cuda":
            return {"skipped": "Liger's kernels need a CUDA device"}
        if importlib.util.find_spec("liger_kernel") is None:
            return {"skipped": "liger-kernel is not installed (pip install liger-kernel)"}
    try:
        if name in LMFORGE_OPTIONS:
            return run_lmforge(args, sizes, device, tokenizer, texts, workdir, name)
        return run_trl(args, sizes, device, tokenizer, texts, workdir, precompute=name == "trl_precomputed",
                       liger=name == "trl_liger")
    except torch.cuda.OutOfMemoryError as err:
        return {"out_of_memory": True, "error": str(err).splitlines()[0]}
    finally:
        release(device)


# --------------------------------------------------------------------------------------------------
# Main


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    sizes = TINY_SIZES if args.tiny else GEMMA2_2B_SIZES
    tokenizer = byte_tokenizer()
    texts = make_texts(args.pairs, args.seq_len, args.prompt_len, args.seed)
    lengths = {len(tokenizer(t["prompt"] + t[side], add_special_tokens=False)["input_ids"]) + 1
               for t in texts for side in ("chosen", "rejected")}
    if lengths != {args.seq_len}:
        raise RuntimeError(f"sequences came out with {sorted(lengths)} tokens, not {args.seq_len}")

    results = {}
    with tempfile.TemporaryDirectory(prefix="mdpo-bench-") as workdir:
        for name in args.contenders:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_contender(name, args, sizes, device, tokenizer, texts, Path(workdir))

    summary = {
        "benchmark": "mdpo_memory: one M-DPO LoRA training step, lmforge vs TRL DPOTrainer",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny Gemma-2 (smoke test)" if args.tiny else "Gemma-2-2B-shaped, random weights",
        "model_config": sizes,
        "lora": lora_settings(args.lora_rank),
        "pairs_per_step": args.pairs,
        "seq_len": args.seq_len,
        "prompt_len": args.prompt_len,
        "sequences_per_step": 2 * args.pairs,
        "scored_tokens_per_sequence": args.seq_len - args.prompt_len,
        "precision": ("bf16 base weights, fp32 LoRA weights, bf16 autocast" if device.type == "cuda"
                      else "float32 (CPU smoke test)"),
        "gradient_checkpointing": args.gradient_checkpointing,
        "attn_implementation": f"{args.attn_implementation} (every contender)",
        "lmforge_cce_impl": args.cce_impl,
        "loss": f"DPO sigmoid, beta {BETA} (lmforge: m_dpo with every completion token a policy token)",
        "optimizer": f"AdamW lr {LEARNING_RATE} on the LoRA parameters",
        "step": "forward + backward + optimizer step (TRL default: its reference forward included)",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "trl", "accelerate",
                                                       "liger-kernel", "triton")}
        | {"python": platform.python_version()},
        "results": results,
    }
    targets = {}
    for mine in LMFORGE_OPTIONS:
        ours = results.get(mine, {})
        for other in ("trl", "trl_precomputed", "trl_liger"):
            theirs = results.get(other, {})
            if ours.get("peak_memory_gib") and theirs.get("peak_memory_gib"):
                summary[f"peak_memory_{mine}_over_{other}"] = ours["peak_memory_gib"] / theirs["peak_memory_gib"]
            if ours.get("step_time_s_median") and theirs.get("step_time_s_median"):
                summary[f"step_time_{mine}_over_{other}"] = ours["step_time_s_median"] / theirs["step_time_s_median"]
        checks = {"peak_memory <= 0.5 x trl": ("peak_memory", "trl", 0.5),
                  "peak_memory <= trl_liger": ("peak_memory", "trl_liger", 1.0),
                  "step_time <= trl": ("step_time", "trl", 1.0)}
        mine_targets = {label: summary[f"{what}_{mine}_over_{other}"] <= bound
                        for label, (what, other, bound) in checks.items() if f"{what}_{mine}_over_{other}" in summary}
        if mine_targets:
            targets[mine] = mine_targets
    summary["targets_met"] = targets

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
        f"{summary['model']} on {summary['device']}: one DPO LoRA step, {summary['pairs_per_step']} pairs x "
        f"{summary['seq_len']} tokens, {summary['precision']}, gradient checkpointing "
        f"{'on' if summary['gradient_checkpointing'] else 'off'}",
        "| contender | peak memory (GiB) | step memory (GiB) | step time (s) | first-step loss |",
        "|---|---|---|---|---|",
    ]

    def cell(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name, result in summary["results"].items():
        if "skipped" in result or result.get("out_of_memory"):
            lines.append(f"| {name} | {result.get('skipped') or 'out of memory'} | | | |")
            continue
        lines.append(f"| {name} | {cell(result['peak_memory_gib'], 2)} | {cell(result['step_memory_gib'], 2)} | "
                     f"{cell(result['step_time_s_median'], 3)} | {cell(result['first_step_loss'], 4)} |")
    for key, value in summary.items():
        if key.startswith(("peak_memory_lmforge", "step_time_lmforge")):
            lines.append(f"{key}: {value:.3f}")
    for mine, targets in summary["targets_met"].items():
        lines.append(f"targets ({mine}): " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in targets.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

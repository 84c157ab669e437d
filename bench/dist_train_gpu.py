"""Training under ``accelerate launch`` on N processes equals one process: SFT and M-DPO, DDP and FSDP.

One command runs everything and writes ``DIR/dist_train.json``:

    python bench/dist_train_gpu.py --out bench/results/dist_train_h200x2     # 2 GPUs: NCCL, bf16
    python bench/dist_train_gpu.py --out /tmp/dist_train --tiny --device cpu # smoke test: 2 gloo processes, fp32

What it does:

1. Builds a random model folder (``DIR/model``): a Llama-shaped config (4 layers, hidden 512, 8 query / 4
   key-value heads of dim 64, MLP 1408, vocabulary 32000; ``--family gemma2`` gives a Gemma-2-shaped one with
   tied embeddings and logit softcapping; ``--tiny``: 2 layers, hidden 64, vocabulary 512), float32 weights
   saved with ``save_pretrained``, and a tokenizer: one token per byte (bench/mdpo_memory.py's
   ``byte_tokenizer``) with a chat template whose turns end with ``<eos>``, or the tokenizer folder given by
   ``--tokenizer`` (it must have a chat template: run_sft renders conversations with it; the vocabulary then
   grows to the tokenizer's size if that is larger). Nothing is downloaded.
2. For each case, a one-process baseline and an N-process run (``--processes``, default 2) of this same script in
   worker mode (``--worker``), each a fresh subprocess: the baseline a plain ``python``, the N-process run
   ``python -m torch.distributed.run --standalone --nproc-per-node N`` with the environment ``accelerate
   launch`` gives its processes (see :func:`accelerate_environment`). The baseline sees one GPU only
   (CUDA_VISIBLE_DEVICES), since a single Trainer process that sees two would wrap the model in DataParallel:

       sft_ddp     lmforge.models.sft.run_sft (LoRA, CCE loss, 4 steps): N processes x batch b against one
                   process x batch N*b. The train split is exactly one epoch of the global batch, so no
                   process gets repeated conversations (accelerate's even_batches) and every step sees the
                   same conversations in both runs.
       sft_fsdp    the same under FSDP (ACCELERATE_USE_FSDP; FSDP2 when accelerate has FSDP_VERSION,
                   transformer-layer wrapping, FULL_STATE_DICT so the final adapter is one safetensors file),
                   against the same baseline.
       mdpo_ddp    lmforge.prefs.trainer.train_preferences (loss m_dpo, LoRA, 3 steps) on synthetic
                   multi-turn pairs: N processes x batch_size b against one process with batch_size b and
                   grad_accumulation N (the trainer deals micro-batches r, r+N, ... of a step to process r,
                   so both see the same micro-batches).
       mdpo_fsdp   the same with the FSDP environment (the trainer prepares policy and optimizer together,
                   scores the reference through the sharded policy and keeps its outputs in float32).

   On CUDA: NCCL, precision "bf16" (bf16 base weights, float32 LoRA weights, bf16 autocast). On the CPU: gloo,
   float32, one thread per process. On the CPU accelerate ignores ACCELERATE_USE_FSDP (its distributed type
   stays MULTI_CPU), so the *_fsdp cases run DDP there; each run records the distributed type it really
   had ("distributed_type"), and a case whose FSDP did not engage says so in its notes.
3. Compares per-step training losses and gradient norms (each run's metrics.jsonl), the final eval loss
   (SFT), and the final trainable weights (``final/adapter_model.safetensors``): max absolute and max relative
   differences, weights as the largest per-tensor ||a - b|| / ||b|| (Frobenius). A case passes when every
   difference is within :data:`TOLERANCES` (bf16: losses 2e-2 relative; fp32: 1e-5) and the baseline's loss
   moved over the steps (two runs that train nothing would agree trivially).
4. Writes ``DIR/dist_train.json`` (after every case, atomically): per case the commands, the environment
   variables set, world sizes, per-step losses and grad norms of both runs, the differences, the verdict
   and wall times, or the error text and the traceback tail of a failed run (every process's log is kept in
   ``DIR/logs``). Prints a table at the end. Each case runs in its own try/except; a run that hangs is killed
   after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

CASES = ("sft_ddp", "sft_fsdp", "mdpo_ddp", "mdpo_fsdp")
FAMILIES = ("llama", "gemma2")
RESULTS_FILENAME = "dist_train.json"
WORKER_RESULT_FILENAME = "worker.json"
ADAPTER_FILENAME = "adapter_model.safetensors"

# Model sizes: small enough that process start-up dominates on two H200s, large enough that a step runs
# real GEMMs (the 32000-row classifier is the CCE loss's work).
LLAMA_SIZES = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                   tie_word_embeddings=False)
GEMMA2_SIZES = dict(LLAMA_SIZES, tie_word_embeddings=True, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0, query_pre_attn_scalar=64, sliding_window=512,
                    hidden_activation="gelu_pytorch_tanh")
TINY_OVERRIDES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

# The byte tokenizer's special tokens are <pad> 0, <bos> 1, <eos> 2 (bench/mdpo_memory.py). Its chat template
# opens a turn with <bos> + role and closes it with <eos>, so a turn's end-of-turn marker is one token.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<bos>' + message['role'] + '\\n' + message['content'] + '<eos>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<bos>assistant\\n' }}{% endif %}"
)

# Relative tolerances of a pass. bf16: the N-process run computes each row's activations in other GEMM shapes
# than the one-process run (rounding at 2^-8) and reduces gradients in another order; fp32: rounding only.
TOLERANCES = {
    "bf16": {"loss": 2e-2, "grad_norm": 5e-2, "eval_loss": 2e-2, "weights": 5e-2},
    "fp32": {"loss": 1e-5, "grad_norm": 1e-4, "eval_loss": 1e-4, "weights": 1e-4},
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a case trains, per device kind and size (the same for the baseline and the N-process run,
    except for how the global batch is split)."""

    sft_batch_per_process: int  # conversations per process per step in the N-process run
    sft_steps: int
    sft_max_length: int
    sft_learning_rate: float
    mdpo_batch_size: int  # pairs per micro-batch
    mdpo_steps: int
    mdpo_learning_rate: float
    lora_rank: int
    seed: int = 3


def run_settings(tiny: bool) -> RunSettings:
    if tiny:
        return RunSettings(sft_batch_per_process=1, sft_steps=4, sft_max_length=160, sft_learning_rate=3e-3,
                           mdpo_batch_size=2, mdpo_steps=3, mdpo_learning_rate=5e-3, lora_rank=4)
    return RunSettings(sft_batch_per_process=4, sft_steps=4, sft_max_length=512, sft_learning_rate=1e-3,
                       mdpo_batch_size=4, mdpo_steps=3, mdpo_learning_rate=2e-3, lora_rank=8)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder: model/, runs/, logs/ and dist_train.json")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batches (CPU smoke test)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="cuda (default when available: NCCL, bf16) or cpu (gloo, float32)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the distributed runs (default 2)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--family", choices=FAMILIES, default="llama", help="model shape (default llama)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer folder with a chat template (default: a byte tokenizer built here)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a run (one launch) is killed (default 300)")
    # Worker mode: one training run, started by the launcher (the baseline directly, the N-process run under
    # torch.distributed.run).
    parser.add_argument("--worker", choices=CASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.processes < 2:
        parser.error(f"--processes must be >= 2 (the distributed runs), got {args.processes}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.worker is None:
        if not args.out:
            parser.error("--out is required")
        if args.device == "cuda" and torch.cuda.device_count() < args.processes:
            parser.error(f"--device cuda with --processes {args.processes} needs {args.processes} GPUs, "
                         f"found {torch.cuda.device_count()}")
        if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
            parser.error(f"--tokenizer {args.tokenizer} is not a folder")
    elif not (args.model_folder and args.run_dir) or args.world not in (1, args.processes):
        parser.error("worker mode needs --model-folder, --run-dir and --world 1 or --processes")
    return args


# --------------------------------------------------------------------------------------------------
# The model folder


def chat_byte_tokenizer():
    """bench/mdpo_memory.py's byte tokenizer (one token per byte) with :data:`BYTE_CHAT_TEMPLATE`."""
    from mdpo_memory import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def build_model_folder(folder: Path, args: argparse.Namespace) -> dict:
    """Save a random-weight causal LM (float32) and its tokenizer to ``folder``; return a description."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmforge.models.loading import write_directory_atomically

    sizes = dict(LLAMA_SIZES if args.family == "llama" else GEMMA2_SIZES)
    if args.tiny:
        sizes.update(TINY_OVERRIDES)
        if args.family == "gemma2":
            sizes.update(query_pre_attn_scalar=16, sliding_window=64)
    if args.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--tokenizer {args.tokenizer} has no chat template; run_sft renders conversations "
                             f"with it")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        sizes["vocab_size"] = max(sizes["vocab_size"], len(tokenizer))
    else:
        tokenizer = chat_byte_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else tokenizer.eos_token_id)
    config = AutoConfig.for_model(args.family, **sizes, **special, use_cache=False)
    if args.family == "gemma2":
        config._attn_implementation = "eager"  # attention softcapping: transformers' advice for Gemma 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layer_class = type(model.model.layers[0]).__name__
    with write_directory_atomically(folder, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return {"family": args.family, "config": sizes, "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_layer_class": layer_class, "tokenizer": args.tokenizer or "byte tokenizer (259 tokens)",
            "tokenizer_size": len(tokenizer), "folder": str(folder)}


# --------------------------------------------------------------------------------------------------
# Worker mode: one training run


def make_pairs(n: int, *, seed: int, tiny: bool, token_range: tuple[int, int]) -> list:
    """``n`` synthetic M-DPO pairs: a shared prompt, then per trajectory a policy turn, a tool output, a final
    policy turn and a closing token (policy mask 1 on the policy turns only), random token ids."""
    from lmforge.agent.format import Trajectory
    from lmforge.prefs.pairs import PreferencePair

    low, high = token_range
    prompt_len, policy_len, tool_len, final_len = ((2, 4), (2, 5), (1, 3), (2, 4)) if tiny else \
        ((16, 48), (16, 64), (8, 32), (16, 48))
    rng = random.Random(seed)

    def trajectory(problem_id: str, sample_index: int, correct: bool, prompt: list[int]) -> Trajectory:
        ids, mask = list(prompt), [0] * len(prompt)
        for sampled, (shortest, longest) in ((1, policy_len), (0, tool_len), (1, final_len), (0, (1, 1))):
            length = rng.randint(shortest, longest)
            ids += [rng.randrange(low, high) for _ in range(length)]
            mask += [sampled] * length
        return Trajectory(input_ids=ids, policy_mask=mask, problem_id=problem_id, sample_index=sample_index,
                          correct=correct)

    pairs = []
    for index in range(n):
        prompt = [rng.randrange(low, high) for _ in range(rng.randint(*prompt_len))]
        pairs.append(PreferencePair(chosen=trajectory(f"p{index}", 0, True, prompt),
                                    rejected=trajectory(f"p{index}", 1, False, prompt)))
    return pairs


def sft_worker(args: argparse.Namespace, settings: RunSettings, precision: str) -> dict:
    from lmforge.models.sft import SFTConfig, run_sft

    global_batch = settings.sft_batch_per_process * args.processes
    n_train = global_batch * settings.sft_steps  # exactly one epoch of the global batch
    n_eval = max(2, n_train // 4)
    config = SFTConfig(model=args.model_folder, n_examples=n_train + n_eval, skills=["rate", "add_sub"],
                       levels=[1], max_length=settings.sft_max_length, eval_fraction=n_eval / (n_train + n_eval),
                       output_dir=args.run_dir, lora_rank=settings.lora_rank, lora_alpha=2.0 * settings.lora_rank,
                       learning_rate=settings.sft_learning_rate, max_steps=settings.sft_steps,
                       batch_size=global_batch // args.world, eval_batch_size=1, warmup=0, logging_steps=1,
                       save_steps=settings.sft_steps, eval_steps=settings.sft_steps, seed=settings.seed,
                       precision=precision, resume=False)
    result = run_sft(config)
    result["world_size"] = _process_count()
    if result["num_train_examples"] != n_train:
        raise RuntimeError(f"expected {n_train} training conversations (one epoch of the global batch), got "
                           f"{result['num_train_examples']}: the split or max_length dropped some")
    return {key: value for key, value in result.items() if isinstance(value, (int, float, str, type(None)))}


def mdpo_worker(args: argparse.Namespace, settings: RunSettings, precision: str) -> dict:
    from lmforge.models.loading import load_model
    from lmforge.models.lora import LoraAdapterConfig, attach_lora
    from lmforge.prefs.trainer import PrefTrainConfig, train_preferences

    model, tokenizer = load_model(args.model_folder, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.manual_seed(settings.seed)
    policy = attach_lora(model, LoraAdapterConfig(rank=settings.lora_rank, alpha=2.0 * settings.lora_rank))
    # PEFT starts lora_B at zero, where lora_A gets no gradient; random B values make the first step move
    # every adapter weight. The reference is this policy, so the first loss is still log 2.
    generator = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    accumulation = args.processes // args.world
    n_pairs = settings.mdpo_batch_size * args.processes * settings.mdpo_steps
    token_range = (32, min(259, len(tokenizer)))  # byte tokens; no special token of either tokenizer
    pairs = make_pairs(n_pairs, seed=settings.seed, tiny=args.tiny, token_range=token_range)
    config = PrefTrainConfig(loss="m_dpo", output_dir=args.run_dir, progress=False, warmup=0.0, seed=settings.seed,
                             precision=precision, learning_rate=settings.mdpo_learning_rate,
                             batch_size=settings.mdpo_batch_size, grad_accumulation=accumulation,
                             max_steps=settings.mdpo_steps, save_steps=settings.mdpo_steps, logging_steps=1,
                             resume=False)
    result = train_preferences(policy, tokenizer, pairs, config)
    return {key: value for key, value in result.items() if isinstance(value, (int, float, str, type(None)))}


def _process_count() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def accelerate_facts() -> dict:
    """How accelerate ran this process: distributed type, mixed precision, FSDP version, process count."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    facts = {"backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None}
    if AcceleratorState._shared_state:
        state = AcceleratorState()
        plugin = getattr(state, "fsdp_plugin", None)
        facts.update(distributed_type=state.distributed_type.value, mixed_precision=str(state.mixed_precision),
                     num_processes=state.num_processes,
                     fsdp_version=getattr(plugin, "fsdp_version", None) if plugin is not None else None)
    return facts


def worker_main(args: argparse.Namespace) -> int:
    """One training run; rank 0 writes ``worker.json`` into the run folder, a failing rank ``error-rank<r>.json``."""
    rank = int(os.environ.get("RANK", 0))
    run_dir = Path(args.run_dir)
    if args.device == "cpu":
        torch.set_num_threads(1)
    precision = "bf16" if args.device == "cuda" else "fp32"
    settings = run_settings(args.tiny)
    try:
        kind = args.worker.split("_")[0]
        result = (sft_worker if kind == "sft" else mdpo_worker)(args, settings, precision)
        result.update(accelerate_facts(), precision=precision)
        if rank == 0:
            _write_json(run_dir / WORKER_RESULT_FILENAME, result)
        return 0
    except BaseException as err:
        _write_json(run_dir / f"error-rank{rank}.json", error_record(err))
        raise


# --------------------------------------------------------------------------------------------------
# Launching runs


def fsdp_version_of_installed_accelerate() -> int:
    """2 when the installed accelerate's FSDP plugin has an fsdp_version field (it reads FSDP_VERSION), else 1."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    fields = {field.name for field in dataclasses.fields(FullyShardedDataParallelPlugin)}
    return 2 if "fsdp_version" in fields else 1


def accelerate_environment(case: str, device: str, layer_class: str) -> dict[str, str]:
    """The variables ``accelerate launch`` sets in each process (beside torchrun's RANK, WORLD_SIZE, ...):

        accelerate launch --multi_gpu --num_processes N --mixed_precision bf16 ...             (*_ddp on CUDA)
        accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
            --fsdp_transformer_layer_cls_to_wrap <decoder layer> --fsdp_state_dict_type FULL_STATE_DICT ...
                                                                                            (*_fsdp on CUDA)
        accelerate launch --cpu --num_processes N ...                                        (on the CPU)

    Other FSDP options keep accelerate launch's defaults (full sharding / reshard after forward, no offload,
    cpu_ram_efficient_loading and sync_module_states on)."""
    mixed_precision = "bf16" if device == "cuda" else "no"
    env = {"ACCELERATE_MIXED_PRECISION": mixed_precision, "ACCELERATE_DYNAMO_BACKEND": "NO",
           "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
           "ACCELERATE_DYNAMO_USE_DYNAMIC": "False", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"}
    if device == "cpu":
        # Without ACCELERATE_USE_CPU, Trainer on a machine without GPUs leaves each process training alone.
        env.update(ACCELERATE_USE_CPU="True", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if case.endswith("_fsdp"):
        version = fsdp_version_of_installed_accelerate()
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION=str(version), FSDP_SHARDING_STRATEGY="FULL_SHARD",
                   FSDP_RESHARD_AFTER_FORWARD="true" if version == 2 else "FULL_SHARD",
                   FSDP_OFFLOAD_PARAMS="false", FSDP_MIN_NUM_PARAMS=str(int(1e8)),
                   FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", FSDP_TRANSFORMER_CLS_TO_WRAP=layer_class,
                   FSDP_STATE_DICT_TYPE="FULL_STATE_DICT", FSDP_FORWARD_PREFETCH="false",
                   FSDP_USE_ORIG_PARAMS="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true",
                   FSDP_SYNC_MODULE_STATES="true", FSDP_ACTIVATION_CHECKPOINTING="false",
                   FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD="false")
    return env


# Variables a launcher or an outer job may have set; a run starts without them, then gets its own.
_INHERITED_PREFIXES = ("ACCELERATE_", "FSDP_", "TORCHELASTIC_")
_INHERITED_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT")


def launch(name: str, case: str, world: int, args: argparse.Namespace, folders: dict, layer_class: str) -> dict:
    """Run one training (a fresh run folder) in a subprocess; return its record: command, environment set,
    return code, wall time, the worker's result or the error."""
    run_dir = folders["runs"] / name
    log_path = folders["logs"] / f"{name}.log"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    worker_args = [str(Path(__file__).resolve()), "--worker", case, "--world", str(world), "--processes",
                   str(args.processes), "--model-folder", str(folders["model"]), "--run-dir", str(run_dir),
                   "--device", args.device] + (["--tiny"] if args.tiny else [])
    if world == 1:
        command = [sys.executable] + worker_args
        if args.device == "cpu":
            env_set = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        else:  # one visible GPU: a single Trainer process that sees several wraps the model in DataParallel
            env_set = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(world)] + worker_args
        env_set = accelerate_environment(case, args.device, layer_class)
    env = {key: value for key, value in os.environ.items()
           if key not in _INHERITED_NAMES and not key.startswith(_INHERITED_PREFIXES)}
    env.update(env_set)
    record = {"command": " ".join(command), "env": env_set, "world_size": world, "run_dir": str(run_dir),
              "log": str(log_path)}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # A session of its own, so that a timeout can end the launcher and every worker it started.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                   start_new_session=True)
        try:
            record["returncode"] = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have ended in the meantime
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            record["returncode"] = None
            record["error"] = f"timed out after {args.timeout:.0f} s (killed)"
    record["wall_s"] = time.perf_counter() - started
    result_path = run_dir / WORKER_RESULT_FILENAME
    if record["returncode"] == 0 and result_path.is_file():
        record["worker"] = json.loads(result_path.read_text())
    else:
        errors = sorted(run_dir.glob("error-rank*.json")) if run_dir.is_dir() else []
        if errors:
            first = json.loads(errors[0].read_text())
            record["error"] = f"{errors[0].stem}: {first['error']}"
            record["traceback"] = first["traceback"]
        record.setdefault("error", f"exit code {record['returncode']} without a result")
        record["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return record


# --------------------------------------------------------------------------------------------------
# Comparing two runs


def read_training_log(run_dir: Path) -> dict:
    """Per-step training losses and grad norms, and the last eval loss, from a run's metrics.jsonl
    (run_sft's Trainer logs and the preference trainer's lines both carry step, loss and grad_norm)."""
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [entry for entry in entries if "loss" in entry]
    evals = [entry["eval_loss"] for entry in entries if "eval_loss" in entry]
    return {"steps": [entry["step"] for entry in train], "losses": [entry["loss"] for entry in train],
            "grad_norms": [entry.get("grad_norm") for entry in train], "eval_loss": evals[-1] if evals else None}


def differences(values: list, reference: list) -> dict:
    """Max absolute and max relative (to |reference|) differences of two equally long number lists."""
    pairs = [(float(a), float(b)) for a, b in zip(values, reference) if a is not None and b is not None]
    if not pairs:
        return {"max_abs": None, "max_rel": None}
    return {"max_abs": max(abs(a - b) for a, b in pairs),
            "max_rel": max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)}


def weight_differences(path: Path, reference_path: Path) -> dict:
    """Differences of two adapter files: max absolute, and the largest per-tensor ||a - b|| / ||b||."""
    from safetensors.torch import load_file

    weights, reference = load_file(str(path)), load_file(str(reference_path))
    if set(weights) != set(reference):
        missing, extra = sorted(set(reference) - set(weights)), sorted(set(weights) - set(reference))
        raise ValueError(f"adapter tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    max_abs, max_rel, worst = 0.0, 0.0, None
    for name, expected in reference.items():
        actual, expected = weights[name].double(), expected.double()
        if actual.shape != expected.shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(actual.shape)}, the baseline's "
                             f"{tuple(expected.shape)}")
        max_abs = max(max_abs, float((actual - expected).abs().max()))
        relative = float((actual - expected).norm() / expected.norm().clamp(min=1e-30))
        if relative >= max_rel:
            max_rel, worst = relative, name
    return {"max_abs": max_abs, "max_rel": max_rel, "tensors": len(reference), "worst_tensor": worst}


def compare(baseline: dict, distributed: dict, tolerance: dict) -> dict:
    """The differences of two finished runs and the verdict against ``tolerance``."""
    base_dir, dist_dir = Path(baseline["run_dir"]), Path(distributed["run_dir"])
    base_log, dist_log = read_training_log(base_dir), read_training_log(dist_dir)
    comparison = {
        "steps": base_log["steps"],
        "baseline_losses": base_log["losses"], "distributed_losses": dist_log["losses"],
        "baseline_grad_norms": base_log["grad_norms"], "distributed_grad_norms": dist_log["grad_norms"],
        "baseline_eval_loss": base_log["eval_loss"], "distributed_eval_loss": dist_log["eval_loss"],
    }
    failed = []
    if base_log["steps"] != dist_log["steps"]:
        failed.append(f"logged steps differ: {base_log['steps']} vs {dist_log['steps']}")
    diffs = {"loss": differences(dist_log["losses"], base_log["losses"]),
             "grad_norm": differences(dist_log["grad_norms"], base_log["grad_norms"])}
    if base_log["eval_loss"] is not None or dist_log["eval_loss"] is not None:
        diffs["eval_loss"] = differences([dist_log["eval_loss"]], [base_log["eval_loss"]])
    diffs["weights"] = weight_differences(dist_dir / "final" / ADAPTER_FILENAME, base_dir / "final" / ADAPTER_FILENAME)
    for key, diff in diffs.items():
        if diff["max_rel"] is None:
            failed.append(f"{key}: missing in one run")
        elif not diff["max_rel"] <= tolerance[key]:  # also catches NaN
            failed.append(f"{key}: max relative difference {diff['max_rel']:.3g} > {tolerance[key]:g}")
    if len({round(loss, 6) for loss in base_log["losses"]}) < 2:
        failed.append("the baseline's loss did not move over the steps")
    comparison.update(differences=diffs, failed_checks=failed, verdict="pass" if not failed else "fail")
    return comparison


# --------------------------------------------------------------------------------------------------
# The launcher


def run_case(case: str, args: argparse.Namespace, folders: dict, model_info: dict, baselines: dict) -> dict:
    kind = case.split("_")[0]
    tolerance = TOLERANCES["bf16" if args.device == "cuda" else "fp32"]
    entry = {"case": case, "tolerance": tolerance, "notes": []}
    if kind not in baselines:  # one baseline per training kind, shared by its DDP and FSDP cases
        print(f"[{case}] baseline: 1 process ...", file=sys.stderr, flush=True)
        baselines[kind] = launch(f"{kind}_single", case, 1, args, folders, model_info["decoder_layer_class"])
    entry["baseline"] = baselines[kind]
    print(f"[{case}] {args.processes} processes ...", file=sys.stderr, flush=True)
    entry["distributed"] = launch(case, case, args.processes, args, folders, model_info["decoder_layer_class"])
    for role in ("baseline", "distributed"):
        if "error" in entry[role]:
            entry.update(verdict="error", error=f"{role} run failed: {entry[role]['error']}")
            return entry
    worker = entry["distributed"]["worker"]
    if case.endswith("_fsdp") and worker.get("distributed_type") != "FSDP":
        entry["notes"].append(f"FSDP did not engage: accelerate ran distributed type "
                              f"{worker.get('distributed_type')} (accelerate ignores ACCELERATE_USE_FSDP on the "
                              f"CPU); this compares DDP")
    entry.update(compare(entry["baseline"], entry["distributed"], tolerance))
    if worker.get("world_size") != args.processes:
        entry["verdict"] = "fail"
        entry["failed_checks"].append(f"the distributed run trained on {worker.get('world_size')} processes, "
                                      f"not {args.processes}")
    return entry


def launcher_main(args: argparse.Namespace) -> int:
    import accelerate
    import transformers

    out = Path(args.out).expanduser().resolve()
    folders = {"model": out / "model", "runs": out / "runs", "logs": out / "logs"}
    for folder in (out, folders["runs"], folders["logs"]):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"building the model folder {folders['model']} ...", file=sys.stderr, flush=True)
    model_info = build_model_folder(folders["model"], args)
    model_info["build_s"] = time.perf_counter() - started
    summary = {
        "benchmark": "dist_train_gpu: SFT and M-DPO under accelerate launch (DDP, FSDP) on N processes vs one",
        "device": device_description(args.device),
        "processes": args.processes,
        "precision": "bf16" if args.device == "cuda" else "fp32",
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "model": model_info,
        "settings": dataclasses.asdict(run_settings(args.tiny)),
        "tolerances": TOLERANCES["bf16" if args.device == "cuda" else "fp32"],
        "arguments": {key: value for key, value in vars(args).items() if key not in ("worker", "world",
                                                                                    "model_folder", "run_dir")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "peft": _version("peft"),
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": {},
    }
    baselines: dict = {}
    for case in args.cases:
        case_started = time.perf_counter()
        try:
            summary["cases"][case] = run_case(case, args, folders, model_info, baselines)
        except Exception as err:  # noqa: BLE001 - recorded, so the other cases still run
            summary["cases"][case] = {"case": case, "verdict": "error", **error_record(err)}
        summary["cases"][case]["wall_s"] = time.perf_counter() - case_started
        summary["total_wall_s"] = time.perf_counter() - started
        _write_json(out / RESULTS_FILENAME, summary)
    print(format_table(summary))
    print(f"results written to {out / RESULTS_FILENAME}")
    return 0


def format_table(summary: dict) -> str:
    def number(value) -> str:
        return "-" if value is None else f"{value:.2e}"

    lines = [f"{summary['processes']} processes vs 1, {summary['backend']}, {summary['precision']}, "
             f"{summary['device']}; tolerances (relative) {summary['tolerances']}",
             f"{'case':<10} {'dist type':<10} {'loss rel':>9} {'gnorm rel':>9} {'eval rel':>9} {'weight rel':>10} "
             f"{'verdict':<7} {'wall s':>6}"]
    for case, entry in summary["cases"].items():
        diffs = entry.get("differences", {})
        worker = entry.get("distributed", {}).get("worker", {})
        lines.append(f"{case:<10} {str(worker.get('distributed_type', '-')):<10} "
                     f"{number(diffs.get('loss', {}).get('max_rel')):>9} "
                     f"{number(diffs.get('grad_norm', {}).get('max_rel')):>9} "
                     f"{number(diffs.get('eval_loss', {}).get('max_rel')):>9} "
                     f"{number(diffs.get('weights', {}).get('max_rel')):>10} {entry['verdict']:<7} "
                     f"{entry.get('wall_s', 0.0):>6.1f}")
        for problem in entry.get("failed_checks", []) + entry.get("notes", []):
            lines.append(f"    {problem}")
        if "error" in entry:
            lines.append(f"    {entry['error'][:300]}")
    lines.append(f"total {summary.get('total_wall_s', 0.0):.1f} s")
    return "\n".join(lines)


def device_description(device: str) -> str:
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def error_record(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    return worker_main(args) if args.worker else launcher_main(args)


if __name__ == "__main__":
    sys.exit(main())

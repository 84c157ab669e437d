"""The online iterative M-DPO loop of Xiong et al. (2024): ``lmforge mdpo run --config FILE [--resume]``.

    result = run_mdpo_loop(MDPOLoopConfig(init_adapter="runs/quickstart/sft/final", iterations=2))

Iteration 0 evaluates the starting policy (the base model, or the base with ``init_adapter``). Then for
t = 1 .. ``iterations``, in the folder ``iter-<t>/``:

1. **sampling**: ``samples_per_prompt`` tool-using trajectories per training prompt from the current
   policy (temperature 1.0 by default), graded against the gold answers (``rollouts.jsonl``, streamed,
   so an interrupted sampling stage continues where it stopped). With ``previous_policy_samples`` = m,
   from iteration 2 on m of them come from the previous iteration's policy instead
   (``rollouts-previous-policy.jsonl``; their sample indices follow the current policy's). With
   ``split_prompts`` the prompt set is cut into ``iterations`` disjoint parts, one per iteration.
2. **pairs**: :func:`lmforge.prefs.pairs.build_preference_data` (``pairs.json``: the pairs and KTO
   examples as trajectory keys, and the counts).
3. **training**: :func:`lmforge.prefs.trainer.train_preferences` from the current policy's adapter, with
   reference = the previous iteration's policy (``reference="previous"``: the policy the trajectories
   were sampled from, i.e. the current one before training) or the fixed starting policy
   (``reference="initial"``; its log-probs are computed with the starting policy loaded on its own and
   freed before training). The trained adapter (``train/final/``, a PEFT folder) is the next policy.
   An iteration without a single pair (KTO: without trajectories of two prompts) trains nothing and
   keeps the policy.
4. **eval**: greedy accuracy and pass@k on held-out problems (:func:`lmforge.agent.evaluate.run_eval`,
   ``eval/``): the generated test split, or ``eval_data``.

State: ``state.json`` (written atomically) records each finished stage of each iteration with its
summary. ``run_mdpo_loop(config, resume=True)`` skips finished stages and continues an unfinished one
from its own saved progress (rollouts, training checkpoints, eval trajectories); nothing finished is
redone. Reports: ``iter-<t>/report.md`` (prompt coverage, pair counts, correct rate, training curves,
held-out accuracy and pass@k) and the run's ``report.md`` with ``progress.png`` (accuracy and correct
rate against the iteration).

Policies are LoRA adapters on one base model; the loop runs in one process (sampling and evaluation
generate with transformers; ``backend_factory`` can put another generation engine in their place for
sampling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.config import add_config_arguments, check_int, check_optional_string, config_from_args
from lmforge.files import write_text_atomic
from lmforge.prefs.trainer import PrefTrainConfig, use_bf16

STAGES = ("sampling", "pairs", "training", "eval")
REFERENCE_OPTIONS = ("previous", "initial")
STATE_FILENAME = "state.json"
ROLLOUTS_FILENAME = "rollouts.jsonl"
PREVIOUS_ROLLOUTS_FILENAME = "rollouts-previous-policy.jsonl"
STATE_FORMAT = "lmforge-mdpo-loop"
STATE_VERSION = 1
CONFIG_FILENAME = "config.yaml"
REPORT_FILENAME = "report.md"
PLOT_FILENAME = "progress.png"
# Options that may differ when a run is resumed (they do not change what was computed).
_RESUMABLE_CHANGES = ("output_dir", "iterations", "device", "progress", "save_steps")


@dataclasses.dataclass
class MDPOLoopConfig:
    """Options of ``lmforge mdpo run`` and :func:`run_mdpo_loop`.

    Policy: ``model`` (a Hugging Face folder, hub id or .gguf; None = the embedded SmolLM2-135M-Instruct),
    ``init_adapter`` (a PEFT LoRA folder to start from, e.g. an SFT adapter; None = the base model with a
    fresh adapter), ``device`` ("auto", "cpu", "cuda", ...), ``dtype`` ("auto" = bf16 on a bf16 GPU with
    LoRA, float32 otherwise), ``attn_implementation`` (transformers' attention kernel for sampling,
    training and evaluation, e.g. "flex_attention" for Gemma 2 on a GPU; None = transformers' default; see
    :func:`lmforge.models.loading.load_model`).

    Prompts: ``data`` (GSM8K- or MATH-style JSONL; None = ``n_prompts`` generated train-split problems of
    ``skills`` / ``levels``), ``split_prompts`` (disjoint parts, one per iteration).

    Sampling: ``samples_per_prompt`` (the paper uses 30), ``temperature``, ``top_p``, ``max_tool_calls``,
    ``max_new_tokens_per_turn``, ``max_total_tokens``, ``rollout_batch_size`` (trajectories in flight);
    ``previous_policy_samples``: from iteration 2 on, this many of each prompt's samples come from the
    previous iteration's policy (the one the current policy was trained from), the rest from the
    current one (0: on-policy only).

    Pairs: ``pairs_per_prompt`` (k), ``max_pair_length`` (longer trajectories are dropped; None =
    ``max_total_tokens``), ``drop_error_endings``.

    Training (see :class:`lmforge.prefs.trainer.PrefTrainConfig`): ``loss`` ("m_dpo", "dpo", "m_kto",
    "kto"), ``beta``, ``dpo_variant``, ``label_smoothing``, ``nll_coef``, ``normalize``,
    ``desirable_weight``, ``undesirable_weight``, ``reference`` ("previous" or "initial"), ``lora_*``,
    ``learning_rate``, ``epochs``, ``max_steps`` (per iteration), ``batch_size``, ``grad_accumulation``,
    ``warmup``, ``precision``, ``gradient_checkpointing``, ``rows_per_forward``, ``two_pass``,
    ``compile_layers``, ``cce_impl``, ``save_steps``;
    ``train_eval_problems`` > 0 evaluates greedy accuracy on that many validation-split problems every
    ``train_eval_steps`` steps and keeps the best checkpoint in ``train/best/`` (the next policy is
    still the final one).

    Evaluation (held out): ``eval_problems`` generated test-split problems (or ``eval_data``),
    ``eval_samples`` sampled trajectories per problem for pass@k (0 = greedy only), ``pass_k``,
    ``eval_temperature``.
    """

    model: str | None = None
    init_adapter: str | None = None
    output_dir: str = "runs/mdpo"
    iterations: int = 2
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    progress: bool = True
    # prompts
    data: str | None = None
    n_prompts: int = 256
    skills: list[str] | None = None
    levels: list[int] | None = None
    split_prompts: bool = True
    # sampling
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tool_calls: int = 4
    max_new_tokens_per_turn: int = 256
    max_total_tokens: int = 1024
    rollout_batch_size: int = 16
    previous_policy_samples: int = 0
    # pairs
    pairs_per_prompt: int = 1
    max_pair_length: int | None = None
    drop_error_endings: bool = True
    # training
    loss: str = "m_dpo"
    beta: float = 0.1
    dpo_variant: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_coef: float = 0.0
    normalize: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = "previous"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    learning_rate: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accumulation: int = 1
    warmup: float = 0.1
    precision: str = "auto"
    gradient_checkpointing: bool = False
    rows_per_forward: int | None = None
    two_pass: bool = False
    compile_layers: bool = False
    cce_impl: str = "auto"
    save_steps: int = 50
    train_eval_problems: int = 0
    train_eval_steps: int | None = None
    # evaluation
    eval_data: str | None = None
    eval_problems: int = 100
    eval_samples: int = 0
    pass_k: list[int] = dataclasses.field(default_factory=lambda: [1, 4])
    eval_temperature: float = 1.0

    def __post_init__(self) -> None:
        from lmforge.agent.tasks import LEVELS, SKILLS

        for name in ("model", "init_adapter", "data", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                    raise TypeError(f"{name} must be a non-empty path string or None, got {value!r}")
                setattr(self, name, os.fspath(value))
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise TypeError(f"output_dir must be a non-empty path string, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        check_optional_string("attn_implementation", self.attn_implementation)
        for name in ("iterations", "n_prompts", "samples_per_prompt", "max_new_tokens_per_turn",
                     "max_total_tokens", "rollout_batch_size", "pairs_per_prompt", "eval_problems"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("max_tool_calls", "eval_samples", "train_eval_problems", "seed", "previous_policy_samples"):
            check_int(name, getattr(self, name), minimum=0)
        if self.previous_policy_samples >= self.samples_per_prompt:
            raise ValueError(f"previous_policy_samples must be < samples_per_prompt ({self.samples_per_prompt}): the "
                             f"current policy keeps at least one sample per prompt, got {self.previous_policy_samples}")
        for name in ("max_pair_length", "train_eval_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("temperature", "eval_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("split_prompts", "drop_error_endings", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.reference not in REFERENCE_OPTIONS:
            raise ValueError(f"reference must be one of {REFERENCE_OPTIONS}, got {self.reference!r}")
        if self.split_prompts and self.data is None and self.n_prompts < self.iterations:
            raise ValueError(f"split_prompts needs n_prompts >= iterations ({self.iterations}), got {self.n_prompts}")
        if self.skills is not None:
            if isinstance(self.skills, str):
                self.skills = [self.skills]
            unknown = [s for s in self.skills if s not in SKILLS] if isinstance(self.skills, (list, tuple)) else None
            if unknown is None or unknown or not self.skills:
                raise ValueError(f"skills must be a non-empty list of {SKILLS} or None, got {self.skills!r}")
            self.skills = list(self.skills)
        if self.levels is not None:
            if isinstance(self.levels, int) and not isinstance(self.levels, bool):
                self.levels = [self.levels]
            if not isinstance(self.levels, (list, tuple)) or not self.levels or any(
                    isinstance(v, bool) or v not in LEVELS for v in self.levels):
                raise ValueError(f"levels must be a non-empty list of {LEVELS} or None, got {self.levels!r}")
            self.levels = list(self.levels)
        if isinstance(self.pass_k, int) and not isinstance(self.pass_k, bool):
            self.pass_k = [self.pass_k]
        if not isinstance(self.pass_k, (list, tuple)) or not self.pass_k:
            raise TypeError(f"pass_k must be a non-empty list of ints, got {self.pass_k!r}")
        for k in self.pass_k:
            check_int("pass_k", k, minimum=1)
        self.pass_k = list(self.pass_k)
        if self.eval_samples and max(self.pass_k) > self.eval_samples:
            raise ValueError(f"pass_k {self.pass_k} needs eval_samples >= {max(self.pass_k)}, got {self.eval_samples}")
        if self.train_eval_steps is not None and self.train_eval_problems == 0:
            raise ValueError("train_eval_steps needs train_eval_problems > 0 (the validation problems to evaluate)")
        self.train_config(Path(self.output_dir))  # the training options are checked by PrefTrainConfig

    def train_config(self, output_dir: Path, *, reference: str = "policy") -> PrefTrainConfig:
        """The :class:`PrefTrainConfig` of one iteration's training stage."""
        return PrefTrainConfig(
            loss=self.loss, beta=self.beta, dpo_variant=self.dpo_variant, label_smoothing=self.label_smoothing,
            nll_coef=self.nll_coef, normalize=self.normalize, desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight, reference=reference, finetune="lora",
            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            learning_rate=self.learning_rate, epochs=self.epochs, max_steps=self.max_steps,
            batch_size=self.batch_size, grad_accumulation=self.grad_accumulation, warmup=self.warmup,
            precision=self.precision, gradient_checkpointing=self.gradient_checkpointing,
            rows_per_forward=self.rows_per_forward, two_pass=self.two_pass, compile_layers=self.compile_layers,
            cce_impl=self.cce_impl, seed=self.seed, output_dir=str(output_dir), save_steps=self.save_steps,
            eval_steps=self.train_eval_steps, progress=self.progress)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Prompts and models


def training_prompts(config: MDPOLoopConfig) -> list[list[Any]]:
    """The prompts of each iteration (a list per iteration): disjoint parts of one seeded shuffle with
    ``split_prompts``, else the whole set every time."""
    from lmforge.agent import tasks

    if config.data is None:
        problems = tasks.generate_problems(config.n_prompts, skills=config.skills, levels=config.levels,
                                           split="train", seed=config.seed)
    else:
        path = Path(config.data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data {path} does not exist")
        head = path.read_text(encoding="utf-8", errors="replace")[:4096] if path.is_file() else ""
        loader = tasks.load_math if '"problem"' in head else tasks.load_gsm8k
        problems = loader(str(path), limit=config.n_prompts)
    if not config.split_prompts:
        return [list(problems) for _ in range(config.iterations)]
    if len(problems) < config.iterations:
        raise ValueError(f"split_prompts needs at least one prompt per iteration: {len(problems)} prompts for "
                         f"{config.iterations} iterations")
    order = list(range(len(problems)))
    random.Random(f"lmforge-mdpo-prompts:{config.seed}").shuffle(order)
    bounds = [round(len(order) * t / config.iterations) for t in range(config.iterations + 1)]
    return [[problems[i] for i in sorted(order[bounds[t]:bounds[t + 1]])] for t in range(config.iterations)]


def _device(config: MDPOLoopConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def _dtype(config: MDPOLoopConfig) -> Any:
    if config.dtype != "auto":
        return config.dtype
    # LoRA leaves the base weights frozen, so bf16 copies lose nothing the optimizer would use.
    return torch.bfloat16 if use_bf16(config.precision) and _device(config) != "cpu" else torch.float32


def _load_policy(config: MDPOLoopConfig, adapter: str | None, *, trainable: bool, device: str | None = None):
    """``(model, tokenizer)``: the base model with ``adapter`` (frozen, or trainable), or without any."""
    from lmforge.models.loading import load_model
    from lmforge.models.lora import load_lora

    device = device or _device(config)
    model, tokenizer = load_model(config.model, dtype=_dtype(config), device=device,
                                  attn_implementation=config.attn_implementation)
    if adapter is not None:
        model = load_lora(model, adapter, trainable=trainable)
    return model, tokenizer


def _tool_role(tokenizer: Any) -> str:
    from lmforge.models.sft import template_renders_tool_role

    return "tool" if template_renders_tool_role(tokenizer) else "user"


def _release_memory() -> None:
    """Hand cached GPU memory back after a stage drops its model, so the next model fits."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# State


def _new_state() -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "iterations": {}}


def _load_state(run_dir: Path, config: MDPOLoopConfig, resume: bool) -> dict:
    path = run_dir / STATE_FILENAME
    if not path.is_file():
        return _new_state()
    if not resume:
        raise FileExistsError(f"{run_dir} already holds an M-DPO loop ({STATE_FILENAME}); pass resume=True "
                              f"(--resume) to continue it or choose a new output_dir")
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a version-{STATE_VERSION} {STATE_FORMAT} state file")
    saved_path = run_dir / CONFIG_FILENAME
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        current = config.to_dict()
        fixed = [n for n in current if n not in _RESUMABLE_CHANGES or (n == "iterations" and config.split_prompts)]
        changed = [n for n in fixed if n in saved and saved[n] != current[n]]
        if changed:
            details = ", ".join(f"{n}: {saved[n]!r} -> {current[n]!r}" for n in changed)
            raise ValueError(f"cannot resume the loop in {run_dir} with different settings ({details}); use a new "
                             f"output_dir or restore those options")
    return state


def _save_state(run_dir: Path, state: dict) -> None:
    write_text_atomic(run_dir / STATE_FILENAME, json.dumps(state, indent=1) + "\n")


def _iteration_dir(run_dir: Path, t: int) -> Path:
    return run_dir / f"iter-{t:02d}"


def _policy_before(state: dict, config: MDPOLoopConfig, t: int) -> str | None:
    """The adapter of the policy at the start of iteration ``t``: the newest trained one, or the initial."""
    for previous in range(t - 1, 0, -1):
        policy = state["iterations"].get(str(previous), {}).get("training", {}).get("policy")
        if policy is not None:
            return policy
    return config.init_adapter


# --------------------------------------------------------------------------------------------------
# Stages


def _sample(config: MDPOLoopConfig, prompts: Sequence[Any], adapter: str | None, samples: int, seed: int,
            output: Path, backend_factory: Callable | None) -> list[Any]:
    """``samples`` graded trajectories per prompt from the policy ``adapter``, streamed to ``output``."""
    from lmforge.agent.rollout import RolloutConfig, TransformersBackend, run_rollouts

    model, tokenizer = _load_policy(config, adapter, trainable=False)
    model.eval()
    if backend_factory is not None:
        backend = backend_factory(model, tokenizer)
    else:
        backend = TransformersBackend(model, tokenizer)
    rollout_config = RolloutConfig(
        samples_per_problem=samples, temperature=float(config.temperature),
        top_p=float(config.top_p), seed=seed, max_tool_calls=config.max_tool_calls,
        max_new_tokens_per_turn=config.max_new_tokens_per_turn, max_total_tokens=config.max_total_tokens,
        batch_size=config.rollout_batch_size, tool_role=_tool_role(tokenizer),
        output_path=str(output), progress=config.progress)
    with torch.no_grad():
        trajectories = run_rollouts(prompts, backend, tokenizer, rollout_config)
    del model, backend
    _release_memory()
    return trajectories


def _sampling_stage(config: MDPOLoopConfig, t: int, prompts: Sequence[Any], adapter: str | None,
                    folder: Path, backend_factory: Callable | None, *, previous: tuple[str | None] | None = None
                    ) -> dict:
    """Sample and grade iteration ``t``'s trajectories; ``previous`` = (the previous policy's adapter,)
    when some samples come from it (``config.previous_policy_samples``)."""
    started = time.perf_counter()
    from_previous = config.previous_policy_samples if previous is not None else 0
    current = _sample(config, prompts, adapter, config.samples_per_prompt - from_previous, config.seed * 1000 + t,
                      folder / ROLLOUTS_FILENAME, backend_factory)
    older = []
    if from_previous:
        older = _sample(config, prompts, previous[0], from_previous, config.seed * 1000 + t + 500,
                        folder / PREVIOUS_ROLLOUTS_FILENAME, backend_factory)
    trajectories = _merge_rollouts(current, older, config.samples_per_prompt - from_previous)
    by_prompt: dict[str, list[bool]] = {}
    for trajectory in trajectories:
        by_prompt.setdefault(trajectory.problem_id, []).append(bool(trajectory.correct))
    return {
        "policy": adapter,
        "previous_policy": previous[0] if from_previous else None,
        "previous_policy_trajectories": len(older),
        "previous_policy_correct_rate": (sum(bool(t.correct) for t in older) / len(older)) if older else None,
        "prompts": len(by_prompt),
        "trajectories": len(trajectories),
        "correct_rate": sum(sum(v) for v in by_prompt.values()) / max(1, len(trajectories)),
        "prompts_with_correct": sum(any(v) for v in by_prompt.values()),
        "prompts_with_incorrect": sum(not all(v) for v in by_prompt.values()),
        "tool_use_rate": sum(bool(t.tool_calls) for t in trajectories) / max(1, len(trajectories)),
        "mean_policy_tokens": sum(t.num_policy_tokens for t in trajectories) / max(1, len(trajectories)),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _merge_rollouts(current: Sequence[Any], older: Sequence[Any], offset: int) -> list[Any]:
    """One rollout of both policies' trajectories: the previous policy's get sample indices from
    ``offset`` on (pairs name trajectories by problem and sample index) and ``metadata["policy"]``."""
    merged = list(current)
    for trajectory in older:
        merged.append(dataclasses.replace(trajectory, sample_index=trajectory.sample_index + offset,
                                          metadata={**trajectory.metadata, "policy": "previous"}))
    return merged


def _read_rollouts(folder: Path, config: MDPOLoopConfig) -> list[Any]:
    from lmforge.agent.format import read_trajectories

    current = read_trajectories(folder / ROLLOUTS_FILENAME)
    if not (folder / PREVIOUS_ROLLOUTS_FILENAME).is_file():
        return current
    offset = config.samples_per_prompt - config.previous_policy_samples
    return _merge_rollouts(current, read_trajectories(folder / PREVIOUS_ROLLOUTS_FILENAME), offset)


def _pairs_stage(config: MDPOLoopConfig, folder: Path) -> dict:
    from lmforge.prefs.pairs import PairConfig, build_preference_data

    data = build_preference_data(_read_rollouts(folder, config), PairConfig(
        k=config.pairs_per_prompt, max_length=config.max_pair_length or config.max_total_tokens, seed=config.seed,
        drop_error_endings=config.drop_error_endings))
    record = {
        "stats": data.stats,
        "pairs": [[p.chosen.problem_id, p.chosen.sample_index, p.rejected.sample_index] for p in data.pairs],
        "kto_examples": [[e.trajectory.problem_id, e.trajectory.sample_index, e.desirable] for e in data.kto_examples],
    }
    write_text_atomic(folder / "pairs.json", json.dumps(record) + "\n")
    return dict(data.stats)


def _read_preference_data(config: MDPOLoopConfig, folder: Path) -> Any:
    """The PreferenceData the pairs stage chose, rebuilt from ``pairs.json`` and the rollouts."""
    from lmforge.prefs.pairs import KTOExample, PreferenceData, PreferencePair

    record = json.loads((folder / "pairs.json").read_text())
    trajectories = {t.key(): t for t in _read_rollouts(folder, config)}
    pairs = [PreferencePair(chosen=trajectories[(pid, chosen)], rejected=trajectories[(pid, rejected)])
             for pid, chosen, rejected in record["pairs"]]
    examples = [KTOExample(trajectories[(pid, index)], desirable=desirable)
                for pid, index, desirable in record["kto_examples"]]
    return PreferenceData(pairs=pairs, kto_examples=examples, stats=record["stats"])


def _nothing_to_train(config: MDPOLoopConfig, data: Any) -> str | None:
    if config.loss in ("m_kto", "kto"):
        if len({e.trajectory.problem_id for e in data.kto_examples}) < 2:
            return "fewer than two prompts have trajectories left (KTO's KL estimate needs two)"
        return None
    if not data.pairs:
        return "no prompt has both a correct and an incorrect trajectory"
    return None


def _training_stage(config: MDPOLoopConfig, t: int, adapter: str | None, folder: Path) -> dict:
    from lmforge.prefs.trainer import compile_decoder_layers, compute_reference_logps, make_agent_eval, \
        prepare_batches, train_preferences

    data = _read_preference_data(config, folder)
    reason = _nothing_to_train(config, data)
    if reason is not None:
        return {"skipped": reason, "policy": adapter}
    train_dir = folder / "train"
    reference_logps = None
    reference = "policy"  # the current policy before training = the previous iteration's policy
    if config.reference == "initial" and t > 1:
        if config.init_adapter is None:
            reference = "base"  # the initial policy was the base model (a fresh adapter is the identity)
        elif not (train_dir / "reference_logps.pt").is_file():
            # Score with the initial policy loaded on its own, then free it: one model resident at a time.
            initial, tokenizer = _load_policy(config, config.init_adapter, trainable=False)
            train_config = config.train_config(train_dir)
            batches = prepare_batches(data, train_config, _pad_id(tokenizer))
            if config.compile_layers:  # the same kernels as the policy that is trained against these
                compile_decoder_layers(initial)
            reference_logps = compute_reference_logps(initial, batches, train_config, progress=config.progress)
            del initial
            _release_memory()
    train_config = config.train_config(train_dir, reference=reference)
    model, tokenizer = _load_policy(config, adapter, trainable=True, device="cpu")  # the trainer places it
    eval_fn = None
    if config.train_eval_problems:
        from lmforge.agent.rollout import RolloutConfig
        from lmforge.agent.tasks import generate_problems

        problems = generate_problems(config.train_eval_problems, skills=config.skills, levels=config.levels,
                                     split="validation", seed=config.seed)
        eval_fn = make_agent_eval(problems, tokenizer, RolloutConfig(
            max_tool_calls=config.max_tool_calls, max_new_tokens_per_turn=config.max_new_tokens_per_turn,
            max_total_tokens=config.max_total_tokens, batch_size=config.rollout_batch_size,
            tool_role=_tool_role(tokenizer), progress=False))
    result = train_preferences(model, tokenizer, data, train_config, reference_logps=reference_logps,
                               eval_fn=eval_fn)
    del model, result["model"]
    _release_memory()
    keep = ("global_step", "loss", "reward_accuracy", "reward_margin", "best_eval", "best_step", "num_examples",
            "num_batches", "wall_seconds", "final_dir", "best_dir", "plot_path", "report_path")
    summary = {key: result[key] for key in keep}
    summary.update(policy=result["final_dir"], reference="initial" if config.reference == "initial" and t > 1
                   else "previous")
    return summary


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad or eos token id to pad batches with")
    return int(pad)


def _eval_stage(config: MDPOLoopConfig, adapter: str | None, folder: Path) -> dict:
    from lmforge.agent.evaluate import EvalConfig, run_eval

    model, tokenizer = _load_policy(config, adapter, trainable=False)
    eval_config = EvalConfig(
        model=config.model, adapter=adapter, data=config.eval_data, n_problems=config.eval_problems, split="test",
        levels=config.levels, skills=config.skills, samples=config.eval_samples, pass_k=config.pass_k,
        temperature=float(config.eval_temperature), max_tool_calls=config.max_tool_calls,
        max_new_tokens_per_turn=config.max_new_tokens_per_turn, max_total_tokens=config.max_total_tokens,
        batch_size=config.rollout_batch_size, seed=config.seed, output_dir=str(folder / "eval"))
    with torch.no_grad():
        metrics = run_eval(eval_config, model=model, tokenizer=tokenizer)
    del model
    _release_memory()
    metrics["policy"] = adapter
    return metrics


# --------------------------------------------------------------------------------------------------
# The loop


def run_mdpo_loop(config: MDPOLoopConfig, resume: bool = False, *,
                  backend_factory: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the online iterative preference loop; return its summary.

    ``backend_factory(model, tokenizer)`` makes the sampling stage's generation backend (any
    :class:`lmforge.agent.rollout.GenerationBackend`; default: the transformers backend on the policy).

    Returns a dict: ``iterations`` (the per-iteration stage summaries, iteration 0 = the starting
    policy's evaluation), ``accuracy`` (held-out greedy accuracy per iteration), ``policy`` (the final
    adapter folder, None if nothing was trained), and the paths ``run_dir``, ``report_path``,
    ``plot_path``, ``state_path``.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, MDPOLoopConfig):
        raise TypeError(f"config must be an MDPOLoopConfig, got {type(config).__name__}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if backend_factory is not None and not callable(backend_factory):
        raise TypeError(f"backend_factory must be callable or None, got {type(backend_factory).__name__}")
    if config.init_adapter is not None:
        from lmforge.models.lora import check_lora_folder

        check_lora_folder(Path(config.init_adapter).expanduser())
    run_dir = Path(config.output_dir).expanduser().resolve()
    state = _load_state(run_dir, config, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILENAME, yaml.safe_dump(config.to_dict(), sort_keys=False))
    prompts = training_prompts(config)

    todo = ([(0, "eval")] + [(t, stage) for t in range(1, config.iterations + 1) for stage in STAGES])
    bar = tqdm(total=len(todo), desc="mdpo loop", unit="stage", disable=not config.progress)
    try:
        for t, stage in todo:
            record = state["iterations"].setdefault(str(t), {})
            if stage in record:
                bar.update(1)
                continue
            folder = _iteration_dir(run_dir, t)
            folder.mkdir(parents=True, exist_ok=True)
            bar.set_postfix_str(f"iteration {t}: {stage}")
            adapter = _policy_before(state, config, t)
            if stage == "sampling":
                mixed = (_policy_before(state, config, t - 1),) if t > 1 and config.previous_policy_samples else None
                record[stage] = _sampling_stage(config, t, prompts[t - 1], adapter, folder, backend_factory,
                                                previous=mixed)
            elif stage == "pairs":
                record[stage] = _pairs_stage(config, folder)
            elif stage == "training":
                record[stage] = _training_stage(config, t, adapter, folder)
            else:
                trained = _policy_before(state, config, t + 1) if t > 0 else config.init_adapter
                record[stage] = _eval_stage(config, trained, folder)
            _save_state(run_dir, state)
            if t > 0 and stage == "eval":
                write_text_atomic(folder / REPORT_FILENAME, _iteration_report(config, t, record, run_dir))
            bar.update(1)
    finally:
        bar.close()

    accuracy = {int(t): record["eval"]["accuracy"] for t, record in state["iterations"].items() if "eval" in record}
    plot_progress(state, run_dir / PLOT_FILENAME, config.pass_k if config.eval_samples else ())
    write_text_atomic(run_dir / REPORT_FILENAME, _run_report(config, state))
    return {
        "iterations": {int(t): record for t, record in state["iterations"].items()},
        "accuracy": accuracy,
        "policy": _policy_before(state, config, config.iterations + 1),
        "run_dir": str(run_dir),
        "report_path": str(run_dir / REPORT_FILENAME),
        "plot_path": str(run_dir / PLOT_FILENAME),
        "state_path": str(run_dir / STATE_FILENAME),
    }


# --------------------------------------------------------------------------------------------------
# Plots and reports


def plot_progress(state: Mapping[str, Any], path: Path, pass_k: Sequence[int] = ()) -> None:
    """Held-out greedy accuracy (and pass@k) and the sampling correct rate against the iteration (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    iterations = sorted((int(t), record) for t, record in state["iterations"].items())
    figure = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    evals = [(t, r["eval"]) for t, r in iterations if "eval" in r]
    if evals:
        axes.plot([t for t, _ in evals], [m["accuracy"] for _, m in evals], "o-", label="held-out greedy accuracy")
        for k in pass_k:
            points = [(t, m[f"pass@{k}"]) for t, m in evals if f"pass@{k}" in m]
            if points:
                axes.plot(*zip(*points), "s--", label=f"held-out pass@{k}")
    sampled = [(t, r["sampling"]["correct_rate"]) for t, r in iterations if "sampling" in r]
    if sampled:
        axes.plot(*zip(*sampled), "^:", label="correct rate of the samples")
    axes.set_xlabel("iteration (0 = starting policy)")
    axes.set_ylabel("share")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xticks([t for t, _ in iterations])
    axes.grid(alpha=0.3)
    if evals or sampled:
        axes.legend(fontsize=8)
    axes.set_title("online iterative preference learning")
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if percent else f"{value:.4f}"
    return str(value)


def _iteration_report(config: MDPOLoopConfig, t: int, record: Mapping[str, Any], run_dir: Path) -> str:
    sampling, pairs, training, evaluation = (record.get(stage, {}) for stage in STAGES)
    prompts = max(1, sampling.get("prompts", 0))
    lines = [
        f"# M-DPO loop, iteration {t} ({config.loss})",
        "",
        f"Policy sampled from: {sampling.get('policy') or 'the base model'}"
        + (f"; {sampling['previous_policy_trajectories']} trajectories ({config.previous_policy_samples} per prompt, "
           f"correct rate {_fmt(sampling.get('previous_policy_correct_rate'), True)}) from the previous policy: "
           f"{sampling.get('previous_policy') or 'the base model'}" if sampling.get("previous_policy_trajectories")
           else ""),
        "",
        "## Sampling",
        "",
        "| metric | value |",
        "|---|---|",
        f"| prompts | {sampling.get('prompts')} |",
        f"| trajectories | {sampling.get('trajectories')} ({config.samples_per_prompt} per prompt, temperature "
        f"{config.temperature:g}) |",
        f"| correct rate | {_fmt(sampling.get('correct_rate'), True)} |",
        f"| prompt coverage (at least one correct) | {sampling.get('prompts_with_correct')} "
        f"({sampling.get('prompts_with_correct', 0) / prompts:.1%}) |",
        f"| tool use rate | {_fmt(sampling.get('tool_use_rate'), True)} |",
        "",
        "## Pairs",
        "",
        "| metric | value |",
        "|---|---|",
        f"| pairs | {pairs.get('pairs')} |",
        f"| prompts with a pair | {pairs.get('prompts_with_pair')} "
        f"({pairs.get('prompts_with_pair', 0) / prompts:.1%}) |",
        f"| prompts all correct / all incorrect / all dropped | {pairs.get('all_correct')} / "
        f"{pairs.get('all_incorrect')} / {pairs.get('all_dropped')} |",
        f"| trajectories dropped: too long / error ending / no policy token | {pairs.get('dropped_length')} / "
        f"{pairs.get('dropped_error')} / {pairs.get('dropped_no_policy_tokens')} |",
        f"| KTO examples desirable / undesirable | {pairs.get('kto_desirable')} / {pairs.get('kto_undesirable')} |",
        "",
        "## Training",
        "",
    ]
    if "skipped" in training:
        lines += [f"Skipped: {training['skipped']}; the policy is unchanged.", ""]
    else:
        curves = Path(training["plot_path"]).relative_to(_iteration_dir(run_dir, t))
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| reference | {training.get('reference')} iteration's policy |",
            f"| optimizer steps | {training.get('global_step')} |",
            f"| last loss | {_fmt(training.get('loss'))} |",
            f"| last reward accuracy | {_fmt(training.get('reward_accuracy'))} |",
            f"| last reward margin | {_fmt(training.get('reward_margin'))} |",
            "",
            f"![training curves]({curves})",
            "",
        ]
    lines += ["## Held-out evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in evaluation.items()
              if isinstance(value, float) and (key in ("accuracy", "tool_use_rate", "unanswered_rate")
                                               or key.startswith("pass@"))]
    lines += ["", "![held-out accuracy](eval/accuracy.png)", ""]
    return "\n".join(lines)


def _run_report(config: MDPOLoopConfig, state: Mapping[str, Any]) -> str:
    ks = config.pass_k if config.eval_samples else []
    header = ["iteration", "prompts", "correct rate", "coverage", "pairs", "all correct / incorrect", "train loss",
              "reward acc.", "held-out acc."] + [f"pass@{k}" for k in ks]
    lines = [
        f"# Online iterative {config.loss} loop",
        "",
        f"- model: {config.model or 'embedded SmolLM2-135M-Instruct'}; starting adapter: "
        f"{config.init_adapter or 'none (base model)'}",
        f"- {config.iterations} iterations; prompts: "
        f"{config.data or f'{config.n_prompts} generated train-split problems'}"
        f"{', split into disjoint parts per iteration' if config.split_prompts else ', all in every iteration'}; "
        f"{config.samples_per_prompt} samples per prompt at temperature {config.temperature:g}",
        f"- loss {config.loss}, beta {config.beta:g}, reference: {config.reference} policy; LoRA rank "
        f"{config.lora_rank}",
        f"- held-out: {config.eval_data or f'{config.eval_problems} generated test-split problems'}"
        f"{f', pass@k from {config.eval_samples} samples' if config.eval_samples else ''}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for t, record in sorted((int(t), r) for t, r in state["iterations"].items()):
        sampling, pairs, training, evaluation = (record.get(stage, {}) for stage in STAGES)
        coverage = (sampling["prompts_with_correct"] / max(1, sampling["prompts"])) if sampling else None
        row = [str(t), _fmt(sampling.get("prompts")), _fmt(sampling.get("correct_rate"), True), _fmt(coverage, True),
               _fmt(pairs.get("pairs")),
               f"{pairs['all_correct']} / {pairs['all_incorrect']}" if pairs else "-",
               "skipped" if "skipped" in training else _fmt(training.get("loss")),
               _fmt(training.get("reward_accuracy")), _fmt(evaluation.get("accuracy"), True)]
        row += [_fmt(evaluation.get(f"pass@{k}"), True) for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![progress]({PLOT_FILENAME})", "",
              "Iteration 0 is the starting policy. Per iteration: iter-NN/report.md (sampling, pairs, training "
              "curves, held-out metrics); stage summaries in state.json.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI


def add_mdpo_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mdpo`` with ``run`` (``lmforge mdpo run --config FILE [--resume]``) to an argparse subparsers
    object."""
    mdpo = subparsers.add_parser("mdpo", help="multi-turn iterative preference learning (M-DPO / M-KTO)")
    commands = mdpo.add_subparsers(dest="mdpo_command", required=True)
    run = commands.add_parser(
        "run", help="the online loop: sample, grade, build pairs, train, evaluate; repeat",
        description="Online iterative M-DPO / M-KTO for the tool-using math agent. Options come from --config FILE "
                    "(YAML/JSON) and are overridden by flags.")
    add_config_arguments(run, MDPOLoopConfig)
    run.add_argument("--resume", action="store_true", help="continue the loop saved in output_dir")
    run.set_defaults(func=_run_command)
    return mdpo


def _run_command(args: argparse.Namespace) -> int:
    config = config_from_args(MDPOLoopConfig, args)
    result = run_mdpo_loop(config, resume=args.resume)
    for t, accuracy in sorted(result["accuracy"].items()):
        print(f"iteration {t}: held-out greedy accuracy {accuracy:.1%}")
    print(f"run folder: {result['run_dir']} (report {result['report_path']}, final policy {result['policy']})")
    return 0

"""LoRA experts of one base model, each trained briefly on one generated skill; the input of an evolution run.

``make_experts(ExpertsConfig(...))`` (CLI: ``lmforge evolve make-experts``) does, for each skill of
:data:`lmforge.agent.tasks.SKILLS` asked for:

1. ``n_train`` training problems of that skill (``generate_problems(split="train")``), encoded in the
   direct-answer format of :mod:`lmforge.evolve.fitness` (question -> ``\\boxed{answer}``), the format
   the evolution's fitness evaluates;
2. a fresh LoRA adapter (A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT initialises it, B = 0), trained for
   ``steps`` AdamW steps on the negative log-likelihood of the reply tokens, computed through
   :func:`lmforge.models.logprobs.token_logprobs` (lmforge.cce: no logit matrix);
3. saved as a PEFT folder ``<output_dir>/experts/<skill>/`` (with ``training.json``: the losses),
   which appears atomically, so a crashed run resumes by skipping the experts already saved.

With ``shared_init`` (the default) every expert starts from the *same* A initialisation: experts that
share a starting point merge more meaningfully factor by factor (as fine-tunes of one checkpoint do),
which is what GENOME's crossover and LoraHub's weighted sums do.

With ``frozen_a`` as well, only the B matrices are trained (as LoRA-FA does) and every expert keeps that
shared A. Then a factor-wise merge is exactly the same merge of the experts' weight deltas:
``(sum_i w_i B_i) A = sum_i w_i (B_i A)``. Without it, A moves far from its initialisation (on the
embedded model, 48 or 96 AdamW steps at lr 2e-3 moved it by 1.5-1.6 times its initial norm), so a merge
of factors, ``(sum_i w_i B_i)(sum_j w_j A_j)``, shrinks each expert's own product by w_i^2 and adds the
cross products B_i A_j of unrelated experts.

The training loop is our own small one, not ``lmforge.models.sft.run_sft``: run_sft trains on
tool-integrated solutions, while the fitness here asks for direct answers, and a model trained on the
first format does not answer in the second.

Finally ``<output_dir>/evolve.yaml`` is written: an :class:`~lmforge.evolve.run.EvolveConfig` for a new
task that mixes skills (``task_skills``), with ``n_validation`` validation and ``n_test`` held-out test
problems, ready for ``lmforge evolve --config <output_dir>/evolve.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from lmforge.agent.tasks import LEVELS, SKILLS, generate_problems
from lmforge.evolve.fitness import (
    SYSTEM_PROMPT,
    AnswerExample,
    copy_into_parameters,
    encode_answer_examples,
    lora_parameters,
    pad_sequences,
)
from lmforge.evolve.population import Adapter
from lmforge.models.loading import write_directory_atomically
from lmforge.models.lora import check_lora_folder

TRAINING_RECORD = "training.json"


@dataclasses.dataclass
class ExpertsConfig:
    """Settings of ``lmforge evolve make-experts``.

    output_dir: experts go to ``<output_dir>/experts/<skill>/``, the evolution config to ``evolve.yaml``.
    model / dtype / device: the base model (None: the embedded SmolLM2-135M-Instruct), see load_model.
    skills / levels: one expert per skill, trained on problems of these levels.
    n_train / steps / batch_size / learning_rate: training problems per expert and the AdamW run.
    lora_rank / lora_alpha / lora_target_modules: the adapters (None: every linear layer of the blocks).
    shared_init: every expert starts from the same LoRA initialisation (see the module docstring).
    frozen_a: train only the B matrices, so every expert keeps the shared initial A and merges of factors
        are merges of weight deltas (see the module docstring); needs shared_init.
    seed: data and initialisation seed.
    task_skills / task_levels / n_validation / n_test / evolve_run_dir: the new task written to evolve.yaml.
    """

    output_dir: str = "runs/experts"
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    skills: list[str] = dataclasses.field(default_factory=lambda: ["add_sub", "mul_div", "percent", "fraction",
                                                                   "rate"])
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    n_train: int = 256
    steps: int = 32
    batch_size: int = 8
    learning_rate: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None
    shared_init: bool = True
    frozen_a: bool = False
    seed: int = 0
    system_prompt: str | None = SYSTEM_PROMPT
    task_skills: list[str] = dataclasses.field(default_factory=lambda: ["add_sub", "mul_div", "rate"])
    task_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    n_validation: int = 200
    n_test: int = 200
    evolve_run_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("skills", "task_skills"):
            values = getattr(self, name)
            if isinstance(values, str) or not values or any(s not in SKILLS for s in values):
                raise ValueError(f"{name} must be a non-empty list of skills from {SKILLS}, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a skill, got {values!r}")
        for name in ("levels", "task_levels"):
            values = getattr(self, name)
            if isinstance(values, (str, int)) or not values or any(v not in LEVELS for v in values):
                raise ValueError(f"{name} must be a non-empty list of levels from {LEVELS}, got {values!r}")
        for name in ("n_train", "steps", "batch_size", "lora_rank", "n_validation", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("learning_rate", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if len(self.skills) < 2:
            raise ValueError(f"evolution merges experts: skills needs at least 2 entries, got {self.skills!r}")
        if self.frozen_a and not self.shared_init:
            raise ValueError("frozen_a keeps every expert's A at its initialisation, which only makes merges exact "
                             "when that initialisation is shared: set shared_init=True or frozen_a=False")


@dataclasses.dataclass
class ExpertsResult:
    expert_folders: dict[str, Path]  # skill -> PEFT folder
    final_losses: dict[str, float]  # skill -> mean loss of the last training steps
    evolve_config_path: Path


def fresh_lora_adapter(parameters: Mapping[str, torch.Tensor], generator: torch.Generator) -> Adapter:
    """PEFT's default LoRA initialisation, from ``generator``: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    (PEFT draws A with kaiming_uniform_(a=sqrt(5)), whose bound is exactly 1/sqrt(fan_in).)
    """
    adapter = {}
    for key, parameter in parameters.items():
        if ".lora_A." in key:
            bound = 1.0 / parameter.shape[1] ** 0.5
            values = torch.rand(parameter.shape, generator=generator, dtype=torch.float64) * 2 - 1
            adapter[key] = (values * bound).to(parameter.dtype)
        else:
            adapter[key] = torch.zeros(parameter.shape, dtype=parameter.dtype)
    return adapter


def reply_loss(model, examples: Sequence[AnswerExample], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood per reply token (the whole gold reply, end of turn included)."""
    from lmforge.models.logprobs import token_logprobs

    device = next(model.parameters()).device
    ids, attention = pad_sequences([e.prompt_ids + e.completion_ids for e in examples], pad_id, side="right",
                                   device=device)
    loss_mask = torch.zeros_like(attention)
    for row, example in enumerate(examples):
        loss_mask[row, len(example.prompt_ids):len(example.prompt_ids) + len(example.completion_ids)] = 1
    scores = token_logprobs(model, ids, attention, loss_mask)
    return -scores.sum_logprobs.sum() / scores.num_tokens.sum()


def train_lora(model, tokenizer, examples: Sequence[AnswerExample], *, steps: int, batch_size: int,
               learning_rate: float, seed: int, progress: bool = False, description: str = "train",
               train_a: bool = True) -> list[float]:
    """Train the model's LoRA parameters (only them) with AdamW on ``examples``; return the loss per step.

    ``train_a=False`` trains the B matrices only (the A matrices keep their values). Batches walk through
    a seeded shuffle of the examples, reshuffled every epoch.
    """
    parameters = [p for key, p in lora_parameters(model).items() if train_a or ".lora_A." not in key]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    order_rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    try:
        for _ in tqdm(range(steps), desc=description, unit="step", disable=not progress):
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = list(range(len(examples)))
                    order_rng.shuffle(order)
                batch.append(examples[order.pop()])
            loss = reply_loss(model, batch, tokenizer.pad_token_id)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.eval()
        for p in parameters:
            p.requires_grad_(False)
    return losses


def make_experts(config: ExpertsConfig) -> ExpertsResult:
    """Train (or, after a crash, finish training) one LoRA expert per skill; write evolve.yaml. See the module doc."""
    from lmforge.evolve.run import EvolveConfig
    from lmforge.models.loading import load_model
    from lmforge.models.lora import LoraAdapterConfig

    if not isinstance(config, ExpertsConfig):
        raise TypeError(f"config must be an ExpertsConfig, got {type(config).__name__}")
    output_dir = Path(config.output_dir).expanduser()
    lora_config = LoraAdapterConfig(rank=config.lora_rank, alpha=config.lora_alpha,
                                    target_modules=config.lora_target_modules)
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device, lora=lora_config)
    parameters = lora_parameters(model)

    folders, final_losses = {}, {}
    for index, skill in enumerate(config.skills):
        folder = output_dir / "experts" / skill
        folders[skill] = folder
        if folder.is_dir():  # saved by an earlier (interrupted) run: folders appear whole or not at all
            check_lora_folder(folder)
            record = json.loads((folder / TRAINING_RECORD).read_text())
            final_losses[skill] = record["final_loss"]
            continue
        started = time.perf_counter()
        init_seed = config.seed if config.shared_init else config.seed + index
        copy_into_parameters(parameters, fresh_lora_adapter(parameters, torch.Generator().manual_seed(init_seed)))
        problems = generate_problems(config.n_train, skills=skill, levels=config.levels, split="train",
                                     seed=config.seed)
        examples = encode_answer_examples(problems, tokenizer, task=skill, system_prompt=config.system_prompt)
        losses = train_lora(model, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, seed=config.seed + index,
                            progress=config.progress, description=f"expert {skill}", train_a=not config.frozen_a)
        tail = losses[-max(1, len(losses) // 4):]
        record = {"skill": skill, "levels": config.levels, "n_train": config.n_train, "steps": config.steps,
                  "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                  "frozen_a": config.frozen_a, "losses": losses,
                  "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - started}
        with write_directory_atomically(folder) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        final_losses[skill] = record["final_loss"]

    evolve_config = EvolveConfig(
        run_dir=config.evolve_run_dir or str(output_dir / "evolve"),
        expert_folders=[str(folders[s]) for s in config.skills],
        model=config.model, dtype=config.dtype, device=config.device,
        tasks=["+".join(config.task_skills)], levels=list(config.task_levels),
        n_validation=config.n_validation, n_test=config.n_test, system_prompt=config.system_prompt,
    )
    evolve_config_path = output_dir / "evolve.yaml"
    temporary = evolve_config_path.with_name(evolve_config_path.name + ".partial")
    temporary.write_text(yaml.safe_dump(dataclasses.asdict(evolve_config), sort_keys=False))
    temporary.replace(evolve_config_path)
    return ExpertsResult(expert_folders=folders, final_losses=final_losses, evolve_config_path=evolve_config_path)

"""GENOME / GENOME+ runs over LoRA experts of a real model, with baselines, resume and a report.

``run_evolution(EvolveConfig(...))`` (CLI: ``lmforge evolve --config FILE [--resume]``) runs, in a run
folder, one base model kept loaded (adapters are swapped into one PeftModel, see
:mod:`lmforge.evolve.fitness`):

1. **experts**: validation fitness of every expert (PEFT folders ``expert_folders``);
2. **uniform merge**: the linear merge of all experts with equal weights;
3. **LoraHub-style baseline**: a gradient-free search of merge weights on the simplex, scored on
   validation fitness: ``lorahub_budget`` candidates, the first uniform, then alternately a Dirichlet(1)
   draw (global) and a log-normal perturbation of the best weights so far (local), each merged linearly
   factor by factor as LoraHub does (LoraHub's own search is CMA-ES over unconstrained weights with an L1
   penalty; ours stays on the simplex);
4. **GENOME** and / or **GENOME+** (``methods``): a population initialised from expert pairs, evolved
   ``generations`` times by :func:`lmforge.evolve.operators.evolve_generation` (GENOME+ adds succession);
   both methods start from the same seed, so from the same initial population;
5. **test evaluation** (the only phase that sees test problems): test accuracy of the best expert, the
   uniform merge, LoraHub, the best adapters of GENOME and GENOME+, and the GENOME+ ensemble (a majority
   vote of its top-k individuals, k chosen on validation accuracy).

Every choice -- best expert, LoraHub weights, selection, the best individual, the ensemble's members and
k -- is made from validation data. Test gold answers are read once, in phase 5.

Fitness (``fitness``): ``"accuracy"`` of greedy direct answers, or the fast ``"loglik"`` mode; several
tasks (``tasks``, each a ``+``-joined mix of generator skills) are combined with ``task_weights``.

Where validation fitness is computed (``pool``, ``workers``; see :mod:`lmforge.evolve.pool`): ``"local"``
(the default) scores adapters one after another in this process; ``"processes"`` and ``"ray"`` start
``workers`` workers (with ``device="cuda"``: one per visible GPU by default), each loading the base model
once, and every batch of new adapters (a generation's children and mutants, the experts, the ensemble's
candidates) is spread over them. The scores are the same as in-process (bit for bit on CPUs), so the
history and every choice are too. The LoraHub search stays sequential (each candidate depends on the best
so far), and the test phase and the saved adapters still use this process's model, which stays loaded on
``device`` (with ``device="cuda"`` the first GPU holds it as well as its worker's copy).

State: after the experts' scores, the uniform merge, every LoraHub candidate, every generation and every
test evaluation, a checkpoint folder ``checkpoints/step-NNNNNN/`` appears atomically (``run_state.json``:
history, scores, fitness cache, RNG of the LoraHub search; ``population/``: the active population with its
RNG states), and older checkpoints are deleted. ``run_evolution(config, resume=True)`` continues from the newest one bit for bit: the same
seed and config give the same history, populations and report numbers whether or not the run stopped
(``device`` and ``progress`` may change on resume; a new device may round differently).

Outputs in ``run_dir``: ``best_adapter/`` (PEFT folder; the single adapter of highest validation fitness),
``<method>/best_adapter/`` and ``<method>/final_population/``, ``ensemble.json`` (+ ``ensemble/member-i/``),
``history.json``, ``metrics.jsonl`` (with wall times), ``fitness.png``, ``report.md``, ``result.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from lmforge.agent.grading import EXTRACTION_RULES, is_equivalent
from lmforge.agent.tasks import LEVELS, SKILLS, generate_problems
from lmforge.evolve.fitness import (
    FITNESS_MODES,
    SYSTEM_PROMPT,
    AdapterEvaluator,
    AnswerExample,
    answer_accuracy,
    canonical_answer,
    check_adapter_matches,
    encode_answer_examples,
    load_adapter_weights,
    save_adapter,
    spearman_correlation,
)
from lmforge.evolve.merge import merge_adapters
from lmforge.evolve.operators import (
    INITIAL_MODES,
    GenomeConfig,
    choose_ensemble_size,
    ensemble_answers,
    evolve_generation,
    initialize_population,
    mutate,
    rank_by_fitness,
)
from lmforge.evolve.pool import (
    POOL_BACKENDS,
    EvaluatorSpec,
    FitnessPool,
    PoolFitnessCache,
    default_threads_per_worker,
    pool_devices,
)
from lmforge.evolve.population import Adapter, FitnessCache, Individual, Population, weighted_fitness
from lmforge.files import write_text_atomic
from lmforge.models.loading import write_directory_atomically

METHODS = ("genome", "genome+")
METHOD_FOLDERS = {"genome": "genome", "genome+": "genome_plus"}
METHOD_TITLES = {"genome": "GENOME", "genome+": "GENOME+"}
STATE_FORMAT = "lmforge.evolve.run"
STATE_VERSION = 1
STATE_JSON = "run_state.json"
CHECKPOINTS = "checkpoints"
# Fields that may change between a run and its resumption (they don't change what is computed).
RESUMABLE_CHANGES = ("progress", "device", "pool", "workers")


@dataclasses.dataclass
class EvolveConfig:
    """Settings of one evolution run (``lmforge evolve``). GenomeConfig's fields are repeated flat here.

    run_dir: the run folder. expert_folders: PEFT LoRA folders of one base model (at least 2).
    model / dtype / device: the base model (None: the embedded SmolLM2-135M-Instruct), see load_model.
    methods: "genome", "genome+" or both (the report compares them).
    tasks: each a '+'-joined mix of generator skills, e.g. "add_sub+mul_div+rate"; task_weights: one
        weight per task in the scalar fitness (None: equal).
    levels / n_validation / n_test / data_seed: the generated problems of every task (per task).
    fitness: "accuracy" (greedy answers, graded) or "loglik" (gold-answer likelihood, no generation).
    seed: seeds the populations and the LoraHub search.
    population_size ... step_decay: see lmforge.evolve.operators.GenomeConfig; initial_mode: "pairs" or
        "experts". succession is on for "genome+" and off for "genome".
    lorahub_budget: candidates of the LoraHub search; ensemble_max_k: largest ensemble tried.
    batch_size / max_new_tokens / system_prompt / answer_rules: evaluation (see lmforge.evolve.fitness).
    pool: where validation fitness runs: "local" (this process), "processes" (torch.multiprocessing
        workers) or "ray" (Ray actors); see lmforge.evolve.pool. workers: how many workers, one device each
        (None: every visible GPU with device "cuda", 1 on the CPU; "local" has exactly one).
    """

    run_dir: str = "runs/evolve"
    expert_folders: list[str] = dataclasses.field(default_factory=list)
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    methods: list[str] = dataclasses.field(default_factory=lambda: ["genome", "genome+"])
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add_sub+mul_div+rate"])
    task_weights: list[float] | None = None
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    n_validation: int = 200
    n_test: int = 200
    data_seed: int = 0
    fitness: str = "accuracy"
    seed: int = 0
    population_size: int = 10
    generations: int = 10
    n_children: int = 10
    n_parents: int = 2
    initial_mode: str = "pairs"
    merge_method: str = "linear"
    merge_density: float = 1.0
    merge_space: str = "factors"
    individual_mutation_rate: float = 0.3
    gene_mutation_rate: float = 0.1
    mutation_sigma: float = 1e-3
    selection: str = "tournament"
    n_elites: int = 1
    tournament_size: int = 3
    inertia: float = 0.5
    c_personal: float = 0.5
    c_global: float = 0.5
    c_worst: float = 0.1
    step_size: float = 1.0
    step_decay: float = 0.9
    lorahub_budget: int = 20
    ensemble_max_k: int = 5
    batch_size: int = 16
    max_new_tokens: int = 20
    system_prompt: str | None = SYSTEM_PROMPT
    answer_rules: list[str] = dataclasses.field(default_factory=lambda: list(EXTRACTION_RULES))
    pool: str = "local"
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        if not self.methods or any(m not in METHODS for m in self.methods) or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty selection of {METHODS} without repeats, got {self.methods!r}")
        self.methods = [m for m in METHODS if m in self.methods]  # GENOME first, always
        if isinstance(self.expert_folders, (str, os.PathLike)):
            raise TypeError("expert_folders must be a list of PEFT folders, got a single path")
        self.expert_folders = [str(f) for f in self.expert_folders]
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct tasks, got {self.tasks!r}")
        for task in self.tasks:
            task_skills(task)
        if self.task_weights is not None:
            if len(self.task_weights) != len(self.tasks):
                raise ValueError(f"task_weights has {len(self.task_weights)} entries for {len(self.tasks)} tasks")
            if any(not math.isfinite(w) or w < 0 for w in self.task_weights) or sum(self.task_weights) <= 0:
                raise ValueError(f"task_weights must be finite, >= 0 and sum to > 0, got {self.task_weights!r}")
            self.task_weights = [float(w) for w in self.task_weights]
        if isinstance(self.levels, int) or not self.levels or any(v not in LEVELS for v in self.levels):
            raise ValueError(f"levels must be a non-empty list of levels from {LEVELS}, got {self.levels!r}")
        if self.fitness not in FITNESS_MODES:
            raise ValueError(f"fitness must be one of {FITNESS_MODES}, got {self.fitness!r}")
        if self.initial_mode not in INITIAL_MODES:
            raise ValueError(f"initial_mode must be one of {INITIAL_MODES}, got {self.initial_mode!r}")
        for name in ("n_validation", "n_test", "batch_size", "max_new_tokens", "lorahub_budget", "ensemble_max_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("generations", "seed", "data_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if isinstance(self.answer_rules, str) or any(r not in EXTRACTION_RULES for r in self.answer_rules):
            raise ValueError(f"answer_rules must be a list of rules from {EXTRACTION_RULES}, got {self.answer_rules!r}")
        if self.pool not in POOL_BACKENDS:
            raise ValueError(f"pool must be one of {POOL_BACKENDS}, got {self.pool!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers must be a positive int or None, got {self.workers!r}")
        if self.pool == "local" and self.workers not in (None, 1):
            raise ValueError(f"workers={self.workers} needs pool='processes' or 'ray'; pool='local' scores in this "
                             "process only")
        self.genome_config("genome+")  # validates the GENOME fields

    def genome_config(self, method: str) -> GenomeConfig:
        """The GenomeConfig of ``method`` (succession on for "genome+")."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        names = [f.name for f in dataclasses.fields(GenomeConfig) if f.name != "succession"]
        return GenomeConfig(**{name: getattr(self, name) for name in names}, succession=method == "genome+")

    def task_weight_map(self) -> dict[str, float] | None:
        return None if self.task_weights is None else dict(zip(self.tasks, self.task_weights))


def task_skills(task: str) -> tuple[str, ...]:
    """The skills of a task name such as "add_sub+mul_div"; ValueError naming unknown skills."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"a task must be a non-empty string of '+'-joined skills, got {task!r}")
    skills = tuple(part.strip() for part in task.split("+"))
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"task {task!r} names unknown skill(s) {unknown}; skills are {SKILLS}")
    return skills


@dataclasses.dataclass
class EvolveResult:
    """What a finished run returns (everything is also in run_dir/result.json)."""

    run_dir: Path
    test_accuracy: dict[str, float]  # system -> weighted test accuracy
    val_fitness: dict[str, float]  # system -> weighted validation fitness
    ensemble_k: int
    best_system: str  # the single adapter of highest validation fitness, saved as best_adapter/
    history: list[dict]


# ---------------------------------------------------------------------------------------------
# Set-up: model, experts, data.


@dataclasses.dataclass
class _Run:
    """What every phase of a run works with (state that lives across the phases of one call)."""

    config: EvolveConfig
    run_dir: Path
    evaluator: AdapterEvaluator
    expert_names: list[str]
    experts: list[Adapter]
    val_tasks: dict[str, list[AnswerExample]]
    test_tasks: dict[str, list[AnswerExample]]
    pool: FitnessPool
    cache: FitnessCache
    state: dict


def _load_experts(config: EvolveConfig):
    """(model, tokenizer, names, adapters): the base model with one PeftModel, and every expert's weights."""
    from lmforge.evolve.fitness import lora_parameters
    from lmforge.models.loading import load_model

    if len(config.expert_folders) < 2:
        raise ValueError(f"expert_folders needs at least 2 PEFT folders to merge, got {config.expert_folders!r}")
    folders = [Path(f).expanduser() for f in config.expert_folders]
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device, lora=folders[0])
    parameters = lora_parameters(model)
    reference = _adapter_settings(folders[0])
    experts = []
    for folder in folders:
        settings = _adapter_settings(folder)
        if settings != reference:
            raise ValueError(f"expert_folders: {folder} has LoRA settings {settings}, but {folders[0]} has "
                             f"{reference}; experts must share rank, alpha and target modules")
        adapter = load_adapter_weights(folder)
        check_adapter_matches(adapter, parameters, label=f"expert {folder}")
        experts.append({key: adapter[key].to(parameters[key].dtype) for key in parameters})
    names = [folder.name for folder in folders]
    if len(set(names)) != len(names):
        names = [str(folder) for folder in folders]
    return model, tokenizer, names, experts


def _adapter_settings(folder: Path) -> dict:
    settings = json.loads((folder / "adapter_config.json").read_text())
    targets = settings.get("target_modules")
    return {"r": settings.get("r"), "lora_alpha": settings.get("lora_alpha"),
            "use_rslora": settings.get("use_rslora", False),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def _task_examples(config: EvolveConfig, tokenizer, split: str, n: int) -> dict[str, list[AnswerExample]]:
    return {task: encode_answer_examples(
        generate_problems(n, skills=task_skills(task), levels=config.levels, split=split, seed=config.data_seed),
        tokenizer, task=task, system_prompt=config.system_prompt) for task in config.tasks}


def _setup(config: EvolveConfig, run_dir: Path, state: dict) -> _Run:
    model, tokenizer, names, experts = _load_experts(config)
    evaluator = AdapterEvaluator(model, tokenizer, batch_size=config.batch_size,
                                 max_new_tokens=config.max_new_tokens, answer_rules=config.answer_rules,
                                 progress=False)
    val_tasks = _task_examples(config, tokenizer, "validation", config.n_validation)
    test_tasks = _task_examples(config, tokenizer, "test", config.n_test)
    pool = _open_pool(config, evaluator)
    cache = PoolFitnessCache(pool, val_tasks, config.fitness)
    cache.load_state_dict(state["fitness_cache"])
    return _Run(config, run_dir, evaluator, names, experts, val_tasks, test_tasks, pool, cache, state)


def _open_pool(config: EvolveConfig, evaluator: AdapterEvaluator) -> FitnessPool:
    """The run's fitness pool: this process's evaluator for "local", else workers loading the same model."""
    if config.pool == "local":
        return FitnessPool(backend="local", evaluator=evaluator)
    # The workers load what _load_experts loaded: the same base model, dtype and first expert folder.
    spec = EvaluatorSpec(adapter_folder=str(Path(config.expert_folders[0]).expanduser()), model=config.model,
                         dtype=config.dtype, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                         answer_rules=tuple(config.answer_rules))
    devices = pool_devices(config.device, config.workers)
    threads = default_threads_per_worker(devices)
    if threads is not None:  # CPU workers split this process's torch threads, so the sum stays the same
        threads = max(1, torch.get_num_threads() // len(devices))
    return FitnessPool(spec, backend=config.pool, devices=devices, threads_per_worker=threads)


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _new_state(config: EvolveConfig) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": dataclasses.asdict(config), "step": 0,
            "experts": None, "uniform": None, "lorahub": None, "methods": {}, "history": [], "final": {},
            "timings": [], "fitness_cache": FitnessCache(lambda ind: {}).state_dict()}


def _save_checkpoint(run: _Run, population: Population | None = None) -> None:
    """Write the run state (and the active population) into a new checkpoint folder; drop older ones."""
    run.state["step"] += 1
    run.state["fitness_cache"] = run.cache.state_dict()
    older = _checkpoint_folders(run.run_dir)
    target = run.run_dir / CHECKPOINTS / f"step-{run.state['step']:06d}"
    with write_directory_atomically(target) as staging:
        (staging / STATE_JSON).write_text(json.dumps(run.state))
        if population is not None:
            population.save(staging / "population")
    for folder in older:
        shutil.rmtree(folder, ignore_errors=True)
    write_text_atomic(run.run_dir / "metrics.jsonl", "".join(json.dumps(t) + "\n" for t in run.state["timings"]))


def _load_checkpoint(run_dir: Path) -> tuple[dict, Population | None] | None:
    folders = _checkpoint_folders(run_dir)
    if not folders:
        return None
    latest = folders[-1]
    state = json.loads((latest / STATE_JSON).read_text())
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"{latest} is not a checkpoint of {STATE_FORMAT} version {STATE_VERSION}")
    population = Population.load(latest / "population") if (latest / "population").is_dir() else None
    return state, population


def _timed(run: _Run, phase: str, started: float, **extra) -> None:
    run.state["timings"].append({"phase": phase, "seconds": round(time.perf_counter() - started, 3), **extra})


# ---------------------------------------------------------------------------------------------
# Phases 1-3: experts, uniform merge, LoraHub.


def _score_adapter(run: _Run, adapter: Adapter, origin: str) -> dict[str, float]:
    individual = Individual(uid=-1, adapter=adapter, origin=origin)
    run.cache.score([individual])
    return dict(individual.val_scores)


def _fitness(run: _Run, scores: Mapping[str, float]) -> float:
    return weighted_fitness(scores, run.config.task_weight_map())


def _score_experts(run: _Run) -> None:
    if run.state["experts"] is not None:
        return
    started = time.perf_counter()
    individuals = [Individual(uid=-1, adapter=adapter, origin="expert") for adapter in run.experts]
    run.cache.score(individuals, progress=run.config.progress)  # one batch, so a pool scores them in parallel
    entries = [{"name": name, "val_scores": dict(ind.val_scores), "val_fitness": _fitness(run, ind.val_scores)}
               for name, ind in zip(run.expert_names, individuals)]
    run.state["experts"] = entries
    _timed(run, "experts", started)
    _save_checkpoint(run)


def _uniform_merge(run: _Run) -> Adapter:
    n = len(run.experts)
    return merge_adapters(run.experts, [1.0 / n] * n, "linear")


def _score_uniform(run: _Run) -> None:
    if run.state["uniform"] is not None:
        return
    started = time.perf_counter()
    scores = _score_adapter(run, _uniform_merge(run), "uniform")
    run.state["uniform"] = {"val_scores": scores, "val_fitness": _fitness(run, scores)}
    _timed(run, "uniform", started)
    _save_checkpoint(run)


def lorahub_candidate(step: int, best_weights: Sequence[float] | None, n: int, rng: np.random.Generator,
                      sigma: float = 0.5) -> list[float]:
    """Merge weights on the simplex for LoraHub search step ``step``.

    Step 0: uniform. Odd steps: a Dirichlet(1, ..., 1) draw (uniform over the simplex). Even steps: the
    best weights so far perturbed in log space, ``softmax(log w + sigma * z)``, z ~ N(0, I).
    """
    if step == 0:
        return [1.0 / n] * n
    if step % 2 == 1 or best_weights is None:
        return rng.dirichlet(np.ones(n)).tolist()
    logits = np.log(np.clip(np.asarray(best_weights, dtype=np.float64), 1e-12, None)) + sigma * rng.standard_normal(n)
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()).tolist()


def _run_lorahub(run: _Run) -> None:
    config = run.config
    if run.state["lorahub"] is None:
        rng = np.random.Generator(np.random.PCG64([config.seed, 1]))
        run.state["lorahub"] = {"step": 0, "rng": rng.bit_generator.state, "best_weights": None,
                                "best_val_scores": None, "best_val_fitness": None, "trace": []}
    search = run.state["lorahub"]
    if search["step"] >= config.lorahub_budget:
        return
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = search["rng"]
    for step in tqdm(range(search["step"], config.lorahub_budget), desc="LoraHub", unit="candidate",
                     disable=not config.progress):
        started = time.perf_counter()
        weights = lorahub_candidate(step, search["best_weights"], len(run.experts), rng)
        scores = _score_adapter(run, merge_adapters(run.experts, weights, "linear"), "lorahub")
        fitness = _fitness(run, scores)
        search["trace"].append({"step": step, "weights": weights, "val_fitness": fitness})
        if search["best_val_fitness"] is None or fitness > search["best_val_fitness"]:
            search.update(best_weights=weights, best_val_scores=scores, best_val_fitness=fitness)
        search["step"] = step + 1
        search["rng"] = rng.bit_generator.state
        _timed(run, "lorahub", started, step=step)
        _save_checkpoint(run)


# ---------------------------------------------------------------------------------------------
# Phase 4: GENOME / GENOME+.


def _method_folder(run: _Run, method: str) -> Path:
    return run.run_dir / METHOD_FOLDERS[method]


def _population_summary(method: str, population: Population, fitness_calls: int) -> dict:
    values = population.val_fitness()
    return {"method": method, "generation": population.generation, "best_fitness": max(values),
            "mean_fitness": float(np.mean(values)),
            "global_best_fitness": population.fitness(population.global_best), "fitness_calls": fitness_calls}


def _run_method(run: _Run, method: str, population: Population | None) -> None:
    config = run.config
    entry = run.state["methods"].get(method)
    if entry is not None and entry["status"] == "done":
        return
    if entry is None:
        started = time.perf_counter()
        calls_before = run.cache.calls
        population = Population(seed=config.seed, task_weights=config.task_weight_map())
        initialize_population(population, run.experts, size=config.population_size if config.initial_mode == "pairs"
                              else None, mode=config.initial_mode, merge_method=config.merge_method,
                              merge_density=config.merge_density)
        run.cache.score(population.individuals, progress=config.progress)
        population.update_bests()
        run.state["history"].append(_population_summary(method, population, run.cache.calls - calls_before))
        run.state["methods"][method] = {"status": "running"}
        _timed(run, method, started, generation=0)
        _save_checkpoint(run, population)
    if population is None:
        raise ValueError(f"the checkpoint of {run.run_dir} has {method} running but holds no population")
    genome_config = config.genome_config(method)
    for _ in tqdm(range(population.generation, config.generations), desc=METHOD_TITLES[method], unit="generation",
                  initial=population.generation, total=config.generations, disable=not config.progress):
        started = time.perf_counter()
        summary = evolve_generation(population, run.cache, genome_config, progress=config.progress)
        run.state["history"].append({"method": method, **summary})
        _timed(run, method, started, generation=population.generation)
        _save_checkpoint(run, population)
    folder = _method_folder(run, method)
    population.save(folder / "final_population", overwrite=True)
    save_adapter(run.evaluator.model, population.global_best.adapter, folder / "best_adapter", overwrite=True)
    run.state["methods"][method] = {"status": "done", "best_uid": population.global_best.uid,
                                    "best_val_scores": dict(population.global_best.val_scores),
                                    "best_val_fitness": population.fitness(population.global_best)}
    _save_checkpoint(run)


# ---------------------------------------------------------------------------------------------
# Phase 5: test evaluation (the only place test problems are used), and the ensemble.


def _val_examples(run: _Run) -> list[AnswerExample]:
    return [e for task in run.config.tasks for e in run.val_tasks[task]]


def _choose_ensemble(run: _Run, population: Population) -> dict:
    """Top-k individuals of ``population`` by validation fitness; k chosen on validation accuracy."""
    fitness = population.val_fitness()
    order = rank_by_fitness(fitness)[:min(run.config.ensemble_max_k, len(fitness))]
    examples = _val_examples(run)
    answers = run.pool.answers([population.individuals[i].adapter for i in order], examples)
    predictions = [[canonical_answer(a) for a in member_answers] for member_answers in answers]
    choice = choose_ensemble_size(predictions, [e.gold for e in examples], [fitness[i] for i in order],
                                  is_correct=lambda answer, gold: is_equivalent(answer, gold))
    return {"order": order, "k": choice.k, "val_accuracy_by_k": choice.val_accuracy_by_k,
            "member_uids": [population.individuals[i].uid for i in order[:choice.k]],
            "member_val_fitness": [fitness[i] for i in order[:choice.k]]}


def evaluate_on_test(evaluator: AdapterEvaluator, test_tasks: Mapping[str, Sequence[AnswerExample]],
                     adapters: Sequence[Adapter], member_val_fitness: Sequence[float] | None = None,
                     ) -> dict[str, float]:
    """Test accuracy per task of one adapter, or of the majority vote of several (an ensemble).

    For an ensemble, ``adapters`` are its members and ``member_val_fitness`` their validation fitness
    (the vote's tie-break order). This is the only function that grades test answers.
    """
    accuracy = {}
    for task, examples in test_tasks.items():
        if len(adapters) == 1:
            accuracy[task] = evaluator.accuracy(adapters[0], examples)
            continue
        votes = [[canonical_answer(a) for a in evaluator.answers(adapter, examples)] for adapter in adapters]
        accuracy[task] = answer_accuracy(ensemble_answers(votes, list(member_val_fitness), len(adapters)), examples)
    return accuracy


def _final_candidates(run: _Run, populations: dict[str, Population]) -> dict[str, dict]:
    """system -> {"adapters", "val_fitness", ...}: the systems of the report, all chosen on validation data."""
    experts = run.state["experts"]
    best_expert = max(range(len(experts)), key=lambda i: (experts[i]["val_fitness"], -i))
    lorahub = run.state["lorahub"]
    systems = {
        f"best expert ({experts[best_expert]['name']})": {
            "adapters": [run.experts[best_expert]], "val_fitness": experts[best_expert]["val_fitness"]},
        "uniform merge": {"adapters": [_uniform_merge(run)], "val_fitness": run.state["uniform"]["val_fitness"]},
        "LoraHub (simplex search)": {
            "adapters": [merge_adapters(run.experts, lorahub["best_weights"], "linear")],
            "val_fitness": lorahub["best_val_fitness"]},
    }
    for method, population in populations.items():
        systems[METHOD_TITLES[method]] = {"adapters": [population.global_best.adapter],
                                          "val_fitness": population.fitness(population.global_best)}
    return systems


def _run_test_phase(run: _Run, populations: dict[str, Population]) -> tuple[dict, dict, str]:
    systems = _final_candidates(run, populations)
    ensemble_method = run.config.methods[-1]  # GENOME+ when it ran
    ensemble_population = populations[ensemble_method]
    if "ensemble" not in run.state["final"]:
        started = time.perf_counter()
        run.state["final"]["ensemble"] = _choose_ensemble(run, ensemble_population)
        _timed(run, "ensemble_choice", started)
        _save_checkpoint(run)
    ensemble = run.state["final"]["ensemble"]
    by_uid = {ind.uid: ind for ind in ensemble_population.individuals}
    ensemble_name = f"{METHOD_TITLES[ensemble_method]} ensemble (top-{ensemble['k']} vote)"
    systems[ensemble_name] = {"adapters": [by_uid[uid].adapter for uid in ensemble["member_uids"]],
                              "val_fitness": None, "member_val_fitness": ensemble["member_val_fitness"],
                              "val_accuracy": ensemble["val_accuracy_by_k"][ensemble["k"] - 1]}
    tests = run.state["final"].setdefault("test", {})
    for name, system in tqdm(systems.items(), desc="test", unit="system", disable=not run.config.progress):
        if name in tests:
            continue
        started = time.perf_counter()
        by_task = evaluate_on_test(run.evaluator, run.test_tasks, system["adapters"],
                                   system.get("member_val_fitness"))
        tests[name] = {"by_task": by_task, "accuracy": _fitness(run, by_task)}
        _timed(run, "test", started, system=name)
        _save_checkpoint(run)
    return systems, ensemble, ensemble_name


# ---------------------------------------------------------------------------------------------
# Outputs.


def plot_fitness(history: Sequence[Mapping], baselines: Mapping[str, float], path: Path, *, ylabel: str) -> None:
    """Best and mean validation fitness per generation of each method, baselines as dashed lines (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"genome": "tab:blue", "genome+": "tab:red"}
    for method in METHODS:
        rows = [h for h in history if h["method"] == method]
        if not rows:
            continue
        generations = [h["generation"] for h in rows]
        axes.plot(generations, [h["global_best_fitness"] for h in rows], "-o", color=colors[method], markersize=3,
                  label=f"{METHOD_TITLES[method]} best so far")
        axes.plot(generations, [h["mean_fitness"] for h in rows], "--", color=colors[method], alpha=0.6,
                  label=f"{METHOD_TITLES[method]} population mean")
    for (name, value), style, color in zip(baselines.items(), (":", "-.", (0, (5, 2))),
                                           ("dimgray", "black", "tab:green")):
        axes.axhline(value, color=color, linestyle=style, linewidth=1.2, label=name)
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("generation")
    axes.set_ylabel(ylabel)
    axes.set_title("Validation fitness over generations")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.partial.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)


def _report(run: _Run, systems: Mapping[str, dict], ensemble: Mapping, best_system: str, model_name: str) -> str:
    config, state = run.config, run.state
    tests = state["final"]["test"]
    fitness_name = ("accuracy of greedy direct answers" if config.fitness == "accuracy"
                    else "exp(mean answer-token log-probability) of the gold answers")
    lines = [
        "# GENOME / GENOME+ run", "",
        f"- base model: {model_name}; experts: {', '.join(run.expert_names)}",
        f"- tasks: {', '.join(config.tasks)} (levels {config.levels}; weights "
        f"{config.task_weights or 'equal'}); {config.n_validation} validation and {config.n_test} test problems per task",
        f"- format: direct answer (question -> \\boxed{{answer}}), greedy, at most {config.max_new_tokens} new tokens",
        f"- validation fitness: {fitness_name}",
        f"- population {config.population_size}, {config.generations} generations, {config.n_children} children, "
        f"merge {config.merge_method}, seed {config.seed}; LoraHub budget {config.lorahub_budget}", "",
        "| system | validation fitness | test accuracy | " + " | ".join(f"test {t}" for t in config.tasks) + " |",
        "|---|---|---|" + "---|" * len(config.tasks),
    ]
    for name, system in systems.items():
        val = "-" if system["val_fitness"] is None else f"{system['val_fitness']:.4f}"
        per_task = " | ".join(f"{tests[name]['by_task'][t]:.3f}" for t in config.tasks)
        lines.append(f"| {name} | {val} | {tests[name]['accuracy']:.3f} | {per_task} |")
    calls = {m: sum(h["fitness_calls"] for h in state["history"] if h["method"] == m) for m in config.methods}
    lines += [
        "",
        f"Ensemble: the top-{ensemble['k']} individuals of the final {METHOD_TITLES[config.methods[-1]]} population "
        f"by validation fitness vote on each answer; k chosen on validation accuracy "
        f"(by k = 1..{len(ensemble['val_accuracy_by_k'])}: "
        + ", ".join(f"{a:.3f}" for a in ensemble["val_accuracy_by_k"]) + ").",
        f"Best single adapter by validation fitness: {best_system} (saved as best_adapter/).",
        "Fitness evaluations (new adapters scored): " + ", ".join(f"{METHOD_TITLES[m]} {calls[m]}" for m in calls)
        + f"; LoraHub {config.lorahub_budget} candidates.",
        f"Wall time: {sum(t['seconds'] for t in state['timings']):.0f} s in all (per phase in metrics.jsonl).",
        "",
        "Every choice (best expert, LoraHub weights, selection, best individual, ensemble members and k) used "
        "validation data only; test answers were graded once per system, after evolution.",
        "", "![validation fitness over generations](fitness.png)", "",
    ]
    return "\n".join(lines)


def _write_outputs(run: _Run, systems: dict, ensemble: dict, ensemble_name: str, model_name: str) -> EvolveResult:
    config, state, run_dir = run.config, run.state, run.run_dir
    model = run.evaluator.model
    single = {name: s for name, s in systems.items() if s["val_fitness"] is not None}
    best_system = max(single, key=lambda name: single[name]["val_fitness"])  # first on ties: dicts keep order
    save_adapter(model, single[best_system]["adapters"][0], run_dir / "best_adapter", overwrite=True)

    with write_directory_atomically(run_dir / "ensemble", overwrite=True) as staging:
        for index, adapter in enumerate(systems[ensemble_name]["adapters"]):
            save_adapter(model, adapter, staging / f"member-{index}")
    spec = {"source_method": config.methods[-1], "k": ensemble["k"], "val_accuracy_by_k": ensemble["val_accuracy_by_k"],
            "vote": "majority of the canonical extracted answers (numbers as reduced fractions); ties go to the "
                    "member of higher validation fitness; unanswered votes are ignored",
            "members": [{"rank": i, "uid": uid, "val_fitness": f, "adapter_folder": f"ensemble/member-{i}"}
                        for i, (uid, f) in enumerate(zip(ensemble["member_uids"], ensemble["member_val_fitness"]))]}
    write_text_atomic(run_dir / "ensemble.json", json.dumps(spec, indent=1) + "\n")
    write_text_atomic(run_dir / "history.json", json.dumps(state["history"], indent=1) + "\n")
    baselines = {"best expert": max(e["val_fitness"] for e in state["experts"]),
                 "uniform merge": state["uniform"]["val_fitness"],
                 "LoraHub": state["lorahub"]["best_val_fitness"]}
    plot_fitness(state["history"], baselines, run_dir / "fitness.png",
                 ylabel="validation accuracy" if config.fitness == "accuracy" else "validation answer-token prob.")
    tests = state["final"]["test"]
    result = {"test_accuracy": {name: tests[name]["accuracy"] for name in systems},
              "test_accuracy_by_task": {name: tests[name]["by_task"] for name in systems},
              "val_fitness": {name: systems[name]["val_fitness"] for name in systems},
              "ensemble_k": ensemble["k"], "best_system": best_system,
              "lorahub_best_weights": dict(zip(run.expert_names, state["lorahub"]["best_weights"])),
              "experts": state["experts"]}
    write_text_atomic(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(run_dir / "report.md", _report(run, systems, ensemble, best_system, model_name))
    return EvolveResult(run_dir=run_dir, test_accuracy=result["test_accuracy"],
                        val_fitness=result["val_fitness"], ensemble_k=ensemble["k"], best_system=best_system,
                        history=state["history"])


# ---------------------------------------------------------------------------------------------
# The entry points.


def _check_resumable(saved: Mapping, config: EvolveConfig, run_dir: Path) -> None:
    current = dataclasses.asdict(config)
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"run_dir {run_dir} holds a run with a different config (fields {changed}); resume it with "
                         "the config in its config.yaml, or start a new run_dir")


def run_evolution(config: EvolveConfig, *, resume: bool = False) -> EvolveResult:
    """Run (or with ``resume=True`` continue) the evolution described by ``config``; see the module docstring."""
    if not isinstance(config, EvolveConfig):
        raise TypeError(f"config must be an EvolveConfig, got {type(config).__name__}")
    run_dir = Path(config.run_dir).expanduser()
    loaded = _load_checkpoint(run_dir)
    if loaded is not None and not resume:
        raise FileExistsError(f"run_dir {run_dir} already holds a run; pass resume=True (--resume) to continue it, "
                              "or choose another run_dir")
    if loaded is not None:
        state, active_population = loaded
        _check_resumable(state["config"], config, run_dir)
    else:
        state, active_population = _new_state(config), None
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

    run = _setup(config, run_dir, state)
    try:
        _score_experts(run)
        _score_uniform(run)
        _run_lorahub(run)
        populations = {}
        for method in config.methods:
            running = state["methods"].get(method, {}).get("status") == "running"
            _run_method(run, method, active_population if running else None)
            populations[method] = Population.load(_method_folder(run, method) / "final_population")
        systems, ensemble, ensemble_name = _run_test_phase(run, populations)
    finally:
        run.pool.close()
    model_name = config.model or "embedded SmolLM2-135M-Instruct"
    return _write_outputs(run, systems, ensemble, ensemble_name, model_name)


def measure_fitness_correlation(config: EvolveConfig, *, n_individuals: int = 16,
                                output: str | os.PathLike | None = None) -> dict:
    """Spearman correlation of the loglik and accuracy fitness over ``n_individuals`` adapters (validation).

    The adapters: every expert, then merges of random expert pairs with random weights, and mutants of those
    (sigma = 10 x mutation_sigma) up to ``n_individuals``, all drawn from ``config.seed``. Writes JSON to
    ``output`` (default ``<run_dir>/fitness_correlation.json``) and returns it.
    """
    if isinstance(n_individuals, bool) or not isinstance(n_individuals, int) or n_individuals < 3:
        raise ValueError(f"n_individuals must be an int >= 3, got {n_individuals!r}")
    started = time.perf_counter()
    model, tokenizer, names, experts = _load_experts(config)
    evaluator = AdapterEvaluator(model, tokenizer, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                 answer_rules=config.answer_rules)
    val_tasks = _task_examples(config, tokenizer, "validation", config.n_validation)
    population = Population(seed=config.seed)
    adapters = [(f"expert {name}", adapter) for name, adapter in zip(names, experts)][:n_individuals]
    n_pairs = max(0, (n_individuals - len(adapters) + 1) // 2)
    merged = initialize_population(population, experts, size=n_pairs, mode="pairs") if n_pairs else []
    adapters += [(f"pair merge {i}", individual.adapter) for i, individual in enumerate(merged)]
    parents = [individual.adapter for individual in merged] or experts
    for i in range(n_individuals - len(adapters)):
        mutant = mutate(parents[i % len(parents)], gene_rate=0.5, sigma=10 * config.mutation_sigma,
                        generator=population.torch_generator)
        adapters.append((f"mutant {i}", mutant))
    weights = config.task_weight_map()
    rows = []
    for name, adapter in tqdm(adapters, desc="correlation", unit="adapter", disable=not config.progress):
        loglik = {t: evaluator.loglik_fitness(adapter, ex) for t, ex in val_tasks.items()}
        accuracy = {t: evaluator.accuracy(adapter, ex) for t, ex in val_tasks.items()}
        rows.append({"adapter": name, "loglik_fitness": weighted_fitness(loglik, weights),
                     "accuracy": weighted_fitness(accuracy, weights)})
    x, y = [r["loglik_fitness"] for r in rows], [r["accuracy"] for r in rows]
    result = {"n_individuals": len(rows), "n_validation_per_task": config.n_validation, "tasks": config.tasks,
              "spearman": spearman_correlation(x, y), "pearson": float(np.corrcoef(x, y)[0, 1]) if np.std(y) > 0 else
              float("nan"), "seconds": time.perf_counter() - started, "rows": rows}
    path = Path(output) if output is not None else Path(config.run_dir).expanduser() / "fitness_correlation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# CLI: `lmforge evolve --config FILE [--resume]`, `lmforge evolve make-experts`, `... fitness-correlation`.


def _evolve_command(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args

    config = config_from_args(EvolveConfig, args)
    result = run_evolution(config, resume=args.resume)
    for name, accuracy in result.test_accuracy.items():
        print(f"{name:45s} test accuracy {accuracy:.3f}")
    print(f"report: {result.run_dir / 'report.md'}")
    return 0


def _make_experts_command(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.evolve.experts import ExpertsConfig, make_experts

    result = make_experts(config_from_args(ExpertsConfig, args))
    for skill, folder in result.expert_folders.items():
        print(f"expert {skill:12s} final loss {result.final_losses[skill]:.4f}  {folder}")
    print(f"evolution config: {result.evolve_config_path}  (run: lmforge evolve --config {result.evolve_config_path})")
    return 0


def _correlation_command(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args

    config = config_from_args(EvolveConfig, args)
    result = measure_fitness_correlation(config, n_individuals=args.n_individuals, output=args.output)
    print(f"Spearman(loglik fitness, accuracy) over {result['n_individuals']} adapters: {result['spearman']:.3f} "
          f"(Pearson {result['pearson']:.3f})")
    return 0


def add_evolve_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``evolve`` (with ``make-experts`` and ``fitness-correlation``) to an argparse subparsers object."""
    from lmforge.config import add_config_arguments
    from lmforge.evolve.experts import ExpertsConfig

    evolve = subparsers.add_parser("evolve", help="GENOME / GENOME+ evolution of LoRA experts",
                                   description="Evolve LoRA experts with GENOME / GENOME+ and report test accuracy "
                                               "against the best expert, a uniform merge and LoraHub.")
    add_config_arguments(evolve, EvolveConfig)
    evolve.add_argument("--resume", action="store_true", help="continue the run saved in run_dir")
    evolve.set_defaults(func=_evolve_command)
    commands = evolve.add_subparsers(dest="evolve_command", required=False)
    experts = commands.add_parser("make-experts", help="train one LoRA expert per generated skill; write evolve.yaml")
    add_config_arguments(experts, ExpertsConfig)
    experts.set_defaults(func=_make_experts_command)
    correlation = commands.add_parser("fitness-correlation",
                                      help="Spearman correlation of the loglik and accuracy fitness modes")
    add_config_arguments(correlation, EvolveConfig)
    correlation.add_argument("--n-individuals", type=int, default=16)
    correlation.add_argument("--output", default=None, help="JSON path (default: <run_dir>/fitness_correlation.json)")
    correlation.set_defaults(func=_correlation_command)
    return evolve

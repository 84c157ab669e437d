"""Evolutionary operators of GENOME / GENOME+ over LoRA adapters, and one generation of evolution.

GENOME evolves a population of adapters with crossover, mutation and selection; GENOME+ adds
succession (a particle-swarm move) and an ensemble of the best individuals at the end
(Zhang et al. 2025, "Nature-Inspired Population-Based Evolution of Large Language Models").

With f_i the (weighted, validation) fitness of individual i and x the adapter tensors:

* **Initial population** (:func:`initialize_population`): ``mode="pairs"`` (the paper's) merges two
  distinct experts drawn uniformly with weights (w, 1 - w), w ~ U(0, 1); ``mode="experts"`` uses
  copies of the experts themselves.
* **Crossover** (:func:`crossover`): ``n_parents`` distinct parents drawn without replacement, each draw
  with probability f_i / sum f over the not-yet-drawn (:func:`draw_by_fitness`); the child is
  ``merge_adapters(parents, weights=f_i / sum_parents f)`` with any registered merge method.
* **Mutation** (:func:`mutate`): ``x' = x + m * N(0, sigma^2)``, m ~ Bernoulli(gene rate) entrywise,
  applied to each individual with probability ``individual rate``; the mutant is a new individual
  with new tensors, the original stays in the pool.
* **Selection** (:func:`select_survivors`): the ``n_elites`` fittest survive, the rest of the places
  are filled without replacement by tournaments (the fittest of ``tournament_size`` drawn uniformly)
  or by roulette (draws with probability proportional to fitness).
* **Succession** (GENOME+, :func:`succession_update`), per tensor, computed in float32 (float64 for
  float64 adapters), with fresh r1, r2, r3 ~ U(0, 1) per individual and step::

      v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x) - c3 r3 (gworst - x)
      x <- x + lambda_t v,        lambda_t = lambda_0 * decay^t

  pbest: the individual's best position so far (a copy); gbest: the best adapter seen in the whole
  run (a copy); gworst: the current individual of lowest fitness; t counts succession steps taken.
  The velocity starts at zero. Elites are not moved, so the best adapter is never lost to a move
  before it is re-scored. Moved individuals keep their uid (they are the same particle) and are
  re-scored at once. This is the classic PSO velocity with Model Swarms' repulsion from the worst
  particle (without its normalisation by the sum of the coefficients).
* **Ensemble** (GENOME+, :func:`ensemble_answers`): the answer most of the top-k individuals give
  (ranked by validation fitness); k is chosen on validation predictions and gold answers
  (:func:`choose_ensemble_size`). No function here takes test gold answers: rank, select and choose
  from validation data, then apply the result to test predictions.

Every random choice goes through the :class:`~lmforge.evolve.population.Population`'s RNGs (numpy for
discrete draws, its CPU torch generator for tensors), so the same seed gives the same run, and a
saved population resumes bit for bit. The operators themselves never run a model: fitness comes from
a :class:`~lmforge.evolve.population.FitnessCache` around the caller's fitness function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from lmforge.evolve.merge import get_merge_method, merge_adapters
from lmforge.evolve.population import Adapter, FitnessCache, Individual, Population, clone_adapter

SELECTION_METHODS = ("tournament", "roulette")
INITIAL_MODES = ("pairs", "experts")
# Merge spaces whose result has the adapter's own keys (the "delta" space returns per-module products).
CROSSOVER_SPACES = ("factors", "delta_svd")


@dataclasses.dataclass
class GenomeConfig:
    """Hyperparameters of one GENOME(+) generation. Defaults are ours, not tuned values from the paper.

    population_size: individuals kept after selection.
    n_children: crossover children made per generation.
    n_parents: parents merged into each child.
    merge_method / merge_density / merge_space: how parents merge (see lmforge.evolve.merge).
    individual_mutation_rate: probability that an individual (old or new) spawns a mutant.
    gene_mutation_rate: probability that one entry of a mutant gets noise.
    mutation_sigma: standard deviation of that noise.
    selection: "tournament" or "roulette" for the places after the elites.
    n_elites: fittest individuals kept unchanged (and not moved by succession).
    tournament_size: contestants per tournament.
    succession: GENOME+ particle-swarm move of the non-elite survivors after selection.
    inertia / c_personal / c_global / c_worst: w, c1, c2, c3 of the succession velocity.
    step_size / step_decay: lambda_0 and its per-step decay factor.
    """

    population_size: int = 10
    n_children: int = 10
    n_parents: int = 2
    merge_method: str = "linear"
    merge_density: float = 1.0
    merge_space: str = "factors"
    individual_mutation_rate: float = 0.3
    gene_mutation_rate: float = 0.1
    mutation_sigma: float = 1e-3
    selection: str = "tournament"
    n_elites: int = 1
    tournament_size: int = 3
    succession: bool = False
    inertia: float = 0.5
    c_personal: float = 0.5
    c_global: float = 0.5
    c_worst: float = 0.1
    step_size: float = 1.0
    step_decay: float = 0.9

    def __post_init__(self) -> None:
        _check_int("population_size", self.population_size, minimum=1)
        _check_int("n_children", self.n_children, minimum=0)
        _check_int("n_parents", self.n_parents, minimum=2)
        _check_int("n_elites", self.n_elites, minimum=0)
        _check_int("tournament_size", self.tournament_size, minimum=1)
        if self.n_elites > self.population_size:
            raise ValueError(f"n_elites ({self.n_elites}) must not exceed population_size ({self.population_size})")
        get_merge_method(self.merge_method)
        if self.merge_space not in CROSSOVER_SPACES:
            raise ValueError(f"merge_space must be one of {CROSSOVER_SPACES}, got {self.merge_space!r}")
        if self.selection not in SELECTION_METHODS:
            raise ValueError(f"selection must be one of {SELECTION_METHODS}, got {self.selection!r}")
        _check_probability("individual_mutation_rate", self.individual_mutation_rate)
        _check_probability("gene_mutation_rate", self.gene_mutation_rate)
        _check_float("merge_density", self.merge_density)
        if not 0 < self.merge_density <= 1:
            raise ValueError(f"merge_density must be in (0, 1], got {self.merge_density}")
        for name in ("mutation_sigma", "inertia", "c_personal", "c_global", "c_worst", "step_size"):
            _check_float(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_probability("step_decay", self.step_decay)
        if not isinstance(self.succession, bool):
            raise TypeError(f"succession must be a bool, got {type(self.succession).__name__}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_probability(name: str, value) -> None:
    _check_float(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_fitness(val_fitness, *, non_negative: bool) -> np.ndarray:
    """val_fitness as a float64 array; TypeError/ValueError naming it otherwise."""
    if isinstance(val_fitness, (str, bytes, Mapping)) or not isinstance(val_fitness, (Sequence, np.ndarray)):
        raise TypeError(f"val_fitness must be a sequence of floats, got {type(val_fitness).__name__}")
    try:
        values = np.asarray(val_fitness, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"val_fitness must be a sequence of floats (validation fitness only), got {err}") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"val_fitness must be a non-empty 1-D sequence, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"val_fitness must be finite, got {values.tolist()}")
    if non_negative and (values < 0).any():
        raise ValueError(f"fitness-proportional draws need val_fitness >= 0, got {values.tolist()}")
    return values


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


# ---------------------------------------------------------------------------------------------
# Ranking and fitness-proportional draws.


def rank_by_fitness(val_fitness: Sequence[float]) -> list[int]:
    """Indices from the highest validation fitness to the lowest; ties keep index order."""
    values = _check_fitness(val_fitness, non_negative=False)
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def draw_by_fitness(val_fitness: Sequence[float], n: int, rng: np.random.Generator) -> list[int]:
    """n distinct indices, each draw with probability f_i / sum f over the indices not drawn yet.

    If every remaining fitness is 0 the draw is uniform over the remaining indices. One ``rng.random()``
    per draw.
    """
    values = _check_fitness(val_fitness, non_negative=True)
    _check_int("n", n, minimum=0)
    _check_rng(rng)
    if n > len(values):
        raise ValueError(f"cannot draw n={n} distinct indices from {len(values)} fitness values")
    remaining = list(range(len(values)))
    drawn = []
    for _ in range(n):
        weights = values[remaining]
        total = weights.sum()
        u = rng.random()
        if total > 0:
            # first position whose cumulative weight exceeds u * total (zero weights are never picked)
            position = int(np.searchsorted(np.cumsum(weights), u * total, side="right"))
            if position >= len(remaining):  # u * total rounded up to the total: take the last positive weight
                position = int(np.flatnonzero(weights > 0)[-1])
        else:
            position = min(int(u * len(remaining)), len(remaining) - 1)
        drawn.append(remaining.pop(position))
    return drawn


# ---------------------------------------------------------------------------------------------
# Crossover and mutation.


def crossover_weights(parent_fitness: Sequence[float]) -> list[float]:
    """Merge weights f_i / sum f (equal weights when every parent has fitness 0)."""
    values = _check_fitness(parent_fitness, non_negative=True)
    total = values.sum()
    if total == 0:
        return [1.0 / len(values)] * len(values)
    return (values / total).tolist()


def crossover(
    parent_adapters: Sequence[Mapping[str, torch.Tensor]],
    parent_fitness: Sequence[float],
    *,
    method: str = "linear",
    density: float = 1.0,
    space: str = "factors",
    generator: torch.Generator | None = None,
) -> Adapter:
    """Child adapter: ``merge_adapters(parent_adapters, crossover_weights(parent_fitness), method, ...)``."""
    if space not in CROSSOVER_SPACES:
        raise ValueError(f"space must be one of {CROSSOVER_SPACES} (a child needs the parents' keys), got {space!r}")
    if len(parent_adapters) != len(parent_fitness):
        raise ValueError(f"parent_adapters has {len(parent_adapters)} entries but parent_fitness has "
                         f"{len(parent_fitness)}")
    return merge_adapters(parent_adapters, crossover_weights(parent_fitness), method, density=density,
                          space=space, generator=generator)


@torch.no_grad()
def mutate(adapter: Mapping[str, torch.Tensor], *, gene_rate: float, sigma: float,
           generator: torch.Generator) -> Adapter:
    """A new adapter ``x + m * sigma * z`` per tensor, m ~ Bernoulli(gene_rate), z ~ N(0, 1), entrywise.

    Masks and noise are drawn on the CPU from ``generator`` (mask, then noise, key after key), so the
    result does not depend on the adapter's device; arithmetic is float32 (float64 for float64).
    The input's tensors are never modified.
    """
    _check_probability("gene_rate", gene_rate)
    _check_float("sigma", sigma)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
    mutant = {}
    for key, x in adapter.items():
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"adapter[{key!r}] must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        compute = torch.promote_types(x.dtype, torch.float32)
        mask = torch.bernoulli(torch.full(x.shape, gene_rate, dtype=compute), generator=generator)
        noise = torch.randn(x.shape, dtype=compute, generator=generator)
        mutant[key] = (x.detach().to(compute) + (mask * noise * sigma).to(x.device)).to(x.dtype)
    return mutant


# ---------------------------------------------------------------------------------------------
# Selection.


def select_survivors(
    val_fitness: Sequence[float],
    n_survivors: int,
    *,
    rng: np.random.Generator,
    n_elites: int = 1,
    method: str = "tournament",
    tournament_size: int = 3,
) -> list[int]:
    """Indices of the survivors: the n_elites fittest first, then the places filled by tournament or roulette.

    Takes validation fitness only. Survivors are distinct (no individual is kept twice); with fewer
    candidates than places, all survive. Tournament: draw min(tournament_size, remaining) contestants
    uniformly without replacement, keep the fittest (lowest index on ties). Roulette: see
    :func:`draw_by_fitness`.
    """
    values = _check_fitness(val_fitness, non_negative=method == "roulette")
    _check_int("n_survivors", n_survivors, minimum=0)
    _check_int("n_elites", n_elites, minimum=0)
    _check_int("tournament_size", tournament_size, minimum=1)
    _check_rng(rng)
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}")
    n_survivors = min(n_survivors, len(values))
    elites = rank_by_fitness(values)[:min(n_elites, n_survivors)]
    elite_set = set(elites)
    remaining = [i for i in range(len(values)) if i not in elite_set]
    n_open = n_survivors - len(elites)
    if method == "roulette":
        return elites + [remaining[j] for j in draw_by_fitness(values[remaining], n_open, rng)]
    chosen = []
    for _ in range(n_open):
        contestants = rng.choice(len(remaining), size=min(tournament_size, len(remaining)), replace=False)
        winner = min(contestants.tolist(), key=lambda j: (-values[remaining[j]], remaining[j]))
        chosen.append(remaining.pop(winner))
    return elites + chosen


# ---------------------------------------------------------------------------------------------
# Succession (GENOME+).


def step_size_at(step: int, initial: float, decay: float) -> float:
    """lambda_t = initial * decay ** step."""
    _check_int("step", step, minimum=0)
    return initial * decay**step


@torch.no_grad()
def succession_update(
    position: Mapping[str, torch.Tensor],
    velocity: Mapping[str, torch.Tensor] | None,
    personal_best: Mapping[str, torch.Tensor],
    global_best: Mapping[str, torch.Tensor],
    global_worst: Mapping[str, torch.Tensor],
    *,
    inertia: float,
    c_personal: float,
    c_global: float,
    c_worst: float,
    random_factors: Sequence[float],
    step_size: float,
) -> tuple[Adapter, Adapter]:
    """One particle-swarm move; returns (new position, new velocity) as new tensors.

    ``v' = inertia v + c_personal r1 (pbest - x) + c_global r2 (gbest - x) - c_worst r3 (gworst - x)``,
    ``x' = x + step_size v'`` with (r1, r2, r3) = random_factors and v = 0 when velocity is None.
    Velocity is kept in the compute dtype (float32, or float64 for float64); x' in the input dtype.
    """
    if len(random_factors) != 3:
        raise ValueError(f"random_factors must be (r1, r2, r3), got {random_factors!r}")
    r1, r2, r3 = (float(r) for r in random_factors)
    others = {"velocity": velocity, "personal_best": personal_best, "global_best": global_best,
              "global_worst": global_worst}
    for name, other in others.items():
        if other is not None and set(other) != set(position):
            raise ValueError(f"{name} has different keys from position")
    new_position, new_velocity = {}, {}
    for key, x in position.items():
        compute = torch.promote_types(x.dtype, torch.float32)
        x_c = x.detach().to(compute)
        v = torch.zeros_like(x_c) if velocity is None else velocity[key].to(device=x.device, dtype=compute)
        v_new = (inertia * v
                 + c_personal * r1 * (personal_best[key].to(compute) - x_c)
                 + c_global * r2 * (global_best[key].to(compute) - x_c)
                 - c_worst * r3 * (global_worst[key].to(compute) - x_c))
        new_velocity[key] = v_new
        new_position[key] = (x_c + step_size * v_new).to(x.dtype)
    return new_position, new_velocity


def succession_step(population: Population, config: GenomeConfig) -> float:
    """Move every non-elite individual of a scored population one succession step; return lambda_t used.

    Random factors are drawn as ``population.rng.random(3)`` per moved individual, in population order.
    Moved individuals lose their scores (re-score them); their personal bests stay as they were.
    """
    population.update_bests()
    if population.global_best is None:
        raise ValueError("succession needs a scored population (no global best yet)")
    order = rank_by_fitness(population.val_fitness())
    elites = set(order[:config.n_elites])
    worst_adapter = population.individuals[order[-1]].adapter  # old dict: moving the worst never changes it
    step = step_size_at(population.succession_steps, config.step_size, config.step_decay)
    for index, individual in enumerate(population.individuals):
        if index in elites:
            continue
        random_factors = population.rng.random(3)
        position, velocity = succession_update(
            individual.adapter, individual.velocity,
            individual.best_adapter if individual.best_adapter is not None else individual.adapter,
            population.global_best.adapter, worst_adapter,
            inertia=config.inertia, c_personal=config.c_personal, c_global=config.c_global,
            c_worst=config.c_worst, random_factors=random_factors, step_size=step)
        individual.velocity = velocity
        individual.replace_adapter(position, origin="succession")
    population.succession_steps += 1
    return step


# ---------------------------------------------------------------------------------------------
# Initial population and one generation.


def initialize_population(
    population: Population,
    experts: Sequence[Mapping[str, torch.Tensor]],
    *,
    size: int | None = None,
    mode: str = "pairs",
    merge_method: str = "linear",
    merge_density: float = 1.0,
) -> list[Individual]:
    """Add the initial individuals to ``population`` (and return them).

    mode="pairs": ``size`` (default: as many as experts) merges of two distinct experts drawn
    uniformly, with weights (w, 1 - w), w ~ U(0, 1). mode="experts": a copy of each expert.
    """
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence) or not experts:
        raise TypeError("experts must be a non-empty list of adapter state dicts")
    if mode not in INITIAL_MODES:
        raise ValueError(f"mode must be one of {INITIAL_MODES}, got {mode!r}")
    if mode == "experts":
        if size is not None and size != len(experts):
            raise ValueError(f"mode='experts' keeps every expert: size must be None or {len(experts)}, got {size}")
        new = [population.make_individual(clone_adapter(expert), origin="expert") for expert in experts]
    else:
        if len(experts) < 2:
            raise ValueError(f"mode='pairs' needs at least 2 experts, got {len(experts)}")
        size = len(experts) if size is None else size
        _check_int("size", size, minimum=1)
        new = []
        for _ in range(size):
            first, second = population.rng.choice(len(experts), size=2, replace=False).tolist()
            w = float(population.rng.random())
            device = next(iter(experts[first].values())).device
            merged = merge_adapters([experts[first], experts[second]], [w, 1.0 - w], merge_method,
                                    density=merge_density, generator=population.tensor_generator(device))
            new.append(population.make_individual(merged, origin="pair"))
    population.individuals.extend(new)
    return new


def evolve_generation(population: Population, fitness: FitnessCache, config: GenomeConfig, *,
                      progress: bool = False) -> dict[str, Any]:
    """One generation of GENOME (GENOME+ with ``config.succession``), in place on ``population``.

    1. score any unscored individual, refresh personal / global bests;
    2. crossover: ``n_children`` children from fitness-proportional parents;
    3. mutation: every current individual and child spawns a mutant with the individual rate;
    4. score the children and mutants;
    5. selection from all of them back to ``population_size``;
    6. (GENOME+) succession moves the non-elite survivors, which are re-scored at once.

    At the end every individual is scored and the bests are up to date. Returns a summary for logs.
    """
    if not isinstance(population, Population):
        raise TypeError(f"population must be a Population, got {type(population).__name__}")
    if not isinstance(fitness, FitnessCache):
        raise TypeError(f"fitness must be a FitnessCache (wrap your fitness_fn: FitnessCache(fitness_fn)), "
                        f"got {type(fitness).__name__}")
    if not isinstance(config, GenomeConfig):
        raise TypeError(f"config must be a GenomeConfig, got {type(config).__name__}")
    if len(population.individuals) < config.n_parents:
        raise ValueError(f"the population has {len(population.individuals)} individuals, fewer than "
                         f"n_parents={config.n_parents}")
    calls_before = fitness.calls
    rng = population.rng

    fitness.score(population.individuals, progress=progress)
    population.update_bests()
    current = list(population.individuals)
    current_fitness = population.val_fitness(current)

    children = []
    for _ in range(config.n_children):
        picked = draw_by_fitness(current_fitness, config.n_parents, rng)
        parents = [current[i] for i in picked]
        device = next(iter(parents[0].adapter.values())).device
        child = crossover([p.adapter for p in parents], [current_fitness[i] for i in picked],
                          method=config.merge_method, density=config.merge_density, space=config.merge_space,
                          generator=population.tensor_generator(device))
        children.append(population.make_individual(child, origin="crossover", parents=[p.uid for p in parents]))

    mutants = []
    for individual in current + children:
        if rng.random() < config.individual_mutation_rate:
            mutant = mutate(individual.adapter, gene_rate=config.gene_mutation_rate, sigma=config.mutation_sigma,
                            generator=population.torch_generator)
            mutants.append(population.make_individual(mutant, origin="mutation", parents=[individual.uid]))

    fitness.score(children + mutants, progress=progress)
    pool = current + children + mutants
    survivors = select_survivors(population.val_fitness(pool), config.population_size, rng=rng,
                                 n_elites=config.n_elites, method=config.selection,
                                 tournament_size=config.tournament_size)
    population.individuals = [pool[i] for i in survivors]
    population.update_bests()
    survivor_fitness = population.val_fitness()

    step = None
    if config.succession:
        step = succession_step(population, config)
        fitness.score(population.individuals, progress=progress)
        population.update_bests()
    population.generation += 1
    final_fitness = population.val_fitness()
    return {
        "generation": population.generation,
        "children": len(children),
        "mutants": len(mutants),
        "selected_best_fitness": max(survivor_fitness),
        "selected_mean_fitness": float(np.mean(survivor_fitness)),
        "best_fitness": max(final_fitness),
        "mean_fitness": float(np.mean(final_fitness)),
        "global_best_fitness": population.fitness(population.global_best),
        "succession_step_size": step,
        "fitness_calls": fitness.calls - calls_before,
    }


# ---------------------------------------------------------------------------------------------
# Ensemble (GENOME+).


def majority_vote(answers: Sequence[Any]) -> Any:
    """The most frequent answer (compared with ==), ignoring None; ties go to the answer given first.

    Pass answers best individual first, so a tie goes to the better-ranked individual. Returns None
    when every answer is None.
    """
    tally: list[list] = []  # [answer, count] in first-seen order; a list, so unhashable answers work too
    for answer in answers:
        if answer is None:
            continue
        for entry in tally:
            if entry[0] == answer:
                entry[1] += 1
                break
        else:
            tally.append([answer, 1])
    if not tally:
        return None
    most = max(count for _, count in tally)
    return next(answer for answer, count in tally if count == most)


def _check_predictions(predictions, val_fitness, label: str) -> int:
    """Number of questions; checks one equally long answer list per individual."""
    if isinstance(predictions, (str, bytes, Mapping)) or not isinstance(predictions, Sequence) or not predictions:
        raise TypeError(f"{label} must be a non-empty list with one list of answers per individual")
    if len(predictions) != len(val_fitness):
        raise ValueError(f"{label} has {len(predictions)} individuals but val_fitness has {len(val_fitness)}")
    lengths = {len(p) for p in predictions}
    if len(lengths) != 1:
        raise ValueError(f"every individual in {label} must answer the same questions; got lengths {sorted(lengths)}")
    return lengths.pop()


def ensemble_answers(predictions: Sequence[Sequence[Any]], val_fitness: Sequence[float], k: int) -> list[Any]:
    """Majority vote per question of the k individuals of highest *validation* fitness.

    predictions[i][q] is individual i's answer to question q (validation or test questions alike:
    no gold answer is involved).
    """
    n_questions = _check_predictions(predictions, val_fitness, "predictions")
    _check_int("k", k, minimum=1)
    if k > len(predictions):
        raise ValueError(f"k={k} exceeds the number of individuals ({len(predictions)})")
    top = rank_by_fitness(val_fitness)[:k]
    return [majority_vote([predictions[i][q] for i in top]) for q in range(n_questions)]


class EnsembleSize(NamedTuple):
    """The chosen k and the validation accuracy of the top-k vote for k = 1, 2, ..."""

    k: int
    val_accuracy_by_k: list[float]


def choose_ensemble_size(
    val_predictions: Sequence[Sequence[Any]],
    val_gold: Sequence[Any],
    val_fitness: Sequence[float],
    *,
    max_k: int | None = None,
    is_correct: Callable[[Any, Any], bool] | None = None,
) -> EnsembleSize:
    """The k (1..max_k) whose top-k majority vote is most accurate on validation data; the smallest on ties.

    Individuals are ranked by ``val_fitness``; ``is_correct(answer, gold)`` defaults to ``==`` (a vote of
    None is wrong). Apply the k to test predictions with :func:`ensemble_answers` and the same val_fitness.
    """
    n_questions = _check_predictions(val_predictions, val_fitness, "val_predictions")
    if len(val_gold) != n_questions:
        raise ValueError(f"val_gold has {len(val_gold)} answers but val_predictions has {n_questions} questions")
    max_k = len(val_predictions) if max_k is None else max_k
    _check_int("max_k", max_k, minimum=1)
    if max_k > len(val_predictions):
        raise ValueError(f"max_k={max_k} exceeds the number of individuals ({len(val_predictions)})")
    grade = is_correct if is_correct is not None else (lambda answer, gold: answer == gold)
    accuracy = []
    for k in range(1, max_k + 1):
        votes = ensemble_answers(val_predictions, val_fitness, k)
        correct = sum(bool(vote is not None and grade(vote, gold)) for vote, gold in zip(votes, val_gold))
        accuracy.append(correct / n_questions if n_questions else 0.0)
    return EnsembleSize(k=accuracy.index(max(accuracy)) + 1, val_accuracy_by_k=accuracy)

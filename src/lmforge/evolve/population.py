"""Population state of GENOME / GENOME+: individuals, their validation fitness, the RNGs, save and resume.

An :class:`Individual` is one LoRA adapter state dict (``{name: tensor}``) plus what evolution knows
about it: its validation scores per task, its lineage, and the particle-swarm state GENOME+ succession
keeps for it (velocity, personal best).

Fitness is tied to the *content* of the weights, never to the Python object:

* :func:`adapter_hash` is a BLAKE2b digest over every tensor's name, dtype, shape and raw bytes, taken
  in sorted key order (so the dict's key order does not matter; the device does not count either,
  since moving an adapter between devices does not change what it computes).
* Hashes are computed **on demand**, never cached on the object. An individual's scores are stored
  together with the hash of the weights they were measured on (``val_scores_hash``), and they count
  only while that hash still matches, so any change to the weights -- a new dict, or a tensor edited
  in place -- makes the individual "unscored" again and it is re-scored. Re-hashing costs one pass
  over the adapter (about 0.2 s for 100 MB of float32 on one CPU core), which is small next to evaluating an LLM.
* :class:`FitnessCache` wraps a user's ``fitness_fn(individual) -> {task: score}`` and calls it only
  for hashes it has not seen, so a child that happens to equal an earlier individual costs nothing.

The scores an individual carries are *validation* scores, the only numbers that selection, ranking
and the ensemble's choice of k may see. Scalar fitness over several tasks is
:func:`weighted_fitness`: ``sum_t w_t s_t / sum_t w_t`` (the plain mean when no weights are given).

:class:`Population` holds the individuals, the generation counter, the global best (a copy), and all
randomness of evolution: a ``numpy.random.Generator`` (PCG64) for discrete choices and a CPU
``torch.Generator`` for tensor noise and DARE masks. ``state_dict()`` / ``load_state_dict()`` capture
and restore all of it bit for bit; ``save(folder)`` writes ``population.safetensors`` (every tensor)
and ``population.json`` (everything else, RNG states included) into a folder that appears atomically,
and ``Population.load(folder)`` reads it back, so a run that saves and resumes continues exactly as a
run that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmforge.models.loading import check_safetensors_file, write_directory_atomically

Adapter = dict[str, torch.Tensor]
# A user's fitness function: the individual in, validation score per task out.
FitnessFn = Callable[["Individual"], Mapping[str, float]]

STATE_FORMAT = "lmforge.evolve.population"
STATE_VERSION = 1
STATE_JSON = "population.json"
STATE_TENSORS = "population.safetensors"


# ---------------------------------------------------------------------------------------------
# Content hashes and fitness.


def adapter_hash(adapter: Mapping[str, torch.Tensor]) -> str:
    """Hex BLAKE2b-128 digest of an adapter's content: names, dtypes, shapes and bytes of its tensors.

    Key order and device do not change the hash; any change of a value (in place or not), a dtype, a
    shape or a name does. Computed afresh on every call.
    """
    if not isinstance(adapter, Mapping):
        raise TypeError(f"adapter must be a mapping of parameter names to tensors, got {type(adapter).__name__}")
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(adapter, key=_checked_key):
        tensor = adapter[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"adapter[{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        flat = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()
        # Length-prefixed header, so no two different (name, dtype, shape) can produce the same byte stream.
        header = f"{key}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00{raw.nbytes}".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(raw)
    return digest.hexdigest()


def _checked_key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"adapter keys must be strings, got {type(key).__name__} {key!r}")
    return key


def check_scores(scores, label: str = "scores") -> dict[str, float]:
    """A plain ``{task: float}`` copy of ``scores``; TypeError/ValueError on non-string tasks or non-finite values."""
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"{label} must be a non-empty mapping of task name to float, got {scores!r}")
    checked = {}
    for task, value in scores.items():
        if not isinstance(task, str):
            raise TypeError(f"{label} keys must be task names (str), got {type(task).__name__} {task!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{label}[{task!r}] must be a float, got {type(value).__name__} {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{label}[{task!r}] must be finite, got {value!r}")
        checked[task] = float(value)
    return checked


def check_task_weights(task_weights) -> dict[str, float] | None:
    """None, or a ``{task: weight}`` copy with finite, non-negative weights summing to more than 0."""
    if task_weights is None:
        return None
    weights = check_scores(task_weights, "task_weights")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task_weights must be non-negative with a positive sum, got {weights}")
    return weights


def weighted_fitness(scores: Mapping[str, float], task_weights: Mapping[str, float] | None = None) -> float:
    """Scalar fitness ``sum_t w_t s_t / sum_t w_t`` over the tasks of ``task_weights``.

    Without weights every task in ``scores`` counts equally (the mean). Tasks in ``scores`` but not in
    ``task_weights`` are ignored (a fitness function may report extra metrics); a weighted task missing
    from ``scores`` is a ValueError.
    """
    scores = check_scores(scores)
    weights = check_task_weights(task_weights) or dict.fromkeys(scores, 1.0)
    missing = [task for task in weights if task not in scores]
    if missing:
        raise ValueError(f"scores lack the weighted task(s) {missing}; scores has {sorted(scores)}")
    return math.fsum(weights[t] * scores[t] for t in weights) / math.fsum(weights.values())


def clone_adapter(adapter: Mapping[str, torch.Tensor]) -> Adapter:
    """A new dict of new tensors (detached copies), same key order."""
    return {key: tensor.detach().clone() for key, tensor in adapter.items()}


# ---------------------------------------------------------------------------------------------
# Individuals.


@dataclasses.dataclass(eq=False)
class Individual:
    """One adapter in the population, and what evolution knows about it.

    uid: id unique within a population (lineage and reports; a particle moved by succession keeps it).
    adapter: ``{name: tensor}``, the LoRA weights.
    origin: how it was made: "expert", "pair" (merged experts), "crossover", "mutation", "succession".
    parents: uids of the individuals it was made from.
    val_scores / val_scores_hash: validation score per task, and the content hash of the weights they
        were measured on; they count only while that hash equals the adapter's current hash.
    velocity: GENOME+ succession velocity (None: zero), same keys as ``adapter``.
    best_adapter / best_val_scores: personal best position (an independent copy) and its scores.
    """

    uid: int
    adapter: Adapter
    origin: str = "expert"
    parents: tuple[int, ...] = ()
    val_scores: dict[str, float] | None = None
    val_scores_hash: str | None = None
    velocity: Adapter | None = None
    best_adapter: Adapter | None = None
    best_val_scores: dict[str, float] | None = None

    def content_hash(self) -> str:
        """adapter_hash of the current weights (computed now, never cached)."""
        return adapter_hash(self.adapter)

    def has_current_scores(self) -> bool:
        """True when scores exist and were measured on exactly the current weights."""
        return self.val_scores is not None and self.val_scores_hash == self.content_hash()

    def current_val_scores(self) -> dict[str, float]:
        """The validation scores of the current weights; ValueError when missing or stale."""
        if self.val_scores is None:
            raise ValueError(f"individual {self.uid} has not been scored; score it (FitnessCache.score) first")
        if self.val_scores_hash != self.content_hash():
            raise ValueError(f"individual {self.uid}'s weights changed since it was scored; score it again "
                             "(FitnessCache.score) before using its fitness")
        return dict(self.val_scores)

    def set_val_scores(self, scores: Mapping[str, float], content_hash: str | None = None) -> None:
        """Record validation scores for the weights whose hash is ``content_hash`` (default: the current ones)."""
        self.val_scores = check_scores(scores, "scores")
        self.val_scores_hash = content_hash if content_hash is not None else self.content_hash()

    def replace_adapter(self, adapter: Adapter, origin: str | None = None) -> None:
        """Give the individual new weights; its scores are dropped (they belonged to the old weights)."""
        self.adapter = adapter
        self.val_scores = None
        self.val_scores_hash = None
        if origin is not None:
            self.origin = origin


class FitnessCache:
    """Wraps ``fitness_fn(individual) -> {task: validation score}``; calls it once per distinct content hash.

    ``calls`` counts calls of fitness_fn, ``hits`` the answers served from the cache. ``state_dict()``
    (hash -> scores, JSON-friendly) lets a resumed run skip adapters it has already evaluated.
    """

    def __init__(self, fitness_fn: FitnessFn):
        if not callable(fitness_fn):
            raise TypeError(f"fitness_fn must be callable, got {type(fitness_fn).__name__}")
        self.fitness_fn = fitness_fn
        self.scores_by_hash: dict[str, dict[str, float]] = {}
        self.calls = 0
        self.hits = 0

    def __call__(self, individual: Individual) -> dict[str, float]:
        """Validation scores of the individual's current weights (from the cache when the hash is known)."""
        content_hash = individual.content_hash()
        return dict(self._scores_for(individual, content_hash))

    def _scores_for(self, individual: Individual, content_hash: str) -> dict[str, float]:
        if content_hash in self.scores_by_hash:
            self.hits += 1
            return self.scores_by_hash[content_hash]
        scores = check_scores(self.fitness_fn(individual), "fitness_fn's result")
        self.calls += 1
        self.scores_by_hash[content_hash] = scores
        return scores

    def score(self, individuals: Iterable[Individual], *, progress: bool = False) -> None:
        """Set the validation scores of every individual whose scores are missing or stale."""
        pending = [ind for ind in individuals if not ind.has_current_scores()]
        for individual in tqdm(pending, desc="fitness", unit="adapter", disable=not progress or not pending):
            content_hash = individual.content_hash()
            individual.set_val_scores(self._scores_for(individual, content_hash), content_hash)

    def state_dict(self) -> dict:
        return {"scores_by_hash": {h: dict(s) for h, s in self.scores_by_hash.items()},
                "calls": self.calls, "hits": self.hits}

    def load_state_dict(self, state: Mapping) -> None:
        self.scores_by_hash = {str(h): check_scores(s, f"scores_by_hash[{h!r}]")
                               for h, s in state["scores_by_hash"].items()}
        self.calls = int(state["calls"])
        self.hits = int(state["hits"])


# ---------------------------------------------------------------------------------------------
# The population.


class Population:
    """Individuals, the global best, counters and RNGs of one evolution run.

    Args:
        seed: seeds both RNGs: ``rng`` (numpy PCG64: parent draws, selection, random factors) and
            ``torch_generator`` (CPU: mutation noise, DARE masks). Same seed, same run.
        task_weights: weights of the tasks in the scalar fitness (see :func:`weighted_fitness`);
            None weighs every task a fitness function reports equally.
    """

    def __init__(self, seed: int, *, task_weights: Mapping[str, float] | None = None):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.task_weights = check_task_weights(task_weights)
        self.individuals: list[Individual] = []
        self.generation = 0
        self.succession_steps = 0  # how many succession moves were made; the step size decays with it
        self.next_uid = 0
        self.global_best: Individual | None = None  # an independent copy of the best scored adapter so far
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.torch_generator = torch.Generator(device="cpu").manual_seed(seed)

    # --- individuals and fitness -------------------------------------------------------------

    def make_individual(self, adapter: Adapter, *, origin: str, parents: Sequence[int] = ()) -> Individual:
        """A new Individual with the next uid (not yet added to ``individuals``)."""
        individual = Individual(uid=self.next_uid, adapter=adapter, origin=origin, parents=tuple(parents))
        self.next_uid += 1
        return individual

    def fitness(self, individual: Individual) -> float:
        """Weighted validation fitness of the individual's current weights (ValueError if unscored/stale)."""
        return weighted_fitness(individual.current_val_scores(), self.task_weights)

    def val_fitness(self, individuals: Sequence[Individual] | None = None) -> list[float]:
        """Weighted validation fitness of each individual (default: the population)."""
        return [self.fitness(ind) for ind in (self.individuals if individuals is None else individuals)]

    def best(self) -> Individual:
        """The current individual of highest validation fitness (the first one on ties)."""
        if not self.individuals:
            raise ValueError("the population is empty")
        fitness = self.val_fitness()
        return self.individuals[fitness.index(max(fitness))]

    def update_bests(self) -> None:
        """Refresh personal bests and the global best from every individual with current scores.

        A best changes only on a strict improvement, and is stored as a copy so that later changes to
        an individual's tensors (in place or not) never reach it.
        """
        for individual in self.individuals:
            if not individual.has_current_scores():
                continue
            fitness = self.fitness(individual)
            if (individual.best_val_scores is None
                    or fitness > weighted_fitness(individual.best_val_scores, self.task_weights)):
                individual.best_adapter = clone_adapter(individual.adapter)
                individual.best_val_scores = dict(individual.val_scores)
            if self.global_best is None or fitness > weighted_fitness(self.global_best.val_scores, self.task_weights):
                self.global_best = Individual(uid=individual.uid, adapter=clone_adapter(individual.adapter),
                                              origin=individual.origin, parents=individual.parents,
                                              val_scores=dict(individual.val_scores),
                                              val_scores_hash=individual.val_scores_hash)

    def tensor_generator(self, device: torch.device) -> torch.Generator:
        """The CPU generator for CPU tensors; for another device, a generator seeded from it (reproducible)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.torch_generator
        seed = int(torch.randint(0, 2**62, (1,), generator=self.torch_generator))
        return torch.Generator(device=device).manual_seed(seed)

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"meta": JSON-friendly dict, "tensors": {name: CPU tensor}}``, a snapshot (tensors are copies)."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": self.torch_generator.get_state().clone()}

        def put(prefix: str, adapter: Adapter | None) -> list[str] | None:
            if adapter is None:
                return None
            keys = list(adapter)
            for j, key in enumerate(keys):  # numbered names, so any key text is safe in safetensors
                tensors[f"{prefix}.{j}"] = adapter[key].detach().to("cpu").contiguous().clone()
            return keys

        def describe(individual: Individual, prefix: str) -> dict:
            return {
                "uid": individual.uid, "origin": individual.origin, "parents": list(individual.parents),
                "keys": put(f"{prefix}.adapter", individual.adapter),
                "val_scores": individual.val_scores, "val_scores_hash": individual.val_scores_hash,
                "velocity_keys": put(f"{prefix}.velocity", individual.velocity),
                "best_keys": put(f"{prefix}.best", individual.best_adapter),
                "best_val_scores": individual.best_val_scores,
            }

        meta = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "seed": self.seed,
            "task_weights": self.task_weights, "generation": self.generation,
            "succession_steps": self.succession_steps, "next_uid": self.next_uid,
            "numpy_rng": self.rng.bit_generator.state,
            "individuals": [describe(ind, f"individuals.{n}") for n, ind in enumerate(self.individuals)],
            "global_best": None if self.global_best is None else describe(self.global_best, "global_best"),
        }
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (RNG states included). Nothing changes if it is malformed."""
        meta, tensors = state["meta"], state["tensors"]
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(f"not a population state of format {STATE_FORMAT!r} version {STATE_VERSION}: "
                             f"got format {meta.get('format')!r} version {meta.get('version')!r}")

        def take(prefix: str, keys: list[str] | None) -> Adapter | None:
            if keys is None:
                return None
            try:
                return {key: tensors[f"{prefix}.{j}"].clone() for j, key in enumerate(keys)}
            except KeyError as err:
                raise ValueError(f"population state lacks tensor {err.args[0]!r}") from None

        def rebuild(entry: Mapping, prefix: str) -> Individual:
            individual = Individual(
                uid=int(entry["uid"]), adapter=take(f"{prefix}.adapter", entry["keys"]), origin=entry["origin"],
                parents=tuple(int(p) for p in entry["parents"]),
                val_scores=None if entry["val_scores"] is None else check_scores(entry["val_scores"]),
                val_scores_hash=entry["val_scores_hash"],
                velocity=take(f"{prefix}.velocity", entry["velocity_keys"]),
                best_adapter=take(f"{prefix}.best", entry["best_keys"]),
                best_val_scores=None if entry["best_val_scores"] is None else check_scores(entry["best_val_scores"]),
            )
            if individual.val_scores is not None and individual.val_scores_hash != individual.content_hash():
                raise ValueError(f"population state is corrupt: the weights of individual {individual.uid} "
                                 "do not match the hash they were scored under")
            return individual

        individuals = [rebuild(entry, f"individuals.{n}") for n, entry in enumerate(meta["individuals"])]
        global_best = None if meta["global_best"] is None else rebuild(meta["global_best"], "global_best")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = meta["numpy_rng"]
        if "rng.torch" not in tensors:
            raise ValueError("population state lacks tensor 'rng.torch'")
        torch_generator = torch.Generator(device="cpu")
        torch_generator.set_state(tensors["rng.torch"].clone())

        self.seed = int(meta["seed"])
        self.task_weights = check_task_weights(meta["task_weights"])
        self.generation = int(meta["generation"])
        self.succession_steps = int(meta["succession_steps"])
        self.next_uid = int(meta["next_uid"])
        self.individuals, self.global_best = individuals, global_best
        self.rng, self.torch_generator = rng, torch_generator

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``population.safetensors`` + ``population.json`` into ``folder``, which appears atomically.

        With overwrite=False (the default) an existing folder is a FileExistsError; save each generation
        to its own folder to keep every checkpoint whole. Returns the folder's path.
        """
        folder = Path(folder).expanduser()
        state = self.state_dict()
        with write_directory_atomically(folder, overwrite=overwrite) as staging:
            save_file(state["tensors"], str(staging / STATE_TENSORS))
            (staging / STATE_JSON).write_text(json.dumps(state["meta"], indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Population:
        """The population saved in ``folder`` by :meth:`save`, with its RNG states: it continues bit for bit."""
        folder = Path(folder).expanduser()
        json_path, tensors_path = folder / STATE_JSON, folder / STATE_TENSORS
        if not json_path.is_file():
            raise FileNotFoundError(f"{folder} holds no saved population ({STATE_JSON} is missing)")
        check_safetensors_file(tensors_path)
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path} is not valid JSON: {err}") from err
        population = cls(seed=0)
        population.load_state_dict({"meta": meta, "tensors": load_file(str(tensors_path))})
        return population

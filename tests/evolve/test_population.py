"""Population state: content hashes, the fitness cache, weighted fitness, bests, save / load and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.evolve.operators import GenomeConfig, evolve_generation, initialize_population
from lmforge.evolve.population import (
    STATE_JSON,
    STATE_TENSORS,
    FitnessCache,
    Individual,
    Population,
    adapter_hash,
    weighted_fitness,
)

from tests.evolve.toys import SHAPES, toy_adapter  # noqa: E402,F401


def distance_fitness(individual: Individual) -> dict[str, float]:
    """Deterministic toy fitness in (0, 1]: closeness of the adapter to all-ones (task a) and all-halves (task b)."""
    d_a = sum(float(((t.double() - 1.0) ** 2).sum()) for t in individual.adapter.values())
    d_b = sum(float(((t.double() - 0.5) ** 2).sum()) for t in individual.adapter.values())
    return {"a": 1.0 / (1.0 + d_a), "b": 1.0 / (1.0 + d_b)}


# ---------------------------------------------------------------------------------------------
# Content hashes.


def test_equal_tensors_give_equal_hashes_and_key_order_does_not_matter():
    adapter = toy_adapter(0)
    copy = {key: tensor.clone() for key, tensor in reversed(list(adapter.items()))}
    assert list(copy) != list(adapter)
    assert adapter_hash(copy) == adapter_hash(adapter)
    # A non-contiguous view holding the same values hashes like its contiguous copy.
    transposed = {k: t.t().contiguous().t() for k, t in adapter.items()}
    assert not transposed["base_model.model.q.lora_A.weight"].is_contiguous()
    assert adapter_hash(transposed) == adapter_hash(adapter)


def test_in_place_change_changes_the_hash_and_reverting_restores_it():
    adapter = toy_adapter(1)
    before = adapter_hash(adapter)
    key = "base_model.model.v.lora_B.weight"
    old_value = adapter[key][2, 1].item()
    adapter[key][2, 1] += 1e-6  # the smallest visible change still changes the bytes
    assert adapter_hash(adapter) != before
    adapter[key][2, 1] = old_value
    assert adapter_hash(adapter) == before


@pytest.mark.parametrize("change", ["dtype", "shape", "name", "extra_key", "sign_of_zero"])
def test_hash_sees_dtype_shape_name_and_bytes(change):
    adapter = toy_adapter(2)
    changed = dict(adapter)
    key = "base_model.model.q.lora_A.weight"
    if change == "dtype":
        changed[key] = adapter[key].double()
    elif change == "shape":
        changed[key] = adapter[key].reshape(8, 3)  # same bytes, other shape
    elif change == "name":
        changed["renamed"] = changed.pop(key)
    elif change == "extra_key":
        changed["extra"] = torch.zeros(1)
    else:
        adapter = {key: torch.zeros(2)}
        changed = {key: -torch.zeros(2)}  # equal as numbers, different bytes: a content hash of bytes
    assert adapter_hash(changed) != adapter_hash(adapter)


def test_hash_works_for_bfloat16_and_0_dim_tensors_and_rejects_bad_input():
    adapter = {"a": torch.tensor(1.5, dtype=torch.bfloat16), "b": torch.randn(3).to(torch.bfloat16)}
    assert adapter_hash(adapter) == adapter_hash({k: t.clone() for k, t in adapter.items()})
    assert len(adapter_hash(adapter)) == 32
    with pytest.raises(TypeError, match="adapter"):
        adapter_hash([torch.zeros(1)])
    with pytest.raises(TypeError, match=r"adapter\['x'\]"):
        adapter_hash({"x": np.zeros(2)})


def test_individual_scores_go_stale_when_its_weights_change():
    individual = Individual(uid=0, adapter=toy_adapter(3))
    assert not individual.has_current_scores()
    with pytest.raises(ValueError, match="not been scored"):
        individual.current_val_scores()
    individual.set_val_scores({"a": 0.5})
    assert individual.current_val_scores() == {"a": 0.5}
    individual.adapter["base_model.model.q.lora_B.weight"].mul_(2)  # in place: the object stays the same
    assert not individual.has_current_scores()
    with pytest.raises(ValueError, match="changed since it was scored"):
        individual.current_val_scores()
    individual.set_val_scores({"a": 0.7})
    individual.replace_adapter(toy_adapter(4))
    assert individual.val_scores is None and not individual.has_current_scores()


# ---------------------------------------------------------------------------------------------
# The fitness cache.


def test_fitness_cache_calls_the_function_only_for_unseen_hashes():
    calls = []

    def fitness_fn(individual):
        calls.append(individual.uid)
        return distance_fitness(individual)

    cache = FitnessCache(fitness_fn)
    first = Individual(uid=0, adapter=toy_adapter(5))
    twin = Individual(uid=1, adapter={k: t.clone() for k, t in first.adapter.items()})  # other object, same bytes
    other = Individual(uid=2, adapter=toy_adapter(6))
    cache.score([first, twin, other])
    assert calls == [0, 2] and cache.calls == 2 and cache.hits == 1
    assert twin.val_scores == first.val_scores == distance_fitness(first)

    cache.score([first, twin, other])  # all current: nothing asked, not even the cache
    assert calls == [0, 2] and cache.hits == 1

    key = "base_model.model.v.lora_A.weight"
    first.adapter[key][0, 0] += 0.25  # mutate in place: same object, new content
    cache.score([first])
    assert calls == [0, 2, 0]
    assert first.current_val_scores() == distance_fitness(first) != twin.val_scores
    first.adapter[key][0, 0] -= 0.25  # back to the old bytes: served from the cache
    assert cache(first) == twin.val_scores and calls == [0, 2, 0]

    restored = FitnessCache(fitness_fn)
    restored.load_state_dict(json.loads(json.dumps(cache.state_dict())))
    restored.score([Individual(uid=9, adapter={k: t.clone() for k, t in other.adapter.items()})])
    assert calls == [0, 2, 0]


@pytest.mark.parametrize("result, error", [({"a": float("nan")}, ValueError), ({}, TypeError),
                                           (0.5, TypeError), ({1: 0.5}, TypeError), ({"a": "high"}, TypeError)])
def test_fitness_cache_rejects_bad_fitness_results(result, error):
    cache = FitnessCache(lambda individual: result)
    with pytest.raises(error, match="fitness_fn's result"):
        cache.score([Individual(uid=0, adapter=toy_adapter(7))])
    assert cache.calls == 0 and not cache.scores_by_hash


def test_weighted_fitness_known_answers():
    scores = {"gsm8k": 0.6, "math": 0.2, "extra_metric": 99.0}
    assert weighted_fitness({"gsm8k": 0.6, "math": 0.2}) == pytest.approx(0.4)
    assert weighted_fitness(scores, {"gsm8k": 1.0, "math": 3.0}) == pytest.approx((0.6 + 3 * 0.2) / 4)
    assert weighted_fitness(scores, {"gsm8k": 0.0, "math": 2.0}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"lack the weighted task\(s\) \['arc'\]"):
        weighted_fitness(scores, {"gsm8k": 1.0, "arc": 1.0})
    with pytest.raises(ValueError, match="task_weights"):
        weighted_fitness(scores, {"gsm8k": -1.0, "math": 2.0})
    with pytest.raises(ValueError, match="task_weights"):
        weighted_fitness(scores, {"gsm8k": 0.0})


def test_population_fitness_uses_its_task_weights():
    population = Population(0, task_weights={"a": 3.0, "b": 1.0})
    individual = population.make_individual(toy_adapter(8), origin="expert")
    individual.set_val_scores({"a": 0.2, "b": 0.6})
    assert population.fitness(individual) == pytest.approx((3 * 0.2 + 0.6) / 4)


# ---------------------------------------------------------------------------------------------
# Personal and global bests.


def test_personal_and_global_bests_are_copies_updated_on_strict_improvement():
    population = Population(0)
    first = population.make_individual(toy_adapter(10), origin="expert")
    second = population.make_individual(toy_adapter(11), origin="expert")
    population.individuals = [first, second]
    first.set_val_scores({"a": 0.3})
    second.set_val_scores({"a": 0.5})
    population.update_bests()
    assert population.global_best.uid == second.uid
    assert first.best_val_scores == {"a": 0.3}

    snapshot = {k: t.clone() for k, t in first.adapter.items()}
    for tensor in first.adapter.values():
        tensor.add_(10.0)  # moving x in place must not move its personal best
    for key in snapshot:
        assert torch.equal(first.best_adapter[key], snapshot[key])
        assert first.best_adapter[key].data_ptr() != first.adapter[key].data_ptr()
    for tensor in second.adapter.values():
        tensor.zero_()
    assert adapter_hash(population.global_best.adapter) == population.global_best.val_scores_hash

    first.set_val_scores({"a": 0.2})  # worse than its best: the personal best stays
    population.update_bests()
    assert first.best_val_scores == {"a": 0.3}
    for key in snapshot:
        assert torch.equal(first.best_adapter[key], snapshot[key])
    first.set_val_scores({"a": 0.5})  # equal to the global best: not a strict improvement
    population.update_bests()
    assert population.global_best.uid == second.uid
    first.set_val_scores({"a": 0.9})
    population.update_bests()
    assert first.best_val_scores == {"a": 0.9} and population.global_best.uid == first.uid
    assert torch.equal(population.global_best.adapter["base_model.model.q.lora_A.weight"],
                       first.adapter["base_model.model.q.lora_A.weight"])


# ---------------------------------------------------------------------------------------------
# State dict, save / load, resume.


def evolved_population(seed: int, generations: int, config: GenomeConfig) -> tuple[Population, FitnessCache]:
    population = Population(seed, task_weights={"a": 2.0, "b": 1.0})
    initialize_population(population, [toy_adapter(100 + i) for i in range(4)], size=6, mode="pairs")
    cache = FitnessCache(distance_fitness)
    for _ in range(generations):
        evolve_generation(population, cache, config)
    return population, cache


def assert_same_population(got: Population, expected: Population) -> None:
    assert got.generation == expected.generation and got.succession_steps == expected.succession_steps
    assert got.next_uid == expected.next_uid
    assert got.task_weights == expected.task_weights
    assert got.rng.bit_generator.state == expected.rng.bit_generator.state
    assert torch.equal(got.torch_generator.get_state(), expected.torch_generator.get_state())
    pairs = list(zip(got.individuals, expected.individuals)) + [(got.global_best, expected.global_best)]
    assert len(got.individuals) == len(expected.individuals)
    for mine, theirs in pairs:
        assert (mine.uid, mine.origin, mine.parents) == (theirs.uid, theirs.origin, theirs.parents)
        assert mine.val_scores == theirs.val_scores and mine.val_scores_hash == theirs.val_scores_hash
        assert mine.best_val_scores == theirs.best_val_scores
        for attribute in ("adapter", "velocity", "best_adapter"):
            a, b = getattr(mine, attribute), getattr(theirs, attribute)
            assert (a is None) == (b is None), attribute
            if a is not None:
                assert list(a) == list(b)
                for key in a:
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (attribute, key)


GENOME_PLUS = GenomeConfig(population_size=6, n_children=5, merge_method="dare_ties", merge_density=0.7,
                           individual_mutation_rate=0.5, gene_mutation_rate=0.3, mutation_sigma=0.05,
                           selection="roulette", n_elites=1, succession=True, step_decay=0.8)


def test_save_load_then_continue_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight, _ = evolved_population(seed=7, generations=4, config=GENOME_PLUS)

    interrupted, _ = evolved_population(seed=7, generations=2, config=GENOME_PLUS)
    interrupted.save(tmp_path / "generation-2")
    del interrupted
    resumed = Population.load(tmp_path / "generation-2")
    cache = FitnessCache(distance_fitness)  # a fresh process: nothing cached
    for _ in range(2):
        evolve_generation(resumed, cache, GENOME_PLUS)
    assert_same_population(resumed, straight)
    assert any(ind.velocity is not None for ind in straight.individuals)  # succession state was exercised
    assert sorted(p.name for p in (tmp_path / "generation-2").iterdir()) == [STATE_JSON, STATE_TENSORS]


def test_same_seed_same_run_and_other_seed_another_run():
    first, _ = evolved_population(seed=3, generations=2, config=GENOME_PLUS)
    again, _ = evolved_population(seed=3, generations=2, config=GENOME_PLUS)
    other, _ = evolved_population(seed=4, generations=2, config=GENOME_PLUS)
    assert_same_population(again, first)
    assert adapter_hash(other.best().adapter) != adapter_hash(first.best().adapter)


def test_state_dict_round_trip_keeps_dtypes_key_order_and_the_rng_stream():
    population = Population(11)
    adapter = {"z.lora_A.weight": torch.randn(2, 3).to(torch.bfloat16), "a.lora_B.weight": torch.randn(4, 2).double()}
    individual = population.make_individual(adapter, origin="expert")
    individual.set_val_scores({"a": 1 / 3})
    population.individuals = [individual]
    population.update_bests()
    population.rng.random(5)
    state = population.state_dict()
    json.dumps(state["meta"])  # JSON-friendly as promised

    copy = Population(0)
    copy.load_state_dict(state)
    assert_same_population(copy, population)
    assert list(copy.individuals[0].adapter) == ["z.lora_A.weight", "a.lora_B.weight"]
    assert copy.individuals[0].val_scores == {"a": 1 / 3}
    assert np.array_equal(copy.rng.random(4), population.rng.random(4))
    assert torch.equal(torch.randn(3, generator=copy.torch_generator),
                       torch.randn(3, generator=population.torch_generator))
    # A snapshot: changing the population afterwards does not change the state already taken.
    population.individuals[0].adapter["a.lora_B.weight"].zero_()
    assert state["tensors"]["individuals.0.adapter.1"].abs().sum() > 0


def test_save_refuses_to_overwrite_and_load_detects_tampering(tmp_path):
    population, _ = evolved_population(seed=5, generations=1, config=GenomeConfig(population_size=4, n_children=2))
    folder = population.save(tmp_path / "checkpoint")
    with pytest.raises(FileExistsError):
        population.save(folder)
    population.save(folder, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers

    meta = json.loads((folder / STATE_JSON).read_text())
    meta["individuals"][0]["val_scores_hash"] = "0" * 32
    (folder / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the hash"):
        Population.load(folder)
    with pytest.raises(FileNotFoundError, match="no saved population"):
        Population.load(tmp_path / "missing")
    bad = Population(0)
    with pytest.raises(ValueError, match="format"):
        bad.load_state_dict({"meta": {"format": "other"}, "tensors": {}})
    assert bad.individuals == [] and bad.generation == 0


def test_population_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        Population(-1)
    with pytest.raises(ValueError, match="task_weights"):
        Population(0, task_weights={"a": 0.0})
    with pytest.raises(TypeError, match="fitness_fn"):
        FitnessCache("not callable")
    with pytest.raises(ValueError, match="empty"):
        Population(0).best()

"""GENOME(+) operators against exact probabilities, merge_adapters, hand-computed float64 updates and counts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lmforge.evolve.merge import merge_adapters
from lmforge.evolve.operators import (
    GenomeConfig,
    choose_ensemble_size,
    crossover,
    crossover_weights,
    draw_by_fitness,
    ensemble_answers,
    evolve_generation,
    initialize_population,
    majority_vote,
    mutate,
    rank_by_fitness,
    select_survivors,
    step_size_at,
    succession_step,
    succession_update,
)
from lmforge.evolve.population import FitnessCache, Individual, Population, adapter_hash

from tests.evolve.toys import SHAPES, toy_adapter  # noqa: E402,F401


def distance_fitness(individual: Individual) -> dict[str, float]:
    d = sum(float(((t.double() - 1.0) ** 2).sum()) for t in individual.adapter.values())
    return {"a": 1.0 / (1.0 + d)}


def within(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    """|observed frequency - expected probability| within `sigmas` binomial standard errors."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n) + 1e-12


def seeded_rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


# ---------------------------------------------------------------------------------------------
# Fitness-proportional draws and crossover.


def test_single_draws_are_proportional_to_fitness():
    fitness = [1.0, 2.0, 3.0, 4.0, 0.0]
    rng = seeded_rng(1)
    n = 40_000
    counts = np.bincount([draw_by_fitness(fitness, 1, rng)[0] for _ in range(n)], minlength=5)
    expected = np.array(fitness) / sum(fitness)
    assert counts[4] == 0  # zero fitness is never drawn while others remain
    for i in range(4):
        assert within(counts[i] / n, expected[i], n), (i, counts[i] / n, expected[i])


def test_parent_pairs_follow_sequential_draws_without_replacement():
    fitness = [0.5, 1.5, 3.0, 1.0]
    p = np.array(fitness) / sum(fitness)
    rng = seeded_rng(2)
    n = 40_000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        pair = tuple(draw_by_fitness(fitness, 2, rng))
        counts[pair] = counts.get(pair, 0) + 1
    assert all(i != j for i, j in counts)  # parents are distinct
    for i, j in itertools.permutations(range(4), 2):
        expected = p[i] * p[j] / (1 - p[i])  # P(first = i) * P(second = j | i removed)
        assert within(counts.get((i, j), 0) / n, expected, n), (i, j)


def test_draws_fall_back_to_uniform_when_all_remaining_fitness_is_zero():
    rng = seeded_rng(3)
    n = 30_000
    seconds = np.bincount([draw_by_fitness([0.0, 5.0, 0.0, 0.0], 2, rng)[1] for _ in range(n)], minlength=4)
    assert seconds[1] == 0
    for i in (0, 2, 3):
        assert within(seconds[i] / n, 1 / 3, n)
    with pytest.raises(ValueError, match="n=5"):
        draw_by_fitness([1.0, 2.0], 5, rng)
    with pytest.raises(ValueError, match=">= 0"):
        draw_by_fitness([1.0, -2.0], 1, rng)


def test_crossover_weights_are_relative_fitness():
    assert crossover_weights([0.2, 0.6]) == pytest.approx([0.25, 0.75])
    assert crossover_weights([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="finite"):
        crossover_weights([0.1, float("nan")])


def test_linear_crossover_is_the_fitness_weighted_average_in_float64():
    parents = [toy_adapter(1, torch.float64), toy_adapter(2, torch.float64)]
    child = crossover(parents, [0.3, 0.9])
    for key in SHAPES:
        expected = (0.3 * parents[0][key] + 0.9 * parents[1][key]) / 1.2
        torch.testing.assert_close(child[key], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, density", [("ties", 0.5), ("dare_ties", 0.6), ("task_arithmetic", 1.0)])
def test_crossover_child_equals_merge_adapters_with_relative_fitness_weights(method, density):
    parents = [toy_adapter(s) for s in (3, 4, 5)]
    fitness = [0.1, 0.4, 0.5]
    child = crossover(parents, fitness, method=method, density=density,
                      generator=torch.Generator().manual_seed(42))
    expected = merge_adapters(parents, [0.1, 0.4, 0.5], method, density=density,
                              generator=torch.Generator().manual_seed(42))
    for key in SHAPES:
        torch.testing.assert_close(child[key], expected[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="space"):
        crossover(parents, fitness, space="delta")


def test_children_of_a_generation_are_merges_of_their_recorded_parents():
    population = Population(5)
    initialize_population(population, [toy_adapter(10 + i) for i in range(5)], mode="experts")
    cache = FitnessCache(distance_fitness)
    cache.score(population.individuals)
    parents_by_uid = {ind.uid: ind for ind in population.individuals}
    fitness_by_uid = {ind.uid: population.fitness(ind) for ind in population.individuals}
    config = GenomeConfig(population_size=20, n_children=6, individual_mutation_rate=0.0, n_elites=0)
    evolve_generation(population, cache, config)
    children = [ind for ind in population.individuals if ind.origin == "crossover"]
    assert len(children) == 6  # population_size exceeds the pool: everyone survives
    for child in children:
        parents = [parents_by_uid[uid] for uid in child.parents]
        weights = [fitness_by_uid[uid] for uid in child.parents]
        expected = merge_adapters([p.adapter for p in parents], weights, "linear")
        assert len(set(child.parents)) == 2
        for key in SHAPES:
            torch.testing.assert_close(child.adapter[key], expected[key], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Mutation.


def test_mutation_statistics_and_parent_untouched():
    parent = {"w": torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
              "b": torch.zeros(7, dtype=torch.float64)}
    snapshot = {k: t.clone() for k, t in parent.items()}
    gene_rate, sigma = 0.15, 0.02
    mutant = mutate(parent, gene_rate=gene_rate, sigma=sigma, generator=torch.Generator().manual_seed(1))
    for key in parent:
        assert torch.equal(parent[key], snapshot[key])  # parent untouched
        assert mutant[key].data_ptr() != parent[key].data_ptr()
    diff = (mutant["w"] - parent["w"]).numpy()
    changed = diff != 0
    n = diff.size
    assert within(changed.mean(), gene_rate, n)
    noise = diff[changed]
    # std error of a sample std of m normals is about sigma / sqrt(2 m); 5 of those
    assert abs(noise.std() - sigma) < 5 * sigma / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(noise.size)
    # Reproducible from the generator; gene_rate 0 copies the values into new tensors.
    again = mutate(parent, gene_rate=gene_rate, sigma=sigma, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], mutant["w"])
    unchanged = mutate(parent, gene_rate=0.0, sigma=sigma, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unchanged["w"], parent["w"]) and unchanged["w"].data_ptr() != parent["w"].data_ptr()


def test_mutation_keeps_dtype_and_rejects_bad_rates():
    parent = toy_adapter(6, torch.bfloat16)
    mutant = mutate(parent, gene_rate=1.0, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert all(mutant[k].dtype == torch.bfloat16 and not torch.equal(mutant[k], parent[k]) for k in SHAPES)
    with pytest.raises(ValueError, match="gene_rate"):
        mutate(parent, gene_rate=1.5, sigma=0.1, generator=torch.Generator())
    with pytest.raises(ValueError, match="sigma"):
        mutate(parent, gene_rate=0.5, sigma=-0.1, generator=torch.Generator())


def test_individual_mutation_rate_and_originals_kept_in_a_generation():
    population = Population(9)
    experts = [{"w": torch.full((2,), float(i))} for i in range(300)]
    initialize_population(population, experts, mode="experts")
    cache = FitnessCache(lambda ind: {"a": float(ind.adapter["w"].sum()) + 1.0})
    cache.score(population.individuals)
    snapshots = {ind.uid: ind.adapter["w"].clone() for ind in population.individuals}
    rate = 0.3
    config = GenomeConfig(population_size=1000, n_children=0, individual_mutation_rate=rate,
                          gene_mutation_rate=1.0, mutation_sigma=0.1)
    summary = evolve_generation(population, cache, config)
    assert within(summary["mutants"] / 300, rate, 300)
    originals = [ind for ind in population.individuals if ind.origin == "expert"]
    assert len(originals) == 300  # mutation adds individuals; it never replaces or edits one
    for ind in originals:
        assert torch.equal(ind.adapter["w"], snapshots[ind.uid])
    for mutant in (ind for ind in population.individuals if ind.origin == "mutation"):
        assert not torch.equal(mutant.adapter["w"], snapshots[mutant.parents[0]])


# ---------------------------------------------------------------------------------------------
# Selection.


@pytest.mark.parametrize("method", ["tournament", "roulette"])
def test_elitism_always_keeps_the_best(method):
    fitness = [0.3, 0.9, 0.1, 0.7, 0.5, 0.05]
    for seed in range(50):
        kept = select_survivors(fitness, 3, rng=seeded_rng(seed), n_elites=2, method=method, tournament_size=2)
        assert kept[:2] == [1, 3] and len(set(kept)) == 3
    assert sorted(select_survivors(fitness, 10, rng=seeded_rng(0), method=method)) == list(range(6))


def test_tournament_win_probabilities_match_the_exact_formula():
    fitness = [0.4, 0.1, 0.8, 0.6, 0.2]
    n_candidates = len(fitness)
    rank_of = {index: rank for rank, index in enumerate(rank_by_fitness(fitness), start=1)}
    rng = seeded_rng(4)
    n = 30_000
    wins = np.bincount([select_survivors(fitness, 1, rng=rng, n_elites=0, tournament_size=2)[0]
                        for _ in range(n)], minlength=n_candidates)
    for index, rank in rank_of.items():
        # the r-th best wins a 2-contestant tournament iff it is drawn with one of the n - r worse ones
        expected = (n_candidates - rank) / math.comb(n_candidates, 2)
        assert within(wins[index] / n, expected, n), (index, rank)
    assert select_survivors(fitness, 5, rng=rng, n_elites=0, tournament_size=5) == [2, 3, 0, 4, 1]


def test_roulette_survivors_are_drawn_proportionally_after_the_elites():
    fitness = [5.0, 1.0, 2.0, 3.0]
    rng = seeded_rng(5)
    n = 30_000
    second = np.bincount([select_survivors(fitness, 2, rng=rng, n_elites=1, method="roulette")[1]
                          for _ in range(n)], minlength=4)
    assert second[0] == 0
    for index, expected in ((1, 1 / 6), (2, 2 / 6), (3, 3 / 6)):
        assert within(second[index] / n, expected, n)


def test_selection_takes_validation_fitness_numbers_only():
    individuals = [Individual(uid=i, adapter=toy_adapter(i)) for i in range(3)]
    with pytest.raises(TypeError, match="val_fitness"):
        select_survivors(individuals, 2, rng=seeded_rng())
    with pytest.raises(ValueError, match="method"):
        select_survivors([0.1, 0.2], 1, rng=seeded_rng(), method="best")
    with pytest.raises(TypeError, match="rng"):
        select_survivors([0.1, 0.2], 1, rng=0)


def test_multi_task_weights_decide_who_is_elite():
    experts = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    scores = {0: {"math": 0.9, "code": 0.1}, 1: {"math": 0.3, "code": 0.6}}
    for weights, expected_elite in (({"math": 1.0, "code": 1.0}, 0), ({"math": 1.0, "code": 3.0}, 1)):
        population = Population(0, task_weights=weights)
        initialize_population(population, experts, mode="experts")
        cache = FitnessCache(lambda ind: scores[int(ind.adapter["w"][0])])
        config = GenomeConfig(population_size=1, n_children=0, individual_mutation_rate=0.0, n_elites=1)
        evolve_generation(population, cache, config)
        assert [ind.uid for ind in population.individuals] == [expected_elite]


# ---------------------------------------------------------------------------------------------
# Succession.


def pso_reference(x, v, p, g, w_, inertia, c1, c2, c3, r, step):
    """The GENOME+ update in float64 numpy, written out independently."""
    v_new = inertia * v + c1 * r[0] * (p - x) + c2 * r[1] * (g - x) - c3 * r[2] * (w_ - x)
    return x + step * v_new, v_new


def test_succession_update_matches_a_hand_computed_float64_step():
    x, v, p, g, worst = (toy_adapter(s, torch.float64) for s in (20, 21, 22, 23, 24))
    coefficients = dict(inertia=0.7, c_personal=0.4, c_global=0.9, c_worst=0.3)
    r = (0.15, 0.62, 0.83)
    new_x, new_v = succession_update(x, v, p, g, worst, **coefficients, random_factors=r, step_size=0.45)
    for key in SHAPES:
        arrays = [a[key].numpy() for a in (x, v, p, g, worst)]
        expected_x, expected_v = pso_reference(*arrays, 0.7, 0.4, 0.9, 0.3, r, 0.45)
        np.testing.assert_allclose(new_x[key].numpy(), expected_x, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(new_v[key].numpy(), expected_v, rtol=1e-13, atol=1e-13)
        assert not torch.equal(new_x[key], x[key])
    # No velocity yet means v = 0; float32 inputs give float32 positions close to the float64 answer.
    x32, p32, g32, w32 = ({k: t.float() for k, t in a.items()} for a in (x, p, g, worst))
    new_x32, new_v32 = succession_update(x32, None, p32, g32, w32, **coefficients, random_factors=r, step_size=1.0)
    for key in SHAPES:
        arrays = [a[key].numpy() for a in (x, p, g, worst)]
        expected_x, _ = pso_reference(arrays[0], 0.0, *arrays[1:], 0.7, 0.4, 0.9, 0.3, r, 1.0)
        assert new_x32[key].dtype == torch.float32 and new_v32[key].dtype == torch.float32
        np.testing.assert_allclose(new_x32[key].numpy(), expected_x, rtol=1e-5, atol=1e-5)


def scored_population(seed: int, n: int = 4) -> tuple[Population, FitnessCache]:
    population = Population(seed)
    initialize_population(population, [toy_adapter(30 + i, torch.float64) for i in range(n)], mode="experts")
    cache = FitnessCache(distance_fitness)
    cache.score(population.individuals)
    population.update_bests()
    return population, cache


def test_succession_step_draws_fresh_factors_from_the_population_rng_and_spares_elites():
    population, cache = scored_population(seed=12)
    config = GenomeConfig(n_elites=1, inertia=0.5, c_personal=0.2, c_global=0.8, c_worst=0.4,
                          step_size=0.6, step_decay=0.5)
    for step_index in range(2):
        fitness = population.val_fitness()
        order = rank_by_fitness(fitness)
        elite, worst = order[0], order[-1]
        expected_rng = np.random.Generator(np.random.PCG64())
        expected_rng.bit_generator.state = population.rng.bit_generator.state
        before = [(ind.adapter, ind.velocity, ind.best_adapter) for ind in population.individuals]
        g = population.global_best.adapter
        w_ = before[worst][0]
        used = succession_step(population, config)
        assert used == pytest.approx(0.6 * 0.5**step_index)
        for index, individual in enumerate(population.individuals):
            x, v, p = before[index]
            if index == elite:
                assert individual.adapter is x and individual.has_current_scores()
                continue
            r = expected_rng.random(3)  # one fresh triple per moved individual, in population order
            assert individual.origin == "succession" and not individual.has_current_scores()
            for key in SHAPES:
                expected_x, expected_v = pso_reference(
                    x[key].numpy(), 0.0 if v is None else v[key].numpy(), p[key].numpy(), g[key].numpy(),
                    w_[key].numpy(), 0.5, 0.2, 0.8, 0.4, r, used)
                np.testing.assert_allclose(individual.adapter[key].numpy(), expected_x, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(individual.velocity[key].numpy(), expected_v, rtol=1e-12, atol=1e-12)
        assert population.succession_steps == step_index + 1
        cache.score(population.individuals)
        population.update_bests()


def test_step_size_decays_geometrically():
    assert [step_size_at(t, 2.0, 0.5) for t in range(4)] == [2.0, 1.0, 0.5, 0.25]
    assert step_size_at(3, 1.0, 1.0) == 1.0
    population, cache = scored_population(seed=13, n=3)
    config = GenomeConfig(population_size=3, n_children=1, individual_mutation_rate=0.0, succession=True,
                          step_size=0.8, step_decay=0.7)
    steps = [evolve_generation(population, cache, config)["succession_step_size"] for _ in range(3)]
    assert steps == pytest.approx([0.8, 0.56, 0.392])


# ---------------------------------------------------------------------------------------------
# Initial population and whole generations.


def test_pairs_initialisation_merges_two_distinct_experts_with_random_weights():
    experts = [toy_adapter(40 + i, torch.float64) for i in range(4)]
    population = Population(21)
    replay = np.random.Generator(np.random.PCG64())
    replay.bit_generator.state = population.rng.bit_generator.state
    new = initialize_population(population, experts, size=5)
    assert [ind.uid for ind in new] == list(range(5)) and population.individuals == new
    for individual in new:
        first, second = replay.choice(4, size=2, replace=False).tolist()
        w = replay.random()
        assert first != second and individual.origin == "pair"
        for key in SHAPES:
            expected = w * experts[first][key] + (1 - w) * experts[second][key]
            torch.testing.assert_close(individual.adapter[key], expected, rtol=1e-12, atol=1e-12)


def test_experts_initialisation_copies_the_experts():
    experts = [toy_adapter(50 + i) for i in range(3)]
    population = Population(0)
    initialize_population(population, experts, mode="experts")
    for individual, expert in zip(population.individuals, experts):
        assert adapter_hash(individual.adapter) == adapter_hash(expert)
        assert all(individual.adapter[k].data_ptr() != expert[k].data_ptr() for k in SHAPES)
    with pytest.raises(ValueError, match="size"):
        initialize_population(Population(0), experts, mode="experts", size=2)
    with pytest.raises(ValueError, match="at least 2"):
        initialize_population(Population(0), experts[:1], mode="pairs")


@pytest.mark.parametrize("succession", [False, True])
def test_generations_keep_the_best_and_score_only_new_adapters(succession):
    population, cache = scored_population(seed=17, n=5)
    config = GenomeConfig(population_size=5, n_children=4, individual_mutation_rate=0.5, mutation_sigma=0.1,
                          n_elites=1, succession=succession)
    best = max(population.val_fitness())
    for _ in range(4):
        calls_before, hashes_before = cache.calls, set(cache.scores_by_hash)
        summary = evolve_generation(population, cache, config)
        assert len(population.individuals) == 5
        assert all(ind.has_current_scores() for ind in population.individuals)
        assert summary["best_fitness"] >= best  # the elite is never lost or moved
        best = summary["best_fitness"]
        assert summary["global_best_fitness"] >= summary["best_fitness"]
        assert population.fitness(population.global_best) == summary["global_best_fitness"]
        new_hashes = set(cache.scores_by_hash) - hashes_before
        assert cache.calls - calls_before == len(new_hashes) == summary["fitness_calls"]
    assert population.generation == 4


def test_genome_config_validation_names_the_field():
    for bad, name in ((dict(population_size=0), "population_size"), (dict(n_parents=1), "n_parents"),
                      (dict(merge_method="soup"), "soup"), (dict(selection="best"), "selection"),
                      (dict(gene_mutation_rate=1.2), "gene_mutation_rate"), (dict(step_decay=2.0), "step_decay"),
                      (dict(n_elites=11), "n_elites"), (dict(merge_space="delta"), "merge_space"),
                      (dict(mutation_sigma=-1.0), "mutation_sigma")):
        with pytest.raises(ValueError, match=name):
            GenomeConfig(**bad)
    with pytest.raises(TypeError, match="population_size"):
        GenomeConfig(population_size=2.5)
    population, _ = scored_population(seed=0, n=2)
    with pytest.raises(TypeError, match="FitnessCache"):
        evolve_generation(population, distance_fitness, GenomeConfig())


# ---------------------------------------------------------------------------------------------
# Ensemble.


def test_majority_vote():
    assert majority_vote(["3", "4", "4", "3", "5", "4"]) == "4"
    assert majority_vote(["7", "8", "8", "7"]) == "7"  # tie: the better-ranked individual's answer
    assert majority_vote([None, None, "2"]) == "2"  # no answer does not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([[1, 2], [1, 2], [3]]) == [1, 2]  # unhashable answers work


def test_ensemble_size_is_chosen_on_validation_data_and_applied_to_test_predictions():
    # Individuals by validation fitness: 0.9 (a), 0.8 (b), 0.7 (c), 0.6 (d), 0.1 (e).
    val_fitness = [0.6, 0.9, 0.1, 0.8, 0.7]
    val_gold = ["1", "2", "3", "4"]
    val_predictions = [
        ["1", "2", "3", "x"],  # d
        ["1", "2", "x", "y"],  # a (best)
        ["z", "z", "z", "z"],  # e
        ["1", "x", "3", "4"],  # b
        ["q", "2", "3", "4"],  # c
    ]
    # Top-k votes by hand: k=1 (a): 2/4; k=2 (a, b): ties go to a: 2/4; k=3 (a, b, c): 4/4;
    # k=4 (+d): q1 "1", q2 "2", q3 "3", q4 "4" (2 of 4 vs x,y): 4/4; k=5: same, 4/4.
    choice = choose_ensemble_size(val_predictions, val_gold, val_fitness)
    assert choice.val_accuracy_by_k == [0.5, 0.5, 1.0, 1.0, 1.0]
    assert choice.k == 3  # the smallest of the best
    assert choose_ensemble_size(val_predictions, val_gold, val_fitness, max_k=2).k == 1

    test_predictions = [["5", "6"], ["5", "7"], ["9", "9"], ["8", "6"], ["8", "6"]]
    # top 3 by validation fitness are a, b, c (not the first three rows, which would vote "5", "6")
    assert ensemble_answers(test_predictions, val_fitness, choice.k) == ["8", "6"]
    assert ensemble_answers(test_predictions, val_fitness, 1) == ["5", "7"]

    lenient = choose_ensemble_size(val_predictions, val_gold, val_fitness,
                                   is_correct=lambda answer, gold: answer in (gold, "x"))
    assert lenient.val_accuracy_by_k[0] == 0.75
    with pytest.raises(ValueError, match="val_gold"):
        choose_ensemble_size(val_predictions, val_gold[:3], val_fitness)
    with pytest.raises(ValueError, match="same questions"):
        ensemble_answers([["1"], ["1", "2"]], [0.1, 0.2], 1)
    with pytest.raises(ValueError, match="k=6"):
        ensemble_answers(test_predictions, val_fitness, 6)

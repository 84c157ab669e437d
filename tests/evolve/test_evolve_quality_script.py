"""bench/evolve_quality.py: the statistics and the time estimate against hand math, and the script end to end
on a tiny random model (every phase, two seeds, reuse of finished seeds, refusal of changed settings)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.agent.tasks import generate_problems
from lmforge.evolve.experts import ExpertsConfig, fresh_lora_adapter, make_experts
from lmforge.evolve.fitness import load_adapter_weights, lora_parameters
from lmforge.evolve.merge import merge_adapters
from lmforge.evolve.run import EvolveConfig
from lmforge.models.loading import load_model
from tests.conftest import load_bench_script
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

quality = load_bench_script("evolve_quality")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quality") / "base"
    build_tiny_model("llama", max_position_embeddings=1024).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def system_rows(accuracies: list[list[float]]) -> dict[int, dict[str, float]]:
    """seed -> {system: accuracy} from rows ordered like quality.SYSTEMS."""
    return {seed: dict(zip(quality.SYSTEMS, row)) for seed, row in enumerate(accuracies)}


def test_aggregate_matches_numpy_and_hand_verdicts():
    # Columns: best expert, uniform, LoraHub, GENOME, GENOME+ best, GENOME+ ensemble.
    per_seed = system_rows([[0.40, 0.30, 0.42, 0.45, 0.50, 0.52],
                            [0.42, 0.31, 0.40, 0.47, 0.49, 0.44],
                            [0.41, 0.29, 0.43, 0.44, 0.51, 0.47]])
    result = quality.aggregate(per_seed, n_test=400, resample_data=True)
    assert result["seeds"] == [0, 1, 2]
    for key in quality.SYSTEMS:
        values = np.array([per_seed[s][key] for s in range(3)], dtype=np.float64)
        stats = result["systems"][key]
        assert stats["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert stats["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert (stats["min"], stats["max"]) == (values.min(), values.max())
        # three seeds with their own 400 test problems each: 1200 graded answers behind the mean
        assert stats["test_standard_error"] == pytest.approx(math.sqrt(values.mean() * (1 - values.mean()) / 1200))
    best = result["headline"]["genome_plus"]
    gains = np.array([0.10, 0.07, 0.10])
    assert best["mean_gain"] == pytest.approx(gains.mean())
    assert best["gain_std"] == pytest.approx(gains.std(ddof=1))
    # spread: the largest std among the gain (0.0173), GENOME+ best (0.01) and the best expert (0.01)
    assert best["spread"] == pytest.approx(gains.std(ddof=1))
    assert best["beats_best_expert_by_more_than_spread"] is True and best["wins_every_seed"] is True
    ensemble = result["headline"]["genome_plus_ensemble"]
    # gains 0.12, 0.02, 0.06: mean 0.0667; the largest std is the gains' (0.0503 > 0.0404 of the ensemble)
    assert ensemble["mean_gain"] == pytest.approx(0.2 / 3)
    assert ensemble["spread"] == pytest.approx(np.std([0.12, 0.02, 0.06], ddof=1))
    assert result["genome_plus_beats_best_expert"] is True

    noisy = system_rows([[0.40, 0.3, 0.4, 0.4, 0.60, 0.40], [0.42, 0.3, 0.4, 0.4, 0.38, 0.41],
                         [0.41, 0.3, 0.4, 0.4, 0.45, 0.43]])
    result = quality.aggregate(noisy, n_test=400, resample_data=False)
    head = result["headline"]["genome_plus"]
    assert head["mean_gain"] == pytest.approx(np.mean([0.20, -0.04, 0.04]))
    assert head["beats_best_expert_by_more_than_spread"] is False and head["wins_every_seed"] is False
    assert result["headline"]["genome_plus_ensemble"]["beats_best_expert_by_more_than_spread"] is False
    assert result["genome_plus_beats_best_expert"] is False
    # one test sample shared by the seeds: only 400 answers behind each mean
    p = np.mean([0.40, 0.42, 0.41])
    assert result["systems"]["best_expert"]["test_standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / 400))

    single = quality.aggregate({7: per_seed[0]}, n_test=10, resample_data=True)
    assert single["systems"]["genome"]["std"] is None
    assert single["headline"]["genome_plus"]["beats_best_expert_by_more_than_spread"] is None
    assert single["genome_plus_beats_best_expert"] is None


def test_evaluation_count_and_budget_fit_by_hand():
    settings = quality.QualitySettings(population_size=8, n_children=8, generations=6, lorahub_budget=16,
                                       ensemble_max_k=5, n_validation=200, n_test=400)
    config = quality.seed_config(settings, 0, ["a", "b", "c", "d", "e"], Path("unused"), model=None, device="cpu",
                                 dtype="auto", progress=False)
    # per generation: 8 children + 0.3 x (8 + 8) expected mutants = 12.8; GENOME+ also re-scores 8 - 1 moved.
    # validation: 5 experts + uniform + 16 LoraHub + 8 initial + 6 x 12.8 + 6 x 19.8 = 225.6
    # test: 5 single systems + 4 more ensemble members, on 400 problems = 2 validation passes each -> 18
    assert quality.evaluations_per_seed(config, 5) == pytest.approx(243.6)
    timing = {"load_seconds": 4.0, "seconds_per_evaluation": 0.5}
    assert quality.estimate_seconds(config, 5, 3, timing) == pytest.approx(3 * (4 + 243.6 * 0.5))

    def make_config(s):
        return quality.seed_config(s, 0, ["a", "b", "c", "d", "e"], Path("unused"), model=None, device="cpu",
                                   dtype="auto", progress=False)

    five = quality.estimate_seconds(make_config(dataclasses.replace(settings, generations=5)), 5, 3, timing)
    assert quality.fit_generations(settings, 5, 3, timing, 1e9, make_config) == 6
    assert quality.fit_generations(settings, 5, 3, timing, five, make_config) == 5
    assert quality.fit_generations(settings, 5, 3, timing, five - 1e-6, make_config) == 4
    assert quality.fit_generations(settings, 5, 3, timing, 1.0, make_config) == 2  # the floor


def test_system_keys_of_the_run_report_names():
    names = {"best expert (rate)": "best_expert", "uniform merge": "uniform_merge",
             "LoraHub (simplex search)": "lorahub", "GENOME": "genome", "GENOME+": "genome_plus",
             "GENOME+ ensemble (top-3 vote)": "genome_plus_ensemble", "something else": None}
    assert {name: quality.system_key(name) for name in names} == names
    with pytest.raises(KeyError, match="genome_plus_ensemble"):
        quality.seed_accuracies({"test_accuracy": {n: 0.5 for n in list(names)[:5]}})


def test_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--seeds"):
        quality.main(["--tiny", "--seeds", "0", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--budget-s"):
        quality.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="juggling"):
        quality.main(["--tiny", "--task", "add_sub+juggling", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="n_test"):
        quality.main(["--tiny", "--n-test", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "experts").exists()


def test_tiny_run_end_to_end_reuses_seeds_and_refuses_changed_settings(tiny_base, tmp_path):
    out = tmp_path / "quality"
    args = ["--tiny", "--model", str(tiny_base), "--seeds", "0", "1", "--out", str(out), "--no-progress"]
    summary = quality.main(args)

    for name in ("summary.json", "summary.md", "summary.png", "settings.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["aggregate"] == json.loads(json.dumps(summary["aggregate"]))
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["add_sub", "rate"]

    # Every number of the summary is recomputed here from the seeds' own result.json files.
    per_seed = {}
    for seed in (0, 1):
        run_dir = out / f"seed-{seed}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["seed"], config["data_seed"]) == (seed, seed)  # each seed draws its own problems
        assert config["methods"] == ["genome", "genome+"] and config["tasks"] == ["add_sub+rate"]
        result = json.loads((run_dir / "result.json").read_text())
        by_prefix = {"best expert": "best_expert", "uniform merge": "uniform_merge", "LoraHub": "lorahub",
                     "GENOME+ ensemble": "genome_plus_ensemble"}
        row = {}
        for name, accuracy in result["test_accuracy"].items():
            key = {"GENOME": "genome", "GENOME+": "genome_plus"}.get(name) or next(
                v for p, v in by_prefix.items() if name.startswith(p))
            row[key] = accuracy
        per_seed[seed] = row
    for key in quality.SYSTEMS:
        values = np.array([per_seed[0][key], per_seed[1][key]])
        stats = summary["aggregate"]["systems"][key]
        assert stats["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert stats["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    for key in quality.HEADLINE_SYSTEMS:
        gains = [per_seed[s][key] - per_seed[s]["best_expert"] for s in (0, 1)]
        assert summary["aggregate"]["headline"][key]["mean_gain"] == pytest.approx(np.mean(gains), abs=1e-12)
    report = (out / "summary.md").read_text()
    assert "| GENOME+ ensemble |" in report and "more than the seed-to-seed spread" in report

    # The two seeds' validation problems differ, and neither meets the test problems of any seed.
    task = dict(skills=["add_sub", "rate"], levels=[1])
    questions = {(split, seed): {p.question for p in generate_problems(4, split=split, seed=seed, **task)}
                 for split in ("validation", "test") for seed in (0, 1)}
    assert questions["validation", 0] != questions["validation", 1]
    assert not (questions["validation", 0] | questions["validation", 1]) & (questions["test", 0] | questions["test", 1])

    # Running the same command again reuses the finished seeds (their files untouched) and gives the same summary.
    stamps = {seed: (out / f"seed-{seed}" / "result.json").stat().st_mtime_ns for seed in (0, 1)}
    again = quality.main(args)
    assert {seed: (out / f"seed-{seed}" / "result.json").stat().st_mtime_ns for seed in (0, 1)} == stamps
    assert again["aggregate"] == summary["aggregate"]

    # The experts' recorded recipe is the one asked for; another recipe is reported field by field.
    folders = {skill: out / "experts" / skill for skill in ("add_sub", "rate")}
    tiny = quality.QualitySettings(**quality.TINY)
    assert quality.recipe_differences(folders, tiny) == []
    assert quality.recipe_differences(folders, dataclasses.replace(tiny, expert_steps=5)) == [
        "add_sub steps=2 (asked 5)", "rate steps=2 (asked 5)"]

    # Other settings in the same folder would mix two experiments: refused, naming the changed field.
    with pytest.raises(ValueError, match="generations"):
        quality.main([*args, "--generations", "2"])


def test_seed_config_is_a_valid_evolve_config_with_fixed_data():
    settings = quality.QualitySettings(resample_data=False)
    config = quality.seed_config(settings, 2, ["x", "y"], Path("r"), model=None, device="cpu", dtype="auto",
                                 progress=False)
    assert isinstance(config, EvolveConfig)
    assert (config.seed, config.data_seed, config.fitness) == (2, 0, "accuracy")
    assert (config.n_validation, config.n_test) == (settings.n_validation, settings.n_test)


def test_frozen_a_experts_keep_the_shared_a_so_factor_merges_are_delta_merges(tiny_base, tmp_path):
    def experts(frozen_a: bool) -> tuple[list[dict], dict]:
        config = ExpertsConfig(output_dir=str(tmp_path / f"frozen-{frozen_a}"), model=str(tiny_base),
                               skills=["add_sub", "rate"], levels=[1], n_train=8, steps=3, batch_size=4,
                               learning_rate=1e-2, lora_rank=2, frozen_a=frozen_a, progress=False)
        folders = make_experts(config).expert_folders
        # PEFT's initialisation drawn in the model's parameter order, as make_experts draws it (seed 0)
        parameters = lora_parameters(load_model(tiny_base, lora=folders["add_sub"])[0])
        initial = fresh_lora_adapter(parameters, torch.Generator().manual_seed(0))
        weights = [load_adapter_weights(folders[s]) for s in ("add_sub", "rate")]
        assert json.loads((folders["rate"] / "training.json").read_text())["frozen_a"] is frozen_a
        return weights, initial

    frozen, initial = experts(frozen_a=True)
    a_keys = [k for k in initial if ".lora_A." in k]
    for adapter in frozen:
        for key in initial:
            if ".lora_A." in key:
                assert torch.equal(adapter[key], initial[key]), key  # untouched, bit for bit
            else:
                assert adapter[key].abs().max() > 0, key  # B was trained away from 0
    # A factor-wise linear merge is the same linear merge of the weight deltas B @ A (float64 reference).
    merged = merge_adapters(frozen, [0.3, 0.7], "linear")
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        delta = merged[b_key].double() @ merged[a_key].double()
        reference = sum(w * (e[b_key].double() @ e[a_key].double()) for w, e in zip((0.3, 0.7), frozen))
        assert torch.allclose(delta, reference, rtol=1e-5, atol=1e-7), a_key

    # Trained A and B (the default): A leaves the shared initialisation, and the identity above fails.
    moving, initial = experts(frozen_a=False)
    assert all(not torch.equal(moving[0][k], initial[k]) for k in a_keys)
    merged = merge_adapters(moving, [0.3, 0.7], "linear")
    b_key = a_keys[0].replace(".lora_A.", ".lora_B.")
    reference = sum(w * (e[b_key].double() @ e[a_keys[0]].double()) for w, e in zip((0.3, 0.7), moving))
    assert not torch.allclose(merged[b_key].double() @ merged[a_keys[0]].double(), reference, rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="shared_init"):
        ExpertsConfig(frozen_a=True, shared_init=False)

"""Evolution runs on a tiny random model: outputs, validation-only selection, resume bit for bit, seeds, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lmforge.evolve.run as run_module
from lmforge.evolve.experts import ExpertsConfig, make_experts, reply_loss
from lmforge.evolve.fitness import (
    AdapterEvaluator,
    encode_answer_examples,
    load_adapter_weights,
    lora_parameters,
    read_adapter,
    save_adapter,
)
from lmforge.evolve.merge import merge_adapters
from lmforge.evolve.run import EvolveConfig, add_evolve_cli, lorahub_candidate, run_evolution
from lmforge.models.loading import load_model
from lmforge.models.lora import LoraAdapterConfig, load_lora
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny base model folder and three random LoRA experts saved as PEFT folders."""
    root = tmp_path_factory.mktemp("evolve")
    base = root / "base"
    build_tiny_model("llama", max_position_embeddings=1024).save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    model, _ = load_model(base, lora=LoraAdapterConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    folders = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        adapter = {k: torch.randn(p.shape, generator=generator) * 0.3 for k, p in lora_parameters(model).items()}
        folders.append(str(save_adapter(model, adapter, root / f"expert{seed}")))
    return root, base, folders


def tiny_config(tiny_setup, run_dir: Path, **changes) -> EvolveConfig:
    root, base, folders = tiny_setup
    values = dict(run_dir=str(run_dir), expert_folders=folders, model=str(base), tasks=["add_sub", "mul_div+rate"],
                  levels=[1], n_validation=4, n_test=4, fitness="loglik", population_size=3, generations=2,
                  n_children=2, individual_mutation_rate=0.5, mutation_sigma=0.05, lorahub_budget=3,
                  ensemble_max_k=3, batch_size=4, max_new_tokens=3, system_prompt="Be brief.", progress=False)
    values.update(changes)
    return EvolveConfig(**values)


def run_files(run_dir: Path) -> dict:
    """Everything a run produces that must be reproducible (not wall times)."""
    files = {name: json.loads((run_dir / name).read_text()) for name in ("history.json", "result.json",
                                                                          "ensemble.json")}
    for method in ("genome", "genome_plus"):
        folder = run_dir / method / "final_population"
        files[f"{method}.json"] = json.loads((folder / "population.json").read_text())
        files[f"{method}.tensors"] = load_file(str(folder / "population.safetensors"))
    files["best_adapter"] = load_adapter_weights(run_dir / "best_adapter")
    return files


def assert_same_files(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        if isinstance(left[name], dict) and left[name] and isinstance(next(iter(left[name].values())), torch.Tensor):
            assert left[name].keys() == right[name].keys(), name
            assert all(torch.equal(left[name][k], right[name][k]) for k in left[name]), name
        else:
            assert left[name] == right[name], name


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory):
    """One uninterrupted loglik run, shared by the reproducibility tests."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_evolution(tiny_config(tiny_setup, run_dir))
    return run_dir


def test_run_writes_report_plot_adapters_and_grades_test_answers_only_at_the_end(tiny_setup, tmp_path, monkeypatch):
    seen = {"phase": "evolution", "evolution": set(), "test": set()}
    original_logprobs = AdapterEvaluator.example_logprobs
    original_answers = AdapterEvaluator.answers
    original_test = run_module.evaluate_on_test

    def spy_logprobs(self, adapter, examples):
        seen[seen["phase"]].update(e.split for e in examples)
        return original_logprobs(self, adapter, examples)

    def spy_answers(self, adapter, examples):
        seen[seen["phase"]].update(e.split for e in examples)
        return original_answers(self, adapter, examples)

    def spy_test(*args, **kwargs):
        seen["phase"] = "test"
        try:
            return original_test(*args, **kwargs)
        finally:
            seen["phase"] = "evolution"

    monkeypatch.setattr(AdapterEvaluator, "example_logprobs", spy_logprobs)
    monkeypatch.setattr(AdapterEvaluator, "answers", spy_answers)
    monkeypatch.setattr(run_module, "evaluate_on_test", spy_test)
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_setup, run_dir, fitness="accuracy", max_new_tokens=2)
    result = run_evolution(config)

    # Selection, ranking, LoraHub and the ensemble's k saw validation examples only; the test phase saw test ones.
    assert seen["evolution"] == {"validation"}
    assert seen["test"] == {"test"}

    report = (run_dir / "report.md").read_text()
    systems = ["best expert (expert", "uniform merge", "LoraHub", "| GENOME |", "| GENOME+ |", "GENOME+ ensemble"]
    assert all(system in report for system in systems)
    assert set(result.test_accuracy) == set(json.loads((run_dir / "result.json").read_text())["test_accuracy"])
    assert all(0.0 <= value <= 1.0 for value in result.test_accuracy.values())

    import matplotlib.image

    assert (run_dir / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(run_dir / "fitness.png").shape
    assert height > 100 and width > 100

    history = json.loads((run_dir / "history.json").read_text())
    assert [(h["method"], h["generation"]) for h in history] == [
        (m, g) for m in ("genome", "genome+") for g in range(config.generations + 1)]
    # The saved best adapter is a PEFT folder that loads, and is the system named best on validation.
    best = load_lora(build_tiny_model("llama", max_position_embeddings=1024), run_dir / "best_adapter")
    assert result.best_system in result.val_fitness
    assert result.val_fitness[result.best_system] == max(v for v in result.val_fitness.values() if v is not None)
    ensemble = json.loads((run_dir / "ensemble.json").read_text())
    assert len(ensemble["members"]) == ensemble["k"] == result.ensemble_k
    for member in ensemble["members"]:
        assert load_adapter_weights(run_dir / member["adapter_folder"]).keys() == read_adapter(best).keys()
    assert "GENOME+ ensemble" in next(name for name in result.test_accuracy if "ensemble" in name)


def test_resume_after_a_crash_gives_the_same_run_bit_for_bit(tiny_setup, reference_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_setup, run_dir)
    original = run_module.evolve_generation
    calls = {"n": 0}

    def crash_in_third_generation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # GENOME finished, GENOME+ has its scored initial population: crash in its generation 1
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "evolve_generation", crash_in_third_generation)
    with pytest.raises(KeyboardInterrupt):
        run_evolution(config)
    monkeypatch.setattr(run_module, "evolve_generation", original)
    assert not (run_dir / "report.md").exists()
    with pytest.raises(FileExistsError, match="resume"):
        run_evolution(config)
    state = json.loads(next((run_dir / "checkpoints").glob("step-*/run_state.json")).read_text())
    assert state["methods"] == {"genome": state["methods"]["genome"], "genome+": {"status": "running"}}
    assert state["methods"]["genome"]["status"] == "done"
    assert len(list((run_dir / "checkpoints").iterdir())) == 1  # older checkpoints are removed

    run_evolution(config, resume=True)
    assert_same_files(run_files(run_dir), run_files(reference_run))


def test_resume_during_the_lorahub_search_and_the_test_phase(tiny_setup, reference_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_setup, run_dir)
    original_candidate, original_test = run_module.lorahub_candidate, run_module.evaluate_on_test
    calls = {"lorahub": 0, "test": 0}

    def crash_at_second_candidate(*args, **kwargs):
        calls["lorahub"] += 1
        if calls["lorahub"] == 2:
            raise RuntimeError("simulated crash")
        return original_candidate(*args, **kwargs)

    def crash_at_third_system(*args, **kwargs):
        calls["test"] += 1
        if calls["test"] == 3:
            raise RuntimeError("simulated crash")
        return original_test(*args, **kwargs)

    monkeypatch.setattr(run_module, "lorahub_candidate", crash_at_second_candidate)
    monkeypatch.setattr(run_module, "evaluate_on_test", crash_at_third_system)
    with pytest.raises(RuntimeError, match="simulated"):
        run_evolution(config)
    with pytest.raises(RuntimeError, match="simulated"):
        run_evolution(config, resume=True)
    run_evolution(config, resume=True)
    assert_same_files(run_files(run_dir), run_files(reference_run))


def test_same_seed_same_result_and_another_seed_another_run(tiny_setup, reference_run, tmp_path):
    run_evolution(tiny_config(tiny_setup, tmp_path / "same"))
    assert_same_files(run_files(tmp_path / "same"), run_files(reference_run))
    run_evolution(tiny_config(tiny_setup, tmp_path / "other", seed=1, methods=["genome"], lorahub_budget=2))
    other = json.loads((tmp_path / "other" / "history.json").read_text())
    reference = json.loads((reference_run / "history.json").read_text())
    assert other != [h for h in reference if h["method"] == "genome"]


def test_resume_refuses_a_changed_config(tiny_setup, reference_run):
    config = tiny_config(tiny_setup, reference_run, generations=3)
    with pytest.raises(ValueError, match="generations"):
        run_evolution(config, resume=True)


def test_uniform_and_lorahub_baselines_are_the_merges_they_claim(tiny_setup, reference_run):
    result = json.loads((reference_run / "result.json").read_text())
    state = json.loads(next((reference_run / "checkpoints").glob("step-*/run_state.json")).read_text())
    trace = state["lorahub"]["trace"]
    assert trace[0]["weights"] == pytest.approx([1 / 3] * 3)
    assert trace[0]["val_fitness"] == pytest.approx(result["val_fitness"]["uniform merge"])
    assert result["val_fitness"]["LoraHub (simplex search)"] == max(t["val_fitness"] for t in trace)
    for t in trace:
        assert sum(t["weights"]) == pytest.approx(1.0) and min(t["weights"]) >= 0
    # Re-score the uniform merge independently through a fresh evaluator.
    _, base, folders = tiny_setup
    config = tiny_config(tiny_setup, reference_run)
    model = load_lora(load_model(base)[0], folders[0])
    tokenizer = build_tiny_tokenizer()
    experts = [load_adapter_weights(f) for f in folders]
    uniform = merge_adapters(experts, [1 / 3] * 3, "linear")
    evaluator = AdapterEvaluator(model, tokenizer, batch_size=1)
    scores = {}
    for task in config.tasks:
        problems = run_module.generate_problems(4, skills=run_module.task_skills(task), levels=[1], split="validation")
        scores[task] = evaluator.loglik_fitness(uniform, encode_answer_examples(problems, tokenizer, task=task,
                                                                                system_prompt="Be brief."))
    assert sum(scores.values()) / 2 == pytest.approx(result["val_fitness"]["uniform merge"], rel=1e-5)
    # The LoraHub candidates: uniform first, then Dirichlet and local moves, all on the simplex.
    rng = run_module.np.random.default_rng(0)
    assert lorahub_candidate(0, None, 4, rng) == [0.25] * 4


def test_make_experts_trains_each_skill_and_writes_an_evolve_config(tiny_setup, tmp_path):
    _, base, _ = tiny_setup
    config = ExpertsConfig(output_dir=str(tmp_path / "experts"), model=str(base), skills=["add_sub", "rate"],
                           levels=[1], n_train=8, steps=6, batch_size=4, learning_rate=1e-2, lora_rank=2,
                           lora_target_modules=["q_proj", "v_proj"], n_validation=4, n_test=4, progress=False)
    result = make_experts(config)
    tokenizer = build_tiny_tokenizer()
    for skill, folder in result.expert_folders.items():
        problems = run_module.generate_problems(8, skills=skill, levels=[1], split="train")
        examples = encode_answer_examples(problems, tokenizer, task=skill)
        trained = load_lora(load_model(base)[0], folder)
        untrained = load_model(base, lora=LoraAdapterConfig(rank=2, target_modules=["q_proj", "v_proj"]))[0]
        with torch.no_grad():
            assert float(reply_loss(trained, examples, tokenizer.pad_token_id)) < float(
                reply_loss(untrained, examples, tokenizer.pad_token_id)) - 0.05
    a, b = (load_adapter_weights(f) for f in result.expert_folders.values())
    a_keys = [k for k in a if ".lora_A." in k]
    assert not all(torch.equal(a[k], b[k]) for k in a)  # different skills, different experts
    assert all(a[k].abs().sum() > 0 for k in a_keys)
    # evolve.yaml is a valid EvolveConfig over the experts, for a task mixing skills.
    evolve = EvolveConfig(**yaml.safe_load(result.evolve_config_path.read_text()))
    assert evolve.expert_folders == [str(f) for f in result.expert_folders.values()]
    assert evolve.tasks == ["+".join(config.task_skills)] and evolve.n_validation == 4
    # A second call finds the experts saved and trains nothing.
    before = {skill: (folder / "adapter_model.safetensors").stat().st_mtime_ns
              for skill, folder in result.expert_folders.items()}
    make_experts(config)
    assert before == {skill: (folder / "adapter_model.safetensors").stat().st_mtime_ns
                      for skill, folder in result.expert_folders.items()}


def test_cli_builds_the_configs(tiny_setup, tmp_path):
    parser = argparse.ArgumentParser(prog="lmforge")
    add_evolve_cli(parser.add_subparsers(dest="command", required=True))
    config_file = tmp_path / "evolve.yaml"
    config_file.write_text(yaml.safe_dump(dataclasses.asdict(tiny_config(tiny_setup, tmp_path / "run"))))
    args = parser.parse_args(["evolve", "--config", str(config_file), "--generations", "5", "--resume"])
    from lmforge.config import config_from_args

    config = config_from_args(EvolveConfig, args)
    assert args.func is run_module._evolve_command and args.resume is True
    assert config.generations == 5 and config.fitness == "loglik"
    args = parser.parse_args(["evolve", "make-experts", "--steps", "3", "--skills", "add_sub", "rate"])
    assert config_from_args(ExpertsConfig, args).skills == ["add_sub", "rate"]
    assert args.func.__name__ == "_make_experts_command"
    args = parser.parse_args(["evolve", "fitness-correlation", "--config", str(config_file), "--n-individuals", "5"])
    assert args.func.__name__ == "_correlation_command" and args.n_individuals == 5
    with pytest.raises(ValueError, match="skill"):
        EvolveConfig(tasks=["add_sub+juggling"])
    with pytest.raises(ValueError, match="methods"):
        EvolveConfig(methods=["genome++"])


def test_fitness_correlation_over_individuals(tiny_setup, tmp_path):
    config = tiny_config(tiny_setup, tmp_path / "run", max_new_tokens=2)
    result = run_module.measure_fitness_correlation(config, n_individuals=6)
    assert result["n_individuals"] == 6 and len(result["rows"]) == 6
    names = [row["adapter"] for row in result["rows"]]
    assert names[:3] == ["expert expert0", "expert expert1", "expert expert2"]
    assert json.loads((tmp_path / "run" / "fitness_correlation.json").read_text())["rows"] == result["rows"]
    assert all(0 < row["loglik_fitness"] <= 1 and 0 <= row["accuracy"] <= 1 for row in result["rows"])

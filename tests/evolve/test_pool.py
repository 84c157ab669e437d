"""Fitness pools: every backend scores like the in-process evaluator, keeps order, names failing individuals, ends
its workers, and an evolution run through worker processes equals the in-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge.evolve.run as run_module
from lmforge.agent.tasks import generate_problems
from lmforge.evolve.fitness import AdapterEvaluator, encode_answer_examples, lora_parameters, save_adapter
from lmforge.evolve.pool import (
    EvaluatorSpec,
    FitnessPool,
    PoolFitnessCache,
    PoolWorkerError,
    pack_adapter,
    pool_devices,
    unpack_adapter,
)
from lmforge.evolve.population import FitnessCache, Individual, adapter_hash
from lmforge.evolve.run import EvolveConfig, run_evolution
from lmforge.models.loading import load_model
from lmforge.models.lora import LoraAdapterConfig
from tests.models.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TASKS = ("add_sub", "mul_div+rate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama folder, one PEFT folder fixing the adapter structure, 4 random adapters, 2 tasks of examples."""
    root = tmp_path_factory.mktemp("pool")
    base = root / "base"
    build_tiny_model("llama", max_position_embeddings=1024).save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    model, tokenizer = load_model(base, lora=LoraAdapterConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    adapters = []
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        adapters.append({k: torch.randn(p.shape, generator=generator) * 0.3 for k, p in lora_parameters(model).items()})
    folders = [str(save_adapter(model, adapter, root / f"expert{i}")) for i, adapter in enumerate(adapters[:3])]
    tasks = {}
    for task in TASKS:
        problems = generate_problems(3, skills=run_module.task_skills(task), levels=[1], split="validation")
        tasks[task] = encode_answer_examples(problems, tokenizer, task=task, system_prompt="Be brief.")
    # The reference: the in-process evaluator (a fresh model loaded from the same files).
    reference_model, _ = load_model(base, lora=folders[0])
    evaluator = AdapterEvaluator(reference_model, tokenizer, batch_size=2, max_new_tokens=3)
    val_examples = [e for examples in tasks.values() for e in examples]
    reference = {
        "loglik": [{t: evaluator.loglik_fitness(a, ex) for t, ex in tasks.items()} for a in adapters],
        "accuracy": [{t: evaluator.accuracy(a, ex) for t, ex in tasks.items()} for a in adapters],
        "answers": [evaluator.answers(a, val_examples) for a in adapters],
    }
    spec = EvaluatorSpec(adapter_folder=folders[0], model=str(base), batch_size=2, max_new_tokens=3)
    return {"root": root, "base": base, "folders": folders, "adapters": adapters, "tasks": tasks,
            "val_examples": val_examples, "reference": reference, "evaluator": evaluator, "spec": spec}


BACKENDS = ["local", "processes", "ray"]


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request, setup):
    """One pool per backend, shared by the tests below (2 CPU workers, one thread each, except local)."""
    if request.param == "ray":
        pytest.importorskip("ray")
    devices = ["cpu"] if request.param == "local" else ["cpu", "cpu"]
    started = FitnessPool(setup["spec"], backend=request.param, devices=devices, threads_per_worker=1)
    yield started
    started.close()


def process_gone(pid: int) -> bool:
    """True when no live process has this pid (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pids, seconds: float = 20.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if not process_gone(p)]


# ---------------------------------------------------------------------------------------------
# Transport and devices (no workers needed).


def test_packed_adapters_unpack_to_the_same_bits():
    base = torch.randn(6, 5, dtype=torch.float64)
    adapter = {"a.lora_A.weight": base.to(torch.bfloat16), "a.lora_B.weight": base.t().float(),  # not contiguous
               "b.lora_A.weight": base[:1, :3], "c.scalar": torch.tensor(2.5, dtype=torch.float16)}
    unpacked = unpack_adapter(pack_adapter(adapter))
    assert list(unpacked) == list(adapter)
    for key, tensor in adapter.items():
        assert unpacked[key].dtype == tensor.dtype and unpacked[key].shape == tensor.shape
        assert torch.equal(unpacked[key], tensor), key
    assert adapter_hash(unpacked) == adapter_hash(adapter)
    # A read-only buffer (as Ray's object store hands it out) is copied, not written through.
    packed = pack_adapter(adapter)
    packed.buffer.flags.writeable = False
    assert torch.equal(unpack_adapter(packed)["a.lora_A.weight"], adapter["a.lora_A.weight"])
    with pytest.raises(TypeError, match="str keys"):
        pack_adapter({"x": base.numpy()})


def test_devices_and_arguments_are_checked(setup):
    assert pool_devices("cpu", 3) == ["cpu", "cpu", "cpu"] and pool_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError, match="workers"):
        pool_devices("cpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            pool_devices("cuda", 2)
    with pytest.raises(ValueError, match="backend"):
        FitnessPool(setup["spec"], backend="threads")
    with pytest.raises(ValueError, match="one in-process worker"):
        FitnessPool(setup["spec"], backend="local", devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="evaluator= is for backend='local'"):
        FitnessPool(backend="processes", evaluator=setup["evaluator"])
    with pytest.raises(ValueError, match="batch_size"):
        EvaluatorSpec(adapter_folder=setup["folders"][0], batch_size=0)
    with pytest.raises(ValueError, match="pool must be one of"):
        EvolveConfig(pool="threads")
    with pytest.raises(ValueError, match="workers=2 needs pool"):
        EvolveConfig(workers=2)
    # Where fitness runs does not change what is computed, so a run may resume on another pool.
    saved = dataclasses.asdict(EvolveConfig(run_dir="r"))
    run_module._check_resumable(saved, EvolveConfig(run_dir="r", pool="ray", workers=4), Path("r"))
    with pytest.raises(ValueError, match="seed"):
        run_module._check_resumable(saved, EvolveConfig(run_dir="r", pool="ray", seed=1), Path("r"))


# ---------------------------------------------------------------------------------------------
# Every backend against the in-process evaluator.


def test_pool_scores_equal_the_in_process_evaluator(pool, setup):
    reference = setup["reference"]
    # Exact equality: the same code on the same files, one CPU thread everywhere.
    assert pool.fitness(setup["adapters"], setup["tasks"], "loglik") == reference["loglik"]
    assert pool.fitness(setup["adapters"], setup["tasks"], "accuracy") == reference["accuracy"]
    assert pool.answers(setup["adapters"], setup["val_examples"]) == reference["answers"]
    assert len({tuple(scores.values()) for scores in reference["loglik"]}) == 4  # distinct, so order is visible


def test_results_come_back_in_input_order(pool, setup):
    adapters, reference = setup["adapters"], setup["reference"]["loglik"]
    order = [3, 1, 0, 2, 3, 0]  # shuffled, with repeats: more jobs than workers, in any finishing order
    assert pool.fitness([adapters[i] for i in order], setup["tasks"], "loglik") == [reference[i] for i in order]
    assert pool.fitness([], setup["tasks"], "loglik") == []


def test_a_worker_error_names_the_individual_and_the_pool_stays_usable(pool, setup):
    adapters = list(setup["adapters"])
    key = next(k for k in adapters[2] if ".lora_A." in k)
    adapters[2] = {**adapters[2], key: adapters[2][key][:1]}  # rank 1 instead of 2: the worker refuses it
    with pytest.raises(PoolWorkerError, match=r"fitness of individual 2 \(of 4\) failed on worker \d \(cpu\): "
                                              r"ValueError: .*has shape \(1, 64\)") as caught:
        pool.fitness(adapters, setup["tasks"], "loglik")
    assert caught.value.individual == 2 and isinstance(caught.value.__cause__, ValueError)
    assert "copy_into_parameters" in caught.value.remote_traceback  # the worker's own traceback travels back
    with pytest.raises(TypeError, match=r"adapters\[1\]"):
        pool.fitness([adapters[0], "not an adapter"], setup["tasks"], "loglik")
    # The other workers finished their jobs before the error was raised; the next call is answered correctly.
    assert pool.fitness(setup["adapters"][:3], setup["tasks"], "loglik") == setup["reference"]["loglik"][:3]


def test_the_batched_cache_counts_and_scores_like_the_one_at_a_time_cache(pool, setup):
    adapters = setup["adapters"]

    sources = [0, 1, 0, 2, 3, 3]  # the second round: a hash already cached (0) and a repeat inside the batch (3)

    plain = FitnessCache(setup["evaluator"].fitness_fn(setup["tasks"], "loglik"))
    batched = PoolFitnessCache(pool, setup["tasks"], "loglik")
    for cache in (plain, batched):
        individuals = [Individual(uid=i, adapter=adapters[j]) for i, j in enumerate(sources)]
        cache.score(individuals[:2])
        cache.score(individuals)
        assert [ind.val_scores for ind in individuals] == [setup["reference"]["loglik"][j] for j in sources]
    assert batched.state_dict() == plain.state_dict()
    assert (batched.calls, batched.hits) == (4, 2)
    assert batched(Individual(uid=10, adapter=adapters[3])) == setup["reference"]["loglik"][3]  # single, cached


def test_a_dead_worker_names_its_individual_and_the_pool_ends_every_worker(pool, setup):
    # Runs last for each pool (it closes it).
    if pool.backend_name == "local":
        pids = pool.worker_pids
        pool.close()
        assert pool.closed and pids == [os.getpid()]
        with pytest.raises(RuntimeError, match="closed"):
            pool.fitness(setup["adapters"], setup["tasks"], "loglik")
        return
    pids = pool.worker_pids
    assert len(set(pids)) == 2 and os.getpid() not in pids
    os.kill(pids[1], signal.SIGKILL)  # worker 1 is killed; the first job it is handed is individual 1
    wait_until_gone([pids[1]], 10.0)
    with pytest.raises(PoolWorkerError, match="individual 1 .*worker 1 .*died") as caught:
        pool.fitness(setup["adapters"], setup["tasks"], "loglik")
    assert caught.value.individual == 1
    assert pool.closed
    assert wait_until_gone(pids) == []


# ---------------------------------------------------------------------------------------------
# A whole run through worker processes.


def test_an_evolution_run_on_worker_processes_equals_the_in_process_run(setup, tmp_path, monkeypatch):
    def config(run_dir, **changes):
        return EvolveConfig(run_dir=str(run_dir), expert_folders=setup["folders"], model=str(setup["base"]),
                            methods=["genome+"], tasks=list(TASKS), levels=[1], n_validation=3, n_test=3,
                            fitness="loglik", population_size=3, generations=1, n_children=3,
                            individual_mutation_rate=0.5, mutation_sigma=0.05, lorahub_budget=2, ensemble_max_k=2,
                            batch_size=2, max_new_tokens=2, system_prompt="Be brief.", progress=False, **changes)

    opened = []
    original_open = run_module._open_pool
    monkeypatch.setattr(run_module, "_open_pool", lambda *a: opened.append(original_open(*a)) or opened[-1])
    local = run_evolution(config(tmp_path / "local"))
    pooled = run_evolution(config(tmp_path / "processes", pool="processes", workers=2))
    assert [p.backend_name for p in opened] == ["local", "processes"]
    assert pooled.history == local.history
    for name in ("history.json", "result.json", "ensemble.json"):
        pooled_file, local_file = (tmp_path / "processes" / name), (tmp_path / "local" / name)
        assert json.loads(pooled_file.read_text()) == json.loads(local_file.read_text()), name
    left = load_file(str(tmp_path / "local" / "genome_plus" / "final_population" / "population.safetensors"))
    right = load_file(str(tmp_path / "processes" / "genome_plus" / "final_population" / "population.safetensors"))
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    # Evolution really went through the pool's workers, and the run ended them.
    assert sum(h["fitness_calls"] for h in pooled.history) > 3
    assert opened[1].closed and wait_until_gone(opened[1].worker_pids) == []

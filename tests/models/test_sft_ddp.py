"""lmforge.models.sft.run_sft under DDP (2 CPU processes, gloo) equals one process with the same global batch.

The 2-process run is launched the way ``accelerate launch`` / ``torchrun`` launch it: each process gets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (127.0.0.1) and a free MASTER_PORT in its environment and calls
run_sft unchanged; transformers' Trainer (through accelerate) then initialises the gloo process group,
wraps the model in DistributedDataParallel and shards the batches. One process with batch 2 and two
processes with batch 1 each see the same conversations at every step, so the logged losses and gradient
norms of every step, the trained adapter and the final evaluation loss must agree up to float rounding.
The CCE patch computes the loss in both (its token-count normalisation across devices is what DDP
equality tests). Both runs use the tiny random Llama of tests/models/conftest.py (LoRA, 4 steps) on 8
training conversations, a multiple of the global batch: otherwise accelerate's even_batches fills the last
DDP batch with repeated conversations, and that step differs from the single-process one by design.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from lmforge.models.sft import SFTConfig, run_sft
from tests.conftest import free_loopback_port

WORLD = 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def sft_config(model_folder, run_dir, *, batch_size: int) -> SFTConfig:
    return SFTConfig(model=str(model_folder), n_examples=10, skills=["rate", "add_sub"], levels=[1], max_length=160,
                     eval_fraction=0.2, output_dir=str(run_dir), lora_rank=4, learning_rate=3e-3, max_steps=4,
                     batch_size=batch_size, eval_batch_size=1, warmup=0, logging_steps=1, save_steps=4,
                     eval_steps=4, seed=3, precision="fp32")


def ddp_worker(rank, port, model_folder, run_dir, result_path):
    # What `accelerate launch --cpu --num_processes 2` puts in each process's environment (ACCELERATE_USE_CPU
    # included: without it, Trainer on a machine without GPUs leaves each process training alone).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    result = run_sft(sft_config(model_folder, run_dir, batch_size=1))
    result["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    result["backend"] = dist.get_backend_config() if dist.is_initialized() else None
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str, type(None)))}, handle)
    if dist.is_initialized():  # as a launched script must: a live Gloo group can abort the process at exit
        dist.destroy_process_group()


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_sft_steps_equal_one_process_with_the_same_global_batch(tiny_model_folder, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    folder, _ = tiny_model_folder("llama", max_position_embeddings=256)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    mp.spawn(ddp_worker, args=(free_loopback_port(), str(folder), str(ddp_dir), str(tmp_path / "ddp.json")),
             nprocs=WORLD, join=True)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    single = run_sft(sft_config(folder, single_dir, batch_size=WORLD))

    assert ddp["world_size"] == WORLD and "gloo" in ddp["backend"]
    assert ddp["global_step"] == single["global_step"] == 4
    assert ddp["num_train_examples"] == single["num_train_examples"]
    ddp_log, single_log = read_metrics(ddp_dir), read_metrics(single_dir)
    ddp_train = [(e["step"], e["loss"], e["grad_norm"]) for e in ddp_log if "loss" in e]
    single_train = [(e["step"], e["loss"], e["grad_norm"]) for e in single_log if "loss" in e]
    assert [s for s, _, _ in ddp_train] == [s for s, _, _ in single_train] == [1, 2, 3, 4]
    for (_, ddp_loss, ddp_norm), (_, loss, norm) in zip(ddp_train, single_train):
        assert ddp_loss == pytest.approx(loss, rel=1e-5)
        assert ddp_norm == pytest.approx(norm, rel=1e-4)
    # The losses move (the test is not comparing four copies of the initial loss).
    assert len({round(loss, 4) for _, loss, _ in single_train}) == 4
    # Adam's normalised steps turn rounding-level gradient differences into slightly larger weight differences.
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)

    trained = load_file(ddp_dir / "final" / "adapter_model.safetensors")
    reference = load_file(single_dir / "final" / "adapter_model.safetensors")
    assert trained.keys() == reference.keys() and trained
    for name, expected in reference.items():
        torch.testing.assert_close(trained[name], expected, rtol=1e-4, atol=1e-6)

"""Vocabulary-parallel lmforge.cce, DTensor classifiers and FSDP2 lm_heads, on 2 CPU processes (gloo).

One ``torch.multiprocessing.spawn`` per module runs every distributed case (importing torch twice is the
slow part on a busy machine); each rank saves its results, and the tests here compare them with the
single-process call on the whole classifier (lmforge itself, same dtype) and with float64 materialised
logits (torch.nn.functional.cross_entropy). Cases cover float64 and float32, blocks in rank order and in
an explicit order given by vocab_start, uneven blocks, targets in either block, ignored targets (also an
ignore_index that is a real token id), bias, softcap, shift, label smoothing, z-loss, every reduction,
return_lse, token_logprobs with entropy and the Triton backend (CPU interpreter); errors that must be
raised on every rank instead of hanging; DTensor classifiers split by rows (vocabulary-parallel) and by
columns (gathered); a tiny Llama under FSDP2 ``fully_shard`` with the CCE patch, its lm_head in the root
unit or a unit of its own, and one whose lm_head is column-parallel (a tensor-parallel plan), against the
stock single-process model.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.cce import linear_cross_entropy, token_logprobs
from tests.conftest import free_loopback_port

WORLD = 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

# Inputs and options of the vocabulary-parallel cases. blocks[r] = (first global row, rows) of rank r;
# pass_start says whether ranks pass vocab_start (else blocks must be in rank order).
LOSS_CASES = {
    "float64_even_blocks_ignored_targets": dict(
        dtype=torch.float64, n=37, v=101, blocks=((0, 51), (51, 50)), pass_start=False, ignore_frac=0.3,
        options=dict(reduction="mean")),
    "float64_every_option_blocks_out_of_rank_order": dict(
        dtype=torch.float64, n=37, v=101, blocks=((70, 31), (0, 70)), pass_start=True, ignore_frac=0.2,
        bias=True, scale=3.0, options=dict(reduction="sum", softcap=4.0, label_smoothing=0.1, z_loss=1e-3)),
    "float32_uneven_blocks_shift_none_return_lse": dict(
        dtype=torch.float32, shape=(3, 13), v=97, blocks=((0, 20), (20, 77)), pass_start=False, ignore_frac=0.2,
        options=dict(reduction="none", shift=True, return_lse=True, label_smoothing=0.05)),
    "float32_ignore_index_is_a_token_id": dict(
        dtype=torch.float32, n=29, v=64, blocks=((0, 40), (40, 24)), pass_start=True, ignore_index=5,
        bias=True, options=dict(reduction="mean", z_loss=1e-2)),
    # bf16: the ranks' partial dE are summed in float32 and rounded once, like the single process's dE.
    "bfloat16_partial_de_rounded_once": dict(
        dtype=torch.bfloat16, n=48, v=96, blocks=((0, 48), (48, 48)), pass_start=False, ignore_frac=0.1,
        scale=2.0, options=dict(reduction="sum")),
}
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The ranks hold CPU tensors (gloo), which the Triton kernels take only under the interpreter (CPU-only
    # machines, see tests/conftest.py); on a GPU machine impl="triton" would refuse them.
    LOSS_CASES["triton_interpreter_float32"] = dict(
        dtype=torch.float32, n=21, v=45, blocks=((0, 23), (23, 22)), pass_start=False, ignore_frac=0.2,
        bias=True, options=dict(reduction="mean", softcap=5.0, impl="triton", filter_eps=None))
LOGPROB_CASES = {
    "logprobs_entropy_float64": dict(
        dtype=torch.float64, n=33, v=90, blocks=((0, 45), (45, 45)), pass_start=False, ignore_frac=0.25,
        bias=True, scale=2.0, options=dict(softcap=6.0)),
}
D = 24
# Relative error vs the single-process lmforge call (same dtype) and vs float64 materialised logits.
SAME_CALL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-4}
FLOAT64_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 8e-3}


def make_inputs(spec):
    """Full-vocabulary inputs of a case (the same in every process): e, c, targets, bias (or None)."""
    g = torch.Generator().manual_seed(sum(map(ord, repr(sorted(spec.items(), key=str)))) % 10_000)
    shape = spec.get("shape", (spec.get("n"),))
    n = int(torch.tensor(shape).prod())
    v = spec["v"]
    e = torch.randn(n, D, generator=g) * spec.get("scale", 1.0)
    c = torch.randn(v, D, generator=g) / D ** 0.5 * 2
    t = torch.randint(0, v, (n,), generator=g)
    ignore_index = spec.get("ignore_index", -100)
    if "ignore_frac" in spec:
        t[torch.rand(n, generator=g) < spec["ignore_frac"]] = ignore_index
    if ignore_index >= 0:
        t[::4] = ignore_index
    b = torch.randn(v, generator=g) * 0.5 if spec.get("bias") else None
    dtype = spec["dtype"]
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(e.view(*shape, D)), cast(c), t.view(shape), cast(b)


def cotangent(shape, seed=7):
    """A fixed random upstream gradient, so per-token outputs ('none', log-probs) are checked everywhere."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call_options(spec, rank=None):
    options = dict(spec["options"])
    options.setdefault("impl", "torch")
    options["ignore_index"] = spec.get("ignore_index", -100)
    if rank is not None:
        options["process_group"] = dist.group.WORLD
        if spec["pass_start"]:
            options["vocab_start"] = spec["blocks"][rank][0]
    return options


def run_loss_case(spec, rank=None):
    """Loss, lse, dE, dC, db of one case: on this rank's block (rank given) or on the whole classifier."""
    e, c, t, b = make_inputs(spec)
    if rank is not None:
        start, rows = spec["blocks"][rank]
        c = c[start:start + rows]
        b = None if b is None else b[start:start + rows]
    e, c = e.clone().requires_grad_(), c.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = linear_cross_entropy(e, c, t, bias=b, **call_options(spec, rank))
    loss, lse = out if spec["options"].get("return_lse") else (out, None)
    (loss.double() * cotangent(loss.shape)).sum().backward()
    return dict(loss=loss.detach(), lse=None if lse is None else lse.detach(), de=e.grad, dc=c.grad,
                db=None if b is None else b.grad)


def run_logprob_case(spec, rank=None):
    e, c, t, b = make_inputs(spec)
    if rank is not None:
        start, rows = spec["blocks"][rank]
        c, b = c[start:start + rows], b[start:start + rows]
    e, c, b = (x.clone().requires_grad_() for x in (e, c, b))
    logp, entropy = token_logprobs(e, c, t, bias=b, return_entropy=True, **call_options(spec, rank))
    ((logp.double() * cotangent(logp.shape)).sum() + (entropy.double() * cotangent(logp.shape, 8)).sum()).backward()
    return dict(logp=logp.detach(), entropy=entropy.detach(), de=e.grad, dc=c.grad, db=b.grad)


def float64_reference(spec):
    """Loss (or log-probabilities and entropies) and gradients with materialised float64 logits."""
    e, c, t, b = make_inputs(spec)
    e, c = e.double().requires_grad_(), c.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    options = spec["options"]
    ignore_index = spec.get("ignore_index", -100)
    ee, tt = (e[..., :-1, :], t[..., 1:]) if options.get("shift") else (e, t)
    logits = ee @ c.T + (0 if b is None else b)
    if options.get("softcap"):
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    flat, ft = logits.reshape(-1, logits.shape[-1]), tt.reshape(-1)
    valid = ft != ignore_index
    lse = torch.logsumexp(flat, dim=-1)
    if spec in LOGPROB_CASES.values():
        logp_all = torch.log_softmax(flat, dim=-1)
        logp = torch.where(valid, logp_all.gather(1, ft.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
        entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        logp, entropy = logp.view(tt.shape), entropy.view(tt.shape)
        ((logp * cotangent(logp.shape)).sum() + (entropy * cotangent(logp.shape, 8)).sum()).backward()
        return dict(logp=logp, entropy=entropy, de=e.grad, dc=c.grad, db=b.grad)
    per_token = F.cross_entropy(flat, ft, ignore_index=ignore_index, reduction="none",
                                label_smoothing=options.get("label_smoothing", 0.0))
    per_token = per_token + torch.where(valid, options.get("z_loss", 0.0) * lse ** 2, 0.0)
    reduction = options["reduction"]
    loss = {"none": per_token.view(tt.shape), "sum": per_token.sum(),
            "mean": per_token.sum() / valid.sum()}[reduction]
    (loss * cotangent(loss.shape)).sum().backward()
    return dict(loss=loss, lse=lse.view(tt.shape), de=e.grad, dc=c.grad, db=None if b is None else b.grad)


# --------------------------------------------------------------------------------------------------
# What the two ranks run


def error_cases(rank):
    """Misuses that every rank must reject (with the same kind of error), none of them hanging."""
    spec = LOSS_CASES["float64_even_blocks_ignored_targets"]
    e, c, t, _ = make_inputs(spec)
    start, rows = spec["blocks"][rank]
    block = c[start:start + rows]
    group = dist.group.WORLD
    attempts = {
        "inputs_differ_between_ranks": lambda: linear_cross_entropy(e + rank, block, t, process_group=group),
        "blocks_overlap": lambda: linear_cross_entropy(e, block, t, process_group=group, vocab_start=0),
        "vocab_start_on_one_rank_only": lambda: linear_cross_entropy(
            e, block, t, process_group=group, vocab_start=0 if rank == 0 else None),
        "target_outside_the_vocabulary": lambda: linear_cross_entropy(
            e, block, torch.where(t == t[0], 101, t), process_group=group),
        "one_rank_rejects_its_classifier": lambda: linear_cross_entropy(
            e, block.float() if rank == 1 else block, t, process_group=group),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except (TypeError, ValueError) as err:
            messages[name] = f"{type(err).__name__}: {err}"
    return messages


def dtensor_cases(rank):
    """A DTensor classifier (and bias) split by rows (vocabulary-parallel) and by columns (gathered)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    spec = LOSS_CASES["float64_every_option_blocks_out_of_rank_order"]
    results = {}
    for name, placement in (("rows", Shard(0)), ("columns", Shard(1))):
        e, c, t, b = make_inputs(spec)
        e = e.requires_grad_()
        c_dt = distribute_tensor(c, mesh, [placement]).requires_grad_()
        b_dt = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        options = {k: v for k, v in spec["options"].items()}
        loss = linear_cross_entropy(e, c_dt, t, bias=b_dt, impl="torch", **options)
        (loss.double() * cotangent(loss.shape)).sum().backward()
        results[name] = dict(loss=loss.detach(), de=e.grad, dc=c_dt.grad.full_tensor(), db=b_dt.grad.full_tensor(),
                             dc_placements=repr(c_dt.grad.placements), local_rows=c_dt.to_local().shape[0])
    return results


def fsdp_batch():
    """Two sequences, every label scored (so both ranks score as many tokens and FSDP's mean of the
    per-rank means is the single-process mean)."""
    from tests.models.conftest import TINY_VOCAB_SIZE

    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (WORLD, 12), generator=torch.Generator().manual_seed(3))
    return input_ids, input_ids.clone()


def fsdp_model():
    from tests.models.conftest import build_tiny_model

    model = build_tiny_model("llama", torch.float32, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked predictions, so the loss is not ~log V for any weights
    return model.train()


def fsdp_cases(rank):
    """A tiny Llama under FSDP2 with the CCE patch; rank r trains on sequence r. Two forward/backward
    passes (gradients accumulate), then the full gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for layout in ("head_in_root_unit", "head_as_own_unit"):
        try:
            results[layout] = fsdp_layout(layout, rank, mesh)
        except Exception:
            results[layout] = {"traceback": traceback.format_exc()}
    return results


def fsdp_layout(layout, rank, mesh):
    """One FSDP2 layout: fully_shard each decoder layer, the lm_head too for "head_as_own_unit", then the
    model; rank r's loss is that of sequence r."""
    from torch.distributed.fsdp import fully_shard

    from lmforge.cce.patch import patch

    input_ids, labels = fsdp_batch()
    model = fsdp_model()
    patch(model, impl="torch")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head_as_own_unit":
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = []
    for _ in range(2):
        output = model(input_ids=input_ids[rank:rank + 1], labels=labels[rank:rank + 1])
        output.loss.backward()
        losses.append(output.loss.detach())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    head_after_backward = type(model.lm_head.weight).__name__
    with torch.no_grad():
        eval_loss = model(input_ids=input_ids[rank:rank + 1], labels=labels[rank:rank + 1]).loss
    return dict(losses=losses, grads=grads, eval_loss=eval_loss, head_after_backward=head_after_backward,
                head_after_no_grad=type(model.lm_head.weight).__name__)


def tensor_parallel_case(rank):
    """A tiny Llama whose lm_head is column-parallel (torch.distributed.tensor.parallel, as transformers'
    tensor-parallel plans shard it): its weight is a Shard(0) DTensor and every rank sees the same batch,
    so the patch's loss runs vocabulary-parallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from lmforge.cce.patch import patch

    mesh = init_device_mesh("cpu", (WORLD,))
    model = fsdp_model()
    parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
    patch(model, impl="torch")
    input_ids, labels = fsdp_batch()
    labels[0, :5] = -100
    output = model(input_ids=input_ids, labels=labels)
    output.loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters()}
    return dict(loss=output.loss.detach(), grads=grads, head_weight=repr(model.lm_head.weight.placements),
                local_rows=model.lm_head.weight.to_local().shape[0])


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    groups = [
        ("loss", lambda: {name: run_loss_case(spec, rank) for name, spec in LOSS_CASES.items()}),
        ("logprobs", lambda: {name: run_logprob_case(spec, rank) for name, spec in LOGPROB_CASES.items()}),
        ("errors", lambda: error_cases(rank)),
        ("dtensor", lambda: dtensor_cases(rank)),
        ("fsdp", lambda: fsdp_cases(rank)),
        ("tensor_parallel", lambda: tensor_parallel_case(rank)),
    ]
    for name, run in groups:
        try:
            results[name] = run()
        except Exception:  # keep the other groups' results; the test of this group shows the traceback
            results[name] = {"traceback": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results, from one 2-process spawn."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(worker, args=(free_loopback_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def group_results(ranks, group):
    for rank in ranks:
        assert "traceback" not in rank[group], rank[group].get("traceback")
    return [rank[group] for rank in ranks]


def rel_err(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_vocab_parallel_loss_and_gradients_equal_single_process(ranks, case):
    spec = LOSS_CASES[case]
    per_rank = [results[case] for results in group_results(ranks, "loss")]
    single = run_loss_case(spec)
    exact = float64_reference(spec)
    dtype = spec["dtype"]
    _, _, t, _ = make_inputs(spec)
    # The targets fall in both blocks, so both ranks' target logits matter.
    ignore_index = spec.get("ignore_index", -100)
    for start, rows in spec["blocks"]:
        assert bool(((t >= start) & (t < start + rows) & (t != ignore_index)).any())
    for key in ("loss", "lse", "de", "dc", "db"):  # the single-process call itself is right
        if single[key] is not None:
            assert rel_err(single[key], exact[key]) < FLOAT64_TOL[dtype], key
    for rank, got in enumerate(per_rank):
        start, rows = spec["blocks"][rank]
        # Loss and dE are the single-process ones on every rank; dC / db are this rank's rows of them.
        for key in ("loss", "lse", "de"):
            if single[key] is not None:
                assert rel_err(got[key], single[key]) < SAME_CALL_TOL[dtype], (rank, key)
                assert rel_err(got[key], exact[key]) < FLOAT64_TOL[dtype], (rank, key)
        for key in ("dc", "db"):
            if single[key] is not None:
                assert got[key].shape[0] == rows
                assert rel_err(got[key], single[key][start:start + rows]) < SAME_CALL_TOL[dtype], (rank, key)
                assert rel_err(got[key], exact[key][start:start + rows]) < FLOAT64_TOL[dtype], (rank, key)


def test_vocab_parallel_token_logprobs_and_entropy(ranks):
    for case, spec in LOGPROB_CASES.items():
        per_rank = [results[case] for results in group_results(ranks, "logprobs")]
        single = run_logprob_case(spec)
        exact = float64_reference(spec)
        for rank, got in enumerate(per_rank):
            start, rows = spec["blocks"][rank]
            for key in ("logp", "entropy", "de"):
                assert rel_err(got[key], single[key]) < 1e-12 and rel_err(got[key], exact[key]) < 1e-12
            for key in ("dc", "db"):
                assert rel_err(got[key], exact[key][start:start + rows]) < 1e-12


def test_misuse_is_rejected_on_every_rank(ranks):
    per_rank = group_results(ranks, "errors")
    expected = {
        "inputs_differ_between_ranks": ["same e and targets on every rank"] * 2,
        "blocks_overlap": ["do not tile [0, V)"] * 2,
        "vocab_start_on_one_rank_only": ["on every rank of the process group or on none"] * 2,
        "target_outside_the_vocabulary": ["targets must lie in [0, 101)"] * 2,
        # The rank with the bad input says why; the other one says which rank rejected its inputs.
        "one_rank_rejects_its_classifier": ["rank(s) [1] of the process group rejected", "same dtype"],
    }
    for name, fragments in expected.items():
        for rank, fragment in enumerate(fragments):
            assert fragment in per_rank[rank][name], (name, rank, per_rank[rank][name])


def test_vocab_start_without_process_group_and_dtensor_with_process_group_are_rejected():
    e, c, t, _ = make_inputs(LOSS_CASES["float64_even_blocks_ignored_targets"])
    with pytest.raises(ValueError, match="needs process_group"):
        linear_cross_entropy(e, c, t, vocab_start=3)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        linear_cross_entropy(e, c, t, process_group=object(), vocab_start=-1)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_dtensor_classifier_equals_single_process(ranks, layout):
    spec = LOSS_CASES["float64_every_option_blocks_out_of_rank_order"]
    single = run_loss_case(spec)
    exact = float64_reference(spec)
    for rank, results in enumerate(group_results(ranks, "dtensor")):
        got = results[layout]
        for key in ("loss", "de", "dc", "db"):
            assert rel_err(got[key], single[key]) < 1e-12 and rel_err(got[key], exact[key]) < 1e-12, (rank, key)
        # Rows: each rank holds torch.chunk's block (51 / 50 rows), and the gradient stays split like c.
        assert got["dc_placements"] == ("(Shard(dim=0),)" if layout == "rows" else "(Shard(dim=1),)")
        assert got["local_rows"] == ((51, 50)[rank] if layout == "rows" else 101)


@pytest.mark.parametrize("layout", ["head_in_root_unit", "head_as_own_unit"])
def test_fsdp2_patched_loss_and_gradients_equal_single_process(ranks, layout):
    model = fsdp_model()
    input_ids, labels = fsdp_batch()
    # Stock transformers loss, one process, both sequences in one batch.
    output = model(input_ids=input_ids, labels=labels)
    output.loss.backward()
    with torch.no_grad():
        per_sequence = [model(input_ids=input_ids[r:r + 1], labels=labels[r:r + 1]).loss for r in range(WORLD)]
    reference = {name: p.grad for name, p in model.named_parameters()}
    for rank, results in enumerate(group_results(ranks, "fsdp")):
        got = results[layout]
        assert "traceback" not in got, got.get("traceback")
        for loss in got["losses"]:
            assert rel_err(loss, per_sequence[rank]) < 1e-6
        assert rel_err(got["eval_loss"], per_sequence[rank]) < 1e-6
        assert got["grads"].keys() == reference.keys()
        for name, expected in reference.items():
            # Two accumulated passes: twice the single-process gradient of the batch mean.
            assert rel_err(got["grads"][name], 2 * expected) < 1e-5, (rank, name)
        # FSDP re-sharded the lm_head after the backward; the patch re-shards its own unit after a no_grad
        # forward (the root unit keeps its parameters gathered after the forward, by FSDP's default).
        assert got["head_after_backward"] == "DTensor"
        if layout == "head_as_own_unit":
            assert got["head_after_no_grad"] == "DTensor"


def test_patched_model_with_a_column_parallel_lm_head_equals_single_process(ranks):
    model = fsdp_model()
    input_ids, labels = fsdp_batch()
    labels[0, :5] = -100
    output = model(input_ids=input_ids, labels=labels)  # stock loss, one process
    output.loss.backward()
    for rank, got in enumerate(group_results(ranks, "tensor_parallel")):
        assert got["head_weight"] == "(Shard(dim=0),)" and got["local_rows"] == (130, 129)[rank]
        assert rel_err(got["loss"], output.loss) < 1e-6
        for name, p in model.named_parameters():
            # Every rank's body gets the full gradient: dE was all-reduced over the vocabulary blocks.
            assert rel_err(got["grads"][name], p.grad) < 1e-5, (rank, name)

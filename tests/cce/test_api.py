"""lmforge.cce against a float64 reference with materialised logits (torch.nn.functional.cross_entropy).

Both backends run here: "torch" (chunked) and "triton" (real kernels on CUDA, the interpreter on CPU).
Shapes are deliberately not multiples of any block size.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmforge.cce import LinearCrossEntropy, auto_filter_eps, linear_cross_entropy, token_logprobs
from lmforge.cce import chunked, gemm_impl, triton_impl
from tests.conftest import DEVICE

IMPLS = ["torch", "triton", "gemm"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative-error budgets vs float64 on the same (rounded) inputs: the gradients come back in the input
# dtype, so their rounding alone is ~2^-9 for bfloat16 and ~2^-12 for float16.
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3, torch.float64: 1e-10}

N, D, V = 37, 40, 101


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    denom = ref.norm()
    return ((got - ref).norm() / (denom if denom > 0 else 1)).item()


def make_inputs(dtype, n=N, d=D, v=V, seed=0, scale=1.0, with_bias=False, ignore_frac=0.0, shape=None):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g) * scale
    c = torch.randn(v, d, generator=g) / d ** 0.5 * 2
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g) * 0.5 if with_bias else None
    if shape is not None:
        e, t = e.view(*shape, d), t.view(*shape)
    to = lambda x: None if x is None else x.to(DEVICE, dtype).requires_grad_()
    return to(e), to(c), t.to(DEVICE), to(b)


def reference(e, c, t, b=None, *, softcap=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              ignore_index=-100, shift=False):
    """float64 loss with materialised logits; returns (loss, lse) computed by torch."""
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    if shift:
        ee, tt = e64[..., :-1, :], t[..., 1:]
    else:
        ee, tt = e64, t
    logits = ee @ c64.T
    if b64 is not None:
        logits = logits + b64
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = logits.reshape(-1, logits.shape[-1])
    ft = tt.reshape(-1)
    per_tok = F.cross_entropy(flat, ft, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    lse = torch.logsumexp(flat, dim=-1)
    valid = ft != ignore_index
    if z_loss:
        per_tok = per_tok + torch.where(valid, z_loss * lse ** 2, torch.zeros_like(lse))
    if reduction == "none":
        loss = per_tok.view(tt.shape)
    elif reduction == "sum":
        loss = per_tok.sum()
    else:
        loss = per_tok.sum() / valid.sum().clamp(min=1)
    return loss, lse.view(tt.shape), (e64, c64, b64)


def backward_both(out, ref, seed=1):
    """Backpropagate the same random cotangent through both (so 'none' reductions are covered)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()


CASES = {
    "plain": dict(),
    "ignore": dict(ignore_frac=0.3),
    "bias": dict(with_bias=True),
    "softcap": dict(softcap=3.0, scale=3.0),
    "label_smoothing": dict(label_smoothing=0.1, ignore_frac=0.2),
    "z_loss": dict(z_loss=1e-2),
    "everything": dict(with_bias=True, softcap=5.0, label_smoothing=0.05, z_loss=1e-3, ignore_frac=0.2),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_match_float64(impl, dtype, case, reduction):
    if dtype == torch.float16 and case in ("softcap", "everything") and reduction != "mean":
        pytest.skip("covered by the mean reduction; keeps the interpreter run short")
    opts = dict(CASES[case])
    input_opts = {k: opts.pop(k) for k in ("with_bias", "ignore_frac", "scale") if k in opts}
    e, c, t, b = make_inputs(dtype, **input_opts)
    out = linear_cross_entropy(e, c, t, bias=b, reduction=reduction, impl=impl, filter_eps=None, **opts)
    ref, _, (e64, c64, b64) = reference(e, c, t, b, reduction=reduction, **opts)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    assert rel_err(out, ref) < LOSS_TOL[dtype]
    backward_both(out, ref)
    assert rel_err(e.grad, e64.grad) < GRAD_TOL[dtype]
    assert rel_err(c.grad, c64.grad) < GRAD_TOL[dtype]
    if b is not None:
        assert rel_err(b.grad, b64.grad) < GRAD_TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_and_return_lse_on_batched_input(impl):
    e, c, t, _ = make_inputs(torch.float32, n=2 * 19, shape=(2, 19))
    t[0, 5] = -100
    loss, lse = linear_cross_entropy(e, c, t, shift=True, reduction="none", return_lse=True,
                                     impl=impl, filter_eps=None)
    ref, ref_lse, (e64, c64, _) = reference(e, c, t, shift=True, reduction="none")
    assert loss.shape == (2, 18) and lse.shape == (2, 18)
    assert rel_err(loss, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-6
    backward_both(loss, ref)
    assert rel_err(e.grad, e64.grad) < 2e-5
    assert rel_err(c.grad, c64.grad) < 2e-5
    # The last position predicts nothing: its hidden state gets no gradient.
    assert torch.count_nonzero(e.grad[:, -1]) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_and_entropy(impl, dtype):
    e, c, t, b = make_inputs(dtype, with_bias=True, ignore_frac=0.25, shape=(1, N))
    logp, ent = token_logprobs(e, c, t, bias=b, softcap=4.0, return_entropy=True, impl=impl, filter_eps=None)
    e64, c64, b64 = (x.detach().double().requires_grad_() for x in (e, c, b))
    logits = 4.0 * torch.tanh((e64 @ c64.T + b64) / 4.0)
    log_sm = torch.log_softmax(logits, dim=-1)
    valid = t != -100
    ref_logp = torch.where(valid, log_sm.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ref_ent = torch.where(valid, -(log_sm.exp() * log_sm).sum(-1), 0.0)
    assert rel_err(logp, ref_logp) < LOSS_TOL[dtype] * 3
    assert rel_err(ent, ref_ent) < LOSS_TOL[dtype] * 3
    assert (logp[~valid] == 0).all() and (ent[~valid] == 0).all()
    g = torch.Generator().manual_seed(3)
    w1, w2 = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    ((logp.double() * w1).sum() + (ent.double() * w2).sum()).backward()
    ((ref_logp * w1).sum() + (ref_ent * w2).sum()).backward()
    for got, ref in ((e.grad, e64.grad), (c.grad, c64.grad), (b.grad, b64.grad)):
        assert rel_err(got, ref) < GRAD_TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, reduction):
    e, c, t, _ = make_inputs(torch.float32)
    t = torch.full_like(t, -100)
    out = linear_cross_entropy(e, c, t, reduction=reduction, impl=impl)
    assert torch.count_nonzero(out) == 0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.count_nonzero(e.grad) == 0 and torch.count_nonzero(c.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    e, c, t, _ = make_inputs(torch.float32, d=2 * D)
    e_nc = e.detach()[:, ::2].requires_grad_()  # stride 2 along D
    c_nc = c.detach().T.contiguous().T[:, ::2].requires_grad_()  # column-major, then strided
    assert not e_nc.is_contiguous() and not c_nc.is_contiguous()
    out = linear_cross_entropy(e_nc, c_nc, t, impl=impl, filter_eps=None)
    ref, _, (e64, c64, _) = reference(e_nc, c_nc, t)
    assert rel_err(out, ref) < 1e-5
    backward_both(out, ref)
    assert rel_err(e_nc.grad, e64.grad) < 2e-5 and rel_err(c_nc.grad, c64.grad) < 2e-5


def test_float64_torch_path_is_exact():
    e, c, t, b = make_inputs(torch.float64, with_bias=True, ignore_frac=0.2)
    out = linear_cross_entropy(e, c, t, bias=b, softcap=2.0, impl="torch")
    ref, _, (e64, c64, b64) = reference(e, c, t, b, softcap=2.0)
    assert rel_err(out, ref) < 1e-12
    backward_both(out, ref)
    assert rel_err(e.grad, e64.grad) < 1e-10 and rel_err(c.grad, c64.grad) < 1e-10


def test_chunking_does_not_change_results():
    e, c, t, _ = make_inputs(torch.float32, ignore_frac=0.2)
    one = chunked.forward_stats(e.detach(), c.detach(), None, t, need_sum=True, need_mu=True)
    many = chunked.forward_stats(e.detach(), c.detach(), None, t, need_sum=True, need_mu=True,
                                 chunk_elements=3 * V)  # 3 rows per chunk, 13 chunks
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)  # fp32 matmul blocking differs by chunk
    g = torch.randn(N, dtype=torch.float32).to(DEVICE)
    grads_one = chunked.backward(e.detach(), c.detach(), None, t, one[0], one[3], g, -g, None, None)
    grads_many = chunked.backward(e.detach(), c.detach(), None, t, one[0], one[3], g, -g, None, None,
                                  chunk_elements=3 * V)
    for a, b in zip(grads_one[:2], grads_many[:2]):
        # fp32 sums in another blocking: entries that cancel may differ by a few ulps of the largest terms
        # (once 2.5e-6 at an entry of 0.13 where the gradient's largest entry was ~7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=4e-6 * b.abs().max().item())


def assert_close_up_to_sum_order(a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b are the same statistics or gradients computed with fp32 sums in another order (slab widths, a
    permuted vocabulary). fp32 results: 2e-5. A bf16 output (dE, dC) is the rounding of such a sum: a value
    within a few fp32 ulps of a bf16 rounding boundary may land one bf16 ulp (< 2^-7 of the value) away; and
    dz is itself rounded to bf16 from an lse that differs by fp32 ulps, so an entry whose terms cancel may move
    by a few ulps of its terms (seen: 2 bf16 ulps, 4.9e-4, at an entry of 0.035 where the largest is ~7).
    Allowed there: 2^-7 of the value plus 2^-12 of the largest entry. More than that is a bug."""
    bf16 = a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=2**-7 if bf16 else 2e-5,
                               atol=2**-12 * b.abs().max().item() if bf16 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_slabs_do_not_change_results(monkeypatch, dtype):
    # Slabs of 32 and 48 columns (a ragged last one) against one slab of the whole vocabulary; the
    # fp32 logits are the same products either way, so only the order of the online lse differs.
    e, c, t, b = make_inputs(dtype, ignore_frac=0.2, with_bias=True)
    e, c, b = e.detach(), c.detach(), b.detach()
    g = torch.randn(N, dtype=torch.float32).to(DEVICE)
    results = []
    for cols in (V, 32, 48):
        monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cols * N * 4 / 2**20))
        assert gemm_impl.slab_columns(N, V) == cols
        stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, need_sum=True, need_mu=True)
        grads = gemm_impl.backward(e, c, b, t, stats[0], stats[3], g, -g, 0.5 * g, g, softcap=3.0,
                                   need_db=True)
        results.append((*stats, *grads))
    for other in results[1:]:
        for a, b2 in zip(results[0], other):
            assert_close_up_to_sum_order(a, b2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized shapes: too slow for the interpreter")
def test_gemm_matches_chunked_torch_at_gpu_scale():
    # Many programs, many warps, several slabs: the in-place dz write must not race with the reads of Z.
    n, d, v = 2048, 256, 50000
    g = torch.Generator().manual_seed(0)
    c = torch.randn(v, d, generator=g) / d ** 0.5
    t = torch.randint(0, v // 50, (n,), generator=g)
    e = 3 * c[t] * d ** 0.5 / 4 + torch.randn(n, d, generator=g)  # peaked rows with varied lse, like an LM
    results = {}
    for impl in ("torch", "gemm"):
        ee = e.to("cuda", torch.bfloat16).requires_grad_()
        cc = c.to("cuda", torch.bfloat16).requires_grad_()
        loss = linear_cross_entropy(ee, cc, t.cuda(), impl=impl, softcap=30.0, filter_eps=None)
        loss.backward()
        results[impl] = (loss.detach(), ee.grad, cc.grad)
    for a, b in zip(results["torch"], results["gemm"]):
        assert rel_err(b, a) < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("impl", ["triton", "gemm"])
def test_kernels_run_on_the_inputs_gpu_not_the_current_one(impl):
    # Inputs on cuda:1 while cuda:0 is current (a pool worker, a second model): Triton launches on the
    # current device, so without a device guard the kernels read cuda:1's memory from cuda:0.
    n, d, v = 512, 128, 4000
    g = torch.Generator().manual_seed(1)
    e, c = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d ** 0.5
    t = torch.randint(0, v, (n,), generator=g)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        ee = e.to(device, torch.bfloat16).requires_grad_()
        cc = c.to(device, torch.bfloat16).requires_grad_()
        loss = linear_cross_entropy(ee, cc, t.to(device), impl=impl)
        loss.backward()
        results[device] = [x.detach().cpu().float() for x in (loss, ee.grad, cc.grad)]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def peaked_inputs(dtype, seed=0, v=V):
    """Hidden states aligned with their target's classifier row: a sharp softmax, like a trained LM."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(v, D, generator=g)
    t = torch.randint(0, max(8, v // 8), (N,), generator=g)  # targets in the head: target-free tiles exist
    e = 0.1 * c[t] + 0.3 * torch.randn(N, D, generator=g)  # mean NLL ~1.3 nats, like a trained LM
    return e.to(DEVICE, dtype).requires_grad_(), c.to(DEVICE, dtype).requires_grad_(), t.to(DEVICE)


def test_gradient_filter_skips_tiles_and_stays_accurate():
    # Wide enough that tiles without targets exist at the GPU's tile sizes too (256 columns).
    e, c, t = peaked_inputs(torch.bfloat16, v=1500 if DEVICE == "cuda" else V)
    ref, _, (e64, c64, _) = reference(e, c, t)
    ref.backward()

    def grads(filter_eps):
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, impl="triton", filter_eps=filter_eps).backward()
        return e.grad.clone(), c.grad.clone()

    exact = grads(None)
    auto = grads("auto")
    # The smallest positive float skips only all-zero tiles but still sorts the vocabulary: sorting alone
    # must not change the result beyond summation order (bf16 rounding flips, ~1e-4 relative).
    sorted_only = grads(1e-45)
    coarse = grads(100.0)  # a bound above any mass: every tile without a target is skipped
    assert auto_filter_eps(torch.bfloat16) == 2 ** -12 and auto_filter_eps(torch.bfloat16, "fast") == 2 ** -10
    assert auto_filter_eps(torch.float16) == 2 ** -15 and auto_filter_eps(torch.float32, "fast") is None
    for got, want in zip(sorted_only, exact):
        assert rel_err(got, want) < 1e-3
    assert rel_err(auto[0], e64.grad) < GRAD_TOL[torch.bfloat16]
    assert rel_err(auto[1], c64.grad) < GRAD_TOL[torch.bfloat16]
    # Skipping really happens: a coarse threshold drops visible mass, so the result moves.
    assert rel_err(coarse[1], exact[1]) > 1e-3  # far beyond the ~1e-4 of summation order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_sorted_vocabulary_does_not_change_results(monkeypatch, dtype):
    # Slabs over a permuted vocabulary (what filtering uses): the same statistics and gradients, dC and db
    # scattered back to the tokens' own rows. g_sum and g_mu are given, so nothing is filtered.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    e, c, t, b = make_inputs(dtype, ignore_frac=0.2, with_bias=True)
    e, c, b = e.detach(), c.detach(), b.detach()
    g = torch.randn(N, dtype=torch.float32).to(DEVICE)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32)
    results = []
    for order in (None, perm):
        table = torch.empty((gemm_impl.n_slabs(N, V), N), dtype=torch.float32, device=DEVICE)
        stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, need_sum=True, need_mu=True, perm=order,
                                        slab_lse=table)
        torch.testing.assert_close(torch.logsumexp(table, 0), stats[0], rtol=1e-5, atol=1e-5)
        grads = gemm_impl.backward(e, c, b, t, stats[0], stats[3], g, -g, 0.5 * g, g, softcap=3.0,
                                   need_db=True, perm=order, slab_lse=table, filter_eps=1.0)
        results.append((*stats, *grads))
    for a, b2 in zip(*results):
        assert_close_up_to_sum_order(a, b2)


def test_gemm_row_depths_drop_the_longest_light_suffix_of_slabs():
    g = torch.Generator().manual_seed(0)
    slabs, n, cols, eps = 7, 60, 16, 0.05
    table = 3 * torch.randn(slabs, n, generator=g, dtype=torch.float64)
    table[4:] -= 4.0  # light trailing slabs, as over a vocabulary sorted by mean logit
    lse = torch.logsumexp(table, 0)
    g_lse = torch.randn(n, generator=g, dtype=torch.float64)
    g_lse[::5] = 0.0  # ignored tokens
    g_tgt = -g_lse
    targets = torch.randint(0, slabs * cols, (n,), generator=g)
    targets[::7] = -1  # a target outside the vocabulary
    depth = gemm_impl.row_depths(table.float(), lse.float(), g_lse.float(), g_tgt.float(), targets, cols, eps)
    mass = torch.exp(table - lse)
    for i in range(n):
        want = 0
        if g_lse[i] != 0:
            # the fewest leading slabs whose complement (a trailing run) holds <= eps of the mass
            want = next(k for k in range(slabs + 1) if mass[k:, i].sum() <= eps)
        if g_tgt[i] != 0 and targets[i] >= 0:
            want = max(want, int(targets[i]) // cols + 1)
        assert int(depth[i]) == want, i
    assert 0 < depth.float().mean() < slabs and int(depth.min()) == 0


def sharp_rows(v, seed=0):
    """bf16 (e, c, targets) with sharper rows than peaked_inputs': NLL ~0.4 nats, ~58 entries >= 2^-12 per
    row at v = 800, targets in the first eighth of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(v, D, generator=g)
    t = torch.randint(0, v // 8, (N,), generator=g)
    e = 0.35 * c[t] + 0.3 * torch.randn(N, D, generator=g)
    e, c = (x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (e, c))
    return e, c, t.to(DEVICE)


def spy_sorted_slabs(monkeypatch):
    """A list that records, for each classifier slab the GEMM path takes, whether it was in sorted order."""
    sorted_slabs = []
    classifier_slab = gemm_impl._classifier_slab

    def spy(c, perm, *args):
        sorted_slabs.append(perm is not None)
        return classifier_slab(c, perm, *args)

    monkeypatch.setattr(gemm_impl, "_classifier_slab", spy)
    return sorted_slabs


def test_gemm_gradient_filter_skips_rows_and_stays_accurate(monkeypatch):
    v = 800
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(64 * N * 4 / 2**20))  # 64-column slabs: 13 of them
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)  # these small test shapes filter too
    e, c, t = sharp_rows(v)
    ref, _, (e64, c64, _) = reference(e, c, t)
    ref.backward()

    def grads(filter_eps):
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps).backward()
        return e.grad.clone(), c.grad.clone()

    exact = grads(None)
    auto = grads(auto_filter_eps(torch.bfloat16))
    for got, want in zip(grads("auto"), auto):  # "auto" is the dtype's budget
        assert torch.equal(got, want)
    for got, want in zip(grads("fast"), grads(2.0 ** -10)):  # so is "fast", a larger one
        assert torch.equal(got, want)
    sorted_only = grads(1e-45)  # sorts, slabs of zero mass only: summation order alone
    coarse = grads(0.3)  # rows lose up to 30% of their mass
    for got, want in zip(sorted_only, exact):
        assert rel_err(got, want) < 1e-3
    assert rel_err(auto[0], e64.grad) < GRAD_TOL[torch.bfloat16]
    assert rel_err(auto[1], c64.grad) < GRAD_TOL[torch.bfloat16]
    assert rel_err(coarse[0], exact[0]) > 1e-2  # skipping really happens
    # The auto budget skips work on these peaked rows: count the (slab, row) pairs it keeps.
    with torch.no_grad():
        perm = triton_impl.vocab_order(e, c, None)
        table = torch.empty((gemm_impl.n_slabs(N, v), N), dtype=torch.float32, device=DEVICE)
        lse = gemm_impl.forward_stats(e, c, None, t, perm=perm, slab_lse=table)[0]
        sorted_targets, _ = gemm_impl._permuted(t, None, perm, v)
        ones = torch.ones(N, device=DEVICE)
        depth = gemm_impl.row_depths(table, lse, ones, -ones, sorted_targets, gemm_impl.slab_columns(N, v),
                                     auto_filter_eps(torch.bfloat16))
    assert depth.float().mean() < 0.9 * gemm_impl.n_slabs(N, v)


def test_gemm_filtered_rows_in_depth_order_keep_bias_and_ignored_tokens_right(monkeypatch):
    # Rows are reordered by depth for the filtered products: dE must come back in the tokens' order, db and
    # dC stay within the bf16 budget of float64, and ignored tokens get exactly zero gradient.
    v = 800
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(64 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(v, D, generator=g)
    t = torch.randint(0, v // 8, (N,), generator=g)
    e = 0.35 * c[t] + 0.3 * torch.randn(N, D, generator=g)
    b = 0.5 * torch.randn(v, generator=g)
    t[::6] = -100
    e, c, b = (x.to(DEVICE, torch.bfloat16).requires_grad_() for x in (e, c, b))
    t = t.to(DEVICE)
    ref, _, (e64, c64, b64) = reference(e, c, t, b)
    ref.backward()
    linear_cross_entropy(e, c, t, bias=b, impl="gemm", filter_eps=2.0 ** -10).backward()
    assert rel_err(e.grad, e64.grad) < GRAD_TOL[torch.bfloat16]
    assert rel_err(c.grad, c64.grad) < GRAD_TOL[torch.bfloat16]
    assert rel_err(b.grad, b64.grad) < GRAD_TOL[torch.bfloat16]
    assert torch.count_nonzero(e.grad[::6]) == 0


def test_gemm_runs_exact_when_rows_would_keep_most_slabs(monkeypatch):
    # Flat softmaxes (random inputs) leave no light trailing slab: the filtered backward falls back to the
    # exact one in vocabulary order, bit for bit, without the sorted order's gathers; with DENSE_SHARE
    # above 1 it keeps the sorted order, and the gradients stay as accurate.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(16 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    e, c, t, _ = make_inputs(torch.bfloat16, scale=0.1)
    e, c = (x.detach().requires_grad_() for x in (e, c))
    sorted_slabs = spy_sorted_slabs(monkeypatch)

    def grads(filter_eps):
        e.grad = c.grad = None
        sorted_slabs.clear()
        out = linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps)
        forward_sorted = list(sorted_slabs)
        out.backward()
        return e.grad.clone(), c.grad.clone(), forward_sorted, sorted_slabs[len(forward_sorted):]

    exact = grads(None)
    auto = grads("auto")
    assert not any(exact[2] + exact[3]) and all(auto[2]) and not any(auto[3])
    for got, want in zip(auto[:2], exact[:2]):
        assert torch.equal(got, want)
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    gemm_impl.reset_filter_history()  # the fallback above would skip the next forwards' sorted order
    sorted_order = grads("auto")
    assert all(sorted_order[2]) and all(sorted_order[3])
    for got, want in zip(sorted_order[:2], exact[:2]):
        assert rel_err(got, want) < 1e-2


def test_gemm_skips_the_sorted_order_after_dense_fallbacks(monkeypatch):
    # After a filtered backward fell back to exact, the next DENSE_SKIP forwards of the problem run exact
    # without sorting (gradients equal to the exact path's, bit for bit), then one step sorts again; a
    # repeated fallback doubles the skip; a step whose rows skip enough work clears the history.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(16 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    monkeypatch.setattr(gemm_impl, "DENSE_SKIP", 2)
    monkeypatch.setattr(gemm_impl, "DENSE_SKIP_MAX", 3)
    e, c, t, _ = make_inputs(torch.bfloat16, scale=0.1)  # flat softmaxes: every filtered step falls back
    e, c = (x.detach().requires_grad_() for x in (e, c))
    sorted_slabs = spy_sorted_slabs(monkeypatch)

    def step(filter_eps="auto"):
        e.grad = c.grad = None
        sorted_slabs.clear()
        out = linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps)
        forward_sorted = any(sorted_slabs)
        out.backward()
        return forward_sorted, e.grad.clone(), c.grad.clone()

    _, de_exact, dc_exact = step(None)
    pattern = []
    for _ in range(8):
        forward_sorted, de, dc = step()
        pattern.append(forward_sorted)
        assert torch.equal(de, de_exact) and torch.equal(dc, dc_exact)
    # sort (falls back), skip 2, sort (falls back again), skip min(4, 3) = 3, sort
    assert pattern == [True, False, False, True, False, False, False, True]
    # Another problem (here float16 inputs) keeps its own history.
    assert gemm_impl.sorted_order_due(e.half(), c.half(), auto_filter_eps(torch.float16))
    assert [step()[0] for _ in range(3)] == [False] * 3
    # A step whose rows skip enough work (every step does with DENSE_SHARE above 1) clears the history.
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    assert [step()[0] for _ in range(2)] == [True, True]
    assert gemm_impl._dense_history == {}


def test_gemm_presets_filter_only_where_slabs_are_narrow(monkeypatch):
    # "auto" and "fast" filter the GEMM path only while its slabs are at most FILTER_MAX_COLS wide (the
    # token counts where filtering was measured to pay); wider, they are exact, bit for bit and without
    # sorting, while an explicit budget still filters.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(64 * N * 4 / 2**20))  # 64-column slabs
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    v = 800
    e, c, t = sharp_rows(v)
    sorted_slabs = spy_sorted_slabs(monkeypatch)

    def grads(filter_eps):
        e.grad = c.grad = None
        sorted_slabs.clear()
        linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps).backward()
        return e.grad.clone(), c.grad.clone(), any(sorted_slabs)

    exact = grads(None)
    assert gemm_impl.presets_filter(N, v) and grads("auto")[2] and grads("fast")[2]
    monkeypatch.setattr(gemm_impl, "FILTER_MAX_COLS", 32)
    assert not gemm_impl.presets_filter(N, v)
    for preset in ("auto", "fast"):
        got = grads(preset)
        assert not got[2] and torch.equal(got[0], exact[0]) and torch.equal(got[1], exact[1])
    assert grads(2.0 ** -10)[2]


def test_gemm_does_not_filter_below_its_minimum_hidden_size(monkeypatch):
    # Below FILTER_MIN_D the GEMM path neither sorts nor filters: "auto" gives the exact gradients bit for
    # bit. Above it (here forced with a tiny minimum) a coarse budget changes them.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(16 * N * 4 / 2**20))  # 16-column slabs: 7 of them
    e, c, t, _ = make_inputs(torch.bfloat16)
    e, c = (x.detach().requires_grad_() for x in (e, c))

    def grads(filter_eps):
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, impl="gemm", filter_eps=filter_eps).backward()
        return e.grad.clone(), c.grad.clone()

    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", D + 1)
    exact, coarse = grads(None), grads(0.5)
    for got, want in zip(coarse, exact):
        assert torch.equal(got, want)
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", D)
    assert not torch.equal(grads(0.5)[0], exact[0])


def test_module_form():
    e, c, t, b = make_inputs(torch.float32, with_bias=True)
    mod = LinearCrossEntropy(reduction="sum", label_smoothing=0.1, impl="torch")
    assert "label_smoothing=0.1" in repr(mod)
    ref, _, _ = reference(e, c, t, b, reduction="sum", label_smoothing=0.1)
    assert rel_err(mod(e, c, t, bias=b), ref) < 1e-6


def test_impl_auto_uses_torch_without_cuda(monkeypatch):
    e, c, t, _ = make_inputs(torch.float32)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
            linear_cross_entropy(e, c, t, impl="triton")
        linear_cross_entropy(e, c, t, impl="auto")  # falls back to the torch path


def bad_calls():
    e, c, t, b = make_inputs(torch.float32)
    e, c, b = e.detach(), c.detach(), b
    return [
        ("e", TypeError, lambda: linear_cross_entropy(e.numpy(), c, t)),
        ("targets must be an integer", TypeError, lambda: linear_cross_entropy(e, c, t.float())),
        ("same dtype", TypeError, lambda: linear_cross_entropy(e, c.double(), t)),
        ("c must be", ValueError, lambda: linear_cross_entropy(e, c[None], t)),
        ("D = c.shape", ValueError, lambda: linear_cross_entropy(e[:, :-1], c, t)),
        ("targets must have shape", ValueError, lambda: linear_cross_entropy(e, c, t[:-1])),
        ("bias must be", ValueError, lambda: linear_cross_entropy(e, c, t, bias=torch.zeros(V + 1))),
        ("targets must lie in", ValueError, lambda: linear_cross_entropy(e, c, torch.full_like(t, V))),
        ("targets must lie in", ValueError, lambda: linear_cross_entropy(e, c, torch.full_like(t, -1))),
        ("empty input", ValueError, lambda: linear_cross_entropy(e[:0], c, t[:0])),
        ("empty input", ValueError, lambda: linear_cross_entropy(e, c[:0], t)),
        ("reduction", ValueError, lambda: linear_cross_entropy(e, c, t, reduction="avg")),
        ("label_smoothing", ValueError, lambda: linear_cross_entropy(e, c, t, label_smoothing=1.5)),
        ("z_loss", ValueError, lambda: linear_cross_entropy(e, c, t, z_loss=-1)),
        ("softcap", ValueError, lambda: linear_cross_entropy(e, c, t, softcap=0.0)),
        ("filter_eps", ValueError, lambda: linear_cross_entropy(e, c, t, filter_eps="fastest")),
        ("impl must be", ValueError, lambda: linear_cross_entropy(e, c, t, impl="cuda")),
        ("shift=True", ValueError, lambda: linear_cross_entropy(e[:1], c, t[:1], shift=True)),
        ("float64", ValueError, lambda: linear_cross_entropy(e.double(), c.double(), t, impl="triton")),
        ("one device", ValueError, lambda: linear_cross_entropy(e, c, t.to("meta"))),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_raises_clear_error(index, monkeypatch):
    # On CUDA an out-of-range target is a device-side assertion unless the synchronous check is asked for
    # (the CPU always raises); the other cases do not depend on it.
    monkeypatch.setenv("LMFORGE_CCE_SYNC_CHECK", "1")
    match, exc, call = bad_calls()[index]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA target check")
@pytest.mark.parametrize("impl", ["gemm", "triton", "torch"])
def test_cuda_targets_out_of_range_raise_with_the_sync_check(impl, monkeypatch):
    # LMFORGE_CCE_SYNC_CHECK=1: the range test is read back after the loss's kernels are queued and raises
    # the CPU's ValueError (first bad value and count) for both entry points; a good call afterwards is
    # unaffected.
    monkeypatch.setenv("LMFORGE_CCE_SYNC_CHECK", "1")
    e, c, t, _ = make_inputs(torch.bfloat16)
    e, c, t = e.detach().cuda(), c.detach().cuda(), t.cuda()
    bad = t.clone()
    bad[3], bad[7] = V + 5, -2
    with pytest.raises(ValueError, match=rf"found {V + 5} \(2 bad entries\)"):
        linear_cross_entropy(e, c, bad, impl=impl)
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(e, c, bad, impl=impl)
    good = linear_cross_entropy(e, c, t, impl=impl, filter_eps=None)
    ref = F.cross_entropy((e.double() @ c.double().T), t)
    assert abs(good.item() - ref.item()) < 2e-2 * abs(ref.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA target check")
def test_cuda_targets_out_of_range_trip_a_device_assertion_by_default():
    # By default the test is a device-side assertion (no host stall), which ends the CUDA context: run it in
    # a child process, which must fail with the assertion; the same call with good targets must succeed.
    code = (
        "import sys, torch\n"
        "from lmforge.cce import linear_cross_entropy\n"
        "e = torch.randn(64, 32, device='cuda', dtype=torch.bfloat16)\n"
        "c = torch.randn(100, 32, device='cuda', dtype=torch.bfloat16)\n"
        "t = torch.randint(0, 100, (64,), device='cuda')\n"
        "t[5] = int(sys.argv[1])\n"
        "print(float(linear_cross_entropy(e, c, t)))\n"
    )
    env = {k: x for k, x in os.environ.items() if k != "LMFORGE_CCE_SYNC_CHECK"}
    ok = subprocess.run([sys.executable, "-c", code, "7"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([sys.executable, "-c", code, "100"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert failed.returncode != 0
    assert "device-side assert" in failed.stderr, failed.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", "triton", "gemm"])
def test_backends_hand_over_float32_de_that_rounds_to_their_bf16_de(backend):
    # Vocabulary-parallel ranks ask for their partial dE in float32 (summed before one rounding): it must be
    # the same accumulation, only not yet rounded.
    e, c, t, _ = make_inputs(torch.bfloat16)
    e, c = e.detach(), c.detach()
    module = {"torch": chunked, "triton": triton_impl, "gemm": gemm_impl}[backend]
    lse, _, _, mean_logit = module.forward_stats(e, c, None, t)[:4]
    g_lse = torch.full_like(lse, 1.0 / N)
    g_tgt = -g_lse
    outputs = {}
    for de_dtype in (None, torch.float32):
        outputs[de_dtype] = module.backward(e, c, None, t, lse, mean_logit, g_lse, g_tgt, None, None,
                                            need_de=True, need_dc=False, de_dtype=de_dtype)[0]
    assert outputs[None].dtype == torch.bfloat16 and outputs[torch.float32].dtype == torch.float32
    assert torch.equal(outputs[torch.float32].to(torch.bfloat16), outputs[None])
    assert not torch.equal(outputs[torch.float32], outputs[None].float())  # really unrounded

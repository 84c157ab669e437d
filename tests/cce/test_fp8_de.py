"""The exact backward's e4m3 dE product (LMFORGE_CCE_FP8_DE=1, kernels/fp8.py) against float64.

Under the Triton interpreter on the CPU (LMFORGE_CCE_TMA=1 forces the descriptor-fed kernels there), compiled
on a Hopper GPU.
"""

import pytest
import torch
import triton
import triton.language as tl

from lmforge.cce import configs, gemm_impl
from lmforge.cce.kernels.fp8 import to_e4m3
from lmforge.cce.triton_impl import interpreting
from tests.cce.test_api import D, N, V, make_inputs, rel_err
from tests.cce.test_tma_forward import float64_stats, force_plan
from tests.conftest import DEVICE

FP8 = torch.float8_e4m3fn


@triton.jit
def cast_kernel(X, Y, N: tl.constexpr, EMULATE: tl.constexpr):
    tl.store(Y + tl.arange(0, N), to_e4m3(tl.load(X + tl.arange(0, N)), EMULATE))


def test_e4m3_rounding_matches_torch_everywhere():
    # to_e4m3 on the interpreter (software rounding onto e4m3's grid, then the cast) or the GPU (hardware):
    # torch's rounding on normal values, subnormals, exact ties, values that round into the next binade
    # (1.99 -> 2, which the interpreter's own cast gets wrong) and values past the range (saturated).
    g = torch.Generator().manual_seed(2)
    special = torch.tensor([1.9922, 1.3125, 1.4375, 500.0, -600.0, 0.0, 1.5 * 2.0 ** -9, 2.0 ** -10, 447.0, 449.0])
    x = torch.cat([torch.randn(2048, generator=g) * 30, torch.randn(1024, generator=g) * 0.01,
                   special.repeat(103)[:1024]]).to(DEVICE)
    y = torch.empty(4096, dtype=FP8, device=DEVICE)
    cast_kernel[(1,)](x, y, N=4096, EMULATE=interpreting())
    assert torch.equal(y.float(), x.to(FP8).float())


def test_fp8_transpose_matches_torch_rounding():
    # A ragged classifier piece (37 of 48 columns, 40 features) into the first columns of a D x piece buffer.
    g = torch.Generator().manual_seed(0)
    c = (torch.randn(37, 40, generator=g) * 3).to(DEVICE, torch.bfloat16)
    out = torch.zeros(40, 48, device=DEVICE).to(FP8)
    gemm_impl._fp8_transpose(out[:, :37], c, 0.5)
    want = (c.float().T * 0.5).clamp(-448, 448).to(FP8)  # nearest, ties to even, as the GPU's cvt
    assert torch.equal(out[:, :37].float(), want.float())
    assert not out[:, 37:].float().any()  # columns past the piece untouched


def test_fp8_accumulate_scales_each_block_of_k_by_its_rows_scale():
    # acc += (A scaled per row and 32 columns) B^T * col_scale on e4m3 operands, ragged in every dimension
    # (40 x 56 x 36, two scale blocks, the last one short; two K blocks each under the interpreter), against
    # float64 on the same operands.
    g = torch.Generator().manual_seed(1)
    m, k, n, scale_k = 40, 56, 36, 32
    # Views of 64-column buffers, as the backward's (row strides 16-byte aligned for the descriptors).
    a8 = (torch.randn(m, 64, generator=g) * 50).to(FP8).to(DEVICE)[:, :k]
    b8t = (torch.randn(n, 64, generator=g) * 50).to(FP8).to(DEVICE)[:, :k]
    scales = (torch.rand(m, -(-k // scale_k), generator=g) + 0.5).to(DEVICE)
    acc = torch.randn(m, n, generator=g).to(DEVICE)
    per_k = scales.double().repeat_interleave(scale_k, dim=1)[:, :k]
    want = acc.double() + ((a8.double() * per_k) @ b8t.double().T) * 0.25
    gemm_impl._fp8_accumulate(acc, a8, scales, b8t, 0.25, scale_k)
    assert rel_err(acc, want) < 1e-6


def _grads(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, generator=g, dtype=torch.float64) / N) for _ in range(2)]


def _problem(monkeypatch, cols, pieces, softcap, scale=0.5):
    """Inputs, upstream gradients and float64 references for the e4m3 path's tests: dE, its softmax part
    sum_v g_lse f_v p_v C_v, dC, db and the error model's sum_v q_v^2 |C_v|^2 per row (q = g_lse f p), |C_v|^2
    bounded per tile as the kernel does."""
    e, c, t, b = make_inputs(torch.bfloat16, ignore_frac=0.2, with_bias=True, scale=scale)
    e, c, b = e.detach(), c.detach(), b.detach()
    monkeypatch.setenv("LMFORGE_CCE_TMA", "1")
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(cols * N * 4 / 2**20))
    if pieces:
        force_plan(monkeypatch, 16, 16)
    g_lse, g_tgt = _grads()
    e64, c64, b64 = (x.cpu().double().requires_grad_() for x in (e, c, b))
    lse, tgt, _, _, _ = float64_stats(e64, c64, b64, t.cpu(), softcap, None, V)
    (g_lse * lse).sum().backward(retain_graph=True)
    softmax_part = e64.grad.clone()
    (g_tgt * tgt).sum().backward()
    with torch.no_grad():
        z = e64 @ c64.T + b64
        f = torch.ones_like(z)
        if softcap is not None:
            f = 1 - torch.tanh(z / softcap) ** 2
            z = softcap * torch.tanh(z / softcap)
        q = g_lse[:, None] * torch.softmax(z, dim=1) * f
        # The kernel's bound: each tile's (BLOCK_V columns of a piece; pieces start on tile boundaries here)
        # largest squared row norm of C in place of the column's own.
        tile = configs.config_for("tma", torch.bfloat16, torch.device(DEVICE), D)["BLOCK_V"]
        norm2 = (c64 ** 2).sum(dim=1)
        tile_max = torch.nn.functional.pad(norm2, (0, -V % tile)).view(-1, tile).amax(dim=1)
        est2 = (q ** 2) @ tile_max.repeat_interleave(tile)[:V]
    ref = dict(de=e64.grad, softmax_part=softmax_part, dc=c64.grad, db=b64.grad, est2=est2)
    args = (e, c, b, t, lse.detach().float().to(DEVICE), None, g_lse.float().to(DEVICE), g_tgt.float().to(DEVICE),
            None, None)
    return args, ref


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("pieces", [False, True])  # whole slabs in one chunk, or 16-column pieces, 16-row chunks
@pytest.mark.parametrize("cols", [32, V])  # several slabs (the last ragged), one slab
def test_fp8_de_matches_float64_up_to_its_softmax_part(monkeypatch, cols, pieces, softcap):
    # dE with its softmax part from e4m3 products and the target rows added apart (the per-row check off): dE's
    # error stays within a few % of the softmax part's own norm (e4m3 keeps 3 mantissa bits: ~2.6% rms per
    # operand), while dC and db come from the same dz as the bf16 path. The accumulate kernel's error-model
    # sums match float64's with the same per-tile bound.
    args, ref = _problem(monkeypatch, cols, pieces, softcap)
    monkeypatch.setattr(gemm_impl, "FP8_ROW_ROOM", float("inf"))
    estimates = []  # the error model's per-row estimates, as the e4m3 path hands them to the check
    rows_to_redo = gemm_impl._fp8_rows_to_redo
    monkeypatch.setattr(gemm_impl, "_fp8_rows_to_redo", lambda est, de: estimates.append(est) or rows_to_redo(est, de))
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LMFORGE_CCE_FP8_DE", flag)
        results[flag] = gemm_impl.backward(*args, softcap=softcap, need_db=True)
    assert len(estimates) == 1  # the e4m3 path ran with the flag, and only then
    (de8, dc8, db8), (de16, dc16, db16) = results["1"], results["0"]
    fp8_err = (de8.double().cpu() - ref["de"]).norm() / ref["softmax_part"].norm()
    bf16_err = (de16.double().cpu() - ref["de"]).norm() / ref["softmax_part"].norm()
    assert fp8_err < 0.06 and bf16_err < fp8_err  # e4m3's error, not a wrong term (which would be ~1)
    assert rel_err(de8, ref["de"]) < 2e-2
    for got, want in ((dc8, ref["dc"]), (db8, ref["db"])):
        assert rel_err(got, want) < 1e-2
    torch.testing.assert_close(dc8.float(), dc16.float(), rtol=1e-2, atol=1e-4)  # dz differs in fp32 rounding
    # The kernel forms its sums from the e4m3 values (each within 2^-4 of q): ~1% off float64's in norm.
    torch.testing.assert_close(estimates[0].double().cpu(), gemm_impl.FP8_EST * ref["est2"].sqrt(), rtol=3e-2,
                               atol=1e-9)


def test_fp8_de_recomputes_the_rows_its_error_model_flags(monkeypatch):
    # Rows whose estimated e4m3 error is over FP8_ROW_ROOM of their dE are recomputed by the exact path: with the
    # room set at the median row's ratio about half the rows come back exact (bf16 products), the rest keep the
    # e4m3 product; with more than FP8_REFUSE_SHARE redone the problem stops taking the e4m3 path.
    args, ref = _problem(monkeypatch, 32, False, 3.0)
    e, c = args[0], args[1]
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "0")
    exact, _, _ = gemm_impl.backward(*args, softcap=3.0)
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "1")
    monkeypatch.setattr(gemm_impl, "FP8_ROW_ROOM", float("inf"))
    gemm_impl.reset_filter_history()
    unchecked, _, _ = gemm_impl.backward(*args, softcap=3.0)
    ratio = gemm_impl.FP8_EST * ref["est2"].sqrt() / ref["de"].norm(dim=1)
    monkeypatch.setattr(gemm_impl, "FP8_ROW_ROOM", ratio.median().item())
    checked, _, _ = gemm_impl.backward(*args, softcap=3.0)
    redone = (checked != unchecked).any(dim=1).cpu()
    assert 0.3 < redone.float().mean() < 0.7
    assert torch.equal(checked[redone], exact[redone.to(exact.device)])  # the exact path's rows, bit for bit
    assert torch.equal(checked[~redone], unchecked[~redone.to(exact.device)])
    grads = gemm_impl.grads_of(*args[6:8], None, None)
    assert not gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=grads)
    gemm_impl.reset_filter_history()
    assert gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=grads) == "checked"
    # Without the check (LMFORGE_CCE_FP8_DE=unchecked, for timing it) the kernel forms no estimate and no row
    # is redone: the unchecked result, bit for bit.
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "unchecked")
    monkeypatch.setattr(gemm_impl, "_fp8_rows_to_redo", None)  # never called
    plain, _, _ = gemm_impl.backward(*args, softcap=3.0)
    assert torch.equal(plain, unchecked)


def test_fp8_de_applies_only_to_the_exact_cross_entropy_backward(monkeypatch):
    e, c, _, _ = make_inputs(torch.bfloat16)
    ce = gemm_impl.grads_of(torch.ones(1), torch.ones(1), None, None)
    monkeypatch.setenv("LMFORGE_CCE_TMA", "1")
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "0")
    assert not gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=ce)  # off by default
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "1")
    assert gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=ce)
    assert not gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=False, need_de=True, grads=ce)  # sorted order
    assert not gemm_impl.fp8_de_applies(e, c, tma=False, vocab_order=True, need_de=True, grads=ce)
    assert not gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=False, grads=ce)
    z_loss = gemm_impl.grads_of(torch.ones(1), torch.ones(1), torch.ones(1), None)
    assert not gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=z_loss)
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "unchecked")
    assert gemm_impl.fp8_de_applies(e, c, tma=True, vocab_order=True, need_de=True, grads=ce) == "unchecked"
    monkeypatch.setenv("LMFORGE_CCE_FP8_DE", "yes")
    with pytest.raises(ValueError, match="LMFORGE_CCE_FP8_DE"):
        gemm_impl.fp8_de()


def test_fp8_de_workspace_is_counted_in_the_plan():
    # The e4m3 path keeps no fp32 dE accumulator but holds the softmax part's e4m3 copy, its scales and the
    # piece's e4m3 transpose: the plan it gets at Gemma 2's shape fits the default budget with all of those
    # counted, and a budget cut to what the shipped plan needs without them forces a smaller step.
    n, d, v = 8192, 2304, 256000
    cols = gemm_impl.slab_columns(n, v, gemm_impl.DEFAULT_SLAB_BYTES)
    budget = gemm_impl.default_budget(n, d, v, 2)
    kw = dict(elem_bytes=2, dz_bytes=2, gather_rows=False, gather_cols=False, max_chunks=gemm_impl.EXACT_MAX_CHUNKS)
    space = lambda plan, **f: gemm_impl.backward_workspace(*plan, d, elem_bytes=2, dz_bytes=2, gather_rows=False,
                                                           gather_cols=False, **f)
    plan8 = gemm_impl.backward_plan(n, d, v, cols, de_acc=False, fp8=True, budget=budget, **kw)
    assert space(plan8, de_acc=False, fp8=True) <= budget
    plan = gemm_impl.backward_plan(n, d, v, cols, de_acc=True, budget=budget, **kw)
    tight = space(plan, de_acc=False, fp8=False)  # the shipped step's dz alone
    small8 = gemm_impl.backward_plan(n, d, v, cols, de_acc=False, fp8=True, budget=tight, **kw)
    assert small8[0] * small8[1] < plan[0] * plan[1] and space(small8, de_acc=False, fp8=True) <= tight

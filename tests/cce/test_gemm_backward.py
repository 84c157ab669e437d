"""The GEMM backward's workspace plan: row chunks and slab pieces (gemm_impl.backward_plan) and the chunked
backward against the one-chunk backward and float64, in vocabulary order and in the filter's sorted order.

On the CPU the Triton passes run under the interpreter; on an H200 the same tests run compiled.
"""

import itertools

import pytest
import torch

from lmforge.cce import gemm_impl, triton_impl
from tests.cce.test_api import N, V, make_inputs, rel_err, sharp_rows
from tests.cce.test_tma_forward import float64_stats, force_plan
from tests.conftest import DEVICE

GEMMA = dict(n=8192, d=2304, vocab=256000)


def plan_and_space(n, d, vocab, budget, *, sorted_order=False, tma=True, max_chunks=None, de_acc=True):
    cols = gemm_impl.slab_columns(n, vocab)
    kw = dict(elem_bytes=2, dz_bytes=2 if tma else 4, gather_rows=sorted_order, gather_cols=sorted_order,
              de_acc=de_acc)
    rows, piece = gemm_impl.backward_plan(n, d, vocab, cols, budget=budget, max_chunks=max_chunks, **kw)
    return rows, piece, cols, gemm_impl.backward_workspace(rows, piece, d, **kw), kw


@pytest.mark.parametrize("n,d,vocab", [(8192, 2304, 256000), (8192, 4096, 128256), (8192, 576, 49152),
                                       (2048, 2304, 256000), (32768, 2304, 256000), (300, 64, 5000)])
@pytest.mark.parametrize("sorted_order", [False, True])
@pytest.mark.parametrize("tma", [False, True])
def test_backward_plan_fits_its_budget_and_keeps_whole_slabs_when_it_can(n, d, vocab, sorted_order, tma):
    cols = gemm_impl.slab_columns(n, vocab)
    whole = gemm_impl.backward_workspace(n, cols, d, elem_bytes=2, dz_bytes=2 if tma else 4,
                                         gather_rows=sorted_order, gather_cols=sorted_order, de_acc=True)
    assert plan_and_space(n, d, vocab, whole, sorted_order=sorted_order, tma=tma)[:2] == (n, cols)
    steps_before = 0
    for share in (1.0, 0.5, 0.25, 0.1, 0.05, 0.02):
        budget = int(share * whole)
        rows, piece, _, space, kw = plan_and_space(n, d, vocab, budget, sorted_order=sorted_order, tma=tma)
        assert 0 < rows <= n and 0 < piece <= cols
        # Every (rows, piece) on the plan's grid that fits: the plan fits whenever one of them does.
        unit_r, unit_c = (128 if n >= 512 else 8), (256 if cols >= 1024 else 16)
        grid = itertools.product(range(unit_r, n + unit_r, unit_r), range(unit_c, cols + unit_c, unit_c))
        if any(gemm_impl.backward_workspace(min(r, n), min(p, cols), d, **kw) <= budget for r, p in grid):
            assert space <= budget
        steps = -(-n // rows) * -(-cols // piece)
        assert steps >= steps_before  # a smaller budget never takes fewer steps
        steps_before = steps


def test_backward_plan_meets_the_issue_memory_target_at_gemma_shape():
    # dE + dC of Gemma 2 2B's shape in bf16; the vocabulary order's default budget, the target 1.05x of them.
    grads = (GEMMA["n"] + GEMMA["vocab"]) * GEMMA["d"] * 2
    budget = gemm_impl.default_budget(GEMMA["n"], GEMMA["d"], GEMMA["vocab"], 2)
    assert budget <= 0.046 * grads
    rows, piece, cols, space, _ = plan_and_space(**GEMMA, budget=budget, max_chunks=gemm_impl.EXACT_MAX_CHUNKS)
    assert space <= budget and space + 4 * 2**20 <= 0.05 * grads  # room for the forward's saved tables
    assert -(-GEMMA["n"] // rows) <= gemm_impl.EXACT_MAX_CHUNKS  # few bf16 roundings of dC
    assert piece == cols  # whole slabs: the fastest plan measured within the budget (three chunks)
    assert gemm_impl.sorted_rows(GEMMA["n"]) == GEMMA["n"] // gemm_impl.SORTED_CHUNKS


def test_backward_plan_caps_chunks_only_while_the_budget_allows():
    n, d, vocab = GEMMA["n"], GEMMA["d"], GEMMA["vocab"]
    budget = 60 << 20
    rows, _, _, space, _ = plan_and_space(n, d, vocab, budget, max_chunks=2)
    assert -(-n // rows) <= 2 and space <= budget
    rows_free = plan_and_space(n, d, vocab, budget)[0]
    assert rows_free <= rows  # uncapped, the cheaper plan may use more chunks
    tiny = 20 << 20  # two chunks cannot fit: the budget wins over the cap
    rows, _, _, space, _ = plan_and_space(n, d, vocab, tiny, max_chunks=2)
    assert -(-n // rows) > 2 and space <= tiny


def test_backward_budget_default_and_override(monkeypatch):
    monkeypatch.delenv("LMFORGE_CCE_BWD_MB", raising=False)
    n, d, vocab = GEMMA["n"], GEMMA["d"], GEMMA["vocab"]
    assert gemm_impl.backward_budget() is None  # the defaults: a share, or two sorted chunks
    assert gemm_impl.default_budget(n, d, vocab, 2) == int(gemm_impl.BWD_SHARE * (n + vocab) * d * 2)
    assert gemm_impl.default_budget(8192, 576, 49152, 2) == gemm_impl.BWD_MIN_BYTES  # small problems
    monkeypatch.setenv("LMFORGE_CCE_BWD_MB", "300")
    assert gemm_impl.backward_budget() == 300 << 20


def backward_inputs(dtype):
    e, c, t, b = make_inputs(dtype, ignore_frac=0.2, with_bias=True, scale=3.0)
    e, c, b = e.detach(), c.detach(), b.detach()
    g = torch.Generator().manual_seed(7)
    g_lse = (torch.rand(N, generator=g) + 0.5).to(DEVICE) / N
    return e, c, t, b, g_lse


def sorted_table(e, c, b, t, perm):
    table = torch.empty((gemm_impl.n_slabs(N, V), N), dtype=torch.float32, device=DEVICE)
    stats = gemm_impl.forward_stats(e, c, b, t, softcap=3.0, perm=perm, slab_lse=table)
    return stats, table


def filtered_float64_grads(e, c, b, t, g_lse, softcap, perm, depth, cols):
    """dE, dC, db of sum_i g_i (lse_i - z_i,t_i) in float64 with the filter's cut applied: row i's logit
    gradients are zero at every sorted position >= depth_i * cols (its dropped trailing slabs)."""
    e64, c64, b64 = e.cpu().double(), c.cpu().double(), b.cpu().double()
    x = e64 @ c64.T + b64
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    dz = torch.softmax(z, 1)
    t = t.cpu()
    valid = (t >= 0) & (t < z.shape[1])
    dz[valid.nonzero()[:, 0], t[valid]] -= 1.0
    dz *= g_lse.cpu().double()[:, None]
    position = torch.empty(z.shape[1], dtype=torch.long)
    position[perm.cpu().long()] = torch.arange(z.shape[1])
    dz *= position[None, :] < depth.cpu()[:, None] * cols
    dx = dz * (1 - torch.tanh(x / softcap) ** 2) if softcap is not None else dz
    return dx @ c64, dx.T @ e64, dx.sum(0)


@pytest.mark.parametrize("dtype,tma", [(torch.float32, "0"), (torch.bfloat16, "0"), (torch.bfloat16, "1")],
                         ids=["fp32", "bf16-cublas", "bf16-tma"])
@pytest.mark.parametrize("sorted_order", [False, True])
@pytest.mark.parametrize("plan", [(16, 16), (8, 32), (24, 8)])
def test_chunked_backward_matches_one_chunk(monkeypatch, dtype, tma, sorted_order, plan):
    # Rows in chunks (each with its own dE accumulator; in the sorted order each chunk gathers its rows,
    # deepest first) and slabs in pieces: the same gradients as one chunk of whole slabs, up to dC's extra
    # roundings between chunks (none in fp32 beyond the sum order). In the sorted order the filter drops
    # slabs per row, so later chunks visit fewer slabs than the first.
    monkeypatch.setenv("LMFORGE_CCE_TMA", tma)
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)  # keep the sorted order however much rows keep
    e, c, t, b, g_lse = backward_inputs(dtype)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32) \
        if sorted_order else None
    stats, table = sorted_table(e, c, b, t, perm)
    lse, tgt, _, mu = stats
    kwargs = dict(softcap=3.0, need_db=True, perm=perm, slab_lse=table if sorted_order else None,
                  filter_eps=0.05 if sorted_order else None)
    if sorted_order:  # the filter really drops slabs for some rows, so the chunks differ in depth
        targets, _ = gemm_impl._permuted(t, b, perm, V)
        depth = gemm_impl.row_depths(table, lse, g_lse, -g_lse, targets, 32, 0.05)
        assert depth.min() < depth.max()
        want = filtered_float64_grads(e, c, b, t, g_lse, 3.0, perm, depth, 32)
    results = []
    for forced in ((N, 32), plan):
        force_plan(monkeypatch, *forced)
        results.append(gemm_impl.backward(e, c, b, t, lse, mu, g_lse, -g_lse, None, None, **kwargs))
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for whole, chunked in zip(*results):
        assert whole.dtype == chunked.dtype and whole.shape == chunked.shape
        assert rel_err(chunked, whole) < tol, (whole.shape, rel_err(chunked, whole))
    if not sorted_order:  # exact: against float64 too
        e64, c64, b64 = (x.cpu().double().requires_grad_() for x in (e, c, b))
        lse64, tgt64, *_ = float64_stats(e64, c64, b64, t.cpu(), 3.0, None, V)
        (g_lse.cpu().double() * (lse64 - tgt64)).sum().backward()
        want = (e64.grad, c64.grad, b64.grad)
    for result in results:  # both plans against float64 (in the sorted order, with the same cut)
        for got, ref in zip(result, want):
            assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1.2e-2)


@pytest.mark.parametrize("sorted_order", [False, True])
@pytest.mark.parametrize("need", ["de", "dc", "de_fp32"])
def test_chunked_backward_with_some_gradients_only(monkeypatch, need, sorted_order):
    # dE alone, dC alone, and dE in fp32 (vocabulary-parallel ranks), which chunks accumulate in the
    # output itself in vocabulary order and round through a temporary into the tokens' rows in the sorted one.
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    e, c, t, b, g_lse = backward_inputs(torch.bfloat16)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32) \
        if sorted_order else None
    (lse, _, _, mu), table = sorted_table(e, c, b, t, perm)
    kwargs = dict(softcap=3.0, need_de=need != "dc", need_dc=need == "dc", perm=perm,
                  slab_lse=table if sorted_order else None, filter_eps=0.05 if sorted_order else None,
                  de_dtype=torch.float32 if need == "de_fp32" else None)
    results = []
    for forced in ((N, 32), (16, 16)):
        force_plan(monkeypatch, *forced)
        results.append(gemm_impl.backward(e, c, b, t, lse, mu, g_lse, -g_lse, None, None, **kwargs))
    index = 1 if need == "dc" else 0
    for whole, chunked in zip(*results):
        assert (whole is None) == (chunked is None)
    whole, chunked = results[0][index], results[1][index]
    assert chunked.dtype == (torch.float32 if need == "de_fp32" else torch.bfloat16)
    assert rel_err(chunked, whole) < (1e-6 if need == "de_fp32" else 4e-3)


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("sorted_order", [False, True])
def test_default_plans(monkeypatch, sorted_order, small):
    # Without LMFORGE_CCE_BWD_MB: a small problem (dE + dC under SMALL_GRAD_BYTES) runs one chunk of whole
    # slabs; else the filtered (sorted) backward runs sorted_rows(n) rows per chunk of whole slabs and the
    # vocabulary order backward_plan's split within default_budget. Each gives one chunk's gradients. (The
    # dC workspace, on by default, has its own tests below: off here, where the plans are the subject.)
    monkeypatch.delenv("LMFORGE_CCE_BWD_MB", raising=False)
    monkeypatch.setenv("LMFORGE_CCE_DC_WORKSPACE", "0")
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    if not small:
        monkeypatch.setattr(gemm_impl, "SMALL_GRAD_BYTES", 0)
        monkeypatch.setattr(gemm_impl, "BWD_MIN_BYTES", 0)  # a budget this small shape must split for
        monkeypatch.setattr(gemm_impl, "BWD_SHARE", 0.05)
    e, c, t, b, g_lse = backward_inputs(torch.bfloat16)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.int32) \
        if sorted_order else None
    (lse, _, _, mu), table = sorted_table(e, c, b, t, perm)
    kwargs = dict(softcap=3.0, perm=perm, slab_lse=table if sorted_order else None,
                  filter_eps=0.05 if sorted_order else None)
    assert gemm_impl.sorted_rows(N) < N  # two chunks at this size too
    calls, plans = [], []

    def spy(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            plans.append(real(*args, **kwargs))
            return plans[-1]
        return call

    for name in ("sorted_rows", "backward_plan"):
        monkeypatch.setattr(gemm_impl, name, spy(name, getattr(gemm_impl, name)))
    default = gemm_impl.backward(e, c, b, t, lse, mu, g_lse, -g_lse, None, None, **kwargs)
    assert calls == ([] if small else ["sorted_rows"] if sorted_order else ["backward_plan"])
    if calls == ["backward_plan"]:
        rows, piece = plans[0]
        assert rows < N or piece < 32  # the budget really split it
    force_plan(monkeypatch, N, 32)
    one = gemm_impl.backward(e, c, b, t, lse, mu, g_lse, -g_lse, None, None, **kwargs)
    assert default[2] is None and one[2] is None
    for got, want in zip(default[:2], one[:2]):
        assert rel_err(got, want) < 4e-3


def test_the_plans_benchmark_forces_and_restores_plans(monkeypatch):
    # bench/cce_backward_plans.py's forced(): inside it the backward runs the given plan whatever the order,
    # size or default rules; afterwards the plan function and the user's budget are back.
    from tests.conftest import load_bench_script

    script = load_bench_script("cce_backward_plans")
    assert script.parse_plan("4096x2048") == (4096, 2048) and script.parse_plan("default") is None
    monkeypatch.setenv("LMFORGE_CCE_BWD_MB", "77")
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    real_plan = gemm_impl.backward_plan
    e, c, t, b, g_lse = backward_inputs(torch.bfloat16)
    lse, _, _, mu = gemm_impl.forward_stats(e, c, b, t)
    widths = []
    classifier_slab = gemm_impl._classifier_slab
    monkeypatch.setattr(gemm_impl, "_classifier_slab",
                        lambda c, perm, start, w, buf: widths.append(w) or classifier_slab(c, perm, start, w, buf))
    with script.forced((16, 8)):
        gemm_impl.backward(e, c, b, t, lse, mu, g_lse, -g_lse, None, None)
    assert max(widths) == 8 and sum(widths) == -(-N // 16) * V  # 8-column pieces, once per 16-row chunk
    assert gemm_impl.backward_plan is real_plan and gemm_impl.backward_budget() == 77 << 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("add", [False, True])
def test_scatter_rows_matches_torch_index_ops(dtype, add):
    # The sorted order's dC scatter: rows of a slab into a permutation's rows, copied (first chunk) or added
    # (later chunks; one rounding of the fp32 sum). Width 300 spans two 256-column tiles; 37 rows three 16-row
    # tiles; the untouched rows must stay as they were.
    g = torch.Generator().manual_seed(3)
    dst = torch.randn(100, 300, generator=g).to(dtype).to(DEVICE)
    src = torch.randn(37, 300, generator=g).to(dtype).to(DEVICE)
    index = torch.randperm(100, generator=g)[:37].to(DEVICE)
    want = dst.clone()
    if add:
        want.index_copy_(0, index, (want[index].double() + src.double()).to(dtype))
    else:
        want.index_copy_(0, index, src)
    gemm_impl.scatter_rows(dst, index.to(torch.int32), src, add=add)
    assert torch.equal(dst, want)
    # Rows whose index is negative are skipped.
    skip = index.clone()
    skip[::3] = -1
    before = dst.clone()
    gemm_impl.scatter_rows(dst, skip, src.flip(0), add=False)
    want = before.clone()
    want.index_copy_(0, index[skip >= 0], src.flip(0)[skip >= 0])
    assert torch.equal(dst, want)
    # A side destination in the same launch (permute_rows_' parked rows): the skipped rows go there instead.
    side = torch.zeros(20, 300, dtype=dtype, device=DEVICE)
    side_index = torch.full_like(skip, -1)
    side_index[::3] = torch.arange(len(side_index[::3]), device=DEVICE)
    dst = before.clone()
    if add:
        with pytest.raises(ValueError, match="side destination"):
            gemm_impl.scatter_rows(dst, skip, src.flip(0), add=True, side=side, side_index=side_index)
        return
    gemm_impl.scatter_rows(dst, skip, src.flip(0), add=False, side=side, side_index=side_index)
    assert torch.equal(dst, want)
    assert torch.equal(side[:len(side_index[::3])], src.flip(0)[::3]) and not side[len(side_index[::3]):].any()


def test_dc_host_layout_applies_only_where_the_deepest_chunk_alone_visits_the_hosts():
    # 400 columns in 32-column slabs (13, the last of 16), chunks of 16 rows: the accumulator takes dC's
    # last 32 rows, the classifier slab the 32 before, so slabs 10-12 are the hosts.
    counts = [37] * 10 + [7, 5, 3]
    assert gemm_impl._dc_host_layout(37, 40, 400, 32, 16, counts, dz_bytes=2) == (10, 368, 336)
    # slab 10 visited beyond the deepest chunk's 16 rows; or by more rows (8) than fit beside their dz (16 x
    # 32 bf16 of buffer: 8 x 32 of dz + 8 x 40 of gathered rows is more)
    for first_count in (17, 8):
        assert gemm_impl._dc_host_layout(37, 40, 400, 32, 16, [37] * 10 + [first_count, 5, 3], dz_bytes=2) is None
    assert gemm_impl._dc_host_layout(37, 40, 100, 32, 16, [37, 20, 9, 3], dz_bytes=2) is None  # no room
    assert gemm_impl._dc_host_layout(37, 36, 400, 32, 16, counts, dz_bytes=2) is None  # rows not 16-byte aligned


@pytest.mark.parametrize("planned", [False, True], ids=["budget", "default"])
@pytest.mark.parametrize("tma", ["0", "1"], ids=["cublas", "tma"])
def test_backward_in_dc_workspace_matches_the_sorted_plan(monkeypatch, tma, planned):
    # Route (e): the filtered backward with its accumulator and gathered classifier slab in dC's own buffer
    # (dC formed in the sorted order, host slabs last, everything moved back in place) gives the sorted plan's
    # gradients: dE bit for bit (the same fp32 sums, rounded once), dC up to the order in which the two
    # chunks' parts are rounded, both within bf16 rounding of the float64 gradients with the same cut.
    # "default": no budget set, as in training, where dC's permutation is planned before the host sync.
    monkeypatch.setenv("LMFORGE_CCE_TMA", tma)
    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    v = 400
    e, c, t = (x.detach() for x in sharp_rows(v, seed=2))
    g_lse = torch.full((N,), 1.0 / N, device=DEVICE)
    perm = triton_impl.vocab_order(e, c, None)
    table = torch.empty((gemm_impl.n_slabs(N, v), N), dtype=torch.float32, device=DEVICE)
    lse, _, _, mu = gemm_impl.forward_stats(e, c, None, t, perm=perm, slab_lse=table)
    eps = 2.0 ** -6  # the last slabs are visited by a few rows (6, 5 and 4 of 37)
    targets, _ = gemm_impl._permuted(t, None, perm, v)
    depth = gemm_impl.row_depths(table, lse, g_lse, -g_lse, targets, 32, eps)
    counts = torch.bincount(depth, minlength=14).flip(0).cumsum(0).flip(0)[1:].tolist()
    assert gemm_impl._dc_host_layout(N, 40, v, 32, 16, counts, dz_bytes=2) is not None, counts
    if planned:
        monkeypatch.delenv("LMFORGE_CCE_BWD_MB", raising=False)
        monkeypatch.setattr(gemm_impl, "SMALL_GRAD_BYTES", 0)
        monkeypatch.setattr(gemm_impl, "sorted_rows", lambda n: 16)
    else:
        force_plan(monkeypatch, 16, 32)
    hosted_calls = []
    hosted = gemm_impl._backward_dc_hosted
    monkeypatch.setattr(gemm_impl, "_backward_dc_hosted",
                        lambda *a, **k: hosted_calls.append(k["moves"] is not None) or hosted(*a, **k))
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("LMFORGE_CCE_DC_WORKSPACE", flag)
        results.append(gemm_impl.backward(e, c, None, t, lse, mu, g_lse, -g_lse, None, None, perm=perm,
                                          slab_lse=table, filter_eps=eps))
    assert hosted_calls == [planned]
    (de0, dc0, _), (de1, dc1, db1) = results
    assert db1 is None and de1.dtype == dc1.dtype == torch.bfloat16
    assert torch.equal(de1, de0)
    assert rel_err(dc1, dc0) < 4e-3
    want_de, want_dc, _ = filtered_float64_grads(e, c, torch.zeros(v, device=DEVICE), t, g_lse, None, perm,
                                                 depth, 32)
    assert rel_err(de1, want_de) < 1.2e-2 and rel_err(dc1, want_dc) < 1.2e-2


def test_loss_with_the_dc_workspace_matches_the_two_chunk_plan(monkeypatch):
    # The same route through the public loss and autograd (the forward's own sorted order and table): the
    # default (LMFORGE_CCE_DC_WORKSPACE unset) takes it, "0" the two-chunk plan, with the same gradients.
    from lmforge.cce import linear_cross_entropy

    monkeypatch.setenv("LMFORGE_CCE_SLAB_MB", str(32 * N * 4 / 2**20))
    monkeypatch.setattr(gemm_impl, "FILTER_MIN_D", 1)
    monkeypatch.setattr(gemm_impl, "DENSE_SHARE", 1.01)
    force_plan(monkeypatch, 16, 32)
    hosted_calls = []
    hosted = gemm_impl._backward_dc_hosted
    monkeypatch.setattr(gemm_impl, "_backward_dc_hosted", lambda *a, **k: hosted_calls.append(1) or hosted(*a, **k))
    e, c, t = sharp_rows(400, seed=2)
    grads = []
    for flag in ("0", None):
        if flag is None:
            monkeypatch.delenv("LMFORGE_CCE_DC_WORKSPACE", raising=False)
        else:
            monkeypatch.setenv("LMFORGE_CCE_DC_WORKSPACE", flag)
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t, impl="gemm", filter_eps=2.0 ** -6).backward()
        grads.append((e.grad.clone(), c.grad.clone()))
    assert hosted_calls == [1]
    assert torch.equal(grads[1][0], grads[0][0]) and rel_err(grads[1][1], grads[0][1]) < 4e-3


def _permutation(kind: str, v: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randperm(v, generator=g)
    perm = torch.arange(v)
    if kind == "swaps":  # v // 2 cycles of two
        perm[0:v - 1:2], perm[1:v:2] = torch.arange(1, v, 2), torch.arange(0, v - 1, 2)
    elif kind == "few moved":  # mostly fixed points, one shuffled subset
        moved = torch.randperm(v, generator=g)[:40]
        perm[moved] = moved[torch.randperm(40, generator=g)]
    return perm


@pytest.mark.parametrize("kind", ["random", "identity", "swaps", "few moved"])
@pytest.mark.parametrize("batch", [1, 7, 64, 400])
def test_permute_rows_in_place_matches_indexing(kind, batch):
    # Route (e)'s un-permutation of dC: row p moves to row perm[p], in place, through a buffer of `batch`
    # rows, for cycles that span many batches (random), none (identity), many short ones (swaps) or a mix.
    g = torch.Generator().manual_seed(batch)
    v = 333
    perm = _permutation(kind, v, g)
    x = torch.randn(v, 70, generator=g).to(torch.bfloat16).to(DEVICE)
    want = torch.empty_like(x)
    want[perm.to(DEVICE)] = x
    buffer = torch.empty((batch, 70), dtype=x.dtype, device=DEVICE)
    x0 = x.clone()
    assert gemm_impl.permute_rows_(x, perm.to(torch.int32).to(DEVICE), buffer) is x
    assert torch.equal(x, want)
    # Planned ahead (as the backward queues it before its host sync), through a buffer larger than the plan's
    # batches: the same moves.
    perm32 = perm.to(torch.int32).to(DEVICE)
    moves = gemm_impl.plan_row_moves(perm32, batch)
    assert torch.equal(perm32.cpu(), perm.to(torch.int32))  # the plan leaves the forward's permutation alone
    # the kernels' list (where Triton runs) is torch's, entry for entry
    by_torch = gemm_impl.plan_row_moves(perm32, batch, kernel=False)
    assert moves.batch == by_torch.batch and all(torch.equal(a, b) for a, b in zip(moves[:4], by_torch[:4]))
    assert torch.equal(gemm_impl.permute_rows_(x0, None, torch.empty((batch + 3, 70), dtype=x.dtype,
                                                                     device=DEVICE), moves), want)
    with pytest.raises(ValueError, match="moves planned for"):
        gemm_impl.permute_rows_(x0[1:], None, buffer, moves)
    # The cycles behind it: each position's leader is its cycle's smallest position, its rank the number of
    # moves from there, walked here one move at a time.
    leader, rank, length = (t.cpu() for t in gemm_impl._cycles(perm.to(DEVICE)))
    # torch's rounds (where Triton is missing) find the same cycles as the kernel's
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gemm_impl._cycles(perm.to(DEVICE), kernel=False),
                                                       (leader, rank, length)))
    for p in torch.randint(v, (6,), generator=g).tolist():
        cycle, q = [p], int(perm[p])
        while q != p:
            cycle.append(q)
            q = int(perm[q])
        start = cycle.index(min(cycle))
        assert (int(leader[p]), int(length[p])) == (min(cycle), len(cycle))
        assert int(rank[p]) == (len(cycle) - start) % len(cycle)


@pytest.mark.skipif(DEVICE != "cpu", reason="the probe's self-test runs its kernels under the interpreter")
def test_gathered_products_probe_matches_float64():
    # bench/cce_gathered_products_probe.py (route (c) of docs/cce-tuning.md): its two products, which read
    # the classifier's and E's rows through the permutations, against float64 on small shapes.
    from tests.conftest import load_bench_script

    load_bench_script("cce_gathered_products_probe").selftest()
